#!/usr/bin/env bash
# t-61-full-disk: lazybd on full disks (small tmpfs file systems; needs root).
#  1. --cache-dir on a 12 MiB tmpfs, 64 MiB image from nginx: two full reads
#     (the second one two nbdcopy at once) are byte-identical to the origin
#     although the cache cannot hold the image (what cannot be stored is
#     served uncached); the file system did fill up; the server keeps
#     serving, exits 0 on SIGTERM and its summary counts store_failures > 0;
#     `cache verify` exits 0; a restart on that full cache serves the origin
#     bytes again. That first read costs at most 1.35x the image in origin
#     bytes: readahead pauses while the cache cannot store (what it had in
#     flight when the disk filled is the rest; before this pause: 1.84x).
#  2. A --writable export whose --overlay-dir is on a 4 MiB tmpfs, filled up
#     with a filler file after a few writes:
#     - new writes fail with ENOSPC (libnbd's errno; qemu-io prints "No space
#       left on device"), for whole pages, partial pages and unaligned
#       writes; the server does not crash and the connection goes on;
#     - rewrites of pages already in the overlay (half a MiB: they take
#       slots of the overlay's rewrite reserve, a write never overwrites a
#       page's last flushed copy), WRITE_ZEROES and FLUSH still succeed;
#       every read works and the export reads as the model (a failed
#       write's pages may read old or new, per page);
#     - with 128 KiB left, a 1 MiB write fails with ENOSPC and each of its
#       pages reads as old or new (never an error, never anything else);
#     - after the filler is deleted, writes work again and read back;
#     - SIGTERM with the file system full again: exit 0; a restart on the
#       full file system starts and reads back everything.
#  3. A cache dir on a 64 KiB tmpfs for a 16 GiB local image: the block
#     map is sparse, so lazybd starts and serves every byte right (what it
#     cannot record is served uncached); an overlay dir there starts too
#     (its metadata grows with writes): a 1 MiB write gets ENOSPC, a 4 KiB
#     write works and reads back. Once the file system is made larger
#     (remount) the cache dir works.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nbdinfo qemu-io nginx mount umount
require_nbd_python
((EUID == 0)) || fail "t-61 mounts tmpfs file systems: run it as root"

