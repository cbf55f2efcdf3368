#!/usr/bin/env bash
# t-55-qcow2: qcow2 templates served as raw disks (--format qcow2), decoded
# as they are read, from an HTTP origin (nginx).
#   1. images qemu-img made every way a template comes (plain v3; zlib- and
#      zstd-compressed; v2 with 4 KiB clusters; extended L2 with
#      subcluster writes, zero clusters and discards made by qemu-io): each
#      export equals `qemu-img convert -O raw` of its image (qemu-img compare
#      -s, and nbdcopy | cmp); block status reports the unallocated and
#      zero parts as holes
#   2. the format is never guessed: without --format a qcow2 image is
#      refused (saying which flag to give); --format auto decodes it and
#      serves a raw image as raw; --format qcow2 refuses a raw image
#   3. refused with a clear error: a backing file (named), LUKS encryption
#   4. a writable export over a compressed template: qemu-io writes read
#      back (also after a restart); the overlay refuses to reopen over the
#      same image as raw (a different disk); the template is unchanged; a
#      second writable export of it (export add) shares its decoded tables
#   5. a VM boots (qemu TCG) with its writable root disk on a compressed
#      qcow2 template
. "$(dirname "$0")/lib.sh"
require_cmd nginx nbdcopy nbdinfo qemu-img qemu-io qemu-system-x86_64
require_nbd_python

O=$T/origin
mkdir -p "$O"
mkimage "$T/disk.img" 40 1234
origin_start "$O" >/dev/null

# ---- 1. qemu-img's images decode to qemu-img's raw conversion
qconv() { # NAME OPTIONS... : $O/NAME.qcow2 from disk.img
  local name=$1; shift
  qemu-img convert -q -f raw -O qcow2 "$@" "$T/disk.img" "$O/$name.qcow2" || fail "qemu-img convert $name"
}
qconv plain
qconv zlib -c
qconv zstd -c -o compression_type=zstd
qconv v2 -o compat=0.10,cluster_size=4k
# Extended L2 entries: a sparse image written by qemu-io, so that
# subclusters are allocated one by one, and zero clusters and holes exist.
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k "$O/subcl.qcow2" 40M
out=$(qemu-io -f qcow2 "$O/subcl.qcow2" \
  -c 'write -P 0x11 0 4k' -c 'write -P 0x22 100k 8k' -c 'write -P 0x33 2M 1M' \
  -c 'write -z 2304k 128k' -c 'write -P 0x44 10M 3M' -c 'discard 11M 256k' \
  -c 'write -P 0x55 39M 4k' 2>&1) || fail "qemu-io on subcl.qcow2: $out"
