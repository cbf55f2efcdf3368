#!/usr/bin/env bash
# qemu-tests/debian-image.sh — build a real, systemd-based Debian disk image for
# the distribution boot test (t-58) and benchmark (bench/realboot.sh), from
# Debian packages: debootstrap onto an ext4 partition of a loop device, GRUB
# from the host's grub-pc-bin installed on that loop device. Needs root
# (loop devices, mounts, chroot).
#
# The disk: DEBIAN_SIZE_MIB (4 GiB) raw, sparse, MBR with one bootable ext4
# root partition from 1 MiB to the end. GRUB (i386-pc) in the MBR gap boots
# the Debian cloud kernel with its initramfs (initramfs-tools) on
# console=ttyS0. Userspace is Debian DEBIAN_SUITE (bookworm), variant minbase
# plus systemd-sysv, udev and dbus: systemd is PID 1, udev and journald run,
# dbus and logind start as usual. Units that only slow a TCG boot and do
# nothing for a VM without network or users are masked (timers of apt,
# e2scrub, fstrim, dpkg; timesyncd; the gettys; networkd's wait-online); the
# journal stays in memory. /opt/lazybd/payload.bin holds DEBIAN_PAYLOAD_MIB
# (24) MiB of random bytes; its sha256 is baked into the image.
#
# On the serial console the guest prints
#   LAZYBD-DEBIAN-INIT t=<uptime>      early in sysinit: systemd on the real root
#                                      (firmware, GRUB, kernel, initramfs done)
#   LAZYBD-DEBIAN-OK data=<sha256> t=<uptime> pid1=systemd udevd=active dbus=active failed=<units|none>
#   (LAZYBD-DEBIAN-BAD ... when the payload's checksum is not the recorded one)
# from lazybd-check.service (After=local-fs.target and multi-user.target, so
# once the system is up), then powers off (systemctl poweroff).
#
# The root file system is mounted read-write, so boot it from a writable disk
# whose writes go nowhere: qemu's snapshot=on (what qemu-tests/lib.sh's
# debian_boot_vm does); the image itself and a lazybd export stay read-only.
#
# Usage: qemu-tests/debian-image.sh OUT.img
# Writes OUT.img (a sparse copy) and OUT.img.meta (key=value: stamp,
# data_sha256, payload_path, payload_mib, size_mib, kernel, root_uuid,
# allocated_bytes, build_s). Built once per stamp (DEBIAN_IMG_VERSION, suite,
# sizes, packages) into $BOOTIMG_CACHE/debian/ (the cache of
# qemu-tests/boot-image.sh) in a temp dir and moved there atomically; later
# calls only copy it (cp --sparse=always). Two concurrent calls wait for one
# another (flock). Building: about a minute on 2 cores, plus the downloads
# (~150 MiB of packages on the first run, kept in $BOOTIMG_CACHE/debian/debs).
#
# Env:
#   DEBIAN_SUITE        bookworm
#   DEBIAN_MIRROR       the Debian mirror apt already uses (else deb.debian.org)
#   DEBIAN_SIZE_MIB     4096
#   DEBIAN_PAYLOAD_MIB  24
#   BOOTIMG_CACHE       as qemu-tests/boot-image.sh
#   DEBIAN_REBUILD=1    build again even if the cache has this stamp
# Needs: debootstrap grub-pc-bin grub2-common e2fsprogs fdisk util-linux
# (scripts/install-deps.sh; this script installs them too, as root).
set -euo pipefail
umask 022
out=${1:?usage: debian-image.sh OUT.img}

# Bump when the image changes in a way the variables below do not capture:
# every cache then builds it again.
DEBIAN_IMG_VERSION=1
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_SIZE_MIB=${DEBIAN_SIZE_MIB:-4096}
DEBIAN_PAYLOAD_MIB=${DEBIAN_PAYLOAD_MIB:-24}
INCLUDE=systemd-sysv,udev,dbus,linux-image-cloud-amd64,initramfs-tools,zstd
MASK="apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer
      dpkg-db-backup.timer man-db.timer logrotate.timer systemd-timesyncd.service
      systemd-networkd-wait-online.service getty@tty1.service serial-getty@ttyS0.service
      systemd-firstboot.service"

