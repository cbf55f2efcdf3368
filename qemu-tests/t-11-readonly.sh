#!/usr/bin/env bash
# t-11-readonly: the export is read-only.
#  - qemu-io opened read-write cannot write 4k (qemu refuses the read-only
#    export: EPERM/EACCES), and a read-only qemu-io read still works;
#  - raw NBD_CMD_WRITE (4 KiB and 1 MiB payloads), NBD_CMD_TRIM and
#    NBD_CMD_WRITE_ZEROES sent anyway (libnbd strict mode off) each fail with
#    EPERM from the server, and the same connection still reads correct data
#    afterwards (the server consumed the write payloads);
#  - nothing changed: export and origin file still have the original bytes.
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io nbdcopy nginx
require_nbd_python

mkimage "$T/origin/disk.img" 64
want=$(sha_file "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"

if out=$(qemu-io -f raw "$LAZYBD_URI" -c 'write 0 4k' 2>&1); then
  fail "qemu-io write 0 4k succeeded on the read-only export: $out"
fi
log "qemu-io write refused: $(echo "$out" | head -n 2 | tr '\n' ' ')"
echo "$out" | grep -Eqi 'operation not permitted|permission denied|read-only|read only' ||
  fail "qemu-io write failed for an unexpected reason: $out"
out=$(qemu-io -r -f raw "$LAZYBD_URI" -c 'read 0 4k' 2>&1) || fail "read after the refused write failed: $out"

"$NBD_PYTHON" - "$T/origin/disk.img" "$LAZYBD_URI" <<'PY' || fail "raw write/trim/zero checks failed"
import errno, nbd, sys
data = open(sys.argv[1], "rb").read()
h = nbd.NBD()
h.connect_uri(sys.argv[2])
assert h.is_read_only(), "export does not advertise NBD_FLAG_READ_ONLY"
mx = h.get_block_size(nbd.SIZE_MAXIMUM) or (32 << 20)
h.set_strict_mode(0)          # send the commands even though the export is read-only
bad = 0
big = min(1 << 20, mx)
cmds = [("write 4k@0", lambda: h.pwrite(b"\xa5" * 4096, 0)),
        (f"write {big}@1M+3", lambda: h.pwrite(b"\x5a" * big, (1 << 20) + 3)),
        ("trim 64k@64k", lambda: h.trim(65536, 65536)),
        ("write_zeroes 64k@128k", lambda: h.zero(65536, 131072)),
        ("write 4k@0 again", lambda: h.pwrite(b"\xa5" * 4096, 0))]
for name, f in cmds:
    try:
        f()
        print(f"  - {name}: succeeded on a read-only export"); bad += 1
    except nbd.Error as e:
        ok = e.errnum == errno.EPERM
        print(f"{name}: {errno.errorcode.get(e.errnum, e.errnum)}{'' if ok else '  <- want EPERM'}")
        bad += not ok
    try:
        for off in (0, (1 << 20), 65536, 131072):
            if h.pread(4096 + 7, off) != data[off:off + 4096 + 7]:
                print(f"  - after {name}: read at {off} returned wrong data"); bad += 1
    except nbd.Error as e:
        print(f"  - after {name}: connection unusable: {e}"); sys.exit(1)
h.shutdown()
sys.exit(1 if bad else 0)
PY

assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"
assert_eq "$want" "$(sha_file "$T/origin/disk.img")" "origin file after the write attempts"
lazybd_stop
