#!/usr/bin/env bash
# Runs every benchmark on every backend available and regenerates BENCHMARKS.md and
# the plots in docs/ from their output.
#
#   scripts/benchmarks.sh
#
# Backends: docker (when a daemon answers; PGFIXTURE_IMAGE as everywhere) and local;
# the nextest process benches also run on url, a plain PostgreSQL cluster this script
# starts and passes as PGFIXTURE_URL (scripts/url-server.sh).
# Takes about 25 minutes on a 2-core machine. BENCH_TESTS, BENCH_REPEAT and the other
# variables of each bench apply. BENCHES="suite provision" runs only those (of overhead,
# process, process-dev, sqlx08, provision, suite, tune) and rebuilds the report from
# their new output and the others' last output (sqlx08 is compat/sqlx-0_8's bench).
set -euo pipefail
cd "$(dirname "$0")/.."

backends=${PGFIXTURE_BENCH_BACKENDS:-docker local}
if ! docker info >/dev/null 2>&1; then
    echo "benchmarks.sh: no Docker daemon answers; benchmarking the local backend only" >&2
    backends=local
fi
out=target/pgfixture-bench
mkdir -p "$out" docs
cargo bench --no-run --quiet
cargo build --release --example tune --quiet

selected=" ${BENCHES:-overhead process process-dev sqlx08 provision suite tune} "
run() { # name, backend, command...
    local name=$1 backend=$2
    shift 2
    if [[ $selected != *" $name "* ]]; then
        [ -s "$out/$name-$backend.txt" ] || {
            echo "benchmarks.sh: no earlier output of $name ($backend); run it (BENCHES)" >&2
            exit 1
        }
        return
    fi
    echo "== $name ($backend): $*" >&2
    # The bench's stderr is kept beside its output, and shown when it fails.
    local err="$out/$name-$backend.err"
    if ! PGFIXTURE_BACKEND=$backend RUST_BACKTRACE=0 "$@" 2>"$err" | grep -v '^pgfixture: ' >"$out/$name-$backend.txt"; then
        echo "benchmarks.sh: $name ($backend) failed; the end of its stderr ($err):" >&2
        grep -v '^pgfixture: ' "$err" | tail -20 >&2
        exit 1
    fi
    cat "$out/$name-$backend.txt" >&2
}

for backend in $backends; do
    run overhead "$backend" cargo bench --quiet --bench overhead
    run process "$backend" cargo bench --quiet --bench process
    run process-dev "$backend" cargo bench --quiet --bench process --profile dev
    run sqlx08 "$backend" cargo bench --quiet -p pgfixture-sqlx-0_8 --features sqlx-0_9 --bench handles --profile dev
    run provision "$backend" cargo bench --quiet --bench provision
    BENCH_PLOT="docs/suite-$backend.svg" run suite "$backend" cargo bench --quiet --bench suite
    run tune "$backend" cargo run --quiet --release --example tune
done

# A nextest process on a server of the user's, as a team's CI service is.
. scripts/url-server.sh
url=
if [[ $selected == *" process "* || $selected == *" process-dev "* || $selected == *" sqlx08 "* ]]; then
    start_url_server || { echo "benchmarks.sh: no PostgreSQL cluster for the url backend" >&2; exit 1; }
fi
PGFIXTURE_URL=$url run process url cargo bench --quiet --bench process
PGFIXTURE_URL=$url run process-dev url cargo bench --quiet --bench process --profile dev
PGFIXTURE_URL=$url run sqlx08 url cargo bench --quiet -p pgfixture-sqlx-0_8 --features sqlx-0_9 --bench handles --profile dev

machine() {
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
    echo "- memory: $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -r); $(. /etc/os-release && echo "$PRETTY_NAME")"
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1)
    echo "- PostgreSQL: $("$bin/postgres" --version 2>/dev/null || echo unknown) (local backend; the offline image holds the same binaries)"
    if docker info >/dev/null 2>&1; then
        # The image the benches ran on, as they reported it (a rebuild of the report
        # alone may run with another PGFIXTURE_IMAGE).
        local image
        image=$(sed -n 's/^backend: docker (\(.*\))$/\1/p' "$out/overhead-docker.txt" 2>/dev/null | head -n 1)
        echo "- Docker: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})'), image ${image:-${PGFIXTURE_IMAGE:-postgres:18-alpine}}"
    fi
    echo "- $(rustc --version)"
    echo "- generated $(date -u '+%Y-%m-%d %H:%M UTC') by \`scripts/benchmarks.sh\`${BENCHES:+ (\`BENCHES=\"$BENCHES\"\`: the other tables are from an earlier run)}"
}

section() { # title, name, text[, backends]
    local title=$1 name=$2 text=$3
    echo "## $title"
    echo
    echo "$text"
    for backend in ${4:-$backends}; do
        echo
        echo "### $backend"
        echo
        echo '```text'
        cat "$out/$name-$backend.txt"
        echo '```'
    done
    echo
}

