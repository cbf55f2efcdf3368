#!/usr/bin/env bash
# t-45-libvirt-live: a libvirt-managed guest boots from a lazybd export and
# gets volumes hot-plugged the way nova's libvirt driver does it
# (`lazybd export add`, `virsh attach-device --live`, ..., `virsh
# detach-device --live`, `lazybd export remove`).
#  - a private libvirtd (session mode, all state under $T, run as nobody when
#    the test runs as root; virsh talks to it through its socket URI) defines
#    and starts a TCG domain (type='qemu', 512 MiB) whose only disk is
#    lazybd's writable export vm1-root (<disk type='network'>, protocol nbd;
#    the <disk> elements are built from contrib/libvirt-disk.xml). Before the
#    start the test writes "LAZYBD-HOLD" into the boot image's hold slot
#    (hold_offset of the image's .meta) on vm1-root through NBD; the guest
#    prints LAZYBD-BOOT-OK (right data sha, rw=1) on its serial log file,
#    reads the slot and, instead of powering off, prints LAZYBD-BOOT-HOLD and
#    idles with its kernel up for the rest of the test;
#  - read-only volume: `lazybd export add data1` + attach-device with
#    <readonly/> as vdb; lazybd counts the client, `export remove` refuses
#    while it is attached; qemu-io in the guest's qemu (HMP) reads known
#    patterns back through the guest's virtio-blk device (a wrong pattern must
#    be reported as a mismatch) and cannot write; detach-device, lazybd sees
#    the client leave, `export remove data1`;
#  - writable volume: `export add data2 --writable`, attach as vdb, qemu-io
#    writes 64 KiB of 0x5a and reads them back; the overlay grows; detach,
#    `export remove data2` (overlay kept), the export is gone, `export add`
#    again with the same name and default overlay dir: a fresh libnbd client
#    reads the origin image with the write applied; the origin files are
#    unchanged and nginx saw only GET/HEAD;
#  - virsh destroy + undefine: qemu is gone, lazybd sees no client, lazybd and
#    libvirtd stop cleanly.
# virtio-blk hot-unplug needs the guest kernel's ACPI hotplug driver to eject
# the device, hence the hold: the guest boots exactly once (one INIT, one OK,
# one HOLD line; default on_poweroff=destroy, so a guest that powers off ends
# the test), and every attach/detach is done while it idles, each waited for
# (detach: until vdb leaves `virsh domblklist`, <= 60 s). A detach that does
# not complete is never re-sent: libvirt 9.0 then drops the disk from its live
# XML while qemu keeps the device (seen while writing this test).
# Needs (Debian 12): libvirt-daemon (libvirtd; pulls libvirt-daemon-driver-qemu),
# libvirt-clients (virsh), qemu-system-x86, nginx, libnbd-bin, python3-libnbd,
# util-linux (setpriv).
. "$(dirname "$0")/lib.sh"
require_cmd nginx nbdinfo curl qemu-system-x86_64
require_nbd_python
for c in libvirtd virsh setpriv; do
  command -v "$c" >/dev/null 2>&1 || fail "missing '$c': apt-get install libvirt-daemon libvirt-clients util-linux" \
    "(libvirtd + its qemu driver, virsh; scripts/install-deps.sh)"
done

DOM=t45-vm1
LV=$T/libvirt                      # HOME and XDG dirs of the private libvirtd
LV_SOCK=$LV/run/libvirt/libvirt-sock
LV_URI="qemu+unix:///session?socket=$LV_SOCK"
LV_PID=""                          # libvirtd (bg_track'ed)
QEMU_PID=""                        # the domain's qemu (not a child of libvirtd)
SERIAL=$LV/serial.log              # guest's ttyS0
QEMU_LOG=$LV/cache/libvirt/qemu/log/$DOM.log   # qemu's stdout/stderr (qemu-io prints here)
CTL=$T/ctl.sock
export LAZYBD_CONTROL=$CTL

