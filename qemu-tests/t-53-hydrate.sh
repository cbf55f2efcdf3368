#!/usr/bin/env bash
# t-53-hydrate: background hydration against nginx.
#  - `serve --hydrate --hydrate-rate 16M` on a 96 MiB image: while it runs,
#    `lazybd cache info` and /metrics show progress (percent, rate, ETA);
#    the rate limit holds (not done after 2 s);
#  - SIGTERM mid-way, restart without a limit: it completes, and the origin
#    sent each byte of the image once over both runs (access log);
#  - a hydrated image is served with no origin traffic and equals the
#    origin (nbdcopy + cmp); `cache info` says complete; guest reads during
#    hydration (the whole image read by nbdcopy at full speed in the
#    second run) are right.
. "$(dirname "$0")/lib.sh"
require_cmd nginx nbdcopy nbdinfo curl

mkimage "$T/origin/disk.img" 96
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
size=$(stat -c %s "$T/origin/disk.img")
mport=$(free_port)
m0=$(origin_mark)
blocks=$((size / 4096)) # at the default 4 KiB block

lazybd_start "$url" --cache-dir "$T/cache" --control none --hydrate --hydrate-rate 16M \
  --metrics "127.0.0.1:$mport"
sleep 2
"$LAZYBD" cache info "$T/cache" >"$T/info1.txt"
cat "$T/info1.txt" >&2
assert_grep 'hydration: [0-9.]+% \([0-9]+ of [0-9]+ blocks' "$T/info1.txt" "cache info shows hydration progress"
curl -s "http://127.0.0.1:$mport/metrics" >"$T/metrics.txt"
assert_grep "^lazybd_hydrate_total_blocks\\{image=.*\\} $blocks\$" "$T/metrics.txt" "metrics: total blocks"
assert_grep '^lazybd_hydrate_done_blocks\{' "$T/metrics.txt" "metrics: done blocks"
lazybd_stop
done1=$(grep -oE 'hydrate_bytes=[0-9]+' "$LAZYBD_LOG" | cut -d= -f2)
log "first run hydrated $done1 bytes (rate-limited)"

lazybd_start "$url" --cache-dir "$T/cache" --control none --hydrate
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"
deadline=$((SECONDS + 60))
until grep -q 'hydration complete' "$LAZYBD_LOG"; do
  ((SECONDS < deadline)) || fail "hydration did not complete"
  sleep 0.2
done
lazybd_stop
"$LAZYBD" cache info "$T/cache" >"$T/info2.txt"
assert_grep 'hydration: complete' "$T/info2.txt" "cache info says complete"
assert_grep "$blocks total \\(100.0% known\\)" "$T/info2.txt" "every block is known"

# Each byte once: data bytes over both runs = the image (the nbdcopy above
# read through the cache, sharing fetches with hydration).
got=$(origin_bytes_since "$m0" /disk.img)
probes=$(origin_probes_since "$m0" /disk.img)
assert_le "$got" "$((size + probes))" "origin sent $got bytes for a $size-byte image"
assert_ge "$got" "$size" "origin sent the whole image"

m1=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/cache" --control none
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"
lazybd_stop
assert_eq 0 "$(origin_data_requests_since "$m1" /disk.img)" "a hydrated image reads without the origin"
log "hydration: rate-limited, resumed, complete, each byte fetched once"
