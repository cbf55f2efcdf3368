#!/usr/bin/env bash
# t-04-map: base:allocation extents. After one full read, nbdinfo --map must
# report the image's all-zero region (4 MiB, 4 MiB aligned) as zero (type bit
# 2, "hole,zero" or "zero"), and must never flag random data as zero. The
# extents must tile the whole export. A read using those extents (nbdcopy)
# still gives the origin's bytes.
. "$(dirname "$0")/lib.sh"
require_cmd nbdinfo nbdcopy nginx

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"
size=$(stat -c %s "$T/origin/disk.img")
log "zero region: [$ZERO_OFF, $((ZERO_OFF + ZERO_LEN)))"

check_map() {  # LABEL REQUIRE_ZERO(0|1)
  nbdinfo --map --json "$LAZYBD_URI" > "$T/map.json" 2> "$T/map.err" ||
    fail "nbdinfo --map $LAZYBD_URI failed: $(cat "$T/map.err")"
  nbdinfo --map --totals "$LAZYBD_URI" 2>&1 | sed "s/^/  $1 totals: /" >&2 || true
  "$NBD_PYTHON" - "$T/map.json" "$size" "$ZERO_OFF" "$ZERO_LEN" "$2" "$1" <<'PY'
import json, sys
ext = json.load(open(sys.argv[1]))
size, zoff, zlen, need, label = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6]
zend = zoff + zlen
errs = []
pos = 0
for e in ext:
    o, l, t = e["offset"], e["length"], e["type"]
    if o != pos: errs.append(f"extent at {o} but previous ended at {pos}")
    pos = o + l
    if t & 2 and (o < zoff or o + l > zend):
        errs.append(f"extent {o}+{l} type {t} ({e.get('description')}) says zero but overlaps random data outside [{zoff},{zend})")
if pos != size: errs.append(f"extents end at {pos}, export size {size}")
covered = 0
for e in ext:
    if e["type"] & 2:
        covered += max(0, min(e["offset"] + e["length"], zend) - max(e["offset"], zoff))
print(f"{label}: {len(ext)} extents; zero region [{zoff},{zend}) reported zero for {covered}/{zlen} bytes")
if need and covered != zlen:
    errs.append(f"after a full read, only {covered} of the {zlen} bytes in the all-zero region [{zoff},{zend}) are reported zero")
for m in errs: print("  -", m)
sys.exit(1 if errs else 0)
PY
}

check_map cold 0 || fail "cold map is wrong"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents   # reads everything once
check_map "after read" 1 || fail "map after a full read is wrong"
nbdinfo --map "$LAZYBD_URI" | sed 's/^/  map: /' >&2
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"                 # extent-driven read
lazybd_stop

# the zero knowledge is persistent: a fresh server on the same cache knows it
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"
check_map "after restart" 1 || fail "map after restart on the warm cache is wrong"
lazybd_stop