virsh_() { virsh -q -c "$LV_URI" "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
lzctl() { "$LAZYBD" export "$@"; }

_qemu_alive() {  # our qemu is still running (pid not reused by something else)
  local c
  [[ -n $QEMU_PID ]] && _pid_alive "$QEMU_PID" &&
    c=$(tr '\0' ' ' <"/proc/$QEMU_PID/cmdline" 2>/dev/null) && [[ $c == *"guest=$DOM,"* ]]
}

# EXIT trap: destroy the domain while libvirtd is still up, kill its qemu if
# it survived (libvirtd does not kill domains when it exits), then lib.sh's
# cleanup (libvirtd via bg_track, lazybd, nginx, $T)
_t45_cleanup() {
  local rc=$?
  set +e
  if [[ -n $LV_PID ]] && _pid_alive "$LV_PID"; then
    timeout 20 virsh -q -c "$LV_URI" destroy "$DOM" >/dev/null 2>&1
  fi
  [[ -z $QEMU_PID ]] && QEMU_PID=$(cat "$LV/run/libvirt/qemu/run/$DOM.pid" 2>/dev/null)
  if _qemu_alive; then
    kill -KILL "$QEMU_PID" 2>/dev/null
    for _ in $(seq 50); do _pid_alive "$QEMU_PID" || break; sleep 0.1; done
  fi
  if ((rc != 0)); then
    [[ -s $SERIAL ]] && { echo "---- serial console (last lines) ----" >&2; tr -d '\r' <"$SERIAL" | tail -n 8 >&2; }
    [[ -s $QEMU_LOG ]] && { echo "---- qemu log (last lines) ----" >&2; tail -n 8 "$QEMU_LOG" >&2; }
    [[ -s $LV/libvirtd.log ]] && { echo "---- libvirtd.log (last lines) ----" >&2; tail -n 8 "$LV/libvirtd.log" >&2; }
  fi
  (exit "$rc")
  _cleanup
}
trap _t45_cleanup EXIT

# ---------------------------------------------------------------- helpers

# libvirtd_start : a private libvirtd in session mode (qemu:///session): its
# config, sockets, domain XML, logs all under $LV; as root it runs as nobody
# (session mode is for unprivileged users; qemu then runs as nobody too, which
# is fine: its disks are NBD over TCP)
libvirtd_start() {
  mkdir -p "$LV"/{home,config/libvirt,run,cache,data}
  cat >"$LV/config/libvirt/libvirtd.conf" <<EOF
unix_sock_dir = "$LV/run/libvirt"
log_outputs = "3:file:$LV/libvirtd.log"
EOF
  # qemu's stdout/stderr straight into the domain log: no virtlogd to spawn (and stop)
  echo 'stdio_handler = "file"' >"$LV/config/libvirt/qemu.conf"
  local as=()
  if ((EUID == 0)); then
    getent passwd nobody >/dev/null || fail "no user 'nobody' to run the private libvirtd as"
    chown -R "nobody:$(id -g nobody)" "$LV"
    as=(setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups)
  fi
  log "starting a private libvirtd (session mode${as:+, as nobody}) on $LV_SOCK"
  "${as[@]}" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$LV/home" XDG_CONFIG_HOME="$LV/config" \
    XDG_RUNTIME_DIR="$LV/run" XDG_CACHE_HOME="$LV/cache" XDG_DATA_HOME="$LV/data" \
    libvirtd -f "$LV/config/libvirt/libvirtd.conf" </dev/null >"$LV/stdout.log" 2>&1 &
  LV_PID=$!
  bg_track "$LV_PID"
  local deadline=$((SECONDS + 60)) out=""
  until [[ -S $LV_SOCK ]] && out=$(virsh_ version 2>&1); do
    if grep -qi 'no connection driver' <<<"$out"; then
      fail "libvirtd has no qemu driver: apt-get install libvirt-daemon-driver-qemu ($out)"
    fi
    _pid_alive "$LV_PID" || fail "libvirtd exited at start: $(tail -n 5 "$LV/stdout.log" "$LV/libvirtd.log" 2>/dev/null | tr '\n' ' ')"
    ((SECONDS < deadline)) || fail "libvirtd not answering on $LV_SOCK after 60 s: $out"
    sleep 0.2
  done
  grep -q 'Running hypervisor: QEMU' <<<"$out" ||
    fail "libvirtd has no working qemu driver (apt-get install libvirt-daemon-driver-qemu): $out"
  log "libvirtd pid $LV_PID: $(grep -E 'Using library|Running hypervisor' <<<"$out" | tr -s ' \n' ' ')"
}

# disk_xml NAME DEV RO [BOOT_ORDER] : a <disk> for lazybd export NAME on our
# port, target DEV (virtio), <readonly/> if RO=1: contrib/libvirt-disk.xml
# with its export name, port and target replaced
disk_xml() {
  "$NBD_PYTHON" - "$REPO/contrib/libvirt-disk.xml" "$1" "$LAZYBD_PORT" "$2" "$3" "${4:-}" <<'PY' ||
import sys, xml.etree.ElementTree as ET
src, name, port, dev, ro, boot = sys.argv[1:]
d = ET.parse(src).getroot()
assert d.tag == "disk" and d.get("type") == "network", "not a network <disk>"
s = d.find("source"); assert s.get("protocol") == "nbd", "not an nbd source"
s.set("name", name)
h = s.find("host"); h.set("name", "127.0.0.1"); h.set("port", port)
d.find("target").set("dev", dev); d.find("target").set("bus", "virtio")
if ro == "1": ET.SubElement(d, "readonly")
if boot: ET.SubElement(d, "boot", order=boot)
print(ET.tostring(d, encoding="unicode"))
PY
    fail "disk_xml $*: cannot build a <disk> from contrib/libvirt-disk.xml"
}

# export_field NAME FIELD : FIELD (clients, overlay_bytes, overlay_dir, writable)
# of export NAME in `lazybd export list --json`; "-" when there is no such export
export_field() {
  lzctl list --json | "$NBD_PYTHON" -c '
import json, sys
e = [x for x in json.load(sys.stdin) if x["name"] == sys.argv[1]]
v = e[0][sys.argv[2]] if e else "-"
print(v if isinstance(v, str) else json.dumps(v))' "$1" "$2" || fail "lazybd export list --json failed"
}

wait_clients() {  # NAME N SECONDS : wait until lazybd counts N clients on export NAME
  local deadline=$((SECONDS + $3)) got
  while got=$(export_field "$1" clients); [[ $got != "$2" ]]; do
    ((SECONDS < deadline)) || fail "export $1: $got clients after $3 s, want $2"
    sleep 0.2
  done
}

serial_count() {  # ERE : lines of the serial log matching ERE
  tr -d '\r' <"$SERIAL" 2>/dev/null | grep -Eac -- "$1" || true
}

# assert_guest_held : the guest still idles in its hold loop: qemu runs, the
# domain is running, and the serial log has one boot (INIT line) only
assert_guest_held() {
  _qemu_alive || fail "the domain's qemu exited: the guest powered off instead of holding"
  assert_eq running "$(virsh_ domstate "$DOM")" "domain state (guest holding)"
  assert_eq 1 "$(serial_count 'LAZYBD-BOOT-INIT')" "guest boots (LAZYBD-BOOT-INIT lines) so far"
}

# dev_alias DEV : libvirt's alias (qemu device id) of the live disk DEV
dev_alias() {
  virsh_ dumpxml "$DOM" | "$NBD_PYTHON" -c '
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.stdin).getroot()
for d in r.findall("devices/disk"):
    if d.find("target").get("dev") == sys.argv[1] and d.find("alias") is not None:
        print(d.find("alias").get("name"))' "$1"
}

