#!/usr/bin/env bash
# t-56-manifest: manifests (lazybd manifest build/show, serve --manifest) with
# a real nginx origin.
#   1. build from the origin, show it; serve --manifest FILE: identical bytes,
#      the log says every block is checked
#   2. published beside the image (IMAGE.lazybd-manifest): found by default
#   3. the origin lies: one block's bytes changed in place with the mtime put
#      back, so the ETag (mtime-size) is the same and only the manifest can
#      tell. That block is EIO, never served, counted; the other blocks read
#      fine; nothing wrong is cached
#   4. refusals naming the manifest: the image replaced (new ETag), a damaged
#      manifest, a newer format version
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy curl nginx
require_nbd_python

mkimage "$T/origin/disk.img" 16
cp "$T/origin/disk.img" "$T/disk.orig"
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img

# ---- 1. build, show, serve with it
out=$(cd "$T" && "$LAZYBD" manifest build "$url" --no-progress 2>&1) || fail "manifest build: $out"
log "build: $out"
[[ -s $T/disk.img.lazybd-manifest ]] || fail "no default output disk.img.lazybd-manifest"
show=$("$LAZYBD" manifest show "$T/disk.img.lazybd-manifest") || fail "manifest show"
assert_grep "blocks: +256 of 64 KiB" <(echo "$show") "show: 16 MiB in 64 KiB blocks"
assert_grep "image: +$url" <(echo "$show") "show: the image it pins"
lazybd_start "$url" --cache-dir "$T/cache1" --control none --manifest "$T/disk.img.lazybd-manifest"
assert_same_as_file "$T/disk.orig" "$LAZYBD_URI"
lazybd_stop
assert_grep 'manifest: every block from the origin is checked against it' "$LAZYBD_LOG" "the manifest is used"
assert_grep 'manifest_failures=0' "$LAZYBD_LOG" "no mismatch on honest bytes"

# ---- 2. published beside the image: found by default
cp "$T/disk.img.lazybd-manifest" "$T/origin/disk.img.lazybd-manifest"
lazybd_start "$url" --cache-dir "$T/cache2" --control none
assert_same_as_file "$T/disk.orig" "$LAZYBD_URI"
lazybd_stop
assert_grep "manifest=$url.lazybd-manifest" "$LAZYBD_LOG" "the published manifest is found"

# ---- 3. the origin lies under the same ETag
etag1=$(curl -fsSI "$url" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')
mtime=$(stat -c %Y "$T/origin/disk.img")
printf 'LIE' | dd of="$T/origin/disk.img" bs=1 seek=$((5 * MIB + 1000)) conv=notrunc status=none
touch -d "@$mtime" "$T/origin/disk.img"
etag2=$(curl -fsSI "$url" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')
assert_eq "$etag1" "$etag2" "the lying origin keeps its ETag"
lazybd_start "$url" --cache-dir "$T/cache3" --control none --no-readahead
if nbd_read_ok "$LAZYBD_URI" $((5 * MIB)) "$T/disk.orig"; then
  fail "the changed block was served"
fi
for off in 0 $((4 * MIB)) $((6 * MIB)) $((16 * MIB - 65536)); do
  nbd_read_ok "$LAZYBD_URI" "$off" "$T/disk.orig" || fail "an honest block at $off was not served"
done
# Asked again, it is refused again: nothing wrong was cached.
if nbd_read_ok "$LAZYBD_URI" $((5 * MIB)) "$T/origin/disk.img"; then
  fail "the origin's wrong bytes were served on a second read"
fi
lazybd_stop
assert_grep 'block 80 .* does not match its manifest digest: not served' "$LAZYBD_LOG" \
  "the error names the block"
n=$(grep -o 'manifest_failures=[0-9]*' "$LAZYBD_LOG" | tail -n 1 | cut -d= -f2)
assert_ge "$n" 2 "both refusals counted"
cp "$T/disk.orig" "$T/origin/disk.img"
touch -d "@$mtime" "$T/origin/disk.img"

# ---- 4. refusals
mkimage "$T/origin/disk.img.new" 16 7
mv -f "$T/origin/disk.img.new" "$T/origin/disk.img"
lazybd_expect_start_failure 20 "$url" --cache-dir "$T/cache4" --control none \
  --manifest "$T/disk.img.lazybd-manifest" --listen "127.0.0.1:$(free_port)"
assert_grep "manifest $T/disk.img.lazybd-manifest was built from .* refused" "$LAZYBD_LOG" \
  "a manifest of the image's earlier version is refused"
lazybd_expect_start_failure 20 "$url" --cache-dir "$T/cache4" --control none \
  --listen "127.0.0.1:$(free_port)"
assert_grep "manifest $url.lazybd-manifest was built from" "$LAZYBD_LOG" \
  "a stale published manifest is refused too"
cp "$T/disk.img.lazybd-manifest" "$T/damaged"
printf '\xff' | dd of="$T/damaged" bs=1 seek=200 conv=notrunc status=none
lazybd_expect_start_failure 20 "$url" --cache-dir "$T/cache4" --control none \
  --manifest "$T/damaged" --listen "127.0.0.1:$(free_port)"
assert_grep "manifest $T/damaged: its checksum does not match" "$LAZYBD_LOG" "a damaged manifest is refused"
cp "$T/disk.img.lazybd-manifest" "$T/newer"
printf '\x02' | dd of="$T/newer" bs=1 seek=8 conv=notrunc status=none
out=$("$LAZYBD" manifest show "$T/newer" 2>&1) && fail "show of a newer manifest succeeded"
assert_grep "format version 2, written by a newer lazybd" <(echo "$out") "a newer manifest is refused by name"