{
    echo "# pgfixture benchmarks"
    echo
    echo "Regenerate everything here (tables and plots) with \`scripts/benchmarks.sh\`."
    echo "The machines are shared and noisy: each table compares numbers measured side"
    echo "by side in one run; compare ratios, not absolute times across tables."
    echo
    echo "## Machine"
    echo
    machine
    echo
    echo "## Suite time against workers"
    echo
    for backend in $backends; do
        echo "![suite time against workers, $backend](docs/suite-$backend.svg)"
        echo
    done
    section "Whole suites, side by side with the alternatives" suite \
"\`benches/suite.rs\`: the same tests at 1, 2, 4 and 8 workers, the way \`cargo test\` runs them,
I/O-bound (4 ms waiting on the server per test) and CPU-bound (4 ms hashing on the client per
test). \`pgfixture\`'s suites include provisioning their workers (a new configuration per
suite); \`pgfixture-warm\`'s workers are provisioned before the suite starts, as for a long
suite, nextest's later processes or \`PGFIXTURE_REUSE=1\`. Suites have 384 tests (about 2.4 s
at 1 worker); \`db-per-test\` and \`clone-per-test\` run 96 of them and \`server-per-test\`
2 W, scaled to the suite's size. Each repeat runs every worker count, so the speedups compare
suites run side by side."
    section "Per-test overhead, in-process" overhead \
"\`benches/overhead.rs\`: acquire, first query, release, warm, against the same statements on
a connection already held (the floor). Includes pgfixture's check that the test did not commit
and its clearing of the session. sqlx's second floor is a connection opened on another runtime,
as one that outlives \`#[tokio::test]\` runtimes must be (pgfixture's live on its own runtime)."
    section "Per-test cost of a fresh process (nextest)" process \
"\`benches/process.rs\`, release build: a process per test with its worker already provisioned,
against a process that exits at once (\`empty\`) and one that opens one connection itself (\`raw\`).
The kinds of process take turns, so the machine's drift reaches every column alike. \`+migr\` rows
add a migrations folder of 200 sqlx migrations (70 KB), whose content hash every process needs.
\`sqlx\` takes \`pgfixture::sqlx::worker_db()\` in a plain runtime; \`sqlx attr\` is the same test as
\`#[pgfixture::test]\` runs it, its connection on the test's own runtime (README, \"Under nextest\");
\`sqlx pool\` is a \`#[pgfixture::test]\` taking \`sqlx::PgPool\` (the worker pool, its marks and readings);
the sqlx columns' \`x raw\` are against \`sqlx raw\`. \`url\` runs on a plain PostgreSQL cluster
through \`PGFIXTURE_URL\` (password authentication over TCP, as a CI service's), where container
mode is refused." "$backends url"
    section "Per-test cost of a fresh process, unoptimised build" process-dev \
"The same, built as test binaries are (\`--profile dev\`; pgfixture's \`Cargo.toml\` optimises no
dependency in test builds, so this is what a user's test binary gets). On \`url\`, every connection
hashes the cluster's password with PostgreSQL's default 4096 PBKDF2 rounds, unoptimised: about 50 ms
in every column that connects (README, \"Under nextest\", says which crates to
optimise); pgfixture's own servers store verifiers of one round." "$backends url"
    section "sqlx 0.8's types, per test in-process, unoptimised build" sqlx08 \
"\`compat/sqlx-0_8/benches/handles.rs\`, \`--profile dev\` (as test binaries are built): a test as
\`#[pgfixture::test]\` runs it (its runtime, the handle, \`SELECT 1\`, the release) for
\`#[sqlx::test]\`'s types of sqlx 0.8 (feature \`sqlx-0_8\`), beside sqlx 0.9's through
\`pgfixture::sqlx\`, and \`new pool per test\`: what the attribute did for sqlx 0.8's \`PgPool\` and
\`PoolConnection\` before they were handles (a new sqlx 0.8 pool on the worker, closed after the
test). One thread, database mode; the kinds take turns in runs of 10 tests. On \`url\` every new
connection hashes the password with the default 4096 rounds, unoptimised." "$backends url"
    section "Provisioning and memory per worker" provision \
"\`benches/provision.rs\`: time to the first handle of a new process: a new run (\`cold\`), a new
worker on running servers, the same worker again (\`reused\`, as the next nextest process or the
next run with \`PGFIXTURE_REUSE=1\`); memory from 1 and 4 workers held. Docker's \`cold\` starts
from the initialised image; the first container ever of an image runs initdb (about 1.5 s here)."
    section "Pool tuning" tune \
"\`examples/tune.rs\`: tests that hold a handle and run 4 concurrent queries through more handles
of their worker's pool; \`timeout\` means a test waited for a connection past the limit."
    cat docs/benchmark-notes.md
} >BENCHMARKS.md
echo "benchmarks.sh: wrote BENCHMARKS.md and docs/suite-*.svg" >&2