hmp() { virsh_ qemu-monitor-command "$DOM" --hmp "$1" | tr -d '\r'; }

# qio QDEV CMD : HMP "qemu-io -d QDEV CMD" in the guest's qemu. qemu-io prints
# its results on qemu's stdout (the domain log), errors on the monitor: sets
# QIO_MON (monitor output) and QIO_OUT (what the log got; for read/write,
# waits until the "read|wrote N/N bytes at offset" line is there)
QIO_MON="" QIO_OUT=""
qio() {
  local dev=$1 cmd=$2 mark deadline=$((SECONDS + 15))
  mark=$(stat -c %s "$QEMU_LOG")
  QIO_MON=$(hmp "qemu-io -d $dev \"$cmd\"") || fail "virsh qemu-monitor-command qemu-io $cmd failed"
  QIO_MON=$(tr -s '\n' <<<"$QIO_MON" | sed '/^$/d')
  QIO_OUT=$(tail -c "+$((mark + 1))" "$QEMU_LOG")
  [[ -z $QIO_MON && $cmd =~ ^(read|write) ]] || return 0
  until grep -Eq '^(read|wrote) [0-9]+/[0-9]+ bytes at offset' <<<"$QIO_OUT"; do
    ((SECONDS < deadline)) || fail "qemu-io $cmd on $dev: no result in the qemu log after 15 s (got: $QIO_OUT)"
    sleep 0.1
    QIO_OUT=$(tail -c "+$((mark + 1))" "$QEMU_LOG")
  done
}

