#!/usr/bin/env bash
# t-42-contrib-service: contrib/lazybd.service and contrib/lazybd.toml work
# together as shipped (systemd itself is not running in the test machine, so
# the unit is checked offline and its command line is run by hand).
#  - `systemd-analyze verify` of the unit (ExecStart's binary pointed at the
#    one under test, nothing else changed) exits 0 and says nothing about
#    it (complaints about other installed units are logged, not ours);
#    `systemd-analyze security --offline=true` rates it at most 2.0;
#  - the unit has the settings the README promises (Type=notify, the
#    ExecStart line, ExecReload (SIGHUP), Restart=on-failure, KillSignal=SIGTERM, a stop timeout,
#    State/Cache/RuntimeDirectory, NoNewPrivileges, ProtectSystem=strict,
#    PrivateTmp) and agrees with the config: LAZYBD_CONTROL = [server]
#    control, the Unix listener and control socket live in RuntimeDirectory,
#    cache_dir is CacheDirectory, every overlay_dir is under StateDirectory;
#  - contrib/lazybd.toml, with only its origin URL, /var/cache/lazybd,
#    /var/lib/lazybd, /run/lazybd and port 10809 replaced by test ones, is
#    run with the unit's own ExecStart arguments and UMask: exports base
#    (read-only), vm1 and vm2 (writable) answer on TCP and on the Unix
#    socket with their descriptions; base matches the origin; writes to vm1
#    do not show in vm2 or base; the overlays land in StateDirectory;
#    `lazybd export list` finds the server through the unit's LAZYBD_CONTROL;
#    the NBD socket is group-connectable (srwxrwx---, for libvirt-qemu in
#    group lazybd) while the control socket stays 0600;
#  - readiness as systemd sees it (NOTIFY_SOCKET, a datagram socket of the
#    test's): READY=1 arrives, and at that moment the TCP listener already
#    greets (NBDMAGIC); SIGHUP (ExecReload) sends RELOADING=1 then READY=1;
#  - SIGTERM (the unit's KillSignal) stops it with status 0 well within
#    TimeoutStopSec, after STOPPING=1.
. "$(dirname "$0")/lib.sh"
require_cmd systemd-analyze nbdinfo nbdcopy qemu-io nginx
require_nbd_python
UNIT=$REPO/contrib/lazybd.service
CONF=$REPO/contrib/lazybd.toml
[[ -s $UNIT && -s $CONF ]] || fail "contrib/lazybd.service or contrib/lazybd.toml missing"

# unit_get KEY : the (last) value of KEY= in the unit
unit_get() { sed -n "s/^$1=//p" "$UNIT" | tail -n 1; }

# ---- offline checks of the unit
mkdir -p "$T/unit"
sed "s#^ExecStart=/usr/local/bin/lazybd #ExecStart=$LAZYBD #" "$UNIT" > "$T/unit/lazybd.service"
grep -q "^ExecStart=$LAZYBD serve" "$T/unit/lazybd.service" || fail "ExecStart is not /usr/local/bin/lazybd serve ..."
out=$(systemd-analyze verify "$T/unit/lazybd.service" 2>&1) || fail "systemd-analyze verify: $out"
# verify loads the units installed on the machine too; complaints about
# those (Debian's keystone.service names itself in After=) are not ours.
others=$(grep -Ev '^lazybd\.service:' <<<"$out" | grep -E '^[A-Za-z0-9@_.-]+\.(service|socket|target|mount): ' || true)
ours=$(grep -Fvx -f <(printf '%s\n' "$others") <<<"$out" | grep -v '^$' || true)
[[ -z $others ]] || log "systemd-analyze verify, about other units (ignored): $(tr '\n' '|' <<<"$others")"
[[ -z $ours ]] || fail "systemd-analyze verify has complaints: $ours"
log "systemd-analyze verify: clean"
systemd-analyze security --offline=true "$T/unit/lazybd.service" > "$T/security.txt" 2>&1 ||
  fail "systemd-analyze security: $(tail -n 5 "$T/security.txt")"
log "systemd-analyze security: $(grep -a 'Overall exposure' "$T/security.txt")"
systemd-analyze security --offline=true --threshold=20 "$T/unit/lazybd.service" >/dev/null 2>&1 ||
  fail "systemd-analyze security: exposure above 2.0: $(grep -a 'Overall exposure' "$T/security.txt")"

assert_eq notify "$(unit_get Type)" "Type"
assert_eq main "$(unit_get NotifyAccess)" "NotifyAccess"
assert_eq '/bin/kill -HUP $MAINPID' "$(unit_get ExecReload)" "ExecReload"
assert_eq "/usr/local/bin/lazybd serve --config /etc/lazybd/lazybd.toml" "$(unit_get ExecStart)" "ExecStart"
assert_eq on-failure "$(unit_get Restart)" "Restart"
assert_eq SIGTERM "$(unit_get KillSignal)" "KillSignal"
stop_timeout=$(unit_get TimeoutStopSec)
[[ $stop_timeout =~ ^[0-9]+$ ]] && ((stop_timeout >= 30 && stop_timeout <= 600)) ||
  fail "TimeoutStopSec '$stop_timeout': want 30..600 seconds"
