#!/usr/bin/env bash
# Soak: runs the isolation suite over and over under `cargo nextest run -j 4`, in each
# isolation mode in turn, while SIGKILLing random test processes, for SOAK_SECONDS
# (default 90). Then checks that
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
grace=2
prefix="soak$(printf '%04x' $((RANDOM % 65536)))"
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

# Nothing of any round may outlive the grace period (plus the watchdogs' polls).
deadline=$(($(date +%s) + 90))
while :; do
    left=""
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        left+=$(docker ps -aq --filter "name=pgfixture-${prefix}" | tr '\n' ' ')
    fi
    left+=$(ls -d "${TMPDIR:-/tmp}"/pgfixture-*/pgfixture-"${prefix}"* 2>/dev/null | tr '\n' ' ')
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
