#!/usr/bin/env bash
# qemu-tests/boot-image.sh — build a small BIOS-bootable raw disk image for the
# boot tests (t-50, t-51) and the boot benchmark (bench/boot.sh), from Debian
# packages only: no mounts, no loop devices, nothing installed from the kernel
# package (apt-get download + dpkg-deb -x).
#
# Layout (MiB):  0: MBR (syslinux mbr.bin) + partition table
#                1: partition 1, FAT, bootable: syslinux, the Debian cloud
#                   kernel, a busybox-static initramfs with the virtio modules
#                P2: partition 2, DATA_MIB of random bytes
#                H: one 4 KiB "hold" slot, H = W - 4096 (zero in the image)
#                W: one 4 KiB "write record" slot (zero in the image)
#                ... zeros up to SIZE_MIB (holes for the server)
# At boot SeaBIOS reads syslinux, kernel and initrd through the disk (so
# through NBD when the disk is an NBD export); /init then loads virtio_blk,
# reads /dev/vda2 through the guest block layer and checks its sha256 (baked
# into the initramfs). If the disk is writable it also writes a 4 KiB record
# "LAZYBD-WRITE <uuid>" at byte offset W and reads it back. It prints on ttyS0
#   LAZYBD-BOOT-INIT t=<uptime>
#   LAZYBD-BOOT-WROTE off=<W> id=<uuid>                      (writable disk only)
#   LAZYBD-BOOT-OK data=<sha256> rw=<0|1> t=<uptime>         (or LAZYBD-BOOT-FAIL ...)
# and powers off, unless the 4 KiB at byte offset H (read with O_DIRECT, so
# what the disk has now) start with "LAZYBD-HOLD": then it prints
#   LAZYBD-BOOT-HOLD t=<uptime>
# and sleeps forever, the kernel up (t-45 writes that slot into its writable
# export to hot-plug disks into a running guest). The image never has it, so
# a plain boot powers off. qemu-tests/boot.sh boots it and waits for the marker.
#
# Usage: qemu-tests/boot-image.sh OUT.img
# Writes OUT.img and OUT.img.meta (key=value: stamp, data_sha256, data_offset,
# data_mib, write_offset, hold_offset, size_mib, kernel, boot_mib). OUT is kept as it is when
# its .meta has the stamp of the current inputs; otherwise it is copied from the
# image cache, or built (~10 s, plus the kernel download on the first run).
#
# Env:
#   DATA_MIB       size of the checked data partition (default 16)
#   SIZE_MIB       total image size, zero tail (default 64)
#   KPKG           kernel meta package (default linux-image-cloud-amd64)
#   BOOTIMG_CACHE  downloads, extracted kernel, built images (default
#                  /var/cache/lazybd-tests/bootimg if writable, else
#                  ${XDG_CACHE_HOME:-~/.cache}/lazybd-tests/bootimg)
#   BOOTIMG_REFRESH=1  download the kernel again (a newer one changes the stamp)
# Needs: syslinux syslinux-common mtools dosfstools fdisk cpio busybox-static
# (scripts/install-deps.sh installs them; this script does too, as root, if one
# is missing).
set -euo pipefail
umask 022
out=${1:?usage: boot-image.sh OUT.img}
DATA_MIB=${DATA_MIB:-16}
SIZE_MIB=${SIZE_MIB:-64}
KPKG=${KPKG:-linux-image-cloud-amd64}
self=$(readlink -f "${BASH_SOURCE[0]}")

