#!/usr/bin/env bash
# qemu-tests/openstack-smoke.sh — smoke test of qemu-tests/openstack.sh: a
# real Swift (tempauth, short token life) and real Glances (file store, Swift
# store) on 127.0.0.1. Needs no lazybd binary. Run it like a test:
#   qemu-tests/run.sh qemu-tests/openstack-smoke.sh    (or: bash qemu-tests/openstack-smoke.sh)
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/openstack.sh"
require_cmd curl python3 ss cmp

# every listening socket of PID... is on 127.0.0.1
assert_loopback_only() {
  local p bad
  for p in "$@"; do
    bad=$(ss -Htulnp 2>/dev/null | grep "pid=$p," | awk '{print $5}' | grep -v '^127\.0\.0\.1:' || true)
    [[ -z $bad ]] || fail "pid $p ($(_swift_pid_name "$p")) listens on $bad"
  done
}

# show_image URL ID : the interesting fields of GET /v2/images/ID, one a line
show_image() {
  curl -fsS "$1/v2/images/$2" | python3 -c '
import json, sys
j = json.load(sys.stdin)
for k in ("id", "status", "disk_format", "container_format", "size", "virtual_size", "checksum",
          "os_hash_algo", "os_hash_value", "direct_url", "stores"):
    print(f"  {k} = {j.get(k)}")
for loc in j.get("locations", []):
    print("  location =", loc["url"], json.dumps(loc["metadata"]))'
}

# image_field URL ID FIELD
image_field() {
  curl -fsS "$1/v2/images/$2" | python3 -c "import json,sys; print(json.load(sys.stdin).get('$3'))"
}

# ranged_get URL OUT [CURL-ARGS...] : GET bytes 100-199; prints "STATUS CONTENT-RANGE"
ranged_get() {
  local url=$1 out=$2 h; shift 2
  h=$(curl -sS -r 100-199 -D - -o "$out" "$@" "$url" | tr -d '\r') || fail "GET $url failed"
  echo "$(head -n 1 <<<"$h" | awk '{print $2}') $(awk -F': ' 'tolower($1)=="content-range" {print $2}' <<<"$h")"
}

