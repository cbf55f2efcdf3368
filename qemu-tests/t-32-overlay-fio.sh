#!/usr/bin/env bash
# t-32-overlay-fio: fio's libnbd engine writing to a --writable export, with
# fio's own data verification (crc32c headers in every block). Image 80 MiB.
#  - randrw, bs=4k, iodepth=16, 0..16 MiB, verify=crc32c do_verify=1;
#  - randrw, bs=64k, iodepth=16, starting at 16 MiB + 1000 (every I/O
#    straddles two 64K overlay blocks); the first 1000 bytes before it still
#    read as the origin and fio's verify header magic (0xacca) sits at
#    16 MiB + 1000 (the writes really landed unaligned);
#  - randwrite, bs=64k, from 24 MiB + 1000, verify; then --verify_only in a
#    new fio process;
#  - 4 jobs (numjobs=4, one NBD connection each), randwrite, bsrange 4k-128k,
#    8 MiB each on disjoint ranges from 32 MiB (offset_increment), iodepth 16,
#    verify; lazybd's log must show >= 4 connections open at once
#    (multi-conn); then the same jobs with --verify_only in a new fio process
#    (new connections read what others wrote);
#  - libnbd, 4 writer connections + 2 reader connections at once on 2 MiB
#    from 64 MiB + 1024: writer k writes every sector i with i % 4 == k
#    (single 512-byte writes, shuffled, 8 in flight), so neighbouring sectors
#    of one page and one 64K block are written by different connections at
#    the same time: into blocks not yet in the overlay (merge with the
#    base), then twice over blocks in the overlay (rewrites in place); then
#    the 4 connections TRIM the whole blocks. After each pass (+ FLUSH) every
#    sector holds its last value; every concurrent read returned, per sector,
#    the value before or after the pass, never an error or anything else;
#  - SIGTERM + restart: --verify_only of both randwrite workloads passes (the
#    data persisted). Control: a server with a fresh, empty overlay
#    (--overlay-dir elsewhere) must FAIL the same --verify_only (so the
#    verification does look at the data).
#  Every fio run must exit 0 with error=0 in every job, and every verifying run
#  must have read back as many bytes as were written. The origin file is
#  unchanged and nginx saw only GET/HEAD requests.
. "$(dirname "$0")/lib.sh"
require_cmd fio nbdinfo nginx
require_nbd_python

