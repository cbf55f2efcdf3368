#!/usr/bin/env bash
# t-26-swift: swift://CONTAINER/OBJECT origins against a real OpenStack
# Swift (Debian's proxy, account, container and object servers, tempauth,
# memcached; qemu-tests/openstack.sh) and a real Keystone.
#   1. v1 auth (ST_AUTH/ST_USER/ST_KEY), tempauth tokens living 8 s: the
#      export equals the object (qemu-img compare, nbdcopy); reads spread
#      over several token lives all succeed (the 401s are answered by one
#      renewal each, logged); an object name with '/' and a space
#   2. a token given (OS_STORAGE_URL + OS_AUTH_TOKEN): serves until it
#      expires, then an uncached read fails with EIO and the log says the
#      token cannot be renewed
#   3. Keystone v3 (OS_AUTH_URL, user/password/project): the storage URL
#      from the catalog, a Swift proxy that takes Keystone tokens
#   4. the object replaced while serving: cached blocks read as before,
#      uncached ones fail with EIO (If-Match: 412), never new bytes
#   5. a writable export over Swift; wrong key refused at start; no token or
#      key in any lazybd log or command line
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/openstack.sh"
require_cmd nbdcopy qemu-img qemu-io curl
require_nbd_python

os_env_clear() {
  unset ST_AUTH ST_USER ST_KEY OS_AUTH_URL OS_USERNAME OS_PASSWORD OS_PROJECT_NAME \
    OS_USER_DOMAIN_NAME OS_PROJECT_DOMAIN_NAME OS_STORAGE_URL OS_AUTH_TOKEN \
    OS_IDENTITY_API_VERSION OS_INTERFACE OS_REGION_NAME
}
os_env_clear
swift_start 8
mkimage "$T/disk.img" 24 4242
swift_put images disk.raw "$T/disk.img"
mkimage "$T/other.img" 8 17
read -r tok0 _ < <(swift_token)
curl -fsS -X PUT -H "X-Auth-Token: $tok0" -T "$T/other.img" "$SWIFT_ACCOUNT_URL/images/tmpl/debian%2012.raw" -o /dev/null ||
  fail "uploading 'tmpl/debian 12.raw'"

# read_at OFF : 64 KiB at OFF of the export equal disk.img's (lib.sh)
read_at() { nbd_read_ok "$LAZYBD_URI" "$1" "$T/disk.img"; }

# ---- 1. v1 auth, tokens that expire every 4 s
export ST_AUTH=$SWIFT_AUTH_URL ST_USER=$SWIFT_USER ST_KEY=$SWIFT_KEY
lazybd_start swift://images/disk.raw --cache-dir "$T/cache" --control none --no-readahead --no-profile
assert_grep 'Swift origin .*auth=v1 auth at .* as test:tester \(ST_AUTH\)' "$LAZYBD_LOG" "the auth method is logged"
read_at 0 || fail "first read"
for i in 1 2 3; do
  sleep 9   # the token of the last read has expired
  read_at $((i * 4 * MIB)) || fail "read after token expiry #$i"
done
renewals=$(grep -c 'token renewed after a 401' "$LAZYBD_LOG" || true)
log "reads across 3 token lifetimes: all served; $renewals renewals"
assert_ge "$renewals" 3 "token renewals after 401s"
out=$(qemu-img compare -f raw -F raw "$T/disk.img" "$LAZYBD_URI" 2>&1) || fail "qemu-img compare: $out"
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
lazybd_start "swift://images/tmpl/debian%2012.raw" --cache-dir "$T/cache" --control none
assert_same_as_file "$T/other.img" "$LAZYBD_URI"
lazybd_stop
log "object with '/' and a space: identical"

# ---- 2. a given token: no renewal
read -r tok storage < <(swift_token)
os_env_clear
export OS_STORAGE_URL=$storage OS_AUTH_TOKEN=$tok
lazybd_start swift://images/disk.raw --cache-dir "$T/cache-token" --control none --no-readahead \
  --no-profile --origin-deadline 3
read_at 0 || fail "read with the given token"
sleep 9
out=$(read_at $((8 * MIB))) && fail "a read with an expired, unrenewable token succeeded"
log "expired given token: $out"
lazybd_stop
assert_grep 'cannot get another' "$LAZYBD_LOG" "the log says the given token cannot be renewed"
os_env_clear

# ---- 3. Keystone v3
keystone_start
# The project's own account (AUTH_<project id>) behind the Keystone proxy.
read -r ktok _ < <(keystone_token)
curl -fsS -X PUT -H "X-Auth-Token: $ktok" "$SWIFT_KEYSTONE_ACCOUNT_URL/images" -o /dev/null ||
  fail "creating the container in the Keystone account"
curl -fsS -X PUT -H "X-Auth-Token: $ktok" -T "$T/disk.img" "$SWIFT_KEYSTONE_ACCOUNT_URL/images/disk.raw" -o /dev/null ||
  fail "uploading to the Keystone account"
lazybd_start swift://images/disk.raw --cache-dir "$T/cache-ks" --control none
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
assert_grep 'auth=Keystone v3 at .* as user admin in project admin \(OS_AUTH_URL\)' "$LAZYBD_LOG" "Keystone auth logged"
assert_grep "storage=${SWIFT_KEYSTONE_ACCOUNT_URL}" "$LAZYBD_LOG" "the storage URL came from the catalog"
OS_PASSWORD_SEEN=$OS_PASSWORD
os_env_clear

# ---- 4. the object replaced while serving
export ST_AUTH=$SWIFT_AUTH_URL ST_USER=$SWIFT_USER ST_KEY=$SWIFT_KEY
lazybd_start swift://images/disk.raw --cache-dir "$T/cache-change" --control none --no-readahead \
  --no-profile --origin-deadline 3
read_at 0 || fail "read before the replacement"
mkimage "$T/new.img" 24 999
swift_put images disk.raw "$T/new.img"
read_at 0 || fail "a cached block after the replacement"
out=$(read_at $((12 * MIB))) && fail "an uncached block read after the object was replaced"
log "replaced object: $out"
lazybd_stop
assert_grep '412|no longer the one opened' "$LAZYBD_LOG" "If-Match refused the new object"
swift_put images disk.raw "$T/disk.img"

# ---- 5. writable; a wrong key; no secrets shown
lazybd_start swift://images/disk.raw --cache-dir "$T/cache-rw" --control none --writable --name vm1
cp "$T/disk.img" "$T/model.img"
out=$(qemu-io -f raw "$LAZYBD_URI" -c 'write -P 0x5a 4096 65536' -c flush 2>&1) || fail "qemu-io: $out"
image_apply "$T/model.img" "w 4096 65536 0x5a"
assert_export_model "$T/model.img" "$LAZYBD_URI"
cmdline=$(tr '\0' ' ' < "/proc/$LAZYBD_PID/cmdline")
lazybd_stop
[[ $cmdline != *"$SWIFT_KEY"* ]] || fail "the key is on the command line"
ST_KEY=wrong-key lazybd_expect_start_failure 20 swift://images/disk.raw --cache-dir "$T/cache-bad" \
  --control none --listen "127.0.0.1:$(free_port)"
assert_grep 'authentication \(v1 auth .*\): HTTP 401' "$LAZYBD_LOG" "a wrong key is refused, naming the method"
for f in "$T"/lazybd-*.log; do
  assert_no_grep "AUTH_tk|$SWIFT_KEY|wrong-key|$tok|$ktok|$OS_PASSWORD_SEEN" "$f" "a token or key in $(basename "$f")"
done
