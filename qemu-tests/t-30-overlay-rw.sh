#!/usr/bin/env bash
# t-30-overlay-rw: a --writable export reads back what was written, and
# nothing else changes. Image 32 MiB + 12345 bytes (partial last block).
#  - nbdinfo: is_read_only false; can_flush, can_fua, can_trim, can_zero,
#    can_multi_conn true;
#  - qemu-io (qemu's NBD client) writes patterns at unaligned offsets
#    (1000+5000, 65530+20 across a 64K boundary, a 200000-byte multi-block
#    write, the last 512 bytes, across the start of the partial last block,
#    into the image's all-zero region, a rewrite inside a written block),
#    WRITE_ZEROES (`write -z`, unaligned, over written blocks, at the tail,
#    with -u) and TRIM (`discard`, with --discard=unmap so qemu sends it);
#  - raw libnbd commands: WRITE with FUA, aligned WRITE_ZEROES with FAST_ZERO
#    (done), unaligned FAST_ZERO (must fail with ENOTSUP and change nothing),
#    TRIM with FUA, a write past the end (must fail, connection still
#    usable), FLUSH;
#  - a model (origin file + every write) must equal the export byte for byte:
#    full libnbd read, nbdcopy with and without extents (a range wrongly
#    reported as zero would show), qemu-io `read -P` of each written range.
#    Whole 64K blocks that were trimmed must read as zeroes (lazybd drops the
#    block from the overlay); an unaligned TRIM may leave its range as it
#    was or zero it (the NBD spec leaves it unspecified), nothing outside it;
#  - the origin file's sha256 is unchanged, nginx saw only GET/HEAD
#    requests, the overlay lives in CACHE/overlays/disk with a base record
#    naming the origin, cache verify is clean, and a read-only server on the
#    same cache afterwards serves exactly the origin (no written byte leaked
#    into the cache).
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io nbdinfo nbdcopy nginx
require_nbd_python

mkimage "$T/origin/disk.img" 32 12345
size=$(stat -c %s "$T/origin/disk.img")
origin_sha=$(sha_file "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache" --writable
K=1024; M=$((1024 * 1024)); B=$((64 * K))

# ---- handshake flags
nbdinfo --json "$LAZYBD_URI" > "$T/info.json" 2>&1 || fail "nbdinfo --json: $(cat "$T/info.json")"
"$NBD_PYTHON" - "$T/info.json" "$size" <<'PY' || fail "nbdinfo flags of the writable export are wrong"
import json, sys
e = json.load(open(sys.argv[1]))["exports"][0]
want = {"is_read_only": False, "can_flush": True, "can_fua": True, "can_trim": True,
        "can_zero": True, "can_multi_conn": True, "export-size": int(sys.argv[2])}
bad = [f"{k}={e.get(k)!r} (want {v!r})" for k, v in want.items() if e.get(k) != v]
print("nbdinfo:", {k: e.get(k) for k in want}, "can_fast_zero:", e.get("can_fast_zero"))
for b in bad: print("  -", b)
sys.exit(1 if bad else 0)
PY

# ---- qemu-io writes; every op is also applied to the model
cp "$T/origin/disk.img" "$T/model.img"
ops=(
  "w 1000 5000 0x11"
  "w 65530 20 0x22"
  "w $((size - 512)) 512 0x33"
  "w $((M + 7)) 200000 0x44"
  "z $((3 * M + 100)) 150000"
  "w $((5 * M)) $B 0x55"
  "z $((5 * M)) $B"
  "w $((6 * M + 4096)) 8192 0x66"
  "z $((6 * M + 5000)) 1000"
  "w $((ZERO_OFF + 4096)) 100 0x77"
  "w 3000 100 0x88"
  "z $((size - 100)) 100"
  "w $((size - 12345 - 10)) 20 0x99"
  "w $((8 * M)) $((2 * B)) 0xaa"
  "t $((8 * M)) $((2 * B))"
  "t $((9 * M)) $((3 * B))"
  "zu $((10 * M + 3)) $((2 * B))"
  "w $((12 * M)) $((4 * B)) 0xcc"
  "t $((12 * M + 1000)) 200000"
)
cmds=() model_ops=() loose=()
for op in "${ops[@]}"; do
  read -r k off len pat <<<"$op"
  case $k in
    w)  cmds+=(-c "write -P $pat $off $len"); model_ops+=("w $off $len $pat") ;;
    z)  cmds+=(-c "write -z $off $len"); model_ops+=("z $off $len") ;;
    zu) cmds+=(-c "write -z -u $off $len"); model_ops+=("z $off $len") ;;
    t)  cmds+=(-c "discard $off $len")
        # whole blocks inside the range read as zeroes; an unaligned edge is unspecified
        a=$(((off + B - 1) / B * B)); e=$(((off + len) / B * B))
        ((e > a)) && model_ops+=("z $a $((e - a))")
        ((a > off)) && loose+=("$off:$((a - off))")
        ((off + len > e && e >= a)) && loose+=("$e:$((off + len - e))") ;;
  esac
