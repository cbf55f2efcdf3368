#!/usr/bin/env bash
# t-19-lifecycle: the server under churn.
#  - clients killed (SIGKILL) in the middle of cold full reads, three times:
#    the server keeps serving, a full read afterwards is exact;
#  - SIGTERM while a cold full read is in flight: exit 0 within the stop
#    timeout (in-flight requests answered), `cache verify` clean, and a restart
#    on that cache serves the exact bytes;
#  - a second server on a cache directory that a running server holds is
#    refused at start (non-zero exit, the first keeps serving correctly).
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nginx

# 384 MiB: each killed client caches some 30 MiB before it is killed, and
# the third must still find far more cold bytes than it can fetch before the
# poll sees 12 MiB go by (with 128 MiB it had ~60 MiB left, which loopback
# serves in about 0.13 s: it sometimes finished first).
mkimage "$T/origin/disk.img" 384
img=$T/origin/disk.img
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img

lazybd_start "$url" --cache-dir "$T/cache"
for i in 1 2 3; do
  m=$(origin_mark)
  nbdcopy --no-extents "$LAZYBD_URI" null: 2>/dev/null & c=$!
  bg_track "$c"
  read -r el got < <(wait_origin_bytes "$m" $((12 * MIB)) 1.0 /disk.img "$c")
  _pid_alive "$c" || fail "client $i finished before it could be killed (${el}s)"
  kill -KILL "$c"; wait "$c" 2>/dev/null || true
  log "client $i killed after ${el}s ($got bytes fetched meanwhile)"
  nbdinfo --size "$LAZYBD_URI" >/dev/null || fail "server stopped answering after client $i was killed"
done
assert_same_as_file "$img" "$LAZYBD_URI" --no-extents
lazybd_stop

rm -rf "$T/cache"
lazybd_start "$url" --cache-dir "$T/cache"
m=$(origin_mark)
nbdcopy --no-extents "$LAZYBD_URI" null: 2> "$T/copy.err" & c=$!
bg_track "$c"
read -r el got < <(wait_origin_bytes "$m" $((24 * MIB)) 1.0 /disk.img "$c")
_pid_alive "$c" || fail "the full read finished before SIGTERM (${el}s)"
log "SIGTERM during a cold full read (${el}s in, $got bytes fetched)"
lazybd_stop TERM
wait "$c" && log "the client finished its read" || log "the client's read ended with an error after the stop (allowed): $(head -n 1 "$T/copy.err")"
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "cache verify after SIGTERM under load failed: $out"
lazybd_start "$url" --cache-dir "$T/cache"
assert_same_as_file "$img" "$LAZYBD_URI" --no-extents

first_pid=$LAZYBD_PID first_uri=$LAZYBD_URI first_log=$LAZYBD_LOG
LAZYBD_PID=""
lazybd_expect_start_failure 30 "$url" --cache-dir "$T/cache" --listen "127.0.0.1:$(free_port)"
LAZYBD_PID=$first_pid LAZYBD_URI=$first_uri LAZYBD_LOG=$first_log
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop
