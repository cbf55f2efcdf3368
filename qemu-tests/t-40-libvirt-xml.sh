#!/usr/bin/env bash
# t-40-libvirt-xml: the libvirt XML in contrib/ is valid and points qemu at a
# working lazybd export.
#  - contrib/libvirt-domain.xml passes `virt-xml-validate FILE domain` (the
#    RelaxNG schema of the installed libvirt) and libvirt's own parser
#    (`virsh -c test:///default define`; the test driver runs in-process,
#    no daemon): dumpxml keeps the nbd source, export name and host;
#  - the bare <disk> snippets contrib/libvirt-disk.xml (TCP) and
#    contrib/libvirt-disk-unix.xml (Unix socket) are spliced into the
#    domain in place of its <disk> and checked the same way;
#  - negative control: the same splice with protocol='nbdd' or a <host>
#    without name/socket must FAIL validation (the validator really checks);
#  - live: lazybd serves a writable export vm1 (nginx origin) on a TCP port
#    and a Unix socket; each snippet, with its port / socket path rewritten
#    to the test ones, is turned into the -blockdev JSON libvirt gives qemu
#    ({"driver":"nbd","server":{...},"export":NAME}); qemu-img info sees the
#    size, qemu-img compare sees the origin's bytes;
#  - qemu-system-x86_64 (not booted: -S) opens the README's -drive strings
#    (nbd://...:PORT/vm1 and nbd+unix:///vm1?socket=...) and reads 1 MiB
#    through the virtio disk (HMP `qemu-io`).
. "$(dirname "$0")/lib.sh"
require_cmd virt-xml-validate xmllint virsh qemu-img qemu-system-x86_64 nbdinfo nginx
C=$REPO/contrib
for f in libvirt-domain.xml libvirt-disk.xml libvirt-disk-unix.xml; do
  [[ -s $C/$f ]] || fail "contrib/$f is missing"
done

# splice_disk DOMAIN DISK OUT : DOMAIN with its (only) <disk> replaced by the
# <disk> element of DISK (a file holding just one <disk>, comments allowed)
splice_disk() {
  "$NBD_PYTHON" - "$@" <<'PY' || fail "splice_disk $*"
import sys, xml.etree.ElementTree as ET
dom = ET.parse(sys.argv[1]); disk = ET.parse(sys.argv[2]).getroot()
assert disk.tag == "disk", f"{sys.argv[2]}: root element is <{disk.tag}>, not <disk>"
devs = dom.getroot().find("devices")
old = devs.findall("disk")
assert len(old) == 1, f"{sys.argv[1]}: {len(old)} <disk> elements, want 1"
i = list(devs).index(old[0]); devs.remove(old[0]); devs.insert(i, disk)
dom.write(sys.argv[3])
PY
}

# disk_field FILE -> "protocol name transport host port socket" of the first <disk>
disk_fields() {
  "$NBD_PYTHON" - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
d = r if r.tag == "disk" else r.find("devices/disk")
s = d.find("source"); h = s.find("host")
print(d.get("type"), s.get("protocol"), s.get("name"), h.get("transport", "tcp"),
      h.get("name", "-"), h.get("port", "-"), h.get("socket", "-"),
      d.find("target").get("dev"), d.find("driver").get("type"))
PY
}

validate_ok() {  # FILE WHAT
  local out
  out=$(virt-xml-validate "$1" domain 2>&1) || fail "virt-xml-validate $2: $out"
  log "virt-xml-validate $2: $(echo "$out" | tail -n 1)"
}