img=$T/origin/disk.img
mkimage "$img" 64
size=$(stat -c %s "$img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
M=$((1024 * 1024))

# ---- 1. the cache on a file system too small for the image
tmpfs_mount "$T/small" 12M
mark=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/small" --control none
assert_same_as_file "$img" "$LAZYBD_URI"
# What cannot be stored is fetched once for the reader, not again by
# readahead (which pauses while stores fail).
got=$(origin_bytes_since "$mark" /disk.img)
assert_le "$got" $((size * 135 / 100)) "origin bytes for one full read through a cache that filled up (image: $size)"
log "one full read with the cache full: $got origin bytes for a $size-byte image"
free=$(fs_free_bytes "$T/small")
assert_le "$free" $((1 * M)) "bytes left on the 12 MiB cache file system after a full read (it must have filled)"
_pid_alive "$LAZYBD_PID" || fail "lazybd died when the cache file system filled up"
pids=()
for i in 1 2; do
  { nbdcopy "$LAZYBD_URI" - | cmp - "$img"; } > "$T/read$i.out" 2>&1 & pids+=("$!")
done
bg_track "${pids[@]}"
for i in 0 1; do wait "${pids[i]}" || fail "concurrent read $((i + 1)) on the full cache: $(cat "$T/read$((i + 1)).out")"; done
log "two more full reads at once with the cache full: identical to the origin"
assert_eq "$size" "$(nbdinfo --size "$LAZYBD_URI")" "nbdinfo --size with the cache full"
lazybd_stop
sf=$(lazybd_summary | sed -n 's/.* store_failures=\([0-9]*\).*/\1/p')
assert_ge "${sf:-0}" 1 "store_failures in the summary"
assert_grep 'cannot store|No space left' "$LAZYBD_LOG" "a warning about the full cache"
out=$(lazybd_cache verify "$T/small" 2>&1) || fail "cache verify of the full cache failed: $out"
log "store_failures=$sf; cache verify: $(echo "$out" | tail -n 1)"
lazybd_start "$url" --cache-dir "$T/small" --control none
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop
assert_no_grep 'panicked|SIGBUS' "$LAZYBD_LOG" "lazybd log"

# ---- 2. the overlay on a file system that fills up
tmpfs_mount "$T/ovfs" 4M
cp "$img" "$T/model.img"
lazybd_start "$url" --cache-dir "$T/cache" --control none --writable --overlay-dir "$T/ovfs/ov"

# ovl PHASE : one step of the overlay checks (libnbd), on the model $T/model.img
ovl() {
  "$NBD_PYTHON" - "$LAZYBD_URI" "$T/model.img" "$T/ovfs/filler" "$1" <<'PY'
import nbd, os, sys
uri, model_path, filler, phase = sys.argv[1:5]
M, P = 1 << 20, 4096
model = bytearray(open(model_path, "rb").read())
h = nbd.NBD(); h.connect_uri(uri)
bad = []

def free():
    st = os.statvfs(os.path.dirname(filler)); return st.f_bavail * st.f_frsize

def fill(leave=0):
    with open(filler, "ab") as f:
        while free() > leave:
            try:
                f.write(b"\x5a" * min(65536, free() - leave)); f.flush()
            except OSError:
                break
    print(f"  filler: {os.path.getsize(filler)} bytes, {free()} bytes left")

def write(off, data):
    h.pwrite(bytes(data), off); model[off:off + len(data)] = data

def want_enospc(what, off, n, v):
    try:
        h.pwrite(bytes([v]) * n, off)
    except nbd.Error as e:
        if e.errno != "ENOSPC":
            bad.append(f"{what}: failed with {e.errno} ({e}), want ENOSPC")
        else:
            print(f"  {what}: ENOSPC as it must")
        return
    bad.append(f"{what}: succeeded on a full file system")

def check(loose=()):
    """the export equals the model; inside LOOSE (off, n, v) each page is old or new"""
    size = h.get_size()
    got = bytearray()
    for pos in range(0, size, 4 * M):
        got += h.pread(min(4 * M, size - pos), pos)
    new = 0
    for off, n, v in loose:
        for p in range(off - off % P, off + n, P):
            a, b = max(p, off), min(p + P, off + n)
            g, o = got[a:b], model[a:b]
            if g == o: continue
            if g == bytes([v]) * (b - a):
                model[a:b] = g; new += 1
            else:
                bad.append(f"page at {p}: neither old nor new after a failed write")
    if got != model:
        i = next(i for i in range(len(got)) if got[i] != model[i])
        bad.append(f"export differs from the model at byte {i}: {bytes(got[i:i+8]).hex()} vs {bytes(model[i:i+8]).hex()}")
    print(f"  full read: {'matches' if got == model else 'DIFFERS from'} the model"
          + (f" ({new} pages of failed writes read new)" if loose else ""))

if phase == "before":
    write(0, b"\xa1" * M)
    write(20 * M + 512, b"\xa2" * 65536)        # partial pages: merged with the base
    h.flush()
    fill(0)
    want_enospc("4 KiB write to a new page", 9 * M, P, 0xe1)
    want_enospc("1 MiB write to new pages", 8 * M, M, 0xe2)
    want_enospc("100-byte unaligned write", 30 * M + 7, 100, 0xe3)
elif phase == "full":
    want_enospc("64 KiB write after qemu-io's", 33 * M, 65536, 0xe4)
    write(0, b"\xb1" * (M // 2))                 # pages already in the overlay: rewrites
    write(20 * M + 4096, b"\xb2" * 8192)
    print("  rewrites of pages in the overlay: ok")
    h.zero(65536, 40 * M); model[40 * M:40 * M + 65536] = bytes(65536)
    h.zero(8192, 4096)                           # inside the overlay's pages
    model[4096:12288] = bytes(8192)
    print("  WRITE_ZEROES: ok")
    h.flush()
    print("  FLUSH: ok")
    check([(9 * M, P, 0xe1), (8 * M, M, 0xe2), (30 * M + 7, 100, 0xe3), (33 * M, 65536, 0xe4)])
    # a second connection works too
    h2 = nbd.NBD(); h2.connect_uri(uri); h2.pread(P, 50 * M); h2.shutdown()
    os.unlink(filler)
    fill(128 << 10)
    want_enospc("1 MiB write with 128 KiB left", 12 * M, M, 0xc1)
    check([(12 * M, M, 0xc1)])
    os.unlink(filler)
    print(f"  filler deleted: {free()} bytes free")
    write(8 * M, b"\xd1" * (M // 4))            # (the file system holds 4 MiB)
    write(12 * M, b"\xd2" * (M // 4))
    write(30 * M + 7, b"\xd3" * 100)
    h.flush()
    print("  writes after freeing space: ok")
    check()
    fill(0)
elif phase == "after":
    check()
h.shutdown()
open(model_path, "wb").write(model)
for b in bad: print("  -", b)
sys.exit(1 if bad else 0)
PY
}

ovl before > "$T/ovl1.out" 2>&1 || { cat "$T/ovl1.out" >&2; fail "overlay on a full file system: step 1 (see above)"; }
log "overlay, file system full: $(tr '\n' ' ' < "$T/ovl1.out")"
if qemu-io -f raw "$LAZYBD_URI" -c "write -P 0x77 $((10 * M)) 65536" > "$T/qio.out" 2>&1 &&
   ! grep -q 'No space left on device' "$T/qio.out"; then
  fail "qemu-io write on a full overlay file system succeeded: $(tr '\n' ' ' < "$T/qio.out")"
fi
assert_grep 'No space left on device' "$T/qio.out" "qemu-io's write on a full overlay file system"
log "qemu-io: $(grep -m1 'No space left' "$T/qio.out")"
_pid_alive "$LAZYBD_PID" || fail "lazybd died on ENOSPC"
ovl full > "$T/ovl2.out" 2>&1 || { cat "$T/ovl2.out" >&2; fail "overlay on a full file system: step 2 (see above)"; }
log "overlay: $(tr '\n' ' ' < "$T/ovl2.out")"
# (the model has every write; the 0x77 qemu-io write failed: its range is old)
assert_export_model "$T/model.img" "$LAZYBD_URI"
lazybd_stop
assert_no_grep 'panicked|SIGBUS' "$LAZYBD_LOG" "lazybd log"
assert_le "$(fs_free_bytes "$T/ovfs")" 4096 "bytes left on the overlay file system at the restart"
lazybd_start "$url" --cache-dir "$T/cache" --control none --writable --overlay-dir "$T/ovfs/ov"
ovl after > "$T/ovl3.out" 2>&1 || { cat "$T/ovl3.out" >&2; fail "overlay after a restart on a full file system (see above)"; }
log "restart with the overlay file system full: $(tr '\n' ' ' < "$T/ovl3.out")"
rm -f "$T/ovfs/filler"
lazybd_stop
assert_no_grep 'panicked|SIGBUS' "$LAZYBD_LOG" "lazybd log"

# ---- 3. a 64 KiB file system for the metadata of a 16 GiB image
# The cache's block map is sparse (it grows with what is cached): lazybd
# starts, serves every byte right, and what it cannot record is served
# uncached; never a crash or SIGBUS.
mkdir -p "$T/big"
truncate -s 16G "$T/big/sparse.img"
head -c $((4 * M)) /dev/urandom | dd of="$T/big/sparse.img" bs=1M seek=$((5 * 1024)) conv=notrunc status=none
tmpfs_mount "$T/tiny" 64k
lazybd_start "$T/big/sparse.img" --cache-dir "$T/tiny" --control none
"$NBD_PYTHON" - "$LAZYBD_URI" "$T/big/sparse.img" <<'PY' || fail "reads of the 16 GiB image with a 64 KiB cache file system are wrong"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); f = open(sys.argv[2], "rb")
for rnd in range(2):
    for off in (0, 5 << 30, (5 << 30) + (3 << 20), (16 << 30) - (1 << 20)):
        f.seek(off)
        if h.pread(1 << 20, off) != f.read(1 << 20): sys.exit(f"1 MiB at {off} differs (round {rnd})")
PY
lazybd_stop
assert_no_grep 'panicked|SIGBUS' "$LAZYBD_LOG" "lazybd log"
log "a 16 GiB image over a 64 KiB cache file system: starts, every byte right"
# An overlay's metadata grows with what is written: it starts in 64 KiB
# over a 16 GiB image, and writes beyond the room get ENOSPC.
tmpfs_mount "$T/tiny2" 64k
lazybd_start "$T/big/sparse.img" --cache-dir "$T/cache-big" --control none \
  --writable --overlay-dir "$T/tiny2/ov"
if qemu-io -f raw "$LAZYBD_URI" -c "write -P 0x44 0 1M" > "$T/qio.out" 2>&1 &&
   ! grep -q 'No space left on device' "$T/qio.out"; then
  fail "a 1 MiB write into an overlay on a 64 KiB file system succeeded: $(tr '\n' ' ' < "$T/qio.out")"
fi
assert_grep 'No space left on device' "$T/qio.out" "qemu-io's write into the 64 KiB overlay file system"
qemu-io -f raw "$LAZYBD_URI" -c "write -P 0x45 8192 4096" -c flush -c "read -P 0x45 8192 4096" > "$T/qio.out" 2>&1 ||
  fail "a 4 KiB write into the 64 KiB overlay file system failed: $(tr '\n' ' ' < "$T/qio.out")"
assert_no_grep 'Pattern verification failed|error' "$T/qio.out" "4 KiB write and read back"
lazybd_stop
assert_no_grep 'panicked|SIGBUS' "$LAZYBD_LOG" "lazybd log"
mount -o remount,size=64M "$T/tiny" || fail "remount of the tiny tmpfs failed"
lazybd_start "$T/big/sparse.img" --cache-dir "$T/tiny" --control none
assert_eq $((16 * 1024 * M)) "$(nbdinfo --size "$LAZYBD_URI")" "size of the 16 GiB export"
"$NBD_PYTHON" - "$LAZYBD_URI" "$T/big/sparse.img" <<'PY' || fail "reads of the sparse 16 GiB image after the remount are wrong"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); f = open(sys.argv[2], "rb")
for off in (0, 5 << 30, (5 << 30) + (3 << 20), (16 << 30) - (1 << 20)):
    f.seek(off)
    if h.pread(1 << 20, off) != f.read(1 << 20): sys.exit(f"1 MiB at {off} differs")
PY
lazybd_stop
log "the same cache dir once the file system is larger: every byte right"
assert_no_grep 'panicked|SIGBUS' "$LAZYBD_LOG" "lazybd log"
