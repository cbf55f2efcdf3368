#!/usr/bin/env bash
# t-23-s3: s3://BUCKET/KEY origins against a real S3 server (SeaweedFS, "weed
# mini" on 127.0.0.1). lazybd signs each GET itself (SigV4 presigned URLs);
# the object is uploaded with curl's own SigV4 signing.
#   1. keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY: qemu-img compare and
#      nbdcopy equal the uploaded bytes; a restart on the cache sends only
#      the probe; a writable export over it reads back its writes, the
#      object untouched
#   2. keys from AWS_PROFILE and a temporary ~/.aws/credentials (HOME
#      pointed at it), region and endpoint_url from ~/.aws/config
#   3. keys, endpoint and region from lazybd's config file ([s3]), with no
#      AWS variable at all
#   4. refusals at start, each a clear message and a non-zero exit: a wrong
#      secret (naming the credential source, never the secret), a missing
#      key and bucket, no credentials (anonymous, said so), a session token
#      SeaweedFS does not know (it has no STS session here: temporary
#      credentials cannot be made without an identity provider, so the
#      token is only shown to be sent and named in the error)
#   5. the object replaced while serving: cached blocks keep their old
#      bytes, uncached ones fail with EIO (If-Match / ETag), never new or
#      mixed bytes
# No secret appears in any lazybd log.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy qemu-img qemu-io curl weed
require_nbd_python

aws_env_clear
s3_start
s3_mb images
mkimage "$T/disk.img" 24 12345
s3_put "$T/disk.img" images/vm/disk.raw
spec=s3://images/vm/disk.raw

# ---- 1. keys from the environment
export AWS_ACCESS_KEY_ID=$S3_AK AWS_SECRET_ACCESS_KEY=$S3_SK AWS_ENDPOINT_URL=$S3_URL AWS_REGION=us-east-1
lazybd_start "$spec" --cache-dir "$T/cache"
out=$(qemu-img compare -f raw -F raw "$T/disk.img" "$LAZYBD_URI" 2>&1) || fail "qemu-img compare: $out"
log "qemu-img compare: $out"
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
assert_grep 'credentials=AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment' "$LAZYBD_LOG" "log names the credential source"
assert_grep 'style="path"' "$LAZYBD_LOG" "a custom endpoint is addressed path-style"

lazybd_start "$spec" --cache-dir "$T/cache"
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
assert_eq 1 "$(lazybd_origin_requests)" "origin requests after a restart on a full cache (the probe only)"

lazybd_start "$spec" --cache-dir "$T/cache" --writable --name vm1
cp "$T/disk.img" "$T/model.img"
out=$(qemu-io -f raw "$LAZYBD_URI" -c 'write -P 0x5a 4096 65536' -c 'write -P 0xa5 20M 12345' -c flush 2>&1) ||
  fail "qemu-io writes: $out"
image_apply "$T/model.img" "w 4096 65536 0x5a" "w $((20 * MIB)) 12345 0xa5"
assert_export_model "$T/model.img" "$LAZYBD_URI"
lazybd_stop
s3_curl -o "$T/after-writes.img" "$S3_URL/images/vm/disk.raw"
cmp -s "$T/after-writes.img" "$T/disk.img" || fail "the S3 object changed under a writable export"
log "writable export over S3: writes read back, the object unchanged"

# ---- 2. AWS_PROFILE + ~/.aws (HOME pointed at a temporary directory)
aws_env_clear
real_home=$HOME
export HOME=$T/home
mkdir -p "$HOME/.aws"
printf '[default]\naws_access_key_id = NOTTHISONE\naws_secret_access_key = nope\n\n[lazybd-test]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
  "$S3_AK" "$S3_SK" > "$HOME/.aws/credentials"
