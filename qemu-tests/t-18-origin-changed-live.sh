#!/usr/bin/env bash
# t-18-origin-changed-live: the origin is replaced (new content, same size, new
# ETag) while lazybd is serving it. A running export must never change under
# its clients or mix two versions of the image: every read that succeeds
# returns the content of the version the server opened (blocks cached before
# the change), and reads that would need the new version's bytes fail (EIO).
# The server stays up. (A restart then picks up the new version: t-08.)
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io nbdcopy nginx
require_nbd_python

mkimage "$T/origin/disk.img" 64
cp "$T/origin/disk.img" "$T/old.img"
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"
out=$(qemu-io -r -f raw "$LAZYBD_URI" -c 'read 0 1M' 2>&1) || fail "warm-up read failed: $out"

mtime=$(stat -c %Y "$T/origin/disk.img")
mkimage "$T/new.img" 64
cp "$T/new.img" "$T/origin/disk.img.new"
touch -d "@$((mtime + 100))" "$T/origin/disk.img.new"
mv -f "$T/origin/disk.img.new" "$T/origin/disk.img"
log "origin replaced while serving"

"$NBD_PYTHON" - "$LAZYBD_URI" "$T/old.img" "$T/new.img" <<'PY' || fail "data from the new origin version was served (see above)"
import errno, nbd, sys
uri, old, new = sys.argv[1], open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
h = nbd.NBD(); h.connect_uri(uri)
bad = 0
# (offset, length, cached before the change?)
probes = [(0, 65536, True), (512 * 1024 + 3, 4096, True), (8 << 20, 65536, False),
          (20 << 20, 1 << 20, False), ((40 << 20) + 5, 200000, False), (100, 1 << 20, False)]
for off, n, cached in probes:
    try:
        got = h.pread(n, off)
    except nbd.Error as e:
        what = errno.errorcode.get(e.errnum, e.errnum)
        print(f"pread {off}+{n}: {what}" + ("  <- a block cached before the change must still read" if cached else ""))
        bad += cached
        continue
    kind = "old" if got == old[off:off + n] else "NEW" if got == new[off:off + n] else "MIXED/other"
    print(f"pread {off}+{n}: {kind} content" + ("" if kind == "old" else "  <- must be the old content or an error"))
    bad += kind != "old"
h.shutdown()
sys.exit(1 if bad else 0)
PY
nbdinfo --size "$LAZYBD_URI" >/dev/null || fail "server no longer answers after the origin changed"
if nbdcopy --no-extents "$LAZYBD_URI" - > "$T/all.raw" 2> "$T/copy.err"; then
  fail "a full read after the origin changed succeeded (sha256 $(sha_file "$T/all.raw")): uncached blocks can only come from the new version"
fi
log "full read after the change failed as it must: $(head -n 1 "$T/copy.err")"
lazybd_log_plain | grep -E 'WARN|ERROR' | grep -Ei 'etag|validator|chang' | head -n 2 | sed 's/^/  log: /' >&2 || true
lazybd_stop
