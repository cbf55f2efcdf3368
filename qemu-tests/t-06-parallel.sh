#!/usr/bin/env bash
# t-06-parallel: 4 concurrent full readers on a cold cache (so they race for
# the same blocks): two nbdcopy over TCP (one with --no-extents), one nbdcopy
# over the unix socket, one qemu-img compare. All must succeed with the
# origin's bytes. Afterwards the cache must be complete and consistent: cache
# verify exits 0, and a fifth full read makes no data request to the origin.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy qemu-img nginx

mkimage "$T/origin/disk.img" 96
want=$(sha_file "$T/origin/disk.img")
size=$(stat -c %s "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
sock=$T/lazybd.sock
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache" \
  --listen "127.0.0.1:$(free_port)" --listen "unix:$sock"
mark=$(origin_mark)

( nbdcopy "$LAZYBD_URI" - | sha256sum | awk '{print $1}' > "$T/r1" ) 2> "$T/r1.err" & p1=$!
( nbdcopy --no-extents "$LAZYBD_URI" - | sha256sum | awk '{print $1}' > "$T/r2" ) 2> "$T/r2.err" & p2=$!
( nbdcopy "$LAZYBD_UNIX_URI" - | sha256sum | awk '{print $1}' > "$T/r3" ) 2> "$T/r3.err" & p3=$!
qemu-img compare -f raw -F raw "$T/origin/disk.img" "$LAZYBD_URI" > "$T/r4" 2> "$T/r4.err" & p4=$!
bg_track "$p1" "$p2" "$p3" "$p4"

bad=0
for i in 1 2 3 4; do
  p=p$i
  if ! wait "${!p}"; then
    log "reader $i failed: $(cat "$T/r$i.err" "$T/r$i" 2>/dev/null | tr '\n' ' ')"; bad=1
  fi
done
for i in 1 2 3; do
  got=$(cat "$T/r$i")
  [[ $got == "$want" ]] || { log "reader $i: sha256 $got, want $want ($(cat "$T/r$i.err"))"; bad=1; }
done
grep -q 'Images are identical' "$T/r4" || { log "reader 4 (qemu-img compare): $(cat "$T/r4" "$T/r4.err")"; bad=1; }
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
