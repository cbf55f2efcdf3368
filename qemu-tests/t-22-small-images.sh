#!/usr/bin/env bash
# t-22-small-images: images smaller than, or just around, one cache block:
# 1 byte, 1000 bytes, 64 KiB - 1, 64 KiB + 1 and 128 KiB + 511 (the default
# block is 64 KiB). For each: the export size equals the file size, a full
# nbdcopy read and qemu-img compare match, the map covers exactly the export,
# and a restart on the warm cache serves the same bytes with no data request.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nbdinfo qemu-img nginx

sizes=(1 1000 65535 65537 131583)
mkdir -p "$T/origin"
for s in "${sizes[@]}"; do head -c "$s" /dev/urandom > "$T/origin/img-$s.raw"; done
origin_start "$T/origin" >/dev/null

for s in "${sizes[@]}"; do
  f=$T/origin/img-$s.raw
  lazybd_start "$ORIGIN_URL/img-$s.raw" --cache-dir "$T/cache"
  assert_eq "$s" "$(nbdinfo --size "$LAZYBD_URI")" "export size for a $s-byte image"
  assert_same_as_file "$f" "$LAZYBD_URI" --no-extents
  out=$(qemu-img compare -f raw -F raw "$f" "$LAZYBD_URI" 2>&1) || fail "compare ($s bytes): $out"
  end=$(nbdinfo --map --json "$LAZYBD_URI" | "$NBD_PYTHON" -c 'import json,sys; e=json.load(sys.stdin); print(e[-1]["offset"]+e[-1]["length"])') ||
    fail "nbdinfo --map failed for the $s-byte image"
  assert_eq "$s" "$end" "end of the extent map for a $s-byte image"
  lazybd_stop
  m=$(origin_mark)
  lazybd_start "$ORIGIN_URL/img-$s.raw" --cache-dir "$T/cache"
  assert_same_as_file "$f" "$LAZYBD_URI"
  lazybd_stop
  assert_eq 0 "$(origin_data_requests_since "$m" "/img-$s.raw")" "data GETs on the warm restart ($s bytes)"
done
