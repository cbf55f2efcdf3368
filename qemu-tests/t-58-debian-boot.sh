#!/usr/bin/env bash
# t-58-debian-boot: a real distribution boots from lazybd (qemu-system-x86_64,
# TCG). The image (qemu-tests/debian-image.sh, cached between runs) is a
# 4 GiB Debian bookworm disk: SeaBIOS loads GRUB from the MBR gap, GRUB the
# cloud kernel and initramfs from ext4, and systemd (with udev, journald,
# dbus, logind) brings the system up; a service then checks a 24 MiB
# payload's sha256, prints LAZYBD-DEBIAN-OK on the serial console and powers
# off. Writes of the guest stay in qemu's snapshot overlay.
#  - reference: the image booted from the local file. It gives the time a
#    boot costs without any network (the cold boot's overhead is reported
#    against it) and, if only the cold boot failed, shows that the image is
#    fine; about a quarter of the test's run time. DEBIAN_LOCAL=0 skips it.
#  - cold: lazybd with an empty cache, nginx origin on loopback, boots it
#    within 300 s. Reported: time to the marker, bytes the guest read
#    (/metrics), origin requests and bytes (nginx access log); asserted: the
#    marker with the right sha, systemd as PID 1 with udev running, no byte
#    fetched twice from the origin, origin bytes no more than the image.
#  - qcow2: the same system as a zlib-compressed qcow2 template (qemu-img
#    convert -c, how image services and distributions ship them) served
#    with --format qcow2, cold: boots with the right sha, systemd and udev;
#    no byte fetched twice, origin bytes no more than the qcow2 file.
# The first run builds the image (about a minute plus ~150 MiB of package
# downloads; needs root), hence the longer timeout.
# run.sh timeout: 900
. "$(dirname "$0")/lib.sh"
require_cmd nginx nbdinfo curl qemu-system-x86_64

t_img=$SECONDS
debian_image "$T/origin"
log "image ready in $((SECONDS - t_img)) s: $(tr '\n' ' ' <"$DEBIAN_IMG.meta")"
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/debian.img
size=$(stat -c %s "$DEBIAN_IMG")
mtime=$(stat -c %Y "$DEBIAN_IMG")
payload=$(( $(sed -n 's/^payload_mib=//p' "$DEBIAN_IMG.meta") * MIB ))
mport=$(free_port)

assert_genuine() {  # the marker line says systemd, udev
  [[ $DEBIAN_LINE == *" pid1=systemd "* ]] || fail "PID 1 is not systemd: $DEBIAN_LINE"
  [[ $DEBIAN_LINE == *" udevd=active "* ]] || fail "systemd-udevd is not active: $DEBIAN_LINE"
  log "guest: $DEBIAN_LINE"
}

# ---- reference: the local file
local_s=skipped
if [[ ${DEBIAN_LOCAL:-1} == 1 ]]; then
  debian_boot_vm "$DEBIAN_IMG" 300
  assert_booted
  assert_genuine
  local_s=$BOOT_S
fi

# ---- cold through lazybd
m0=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/cache" --control none --no-profile --metrics "127.0.0.1:$mport"
debian_boot_vm "$LAZYBD_URI" 300
assert_booted
assert_genuine
cold_s=$BOOT_S cold_init_s=$BOOT_INIT_S
read_bytes=$(lazybd_metric "$mport" lazybd_read_bytes_total)
read_reqs=$(lazybd_metric "$mport" lazybd_read_requests_total)
lazybd_stop
cold_reqs=$(origin_data_requests_since "$m0" /debian.img)
cold_bytes=$(origin_bytes_since "$m0" /debian.img)
read -r uniq dup nranges < <(origin_ranges_since "$m0" /debian.img)
log "cold boot: ${cold_s}s (systemd up at ${cold_init_s}s; local file ${local_s}s); guest read $read_bytes bytes" \
  "in $read_reqs requests; origin: $cold_reqs data requests, $cold_bytes bytes ($uniq distinct, $dup fetched twice)"
log "cold summary: $(lazybd_summary)"
[[ -n $read_bytes ]] || fail "no lazybd_read_bytes_total in /metrics"
assert_ge "$read_bytes" "$payload" "bytes the guest read (the payload alone is $payload)"
assert_ge "$cold_reqs" 1 "origin data requests of a cold boot"
assert_eq 0 "$dup" "bytes the origin sent twice during the cold boot"
assert_le "$cold_bytes" "$size" "origin bytes of a cold boot"
assert_eq "$mtime" "$(stat -c %Y "$DEBIAN_IMG")" "mtime of the image file after the boots"
assert_origin_only_read

# ---- qcow2 template, cold
t_conv=$SECONDS
qemu-img convert -q -m 2 -W -c -f raw -O qcow2 "$DEBIAN_IMG" "$T/origin/debian.qcow2" ||
  fail "qemu-img convert -c of the Debian image failed"
qsize=$(stat -c %s "$T/origin/debian.qcow2")
log "qcow2 template: $qsize bytes (zlib clusters), converted in $((SECONDS - t_conv)) s"
m1=$(origin_mark)
lazybd_start "$ORIGIN_URL/debian.qcow2" --format qcow2 --cache-dir "$T/cache-qcow2" --control none --no-profile
debian_boot_vm "$LAZYBD_URI" 300
assert_booted
assert_genuine
qcow2_s=$BOOT_S
lazybd_stop
q_bytes=$(origin_bytes_since "$m1" /debian.qcow2)
read -r _ q_dup _ < <(origin_ranges_since "$m1" /debian.qcow2)
log "qcow2 cold boot: ${qcow2_s}s; origin $q_bytes bytes of the $qsize-byte file ($q_dup fetched twice)"
assert_eq 0 "$q_dup" "bytes the origin sent twice during the qcow2 boot"
assert_le "$q_bytes" "$qsize" "origin bytes of the qcow2 boot"
assert_origin_only_read

log "RESULT debian boot: local ${local_s}s, cold ${cold_s}s, qcow2 ${qcow2_s}s; guest read $((read_bytes / 1024)) KiB in $read_reqs requests;" \
  "origin $cold_reqs requests, $((cold_bytes / 1024)) KiB ($(awk -v o="$cold_bytes" -v g="$read_bytes" 'BEGIN{printf "%.2f", o / g}')x guest bytes)"
