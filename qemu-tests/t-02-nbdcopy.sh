#!/usr/bin/env bash
# t-02-nbdcopy: full reads with nbdcopy over TCP and over a unix socket (two
# --listen on one server) give the origin's sha256, with extents (nbdcopy skips
# reading what base:allocation says is zero, so a wrong zero extent shows up
# here) and with --no-extents (every byte is read).
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nbdinfo nginx

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
sock=$T/lazybd.sock
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache" \
  --listen "127.0.0.1:$(free_port)" --listen "unix:$sock"
[[ -S $sock ]] || fail "unix socket $sock does not exist"

assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"                  # cold, TCP
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_UNIX_URI"             # warm, unix
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_UNIX_URI" --no-extents
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
assert_same_as_file "$T/origin/disk.img" "nbd+unix:///?socket=$sock"    # empty export name

lazybd_stop
log "origin GETs: $(origin_requests /disk.img)"
