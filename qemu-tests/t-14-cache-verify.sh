#!/usr/bin/env bash
# t-14-cache-verify: the cache directory and the `cache` subcommands.
#  - layout: one subdirectory per origin holding meta, data and origin (two
#    origins in one --cache-dir -> two subdirectories); `cache info` names both
#    origins; `cache verify` exits 0 on a clean cache;
#  - damage: flip bytes inside the data file of a fully cached image ->
#    `cache verify` exits non-zero;
#  - a server started on the damaged cache still serves the origin's exact
#    bytes (the CRC catches the bad block, which is fetched again), and after
#    that the cache verifies clean again.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nginx

mkimage "$T/origin/disk.img" 64
mkimage "$T/origin/other.img" 16
origin_start "$T/origin" >/dev/null
C=$T/cache

for img in disk other; do
  lazybd_start "$ORIGIN_URL/$img.img" --cache-dir "$C"
  assert_same_as_file "$T/origin/$img.img" "$LAZYBD_URI" --no-extents
  lazybd_stop
done

mapfile -t subs < <(find "$C" -mindepth 1 -maxdepth 1 -type d | sort)
assert_eq 2 "${#subs[@]}" "subdirectories of the cache dir for 2 origins ($(ls "$C" | tr '\n' ' '))"
disk_sub=""
for d in "${subs[@]}"; do
  for f in meta data origin; do
    [[ -f $d/$f ]] || fail "cache subdirectory $(basename "$d") has no '$f' file ($(ls "$d" | tr '\n' ' '))"
  done
  grep -qF "disk.img" "$d/origin" 2>/dev/null && disk_sub=$d
done
[[ -n $disk_sub ]] || fail "no cache subdirectory whose 'origin' file names disk.img"
log "cache for disk.img: $(basename "$disk_sub"): $(ls -ls "$disk_sub" | tail -n +2 | awk '{print $NF"="$6"("$1"K used)"}' | tr '\n' ' ')"

info=$(lazybd_cache info "$C" 2>&1) || fail "cache info failed: $info"
echo "$info" | sed 's/^/  cache info: /' >&2
for img in disk other; do
  [[ $info == *"$ORIGIN_URL/$img.img"* ]] || fail "cache info does not list $ORIGIN_URL/$img.img"
done
out=$(lazybd_cache verify "$C" 2>&1) || fail "cache verify on a clean cache failed: $out"
log "clean verify: $(echo "$out" | tail -n 2 | tr '\n' ' ')"

# damage: flip 16 bytes at 1 MiB + 100 of the data file (random image data,
# outside the all-zero region) and 16 bytes at 3/4 of the file
"$NBD_PYTHON" - "$disk_sub/data" <<'PY'
import os, sys
p = sys.argv[1]; n = os.path.getsize(p)
with open(p, "r+b") as f:
    for off in ((1 << 20) + 100, n * 3 // 4 + 4099):
        f.seek(off); b = f.read(16); f.seek(off); f.write(bytes(x ^ 0xFF for x in b))
        print(f"flipped 16 bytes at {off} of {n}-byte data file")
PY
if out=$(lazybd_cache verify "$C" 2>&1); then
  fail "cache verify exited 0 on a damaged data file: $out"
fi
log "damaged verify refused as it must: $(echo "$out" | tail -n 3 | tr '\n' ' ')"

lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$C"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
lazybd_stop
out=$(lazybd_cache verify "$C" 2>&1) || fail "cache verify after serving from the damaged cache still fails (bad blocks not repaired): $out"
