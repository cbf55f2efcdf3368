#!/usr/bin/env bash
# t-06-parallel: 4 concurrent full readers on a cold cache (so they race for
# the same blocks): two nbdcopy over TCP (one with --no-extents), one nbdcopy
# over the unix socket (each piped into cmp with the origin file), one
# qemu-img compare. All must succeed with the origin's bytes. Afterwards the
# cache must be complete and consistent: a fifth full read makes no data
# request to the origin, and `cache verify` exits 0.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy qemu-img nginx

mkimage "$T/origin/disk.img" 96
size=$(stat -c %s "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
sock=$T/lazybd.sock
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache" \
  --listen "127.0.0.1:$(free_port)" --listen "unix:$sock"
mark=$(origin_mark)

img=$T/origin/disk.img
{ nbdcopy "$LAZYBD_URI" - | cmp - "$img"; } > "$T/r1" 2>&1 & p1=$!
{ nbdcopy --no-extents "$LAZYBD_URI" - | cmp - "$img"; } > "$T/r2" 2>&1 & p2=$!
{ nbdcopy "$LAZYBD_UNIX_URI" - | cmp - "$img"; } > "$T/r3" 2>&1 & p3=$!
qemu-img compare -f raw -F raw "$img" "$LAZYBD_URI" > "$T/r4" 2>&1 & p4=$!
bg_track "$p1" "$p2" "$p3" "$p4"

bad=0
for i in 1 2 3 4; do
  p=p$i
  if ! wait "${!p}"; then
    log "reader $i failed or read wrong data: $(tr '\n' ' ' < "$T/r$i")"; bad=1
  fi
done
grep -q 'Images are identical' "$T/r4" || { log "reader 4 (qemu-img compare): $(cat "$T/r4")"; bad=1; }
((bad == 0)) || fail "a concurrent reader failed or read wrong data"
data=$(origin_data_requests_since "$mark" /disk.img)
bytes=$(origin_bytes_since "$mark" /disk.img)
log "4 concurrent readers OK; origin: $data data GETs, $bytes bytes ($(awk -v b="$bytes" -v s="$size" 'BEGIN{printf "%.2f", b/s}') x image size)"

mark=$(origin_mark)
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
assert_eq 0 "$(origin_data_requests_since "$mark" /disk.img)" "data GETs for a full read after the concurrent cold reads"
lazybd_stop
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "cache verify after concurrent fills failed: $out"
log "cache verify: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