# assert_pattern QDEV OFF LEN BYTE ok|mismatch : qemu-io read -P BYTE OFF LEN
# through the guest's device matches (ok) or reports a mismatch (mismatch)
assert_pattern() {
  local dev=$1 off=$2 len=$3 pat=$4 want=$5
  qio "$dev" "read -P $pat $off $len"
  [[ -z $QIO_MON ]] || fail "qemu-io read -P $pat $off $len: monitor says: $QIO_MON"
  grep -q "^read $len/$len bytes at offset $off$" <<<"$QIO_OUT" ||
    fail "qemu-io read -P $pat $off $len: no 'read $len/$len bytes at offset $off' in: $QIO_OUT"
  if [[ $want == ok ]]; then
    if grep -q 'Pattern verification failed' <<<"$QIO_OUT"; then
      fail "qemu-io read -P $pat $off $len through $dev: $(grep 'Pattern verification' <<<"$QIO_OUT")"
    fi
  else
    grep -q "^Pattern verification failed at offset $off" <<<"$QIO_OUT" ||
      fail "qemu-io read -P $pat $off $len through $dev: the wrong pattern was not reported (got: $QIO_OUT)"
  fi
  log "qemu-io read -P $pat $off $len via $dev: $want"
}

# attach DEV XML NAME RO : attach-device --live; the live XML, qemu and lazybd
# all see it; prints nothing, sets QDEV (the qdev path for qemu-io -d)
QDEV=""
attach() {
  local dev=$1 xml=$2 name=$3 ro=$4 out alias binfo want
  out=$(virsh_ attach-device "$DOM" "$xml" --live 2>&1) || fail "virsh attach-device $name: $out"
  out=$(virsh_ domblklist "$DOM")
  grep -Eq "^ *$dev +$name *$" <<<"$out" || fail "domblklist after attaching $name: $(tr '\n' ' ' <<<"$out")"
  alias=$(dev_alias "$dev")
  [[ -n $alias ]] || fail "no alias for $dev in the live XML"
  QDEV=/machine/peripheral/$alias/virtio-backend
  binfo=$(hmp 'info block')
  want="nbd://127.0.0.1:$LAZYBD_PORT/$name (raw)"
  [[ $ro == 1 ]] && want="nbd://127.0.0.1:$LAZYBD_PORT/$name (raw, read-only)"
  grep -A1 -F ": $want" <<<"$binfo" | grep -Eq "^ *Attached to: +$QDEV\$" ||
    fail "qemu 'info block' has no $want attached to $QDEV: $binfo"
  wait_clients "$name" 1 10
  log "attached export $name as $dev (alias $alias, $want); lazybd counts 1 client"
}

# detach DEV XML NAME : nova-style detach-device --live (sent once, never
# again) with the guest holding (its kernel ejects the device); waits
# (<= 60 s) until libvirt, qemu and lazybd let go of it
detach() {
  local dev=$1 xml=$2 name=$3 out t1 deadline
  assert_guest_held
  t1=$(now)
  out=$(virsh_ detach-device "$DOM" "$xml" --live 2>&1) || fail "virsh detach-device $name: $out"
  deadline=$((SECONDS + 60))
  while out=$(virsh_ domblklist "$DOM" 2>&1) || fail "virsh domblklist while detaching $dev ($name): $out"
        grep -Eq "^ *$dev " <<<"$out"; do
    ((SECONDS < deadline)) ||
      fail "$dev ($name) still in virsh domblklist 60 s after detach-device (the guest did not eject it; not re-sent)"
    _qemu_alive || fail "the domain's qemu exited while detaching $dev ($name)"
    sleep 0.2
  done
  out=$(hmp 'info block')
  if grep -qF "/$name (raw" <<<"$out"; then
    fail "qemu still has a block node for $name after libvirt detached $dev: $out"
  fi
  wait_clients "$name" 0 30
  log "detached $dev ($name): $(since "$t1") s after detach-device; lazybd counts 0 clients"
}