done
cmds+=(-c flush)
qemu-io -f raw --discard=unmap "$LAZYBD_URI" "${cmds[@]}" > "$T/qemu-io.out" 2>&1 ||
  fail "qemu-io writes failed: $(tail -n 5 "$T/qemu-io.out" | tr '\n' ' ')"
nw=$(grep -Ec '^(wrote|discard) ' "$T/qemu-io.out")
assert_eq "${#ops[@]}" "$nw" "qemu-io ops that reported success"
image_apply "$T/model.img" "${model_ops[@]}"
log "qemu-io: ${#ops[@]} writes/zeroes/discards + flush done; loose (unaligned TRIM edges): ${loose[*]:-none}"

# ---- raw commands through libnbd (flags qemu-io does not send)
"$NBD_PYTHON" - "$T/model.img" "$LAZYBD_URI" <<'PY' || fail "raw libnbd write/zero/trim checks failed"
import errno, nbd, sys
M, B = 1 << 20, 65536
model = open(sys.argv[1], "r+b")
def apply(off, data): model.seek(off); model.write(data)
def expect(off, n, what):
    model.seek(off); want = model.read(n); got = h.pread(n, off)
    if got != want:
        i = next(i for i in range(n) if got[i] != want[i])
        print(f"  - after {what}: byte {off + i} is {got[i]:#04x}, want {want[i]:#04x}"); return 1
    return 0
h = nbd.NBD(); h.connect_uri(sys.argv[2]); size = h.get_size()
bad = 0
d = bytes([0xbb]) * 3000
h.pwrite(d, 2 * M + 123, nbd.CMD_FLAG_FUA); apply(2 * M + 123, d)
bad += expect(2 * M, B, "FUA write")
h.zero(B, 4 * M, nbd.CMD_FLAG_FAST_ZERO); apply(4 * M, bytes(B))
bad += expect(4 * M - 10, B + 20, "aligned FAST_ZERO")
before = h.pread(4 * M + 20, 1000)
try:
    h.zero(4 * M + 10, 1000, nbd.CMD_FLAG_FAST_ZERO)
    print("unaligned FAST_ZERO succeeded (allowed)"); apply(1000, bytes(4 * M + 10))
except nbd.Error as e:
    if e.errnum != errno.ENOTSUP:
        print(f"  - unaligned FAST_ZERO failed with {errno.errorcode.get(e.errnum, e.errnum)}, want ENOTSUP"); bad += 1
    else:
        print("unaligned FAST_ZERO: ENOTSUP")
    if h.pread(4 * M + 20, 1000) != before:
        print("  - the refused FAST_ZERO changed data"); bad += 1
