#!/usr/bin/env bash
# qemu-tests/run.sh — run lazybd's shell integration tests.
#
# Usage: qemu-tests/run.sh [TEST...]
#   No argument: every qemu-tests/t-*.sh, in name order.
#   TEST: a file name (t-05-unaligned.sh), a name without .sh, a path, or a
#   unique part of a name (unaligned, 05).
#
# Prints PASS/FAIL and the duration per test; a failed test's output is shown
# (the last 60 lines; all of it is kept in $TEST_LOG_DIR). The last line is
# exactly "N passed, N failed". Exit status 1 if any test failed.
#
# Env: LAZYBD (binary under test, passed on to the tests), TEST_TIMEOUT
# (seconds per test, default 240; a test that needs longer says so in a
# line "# run.sh timeout: SECONDS" among its first 30, which then applies
# when it is the larger), TEST_LOG_DIR (default: a temp dir, removed
# when everything passed), VERBOSE=1 (show every test's output).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
export LAZYBD=${LAZYBD:-$repo/target/release/lazybd}
timeout_s=${TEST_TIMEOUT:-240}

tests=()
if (($# == 0)); then
  for f in "$here"/t-*.sh; do [[ -e $f ]] && tests+=("$f"); done
else
  for a in "$@"; do
    if [[ -f $a ]]; then tests+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")"); continue; fi
    if [[ -f $here/$a ]]; then tests+=("$here/$a"); continue; fi
    if [[ -f $here/$a.sh ]]; then tests+=("$here/$a.sh"); continue; fi
    mapfile -t m < <(ls "$here"/t-*"$a"*.sh 2>/dev/null)
    if ((${#m[@]} == 1)); then tests+=("${m[0]}"); continue; fi
    echo "run.sh: '$a' matches ${#m[@]} tests" >&2
    exit 2
  done
fi
((${#tests[@]})) || { echo "run.sh: no tests found in $here" >&2; exit 2; }

if [[ -n ${TEST_LOG_DIR:-} ]]; then
  logdir=$TEST_LOG_DIR; mkdir -p "$logdir"; keep_logs=1
else
  logdir=$(mktemp -d "${TMPDIR:-/tmp}/lazybd-qemu-tests.XXXXXX"); keep_logs=0
fi

echo "lazybd integration tests: ${#tests[@]} test(s), binary $LAZYBD"
[[ -x $LAZYBD ]] || echo "warning: $LAZYBD is not an executable file" >&2

passed=0; failed=0; failed_names=()
t_all=$(date +%s.%N)
for t in "${tests[@]}"; do
  name=$(basename "$t" .sh)
  out=$logdir/$name.log
  t0=$(date +%s.%N)
  tt=$timeout_s
  own=$(head -n 30 "$t" | sed -n 's/^# run\.sh timeout: \([0-9][0-9]*\).*/\1/p' | head -n 1)
  [[ -n $own ]] && ((own > tt)) && tt=$own
  timeout -k 15 "$tt" bash "$t" > "$out" 2>&1
  rc=$?
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  if ((rc == 0)); then
    passed=$((passed + 1))
    printf 'PASS  %-28s %6ss\n' "$name" "$dt"
    [[ ${VERBOSE:-0} == 1 ]] && sed 's/^/      | /' "$out"
  else
    failed=$((failed + 1)); failed_names+=("$name")
    reason="exit status $rc"
    ((rc == 124 || rc == 137)) && reason="timed out after ${tt}s (status $rc)"
    printf 'FAIL  %-28s %6ss  (%s)\n' "$name" "$dt" "$reason"
    if [[ ${VERBOSE:-0} == 1 ]]; then sed 's/^/      | /' "$out"; else tail -n 60 "$out" | sed 's/^/      | /'; fi
  fi
done
total=$(awk -v a="$t_all" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')

echo "total ${total}s"
if ((failed)); then
  echo "failed: ${failed_names[*]} (full logs in $logdir)"
elif ((keep_logs == 0)); then
  rm -rf "$logdir"
fi
echo "$passed passed, $failed failed"
((failed == 0))