say() { echo "boot-image: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

if [[ -z ${BOOTIMG_CACHE:-} ]]; then
  BOOTIMG_CACHE=/var/cache/lazybd-tests/bootimg
  if ! mkdir -p "$BOOTIMG_CACHE" 2>/dev/null || [[ ! -w $BOOTIMG_CACHE ]]; then
    BOOTIMG_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/lazybd-tests/bootimg
  fi
fi
mkdir -p "$BOOTIMG_CACHE"/{deb,images}

# ---------------------------------------------------------------- tools
MBR=/usr/lib/syslinux/mbr/mbr.bin
tools_missing() {
  local b
  for b in syslinux mcopy mkfs.vfat sfdisk cpio gzip dpkg-deb apt-get; do
    command -v "$b" >/dev/null 2>&1 || { echo "$b"; return 0; }
  done
  [[ -f $MBR ]] || { echo "$MBR"; return 0; }
  # the initramfs needs a static busybox with sha256sum
  if [[ ! -x /bin/busybox ]] ||
     ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
     ! /bin/busybox --list | grep -qx sha256sum; then
    echo "busybox-static"; return 0
  fi
  return 1
}
if m=$(tools_missing); then
  [[ $(id -u) == 0 ]] || die "missing $m; run scripts/install-deps.sh as root"
  say "missing $m: installing syslinux, mtools, dosfstools, fdisk, cpio, busybox-static"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    syslinux syslinux-common mtools dosfstools fdisk cpio busybox-static >/dev/null ||
    die "apt-get install failed"
  m=$(tools_missing) && die "still missing $m"
fi

exec 9>"$BOOTIMG_CACHE/.lock"
flock 9   # one build at a time per cache (a test and the bench may run together)

# ---------------------------------------------------------------- kernel
kdir=$BOOTIMG_CACHE/kernel
if [[ ${BOOTIMG_REFRESH:-0} == 1 ]] || ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
  say "downloading $KPKG (apt-get download, not installed) into $BOOTIMG_CACHE/deb"
  (
    cd "$BOOTIMG_CACHE/deb"
    rm -f ./*.deb
    apt-get download -q "$KPKG" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 || true; apt-get download -q "$KPKG" >/dev/null; } ||
      { echo "apt-get download $KPKG failed" >&2; exit 1; }
    dep=$(dpkg-deb -f "$KPKG"_*.deb Depends | grep -o 'linux-image-[^ ,]*' | head -n 1)
    [[ -n $dep ]] || { echo "$KPKG has no linux-image-* dependency" >&2; exit 1; }
    apt-get download -q "$dep" >/dev/null
    rm -rf "$kdir.tmp" && dpkg-deb -x "$dep"_*.deb "$kdir.tmp"
    rm -rf "$kdir" && mv "$kdir.tmp" "$kdir"
  ) || die "cannot fetch the kernel package"
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -n 1)
moddir=$(ls -d "$kdir"/lib/modules/* | head -n 1)
kver=$(basename "$moddir")

# ---------------------------------------------------------------- stamp
# Everything the image depends on; the random data is drawn once per stamp.
stamp=$( {
  sha256sum "$self" | cut -d' ' -f1
  echo "data=$DATA_MIB size=$SIZE_MIB kpkg=$KPKG kver=$kver"
  sha256sum "$vmlinuz" /bin/busybox "$MBR" | cut -d' ' -f1
  syslinux --version 2>&1 | head -n 1
} | sha256sum | cut -c1-16)

meta_get() {  # FILE KEY
  sed -n "s/^$2=//p" "$1" 2>/dev/null | head -n 1
}

if [[ -f $out && $(meta_get "$out.meta" stamp) == "$stamp" ]]; then
  say "$out is up to date (stamp $stamp)"
  exit 0
fi

cached=$BOOTIMG_CACHE/images/$stamp.img
if [[ ! -f $cached || ! -f $cached.meta ]]; then
  t0=$SECONDS
  work=$(mktemp -d "${TMPDIR:-/tmp}/lazybd-bootimg.XXXXXX")
  trap 'rm -rf "$work"' EXIT

  # --- data partition with known content
  head -c $((DATA_MIB * 1024 * 1024)) /dev/urandom >"$work/data.img"
  sha=$(sha256sum "$work/data.img" | cut -d' ' -f1)

  # --- initramfs: busybox-static, the virtio modules, /init. The write
  # slot is the last MiB of the image, the hold slot the 4 KiB before it
  # (both zero in the image).
  woff=$(( (SIZE_MIB - 1) * 1024 * 1024 ))
  hoff=$((woff - 4096))
  ir=$work/initrd
  mkdir -p "$ir"/{bin,dev,proc,sys,lib/modules}
  cp /bin/busybox "$ir/bin/busybox"
  mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
  for m in $mods; do
    f=$(find "$moddir" -name "$m.ko*" | head -n 1)
    [[ -n $f ]] || continue   # built into the kernel
    case $f in
      *.xz) xz -dc "$f" >"$ir/lib/modules/$m.ko" ;;
      *.zst) zstd -dcq "$f" >"$ir/lib/modules/$m.ko" ;;
      *.gz) gzip -dc "$f" >"$ir/lib/modules/$m.ko" ;;
      *) cp "$f" "$ir/lib/modules/$m.ko" ;;
    esac
  done
  cat >"$ir/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
up() { cut -d' ' -f1 /proc/uptime; }
echo "LAZYBD-BOOT-INIT t=\$(up)"
for m in $mods; do [ -f /lib/modules/\$m.ko ] && insmod /lib/modules/\$m.ko 2>/dev/null; done
i=0; while [ ! -b /dev/vda2 ] && [ \$i -lt 200 ]; do sleep 0.05; i=\$((i+1)); done
got=\$(dd if=/dev/vda2 bs=1M count=$DATA_MIB 2>/dev/null | sha256sum | cut -d' ' -f1)
rw=0; [ "\$(cat /sys/block/vda/ro 2>/dev/null)" = 0 ] && rw=1
why=""
[ "\$got" = "$sha" ] || why="data mismatch"
if [ -z "\$why" ] && [ \$rw = 1 ]; then
  id=\$(cat /proc/sys/kernel/random/uuid)
  echo "LAZYBD-WRITE \$id" | dd of=/dev/vda bs=4096 seek=$((woff / 4096)) count=1 conv=notrunc,sync,fsync 2>/dev/null
  echo 3 > /proc/sys/vm/drop_caches
  back=\$(dd if=/dev/vda bs=4096 skip=$((woff / 4096)) count=1 iflag=direct 2>/dev/null | head -n 1 | tr -d '\0')
  if [ "\$back" = "LAZYBD-WRITE \$id" ]; then echo "LAZYBD-BOOT-WROTE off=$woff id=\$id"; else why="write readback '\$back'"; fi
fi
if [ -z "\$why" ]; then
  echo "LAZYBD-BOOT-OK data=\$got rw=\$rw t=\$(up)"
else
  echo "LAZYBD-BOOT-FAIL \$why data=\$got want=$sha rw=\$rw t=\$(up)"
fi
sync
hold=\$(dd if=/dev/vda bs=4096 skip=$((hoff / 4096)) count=1 iflag=direct 2>/dev/null | head -c 11 | tr -d '\0')
if [ "\$hold" = LAZYBD-HOLD ]; then
  echo "LAZYBD-BOOT-HOLD t=\$(up)"
  while :; do sleep 3600; done
fi
poweroff -f
echo o > /proc/sysrq-trigger
EOF
  chmod +x "$ir/init"
  (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -9) >"$work/initrd.gz"
  irkb=$(( $(stat -c %s "$work/initrd.gz") / 1024 ))

  # --- layout (MiB): 1 MiB gap | boot (kernel + initrd + 1 MiB) | data | zeros,
  # hold slot in the last 4 KiB of the MiB before the write slot, write slot last
  boot_mib=$(( ( $(stat -c %s "$vmlinuz") / 1024 + irkb + 1024 + 1023) / 1024 ))
  p1=1; p2=$((p1 + boot_mib)); end=$((p2 + DATA_MIB))
  ((SIZE_MIB >= end + 2)) || die "SIZE_MIB=$SIZE_MIB too small (need >= $((end + 2)): zero MiB for the hold slot, then the write slot)"
  ((hoff >= end * 1024 * 1024)) || die "hold slot at $hoff overlaps the data partition (ends at $((end * 1024 * 1024)))"

  # --- boot partition (FAT) with syslinux
  truncate -s "${boot_mib}M" "$work/boot.img"
  mkfs.vfat -n LAZYBDBOOT "$work/boot.img" >/dev/null
  cat >"$work/syslinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT lazybd
PROMPT 0
TIMEOUT 0
LABEL lazybd
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0,115200 quiet loglevel=3 panic=-1
EOF
  export MTOOLS_SKIP_CHECK=1
  mcopy -i "$work/boot.img" "$vmlinuz" ::/vmlinuz
  mcopy -i "$work/boot.img" "$work/initrd.gz" ::/initrd.gz
  mcopy -i "$work/boot.img" "$work/syslinux.cfg" ::/syslinux.cfg
  syslinux --install "$work/boot.img"

  # --- assemble
  img=$work/img
  truncate -s "${SIZE_MIB}M" "$img"
  printf 'label: dos\n%s\n%s\n' \
    "start=${p1}MiB, size=${boot_mib}MiB, type=6, bootable" \
    "start=${p2}MiB, size=${DATA_MIB}MiB, type=83" | sfdisk -q "$img"
  dd if="$MBR" of="$img" bs=440 count=1 conv=notrunc status=none
  dd if="$work/boot.img" of="$img" bs=1M seek=$p1 conv=notrunc status=none
  dd if="$work/data.img" of="$img" bs=1M seek=$p2 conv=notrunc status=none
  chmod 0644 "$img"
  cat >"$work/meta" <<EOF
stamp=$stamp
data_sha256=$sha
data_offset=$((p2 * 1024 * 1024))
data_mib=$DATA_MIB
write_offset=$woff
hold_offset=$hoff
size_mib=$SIZE_MIB
boot_mib=$boot_mib
kernel=$kver
kernel_file=$(basename "$vmlinuz")
initrd_kib=$irkb
EOF
  # keep only the latest few built images
  find "$BOOTIMG_CACHE/images" -name '*.img' -printf '%T@ %p\n' | sort -rn | tail -n +4 |
    while read -r _ f; do rm -f "$f" "$f.meta"; done
  mv -f "$work/meta" "$cached.meta"
  mv -f "$img" "$cached"
  say "built $cached in $((SECONDS - t0)) s: ${SIZE_MIB} MiB, boot ${boot_mib} MiB (kernel $kver), data ${DATA_MIB} MiB at $((p2)) MiB sha256=$sha"
fi

mkdir -p "$(dirname "$out")"
cp --sparse=always "$cached" "$out.tmp"
chmod 0644 "$out.tmp"
cp "$cached.meta" "$out.meta.tmp"
mv -f "$out.tmp" "$out"
mv -f "$out.meta.tmp" "$out.meta"
say "$out: stamp $stamp, data sha256 $(meta_get "$out.meta" data_sha256)"
