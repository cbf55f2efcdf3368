#!/usr/bin/env bash
# bench/crash.sh — the long crash loop: qemu-tests/t-60-crash-loop.sh with
# CYCLES cycles (default 200, about 1.5 s each on 2 cores) of mixed
# write/zero/read/flush load on a writable export plus reads of a read-only
# export of the same image, SIGKILL at a random moment, `cache verify`,
# restart, and an oracle check of every page (see the test's header and
# qemu-tests/crash_client.py). Unlike the test it does not stop at the first
# wrong page: the evidence (journal, client outputs, server logs) of a
# failed cycle is kept in bench/crash-evidence-DATE/ and the loop goes on
# from an empty overlay.
#
# Prints the summary line (cycles, writes, flushes, verified pages,
# failures) and writes it, with the conditions, to the "Crash loop" section
# of OUT (bench/RESULTS.md), replacing an earlier one. Exit 1 if any cycle
# failed.
#
# bench/lib.sh stamps the section.
#
# Env: CYCLES (200), SEED (random), OUT (bench/RESULTS.md), LAZYBD (binary;
#      copied to a temp dir first, so a rebuild during the run changes nothing),
#      QUICK (1: CYCLES=6, a smoke run)
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
[[ ${QUICK:-0} == 1 ]] && CYCLES=${CYCLES:-6}
CYCLES=${CYCLES:-200}
SEED=${SEED:-$((RANDOM * 32768 + RANDOM))}
OUT=${OUT:-$BENCH/RESULTS.md}
src=${LAZYBD:-$REPO/target/release/lazybd}
[[ -x $src ]] || { echo "crash.sh: $src not found (cargo build --release)" >&2; exit 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/lazybd-crash.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cp "$src" "$tmp/lazybd"
evidence=$BENCH/crash-evidence-$(date -u +%Y%m%dT%H%M%S)

rc=0
LAZYBD=$tmp/lazybd CRASH_CYCLES=$CYCLES CRASH_SEED=$SEED CRASH_KEEP_GOING=1 CRASH_EVIDENCE=$evidence \
  CRASH_SUMMARY=$tmp/summary bash "$REPO/qemu-tests/t-60-crash-loop.sh" 2> "$tmp/run.log" || rc=$?
summary=$(tail -n 1 "$tmp/summary" 2>/dev/null || true)
if [[ -z $summary ]]; then
  tail -n 40 "$tmp/run.log" >&2
  echo "crash.sh: the loop did not finish (status $rc)" >&2
  exit 1
fi
echo "$summary"
[[ -d $evidence ]] && cp "$tmp/run.log" "$evidence/run.log"

val() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$summary"; }
section=$tmp/section.md
{
  echo "## Crash loop (bench/crash.sh)"
  echo
  echo "lazybd $("$tmp/lazybd" --version | cut -d' ' -f2)" \
    "(binary sha256 $(sha256sum "$tmp/lazybd" | cut -c1-12))," \
    "libnbd $(nbdcopy --version | head -n 1 | awk '{print $2}'), nginx $(nginx -v 2>&1 | cut -d/ -f2)."
  echo "\`CYCLES=$CYCLES SEED=$SEED bench/crash.sh\` (rerun with the same SEED for the same kill delays and client seeds)."
  echo
  echo "One lazybd, \`serve --config\`: writable export \`rw\` (overlay in its own directory) and read-only \`ro\` of one"
  echo "64 MiB random image from nginx on loopback. Per cycle: \`crash_client.py load\` on rw (1..16-page writes with content"
  echo "derived from (page, version), WRITE_ZEROES, reads checked against the model, FLUSH every 3..12 operations, up to 8 in"
  echo "flight, fsync'd journal) and \`crash_client.py roload\` on ro (reads compared with the origin); SIGKILL 0.1..1.5 s after"
  echo "both connected (every third cycle starts with the image's cache deleted; those kills come after 0.1..0.3 s, mostly"
  echo "while blocks are being fetched); \`lazybd cache verify\` (exit 0); restart; every page of rw must be its durable state or"
  echo "one of the writes journalled after the last FLUSH, never torn; ro must equal the origin. Every 24 cycles the overlay"
  echo "starts empty again (so first writes to pages not yet in the overlay keep being cut, not only rewrites in place)."
  echo
  echo "| measure | value |"
  echo "|---|---|"
  echo "| cycles survived (kill -9, restart, verified) | **$(val cycles)** |"
  echo "| of them on a cold cache / killed mid-fill | $(val cold) / $(val cold_killed_mid_fill) |"
  echo "| writes / WRITE_ZEROES / FLUSHes acknowledged | $(val writes) / $(val write_zeroes) / $(val flushes) |"
  echo "| reads checked during the load (pages) | $(val reads_checked) $(sed -n 's/.*reads_checked=[0-9]* \(([0-9]* pages)\).*/\1/p' <<<"$summary") |"
  echo "| read-only bytes checked during the load | $(val ro_bytes_checked) |"
  echo "| pages verified after restarts | **$(val verified_pages)** |"
  echo "| unflushed pages found new / old | $(val unflushed_pages_new) / $(val unflushed_pages_old) |"
  echo "| acknowledged-but-unflushed pages found old | $(val acked_unflushed_pages_old) |"
  echo "| overlay restarts from empty | $(val overlay_resets) |"
  echo "| failures | **$(val failures)** |"
  echo
  echo "\`$summary\`"
  echo
} > "$section"
write_section "$OUT" "$section"
echo "crash.sh: section written to $OUT" >&2
if ((rc != 0)); then
  echo "crash.sh: FAILED (status $rc); evidence in $evidence" >&2
  tail -n 20 "$tmp/run.log" >&2
fi
exit "$rc"
