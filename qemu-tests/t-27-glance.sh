#!/usr/bin/env bash
# t-27-glance: glance://IMAGE_ID origins against a real glance-api (Debian,
# no auth, sqlite; qemu-tests/openstack.sh).
#   1. file store (ranged /file): a raw image equals its upload; a qcow2
#      image (disk_format qcow2, no --format) serves the disk it holds
#      (qemu-img compare with `qemu-img convert -O raw`); the identity is
#      the metadata (os_hash_value), logged
#   2. --hydrate: when complete, the cached image is checked against
#      os_hash_value ("matches the digest"), once (a restart remembers it);
#      `lazybd copy glance://ID` too
#   3. the bytes changed behind Glance's back (the file store's file
#      rewritten, same size): copy fails as an origin change and the
#      hydration check reports it
#   4. refusals with the reason: an image not uploaded yet (queued), a
#      disk_format lazybd does not decode (vmdk), an unknown id
#   6. Swift store whose locations Glance does not show: one sequential
#      pass of /file serves reads as it goes (the last block read first waits
#      for it), the image is hydrated in one GET of the data and checked
#      against os_hash_value
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
# A restart over the checked, complete cache does not hash it again.
lazybd_start "glance://$raw_id" --cache-dir "$T/cache-h" --control none --hydrate
for _ in $(seq 300); do grep -q 'not hashed again\|matches the digest' "$LAZYBD_LOG" && break; sleep 0.1; done
lazybd_stop
assert_grep 'checked against its published digest before: not hashed again' "$LAZYBD_LOG" \
  "the digest check is remembered"
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

# ---- 6. a Swift store whose locations are hidden: one sequential pass
GLANCE_SHOW_LOCATIONS=False glance_start swift
export OS_IMAGE_URL=$GLANCE_URL
h_id=$(glance_upload hidden-disk raw "$T/disk.img")
loc=$(curl -fsS "$GLANCE_URL/v2/images/$h_id" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v.get("direct_url"), v.get("locations"))')
assert_eq "None None" "$loc" "Glance shows no location of the image"
mark=$(swift_access_mark)
lazybd_start "glance://$h_id" --cache-dir "$T/cache-p" --control none
assert_grep 'exposes no location lazybd can read: reading it in one sequential pass' "$LAZYBD_LOG" \
  "the fallback is said clearly"
# The last 4 KiB first (GPT's backup header): answered once the pass passes it.
size=$(stat -c %s "$T/disk.img")
"$NBD_PYTHON" - "$LAZYBD_URI" "$T/disk.img" "$size" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
size = int(sys.argv[3])
with open(sys.argv[2], "rb") as f:
    f.seek(size - 4096); want_end = f.read(4096)
    f.seek(0); want_head = f.read(65536)
assert h.pread(4096, size - 4096) == want_end, "last block differs"
assert h.pread(65536, 0) == want_head, "first block differs"
PY
for _ in $(seq 300); do grep -q 'matches the digest\|does not match' "$LAZYBD_LOG" && break; sleep 0.1; done
assert_grep 'the origin reads only from its start: hydrating the image' "$LAZYBD_LOG" "hydrated at once"
assert_grep 'the fully cached image matches the digest its origin publishes' "$LAZYBD_LOG" \
  "the pass's image checked against os_hash_value"
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
assert_no_grep 'Swift location directly' "$LAZYBD_LOG" "no location was used"
assert_grep 'sequential pass complete' "$LAZYBD_LOG" "the pass completed"
[[ $(grep -c 'sequential pass failed' "$LAZYBD_LOG") == 0 ]] || fail "a pass failed"
gets=$(swift_access_lines "$mark" | grep -c "^GET [^ ]*/$h_id " || true)
log "sequential pass: $gets GET(s) of the object in Swift"
assert_eq 1 "$gets" "the whole image came from one GET of its data"
