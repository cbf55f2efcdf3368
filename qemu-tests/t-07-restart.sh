#!/usr/bin/env bash
# t-07-restart: the cache persists across a graceful restart. Run 1 reads the
# whole image (cold), SIGTERM (exit 0 + summary). Run 2 on the same cache dir
# reads it all again: nginx must see no data request in run 2 (the Range:
# bytes=0-0 open probe(s) excepted), and the bytes still match. lazybd's own
# origin_requests counter must agree with nginx's access log. cache info lists
# the origin; cache verify is clean.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy qemu-img nginx

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img

m1=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/cache"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
lazybd_stop
get1=$(origin_requests_since "$m1" /disk.img); all1=$(origin_all_requests_since "$m1")
probe1=$(origin_probes_since "$m1" /disk.img); data1=$(origin_data_requests_since "$m1" /disk.img)
n1=$(lazybd_origin_requests)
log "run 1: nginx saw $all1 requests ($get1 GET: $probe1 probe + $data1 data); lazybd origin_requests=$n1"
assert_ge "$data1" 1 "run 1 must have fetched data from the origin"
[[ $n1 =~ ^[0-9]+$ ]] || fail "cannot parse origin_requests=N from: $(lazybd_summary)"
assert_ge "$n1" "$data1" "lazybd origin_requests (run 1) vs data GETs nginx logged"
assert_le "$n1" "$all1" "lazybd origin_requests (run 1) vs all requests nginx logged"

info=$(lazybd_cache info "$T/cache" 2>&1) || fail "lazybd cache info failed: $info"
log "cache info: $(echo "$info" | tr '\n' ' ')"
[[ $info == *"$url"* ]] || fail "cache info does not show the origin $url"
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "cache verify after run 1 failed: $out"

m2=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/cache"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
out=$(qemu-img compare -f raw -F raw "$T/origin/disk.img" "$LAZYBD_URI" 2>&1) || fail "compare in run 2: $out"
lazybd_stop
get2=$(origin_requests_since "$m2" /disk.img); all2=$(origin_all_requests_since "$m2")
probe2=$(origin_probes_since "$m2" /disk.img); data2=$(origin_data_requests_since "$m2" /disk.img)
n2=$(lazybd_origin_requests)
log "run 2: nginx saw $all2 requests ($get2 GET: $probe2 probe + $data2 data); lazybd origin_requests=$n2"
if ((data2 != 0)); then
  _origin_lines "$m2" | awk -F'|' '$2=="GET" && $5!="bytes=0-0"' | head -n 5 >&2
fi
assert_eq 0 "$((get2 - probe2))" "run 2 GETs minus open probes (a warm cache must not fetch data)"
assert_le "$n2" "$all2" "lazybd origin_requests (run 2) vs requests nginx logged"
