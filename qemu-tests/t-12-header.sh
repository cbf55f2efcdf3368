#!/usr/bin/env bash
# t-12-header: --header 'X-Test-Token: abc' is sent with every origin request.
# The origin's /secure/ location answers 403 without that header. With the
# header: serving works, the bytes match, and every request nginx logged for
# the image carried the token and got 206/200 (never 403). Without the header
# or with a wrong value: lazybd fails at start (non-zero exit).
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nginx

mkimage "$T/origin/secure/disk.img" 64
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/secure/disk.img

lazybd_start "$url" --cache-dir "$T/cache" --header 'X-Test-Token: abc'
assert_same_as_file "$T/origin/secure/disk.img" "$LAZYBD_URI" --no-extents
lazybd_stop
total=$(origin_requests /secure/disk.img)
with=$(_origin_lines 0 | awk -F'|' '$2=="GET" && $3=="/secure/disk.img" && $6=="abc" && ($4=="206" || $4=="200")' | wc -l)
log "with header: $with of $total GETs carried X-Test-Token: abc and succeeded"
assert_ge "$total" 1 "GETs to /secure/disk.img"
assert_eq "$total" "$with" "GETs that carried the header and were served"

lazybd_expect_start_failure 20 "$url" --cache-dir "$T/cache-nohdr" --listen "127.0.0.1:$(free_port)"
lazybd_expect_start_failure 20 "$url" --cache-dir "$T/cache-badhdr" --listen "127.0.0.1:$(free_port)" \
  --header 'X-Test-Token: wrong'