h.pwrite(bytes([0xdd]) * (2 * B), 14 * M); apply(14 * M, bytes([0xdd]) * (2 * B))
h.trim(2 * B, 14 * M, nbd.CMD_FLAG_FUA); apply(14 * M, bytes(2 * B))
bad += expect(14 * M - 5, 2 * B + 10, "TRIM+FUA of written blocks")
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
for off, n in ((size - 10, 20), (size, 1)):
    try:
        h.pwrite(b"\xee" * n, off); print(f"  - write {n}@{off} past the end ({size}) succeeded"); bad += 1
    except nbd.Error as e:
        print(f"write past the end: {errno.errorcode.get(e.errnum, e.errnum)}")
bad += expect(size - 600, 600, "writes past the end")
h.flush()
h.shutdown()
sys.exit(1 if bad else 0)
PY

# ---- read back: qemu-io read -P per written range (a fresh connection)
rcmds=()
for op in "${ops[@]}"; do
  read -r k off len pat <<<"$op"
  case $k in w) ;; *) continue ;; esac
  # skip ranges later overwritten (zeroed / trimmed / rewritten)
  case "$off" in 1000|$((5 * M))|$((6 * M + 4096))|$((size - 512))|$((8 * M))|$((12 * M))) continue ;; esac
  rcmds+=(-c "read -P $pat $off $len")
done
rcmds+=(-c "read -P 0x11 1000 2000" -c "read -P 0x88 3000 100" -c "read -P 0x11 3100 2900"
        -c "read -P 0 $((5 * M)) $B" -c "read -P 0x66 $((6 * M + 4096)) 904" -c "read -P 0 $((6 * M + 5000)) 1000"
        -c "read -P 0x66 $((6 * M + 6000)) 6288" -c "read -P 0x33 $((size - 512)) 412" -c "read -P 0 $((size - 100)) 100"
        -c "read -P 0 $((3 * M + 100)) 150000" -c "read -P 0 $((8 * M)) $((2 * B))" -c "read -P 0 $((9 * M)) $((3 * B))"
        -c "read -P 0 $((10 * M + 3)) $((2 * B))" -c "read -P 0xbb $((2 * M + 123)) 3000" -c "read -P 0 $((4 * M)) $B"
        -c "read -P 0 $((14 * M)) $((2 * B))")
qemu-io -r -f raw "$LAZYBD_URI" "${rcmds[@]}" > "$T/qemu-io-read.out" 2>&1 ||
  fail "qemu-io read -P failed: $(grep -iv '^read\|ops;' "$T/qemu-io-read.out" | head -n 5 | tr '\n' ' ')"
assert_no_grep 'Pattern verification failed|error|fail' "$T/qemu-io-read.out" "qemu-io read -P"
assert_eq "$(( ${#rcmds[@]} / 2 ))" "$(grep -c '^read ' "$T/qemu-io-read.out")" "qemu-io read -P checks done"
log "qemu-io: $(( ${#rcmds[@]} / 2 )) read -P checks passed"

# ---- the whole export equals the model (untouched ranges = origin)
assert_export_model "$T/model.img" "$LAZYBD_URI" "${loose[@]}"
nbdcopy "$LAZYBD_URI" "$T/copy.img" || fail "nbdcopy (extents) failed"
assert_export_model "$T/model.img" "$T/copy.img" "${loose[@]}"
nbdcopy --no-extents "$LAZYBD_URI" "$T/copy.img" || fail "nbdcopy --no-extents failed"
assert_export_model "$T/model.img" "$T/copy.img" "${loose[@]}"
rm -f "$T/copy.img"

# ---- the origin and the cache are untouched
assert_eq "$origin_sha" "$(sha_file "$T/origin/disk.img")" "origin file sha256 after the writes"
assert_origin_only_read
lazybd_stop
ov=$T/cache/overlays/disk
[[ -f $ov/base ]] || fail "no overlay base record at $ov/base (overlay dir: $(ls "$ov" 2>&1 | tr '\n' ' '))"
assert_grep "disk\.img" "$ov/base" "overlay base record names the origin"
log "overlay $ov: $(ls "$ov" | tr '\n' ' '); base: $(head -n 1 "$ov/base")"
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "cache verify after the writes failed: $out"
log "cache verify: $(echo "$out" | tail -n 1)"

lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
lazybd_stop
