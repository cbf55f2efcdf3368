#!/usr/bin/env bash
# bench/power-cut.sh — the long power-loss simulation of the overlay store.
#
# Runs the unit test overlay::store::tests::power_cuts_never_lose_flushed_
# writes_or_brick_a_page with RUNS random runs (cargo test runs 400). Each
# run drives random writes, zeroes, flushes, injected ENOSPC/EIO on writes,
# failing syncs, process kills and power cuts through the simulated disk
# (src/overlay/disk.rs: a power cut keeps, per 512-byte sector, the durable
# bytes with some prefix of the unsynced writes to it applied), reopens
# after every crash and checks the crash contract page by page.
#
# Writes the "Power-loss simulation" section of OUT (bench/RESULTS.md),
# stamped by bench/lib.sh (commit, date, load). Exit 1 if the contract failed.
#
# Env: RUNS (20000), SEED (first run's seed, 0), OUT (bench/RESULTS.md),
#      QUICK (1: RUNS=100, a smoke run)
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
[[ ${QUICK:-0} == 1 ]] && RUNS=${RUNS:-100}
RUNS=${RUNS:-20000}
SEED=${SEED:-0}
OUT=${OUT:-$BENCH/RESULTS.md}
cd "$REPO"
start=$SECONDS
rc=0
LAZYBD_POWER_CUT_RUNS=$RUNS SEED=$SEED cargo test --release --lib power_cuts_never -- --nocapture \
  >"${TMPDIR:-/tmp}/power-cut.$$.log" 2>&1 || rc=$?
log=$(cat "${TMPDIR:-/tmp}/power-cut.$$.log"); rm -f "${TMPDIR:-/tmp}/power-cut.$$.log"
line=$(grep -m1 'power-loss simulation:' <<<"$log" || true)
secs=$((SECONDS - start))
if [[ -z $line ]]; then
  echo "power-cut.sh: the test did not report (status $rc):" >&2
  tail -n 30 <<<"$log" >&2
  exit 1
fi
echo "$line"
cuts=$(sed -n 's/.* \([0-9]*\) power cuts.*/\1/p' <<<"$line")
section=$(mktemp)
{
  echo "## Power-loss simulation (bench/power-cut.sh)"
  echo
  echo "\`RUNS=$RUNS SEED=$SEED bench/power-cut.sh\` (the test took ${secs} s, its build included)."
  echo
  echo "The overlay's page store over the simulated disk (src/overlay/disk.rs): each run is 150 random steps of"
  echo "writes (1..6 pages, some all-zero, some NO_HOLE), zero ranges, flushes, reads checked against the model, injected"
  echo "ENOSPC/EIO on a write (half of it lands), failing syncs, kill -9 (page cache kept) and power cuts (per 512-byte"
  echo "sector: the durable bytes plus any prefix of the unsynced writes to it; unsynced renames kept or lost), reopening"
  echo "after every crash. After a cut every page must read as a content it held since the last completed flush (exactly"
  echo "its flushed content if not written since), never fail its CRC; after a kill, as its last acknowledged content,"
  echo "or (for a write accepted without waiting and not drained yet) one it held since the last flush. Half the writes"
  echo "and zeroes go the no-wait way first; drains run at random moments."
  echo
  echo "| measure | value |"
  echo "|---|---|"
  echo "| runs | $RUNS |"
  echo "| power cuts, each followed by a reopen and a check of every page | **$cuts** |"
  echo "| contract violations | **$([[ $rc == 0 ]] && echo 0 || echo 'FAILED, see the test output')** |"
  echo
} >"$section"
write_section "$OUT" "$section"
rm -f "$section"
echo "power-cut.sh: section written to $OUT" >&2
exit "$rc"
