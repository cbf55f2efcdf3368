#!/usr/bin/env bash
# t-41-config-and-control: `lazybd serve --config FILE` and runtime export
# management over the control socket (`lazybd export add|remove|list`), the
# way a compute agent drives it. nginx origin with two images.
#  - a config written here (TCP + Unix listener, control socket, [origin]
#    settings) with exports base (read-only) and vm1 (writable, overlay_dir)
#    starts; both exports answer on both listeners (nbdinfo: size,
#    read-only flag, description; --list shows exactly the two), qemu-img
#    info reads them; the control socket is a socket of mode 0600;
#  - base reads back as the origin; a write to vm1 (qemu-io) reads back, base
#    does not see it; vm1's reads of unwritten blocks come from the cache
#    base filled (no origin request: one image, one cache);
#  - `export add vm3` (another image, writable) while an nbdcopy of base is
#    in flight (held mid-copy by a gated reader, so the overlap is certain):
#    the add succeeds, the copy then completes and matches the origin, vm3
#    serves the other image; `export list` (table and --json) shows name,
#    mode, clients (>= 1 on base during the copy) and overlay bytes;
#  - add of an existing name and remove of an unknown name fail cleanly;
#  - remove vm1 (no client, no --delete-overlay): gone from list and
#    handshake, overlay dir kept; re-added with the same overlay_dir, the
#    earlier write is still there;
#  - remove vm3 while a libnbd client holds a connection: refused (non-zero
#    exit, message about connected clients), export still served; with
#    --force --delete-overlay: succeeds, the held client is disconnected,
#    the overlay dir is gone;
#  - SIGTERM exits 0; a restart with the same config serves base and vm1
#    again (vm1's write persisted) and not the runtime-added vm3;
#  - bad configs fail at start with a non-zero status and a message naming
#    the problem: unknown key in [[export]] (writeable) and in [server]
#    (listn), duplicate export name.
. "$(dirname "$0")/lib.sh"
require_cmd nbdinfo nbdcopy qemu-img qemu-io nginx
require_nbd_python

mkimage "$T/origin/base.img" 64
mkimage "$T/origin/other.img" 24 777
base_size=$(stat -c %s "$T/origin/base.img")
other_size=$(stat -c %s "$T/origin/other.img")
base_sha=$(sha_file "$T/origin/base.img")
origin_start "$T/origin" >/dev/null
port=$(free_port)
run=$T/run
mkdir -p "$run"
CTL=$run/control.sock
TCP=nbd://127.0.0.1:$port
unix_uri() { echo "nbd+unix:///$1?socket=$run/nbd.sock"; }
export LAZYBD_CONTROL=$CTL   # for every `lazybd export ...` below
ctl() { "$LAZYBD" export "$@"; }

cat > "$T/lazybd.toml" <<EOF
# written by $TEST_NAME
[server]
listen = ["127.0.0.1:$port", "unix:$run/nbd.sock"]
cache_dir = "$T/cache"
control = "$CTL"
block_size = "64k"
max_connections = 64

[origin]
connections = 8
timeout_secs = 10
retries = 2
headers = ["X-Test-Token: abc"]

[[export]]
name = "base"
image = "$ORIGIN_URL/base.img"
description = "t-41 template"

[[export]]
name = "vm1"
image = "$ORIGIN_URL/base.img"
writable = true
overlay_dir = "$T/lib/overlays/vm1"
EOF
lazybd_spawn --config "$T/lazybd.toml"
lazybd_wait_ready "$TCP/base" "$TCP/vm1" "$(unix_uri base)" "$(unix_uri vm1)"

# ---- control socket: a socket, mode 0600
[[ -S $CTL ]] || fail "control socket $CTL is not a socket"
assert_eq 600 "$(stat -c %a "$CTL")" "mode of the control socket"
log "control socket $CTL: $(stat -c '%A %U' "$CTL")"

# ---- both exports, both listeners
for n in base vm1; do
  for u in "$TCP/$n" "$(unix_uri "$n")"; do
    assert_eq "$base_size" "$(nbdinfo --size "$u")" "nbdinfo --size $u"
  done
