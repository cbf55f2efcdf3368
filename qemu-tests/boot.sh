#!/usr/bin/env bash
# qemu-tests/boot.sh — boot the image of qemu-tests/boot-image.sh from a disk
# (an NBD URI or a raw file) in qemu-system-x86_64 under TCG, and wait for the
# guest's marker on the serial console.
#
# Usage: qemu-tests/boot.sh DISK [TIMEOUT_S=120]
#   DISK: nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH, or a file
# Env:
#   BOOT_ACCEL    tcg (default; KVM dies in SeaBIOS on these machines) or kvm
#   BOOT_MEM      guest MiB (default 256)
#   BOOT_READONLY on (default) | off: a writable disk; the guest then writes a
#                 record (see boot-image.sh) and reports it as WROTE
#   BOOT_DRIVE_EXTRA  appended to the -drive options (e.g. ",cache=none")
#   BOOT_LOG      serial console + qemu stderr (default: a temp file, kept)
#   BOOT_SHA      expected data sha256 (e.g. data_sha256 of IMG.meta): a marker
#                 with another one counts as a failure
#   BOOT_QUIET=1  no stderr notes
#   BOOT_MARKER   marker prefix (default LAZYBD-BOOT): PREFIX-INIT, PREFIX-OK,
#                 PREFIX-FAIL / PREFIX-BAD (LAZYBD-DEBIAN for the image of
#                 qemu-tests/debian-image.sh)
#
# Prints one line on stdout, e.g.
#   BOOT status=ok marker_s=3.612 exit_s=3.804 init_s=2.950 guest_t=1.94 data=<sha> rw=0 wrote= log=FILE
# status: ok | fail (a LAZYBD-BOOT-FAIL marker, qemu exited without a marker,
# or the wrong sha) | timeout. marker_s / init_s: seconds from starting qemu
# to the OK (or FAIL) marker / to /init's first line (the host's clock; the
# firmware, bootloader and kernel read before init_s); guest_t: the guest's
# uptime in the marker. wrote: "off:uuid" of the guest's write on a writable disk.
# Exit status: 0 ok, 1 fail, 124 timeout.
set -uo pipefail
disk=${1:?usage: boot.sh DISK [TIMEOUT_S]}
timeout_s=${2:-120}
log=${BOOT_LOG:-$(mktemp "${TMPDIR:-/tmp}/lazybd-boot.XXXXXX.log")}
exec python3 - "$disk" "$timeout_s" "$log" <<'PY'
import os, re, signal, subprocess, sys, time

disk, timeout_s, logpath = sys.argv[1], float(sys.argv[2]), sys.argv[3]
env = os.environ
quiet = env.get("BOOT_QUIET") == "1"
ro = env.get("BOOT_READONLY", "on")
want_sha = env.get("BOOT_SHA", "")
mk = env.get("BOOT_MARKER", "LAZYBD-BOOT")
MK_INIT, MK_OK, MK_BAD = mk + "-INIT", mk + "-OK", (mk + "-FAIL", mk + "-BAD")
drive = f"file={disk},format=raw,if=virtio,readonly={ro}{env.get('BOOT_DRIVE_EXTRA', '')}"
cmd = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-machine", "pc",
       "-accel", env.get("BOOT_ACCEL", "tcg"), "-m", env.get("BOOT_MEM", "256"), "-smp", "1",
       "-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none",
       "-drive", drive]

log = open(logpath, "wb", buffering=0)
log.write(("# " + " ".join(cmd) + "\n").encode())
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=log, start_new_session=True)
os.set_blocking(p.stdout.fileno(), False)

import selectors
sel = selectors.DefaultSelector()
sel.register(p.stdout, selectors.EVENT_READ)
buf = b""
status, marker_s, init_s, guest_t, data, rw, wrote, detail = "timeout", None, None, "", "", "", "", ""
deadline = t0 + timeout_s
eof = False

def handle(line, now):
    global status, marker_s, init_s, guest_t, data, rw, wrote, detail
    s = line.decode("utf-8", "replace").replace("\r", "")
    log.write(f"[{now - t0:8.3f}] {s}\n".encode())
    if MK_INIT in s and init_s is None:
        init_s = now - t0
    m = re.search(r"LAZYBD-BOOT-WROTE off=(\d+) id=(\S+)", s)
    if m:
        wrote = f"{m.group(1)}:{m.group(2)}"
    bad = any(b in s for b in MK_BAD)
    if MK_OK in s or bad:
        marker_s = now - t0
        m = re.search(r"t=([0-9.]+)", s); guest_t = m.group(1) if m else ""
        m = re.search(r"data=(\S+)", s); data = m.group(1) if m else ""
        m = re.search(r"rw=(\d)", s); rw = m.group(1) if m else ""
        if MK_OK in s and not bad and (not want_sha or data == want_sha):
            status = "ok"
        else:
            status = "fail"
            detail = s.strip() if bad else f"data {data} != expected {want_sha}"
        return True
    return False

done = False
while not done:
    now = time.monotonic()
    if now >= deadline:
        break
    for _key, _ev in sel.select(timeout=min(0.5, deadline - now)):
        try:
            chunk = os.read(p.stdout.fileno(), 65536)
        except BlockingIOError:
            continue
        now = time.monotonic()
        if not chunk:
            eof = True
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if handle(line, now):
                done = True
    if eof and not done:
        if buf and handle(buf, time.monotonic()):
            break
        status, detail = "fail", f"qemu exited (status {p.wait()}) without a marker"
        break

# The guest powers off by itself after the marker; kill qemu if it lingers.
try:
    p.wait(timeout=10 if status != "timeout" else 0.1)
except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
exit_s = time.monotonic() - t0
try:
    rest = p.stdout.read() or b""
    if rest:
        log.write(rest)
except Exception:
    pass
if status == "timeout":
    detail = f"no marker after {timeout_s:g} s"
f = lambda x: "" if x is None else f"{x:.3f}"
print(f"BOOT status={status} marker_s={f(marker_s)} exit_s={exit_s:.3f} init_s={f(init_s)} "
      f"guest_t={guest_t} data={data} rw={rw} wrote={wrote} log={logpath}", flush=True)
if not quiet and status != "ok":
    print(f"boot.sh: {status}: {detail} (disk {disk}, log {logpath})", file=sys.stderr)
    try:
        tail = open(logpath, "rb").read().decode("utf-8", "replace").splitlines()[-15:]
        for l in tail:
            print("  | " + l, file=sys.stderr)
    except Exception:
        pass
sys.exit({"ok": 0, "fail": 1, "timeout": 124}[status])
PY