printf '[profile lazybd-test]\nregion = eu-west-1\nendpoint_url = %s\n' "$S3_URL" > "$HOME/.aws/config"
export AWS_PROFILE=lazybd-test
lazybd_start "$spec" --cache-dir "$T/cache-profile"
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
assert_grep "credentials=profile \"lazybd-test\" in $HOME/.aws/credentials \\(AWS_PROFILE\\)" "$LAZYBD_LOG" "profile named in the log"
assert_grep 'region="eu-west-1" region_from=profile' "$LAZYBD_LOG" "region from ~/.aws/config"
# Keys rotated in the profile's file are picked up by `lazybd reload`: a
# wrong secret fails the next uncached read, the right one serves it again.
s3_read_at() { nbd_read_ok "$LAZYBD_URI" "$1" "$T/disk.img"; }
creds() { printf '[lazybd-test]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$S3_AK" "$1" > "$HOME/.aws/credentials"; }
lazybd_start "$spec" --cache-dir "$T/cache-rotate" --no-readahead --no-profile --control "$T/ctl.sock" --origin-deadline 3
s3_read_at 0 || fail "S3 read with the profile's keys"
creds wrong-secret
"$LAZYBD" reload --control "$T/ctl.sock" >/dev/null || fail "lazybd reload (wrong secret)"
out=$(s3_read_at $((4 * MIB))) && fail "an uncached S3 read signed with a wrong secret succeeded"
log "after reloading a wrong secret: $out"
creds "$S3_SK"
out=$("$LAZYBD" reload --control "$T/ctl.sock" 2>&1) || fail "lazybd reload: $out"
assert_eq "ok: 1 origin(s) re-read their files" "$out" "lazybd reload's answer"
s3_read_at $((8 * MIB)) || fail "S3 read after the keys were restored and reloaded"
lazybd_stop
assert_grep 'S3 credentials reloaded' "$LAZYBD_LOG" "the reload is logged"
assert_no_grep "wrong-secret|$S3_SK" "$LAZYBD_LOG" "a secret in lazybd's log"
# A profile that does not exist is an error, not anonymous requests.
AWS_PROFILE=nosuch lazybd_expect_start_failure 20 "$spec" --cache-dir "$T/cache-x" --listen "127.0.0.1:$(free_port)"
assert_grep 'S3 profile "nosuch" \(AWS_PROFILE\) is in neither' "$LAZYBD_LOG" "missing profile explained"
unset AWS_PROFILE
export HOME=$real_home

# ---- 3. lazybd's config file, no AWS variable
aws_env_clear
port=$(free_port)
cat > "$T/lazybd.toml" <<EOF
[server]
listen = ["127.0.0.1:$port"]
cache_dir = "$T/cache-config"
control = "none"

[s3]
endpoint = "$S3_URL"
region = "us-east-1"
access_key_id = "$S3_AK"
secret_access_key = "$S3_SK"

[[export]]
name = "disk"
image = "$spec"
EOF
HOME=$T/empty-home lazybd_spawn --config "$T/lazybd.toml"
lazybd_wait_ready "nbd://127.0.0.1:$port/disk"
assert_same_as_file "$T/disk.img" "$LAZYBD_URI"
lazybd_stop
assert_grep "credentials=config $T/lazybd.toml: s3.access_key_id" "$LAZYBD_LOG" "config keys named in the log"
assert_grep "endpoint_from=config $T/lazybd.toml: s3.endpoint" "$LAZYBD_LOG" "config endpoint named in the log"

# ---- 4. refusals at start
export AWS_ENDPOINT_URL=$S3_URL HOME=$T/empty-home
refused() {  # GREP-ERE DESCRIPTION SPEC : lazybd serve SPEC fails at start saying GREP-ERE
  lazybd_expect_start_failure 20 "$3" --cache-dir "$T/cache-refused" --listen "127.0.0.1:$(free_port)"
  assert_grep "$1" "$LAZYBD_LOG" "$2"
}
AWS_ACCESS_KEY_ID=$S3_AK AWS_SECRET_ACCESS_KEY=wrong-secret-0001 \
  refused 'access denied .*SignatureDoesNotMatch.* with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment' \
  "wrong secret: names the source" "$spec"
assert_no_grep 'wrong-secret-0001' "$LAZYBD_LOG" "the wrong secret is in the log"
AWS_ACCESS_KEY_ID=$S3_AK AWS_SECRET_ACCESS_KEY=$S3_SK \
  refused 'there is no object "vm/nope.raw" in bucket "images"' "missing key" s3://images/vm/nope.raw
AWS_ACCESS_KEY_ID=$S3_AK AWS_SECRET_ACCESS_KEY=$S3_SK \
  refused 'there is no bucket "nobucket"' "missing bucket" s3://nobucket/vm/disk.raw
refused 'origin "s3://images": no key' "no key in the URL" s3://images
refused 'no credentials were found, so the request was anonymous' "anonymous and refused" "$spec"
assert_grep 'no S3 credentials found .*anonymous requests' "$LAZYBD_LOG" "anonymous access said in a log line"
AWS_ACCESS_KEY_ID=$S3_AK AWS_SECRET_ACCESS_KEY=$S3_SK AWS_SESSION_TOKEN=lazybd-test-token-0001 \
  refused 'access denied .* in the environment, access key …0001, with a session token' \
  "session token sent and named (SeaweedFS has no such session)" "$spec"
assert_no_grep "lazybd-test-token-0001|$S3_SK" "$LAZYBD_LOG" "a secret is in the log"

# ---- 5. the object replaced while serving
export AWS_ACCESS_KEY_ID=$S3_AK AWS_SECRET_ACCESS_KEY=$S3_SK
lazybd_start "$spec" --cache-dir "$T/cache-live" --no-readahead --no-profile
out=$(qemu-io -r -f raw "$LAZYBD_URI" -c 'read 0 1M' 2>&1) || fail "warm-up read failed: $out"
mkimage "$T/new.img" 24 12345
s3_put "$T/new.img" images/vm/disk.raw
log "object replaced while serving"
"$NBD_PYTHON" - "$LAZYBD_URI" "$T/disk.img" "$T/new.img" <<'PY' || fail "bytes of the new object were served (see above)"
import errno, nbd, sys
uri, old, new = sys.argv[1], open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
h = nbd.NBD(); h.connect_uri(uri)
bad = 0
for off, n, cached in [(0, 65536, True), (300000, 4096, True), (8 << 20, 65536, False),
                       ((20 << 20) + 5, 200000, False), (100, 1 << 20, False)]:
    try:
        got = h.pread(n, off)
    except nbd.Error as e:
        print(f"pread {off}+{n}: {errno.errorcode.get(e.errnum, e.errnum)}" + ("  <- cached, must read" if cached else ""))
        bad += cached
        continue
    kind = "old" if got == old[off:off + n] else "NEW" if got == new[off:off + n] else "MIXED/other"
    print(f"pread {off}+{n}: {kind}" + ("" if kind == "old" else "  <- must be the old bytes or an error"))
    bad += kind != "old"
h.shutdown()
sys.exit(1 if bad else 0)
PY
nbdinfo --size "$LAZYBD_URI" >/dev/null || fail "server no longer answers after the object changed"
if nbdcopy --no-extents "$LAZYBD_URI" - > "$T/all.raw" 2> "$T/copy.err"; then
  fail "a full read after the object changed succeeded"
fi
lazybd_stop
assert_grep 'If-Match|ETag changed|HTTP 412' "$LAZYBD_LOG" "the change is reported"
log "after the change: $(lazybd_log_plain | grep -Eo 'HTTP 412[^,]*' | head -n 1)"

# Never a secret in any lazybd log.
for f in "$T"/lazybd-*.log; do
  assert_no_grep "$S3_SK|lazybd-test-token-0001|X-Amz-Signature=[0-9a-f]" "$f" "a secret or signature in $(basename "$f")"
done
log "no secret in $(ls "$T"/lazybd-*.log | wc -l) logs"
