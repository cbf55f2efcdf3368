#!/usr/bin/env bash
# t-21-https: an https:// origin (nginx with a certificate for 127.0.0.1 from
# a throw-away CA). With --origin-ca CA.pem: the export's bytes equal the
# image and a restart on the cache fetches no data. Without --origin-ca the
# certificate is untrusted and lazybd fails at start (non-zero exit).
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nginx openssl curl

mkimage "$T/origin/disk.img" 64
ORIGIN_TLS=1 origin_start "$T/origin" >/dev/null
[[ $ORIGIN_URL == https://* ]] || fail "test bug: origin is not https ($ORIGIN_URL)"
url=$ORIGIN_URL/disk.img

lazybd_start "$url" --cache-dir "$T/cache" --origin-ca "$ORIGIN_CA"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI" --no-extents
lazybd_stop
m=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/cache" --origin-ca "$ORIGIN_CA"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"
lazybd_stop
assert_eq 0 "$(origin_data_requests_since "$m" /disk.img)" "data GETs after a restart on the https origin's cache"

lazybd_expect_start_failure 30 "$url" --cache-dir "$T/cache2" --listen "127.0.0.1:$(free_port)"