done
nbdinfo --json "$TCP/base" > "$T/base.json"
nbdinfo --json "$(unix_uri vm1)" > "$T/vm1.json"
"$NBD_PYTHON" - "$T/base.json" "$T/vm1.json" <<'PY' || fail "nbdinfo flags/description of base and vm1"
import json, sys
b = json.load(open(sys.argv[1]))["exports"][0]; v = json.load(open(sys.argv[2]))["exports"][0]
print("base:", b.get("is_read_only"), b.get("description"), " vm1:", v.get("is_read_only"), v.get("description"))
ok = b.get("is_read_only") is True and v.get("is_read_only") is False and b.get("description") == "t-41 template"
sys.exit(0 if ok else 1)
PY
names=$(nbdinfo --list --json "$TCP" | "$NBD_PYTHON" -c \
  'import json,sys; print(" ".join(sorted(e["export-name"] for e in json.load(sys.stdin)["exports"])))')
assert_eq "base vm1" "$names" "nbdinfo --list"
for u in "$TCP/base" "$(unix_uri vm1)"; do
  out=$(qemu-img info --output=json "$u" 2>&1) || fail "qemu-img info $u: $out"
  got=$(printf '%s' "$out" | "$NBD_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
  assert_eq "$base_size" "$got" "qemu-img info $u: virtual-size"
done
log "base and vm1 answer on TCP and Unix; qemu-img info sees $base_size bytes"

# ---- contents; one cache for both exports of base.img
assert_same_as_file "$T/origin/base.img" "$TCP/base"
out=$(qemu-io -f raw -c "write -P 0x5a 1000 70000" -c "read -P 0x5a 1000 70000" "$TCP/vm1" 2>&1) ||
  fail "qemu-io write/read vm1: $out"
cp "$T/origin/base.img" "$T/vm1-model.img"
image_apply "$T/vm1-model.img" "w 1000 70000 0x5a"
mark=$(origin_mark)
assert_export_model "$T/vm1-model.img" "$TCP/vm1"
assert_eq 0 "$(origin_data_requests_since "$mark")" "origin data requests while reading vm1 after base was read (shared cache)"
assert_same_as_file "$T/origin/base.img" "$(unix_uri base)"

# ---- export add while an nbdcopy of base is in flight
# the reader takes 8 MiB, then stalls until $T/go exists: nbdcopy is then
# blocked mid-copy with its connections open
( nbdcopy --connections=2 "$TCP/base" - |
    { head -c $((8 * MIB)); while [[ ! -e $T/go ]]; do sleep 0.05; done; cat; } |
    sha256sum | awk '{print $1}' > "$T/copy.sha" ) &
copy_pid=$!
bg_track "$copy_pid"
clients_of() {  # NAME -> clients per `export list --json` (empty if absent)
  ctl list --json | "$NBD_PYTHON" -c \
    'import json,sys; print("".join(str(e["clients"]) for e in json.load(sys.stdin) if e["name"] == sys.argv[1]))' "$1"
}
for _ in $(seq 100); do [[ $(clients_of base) -ge 1 ]] && break; sleep 0.05; done
assert_ge "$(clients_of base)" 1 "clients of base while the nbdcopy runs"
out=$(ctl add vm3 --image "$ORIGIN_URL/other.img" --writable --overlay-dir "$T/lib/overlays/vm3" 2>&1) ||
  fail "export add vm3 during the copy: $out"
assert_eq ok "$out" "output of export add"
_pid_alive "$copy_pid" || fail "the nbdcopy of base was not running any more when vm3 was added (no overlap)"
ctl list > "$T/list1.txt"
cat "$T/list1.txt" >&2
assert_grep '^NAME +MODE +CLIENTS +OVERLAY +IMAGE' "$T/list1.txt" "export list header"
assert_grep "^base +ro +[1-9][0-9]* +0 B +$ORIGIN_URL/base.img\$" "$T/list1.txt" "export list: base, ro, the copy's clients"
assert_grep "^vm1 +rw +0 +[0-9.]+ [KMG]?i?B +$ORIGIN_URL/base.img\$" "$T/list1.txt" "export list: vm1, rw"
assert_grep "^vm3 +rw +0 +0 B +$ORIGIN_URL/other.img\$" "$T/list1.txt" "export list: vm3, rw, empty overlay"
touch "$T/go"
wait "$copy_pid" || fail "the nbdcopy of base that ran across export add failed"
assert_eq "$base_sha" "$(cat "$T/copy.sha")" "sha256 of the nbdcopy of base that ran across export add"
log "nbdcopy of base spanning export add vm3: completed, identical to the origin"
assert_eq "$other_size" "$(nbdinfo --size "$TCP/vm3")" "size of vm3"
assert_same_as_file "$T/origin/other.img" "$(unix_uri vm3)"
ctl list --json > "$T/list1.json"
"$NBD_PYTHON" - "$T/list1.json" "$T" <<'PY' || fail "export list --json"
import json, sys
l = {e["name"]: e for e in json.load(open(sys.argv[1]))}
t = sys.argv[2]
print({n: (e["writable"], e["clients"], e["overlay_dir"], e["overlay_bytes"]) for n, e in l.items()})
ok = (sorted(l) == ["base", "vm1", "vm3"]
      and l["base"]["writable"] is False and l["base"]["overlay_dir"] is None
      and l["vm1"]["writable"] is True and l["vm1"]["overlay_dir"] == t + "/lib/overlays/vm1"
      and l["vm1"]["overlay_bytes"] > 0
      and l["vm3"]["writable"] is True and l["vm3"]["overlay_dir"] == t + "/lib/overlays/vm3")
sys.exit(0 if ok else 1)
PY
cached=("$T"/cache/*.img-*/)
assert_eq 2 "${#cached[@]}" "image directories in the cache (base.img and other.img; one shared by base, vm1): ${cached[*]}"

# ---- errors of add/remove
if out=$(ctl add vm1 --image "$ORIGIN_URL/base.img" 2>&1); then fail "export add of an existing name succeeded: $out"; fi
grep -q 'exists already' <<<"$out" || fail "export add vm1 twice: unexpected message: $out"
if out=$(ctl remove nope 2>&1); then fail "export remove of an unknown name succeeded: $out"; fi
grep -q 'no export named' <<<"$out" || fail "export remove nope: unexpected message: $out"
log "add of an existing name / remove of an unknown one refused: $out"

# ---- remove vm1 without --delete-overlay: overlay kept, re-add finds the data
assert_eq 0 "$(clients_of vm1)" "clients of vm1 before remove"
out=$(ctl remove vm1 2>&1) || fail "export remove vm1 (no clients): $out"
[[ -z $(clients_of vm1) ]] || fail "vm1 still listed after remove"
if nbdinfo --size "$TCP/vm1" >/dev/null 2>&1; then fail "vm1 still answers the handshake after remove"; fi
[[ -s $T/lib/overlays/vm1/base ]] || fail "overlay of vm1 was deleted by a remove without --delete-overlay"
out=$(ctl add vm1 --image "$ORIGIN_URL/base.img" --writable --overlay-dir "$T/lib/overlays/vm1" 2>&1) ||
  fail "export add vm1 again: $out"
assert_export_model "$T/vm1-model.img" "$TCP/vm1"
log "vm1 removed (overlay kept) and re-added: its write is still there"

# ---- remove vm3 while a client holds a connection
"$NBD_PYTHON" - "$(unix_uri vm3)" "$T/held" "$T/release" > "$T/holder.out" 2>&1 <<'PY' &
import nbd, os, sys, time
uri, ready, release = sys.argv[1:4]
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(b"\xa5" * 131072, 1 << 20)
h.flush()
open(ready, "w").close()
while not os.path.exists(release):
    time.sleep(0.05)
try:
    h.pread(4096, 0)
    print("still connected")
except nbd.Error as e:
    print("disconnected:", e)
PY
holder=$!
bg_track "$holder"
for _ in $(seq 200); do [[ -e $T/held ]] && break; _pid_alive "$holder" || break; sleep 0.05; done
[[ -e $T/held ]] || fail "libnbd client on vm3 did not connect: $(cat "$T/holder.out")"
assert_eq 1 "$(clients_of vm3)" "clients of vm3 with the libnbd client connected"
if out=$(ctl remove vm3 --delete-overlay 2>&1); then fail "export remove vm3 succeeded with a client connected: $out"; fi
grep -q 'connected client' <<<"$out" || fail "export remove vm3 refused with an unexpected message: $out"
log "remove vm3 with a client connected refused: $out"
assert_eq "$other_size" "$(nbdinfo --size "$TCP/vm3")" "vm3 still served after the refused remove"
[[ -s $T/lib/overlays/vm3/base ]] || fail "overlay of vm3 missing after the refused remove"
t0=$SECONDS
out=$(timeout 90 "$LAZYBD" export remove vm3 --force --delete-overlay 2>&1) ||
  fail "export remove vm3 --force --delete-overlay: $out"
log "remove vm3 --force --delete-overlay: $out ($((SECONDS - t0))s)"
[[ ! -e $T/lib/overlays/vm3 ]] || fail "overlay dir of vm3 still exists after --delete-overlay: $(ls -la "$T/lib/overlays/vm3")"
[[ -z $(clients_of vm3) ]] || fail "vm3 still listed after remove --force"
if nbdinfo --size "$TCP/vm3" >/dev/null 2>&1; then fail "vm3 still answers the handshake after remove --force"; fi
touch "$T/release"
wait "$holder" || fail "libnbd holder: $(cat "$T/holder.out")"
grep -q '^disconnected' "$T/holder.out" || fail "the held client of vm3 was not disconnected by --force: $(cat "$T/holder.out")"
log "held client: $(cat "$T/holder.out")"
# the other exports were not disturbed
assert_same_as_file "$T/origin/base.img" "$TCP/base"
assert_export_model "$T/vm1-model.img" "$(unix_uri vm1)"
lazybd_stop

# ---- restart with the same config: config exports back, runtime ones not
lazybd_spawn --config "$T/lazybd.toml"
lazybd_wait_ready "$TCP/base" "$TCP/vm1"
assert_eq "base vm1" "$(ctl list --json | "$NBD_PYTHON" -c \
  'import json,sys; print(" ".join(sorted(e["name"] for e in json.load(sys.stdin))))')" "exports after restart"
assert_export_model "$T/vm1-model.img" "$TCP/vm1"
assert_eq 600 "$(stat -c %a "$CTL")" "mode of the control socket after restart"
lazybd_stop
[[ ! -e $CTL ]] || fail "control socket $CTL left behind after a clean stop"

# ---- bad configs fail at start, naming the problem
bad_config() {  # NAME ERE : write $T/NAME.toml from stdin, expect start failure with ERE in the log
  cat > "$T/$1.toml"
  lazybd_expect_start_failure 20 --config "$T/$1.toml"
  assert_grep "$2" "$LAZYBD_LOG" "start with config $1.toml"
  log "config $1: $(lazybd_log_plain | grep -E -m1 -- "$2")"
}
bad_config unknown-export-key 'unknown field `writeable`' <<EOF
[server]
listen = ["127.0.0.1:$port"]
cache_dir = "$T/cache"
[[export]]
name = "vm1"
image = "$ORIGIN_URL/base.img"
writeable = true
EOF
assert_grep 'line 7' "$LAZYBD_LOG" "the unknown key's line number"
bad_config unknown-server-key 'unknown field `listn`' <<EOF
[server]
listn = ["127.0.0.1:$port"]
cache_dir = "$T/cache"
EOF
bad_config duplicate-name 'duplicate export name "vm1"' <<EOF
[server]
listen = ["127.0.0.1:$port"]
cache_dir = "$T/cache"
[[export]]
name = "vm1"
image = "$ORIGIN_URL/base.img"
[[export]]
name = "vm1"
image = "$ORIGIN_URL/other.img"
writable = true
EOF
