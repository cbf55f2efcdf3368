#!/usr/bin/env bash
# bench/attach.sh — attaching a 1 TiB template: time from starting the
# server to the first byte read over NBD, and memory, for lazybd (read-only
# and writable, cold and warm cache directory) and, from an http origin,
# beside its peers.
#
# The template is a 1 TiB sparse file (8 MiB of random data at 100 GiB).
# Each run starts the server and, from the moment of the exec, a
# python3-libnbd client retries connect + 1-byte read of the data every
# millisecond; the figure is the time to the first successful read.
# Servers:
#   lazybd file         lazybd serve /path/big.img (read-only; writable)
#   lazybd http         lazybd serve http://127.0.0.1:P/big.img (nginx on
#                       loopback, no delay), read-only, cold
#   nbdkit curl+cache   nbdkit --filter=cache curl URL cache-on-read=true
#   qsd                 qemu-img create a 1 TiB qcow2 overlay, then
#                       qemu-storage-daemon http (readahead=0) -> qcow2 ->
#                       copy-on-read, the set-up that serves a template
#                       lazily; the timer covers both (what a host runs to
#                       attach)
# Medians of ROUNDS rounds (the servers alternate, reversed every other
# round). Also reported: the server's RSS after the read, and lazybd's cache
# and overlay directories' size on disk.
#
# Writes the "Attach of a 1 TiB template" section of OUT (bench/RESULTS.md),
# stamped by bench/lib.sh.
# Env: ROUNDS (7), OUT (bench/RESULTS.md), LAZYBD (target/release/lazybd),
#      QUICK (1: ROUNDS=2, a smoke run)
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
[[ ${QUICK:-0} == 1 ]] && ROUNDS=${ROUNDS:-2}
ROUNDS=${ROUNDS:-7}
OUT=${OUT:-$BENCH/RESULTS.md}
LAZYBD=${LAZYBD:-$REPO/target/release/lazybd}
[[ -x $LAZYBD ]] || { echo "attach.sh: $LAZYBD not found (cargo build --release)" >&2; exit 1; }
for t in nginx nbdkit qemu-storage-daemon qemu-img; do
  command -v "$t" >/dev/null || { "$REPO/scripts/install-deps.sh"; break; }
done
# qemu-tests/lib.sh: the temp dir $T (removed at exit, with every process
# it started) and the nginx origin.
. "$REPO/qemu-tests/lib.sh"
mkdir -p "$T/origin"
truncate -s 1T "$T/origin/big.img"
head -c $((8 << 20)) /dev/urandom | dd of="$T/origin/big.img" bs=1M seek=$((100 * 1024)) conv=notrunc status=none
chmod 0644 "$T/origin/big.img"
origin_start "$T/origin" >/dev/null
/usr/bin/python3 - "$LAZYBD" "$T" "$ROUNDS" "$ORIGIN_URL/big.img" >"$T/results.txt" <<'PY'
import os, socket, statistics, subprocess, sys, time
import nbd
lazybd, T, rounds, url = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
TIB = 1 << 40
def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def first_byte(p, t0, procs):
    """Retry connect + 1-byte read of the data until it works; seconds since t0."""
    while True:
        try:
            h = nbd.NBD(); h.connect_uri(f"nbd://127.0.0.1:{p}/disk")
            h.pread(1, 100 << 30)
            return h, time.monotonic() - t0
        except nbd.Error:
            if time.monotonic() - t0 > 30 or any(x.poll() is not None for x in procs):
                raise SystemExit(f"no first byte in 30 s from {procs[-1].args[0]}")
            time.sleep(0.001)
def rss_kib(pid):
    return int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0].split()[1])