# ---- Swift
t0=$(date +%s.%N)
swift_start 3
log "swift_start took $(_os_elapsed "$t0") s"
assert_loopback_only "${SWIFT_PIDS[@]}"
[[ $SWIFT_AUTH_URL == http://127.0.0.1:*/auth/v1.0 ]] || fail "SWIFT_AUTH_URL=$SWIFT_AUTH_URL"

head -c $((4 * MIB)) /dev/urandom > "$T/obj.bin"
swift_put lazybd obj.bin "$T/obj.bin"
read -r tok url < <(swift_token)
mark=$(swift_access_mark)
r=$(ranged_get "$url/lazybd/obj.bin" "$T/range.out" -H "X-Auth-Token: $tok")
log "Swift ranged GET: $r"
assert_eq "206 bytes 100-199/$((4 * MIB))" "$r" "Swift GET -r 100-199"
cmp -s "$T/range.out" <(tail -c +101 "$T/obj.bin" | head -c 100) || fail "Swift range body differs"
etag=$(curl -sS -I -H "X-Auth-Token: $tok" "$url/lazybd/obj.bin" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag" {print $2}')
log "Swift ETag: $etag (md5 $(md5sum < "$T/obj.bin" | awk '{print $1}'))"
sleep 0.3   # the access log line is written after the response
swift_access_lines "$mark" | grep -q '^GET /v1/AUTH_test/lazybd/obj.bin 206$' ||
  fail "no 'GET .../obj.bin 206' in $SWIFT_STATE/proxy-access.log: $(swift_access_lines "$mark" | tr '\n' ';')"
log "proxy access log since mark: $(swift_access_lines "$mark" | tr '\n' ';')"

sleep 5
code=$(curl -sS -o /dev/null -w '%{http_code}' -r 100-199 -H "X-Auth-Token: $tok" "$url/lazybd/obj.bin")
log "after 5 s, the old token (token_life 3) gets HTTP $code"
assert_eq 401 "$code" "expired tempauth token"
read -r tok2 _ < <(swift_token)
[[ $tok2 != "$tok" ]] || fail "swift_token returned the expired token"
code=$(curl -sS -o /dev/null -w '%{http_code}' -r 100-199 -H "X-Auth-Token: $tok2" "$url/lazybd/obj.bin")
assert_eq 206 "$code" "fresh token"

# ---- Glance, file store
head -c $((1 * MIB + 4321)) /dev/urandom > "$T/small.raw"
t0=$(date +%s.%N)
glance_start file
log "glance_start file took $(_os_elapsed "$t0") s"
G_FILE=$GLANCE_URL
assert_loopback_only "$(cat "$GLANCE_STATE/pid")"
id=$(glance_upload smoke-file raw "$T/small.raw")
log "file-store image $id:"
show_image "$G_FILE" "$id" >&2
assert_eq active "$(image_field "$G_FILE" "$id" status)" "file image status"
assert_eq "$(stat -c %s "$T/small.raw")" "$(image_field "$G_FILE" "$id" size)" "file image size"
assert_eq "$(md5sum < "$T/small.raw" | awk '{print $1}')" "$(image_field "$G_FILE" "$id" checksum)" "file image checksum"
assert_eq "$(sha512sum < "$T/small.raw" | awk '{print $1}')" "$(image_field "$G_FILE" "$id" os_hash_value)" "file image os_hash_value"
du=$(image_field "$G_FILE" "$id" direct_url)
[[ $du == "file://$GLANCE_STATE/images/$id" ]] || fail "file direct_url $du"
cmp -s "${du#file://}" "$T/small.raw" || fail "the file store's file differs from the upload"
r=$(ranged_get "$G_FILE/v2/images/$id/file" "$T/grange.out")
log "Glance (file) ranged GET /file: $r"
assert_eq "206 bytes 100-199/$(stat -c %s "$T/small.raw")" "$r" "Glance file-store ranged GET"
cmp -s "$T/grange.out" <(tail -c +101 "$T/small.raw" | head -c 100) || fail "Glance range body differs"

# ---- Glance, Swift store (both Glances running)
t0=$(date +%s.%N)
glance_start swift
log "glance_start swift took $(_os_elapsed "$t0") s"
G_SWIFT=$GLANCE_URL
[[ $G_SWIFT != "$G_FILE" ]] || fail "two Glances on the same URL"
assert_loopback_only "$(cat "$GLANCE_STATE/pid")"
id=$(glance_upload smoke-swift raw "$T/small.raw")
log "swift-store image $id:"
show_image "$G_SWIFT" "$id" >&2
du=$(image_field "$G_SWIFT" "$id" direct_url)
assert_eq "swift+config://ref1/glance/$id" "$du" "swift direct_url"
read -r tok url < <(swift_token)
curl -fsS -H "X-Auth-Token: $tok" -o "$T/from-swift.raw" "$url/glance/$id" || fail "GET the image from Swift"
cmp -s "$T/from-swift.raw" "$T/small.raw" || fail "the Swift object glance/$id differs from the upload"
etag=$(curl -sS -I -H "X-Auth-Token: $tok" "$url/glance/$id" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag" {print $2}')
log "Swift object glance/$id: identical to the upload, ETag $etag"
r=$(ranged_get "$G_SWIFT/v2/images/$id/file" "$T/grange2.out")
log "Glance (swift) ranged GET /file: $r"
assert_eq "400" "${r%% *}" "Glance swift-store ranged GET (glance_store: no random access)"
code=$(curl -sS -o "$T/full.out" -w '%{http_code}' "$G_SWIFT/v2/images/$id/file")
assert_eq 200 "$code" "Glance swift-store full GET"
cmp -s "$T/full.out" "$T/small.raw" || fail "Glance swift-store full GET differs"

# ---- the same with the credentials in the location URL (deprecated options)
GLANCE_SWIFT_INLINE_CREDS=1 glance_start swift
G_INLINE=$GLANCE_URL
id=$(glance_upload smoke-inline raw "$T/small.raw")
du=$(image_field "$G_INLINE" "$id" direct_url)
log "inline-credentials swift direct_url: $du"
assert_eq "swift+http://test%3Atester:testing@127.0.0.1:${SWIFT_PROXY_URL##*:}/auth/v1.0/glance/$id" "$du" "inline swift direct_url"

# ---- stop
pids=("${SWIFT_PIDS[@]}")
for d in "${_GLANCE_STATES[@]}"; do pids+=("$(cat "$d/pid")"); done
glance_stop "$G_INLINE"
code=$(curl -s -o /dev/null -w '%{http_code}' "$G_INLINE/v2/images" || true)
assert_eq 000 "$code" "stopped Glance still answers"
glance_stop
glance_stop   # idempotent
swift_stop
swift_stop
for p in "${pids[@]}"; do if _pid_alive "$p"; then fail "pid $p still running after the stops"; fi; done
log "all $((${#pids[@]})) processes stopped"
log "PASS"
