#!/usr/bin/env bash
# t-10-fio: fio's libnbd engine against lazybd: 4 KiB random reads at queue
# depth 32 for 5 s on a cold cache, then one sequential 1 MiB pass (qd 8) over
# the whole export. fio must exit 0, report error=0 for each job, and have
# read bytes (the whole export for the sequential pass).
. "$(dirname "$0")/lib.sh"
require_cmd fio nginx

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"
size=$(nbdinfo --size "$LAZYBD_URI")

run_fio() {  # NAME EXPECTED_MIN_BYTES FIO-ARGS...
  local name=$1 min=$2; shift 2
  fio --name="$name" --ioengine=nbd --uri="$LAZYBD_URI" --size="$size" \
      --output-format=json --output="$T/$name.json" "$@" > "$T/$name.out" 2>&1 ||
    fail "fio $name exited with status $?: $(tail -n 5 "$T/$name.out" | tr '\n' ' ')"
  "$NBD_PYTHON" - "$T/$name.json" "$name" "$min" <<'PY' || fail "fio $name reported errors"
import json, sys
j = json.load(open(sys.argv[1])); name, need = sys.argv[2], int(sys.argv[3])
bad = 0
for job in j["jobs"]:
    r = job["read"]
    print(f'fio {name}: error={job["error"]} read {r["io_bytes"]} bytes, {r["iops"]:.0f} IOPS, {r["bw_bytes"]/1048576:.1f} MiB/s, mean lat {r["lat_ns"]["mean"]/1000:.0f} us')
    if job["error"] != 0: print(f'  - error={job["error"]}'); bad = 1
    if r["io_bytes"] < need: print(f'  - read only {r["io_bytes"]} bytes, want >= {need}'); bad = 1
sys.exit(bad)
PY
}

run_fio randread 4096 --rw=randread --bs=4k --iodepth=32 --runtime=5 --time_based
run_fio seqread "$size" --rw=read --bs=1M --iodepth=8
lazybd_stop
