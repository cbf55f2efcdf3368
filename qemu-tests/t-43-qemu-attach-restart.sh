#!/usr/bin/env bash
# t-43-qemu-attach-restart: a real qemu-system-x86_64 (not booted: -S; I/O is
# issued from its monitor with HMP `qemu-io`) against `lazybd serve --config`.
#  - drive d1: writable export vm1 over the Unix socket, with
#    file.reconnect-delay=30 (the README's -drive line); drive d0: read-only
#    export base over TCP, plain nbd:// URL (no reconnect-delay);
#  - restart lazybd with SIGTERM, then with SIGKILL: d1 reconnects by itself
#    and reads back what was written before each restart (the overlay
#    persisted, the config recreated vm1); d0 fails with EIO after the restart
#    (why the README asks for reconnect-delay);
#  - the compute-driver flow of the README at the NBD level: `export add vm3`
#    at run time, qemu `drive_add` (what attach does: qemu opens the export),
#    `export list` shows 1 client, `export remove` is refused, qemu
#    `drive_del` (what detach does), clients drop to 0, `export remove
#    --delete-overlay` succeeds and the overlay dir is gone.
. "$(dirname "$0")/lib.sh"
require_cmd qemu-system-x86_64 nbdinfo nginx
require_nbd_python

mkimage "$T/origin/base.img" 32
origin_start "$T/origin" >/dev/null
port=$(free_port)
run=$T/run; mkdir -p "$run"
sock=$run/nbd.sock
export LAZYBD_CONTROL=$run/control.sock
cat > "$T/lazybd.toml" <<EOF
[server]
listen = ["127.0.0.1:$port", "unix:$sock"]
cache_dir = "$T/cache"
control = "$LAZYBD_CONTROL"
[[export]]
name = "base"
image = "$ORIGIN_URL/base.img"
[[export]]
name = "vm1"
image = "$ORIGIN_URL/base.img"
writable = true
overlay_dir = "$T/lib/overlays/vm1"
EOF
start_config() {
  lazybd_spawn --config "$T/lazybd.toml"
  lazybd_wait_ready "nbd://127.0.0.1:$port/base" "nbd+unix:///vm1?socket=$sock"
}
start_config

# ---- qemu, not booted; qemu-io output goes to its stdout ($T/qemu.out)
mon=$T/mon.sock
stdbuf -oL qemu-system-x86_64 -M q35 -S -display none -nodefaults \
  -monitor "unix:$mon,server=on,wait=off" \
  -drive "if=none,id=d1,format=raw,file.driver=nbd,file.server.type=unix,file.server.path=$sock,file.export=vm1,file.reconnect-delay=30" \
  -device virtio-blk-pci,drive=d1 \
  -drive "if=none,id=d0,format=raw,readonly=on,file=nbd://127.0.0.1:$port/base" \
  -device virtio-blk-pci,drive=d0 \
  > "$T/qemu.out" 2>&1 &
qemu_pid=$!
bg_track "$qemu_pid"
for _ in $(seq 100); do [[ -S $mon ]] && break; _pid_alive "$qemu_pid" || break; sleep 0.05; done
[[ -S $mon ]] || fail "qemu did not start: $(cat "$T/qemu.out")"

# hmp CMD : run one HMP command, wait for the next prompt; prints the reply
hmp() {
  "$NBD_PYTHON" - "$mon" "$1" <<'PY' || fail "HMP '$1' failed"
import re, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(90)
def until_prompt():
    buf = b""
    while not re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", buf).rstrip().endswith(b"(qemu)"):
        d = s.recv(65536)
        if not d: sys.exit("monitor closed")
        buf += d
    return re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", buf).decode(errors="replace")
until_prompt()
s.sendall(sys.argv[2].encode() + b"\n")
out = until_prompt()
# drop the echoed command line and the prompt
lines = [l for l in out.replace("\r", "\n").split("\n") if l.strip() and not l.startswith("(qemu)")]
print("\n".join(l for l in lines if sys.argv[2] not in l))
PY
}

