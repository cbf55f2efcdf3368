#!/usr/bin/env bash
# t-01-compare: qemu-img compare of the origin file with the NBD export, on a
# cold cache and again on a warm one; both export names ("disk" and "") work
# and report the origin's size.
. "$(dirname "$0")/lib.sh"
require_cmd qemu-img nbdinfo nginx

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"
size=$(stat -c %s "$T/origin/disk.img")

assert_eq "$size" "$(nbdinfo --size "$LAZYBD_URI")" "export size of $LAZYBD_URI"
assert_eq "$size" "$(nbdinfo --size "nbd://127.0.0.1:$LAZYBD_PORT")" "export size under the empty name"

out=$(qemu-img compare -f raw -F raw "$T/origin/disk.img" "$LAZYBD_URI" 2>&1) ||
  fail "qemu-img compare (cold cache) failed: $out"
log "cold: $out"
[[ $out == *"Images are identical"* ]] || fail "cold compare: $out"

out=$(qemu-img compare -f raw -F raw "$T/origin/disk.img" "$LAZYBD_URI" 2>&1) ||
  fail "qemu-img compare (warm cache) failed: $out"
log "warm: $out"

out=$(qemu-img compare -f raw -F raw "$T/origin/disk.img" "nbd://127.0.0.1:$LAZYBD_PORT" 2>&1) ||
  fail "qemu-img compare via the empty export name failed: $out"

lazybd_stop
log "origin GETs: $(origin_requests /disk.img)"