say() { echo "debian-image: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

if [[ -z ${BOOTIMG_CACHE:-} ]]; then
  BOOTIMG_CACHE=/var/cache/lazybd-tests/bootimg
  if ! mkdir -p "$BOOTIMG_CACHE" 2>/dev/null || [[ ! -w $BOOTIMG_CACHE ]]; then
    BOOTIMG_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/lazybd-tests/bootimg
  fi
fi
cache=$BOOTIMG_CACHE/debian
mkdir -p "$cache/debs"

stamp=$(printf '%s\n' "v=$DEBIAN_IMG_VERSION" "suite=$DEBIAN_SUITE" "size=$DEBIAN_SIZE_MIB" \
  "payload=$DEBIAN_PAYLOAD_MIB" "include=$INCLUDE" "mask=$(echo $MASK)" | sha256sum | cut -c1-16)
cached=$cache/$stamp.img

meta_get() {  # FILE KEY
  sed -n "s/^$2=//p" "$1" 2>/dev/null | head -n 1
}

copy_out() {
  if [[ -f $out && $(meta_get "$out.meta" stamp) == "$stamp" ]]; then
    say "$out is up to date (stamp $stamp)"
    return 0
  fi
  mkdir -p "$(dirname "$out")"
  cp --sparse=always "$cached" "$out.tmp"
  chmod 0644 "$out.tmp"
  cp "$cached.meta" "$out.meta.tmp"
  mv -f "$out.tmp" "$out"
  mv -f "$out.meta.tmp" "$out.meta"
  say "$out: stamp $stamp, payload sha256 $(meta_get "$out.meta" data_sha256)"
}

if [[ ${DEBIAN_REBUILD:-0} != 1 && -f $cached && -f $cached.meta ]]; then
  copy_out; exit 0
fi

# ---------------------------------------------------------------- build
((EUID == 0)) || die "building the image needs root (loop devices, mount, chroot)"
tools_missing() {
  local b
  for b in debootstrap grub-install mkfs.ext4 e2fsck sfdisk losetup partx chroot fstrim; do
    command -v "$b" >/dev/null 2>&1 || { echo "$b"; return 0; }
  done
  [[ -e /usr/lib/grub/i386-pc/boot.img ]] || { echo grub-pc-bin; return 0; }
  return 1
}
if m=$(tools_missing); then
  say "missing $m: installing debootstrap grub-pc-bin grub2-common e2fsprogs fdisk util-linux"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    debootstrap grub-pc-bin grub2-common e2fsprogs fdisk util-linux >/dev/null ||
    die "apt-get install failed"
  m=$(tools_missing) && die "still missing $m"
fi

exec 9>"$cache/.lock"
flock 9   # one build at a time; the other caller then finds the image built
if [[ ${DEBIAN_REBUILD:-0} != 1 && -f $cached && -f $cached.meta ]]; then
  copy_out; exit 0
fi

if [[ -z ${DEBIAN_MIRROR:-} ]]; then
  DEBIAN_MIRROR=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [[ -n $DEBIAN_MIRROR ]] || DEBIAN_MIRROR=$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
fi

t0=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/lazybd-debimg.XXXXXX")
mnt=$work/root
loop=""
mounts=()   # mounted points, unmounted in reverse order at exit
cleanup() {
  local rc=$? i
  set +e
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount "${mounts[i]}" 2>/dev/null || umount -l "${mounts[i]}" 2>/dev/null
  done
  if [[ -n $loop ]]; then
    partx -d "$loop" 2>/dev/null
    losetup -d "$loop" 2>/dev/null
  fi
  rm -rf "$work"
  [[ -n ${part:-} ]] && rm -f "$part"
  ((rc == 0)) || say "build failed (exit $rc); loop device and mounts released"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
mkdir -p "$mnt"

# --- disk: MBR, one bootable Linux partition from 1 MiB to the end
img=$work/disk.img
truncate -s "${DEBIAN_SIZE_MIB}M" "$img"
printf 'label: dos\nstart=1MiB, type=83, bootable\n' | sfdisk -q "$img"
loop=$(losetup -f --show -P "$img")
# this kernel does not scan partition tables itself: add the partition
[[ -b ${loop}p1 ]] || partx --add "$loop"
for _ in $(seq 50); do [[ -b ${loop}p1 ]] && break; sleep 0.1; done
[[ -b ${loop}p1 ]] || die "no ${loop}p1 after partx --add"
uuid=$(cat /proc/sys/kernel/random/uuid)
# inode tables and journal written now (no lazy init in the guest);
# features GRUB 2.06 and the 6.1 kernel both read
mkfs.ext4 -q -F -L lazybd-root -U "$uuid" -O ^orphan_file,^metadata_csum_seed \
  -E lazy_itable_init=0,lazy_journal_init=0 "${loop}p1"
mount "${loop}p1" "$mnt"; mounts+=("$mnt")

# --- Debian
say "debootstrap $DEBIAN_SUITE (minbase + $INCLUDE) from $DEBIAN_MIRROR"
debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$cache/debs" \
  "$DEBIAN_SUITE" "$mnt" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 ||
  { tail -n 20 "$work/debootstrap.log" >&2; [[ -f $mnt/debootstrap/debootstrap.log ]] && tail -n 20 "$mnt/debootstrap/debootstrap.log" >&2; die "debootstrap failed"; }
kver=$(ls "$mnt"/lib/modules | sort -V | tail -n 1)
[[ -n $kver && -f $mnt/boot/vmlinuz-$kver ]] || die "no kernel in the image"

# --- configuration
echo lazybd-debian >"$mnt/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 lazybd-debian\n' >"$mnt/etc/hosts"
printf 'UUID=%s / ext4 defaults,noatime 0 0\n' "$uuid" >"$mnt/etc/fstab"
# a fixed machine id: no first-boot machinery (every VM of the image shares it)
printf '%s\n' "$(printf 'lazybd-debian-%s' "$stamp" | md5sum | cut -c1-32)" >"$mnt/etc/machine-id"
mkdir -p "$mnt/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$mnt/etc/systemd/journald.conf.d/lazybd.conf"
ln -sf /lib/systemd/system/multi-user.target "$mnt/etc/systemd/system/default.target"
for u in $MASK; do ln -sf /dev/null "$mnt/etc/systemd/system/$u"; done

# initramfs: only what finds and mounts an ext4 root on virtio-blk
sed -i 's/^MODULES=.*/MODULES=list/; s/^COMPRESS=.*/COMPRESS=zstd/' "$mnt/etc/initramfs-tools/initramfs.conf"
printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic >>"$mnt/etc/initramfs-tools/modules"

# --- the payload and the check service
mkdir -p "$mnt/opt/lazybd"
head -c $((DEBIAN_PAYLOAD_MIB * 1024 * 1024)) /dev/urandom >"$mnt/opt/lazybd/payload.bin"
sha=$(sha256sum "$mnt/opt/lazybd/payload.bin" | cut -d' ' -f1)
echo "$sha  /opt/lazybd/payload.bin" >"$mnt/opt/lazybd/payload.sha256"
cat >"$mnt/usr/local/sbin/lazybd-init-mark" <<'EOF'
#!/bin/sh
echo "LAZYBD-DEBIAN-INIT t=$(cut -d' ' -f1 /proc/uptime)" >/dev/ttyS0
EOF
cat >"$mnt/usr/local/sbin/lazybd-check" <<'EOF'
#!/bin/sh
# Check the payload against its recorded sha256, say so on the serial
# console, power off.
want=$(cut -d' ' -f1 /opt/lazybd/payload.sha256)
got=$(sha256sum /opt/lazybd/payload.bin | cut -d' ' -f1)
pid1=$(cat /proc/1/comm)
udevd=$(systemctl is-active systemd-udevd.service)
dbus=$(systemctl is-active dbus.service)
failed=$(systemctl list-units --failed --plain --no-legend | awk '{printf "%s%s", s, $1; s=","}')
if [ "$got" = "$want" ]; then r=OK; else r=BAD; fi
echo "LAZYBD-DEBIAN-$r data=$got t=$(cut -d' ' -f1 /proc/uptime) pid1=$pid1 udevd=$udevd dbus=$dbus failed=${failed:-none}" >/dev/ttyS0
systemctl --no-block poweroff
EOF
chmod 0755 "$mnt/usr/local/sbin/lazybd-init-mark" "$mnt/usr/local/sbin/lazybd-check"
cat >"$mnt/etc/systemd/system/lazybd-init-mark.service" <<'EOF'
[Unit]
Description=lazybd boot test: systemd is up on the root file system
DefaultDependencies=no
After=systemd-journald.socket
Before=sysinit.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/lazybd-init-mark

[Install]
WantedBy=sysinit.target
EOF
cat >"$mnt/etc/systemd/system/lazybd-check.service" <<'EOF'
[Unit]
Description=lazybd boot test: payload checksum, serial marker, power off
After=local-fs.target multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/lazybd-check

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$mnt/etc/systemd/system/sysinit.target.wants" "$mnt/etc/systemd/system/multi-user.target.wants"
ln -sf ../lazybd-init-mark.service "$mnt/etc/systemd/system/sysinit.target.wants/lazybd-init-mark.service"
ln -sf ../lazybd-check.service "$mnt/etc/systemd/system/multi-user.target.wants/lazybd-check.service"

# --- initramfs again with the configuration above (chroot with /dev, /proc, /sys)
for d in dev proc sys; do
  mount --bind "/$d" "$mnt/$d"; mounts+=("$mnt/$d")
done
chroot "$mnt" update-initramfs -u -k "$kver" >"$work/initramfs.log" 2>&1 ||
  { tail -n 20 "$work/initramfs.log" >&2; die "update-initramfs failed"; }
for d in sys proc dev; do umount "$mnt/$d"; unset 'mounts[-1]'; done
rm -rf "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/lib/apt/lists/* "$mnt"/debootstrap

# --- GRUB in the MBR gap, its modules and a fixed grub.cfg in /boot/grub
grub-install --target=i386-pc --boot-directory="$mnt/boot" --modules="part_msdos ext2" \
  --no-floppy "$loop" >"$work/grub.log" 2>&1 || { cat "$work/grub.log" >&2; die "grub-install failed"; }
cat >"$mnt/boot/grub/grub.cfg" <<EOF
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
insmod part_msdos
insmod ext2
set root=(hd0,msdos1)
linux /boot/vmlinuz-$kver root=UUID=$uuid ro console=ttyS0,115200 quiet loglevel=3 panic=-1
initrd /boot/initrd.img-$kver
boot
EOF
rm -f "$mnt"/boot/grub/i386-pc/*.mod.sig 2>/dev/null || true

fstrim "$mnt" >/dev/null 2>&1 || true   # blocks freed by the install
umount "$mnt"; unset 'mounts[-1]'
e2fsck -fn "${loop}p1" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log" >&2; die "e2fsck found errors"; }
partx -d "$loop" 2>/dev/null || true
losetup -d "$loop"; loop=""

# zeros written through the loop device stay allocated: copy sparsely (into
# the cache's directory, so that the last step is a rename)
part=$cache/.$stamp.img.part.$$
cp --sparse=always "$img" "$part"
rm -f "$img"
chmod 0644 "$part"
alloc=$(( $(stat -c %b "$part") * 512 ))
cat >"$work/meta" <<EOF
stamp=$stamp
version=$DEBIAN_IMG_VERSION
suite=$DEBIAN_SUITE
data_sha256=$sha
payload_path=/opt/lazybd/payload.bin
payload_mib=$DEBIAN_PAYLOAD_MIB
size_mib=$DEBIAN_SIZE_MIB
kernel=$kver
root_uuid=$uuid
allocated_bytes=$alloc
build_s=$((SECONDS - t0))
EOF
# keep only this image (older ones unless one was used in the last hour)
find "$cache" -maxdepth 1 \( -name '*.img' -o -name '*.img.meta' \) ! -name "$stamp.img*" -amin +60 -delete 2>/dev/null || true
mv -f "$work/meta" "$cached.meta.tmp"
mv -f "$part" "$cached"
mv -f "$cached.meta.tmp" "$cached.meta"
say "built $cached in $((SECONDS - t0)) s: ${DEBIAN_SIZE_MIB} MiB, $((alloc >> 20)) MiB allocated, kernel $kver, payload ${DEBIAN_PAYLOAD_MIB} MiB sha256=$sha"
copy_out
