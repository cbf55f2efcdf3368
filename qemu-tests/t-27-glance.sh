#!/usr/bin/env bash
# t-27-glance: glance://IMAGE_ID origins against a real glance-api (Debian,
# no auth, sqlite; qemu-tests/openstack.sh).
#   1. file store (ranged /file): a raw image equals its upload; a qcow2
#      image (disk_format qcow2, no --format) serves the disk it holds
#      (qemu-img compare with `qemu-img convert -O raw`); the identity is
#      the metadata (os_hash_value), logged
#   2. --hydrate: when complete, the cached image is checked against
#      os_hash_value ("matches the digest"); `lazybd copy glance://ID` too
#   3. the bytes changed behind Glance's back (the file store's file
#      rewritten, same size): copy fails as an origin change and the
#      hydration check reports it
#   4. refusals with the reason: an image not uploaded yet (queued), a
#      disk_format lazybd does not decode (vmdk), an unknown id
#   5. Swift store (Glance answers 400 to a Range): lazybd reads the image's
#      Swift location directly with its own Swift credentials, identical
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/openstack.sh"
require_cmd nbdcopy qemu-img curl
require_nbd_python
unset ST_AUTH ST_USER ST_KEY OS_AUTH_URL OS_USERNAME OS_PASSWORD OS_PROJECT_NAME OS_STORAGE_URL \
  OS_AUTH_TOKEN OS_IMAGE_URL

glance_start file
FILE_GLANCE=$GLANCE_URL
export OS_IMAGE_URL=$FILE_GLANCE
mkimage "$T/disk.img" 20 321
raw_id=$(glance_upload raw-disk raw "$T/disk.img")
qemu-img convert -q -c -f raw -O qcow2 "$T/disk.img" "$T/disk.qcow2"
qemu-img convert -q -f qcow2 -O raw "$T/disk.qcow2" "$T/disk.qcow2.raw"
q_id=$(glance_upload qcow2-disk qcow2 "$T/disk.qcow2")
log "images: raw $raw_id, qcow2 $q_id"

# ---- 1. ranged reads from the file store
lazybd_start "glance://$raw_id" --cache-dir "$T/cache" --control none
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
want=$(sha512sum "$T/disk.img" | cut -d' ' -f1)
assert_grep "Glance image .*digest=.?sha512:$want" "$LAZYBD_LOG" "the identity is the image's os_hash_value"
lazybd_start "glance://$q_id" --cache-dir "$T/cache" --control none
out=$(qemu-img compare -s -f raw -F raw "$T/disk.qcow2.raw" "$LAZYBD_URI" 2>&1) || fail "qcow2 image: $out"
lazybd_stop
assert_grep 'qcow2 image decoded' "$LAZYBD_LOG" "disk_format qcow2 decoded without --format"

# ---- 2. the published digest, checked after hydration and by copy
lazybd_start "glance://$raw_id" --cache-dir "$T/cache-h" --control none --hydrate
for _ in $(seq 300); do grep -q 'matches the digest\|does not match' "$LAZYBD_LOG" && break; sleep 0.1; done
lazybd_stop
assert_grep 'the fully cached image matches the digest its origin publishes' "$LAZYBD_LOG" "hydration checked os_hash_value"
out=$("$LAZYBD" copy --no-progress "glance://$q_id" "$T/copy.qcow2" 2>&1) || fail "copy: $out"
cmp "$T/disk.qcow2" "$T/copy.qcow2" || fail "copy of the qcow2 image differs"
[[ $out == *"the copy matches the digest its origin publishes"* ]] || fail "copy did not check the digest: $out"

# ---- 3. bytes changed behind Glance's back
stored=$(find "$GLANCE_STATE" -type f -name "$raw_id" | head -n 1)
[[ -n $stored ]] || fail "the file store's copy of $raw_id not found under $GLANCE_STATE"
printf 'X' | dd of="$stored" bs=1 seek=$((5 * MIB)) conv=notrunc status=none
if out=$("$LAZYBD" copy --no-progress "glance://$raw_id" "$T/copy-bad.img" 2>&1); then
  fail "copy of an image whose bytes differ from os_hash_value succeeded"
fi
[[ $out == *"not the image that was published"* ]] || fail "copy's error does not say so: $out"
log "changed bytes, copy: $(tail -n 1 <<<"$out")"
lazybd_start "glance://$raw_id" --cache-dir "$T/cache-h2" --control none --hydrate
for _ in $(seq 300); do grep -q 'matches the digest\|does not match' "$LAZYBD_LOG" && break; sleep 0.1; done
lazybd_stop
assert_grep 'does not match its published digest' "$LAZYBD_LOG" "hydration reports the mismatch"

# ---- 4. refusals
queued=$(curl -fsS -X POST -H 'Content-Type: application/json' \
  -d '{"name":"empty","disk_format":"raw","container_format":"bare"}' "$FILE_GLANCE/v2/images" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
lazybd_expect_start_failure 20 "glance://$queued" --cache-dir "$T/cache" --control none --listen "127.0.0.1:$(free_port)"
assert_grep 'the image is queued: its data is not uploaded yet' "$LAZYBD_LOG" "a queued image is refused"
vmdk_id=$(glance_upload a-vmdk vmdk "$T/disk.img")
lazybd_expect_start_failure 20 "glance://$vmdk_id" --cache-dir "$T/cache" --control none --listen "127.0.0.1:$(free_port)"
assert_grep 'disk_format "vmdk"' "$LAZYBD_LOG" "an undecodable disk_format is refused"
lazybd_expect_start_failure 20 "glance://00000000-0000-0000-0000-000000000000" --cache-dir "$T/cache" \
  --control none --listen "127.0.0.1:$(free_port)"
assert_grep 'HTTP 404 Not Found \(no such image' "$LAZYBD_LOG" "an unknown image id"

# ---- 5. a Swift store: no ranges from Glance, the Swift location instead
swift_start
glance_start swift
export OS_IMAGE_URL=$GLANCE_URL
s_id=$(glance_upload swift-disk raw "$T/disk.img")
code=$(curl -s -o /dev/null -w '%{http_code}' -r 0-0 "$GLANCE_URL/v2/images/$s_id/file")
assert_eq 400 "$code" "Glance's answer to a ranged GET on a Swift-stored image"
export ST_AUTH=$SWIFT_AUTH_URL ST_USER=$SWIFT_USER ST_KEY=$SWIFT_KEY
lazybd_start "glance://$s_id" --cache-dir "$T/cache-s" --control none
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
assert_grep 'reading its Swift location directly' "$LAZYBD_LOG" "the Swift location is used"
assert_grep "container=glance object=$s_id" "$LAZYBD_LOG" "the location's container and object"
unset ST_AUTH ST_USER ST_KEY
lazybd_expect_start_failure 30 "glance://$s_id" --cache-dir "$T/cache-s2" --control none \
  --listen "127.0.0.1:$(free_port)"
assert_grep 'its Swift location.*no object-store credentials' "$LAZYBD_LOG" \
  "without Swift credentials the error says what is missing"