# ---------------------------------------------------------------- images, origin, lazybd

boot_image "$T/origin"
mkimage "$T/origin/data.img" 16
data_zero_off=$ZERO_OFF
image_apply "$T/origin/data.img" "w $MIB $MIB 0xa7"   # 1 MiB of 0xa7 at 1 MiB
boot_sha=$(sha_file "$BOOT_IMG")
data_sha=$(sha_file "$T/origin/data.img")
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/base.img" --writable --name vm1-root --cache-dir "$T/cache" --control "$CTL"
assert_eq "true 0" "$(export_field vm1-root writable) $(export_field vm1-root clients)" "export vm1-root at start (writable, clients)"

# the hold record: the guest idles after its marker instead of powering off
hold_off=$(sed -n 's/^hold_offset=//p' "$BOOT_IMG.meta")
[[ $hold_off =~ ^[0-9]+$ ]] || fail "no hold_offset in $BOOT_IMG.meta (qemu-tests/boot-image.sh too old?)"
"$NBD_PYTHON" - "nbd://127.0.0.1:$LAZYBD_PORT/vm1-root" "$hold_off" <<'PY' || fail "cannot write the hold record on vm1-root"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); off = int(sys.argv[2])
assert h.pread(4096, off) == bytes(4096), "the hold slot of vm1-root is not zero before the write"
rec = b"LAZYBD-HOLD\n".ljust(4096, b"\0")
h.pwrite(rec, off, nbd.CMD_FLAG_FUA); h.flush()
assert h.pread(4096, off) == rec, "the hold record does not read back"
h.shutdown()
PY
wait_clients vm1-root 0 10
log "wrote LAZYBD-HOLD at $hold_off on vm1-root (the guest stays up after its marker)"

# ---------------------------------------------------------------- libvirt domain

libvirtd_start
disk_xml vm1-root vda 0 1 >"$T/root-disk.xml"
cat >"$T/domain.xml" <<EOF
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    $(cat "$T/root-disk.xml")
    <controller type='usb' model='none'/>
    <serial type='file'><source path='$SERIAL'/><target port='0'/></serial>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
out=$(virsh_ define "$T/domain.xml" 2>&1) || fail "virsh define: $out"
t_start=$(now)
out=$(virsh_ start "$DOM" 2>&1) || fail "virsh start: $out"
QEMU_PID=$(cat "$LV/run/libvirt/qemu/run/$DOM.pid" 2>/dev/null || true)
_qemu_alive || fail "no running qemu for $DOM after virsh start (pid file: '$QEMU_PID')"
assert_eq running "$(virsh_ domstate "$DOM")" "domain state after virsh start"
[[ -f $QEMU_LOG ]] || fail "no qemu log at $QEMU_LOG (qemu-io prints its results there)"
log "domain $DOM started (qemu pid $QEMU_PID, TCG); waiting for the guest's marker on $SERIAL"
wait_clients vm1-root 1 10
deadline=$((SECONDS + 120))
until (($(serial_count 'LAZYBD-BOOT-(OK|FAIL)') > 0)); do
  ((SECONDS < deadline)) || fail "no LAZYBD-BOOT-OK on the serial log after 120 s"
  _qemu_alive || fail "the domain's qemu exited before the guest's marker"
  sleep 0.2
done
boot_s=$(since "$t_start")
first=$(tr -d '\r' <"$SERIAL" | grep -Ea 'LAZYBD-BOOT-(OK|FAIL)' | head -n 1)
[[ $first == "LAZYBD-BOOT-OK data=$BOOT_SHA rw=1 "* ]] ||
  fail "guest marker: '$first' (want LAZYBD-BOOT-OK data=$BOOT_SHA rw=1)"