du = lambda d: int(subprocess.run(["du", "-sk", d], capture_output=True, text=True).stdout.split()[0]) if os.path.exists(d) else 0
def one(server, source, writable, cold, tag):
    cache = f"{T}/cache-{tag}"
    subprocess.run(["rm", "-rf", f"{T}/peer-{tag}"], check=True)
    os.makedirs(f"{T}/peer-{tag}")
    if cold:
        subprocess.run(["rm", "-rf", cache, f"{T}/ov-{tag}"], check=True)
    p = port()
    pre = None
    if server == "lazybd":
        image = f"{T}/origin/big.img" if source == "file" else url
        args = [lazybd, "serve", image, "--cache-dir", cache, "--listen", f"127.0.0.1:{p}",
                "--control", "none", "--no-readahead"]
        if writable:
            args += ["--writable", "--overlay-dir", f"{T}/ov-{tag}"]
    elif server == "nbdkit-cache":
        args = ["nbdkit", "-f", "-r", "-e", "disk", "-i", "127.0.0.1", "-p", str(p), "--filter=cache",
                "curl", url, "cache-on-read=true"]
    else:  # qsd
        ov = f"{T}/peer-{tag}/overlay.qcow2"
        pre = ["qemu-img", "create", "-q", "-f", "qcow2", ov, str(TIB)]
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=http,node-name=origin,url={url},readahead=0,read-only=on",
                "--blockdev", f"driver=file,node-name=overlay-file,filename={ov}",
                "--blockdev", "driver=qcow2,node-name=overlay,file=overlay-file,backing=origin",
                "--blockdev", "driver=copy-on-read,node-name=cor,file=overlay",
                "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={p}",
                "--export", "type=nbd,id=export0,node-name=cor,name=disk,writable=off"]
    env = dict(os.environ, TMPDIR=f"{T}/peer-{tag}")
    t0 = time.monotonic()
    if pre:
        subprocess.run(pre, check=True)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    h, t = first_byte(p, t0, [proc])
    rss = rss_kib(proc.pid)
    h.shutdown(); proc.terminate(); proc.wait()
    return t * 1000, rss, du(cache) if server == "lazybd" else du(f"{T}/peer-{tag}"), du(f"{T}/ov-{tag}")
CASES = [  # (server, source, writable, cold)
    ("lazybd", "file", False, True), ("lazybd", "file", False, False),
    ("lazybd", "file", True, True), ("lazybd", "file", True, False),
    ("lazybd", "http", False, True), ("nbdkit-cache", "http", False, True), ("qsd", "http", False, True),
]
res = {}
for r in range(rounds):
    for c in (CASES if r % 2 == 0 else CASES[::-1]):
        server, source, writable, cold = c
        tag = f"{server}-{source}-{'rw' if writable else 'ro'}"
        res.setdefault(c, []).append(one(server, source, writable, cold, tag))
for c in CASES:
    v = res[c]
    ms = [x[0] for x in v]
    server, source, writable, cold = c
    print(f"{server}\t{source}\t{'writable' if writable else 'read-only'}\t{'cold' if cold else 'warm'}\t"
          f"{statistics.median(ms):.1f}\t{min(ms):.1f}\t{max(ms):.1f}\t"
          f"{max(x[1] for x in v) / 1024:.1f}\t{v[-1][2]}\t{v[-1][3]}")
PY
cat "$T/results.txt"
section=$T/section.md
{
  echo "## Attach of a 1 TiB template (bench/attach.sh)"
  echo
  echo "\`ROUNDS=$ROUNDS bench/attach.sh\`: time from the exec of the server to the first byte read over NBD (a client"
  echo "retrying every 1 ms), 1 TiB sparse template, as a local file or from nginx on loopback; cold = cache (and overlay)"
  echo "directory deleted first. For qemu-storage-daemon the time includes \`qemu-img create\` of its 1 TiB qcow2 overlay."
  echo "Medians of $ROUNDS rounds, the servers alternating. RSS is the server's after the read; on disk: lazybd's cache"
  echo "directory, or the peer's temporary directory (nbdkit's cache file, qemu's overlay)."
  echo
  echo "| server | origin | export | cache | first byte, median (min–max) | RSS | on disk | overlay on disk |"
  echo "|---|---|---|---|---|---|---|---|"
  while IFS=$'\t' read -r server source kind state med lo hi rss cache ov; do
    echo "| $server | $source | $kind | $state | **$med ms** ($lo–$hi) | $rss MiB | $cache KiB | $([[ $kind == writable ]] && echo "$ov KiB" || echo —) |"
  done <"$T/results.txt"
  echo
} >"$section"
write_section "$OUT" "$section"
echo "attach.sh: section written to $OUT" >&2
