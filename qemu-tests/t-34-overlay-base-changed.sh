#!/usr/bin/env bash
# t-34-overlay-base-changed: an overlay records the image it was made over and
# refuses any other (its missing blocks would silently read the new image).
#  - write to a --writable export (default overlay dir), SIGTERM;
#  - replace the origin file: same size, new content, new mtime (so a new
#    ETag/Last-Modified); restart with the same cache dir and overlay dir:
#    lazybd must exit non-zero within 20 s with an error that mentions the
#    overlay and that it was made over another image; no listener is left;
#  - the overlay is untouched: every file in it has the same sha256 as
#    before the refused start (nothing deleted, truncated or rewritten);
#  - the same overlay dir given to an export of ANOTHER image (other.img,
#    same size, via --overlay-dir) is refused too;
#  - put the original file back (same bytes, same mtime: same ETag): the
#    export starts again and reads back the writes over the original image.
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io curl nginx
require_nbd_python

mkimage "$T/origin/disk.img" 32
cp -p "$T/origin/disk.img" "$T/original.img"
mtime=$(stat -c %Y "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
M=$((1024 * 1024))
ov=$T/cache/overlays/disk

lazybd_start "$url" --cache-dir "$T/cache" --writable
qemu-io -f raw "$LAZYBD_URI" -c "write -P 0x5a 1000 5000" -c "write -P 0x6b $((3 * M + 17)) 200000" \
  -c "write -z $((5 * M)) 65536" -c flush > "$T/qio.out" 2>&1 || fail "qemu-io writes failed: $(cat "$T/qio.out")"
cp "$T/original.img" "$T/model.img"
image_apply "$T/model.img" "w 1000 5000 0x5a" "w $((3 * M + 17)) 200000 0x6b" "z $((5 * M)) 65536"
assert_export_model "$T/model.img" "$LAZYBD_URI"
lazybd_stop
[[ -f $ov/base ]] || fail "no overlay at $ov"
overlay_sums() { (cd "$ov" && find . -type f ! -name lock -print0 | sort -z | xargs -0 sha256sum); }
sums_before=$(overlay_sums)
log "overlay files: $(echo "$sums_before" | awk '{print $2}' | tr '\n' ' ')"

etag1=$(curl -fsSI "$url" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')
mkimage "$T/new.img" 32
cp "$T/new.img" "$T/origin/disk.img.new"
touch -d "@$((mtime + 100))" "$T/origin/disk.img.new"
mv -f "$T/origin/disk.img.new" "$T/origin/disk.img"
etag2=$(curl -fsSI "$url" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')
[[ $etag1 != "$etag2" ]] || fail "test bug: nginx ETag did not change ($etag1)"
log "origin replaced: ETag $etag1 -> $etag2, same size"

port=$(free_port)
lazybd_expect_start_failure 20 "$url" --cache-dir "$T/cache" --writable --listen "127.0.0.1:$port"
msg=$(lazybd_log_plain | tr '\n' ' ')
log "refusal: $msg"
echo "$msg" | grep -qi 'overlay' || fail "the error does not mention the overlay: $msg"
echo "$msg" | grep -Eqi 'another image|other image|different image|made over|base' ||
  fail "the error does not say the overlay was made over another image: $msg"
if nbdinfo --size "nbd://127.0.0.1:$port/disk" >/dev/null 2>&1; then
  fail "something still answers on 127.0.0.1:$port after the refused start"
fi
assert_eq "$sums_before" "$(overlay_sums)" "overlay files after the refused start"

# the overlay given to an export of another image
cp "$T/new.img" "$T/origin/other.img"
lazybd_expect_start_failure 20 "$ORIGIN_URL/other.img" --cache-dir "$T/cache2" --writable --overlay-dir "$ov" \
  --listen "127.0.0.1:$(free_port)"
lazybd_log_plain | grep -qi 'overlay' || fail "the error for other.img does not mention the overlay: $(lazybd_log_plain | tail -n 3)"
assert_eq "$sums_before" "$(overlay_sums)" "overlay files after the refused start over other.img"

# the original image back (same bytes, same mtime -> same ETag): the overlay is usable again
cp "$T/original.img" "$T/origin/disk.img.new"
touch -d "@$mtime" "$T/origin/disk.img.new"
mv -f "$T/origin/disk.img.new" "$T/origin/disk.img"
etag3=$(curl -fsSI "$url" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')
assert_eq "$etag1" "$etag3" "ETag of the restored original"
lazybd_start "$url" --cache-dir "$T/cache" --writable
assert_export_model "$T/model.img" "$LAZYBD_URI"
lazybd_stop