assert_eq 1 "$(serial_count 'LAZYBD-BOOT-WROTE off=')" "guest write records on vm1-root"
deadline=$((SECONDS + 30))
until (($(serial_count 'LAZYBD-BOOT-HOLD t=') > 0)); do
  ((SECONDS < deadline)) || fail "no LAZYBD-BOOT-HOLD on the serial log 30 s after the guest's marker"
  _qemu_alive || fail "the domain's qemu exited after the guest's marker: the guest did not see its hold record"
  sleep 0.2
done
markers=$(tr -d '\r' <"$SERIAL" | grep -Eao 'LAZYBD-BOOT-(OK|FAIL|HOLD).*' | tr '\n' '|')
[[ $markers == "LAZYBD-BOOT-OK "*"|LAZYBD-BOOT-HOLD t="*"|" ]] || fail "serial markers: '$markers' (want OK, then HOLD)"
assert_guest_held
log "guest booted from vm1-root through libvirt in ${boot_s}s and holds: $first"

# ---------------------------------------------------------------- read-only volume data1

out=$(lzctl add data1 --image "$ORIGIN_URL/data.img" 2>&1) || fail "lazybd export add data1: $out"
assert_eq "false 0" "$(export_field data1 writable) $(export_field data1 clients)" "export data1 after add (writable, clients)"
disk_xml data1 vdb 1 >"$T/data1.xml"
attach vdb "$T/data1.xml" data1 1
if out=$(lzctl remove data1 2>&1); then
  fail "lazybd export remove data1 succeeded while the guest has it attached: $out"
fi
assert_eq 1 "$(export_field data1 clients)" "data1 clients after the refused remove"
log "export remove data1 refused while attached: $(tail -n 1 <<<"$out")"
assert_pattern "$QDEV" "$MIB" "$MIB" 0xa7 ok
assert_pattern "$QDEV" "$data_zero_off" "$MIB" 0 ok
assert_pattern "$QDEV" "$MIB" "$MIB" 0xa6 mismatch      # negative control: wrong byte
assert_pattern "$QDEV" 0 65536 0xa7 mismatch            # negative control: random data
qio "$QDEV" "write -P 0x11 $MIB 4096"
grep -qi 'read-only' <<<"$QIO_MON" || fail "qemu-io write on the <readonly/> disk was not refused (monitor: '$QIO_MON', log: '$QIO_OUT')"
log "qemu-io write on data1 refused: $QIO_MON"
assert_pattern "$QDEV" "$MIB" 4096 0xa7 ok
detach vdb "$T/data1.xml" data1
out=$(lzctl remove data1 2>&1) || fail "lazybd export remove data1: $out"
assert_eq - "$(export_field data1 clients)" "data1 in the export list after remove"

# ---------------------------------------------------------------- writable volume data2

out=$(lzctl add data2 --image "$ORIGIN_URL/data.img" --writable 2>&1) || fail "lazybd export add data2: $out"
assert_eq "true 0 0" "$(export_field data2 writable) $(export_field data2 clients) $(export_field data2 overlay_bytes)" \
  "export data2 after add (writable, clients, overlay bytes)"
overlay_dir=$(export_field data2 overlay_dir)
disk_xml data2 vdb 0 >"$T/data2.xml"
attach vdb "$T/data2.xml" data2 0
assert_pattern "$QDEV" "$MIB" 65536 0xa7 ok
qio "$QDEV" "write -P 0x5a 0 65536"
[[ -z $QIO_MON ]] || fail "qemu-io write on data2: $QIO_MON"
grep -q '^wrote 65536/65536 bytes at offset 0$' <<<"$QIO_OUT" || fail "qemu-io write on data2: $QIO_OUT"
qio "$QDEV" "flush"
[[ -z $QIO_MON ]] || fail "qemu-io flush on data2: $QIO_MON"
assert_pattern "$QDEV" 0 65536 0x5a ok
assert_pattern "$QDEV" 65536 65536 0x5a mismatch        # the write did not spill over
ob=$(export_field data2 overlay_bytes)
assert_ge "$ob" 65536 "data2 overlay bytes after the guest's qemu wrote 64 KiB"
log "wrote 64 KiB of 0x5a through the guest's qemu; data2 overlay holds $ob bytes"
detach vdb "$T/data2.xml" data2
out=$(lzctl remove data2 2>&1) || fail "lazybd export remove data2: $out"
assert_eq - "$(export_field data2 clients)" "data2 in the export list after remove"
if nbdinfo --size "nbd://127.0.0.1:$LAZYBD_PORT/data2" >/dev/null 2>&1; then
  fail "export data2 still answers after export remove"
