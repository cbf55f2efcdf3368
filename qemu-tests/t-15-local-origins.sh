#!/usr/bin/env bash
# t-15-local-origins: other ORIGIN forms. file:///path and a plain path serve
# the file's bytes; with no ORIGIN, the built-in sample image is served (size
# > 0, two full reads identical, compare with qemu-img of itself). SIGINT is a
# graceful stop too (exit 0 + summary).
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nbdinfo qemu-img

mkimage "$T/origin/disk.img" 64
img=$T/origin/disk.img

lazybd_start "file://$img" --cache-dir "$T/cache"
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop

lazybd_start "$img" --cache-dir "$T/cache"
assert_same_as_file "$img" "$LAZYBD_URI" --no-extents
lazybd_stop INT

lazybd_start --cache-dir "$T/cache-sample"
s=$(nbdinfo --size "$LAZYBD_URI")
log "built-in sample image: $s bytes"
assert_ge "$s" 1 "size of the built-in sample"
nbdcopy "$LAZYBD_URI" "$T/sample.raw" || fail "nbdcopy of the sample failed"
assert_same_as_file "$T/sample.raw" "$LAZYBD_URI" --no-extents
out=$(qemu-img compare -f raw -F raw "$T/sample.raw" "$LAZYBD_URI" 2>&1) || fail "compare sample: $out"
lazybd_stop INT