mkimage "$T/origin/disk.img" 80
origin_sha=$(sha_file "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
lazybd_start "$url" --cache-dir "$T/cache" --writable
M=$((1024 * 1024))

# run_fio NAME CHECK FIO-ARGS... : CHECK is rw (reads and writes happened),
# wv (every written byte was read back by the verify phase) or vo (verify
# only: every block of the job read back and checked, nothing written)
run_fio() {
  local name=$1 check=$2; shift 2
  # (in $T, no verify state file: fio would write *-verify.state into the cwd)
  (cd "$T" && fio --name="$name" --ioengine=nbd --uri="$LAZYBD_URI" --output-format=json \
      --output="$T/$name.json" --verify_state_save=0 "$@") > "$T/$name.out" 2>&1 ||
    fail "fio $name exited with status $?: $(tail -n 5 "$T/$name.out" | tr '\n' ' ') $(grep -o '"error" : [0-9]*' "$T/$name.json" 2>/dev/null | sort | uniq -c | tr '\n' ' ')"
  "$NBD_PYTHON" - "$T/$name.json" "$name" "$check" <<'PY' || fail "fio $name: errors or missing I/O (see above)"
import json, sys
j = json.load(open(sys.argv[1])); name, check = sys.argv[2], sys.argv[3]
bad = 0
for job in j["jobs"]:
    r, w = job["read"], job["write"]
    print(f'fio {name}: error={job["error"]} read {r["io_bytes"]} wrote {w["io_bytes"]} bytes '
          f'({r["iops"]:.0f}+{w["iops"]:.0f} IOPS)')
    if job["error"] != 0: print(f'  - error={job["error"]}'); bad = 1
    if check == "rw" and (r["io_bytes"] == 0 or w["io_bytes"] == 0): print("  - no reads or no writes"); bad = 1
    if check == "wv" and (w["io_bytes"] == 0 or r["io_bytes"] != w["io_bytes"]):
        print(f'  - verify read {r["io_bytes"]} bytes of {w["io_bytes"]} written'); bad = 1
    # verify_only counts the writes it would have made, issues none (iops 0)
    if check == "vo" and (r["io_bytes"] == 0 or r["io_bytes"] != w["io_bytes"] or w["iops"] != 0):
        print("  - verify_only did not read back every block, or wrote"); bad = 1
sys.exit(bad)
PY
}

V=(--verify=crc32c --do_verify=1 --verify_fatal=1 --iodepth=16)

run_fio rw4k rw --rw=randrw --bs=4k --offset=0 --size=16M "${V[@]}"
run_fio rw64k rw --rw=randrw --bs=64k --offset=$((16 * M + 1000)) --size=$((8 * M)) "${V[@]}"
"$NBD_PYTHON" - "$T/origin/disk.img" "$LAZYBD_URI" $((16 * M)) <<'PY' || fail "the bs=64k run did not write at its unaligned offset"
import nbd, sys
data, base = open(sys.argv[1], "rb").read(), int(sys.argv[3])
h = nbd.NBD(); h.connect_uri(sys.argv[2])
head, magic = h.pread(1000, base), h.pread(2, base + 1000)
print(f"16M..16M+1000 {'= origin' if head == data[base:base + 1000] else 'CHANGED'}; magic at 16M+1000: {magic.hex()}")
sys.exit(0 if head == data[base:base + 1000] and magic == b"\xca\xac" else 1)
PY
run_fio w64k wv --rw=randwrite --bs=64k --offset=$((24 * M + 1000)) --size=$((7 * M)) "${V[@]}"

# several connections at once: 4 jobs on disjoint ranges
lines_before=$(wc -l < "$LAZYBD_LOG")
J=(--rw=randwrite --bsrange=4k-128k --numjobs=4 --offset=$((32 * M)) --offset_increment=8M --size=8M)
run_fio multi wv "${J[@]}" "${V[@]}"
maxconn=$(tail -n "+$((lines_before + 1))" "$LAZYBD_LOG" | sed 's/\x1b\[[0-9;]*m//g' |
  awk '/client connected/ {n++; if (n > m) m = n} /client disconnected/ {n--} END {print m + 0}')
log "multi: at most $maxconn client connections open at once"
assert_ge "$maxconn" 4 "simultaneous NBD connections during the 4-job run"
run_fio multi-vo vo "${J[@]}" --verify=crc32c --verify_only --iodepth=16
run_fio w64k-vo vo --rw=randwrite --bs=64k --offset=$((24 * M + 1000)) --size=$((7 * M)) --verify=crc32c --verify_only

# several connections on the same blocks (no fio: its verify needs disjoint ranges)
"$NBD_PYTHON" - "$LAZYBD_URI" $((64 * M + 1024)) 4096 1 <<'PY' || fail "concurrent writes/trims over 4 connections went wrong"
import nbd, random, sys, threading, time
uri, lo, n_sect, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
NC, QD, S = 4, 8, 512
rnd = random.Random(seed)
def conn():
    h = nbd.NBD(); h.connect_uri(uri); return h
h0 = conn()
old = h0.pread(n_sect * S, lo)
def val(p, i): return (i * 7 + p * 101 + 1) % 255 + 1   # never 0
def writer(k, p, errs):
    h = conn()
    secs = [i for i in range(n_sect) if i % NC == k]; rnd2 = random.Random(seed * 100 + k * 10 + p); rnd2.shuffle(secs)
    inflight = []
    try:
        for i in secs:
            while len(inflight) >= QD:
                h.poll(-1)
                inflight = [c for c in inflight if not h.aio_command_completed(c)]
            inflight.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([val(p, i)]) * S), lo + i * S))
        while inflight:
            h.poll(-1)
            inflight = [c for c in inflight if not h.aio_command_completed(c)]
        h.flush()
    except nbd.Error as e:
        errs.append(f"writer {k} pass {p}: {e}")
    h.shutdown()
