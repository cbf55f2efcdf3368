#!/usr/bin/env bash
# t-05-unaligned: byte-exact reads at unaligned offsets and lengths, on an
# image whose size (64 MiB + 12345) is not a multiple of any block size:
# offsets 1, 511, 4095, 65535+7, reads crossing 64K/128K/1M/2M/4M boundaries,
# a multi-block unaligned read, the zero region's edges and the last bytes of
# the export. Checked twice:
#  - qemu-io -r 'read -v' hex dumps (qemu's NBD client: what a VM does),
#    parsed and compared with the origin file;
#  - raw NBD_CMD_READ requests through libnbd (python3-libnbd), strict alignment
#    checks off, so the unaligned requests reach the server as is. If the server
#    advertises block_size_minimum 1 they must all succeed; otherwise a refusal
#    must be EINVAL (never wrong data). A read past the end must fail, and the
#    connection must stay usable after every error.
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io nginx
require_nbd_python

mkimage "$T/origin/disk.img" 64 12345
size=$(stat -c %s "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"

K=1024; M=$((1024 * 1024))
reads=(
  "1 1" "1 100" "511 2" "511 1030" "4095 2" "4095 8194" "$((65535 + 7)) 1000"
  "$((64 * K - 3)) 7" "$((128 * K - 1)) 2" "$((M - 1)) 2" "$((2 * M - 5)) 11"
  "$((4 * M - 4097)) 8200" "$((12345)) $((3 * M + 17))"
  "$((ZERO_OFF - 3)) 9" "$((ZERO_OFF + ZERO_LEN - 5)) 11"
  "$((size - 1)) 1" "$((size - 7)) 7" "$((size - 513)) 513" "$((size - 12345 - 3)) 12348"
  "$((size - 70000)) 70000"
)

run_qemu_io() {  # LABEL : one qemu-io process doing every read with -v, checked
  local cmds=() r
  for r in "${reads[@]}"; do cmds+=(-c "read -v $r"); done
  qemu-io -r -f raw "$LAZYBD_URI" "${cmds[@]}" > "$T/qemu-io.out" 2>&1 ||
    fail "qemu-io reads failed ($1): $(grep -v '^[0-9a-f]*:  ' "$T/qemu-io.out" | head -n 5 | tr '\n' ' ')"
  "$NBD_PYTHON" - "$T/origin/disk.img" "$T/qemu-io.out" "$1" "${reads[@]}" <<'PY' || fail "qemu-io data differs from the origin ($1)"
import re, sys
img, out, label, reads = sys.argv[1], sys.argv[2], sys.argv[3], [tuple(map(int, r.split())) for r in sys.argv[4:]]
data = open(img, "rb").read()
dump, done = {}, set()
for line in open(out, errors="replace"):
    m = re.match(r"^([0-9a-f]+):  ", line)
    if m:
        dump[int(m.group(1), 16)] = line[m.end():]
        continue
    m = re.match(r"^read (\d+)/(\d+) bytes at offset (\d+)", line)
    if m: done.add((int(m.group(3)), int(m.group(1))))
bad = 0
for off, ln in reads:
    if (off, ln) not in done:
        print(f"  - read {off}+{ln}: no 'read {ln}/{ln} bytes at offset {off}' line"); bad += 1; continue
    for a in range(off, off + ln, 16):
        n = min(16, off + ln - a)
        if a not in dump:
            print(f"  - read {off}+{ln}: no dump line for offset {a:#x}"); bad += 1; break
        got = bytes(int(x, 16) for x in dump[a][:3 * n].split())
        if got != data[a:a + n]:
            print(f"  - read {off}+{ln}: bytes at {a} ({a:#x}) are {got.hex()} want {data[a:a+n].hex()}"); bad += 1; break
print(f"qemu-io {label}: {len(reads)} reads, {bad} bad")
sys.exit(1 if bad else 0)
PY
}

run_libnbd() {  # LABEL
  "$NBD_PYTHON" - "$T/origin/disk.img" "$LAZYBD_URI" "$1" "${reads[@]}" <<'PY' || fail "libnbd raw reads wrong ($1)"
import errno, nbd, sys
img, uri, label, reads = sys.argv[1], sys.argv[2], sys.argv[3], [tuple(map(int, r.split())) for r in sys.argv[4:]]
data = open(img, "rb").read()
size = len(data)
h = nbd.NBD()
h.connect_uri(uri)
mn, mx = h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_MAXIMUM)
mx = mx if mx > 0 else 32 << 20
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
bad = refused = 0
def usable():
    try:
        return h.pread(512, 0) == data[:512]
    except nbd.Error as e:
        print(f"  - connection unusable after an error: {e}"); return False
for off, ln in reads:
    pos = off
    while pos < off + ln:
        n = min(mx, off + ln - pos)
        try:
            got = h.pread(n, pos)
        except nbd.Error as e:
            if mn > 1 and e.errnum == errno.EINVAL and (pos % mn or n % mn):
                refused += 1
            else:
                print(f"  - pread({n}, {pos}) failed: {e}"); bad += 1
            if not usable(): sys.exit(1)
            break
        if got != data[pos:pos + n]:
            i = next(i for i in range(n) if got[i] != data[pos + i])
            print(f"  - pread({n}, {pos}) wrong data: first difference at byte {pos + i}"); bad += 1
            break
        pos += n
# past the end: must fail, connection must survive
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
for off, ln in ((size - 4, 8), (size, 1), (size + 4096, 4096)):
    try:
        h.pread(ln, off)
        print(f"  - pread({ln}, {off}) past the end ({size}) succeeded"); bad += 1
    except nbd.Error as e:
        print(f"pread({ln}, {off}) past the end failed as it must: {errno.errorcode.get(e.errnum, e.errnum)}")
    if not usable(): sys.exit(1)
h.shutdown()
print(f"libnbd {label}: block_size_minimum={mn}; {len(reads)} reads, {bad} bad, {refused} refused with EINVAL (unaligned to minimum {mn})")
sys.exit(1 if bad else 0)
PY
}

run_qemu_io cold
run_libnbd warm
lazybd_stop

# the same on a fresh cache, libnbd first, so the unaligned raw requests are
# the ones that fetch the blocks from the origin
rm -rf "$T/cache"
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"
run_libnbd cold
run_qemu_io warm
lazybd_stop
