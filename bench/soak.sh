#!/usr/bin/env bash
# bench/soak.sh — the long soak: qemu-tests/t-62-soak.sh for DURATION s
# (default 600) of 16 fio writers with crc32c verification (verify_backlog)
# on 8 writable exports plus 4 readers on a read-only export of one 128 MiB
# image, then HOSTILE_SECS (60) of the same load plus a hostile raw-socket
# client (2 connections trickling 32 MiB writes, 2 sending 32 MiB reads and
# never reading the replies). lazybd's VmRSS/RssAnon are sampled every
# second. Fails if fio reports any error, lazybd dies or does not exit 0 on
# SIGTERM, a peak VmRSS exceeds 512 MiB, or VmRSS grew by more than
# GROWTH_MAX (50) % between the first and the last quarter of the soak.
#
# Prints the summary line and writes the numbers, with an RSS time series
# (one row per tenth of the run), to the "Soak" section of OUT
# (bench/RESULTS.md), replacing an earlier one.
#
# bench/lib.sh stamps the section.
#
# Env: DURATION (600), HOSTILE_SECS (60), GROWTH_MAX (50; "" = not judged), OUT,
#      LAZYBD (copied to a temp dir first, so a rebuild during the run changes
#      nothing), QUICK (1: DURATION=20 HOSTILE_SECS=5 GROWTH_MAX="", a smoke run:
#      20 s are too short to judge growth)
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
if [[ ${QUICK:-0} == 1 ]]; then
  DURATION=${DURATION:-20}; HOSTILE_SECS=${HOSTILE_SECS:-5}; GROWTH_MAX=${GROWTH_MAX-}
fi
DURATION=${DURATION:-600}
HOSTILE_SECS=${HOSTILE_SECS:-60}
GROWTH_MAX=${GROWTH_MAX-50}
OUT=${OUT:-$BENCH/RESULTS.md}
src=${LAZYBD:-$REPO/target/release/lazybd}
[[ -x $src ]] || { echo "soak.sh: $src not found (cargo build --release)" >&2; exit 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/lazybd-soak.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cp "$src" "$tmp/lazybd"

rc=0
LAZYBD=$tmp/lazybd SOAK_DURATION=$DURATION SOAK_HOSTILE_SECS=$HOSTILE_SECS SOAK_GROWTH_MAX=$GROWTH_MAX \
  SOAK_SUMMARY=$tmp/summary SOAK_RSS_OUT=$tmp/rss.txt \
  bash "$REPO/qemu-tests/t-62-soak.sh" 2> "$tmp/run.log" || rc=$?
summary=$(tail -n 1 "$tmp/summary" 2>/dev/null || true)
if [[ -z $summary ]]; then
  tail -n 40 "$tmp/run.log" >&2
  echo "soak.sh: the soak did not finish (status $rc)" >&2
  exit 1
fi
echo "$summary"
((rc == 0)) || { tail -n 30 "$tmp/run.log" >&2; echo "soak.sh: FAILED (status $rc)" >&2; }

val() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$summary"; }
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
gib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1073741824}'; }
section=$tmp/section.md
{
  echo "## Soak (bench/soak.sh)"
  echo
  echo "lazybd $("$tmp/lazybd" --version | cut -d' ' -f2) (binary sha256 $(sha256sum "$tmp/lazybd" | cut -c1-12))," \
    "fio $(fio --version | cut -d- -f2), nginx $(nginx -v 2>&1 | cut -d/ -f2)."
  echo "\`DURATION=$DURATION HOSTILE_SECS=$HOSTILE_SECS GROWTH_MAX=$GROWTH_MAX bench/soak.sh\`$( ((rc == 0)) && echo ': passed' || echo ": **FAILED (status $rc)**")."
  echo
  echo "One lazybd (\`serve --config\`), cold cache, 128 MiB random image from nginx on loopback: 8 writable exports, one"
  echo "writable export for the hostile client, one read-only export. fio (libnbd engine, one connection per job): 16 writers"
  echo "(2 per writable export on disjoint 48 MiB regions, bs 4k/8k/16k/64k, a third of them at offsets that are not"
  echo "page-aligned, iodepth 8, \`randwrite\`, \`verify=crc32c verify_backlog=128 verify_fatal=1\`) and 4 readers of the"
  echo "read-only export (2 random 4k..256k, 2 sequential 1 MiB), time-based. Hostile phase: the same fio jobs for"
  echo "${HOSTILE_SECS} s plus \`soak_tools.py hostile\`: 2 connections sending 32 MiB WRITEs trickled at 8 MiB/s (dropped"
  echo "mid-payload at the end) and 2 connections each sending 8 READs of 32 MiB without reading any reply."
  echo "VmRSS / RssAnon of lazybd from /proc every second; growth = mean of the last quarter of the soak vs the first."
  echo
  echo "| measure | soak (${DURATION} s) | hostile phase (${HOSTILE_SECS} s) |"
  echo "|---|---|---|"
  echo "| fio errors | $(val fio_errors) | $(val hostile_fio_errors) |"
  echo "| written / verified by fio | $(gib "$(val written_bytes)") GiB / $(gib "$(val verified_bytes)") GiB | — / $(gib "$(val hostile_verified_bytes)") GiB |"
  echo "| read from the read-only export | $(gib "$(val ro_read_bytes)") GiB | |"
  echo "| VmRSS idle before the soak | $(mib "$(val idle_rss_kib)") MiB | |"
  echo "| peak VmRSS (RssAnon) | **$(mib "$(val peak_rss_kib)") MiB** ($(mib "$(val peak_anon_kib)") MiB) | **$(mib "$(val hostile_peak_rss_kib)") MiB** ($(mib "$(val hostile_peak_anon_kib)") MiB) |"
  echo "| mean VmRSS first / last quarter | $(mib "$(val first_q_rss_kib)") / $(mib "$(val last_q_rss_kib)") MiB | |"
  echo "| growth VmRSS (RssAnon) | **$(val growth_pct) %** ($(val anon_growth_pct) %) | |"
  echo "| hostile 32 MiB writes completed | | $(val hostile_writes) |"
  echo "| VmRSS 3 s after the hostile client left | | $(mib "$(val rss_after_hostile_kib)") MiB |"
  echo "| threads (max) | $(val threads_max) | |"
  echo
  echo "VmRSS over the soak (MiB, mean of each tenth):"
  echo
  python3 - "$tmp/rss.txt" <<'PY'
import sys
rows = [tuple(float(x) for x in l.split()) for l in open(sys.argv[1]) if l.strip()]
n = len(rows); k = max(1, n // 10)
parts = [rows[i:i + k] for i in range(0, n, k)][:10]
print("| " + " | ".join(f"{p[0][0]:.0f}–{p[-1][0]:.0f} s" for p in parts) + " |")
print("|" + "---|" * len(parts))
print("| " + " | ".join(f"{sum(r[1] for r in p) / len(p) / 1024:.1f}" for p in parts) + " |")
PY
  echo
  echo "\`$summary\`"
  echo
} > "$section"
write_section "$OUT" "$section"
echo "soak.sh: section written to $OUT" >&2
exit "$rc"