fi
[[ -d $overlay_dir && -n $(ls -A "$overlay_dir") ]] || fail "overlay dir $overlay_dir gone after remove without --delete-overlay"
out=$(lzctl add data2 --image "$ORIGIN_URL/data.img" --writable 2>&1) || fail "lazybd export add data2 (again): $out"
assert_eq "$overlay_dir" "$(export_field data2 overlay_dir)" "data2 overlay dir after re-adding"
cp "$T/origin/data.img" "$T/data2-model.img"
image_apply "$T/data2-model.img" "w 0 65536 0x5a"
assert_export_model "$T/data2-model.img" "nbd://127.0.0.1:$LAZYBD_PORT/data2"
log "re-added data2: a fresh NBD client reads the origin with the guest's 64 KiB write"
assert_eq "$data_sha" "$(sha_file "$T/origin/data.img")" "sha256 of the origin data.img"

# ---------------------------------------------------------------- teardown

assert_guest_held
out=$(virsh_ destroy "$DOM" 2>&1) || fail "virsh destroy: $out"
for _ in $(seq 100); do _qemu_alive || break; sleep 0.1; done
_qemu_alive && fail "qemu pid $QEMU_PID still running 10 s after virsh destroy"
assert_eq "shut off" "$(virsh_ domstate "$DOM")" "domain state after destroy"
out=$(virsh_ undefine "$DOM" 2>&1) || fail "virsh undefine: $out"
out=$(virsh_ list --all --name)
if grep -qx "$DOM" <<<"$out"; then fail "$DOM still defined after undefine"; fi
wait_clients vm1-root 0 10
n_ok=$(serial_count "LAZYBD-BOOT-OK data=$BOOT_SHA rw=1 ")
assert_eq 0 "$(serial_count 'LAZYBD-BOOT-FAIL')" "LAZYBD-BOOT-FAIL lines on the serial log"
assert_eq 1 "$n_ok" "guest boots (OK markers) during the test"
assert_eq 1 "$(serial_count 'LAZYBD-BOOT-HOLD t=')" "LAZYBD-BOOT-HOLD lines on the serial log"
"$NBD_PYTHON" - "nbd://127.0.0.1:$LAZYBD_PORT/vm1-root" "$BOOT_WRITE_OFF" <<'PY' || fail "the guest's record is not on vm1-root"
import nbd, re, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
got = h.pread(4096, int(sys.argv[2])); h.shutdown()
line, _, rest = got.partition(b"\n")
print("vm1-root record:", line.decode(errors="replace"))
sys.exit(0 if re.fullmatch(rb"LAZYBD-WRITE [0-9a-f-]{36}", line) and rest == bytes(len(rest)) else 1)
PY
lazybd_stop
assert_eq "$boot_sha" "$(sha_file "$BOOT_IMG")" "sha256 of the origin base.img"
assert_origin_only_read
kill -TERM "$LV_PID"
for _ in $(seq 100); do _pid_alive "$LV_PID" || break; sleep 0.1; done
_pid_alive "$LV_PID" && fail "libvirtd did not exit within 10 s of SIGTERM"
wait "$LV_PID" 2>/dev/null && lv_rc=0 || lv_rc=$?
LV_PID=""
assert_eq 0 "$lv_rc" "libvirtd exit status after SIGTERM"
log "RESULT libvirt live: boot ${boot_s}s, one boot held; data1 (ro) and data2 (rw) attached/detached live;" \
  "data2's write survived remove + add"