# qio DRIVE CMD EXPECT-ERE : HMP qemu-io; its result line in qemu.out must match
qio() {
  local n0 reply res
  n0=$(wc -l < "$T/qemu.out")
  reply=$(hmp "qemu-io $1 \"$2\"")
  res=$(tail -n "+$((n0 + 1))" "$T/qemu.out" | grep -E '^(read|wrote|[a-z]+ failed|Pattern verification)' | head -n 1)
  [[ -n $res ]] || res=$reply
  grep -Eq -- "$3" <<<"$res" || fail "qemu-io $1 '$2': got '$res', want /$3/"
  log "qemu-io $1 '$2': $res"
}
clients_of() {
  "$LAZYBD" export list --json | "$NBD_PYTHON" -c \
    'import json,sys; print("".join(str(e["clients"]) for e in json.load(sys.stdin) if e["name"] == sys.argv[1]))' "$1"
}
OK_W='^wrote 65536/65536 bytes'
OK_R='^read 65536/65536 bytes'

qio d1 "write -P 0x42 0 64k" "$OK_W"
qio d1 "read -P 0x42 0 64k" "$OK_R"
qio d0 "read 0 64k" "$OK_R"
assert_eq 1 "$(clients_of vm1)" "clients of vm1 with qemu attached"
assert_eq 1 "$(clients_of base)" "clients of base with qemu attached"

# ---- restart by SIGTERM: d1 reconnects, d0 (no reconnect-delay) fails
lazybd_stop TERM
start_config
qio d1 "read -P 0x42 0 64k" "$OK_R"
qio d1 "write -P 0x43 64k 64k" "$OK_W"
qio d0 "read 0 64k" 'read failed: Input/output error'
log "after a SIGTERM restart: reconnect-delay drive resumed, plain drive got EIO"

# ---- restart after SIGKILL: same for d1
lazybd_kill9
start_config
qio d1 "read -P 0x43 64k 64k" "$OK_R"
qio d1 "read -P 0x42 0 64k" "$OK_R"
assert_eq 1 "$(clients_of vm1)" "clients of vm1 after qemu reconnected"

# ---- attach / detach a runtime export (qemu drive_add / drive_del)
out=$("$LAZYBD" export add vm3 --image "$ORIGIN_URL/base.img" --writable --overlay-dir "$T/lib/overlays/vm3" 2>&1) ||
  fail "export add vm3: $out"
reply=$(hmp "drive_add 0 if=none,id=hot3,format=raw,file=nbd+unix:///vm3?socket=$sock")
grep -q '^OK' <<<"$reply" || fail "drive_add vm3: $reply"
qio hot3 "write -P 0x44 0 64k" "$OK_W"
qio hot3 "read -P 0x44 0 64k" "$OK_R"
assert_eq 1 "$(clients_of vm3)" "clients of vm3 after drive_add"
if out=$("$LAZYBD" export remove vm3 2>&1); then fail "export remove vm3 while qemu has it open succeeded: $out"; fi
log "remove while attached refused: $out"
reply=$(hmp "drive_del hot3")
[[ -z $reply ]] || fail "drive_del hot3: $reply"
for _ in $(seq 100); do [[ $(clients_of vm3) == 0 ]] && break; sleep 0.05; done
assert_eq 0 "$(clients_of vm3)" "clients of vm3 after drive_del"
out=$("$LAZYBD" export remove vm3 --delete-overlay 2>&1) || fail "export remove vm3 after detach: $out"
[[ ! -e $T/lib/overlays/vm3 ]] || fail "overlay of vm3 still there after --delete-overlay"
log "vm3: add, drive_add, 1 client, remove refused, drive_del, 0 clients, removed with its overlay"
# vm1 in the same qemu was not disturbed
qio d1 "read -P 0x43 64k 64k" "$OK_R"

"$NBD_PYTHON" -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"quit\n")' "$mon"
for _ in $(seq 100); do _pid_alive "$qemu_pid" || break; sleep 0.05; done
_pid_alive "$qemu_pid" && fail "qemu did not quit"
assert_no_grep 'Pattern verification failed' "$T/qemu.out" "qemu-io pattern checks"
lazybd_stop
