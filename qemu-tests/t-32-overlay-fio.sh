#!/usr/bin/env bash
# t-32-overlay-fio: fio's libnbd engine writing to a --writable export, with
# fio's own data verification (crc32c headers in every block). Image 64 MiB.
#  - randrw, bs=4k, iodepth=16, 0..16 MiB, verify=crc32c do_verify=1;
#  - randrw, bs=64k, iodepth=16, starting at 16 MiB + 1000 (every I/O
#    straddles two 64K overlay blocks); the first 1000 bytes before it still
#    read as the origin and fio's verify header magic (0xacca) sits at
#    16 MiB + 1000 (the writes really landed unaligned);
#  - 4 jobs (numjobs=4, one NBD connection each), randwrite, bsrange 4k-128k,
#    8 MiB each on disjoint ranges from 32 MiB (offset_increment), iodepth 16,
#    verify; lazybd's log must show >= 4 connections open at once
#    (multi-conn); then the same jobs with --verify_only in a new fio process
#    (new connections read what others wrote);
#  - SIGTERM + restart: --verify_only again for the 64k job... no: for the
#    randwrite jobs (the 4 jobs, and a 64k randwrite pass) the data persisted.
#  Every fio run must exit 0 with error=0 in every job, and every verifying run
#  must have read back as many bytes as were written. The origin file is
#  unchanged and nginx saw only GETs.
. "$(dirname "$0")/lib.sh"
require_cmd fio nbdinfo nginx
require_nbd_python

mkimage "$T/origin/disk.img" 64
origin_sha=$(sha_file "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
lazybd_start "$url" --cache-dir "$T/cache" --writable
M=$((1024 * 1024))

# run_fio NAME CHECK FIO-ARGS... : CHECK is rw (reads and writes happened),
# wv (every written byte was read back by the verify phase) or vo (verify
# only: read SIZE bytes per job, wrote nothing)
run_fio() {
  local name=$1 check=$2; shift 2
  fio --name="$name" --ioengine=nbd --uri="$LAZYBD_URI" --output-format=json \
      --output="$T/$name.json" "$@" > "$T/$name.out" 2>&1 ||
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
    if check == "vo" and (r["io_bytes"] == 0 or w["io_bytes"] != 0):
        print("  - verify_only read nothing or wrote"); bad = 1
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

# the data persists
lazybd_stop
lazybd_start "$url" --cache-dir "$T/cache" --writable
run_fio multi-vo2 vo "${J[@]}" --verify=crc32c --verify_only --iodepth=16
run_fio w64k-vo2 vo --rw=randwrite --bs=64k --offset=$((24 * M + 1000)) --size=$((7 * M)) --verify=crc32c --verify_only
lazybd_stop

assert_eq "$origin_sha" "$(sha_file "$T/origin/disk.img")" "origin file sha256"
assert_eq "GET " "$(nginx_methods_seen)" "request methods nginx saw"