for kv in StateDirectory=lazybd CacheDirectory=lazybd RuntimeDirectory=lazybd NoNewPrivileges=yes \
          ProtectSystem=strict PrivateTmp=yes; do
  assert_eq "${kv#*=}" "$(unit_get "${kv%%=*}")" "${kv%%=*}"
done
rwp=" $(unit_get ReadWritePaths) "
for d in /var/cache/lazybd /var/lib/lazybd /run/lazybd; do
  [[ $rwp == *" $d "* ]] || fail "ReadWritePaths lacks $d: $rwp"
done
ctl_env=$(unit_get Environment); ctl_env=${ctl_env#LAZYBD_CONTROL=}
umask_unit=$(unit_get UMask)

# ---- the shipped config agrees with the unit
"$NBD_PYTHON" - "$CONF" "$ctl_env" <<'PY' || fail "contrib/lazybd.toml does not match the unit's directories"
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb")); ctl = sys.argv[2]
s = c["server"]; ex = c["export"]
bad = []
if s.get("control") != ctl: bad.append(f"control {s.get('control')!r} != unit's LAZYBD_CONTROL {ctl!r}")
if not ctl.startswith("/run/lazybd/"): bad.append(f"control socket {ctl} not in RuntimeDirectory")
if s.get("cache_dir") != "/var/cache/lazybd": bad.append(f"cache_dir {s.get('cache_dir')!r}")
for l in s.get("listen", []):
    if l.startswith("unix:") and not l.startswith("unix:/run/lazybd/"): bad.append(f"listener {l} not in /run/lazybd")
if "unix:/run/lazybd/nbd.sock" not in s.get("listen", []): bad.append("no unix:/run/lazybd/nbd.sock listener")
if "127.0.0.1:10809" not in s.get("listen", []): bad.append("no 127.0.0.1:10809 listener")
for e in ex:
    if e.get("writable") and not str(e.get("overlay_dir", "")).startswith("/var/lib/lazybd/"):
        bad.append(f"export {e['name']}: overlay_dir {e.get('overlay_dir')!r} not under StateDirectory")
kinds = [(e["name"], bool(e.get("writable"))) for e in ex]
if kinds != [("base", False), ("vm1", True), ("vm2", True)]: bad.append(f"exports {kinds}")
if len({e["image"] for e in ex}) != 1: bad.append("the three exports should share one image")
for b in bad: print("  -", b)
sys.exit(1 if bad else 0)
PY
image_url=$(sed -n 's/^image = "\(.*\)"$/\1/p' "$CONF" | head -n 1)
[[ -n $image_url ]] || fail "no image = \"...\" line in contrib/lazybd.toml"

# ---- run the shipped config with the unit's command line and umask
mkimage "$T/origin/template.raw" 48 1000
origin_start "$T/origin" >/dev/null
port=$(free_port)
R=$T/root
mkdir -p "$R/etc/lazybd" "$R/run/lazybd" "$R/var/cache/lazybd" "$R/var/lib/lazybd"   # systemd makes these
sed -e "s#$image_url#$ORIGIN_URL/template.raw#g" \
    -e "s#/var/cache/lazybd#$R/var/cache/lazybd#g" -e "s#/var/lib/lazybd#$R/var/lib/lazybd#g" \
    -e "s#/run/lazybd#$R/run/lazybd#g" -e "s#127\.0\.0\.1:10809#127.0.0.1:$port#g" \
    "$CONF" > "$R/etc/lazybd/lazybd.toml"
! cmp -s "$CONF" "$R/etc/lazybd/lazybd.toml" || fail "sed changed nothing in the config"
grep -v '^ *#' "$R/etc/lazybd/lazybd.toml" > "$T/conf-keys.txt"
assert_no_grep 'images\.example|"/var/|"/run/|unix:/run/|:10809' "$T/conf-keys.txt" "machine paths left in the test copy of the config"
read -r -a exec_args <<<"$(unit_get ExecStart)"
exec_args=("${exec_args[@]:2}")                     # drop the binary and "serve"
exec_args=("${exec_args[@]/\/etc\/lazybd\/lazybd.toml/$R/etc/lazybd/lazybd.toml}")
# The service manager's side of Type=notify: every datagram, and whether
# the TCP listener greets at the moment READY=1 arrives.
notify_sock=$T/notify.sock
"$NBD_PYTHON" - "$notify_sock" "$port" "$T/notify.log" <<'PY' &
import socket, sys, time
path, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(path)
out = open(log, "a", buffering=1)
out.write("listening\n")
while True:
    msg = s.recv(4096).decode()
    line = msg.replace("\n", " ")
    if "READY=1" in msg:
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=2)
            greeted = c.recv(8) == b"NBDMAGIC"; c.close()
        except OSError:
            greeted = False
        line += f" greeted={greeted}"
    out.write(line + "\n")
    if "STOPPING=1" in msg:
        break
