#!/usr/bin/env bash
# t-08-origin-changed: the origin is replaced between two runs (same size, new
# content, new mtime hence new ETag/Last-Modified). The second run on the same
# cache dir must serve the NEW content (no stale cached block) and log a
# warning about the changed origin.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy curl nginx

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img

lazybd_start "$url" --cache-dir "$T/cache"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
lazybd_stop
etag1=$(curl -fsSI "$url" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')

old=$(sha_file "$T/origin/disk.img")
mtime=$(stat -c %Y "$T/origin/disk.img")
mkimage "$T/new.img" 64
cp "$T/new.img" "$T/origin/disk.img.new"
touch -d "@$((mtime + 100))" "$T/origin/disk.img.new"
mv -f "$T/origin/disk.img.new" "$T/origin/disk.img"
new=$(sha_file "$T/origin/disk.img")
[[ $old != "$new" ]] || fail "test bug: new origin content equals the old one"
etag2=$(curl -fsSI "$url" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')
[[ $etag1 != "$etag2" ]] || fail "test bug: nginx ETag did not change ($etag1)"
log "origin replaced: ETag $etag1 -> $etag2, same size"

m=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/cache"
assert_same_as_file "$T/new.img" "$LAZYBD_URI" --no-extents
assert_same_as_file "$T/new.img" "$LAZYBD_URI"
lazybd_stop
log "run 2 fetched $(origin_data_requests_since "$m" /disk.img) data GETs"
if ! lazybd_log_plain | grep -Ei 'warn' | grep -Eqi 'chang|etag|modif|mismatch|stale|differ|invalidat|replac'; then
  fail "no warning about the changed origin in lazybd's log (want a WARN line mentioning the change)"
fi
log "warning: $(lazybd_log_plain | grep -Ei 'warn' | grep -Ei 'chang|etag|modif|mismatch|stale|differ|invalidat|replac' | head -n 1)"
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "cache verify after the origin change failed: $out"
