#!/usr/bin/env bash
# t-35-overlay-qemu-img: whole-disk writes into a --writable export by real
# tools. Origin: 32 MiB + 12800 bytes (random, with an all-zero region; a
# partial last 64K block, a multiple of 512 because qemu's block layer rounds
# sizes up to 512 and would write past the end of anything else). A
# local file of the same size, random but with zero regions where the origin
# has data (so the writer must zero them: WRITE_ZEROES / fast zero) and data
# where the origin has its zero region.
#  - qemu-img convert -n -f raw -O raw FILE nbd://... (16 coroutines,
#    out-of-order writes): then qemu-img compare FILE vs the export says
#    identical, and nbdcopy of the export (with and without extents) equals
#    FILE;
#  - SIGTERM + restart: still identical;
#  - a second local file copied in with nbdcopy over 4 connections
#    (multi-conn writes), nbdcopy back equals it, qemu-img compare too;
#  - the origin file is unchanged, nginx saw only GET/HEAD requests; a
#    read-only server on the same cache serves the origin (the cache holds no
#    written data).
. "$(dirname "$0")/lib.sh"
require_cmd qemu-img nbdcopy nginx
require_nbd_python

mkimage "$T/origin/disk.img" 32 12800
size=$(stat -c %s "$T/origin/disk.img")
origin_sha=$(sha_file "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img

mklocal() {  # PATH SEED : random, size of the origin, zero runs at 2M+5 (1 MiB+3), 7M (64K), the last 10000 bytes
  "$NBD_PYTHON" - "$1" "$size" "$2" <<'PY'
import random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
b = bytearray(r.randbytes(size))
M = 1 << 20
for off, n in ((2 * M + 5, M + 3), (7 * M, 65536), (size - 10000, 10000)):
    b[off:off + n] = bytes(n)
open(path, "wb").write(b)
PY
}
mklocal "$T/local.img" 1
cmp -s "$T/local.img" "$T/origin/disk.img" && fail "test bug"

lazybd_start "$url" --cache-dir "$T/cache" --writable
out=$(qemu-img convert -p -n -m 16 -W -f raw -O raw "$T/local.img" "$LAZYBD_URI" 2>&1) ||
  fail "qemu-img convert into the export failed: $out"
out=$(qemu-img compare -f raw -F raw "$T/local.img" "$LAZYBD_URI" 2>&1) || fail "qemu-img compare after convert: $out"
log "compare after convert: $out"
assert_same_as_file "$T/local.img" "$LAZYBD_URI"
assert_same_as_file "$T/local.img" "$LAZYBD_URI" --no-extents
lazybd_stop

lazybd_start "$url" --cache-dir "$T/cache" --writable
out=$(qemu-img compare -f raw -F raw "$T/local.img" "$LAZYBD_URI" 2>&1) || fail "qemu-img compare after restart: $out"
assert_same_as_file "$T/local.img" "$LAZYBD_URI"

mklocal "$T/local2.img" 2
nbdcopy --connections=4 --requests=16 "$T/local2.img" "$LAZYBD_URI" || fail "nbdcopy into the export failed"
assert_same_as_file "$T/local2.img" "$LAZYBD_URI" --connections=4
out=$(qemu-img compare -f raw -F raw "$T/local2.img" "$LAZYBD_URI" 2>&1) || fail "qemu-img compare after nbdcopy: $out"
lazybd_stop
log "after nbdcopy in: $out"

assert_eq "$origin_sha" "$(sha_file "$T/origin/disk.img")" "origin file sha256"
assert_origin_only_read
lazybd_start "$url" --cache-dir "$T/cache"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
lazybd_stop
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "cache verify: $out"