PY
notify_pid=$!
bg_track "$notify_pid"
for _ in $(seq 100); do grep -q listening "$T/notify.log" 2>/dev/null && break; sleep 0.05; done
umask "$umask_unit"
NOTIFY_SOCKET=$notify_sock lazybd_spawn "${exec_args[@]}"
umask 022
sock=$R/run/lazybd/nbd.sock
TCP=nbd://127.0.0.1:$port
lazybd_wait_ready "$TCP/base" "$TCP/vm1" "$TCP/vm2" "nbd+unix:///vm1?socket=$sock"

size=$(stat -c %s "$T/origin/template.raw")
nbdinfo --list --json "$TCP" > "$T/list.json"
"$NBD_PYTHON" - "$T/list.json" "$CONF" "$size" <<'PY' || fail "nbdinfo --list of the shipped config"
import json, sys, tomllib
got = {e["export-name"]: e for e in json.load(open(sys.argv[1]))["exports"]}
want = {e["name"]: e for e in tomllib.load(open(sys.argv[2], "rb"))["export"]}
bad = []
if sorted(got) != sorted(want): bad.append(f"exports {sorted(got)} != {sorted(want)}")
for n, w in want.items():
    g = got.get(n, {})
    if g.get("description") != w.get("description"): bad.append(f"{n}: description {g.get('description')!r}")
    if g.get("is_read_only") != (not w.get("writable", False)): bad.append(f"{n}: is_read_only {g.get('is_read_only')}")
    if g.get("export-size") != int(sys.argv[3]): bad.append(f"{n}: size {g.get('export-size')}")
    print(n, g.get("is_read_only"), repr(g.get("description")))
for b in bad: print("  -", b)
sys.exit(1 if bad else 0)
PY
assert_same_as_file "$T/origin/template.raw" "nbd+unix:///base?socket=$sock"
out=$(qemu-io -f raw -c "write -P 0x3c 65536 65536" "nbd+unix:///vm1?socket=$sock" 2>&1) || fail "qemu-io write vm1: $out"
cp "$T/origin/template.raw" "$T/vm1.model"
image_apply "$T/vm1.model" "w 65536 65536 0x3c"
assert_export_model "$T/vm1.model" "$TCP/vm1"
assert_same_as_file "$T/origin/template.raw" "$TCP/vm2"
assert_same_as_file "$T/origin/template.raw" "$TCP/base"
for n in vm1 vm2; do
  [[ -s $R/var/lib/lazybd/overlays/$n/base ]] || fail "overlay of $n is not in StateDirectory ($R/var/lib/lazybd/overlays/$n)"
done
[[ ! -e $R/var/cache/lazybd/overlays ]] || fail "an overlay went to the cache directory: $(ls "$R/var/cache/lazybd/overlays")"

# sockets: NBD group-connectable under the unit's UMask, control owner-only
assert_eq "srwxrwx---" "$(stat -c %A "$sock")" "mode of nbd.sock under UMask=$umask_unit"
assert_eq "srw-------" "$(stat -c %A "$R/run/lazybd/control.sock")" "mode of control.sock"
LAZYBD_CONTROL=${ctl_env/\/run\/lazybd/$R/run/lazybd} "$LAZYBD" export list > "$T/export-list.txt" ||
  fail "lazybd export list via the unit's LAZYBD_CONTROL"
cat "$T/export-list.txt" >&2
assert_grep '^base +ro ' "$T/export-list.txt" "export list: base"
assert_grep '^vm1 +rw +0 +64 KiB ' "$T/export-list.txt" "export list: vm1 with its one-block (64 KiB) write"
assert_grep '^vm2 +rw +0 +0 B ' "$T/export-list.txt" "export list: vm2"

for _ in $(seq 100); do grep -q 'READY=1' "$T/notify.log" && break; sleep 0.05; done
assert_grep '^READY=1 STATUS=serving 3 export\(s\) greeted=True$' "$T/notify.log" \
  "READY=1 once listening (Type=notify)"
kill -HUP "$LAZYBD_PID"
for _ in $(seq 100); do [[ $(grep -c 'READY=1' "$T/notify.log") -ge 2 ]] && break; sleep 0.05; done
assert_grep '^RELOADING=1 MONOTONIC_USEC=[0-9]+$' "$T/notify.log" "RELOADING=1 on SIGHUP (ExecReload)"
assert_eq 2 "$(grep -c '^READY=1' "$T/notify.log")" "READY=1 again after the reload"
t0=$SECONDS
lazybd_stop TERM
assert_le "$((SECONDS - t0))" "$((stop_timeout / 4))" "seconds to stop on SIGTERM (TimeoutStopSec=$stop_timeout)"
[[ ! -e $R/run/lazybd/control.sock ]] || fail "control.sock left in RuntimeDirectory after stop"
for _ in $(seq 50); do grep -q 'STOPPING=1' "$T/notify.log" && break; sleep 0.05; done
assert_grep '^STOPPING=1 ' "$T/notify.log" "STOPPING=1 at SIGTERM"
log "service manager saw: $(tr '\n' '|' < "$T/notify.log")"
