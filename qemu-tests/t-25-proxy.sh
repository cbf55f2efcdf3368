#!/usr/bin/env bash
# t-25-proxy: origin requests through a real caching proxy (nginx
# proxy_cache with the slice module, the way a site cache or a P2P engine's
# HTTP proxy sits between hosts and an image store), every strict check
# still applied to what comes back.
#   1. HTTP_PROXY from the environment: the export equals the image; every
#      request went through the proxy (its log), the origin saw only the
#      proxy's 1 MiB slices
#   2. a second lazybd, empty cache, same proxy: identical, and the origin
#      sees no request at all (the proxy's cache served it)
#   3. --origin-proxy URL with no variable set works the same;
#      --origin-proxy none and NO_PROXY bypass a proxy the environment names
#   4. a proxy that drops Range (answers 200 with the whole file) is refused
#      at start with a clear error, never served
. "$(dirname "$0")/lib.sh"
require_cmd nginx nbdcopy curl

mkimage "$T/origin/disk.img" 24 777
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
img=$T/origin/disk.img

P=$T/proxy
mkdir -p "$P/cache" "$P/tmp"
pport=$(free_port)
cat > "$P/nginx.conf" <<EOF
daemon on;
worker_processes 1;
pid $P/nginx.pid;
error_log $P/error.log warn;
events { worker_connections 256; }
http {
  log_format p '\$request_method|\$request_uri|\$status|\$http_range|\$upstream_cache_status|\$server_port';
  access_log $P/access.log p;
  client_body_temp_path $P/tmp; proxy_temp_path $P/tmp;
  fastcgi_temp_path $P/tmp; uwsgi_temp_path $P/tmp; scgi_temp_path $P/tmp;
  proxy_cache_path $P/cache levels=1:2 keys_zone=images:10m max_size=1g inactive=1h use_temp_path=off;
  server {
    # A caching forward proxy for the origin: 1 MiB slices, each cached.
    listen 127.0.0.1:$pport;
    location / {
      slice 1m;
      proxy_cache images;
      proxy_cache_key \$uri\$slice_range;
      proxy_set_header Range \$slice_range;
      proxy_cache_valid 200 206 1h;
      proxy_http_version 1.1;
      proxy_pass $ORIGIN_URL;
    }
  }
}
EOF
nginx -c "$P/nginx.conf" -p "$P" -e "$P/error.log" || fail "proxy nginx did not start"
bg_track "$(cat "$P/nginx.pid")"
proxy=http://127.0.0.1:$pport
for _ in $(seq 100); do curl -fsS -o /dev/null -r 0-0 -x "$proxy" "$url" && break; sleep 0.05; done
: > "$P/access.log"
m0=$(origin_mark)

# ---- 1. HTTP_PROXY
HTTP_PROXY=$proxy lazybd_start "$url" --cache-dir "$T/cache1" --control none
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop
assert_grep "origin requests go through a proxy.*proxy=$proxy from=\"HTTP_PROXY\"" "$LAZYBD_LOG" "the proxy is logged"
through=$(grep -c "^GET|/disk.img|20[06]|" "$P/access.log" || true)
origin_ranges=$(_origin_lines "$m0" | awk -F'|' '$3=="/disk.img" {print $5}' | sort -u)
log "proxy served $through requests; origin saw ranges: $(tr '\n' ' ' <<<"$origin_ranges")"
assert_ge "$through" 2 "requests that went through the proxy"
while read -r r; do
  [[ -z $r || $r =~ ^bytes=[0-9]+-[0-9]+$ ]] || fail "the origin saw a request not from the proxy's slices: $r"
  if [[ -n $r ]]; then
    s=${r#bytes=}; s=${s%-*}
    ((s % MIB == 0)) || fail "origin range $r is not a 1 MiB slice"
  fi
done <<<"$origin_ranges"

# ---- 2. the proxy's cache serves a second host
m1=$(origin_mark)
HTTP_PROXY=$proxy lazybd_start "$url" --cache-dir "$T/cache2" --control none
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop
assert_eq 0 "$(origin_requests_since "$m1" /disk.img)" "origin requests while the proxy's cache served"
hits=$(grep -c '|HIT|' "$P/access.log" || true)
log "proxy cache hits so far: $hits"
assert_ge "$hits" 2 "proxy cache hits"

# ---- 3. --origin-proxy; none; NO_PROXY
n=$(wc -l < "$P/access.log")
lazybd_start "$url" --cache-dir "$T/cache3" --control none --origin-proxy "$proxy"
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop
assert_grep 'from="--origin-proxy"' "$LAZYBD_LOG" "--origin-proxy is logged"
assert_ge "$(($(wc -l < "$P/access.log") - n))" 2 "requests through --origin-proxy"
n=$(wc -l < "$P/access.log")
HTTP_PROXY=$proxy lazybd_start "$url" --cache-dir "$T/cache4" --control none --origin-proxy none
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop
HTTP_PROXY=$proxy NO_PROXY=127.0.0.1 lazybd_start "$url" --cache-dir "$T/cache5" --control none
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop
assert_eq "$n" "$(wc -l < "$P/access.log")" "proxy requests with --origin-proxy none and NO_PROXY"

# ---- 4. a proxy that drops Range
bport=$(free_port)
sed -e "s/listen 127.0.0.1:$pport;/listen 127.0.0.1:$bport;/" \
  -e 's/      slice 1m;/      proxy_set_header Range "";/' \
  -e '/proxy_cache images;/d' -e '/proxy_cache_key/d' -e '/proxy_set_header Range \$slice_range;/d' \
  -e "s#pid $P/nginx.pid;#pid $P/nginx-bad.pid;#" -e "s#access.log p;#access-bad.log p;#" \
  -e '/proxy_cache_path/d' "$P/nginx.conf" > "$P/nginx-bad.conf"
# max_ranges 0: nginx itself must not re-apply the client's Range to the 200.
sed -i 's/    location \/ {/    location \/ {\n      max_ranges 0;/' "$P/nginx-bad.conf"
nginx -c "$P/nginx-bad.conf" -p "$P" -e "$P/error.log" || fail "range-dropping proxy did not start"
bg_track "$(cat "$P/nginx-bad.pid")"
for _ in $(seq 100); do curl -fsS -o /dev/null -x "http://127.0.0.1:$bport" "$url" && break; sleep 0.05; done
code=$(curl -s -o /dev/null -w '%{http_code}' -r 0-0 -x "http://127.0.0.1:$bport" "$url")
assert_eq 200 "$code" "the bad proxy's answer to a ranged GET"
lazybd_expect_start_failure 20 "$url" --cache-dir "$T/cache6" --control none \
  --origin-proxy "http://127.0.0.1:$bport" --listen "127.0.0.1:$(free_port)"
assert_grep 'does not support byte ranges' "$LAZYBD_LOG" "a range-dropping proxy is refused"
