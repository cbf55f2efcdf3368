#!/usr/bin/env bash
# bench/hydrate.sh — background hydration speed, and what it costs a guest.
#
# Origin: nginx on loopback (qemu-tests/lib.sh) serving an IMG_MIB random
# image. The guest's working set (the first WARM_MIB) is cached first. Then:
#   baseline  fio 4 KiB randread QD1 over the cached working set, RUNTIME s,
#             nothing else running;
#   hydrate   lazybd restarted with --hydrate; the same fio runs in slices of
#             SLICE s until hydration completes (polled from /metrics).
# Reported: hydration rate (bytes hydrated / time to complete), guest p99 and
# max of the slices' p99, vs the baseline. Goals (issue 4): >= 300 MiB/s,
# guest p99 < 2 ms. Conditions and results go to the "Hydration" section of
# OUT (bench/RESULTS.md), replacing an earlier one.
#
# bench/lib.sh stamps the section.
#
# Env: IMG_MIB (4096) WARM_MIB (256) RUNTIME (10) SLICE (2) OUT LAZYBD
#      HYDRATE_ARGS (extra serve options, e.g. "--hydrate-rate 500M")
#      QUICK (1: IMG_MIB=256 WARM_MIB=32 RUNTIME=2 SLICE=1, a smoke run)
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$BENCH/lib.sh"
stamp_begin
if [[ ${QUICK:-0} == 1 ]]; then
  IMG_MIB=${IMG_MIB:-256}; WARM_MIB=${WARM_MIB:-32}; RUNTIME=${RUNTIME:-2}; SLICE=${SLICE:-1}
fi
. "$BENCH/../qemu-tests/lib.sh"
require_cmd fio nginx curl nbdinfo
IMG_MIB=${IMG_MIB:-4096}
WARM_MIB=${WARM_MIB:-256}
RUNTIME=${RUNTIME:-10}
SLICE=${SLICE:-2}
OUT=${OUT:-$BENCH/RESULTS.md}
HYDRATE_ARGS=${HYDRATE_ARGS:-}

mkimage "$T/origin/img.raw" "$IMG_MIB"
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/img.raw
mport=$(free_port)

fio_p99() {  # fio json -> "p99_us max_us iops"
  python3 -c '
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]["read"]
p = j["clat_ns"]["percentile"]
print(round(p.get("99.000000", 0) / 1000, 1), round(j["clat_ns"]["max"] / 1000, 1), round(j["iops"]))
' "$1"
}

guest_read() {  # SECONDS OUTFILE: 4K randread QD1 over the working set
  fio --name=guest --ioengine=nbd --uri="$LAZYBD_URI" --rw=randread --bs=4k \
    --iodepth=1 --size="${WARM_MIB}M" --time_based --runtime="$1" \
    --percentile_list=99 --output-format=json >"$2" 2>/dev/null
}

metric() {  # NAME -> value (first sample) from /metrics
  curl -s "http://127.0.0.1:$mport/metrics" | awk -v n="$1" '$1 ~ "^"n"[{ ]" || $1 == n {print $2; exit}'
}

log "warming the first $WARM_MIB MiB"
lazybd_start "$url" --cache-dir "$T/cache" --control none
fio --name=warm --ioengine=nbd --uri="$LAZYBD_URI" --rw=read --bs=1M --iodepth=8 \
  --size="${WARM_MIB}M" --output-format=json >/dev/null 2>&1
log "baseline: guest reads, no hydration, ${RUNTIME}s"
guest_read "$RUNTIME" "$T/base.json"
read -r base_p99 base_max base_iops < <(fio_p99 "$T/base.json")
lazybd_stop

log "hydrating $((IMG_MIB - WARM_MIB)) MiB while the guest reads"
# shellcheck disable=SC2086
lazybd_start "$url" --cache-dir "$T/cache" --control none --hydrate \
  --metrics "127.0.0.1:$mport" $HYDRATE_ARGS