# libvirt_parse FILE WHAT EXPECTED-FIELDS : libvirt's own parser accepts FILE
# (test driver) and its dumpxml keeps the disk as disk_fields prints it
libvirt_parse() {
  local file=$1 what=$2 want=$3 out name
  name=$(xmllint --xpath 'string(/domain/name)' "$file")
  out=$(virsh -q -c test:///default "define $file; dumpxml $name" 2>&1) ||
    fail "virsh define $what: $out"
  printf '%s\n' "$out" | sed -n '/<domain/,$p' > "$T/dump.xml"
  [[ -s $T/dump.xml ]] || fail "virsh dumpxml $what: no <domain> in: $out"
  assert_eq "$want" "$(disk_fields "$T/dump.xml")" "$what: disk after libvirt's parser"
  log "libvirt (test:///default) parsed $what: $want"
}

# ---- the three files, as shipped
validate_ok "$C/libvirt-domain.xml" "contrib/libvirt-domain.xml"
libvirt_parse "$C/libvirt-domain.xml" "contrib/libvirt-domain.xml" \
  "network nbd vm1 tcp 127.0.0.1 10809 - vda raw"
assert_eq "network nbd vm1 tcp 127.0.0.1 10809 - vda raw" "$(disk_fields "$C/libvirt-disk.xml")" \
  "contrib/libvirt-disk.xml"
assert_eq "network nbd vm1 unix - - /run/lazybd/nbd.sock vda raw" "$(disk_fields "$C/libvirt-disk-unix.xml")" \
  "contrib/libvirt-disk-unix.xml"
for f in libvirt-disk.xml libvirt-disk-unix.xml; do
  splice_disk "$C/libvirt-domain.xml" "$C/$f" "$T/dom-$f"
  validate_ok "$T/dom-$f" "domain with contrib/$f"
  libvirt_parse "$T/dom-$f" "domain with contrib/$f" "$(disk_fields "$C/$f")"
done

# ---- negative controls: a wrong disk must not validate
sed "s/protocol='nbd'/protocol='nbdd'/" "$C/libvirt-disk.xml" > "$T/bad1.xml"
sed "s/<host name='127.0.0.1' port='10809'\/>/<host port='10809' nonsense='1'\/>/" "$C/libvirt-disk.xml" > "$T/bad2.xml"
! cmp -s "$T/bad2.xml" "$C/libvirt-disk.xml" || fail "negative control bad2: the sed did not change libvirt-disk.xml"
for b in bad1 bad2; do
  splice_disk "$C/libvirt-domain.xml" "$T/$b.xml" "$T/dom-$b.xml"
  if out=$(virt-xml-validate "$T/dom-$b.xml" domain 2>&1); then
    fail "virt-xml-validate accepted the broken disk $b: $out"
  fi
  log "broken disk $b rejected: $(echo "$out" | grep -v '^$' | tail -n 1)"
done

# ---- live: the snippets' sources reach a lazybd export
mkimage "$T/origin/base.img" 32 4096
origin_start "$T/origin" >/dev/null
port=$(free_port)
sock=$T/run/nbd.sock
mkdir -p "$T/run"
lazybd_start "$ORIGIN_URL/base.img" --cache-dir "$T/cache" --name vm1 --writable \
  --overlay-dir "$T/lib/overlays/vm1" --listen "127.0.0.1:$port" --listen "unix:$sock" \
  --control "$T/run/control.sock"
size=$(stat -c %s "$T/origin/base.img")

sed "s/port='10809'/port='$port'/" "$C/libvirt-disk.xml" > "$T/live-tcp.xml"
sed "s#socket='/run/lazybd/nbd.sock'#socket='$sock'#" "$C/libvirt-disk-unix.xml" > "$T/live-unix.xml"
for f in live-tcp live-unix; do
  read -r _ proto name transport host hport hsock _ fmt < <(disk_fields "$T/$f.xml")
  if [[ $transport == unix ]]; then
    server="{\"type\":\"unix\",\"path\":\"$hsock\"}"
  else
    server="{\"type\":\"inet\",\"host\":\"$host\",\"port\":\"$hport\"}"
  fi
  [[ $proto == nbd && $fmt == raw ]] || fail "$f: protocol $proto format $fmt"
  json="json:{\"driver\":\"$fmt\",\"file\":{\"driver\":\"nbd\",\"server\":$server,\"export\":\"$name\"}}"
  out=$(qemu-img info --output=json "$json" 2>&1) || fail "qemu-img info $json: $out"
  got=$(printf '%s' "$out" | "$NBD_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
  assert_eq "$size" "$got" "$f: qemu-img info virtual-size"
  out=$(qemu-img compare -f raw -F raw "$T/origin/base.img" "$json" 2>&1) ||
    fail "qemu-img compare origin vs $f ($json): $out"
  log "$f: $json -> $size bytes, identical to the origin"
done

# ---- qemu-system-x86_64 with the README's -drive strings (no boot: -S)
for drive in "file=nbd://127.0.0.1:$port/vm1,format=raw,if=virtio" \
             "file=nbd+unix:///vm1?socket=$sock,format=raw,if=virtio"; do
  out=$(printf 'info block\nqemu-io virtio0 "read 0 1M"\nquit\n' |
        timeout 60 qemu-system-x86_64 -M q35 -S -display none -nodefaults -monitor stdio \
          -drive "$drive" 2>&1 | sed 's/\x1b\[[0-9;]*[A-Za-z]//g') ||
    fail "qemu-system-x86_64 -drive $drive: $out"
  want=${drive%%,*}; want=${want#file=}
  grep -qF "virtio0 (#" <<<"$out" && grep -qF "$want (raw)" <<<"$out" ||
    fail "qemu-system-x86_64 -drive $drive: 'info block' does not show $want: $out"
  grep -q 'read 1048576/1048576 bytes at offset 0' <<<"$out" ||
    fail "qemu-system-x86_64 -drive $drive: qemu-io read failed: $out"
  log "qemu-system-x86_64 -drive $drive: attached as virtio0, read 1 MiB"
done
lazybd_stop
