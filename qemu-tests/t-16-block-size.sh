#!/usr/bin/env bash
# t-16-block-size: --block-size. Serving with 4 KiB and 1 MiB cache blocks
# gives the origin's bytes (cold and warm). Restarting a cache that was filled
# with 4 KiB blocks with --block-size 1M must not serve wrong data: lazybd
# either refuses to start (non-zero exit) or serves the exact bytes.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy qemu-io nginx

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img

for bs in 4096 1048576; do
  lazybd_start "$url" --cache-dir "$T/cache-$bs" --block-size "$bs"
  out=$(qemu-io -r -f raw "$LAZYBD_URI" -c "read $((bs - 1)) 2" -c "read $((3 * bs + 5)) $((2 * bs))" 2>&1) ||
    fail "block size $bs: qemu-io reads across block boundaries failed: $out"
  assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
  assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"
  lazybd_stop
  log "block size $bs: $(origin_requests /disk.img) GETs so far"
done

port=$(free_port)
log "restart the 4 KiB cache with --block-size 1048576"
lazybd_spawn "$url" --cache-dir "$T/cache-4096" --block-size 1048576 --listen "127.0.0.1:$port"
LAZYBD_URI=nbd://127.0.0.1:$port/disk
for _ in $(seq 300); do
  _pid_alive "$LAZYBD_PID" || break
  nbdinfo --size "$LAZYBD_URI" >/dev/null 2>&1 && break
  sleep 0.1
done
if _pid_alive "$LAZYBD_PID"; then
  assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
  lazybd_stop
  log "block size change: served correct data ($(lazybd_log_plain | grep -Ei 'warn|block' | head -n 1))"
else
  wait "$LAZYBD_PID" && rc=0 || rc=$?
  LAZYBD_PID=""
  ((rc != 0)) || fail "lazybd exited 0 at start with a block size different from the cache's"
  log "block size change refused at start (status $rc): $(lazybd_log_plain | tail -n 1)"
fi