t0=$(date +%s.%N)
slices=0 worst=0 worst_max=0 iops_sum=0 done_at=""
while :; do
  guest_read "$SLICE" "$T/slice.json"
  read -r p99 mx iops < <(fio_p99 "$T/slice.json")
  slices=$((slices + 1)); iops_sum=$((iops_sum + iops))
  worst=$(awk -v a="$worst" -v b="$p99" 'BEGIN{print (b>a)?b:a}')
  worst_max=$(awk -v a="$worst_max" -v b="$mx" 'BEGIN{print (b>a)?b:a}')
  d=$(metric lazybd_hydrate_done_blocks); t=$(metric lazybd_hydrate_total_blocks)
  log "slice $slices: p99 ${p99}us max ${mx}us; hydrated $d/$t blocks"
  if [[ -n $d && $d == "$t" ]]; then
    # Completion time from the server's own log line, not the slice end.
    done_at=$(date +%s.%N)
    break
  fi
  ((slices < 600)) || fail "hydration did not finish"
done
hbytes=$(metric lazybd_hydrate_bytes_total)
# The log has the exact completion instant; fall back to the slice end.
secs=$(awk -v a="$t0" -v b="$done_at" 'BEGIN{printf "%.2f", b-a}')
line=$(grep -m1 'hydration complete' "$LAZYBD_LOG" || true)
if [[ $line =~ ^([0-9T:.-]+)Z ]]; then
  end=$(date -d "${BASH_REMATCH[1]}Z" +%s.%N)
  secs=$(awk -v a="$t0" -v b="$end" 'BEGIN{printf "%.2f", b-a}')
fi
lazybd_stop
rate=$(awk -v b="$hbytes" -v s="$secs" 'BEGIN{printf "%.0f", b/1048576/s}')
avg_iops=$((iops_sum / slices))
log "hydrated $((hbytes >> 20)) MiB in ${secs}s = $rate MiB/s; guest p99 worst ${worst}us (baseline ${base_p99}us)"

rate_ok=$(awk -v r="$rate" 'BEGIN{print (r>=300)?"met":"NOT met"}')
p99_ok=$(awk -v p="$worst" 'BEGIN{print (p<2000)?"met":"NOT met"}')
section=$T/section.md
{
  echo "## Hydration (bench/hydrate.sh)"
  echo
  echo "lazybd $("$LAZYBD" --version | cut -d' ' -f2) (binary sha256 $(sha256sum "$LAZYBD" | cut -c1-12))," \
    "nginx $(nginx -v 2>&1 | cut -d/ -f2), fio $(fio --version | cut -d- -f2)." \
    "Origin: nginx on loopback, ${IMG_MIB} MiB random image; cache on the same disk." \
    "The guest's working set (first ${WARM_MIB} MiB) is cached first; the guest is fio 4 KiB randread QD1 over it" \
    "(libnbd \`nbd\` engine, TCP), in ${SLICE} s slices while \`lazybd serve --hydrate ${HYDRATE_ARGS}\` fetches the other $((IMG_MIB - WARM_MIB)) MiB" \
    "(4 MiB requests, 4 in flight). Everything shares the $(nproc) cores."
  echo
  echo "\`IMG_MIB=$IMG_MIB WARM_MIB=$WARM_MIB RUNTIME=$RUNTIME SLICE=$SLICE${HYDRATE_ARGS:+ HYDRATE_ARGS=\"$HYDRATE_ARGS\"} bench/hydrate.sh\`"
  echo
  echo "| measure | value |"
  echo "|---|---|"
  echo "| hydrated | $((hbytes >> 20)) MiB in ${secs} s |"
  echo "| hydration rate | **$rate MiB/s** |"
  echo "| guest 4K p99, no hydration (baseline) | ${base_p99} µs (max ${base_max} µs, ${base_iops} IOPS) |"
  echo "| guest 4K p99 during hydration, worst of $slices slices | **${worst} µs** (max ${worst_max} µs, mean ${avg_iops} IOPS) |"
  echo
  echo "| goal | target | measured | |"
  echo "|---|---|---|---|"
  echo "| hydration on loopback | ≥ 300 MiB/s | $rate MiB/s | $rate_ok |"
  echo "| guest cached 4K reads during hydration | p99 < 2 ms | ${worst} µs | $p99_ok |"
  echo
} >"$section"
write_section - "$section"
write_section "$OUT" "$section"
log "section written to $OUT"
