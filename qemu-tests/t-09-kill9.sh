#!/usr/bin/env bash
# t-09-kill9: crash consistency. Three times: start lazybd on the same cache,
# start a full nbdcopy read of a 256 MiB image, SIGKILL lazybd mid-fill (after
# 0.3 / 0.6 / 1.0 s, or earlier once a quarter of the image has been fetched in
# this round, so the kill always lands while blocks are being fetched and
# written); then `lazybd cache verify` must exit 0. Finally a fresh server on
# that cache must serve the exact origin bytes (qemu-img compare + sha256),
# and a restart with a unix socket path left behind by a killed server works.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy qemu-img nginx

mkimage "$T/origin/disk.img" 256
size=$(stat -c %s "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
sock=$T/lazybd.sock

round=0
for delay in 0.3 0.6 1.0; do
  round=$((round + 1))
  lazybd_start "$url" --cache-dir "$T/cache"
  m=$(origin_mark)
  nbdcopy --no-extents "$LAZYBD_URI" null: 2> "$T/copy.err" & cp=$!
  bg_track "$cp"
  t0=$(date +%s.%N)
  while :; do
    el=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')
    got=$(origin_bytes_since "$m" /disk.img)
    if awk -v e="$el" -v d="$delay" 'BEGIN{exit !(e >= d)}' || ((got * 4 >= size)); then break; fi
    _pid_alive "$cp" || break
    sleep 0.02
  done
  _pid_alive "$cp" || fail "round $round: the full read finished before the kill (${el}s, $got bytes fetched): nothing was interrupted"
  lazybd_kill9
  wait "$cp" && log "note: nbdcopy exited 0 after the kill" || true
  log "round $round: killed after ${el}s, $got bytes fetched this round, $(origin_data_requests_since "$m" /disk.img) data GETs"
  out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "round $round: cache verify after kill -9 failed (status $?): $out"
  log "round $round: cache verify OK: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
done

lazybd_start "$url" --cache-dir "$T/cache" --listen "127.0.0.1:$(free_port)"
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