for name in plain zlib zstd v2 subcl; do
  qemu-img convert -q -f qcow2 -O raw "$O/$name.qcow2" "$T/$name.raw"
  lazybd_start "$ORIGIN_URL/$name.qcow2" --format qcow2 --cache-dir "$T/cache" --control none
  out=$(qemu-img compare -s -f raw -F raw "$T/$name.raw" "$LAZYBD_URI" 2>&1) || fail "$name: qemu-img compare: $out"
  log "$name: qemu-img compare -s: $out"
  assert_same_as_file "$T/$name.raw" "$LAZYBD_URI"
  # Every table is known after a full read: holes are reported.
  holes=$(nbdinfo --map --totals "$LAZYBD_URI" | awk '$3 == 3 || $4 ~ /hole/ {s += $1} END {print s + 0}')
  zero_bytes=$("$NBD_PYTHON" -c '
import sys
d = open(sys.argv[1], "rb").read(); c = 65536
print(sum(c for i in range(0, len(d) - c + 1, c) if not any(d[i:i + c])))' "$T/$name.raw")
  log "$name: block status holes $holes bytes; all-zero 64 KiB chunks in the raw conversion $zero_bytes bytes"
  if [[ $name == subcl ]]; then
    # 40 MiB with about 4.4 MiB written: at least 30 MiB must be holes.
    assert_ge "$holes" $((30 * MIB)) "$name: hole bytes reported"
  elif [[ $name == plain || $name == v2 ]]; then
    # qemu-img convert leaves the all-zero region unallocated.
    assert_ge "$holes" $((ZERO_LEN / 2)) "$name: hole bytes reported"
  fi
  lazybd_stop
done

# ---- 2. the format is never guessed
lazybd_expect_start_failure 20 "$ORIGIN_URL/zlib.qcow2" --cache-dir "$T/cache" --control none \
  --listen "127.0.0.1:$(free_port)"
assert_grep 'is a qcow2 image.*--format qcow2.*--format raw' "$LAZYBD_LOG" "the refusal says which flag to give"
lazybd_start "$ORIGIN_URL/zlib.qcow2" --format auto --cache-dir "$T/cache" --control none
assert_same_as_file "$T/zlib.raw" "$LAZYBD_URI"
lazybd_stop
cp "$T/disk.img" "$O/disk.img"
lazybd_start "$ORIGIN_URL/disk.img" --format auto --cache-dir "$T/cache" --control none
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
lazybd_expect_start_failure 20 "$ORIGIN_URL/disk.img" --format qcow2 --cache-dir "$T/cache" \
  --control none --listen "127.0.0.1:$(free_port)"
assert_grep 'not a qcow2 image' "$LAZYBD_LOG" "--format qcow2 refuses a raw image"

# ---- 3. what lazybd cannot serve is refused, saying why
qemu-img create -q -f qcow2 -b plain.qcow2 -F qcow2 "$O/child.qcow2" || fail "qemu-img create child"
lazybd_expect_start_failure 20 "$ORIGIN_URL/child.qcow2" --format qcow2 --cache-dir "$T/cache" \
  --control none --listen "127.0.0.1:$(free_port)"
assert_grep 'backing file \("plain.qcow2"\)' "$LAZYBD_LOG" "the backing file is named"
qemu-img create -q -f qcow2 --object secret,id=sec0,data=abc123 \
  -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 "$O/luks.qcow2" 16M || fail "qemu-img create luks"
lazybd_expect_start_failure 20 "$ORIGIN_URL/luks.qcow2" --format qcow2 --cache-dir "$T/cache" \
  --control none --listen "127.0.0.1:$(free_port)"
assert_grep 'encrypted.*LUKS' "$LAZYBD_LOG" "encryption is refused"

# ---- 4. a writable export over a compressed template
sha_before=$(sha_file "$O/zstd.qcow2")
lazybd_start "$ORIGIN_URL/zstd.qcow2" --format qcow2 --writable --name vm1 --cache-dir "$T/cache" --control none
cp "$T/zstd.raw" "$T/model.img"
out=$(qemu-io -f raw "$LAZYBD_URI" -c 'write -P 0x5a 4096 65536' -c 'write -P 0xa5 20M 12345' \
  -c 'write -z 30M 1M' -c flush 2>&1) || fail "qemu-io writes: $out"
image_apply "$T/model.img" "w 4096 65536 0x5a" "w $((20 * MIB)) 12345 0xa5" "z $((30 * MIB)) $MIB"
assert_export_model "$T/model.img" "$LAZYBD_URI"
lazybd_stop
ctl=$T/control.sock
lazybd_start "$ORIGIN_URL/zstd.qcow2" --format qcow2 --writable --name vm1 --cache-dir "$T/cache" --control "$ctl"
assert_export_model "$T/model.img" "$LAZYBD_URI"
# A second VM's disk on the same template: its own overlay, the image's
# decoded tables shared (decoded once for both).
out=$("$LAZYBD" export add vm2 --image "$ORIGIN_URL/zstd.qcow2" --format qcow2 --writable \
  --overlay-dir "$T/ov-vm2" --control "$ctl" 2>&1) || fail "export add vm2: $out"
vm2=${LAZYBD_URI%/vm1}/vm2
assert_same_as_file "$T/zstd.raw" "$vm2"
assert_export_model "$T/model.img" "$LAZYBD_URI"
lazybd_stop
assert_eq 1 "$(grep -c 'qcow2 image decoded as the guest' "$LAZYBD_LOG")" \
  "two exports of one qcow2 image decode it once"
lazybd_expect_start_failure 20 "$ORIGIN_URL/zstd.qcow2" --format raw --writable --name vm1 \
  --cache-dir "$T/cache" --control none --listen "127.0.0.1:$(free_port)"
assert_grep 'made over another image' "$LAZYBD_LOG" "the overlay refuses a base that is a different disk"
assert_eq "$sha_before" "$(sha_file "$O/zstd.qcow2")" "the template after writes through lazybd"

# ---- 5. a VM boots from a compressed qcow2 template, root disk writable
boot_image "$T/boot"
qemu-img convert -q -c -f raw -O qcow2 "$BOOT_IMG" "$O/boot.qcow2" || fail "qemu-img convert boot"
log "boot template: $(stat -c %s "$BOOT_IMG") raw bytes, $(stat -c %s "$O/boot.qcow2") as compressed qcow2"
lazybd_start "$ORIGIN_URL/boot.qcow2" --format qcow2 --writable --name boot --cache-dir "$T/cache" --control none
BOOT_READONLY=off boot_vm "$LAZYBD_URI"
assert_booted
[[ $BOOT_WROTE == "$BOOT_WRITE_OFF":* ]] || fail "the guest did not report its write ($BOOT_LINE)"
out=$("$NBD_PYTHON" - "$LAZYBD_URI" "$BOOT_WRITE_OFF" "LAZYBD-WRITE ${BOOT_WROTE#*:}" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
got = h.pread(4096, int(sys.argv[2])); h.shutdown()
want = sys.argv[3].encode() + b"\n"
print(f"record: {got[:len(want)]!r}")
sys.exit(0 if got.startswith(want) else 1)
PY
) || fail "the guest's write does not read back: $out"
lazybd_stop
log "VM booted from a compressed qcow2 template in ${BOOT_S}s; wrote $BOOT_WROTE"