B = 65536
blocks = [b for b in range((lo + B - 1) // B, (lo + n_sect * S) // B)]   # whole 64K blocks inside the region
in_block = lambda i: any(b * B <= lo + i * S < (b + 1) * B for b in blocks)
def trimmer(k, errs):
    h = conn()
    try:
        for b in blocks:
            if b % NC == k: h.trim(B, b * B)
        h.flush()
    except nbd.Error as e:
        errs.append(f"trimmer {k}: {e}")
    h.shutdown()
def after(p, i):
    if p < 3: return bytes([val(p, i)]) * S
    return bytes(S) if in_block(i) else bytes([val(2, i)]) * S
def reader(p, stop, errs, stats):
    h = conn()
    while not stop.is_set():
        a = rnd.randrange(0, n_sect - 128); n = rnd.randint(1, 128)
        try:
            got = h.pread(n * S, lo + a * S)
        except nbd.Error as e:
            errs.append(f"read {n} sectors at sector {a} during pass {p}: {e}"); break
        for j in range(n):
            i = a + j; g = got[j * S:(j + 1) * S]
            prev = old[i * S:(i + 1) * S] if p == 0 else after(p - 1, i)
            if g != prev and g != after(p, i):
                errs.append(f"pass {p}: sector {i} read {g[:8].hex()}.. neither before nor after"); break
        stats[0] += 1
    h.shutdown()
errs, bad = [], 0
for p in range(4):
    stop = threading.Event(); stats = [0]
    rt = [threading.Thread(target=reader, args=(p, stop, errs, stats)) for _ in range(2)]
    wt = [threading.Thread(target=writer if p < 3 else trimmer, args=(k, p, errs) if p < 3 else (k, errs)) for k in range(NC)]
    t0 = time.time()
    for t in rt + wt: t.start()
    for t in wt: t.join()
    stop.set()
    for t in rt: t.join()
    got = h0.pread(n_sect * S, lo)
    wrong = [i for i in range(n_sect) if got[i * S:(i + 1) * S] != after(p, i)]
    print(f"pass {p}: {n_sect} sectors {'trimmed (whole 64K blocks)' if p == 3 else 'written'} over {NC} connections in {time.time() - t0:.2f}s, {stats[0]} concurrent reads; {len(wrong)} sectors wrong after flush")
    if wrong: errs.append(f"pass {p}: sectors wrong after all writes: first {wrong[:5]}")
    if errs: break
for e in errs[:10]: print("  -", e)
sys.exit(1 if errs else 0)
PY

# the data persists
lazybd_stop
lazybd_start "$url" --cache-dir "$T/cache" --writable
run_fio multi-vo2 vo "${J[@]}" --verify=crc32c --verify_only --iodepth=16
run_fio w64k-vo2 vo --rw=randwrite --bs=64k --offset=$((24 * M + 1000)) --size=$((7 * M)) --verify=crc32c --verify_only
lazybd_stop

# control: without the overlay the blocks are the origin's, verify must fail
lazybd_start "$url" --cache-dir "$T/cache" --writable --overlay-dir "$T/empty-overlay"
if (cd "$T" && fio --name=control --ioengine=nbd --uri="$LAZYBD_URI" --output-format=json --output="$T/control.json" \
     --verify_state_save=0 "${J[@]}" --verify=crc32c --verify_only --iodepth=16) > "$T/control.out" 2>&1; then
  fail "fio --verify_only passed on an empty overlay: the verification checks nothing"
fi
log "control: --verify_only over an empty overlay fails as it must ($(grep -m1 -io 'verify: bad[^,]*\|crc32c: verify failed[^,]*\|bad magic[^,]*' "$T/control.out" || echo 'fio failed'))"
lazybd_stop

assert_eq "$origin_sha" "$(sha_file "$T/origin/disk.img")" "origin file sha256"
assert_origin_only_read
