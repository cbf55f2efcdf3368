#!/usr/bin/env bash
# t-02-nbdcopy: full reads with nbdcopy over TCP and over a unix socket (two
# --listen on one server) give the origin's sha256 and are byte-identical
# (cmp); with extents (nbdcopy skips reading what base:allocation says is
# zero, so a wrong zero extent shows up here) and with --no-extents (every
# byte is read); the empty export name "" works over the socket too.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nbdinfo nginx

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
sock=$T/lazybd.sock
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache" \
  --listen "127.0.0.1:$(free_port)" --listen "unix:$sock"
[[ -S $sock ]] || fail "unix socket $sock does not exist"

want=$(sha_file "$T/origin/disk.img")
got=$(sha_nbd "$LAZYBD_URI") || fail "nbdcopy over TCP failed"                 # cold, TCP
assert_eq "$want" "$got" "sha256 of nbdcopy $LAZYBD_URI"
got=$(sha_nbd "$LAZYBD_UNIX_URI") || fail "nbdcopy over the unix socket failed" # warm, unix
assert_eq "$want" "$got" "sha256 of nbdcopy $LAZYBD_UNIX_URI"
log "sha256 over TCP and unix socket = origin's ($want)"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_UNIX_URI" --no-extents
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
assert_same_as_file "$T/origin/disk.img" "nbd+unix:///?socket=$sock"    # empty export name

lazybd_stop
log "origin GETs: $(origin_requests /disk.img)"
