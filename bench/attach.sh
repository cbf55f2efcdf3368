#!/usr/bin/env bash
# bench/attach.sh — attaching a 1 TiB template: time from starting lazybd
# to the first byte read over NBD, and memory, for a read-only and a
# writable export, on a cold and on a warm cache directory.
#
# The template is a 1 TiB sparse local file (8 MiB of random data at
# 100 GiB). Each round starts `lazybd serve` and, from the moment of the
# exec, a python3-libnbd client retries connect + 1-byte read of the data
# every millisecond; the figure is the time to the first successful read.
# Medians of ROUNDS rounds (read-only and writable alternate). Also
# reported: RSS after the read, and the cache and overlay directories'
# size on disk.
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
T=$(mktemp -d "${TMPDIR:-/var/tmp}/lazybd-attach.XXXXXX")
trap 'rm -rf "$T"' EXIT
truncate -s 1T "$T/big.img"
head -c $((8 << 20)) /dev/urandom | dd of="$T/big.img" bs=1M seek=$((100 * 1024)) conv=notrunc status=none
/usr/bin/python3 - "$LAZYBD" "$T" "$ROUNDS" >"$T/results.txt" <<'PY'
import os, socket, statistics, subprocess, sys, time
import nbd
lazybd, T, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def one(writable, cold, tag):
    cache = f"{T}/cache-{tag}"
    if cold:
        subprocess.run(["rm", "-rf", cache, f"{T}/ov-{tag}"], check=True)
    p = port()
    args = [lazybd, "serve", f"{T}/big.img", "--cache-dir", cache, "--listen", f"127.0.0.1:{p}",
            "--control", "none", "--no-readahead"]
    if writable:
        args += ["--writable", "--overlay-dir", f"{T}/ov-{tag}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            h = nbd.NBD(); h.connect_uri(f"nbd://127.0.0.1:{p}/disk")
            h.pread(1, 100 << 30)
            t = time.monotonic() - t0
            break
        except nbd.Error:
            if time.monotonic() - t0 > 30: raise SystemExit("no first byte in 30 s")
            time.sleep(0.001)
    rss = int([l for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS")][0].split()[1])
    h.shutdown(); proc.terminate(); proc.wait()
    du = lambda d: int(subprocess.run(["du", "-sk", d], capture_output=True, text=True).stdout.split()[0]) if os.path.exists(d) else 0
    return t * 1000, rss, du(cache), du(f"{T}/ov-{tag}")
res = {}
for r in range(rounds):
    for writable in ([False, True] if r % 2 == 0 else [True, False]):
        for cold in (True, False):
            key = ("writable" if writable else "read-only", "cold" if cold else "warm")
            res.setdefault(key, []).append(one(writable, cold, key[0]))
for key, v in res.items():
    ms = [x[0] for x in v]
    print(f"{key[0]}\t{key[1]}\t{statistics.median(ms):.1f}\t{min(ms):.1f}\t{max(ms):.1f}\t"
          f"{max(x[1] for x in v) / 1024:.1f}\t{v[-1][2]}\t{v[-1][3]}")
PY
cat "$T/results.txt"
section=$T/section.md
{
  echo "## Attach of a 1 TiB template (bench/attach.sh)"
  echo
  echo "\`ROUNDS=$ROUNDS bench/attach.sh\`: time from exec of \`lazybd serve\` to the first byte read over NBD (a client"
  echo "retrying every 1 ms), 1 TiB sparse local template; cold = cache (and overlay) directory deleted first. Medians of"
  echo "$ROUNDS rounds, read-only and writable alternating."
  echo
  echo "| export | cache | first byte, median (min–max) | RSS peak | cache dir on disk | overlay on disk |"
  echo "|---|---|---|---|---|---|"
  while IFS=$'\t' read -r kind state med lo hi rss cache ov; do
    echo "| $kind | $state | **$med ms** ($lo–$hi) | $rss MiB | $cache KiB | $([[ $kind == writable ]] && echo "$ov KiB" || echo —) |"
  done <"$T/results.txt"
  echo
} >"$section"
write_section "$OUT" "$section"
echo "attach.sh: section written to $OUT" >&2
