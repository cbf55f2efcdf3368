#!/usr/bin/env bash
# t-52-copy: `lazybd copy` against real peers.
#  - nginx (HTTP) -> file, --sha256 checked, byte-identical (qemu-img compare),
#    and sparse where the image is zero;
#  - HTTP -> an NBD export served by qemu-nbd (another implementation),
#    read back with nbdcopy;
#  - nbdkit (another server: the data plugin with a sparse layout, so
#    base:allocation reports holes) -> file: holes skipped, bytes right;
#  - a lazybd export (nbd+unix://) -> file;
#  - a wrong --sha256 fails with exit 2 and says why; a read-only NBD
#    destination is refused; the log-line progress mode (not a terminal).
. "$(dirname "$0")/lib.sh"
require_cmd nginx qemu-img qemu-nbd nbdkit nbdcopy nbdinfo

mkimage "$T/origin/disk.img" 64 4097   # 64 MiB + an odd tail, a zero region
origin_start "$T/origin" >/dev/null
want=$(sha_file "$T/origin/disk.img")
size=$(stat -c %s "$T/origin/disk.img")

# ---- HTTP -> file
"$LAZYBD" copy "$ORIGIN_URL/disk.img" "$T/out1.raw" --sha256 "$want" >"$T/copy1.out" 2>&1 \
  || fail "copy HTTP -> file failed: $(cat "$T/copy1.out")"
assert_grep "sha256 $want" "$T/copy1.out" "copy reports the digest"
assert_grep 'Progress|copied' "$T/copy1.out" "copy reports what it did"
qemu-img compare -q -f raw -F raw "$T/origin/disk.img" "$T/out1.raw" || fail "HTTP -> file differs"
alloc=$(($(stat -c %b "$T/out1.raw") * 512))
assert_le "$alloc" "$((size - ZERO_LEN + MIB))" "the zero region was left sparse (allocated $alloc)"
log "HTTP -> file: identical, $alloc bytes allocated of $size"

# ---- HTTP -> qemu-nbd export (writable), then read back
truncate -s "$size" "$T/target.raw"
qport=$(free_port)
qemu-nbd -f raw -x tgt -b 127.0.0.1 -p "$qport" --persistent --fork --pid-file "$T/qemu-nbd.pid" "$T/target.raw"
bg_track "$(cat "$T/qemu-nbd.pid")"
"$LAZYBD" copy "$ORIGIN_URL/disk.img" "nbd://127.0.0.1:$qport/tgt" --sha256 "$want" >"$T/copy2.out" 2>&1 \
  || fail "copy HTTP -> qemu-nbd failed: $(cat "$T/copy2.out")"
# (qemu rounds an odd-sized raw file up to whole sectors: compare $size bytes)
# (to a file, not a pipe into head: head leaving early is SIGPIPE for nbdcopy)
nbdcopy "nbd://127.0.0.1:$qport/tgt" "$T/readback.raw" || fail "nbdcopy from qemu-nbd failed"
got=$(head -c "$size" "$T/readback.raw" | sha256sum | awk '{print $1}')
assert_eq "$want" "$got" "sha256 of what qemu-nbd now serves"

# ---- a read-only NBD destination is refused
rport=$(free_port)
qemu-nbd -r -f raw -x ro -b 127.0.0.1 -p "$rport" --persistent --fork --pid-file "$T/qemu-nbd-ro.pid" "$T/target.raw"
bg_track "$(cat "$T/qemu-nbd-ro.pid")"
if "$LAZYBD" copy "$ORIGIN_URL/disk.img" "nbd://127.0.0.1:$rport/ro" >"$T/copy3.out" 2>&1; then
  fail "copy to a read-only export succeeded"
fi
assert_grep 'read-only' "$T/copy3.out" "the refusal says read-only"

# ---- nbdkit data plugin with holes -> file
nport=$(free_port)
nbdkit -P "$T/nbdkit.pid" -i 127.0.0.1 -p "$nport" -e src data \
  '@0x100000 "hello" @0x1000000 1 2 3 4 5 @0x2000000 "end"' size=64M
bg_track "$(cat "$T/nbdkit.pid")"
nbdcopy "nbd://127.0.0.1:$nport/src" "$T/nbdkit-ref.raw"
"$LAZYBD" copy "nbd://127.0.0.1:$nport/src" "$T/out4.raw" >"$T/copy4.out" 2>&1 \
  || fail "copy nbdkit -> file failed: $(cat "$T/copy4.out")"
cmp "$T/nbdkit-ref.raw" "$T/out4.raw" || fail "nbdkit -> file differs"
assert_grep '\(6[0-9](\.[0-9])? MiB zero/holes\)' "$T/copy4.out" "most of the sparse source counted as holes"

# ---- a lazybd export over a unix socket -> file
sock=$T/lazybd.sock
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache" --listen "unix:$sock" --control none
"$LAZYBD" copy "nbd+unix:///disk?socket=$sock" "$T/out5.raw" --sha256 "$want" -j 4 --chunk-size 1M \
  >"$T/copy5.out" 2>&1 || fail "copy lazybd -> file failed: $(cat "$T/copy5.out")"
cmp "$T/origin/disk.img" "$T/out5.raw" || fail "lazybd export -> file differs"
lazybd_stop

# ---- a wrong digest: exit 2, a clear message
bad=0000000000000000000000000000000000000000000000000000000000000000
set +e
"$LAZYBD" copy "$ORIGIN_URL/disk.img" "$T/out6.raw" --sha256 "$bad" >"$T/copy6.out" 2>&1
rc=$?
set -e
assert_eq 2 "$rc" "exit status of a copy with a wrong --sha256"
assert_grep 'SHA-256 mismatch' "$T/copy6.out" "the error names the mismatch"
log "copy: HTTP, qemu-nbd, nbdkit, lazybd peers all byte-identical"
