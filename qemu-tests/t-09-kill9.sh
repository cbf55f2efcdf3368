#!/usr/bin/env bash
# t-09-kill9: crash consistency. Three times: start lazybd on the same cache,
# start a full nbdcopy read of a 256 MiB image, SIGKILL lazybd mid-fill (after
# 0.3 / 0.6 / 1.0 s, or as soon as nginx has logged 16 / 32 / 48 MiB of responses in
# this round, so the kill lands while blocks are being fetched and written
# even when the origin is fast); then `lazybd cache verify` must exit 0.
# Finally a fresh server on that cache must serve the exact origin bytes
# (qemu-img compare + sha256), and a restart with a unix socket path left
# behind by a killed server works.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy qemu-img nginx

mkimage "$T/origin/disk.img" 256
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
sock=$T/lazybd.sock

round=0
for spec in "0.3 16" "0.6 32" "1.0 48"; do
  read -r delay mib <<<"$spec"
  round=$((round + 1))
  lazybd_start "$url" --cache-dir "$T/cache"
  m=$(origin_mark)
  nbdcopy --no-extents "$LAZYBD_URI" null: 2> "$T/copy.err" & cp=$!
  bg_track "$cp"
  read -r el got < <(wait_origin_bytes "$m" $((mib * MIB)) "$delay" /disk.img "$cp")
  _pid_alive "$cp" || fail "round $round: the full read finished before the kill (${el}s, $got bytes fetched): nothing was interrupted"
  lazybd_kill9
  wait "$cp" && log "note: nbdcopy exited 0 after the kill" || true
  log "round $round: killed after ${el}s, $got bytes fetched this round, $(origin_data_requests_since "$m" /disk.img) data GETs"
  out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "round $round: cache verify after kill -9 failed (status $?): $out"
  log "round $round: cache verify OK: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
done

lazybd_start "$url" --cache-dir "$T/cache"
out=$(qemu-img compare -f raw -F raw "$T/origin/disk.img" "$LAZYBD_URI" 2>&1) ||
  fail "qemu-img compare after the kills: $out"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"
lazybd_stop
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "final cache verify failed: $out"

# a killed server leaves its unix socket file; the next start must cope
lazybd_start "$url" --cache-dir "$T/cache" --listen "unix:$sock"
lazybd_kill9
[[ -S $sock ]] && log "the killed server left its socket file $sock behind"
lazybd_start "$url" --cache-dir "$T/cache" --listen "unix:$sock"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_UNIX_URI"
lazybd_stop
