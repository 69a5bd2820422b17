#!/usr/bin/env bash
# Soak: runs the isolation suite over and over under `cargo nextest run -j 4`, in each
# isolation mode in turn, while SIGKILLing random test processes, for SOAK_SECONDS
# (default 90); then runs it twice more, SIGKILLing nextest itself mid-run, and
# sending SIGINT to the runner's process group (Ctrl-C). Then checks that
#   - every test that failed was one the soak killed (a leak between tests or workers
#     fails the suite's own assertions, which would show as FAIL);
#   - once the grace period has passed, no container, server process or server
#     directory of any soak round is left.
# Runs on the backend the environment selects (PGFIXTURE_BACKEND, PGFIXTURE_IMAGE).
#
#   scripts/soak.sh
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${SOAK_SECONDS:-90}
# The default grace period: a shorter one lets a worker's server stop between two of
# its tests when kills leave gaps, and the isolation suite asserts one server per
# worker (or per run) for the whole run.
grace=10
# Run ids of up to 11 lowercase letters and digits are used as they are (longer ones
# are hashed), so that the servers of a round can be found by name below.
prefix="sk$(printf '%04x' $((RANDOM % 65536)))"
logs=$(mktemp -d)
modes=(database schema container)
cargo build --tests --quiet || {
    echo "soak: building the isolation suite failed" >&2
    exit 1
}

started=$(date +%s)
round=0
killed=0
bad=0
stalls=0
runs=()
while [ $(($(date +%s) - started)) -lt "$seconds" ]; do
    mode=${modes[$((round % 3))]}
    run="${prefix}r${round}"
    runs+=("$run")
    PGFIXTURE_RUN_ID=$run PGFIXTURE_ISOLATION=$mode PGFIXTURE_GRACE=$grace \
        cargo nextest run -j 4 --no-fail-fast --test isolation >"$logs/$round.log" 2>&1 &
    runner=$!
    # Kill a random test process (not a helper) every so often while the round runs.
    while kill -0 "$runner" 2>/dev/null; do
        sleep "0.$((RANDOM % 9 + 1))"
        victims=($(pgrep -f 'deps/isolation-[0-9a-f]+ .*--exact' || true))
        if [ ${#victims[@]} -gt 0 ] && [ $((RANDOM % 3)) = 0 ]; then
            victim=${victims[$((RANDOM % ${#victims[@]}))]}
            kill -9 "$victim" 2>/dev/null && killed=$((killed + 1))
        fi
    done
    wait "$runner"
    # nextest marks a test killed by a signal SIGKILL. A test that failed on its own
    # (FAIL) panicked: on an isolation assertion, on a pgfixture error, or on a timeout.
    # Timeouts while the shared machine's Docker daemon stalls (it has, for half a
    # minute, under this churn) are counted and shown but are not what the soak checks;
    # every other panic fails it.
    fails=$(grep -cE '^ +FAIL ' "$logs/$round.log")
    panics=$(grep -A1 -E "panicked at" "$logs/$round.log" | grep -vE 'panicked at|^--$' || true)
    real=$(printf '%s\n' "$panics" | grep -vE 'AcquireTimeout|no Docker daemon answers' | grep -v '^$' || true)
    if [ "$fails" -gt 0 ] && [ -z "$real" ]; then
        stalls=$((stalls + fails))
        echo "soak: round $round ($mode): $fails tests timed out waiting (not kills, not leaks):"
        printf '%s\n' "$panics" | sort | uniq -c | head -5
    elif [ "$fails" -gt 0 ]; then
        bad=$((bad + 1))
        echo "soak: round $round ($mode) had failures that were not kills:"
        grep -E -A30 '^ +FAIL |panicked' "$logs/$round.log" | head -80
    fi
    summary=$(grep -E 'Summary' "$logs/$round.log" | tail -1)
    echo "soak: round $round ($mode, run $run): ${summary:-no summary}"
    round=$((round + 1))
done
echo "soak: $round rounds, $killed test processes killed, $stalls tests timed out, $bad rounds with real failures"

# The runner itself: nextest SIGKILLed mid-run (its test processes live on, orphaned),
# and Ctrl-C (SIGINT to the runner's whole process group, as a terminal sends it).
servers_of() {
    # Local servers live under /dev/shm or $TMPDIR (PGFIXTURE_LOCAL_DIR's defaults).
    ls -d /dev/shm/pgfixture-*/pgfixture-"$1"-* "${TMPDIR:-/tmp}"/pgfixture-*/pgfixture-"$1"-* 2>/dev/null
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        docker ps -aq --filter "name=pgfixture-$1-"
    fi
}
for how in KILL INT; do
    run="${prefix}${how,,}" # run ids are lowercase
    runs+=("$run")
    PGFIXTURE_RUN_ID=$run PGFIXTURE_ISOLATION=container PGFIXTURE_GRACE=$grace \
        setsid cargo nextest run -j 4 --no-fail-fast --test isolation >"$logs/$how.log" 2>&1 &
    leader=$!
    for _ in $(seq 1 600); do
        [ -n "$(servers_of "$run")" ] && break
        sleep 0.05
    done
    if [ -z "$(servers_of "$run")" ]; then
        echo "soak: the runner of $run started no server"
        bad=$((bad + 1))
    fi
    if [ "$how" = KILL ]; then
        kill -KILL "$(pgrep -s "$leader" -f 'cargo-nextest' | head -1)" 2>/dev/null
    else
        kill -INT -- "-$leader" 2>/dev/null
    fi
    wait "$leader"
    echo "soak: runner of $run got SIG$how mid-run"
done

# Nothing of any round may outlive the grace period (plus the watchdogs' polls).
# Grace, plus a minute for a server whose creator was killed before using it.
deadline=$(($(date +%s) + grace + 90))
while :; do
    left=""
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        left+=$(docker ps -aq --filter "name=pgfixture-${prefix}" | tr '\n' ' ')
    fi
    left+=$(ls -d /dev/shm/pgfixture-*/pgfixture-"${prefix}"* "${TMPDIR:-/tmp}"/pgfixture-*/pgfixture-"${prefix}"* 2>/dev/null | tr '\n' ' ')
    left+=$(pgrep -f "pgfixture-${prefix}" | tr '\n' ' ')
    [ -z "${left// /}" ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "soak: left behind: $left" >&2
        bad=$((bad + 1))
        break
    fi
    sleep 1
done
rm -rf "$logs"
[ "$bad" = 0 ] && [ "$round" -gt 0 ] && [ "$killed" -gt 0 ]
