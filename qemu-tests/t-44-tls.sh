#!/usr/bin/env bash
# t-44-tls: NBD over TLS with real clients. Certificates from a throw-away CA
# in the directory layout qemu's tls-creds-x509, nbdkit and libnbd use
# (ca-cert.pem, server-cert.pem, server-key.pem; client-cert.pem and
# client-key.pem on the client side).
#  - --tls require: qemu-img info / convert / compare and nbdinfo, nbdcopy
#    over nbds:// read the image byte for byte, over TCP and a Unix socket;
#    a plaintext client is refused with NBD_REP_ERR_TLS_REQD (nbdinfo nbd://
#    fails saying TLS is required);
#  - --tls-verify-peer: a client without a certificate is refused, one with
#    a certificate from the CA is served (qemu-img and nbdinfo);
#  - --tls on: plaintext and TLS clients are both served;
#  - bad certificate files: lazybd fails at start, naming the file.
. "$(dirname "$0")/lib.sh"
require_cmd nbdinfo nbdcopy qemu-img openssl

pki=$T/pki          # server: ca-cert.pem server-cert.pem server-key.pem
anon=$T/client      # a client that trusts the CA, no certificate of its own
auth=$T/client-auth # a client with a certificate from the CA
mkdir -p "$pki" "$anon" "$auth"

# RSA keys and keyUsage digitalSignature+keyEncipherment: what qemu's
# certificate checks (crypto/tlscredsx509.c) and the qemu docs expect.
ossl() { openssl "$@" >"$T/openssl.log" 2>&1 || fail "openssl $*: $(tail -n 3 "$T/openssl.log")"; }
printf '%s\n' "[req]" "distinguished_name=dn" "prompt=no" "x509_extensions=v3_ca" \
  "[dn]" "CN=lazybd t-44 CA" \
  "[v3_ca]" "basicConstraints=critical,CA:TRUE" "keyUsage=critical,keyCertSign,cRLSign" \
  "subjectKeyIdentifier=hash" > "$T/ca.cnf"
ossl req -x509 -new -nodes -newkey rsa:2048 -days 2 -config "$T/ca.cnf" \
  -keyout "$T/ca-key.pem" -out "$pki/ca-cert.pem"
leaf() {  # NAME EKU SAN-LINE OUT-DIR
  local name=$1 eku=$2 san=$3 out=$4
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=$eku" $san > "$T/$name.ext"
  ossl req -new -nodes -newkey rsa:2048 -subj "/CN=lazybd t-44 $name" \
    -keyout "$out/$name-key.pem" -out "$T/$name.csr"
  ossl x509 -req -in "$T/$name.csr" -CA "$pki/ca-cert.pem" -CAkey "$T/ca-key.pem" \
    -CAcreateserial -days 2 -extfile "$T/$name.ext" -out "$out/$name-cert.pem"
}
leaf server serverAuth "subjectAltName=IP:127.0.0.1,DNS:localhost" "$pki"
leaf client clientAuth "" "$auth"
cp "$pki/ca-cert.pem" "$anon/"
cp "$pki/ca-cert.pem" "$auth/"
log "certificates made in $T"

mkimage "$T/disk.img" 32  # a multiple of 512: qemu rounds sizes up to one
size=$(stat -c %s "$T/disk.img")
port=$(free_port)
sock=$T/nbd.sock
tls_uri() { echo "nbds://127.0.0.1:$port/disk?tls-certificates=$1"; }
unix_uri() { echo "nbds+unix:///disk?socket=$sock&tls-certificates=$1"; }
qemu_opts() {  # CERT-DIR -> --object/--image-opts arguments for qemu-img
  echo "--object tls-creds-x509,id=tls0,dir=$1,endpoint=client"
}
qemu_image() { echo "driver=nbd,host=127.0.0.1,port=$port,export=disk,tls-creds=tls0"; }

# ---------------------------------------------------------------- require
lazybd_spawn "$T/disk.img" --cache-dir "$T/cache" --control none \
  --listen "127.0.0.1:$port" --listen "unix:$sock" \
  --tls require --tls-certificates "$pki"
lazybd_wait_ready "$(tls_uri "$anon")" "$(unix_uri "$anon")"

nbdinfo --json "$(tls_uri "$anon")" > "$T/info.json" 2> "$T/info.err" ||
  fail "nbdinfo over TLS: $(cat "$T/info.err")"
"$NBD_PYTHON" - "$T/info.json" "$size" <<'PY' || fail "nbdinfo --json over TLS (see above)"
import json, sys
j = json.load(open(sys.argv[1])); size = int(sys.argv[2])
e = (j.get("exports") or [{}])[0]
errs = [m for ok, m in [
    (j.get("TLS") is True, f'"TLS": {j.get("TLS")!r}'),
    (j.get("structured") is True, f'"structured": {j.get("structured")!r}'),
    (e.get("export-size") == size, f'export-size {e.get("export-size")} != {size}'),
    ("base:allocation" in (e.get("contexts") or []), f'contexts {e.get("contexts")}'),
] if not ok]
for m in errs: print("  -", m)
sys.exit(1 if errs else 0)
PY
log "nbdinfo over TLS: TLS true, size $size"

assert_same_as_file "$T/disk.img" "$(tls_uri "$anon")"
assert_same_as_file "$T/disk.img" "$(unix_uri "$anon")"

# qemu-img over TLS: info, convert (then cmp), compare
# shellcheck disable=SC2046
qemu-img info $(qemu_opts "$anon") --image-opts "$(qemu_image)" > "$T/qinfo" 2>&1 ||
  fail "qemu-img info over TLS: $(cat "$T/qinfo")"
grep -q "virtual size: .*($size bytes)" "$T/qinfo" || fail "qemu-img info: $(cat "$T/qinfo")"
# shellcheck disable=SC2046
qemu-img convert -p $(qemu_opts "$anon") --image-opts "$(qemu_image)" -O raw "$T/copy.raw" \
  > "$T/qconvert" 2>&1 || fail "qemu-img convert over TLS: $(tail -n 3 "$T/qconvert")"
cmp "$T/copy.raw" "$T/disk.img" || fail "qemu-img convert over TLS: the copy differs"
# shellcheck disable=SC2046
qemu-img compare $(qemu_opts "$anon") --image-opts "$(qemu_image)" \
  "driver=raw,file.driver=file,file.filename=$T/disk.img" > "$T/qcompare" 2>&1 ||
  fail "qemu-img compare over TLS: $(cat "$T/qcompare")"
log "qemu-img info, convert and compare over TLS: identical"

# Unix socket with qemu
# shellcheck disable=SC2046
qemu-img info $(qemu_opts "$anon") --image-opts \
  "driver=nbd,server.type=unix,server.path=$sock,export=disk,tls-creds=tls0,tls-hostname=localhost" \
  > "$T/qinfo-unix" 2>&1 || fail "qemu-img info over TLS on the Unix socket: $(cat "$T/qinfo-unix")"

# Plaintext against "require": refused with NBD_REP_ERR_TLS_REQD and the
# server's message (libnbd 1.14's nbdinfo prints it only in its debug log;
# qemu prints "TLS negotiation required" for exactly that reply type)
if LIBNBD_DEBUG=1 nbdinfo "nbd://127.0.0.1:$port/disk" > "$T/plain.out" 2>&1; then
  fail "plaintext nbdinfo against --tls require succeeded"
fi
log "plaintext nbdinfo: $(grep -v 'libnbd: debug' "$T/plain.out" | head -n 1)"
assert_grep "server error message: TLS is required: send NBD_OPT_STARTTLS first" "$T/plain.out" \
  "plaintext nbdinfo gets the server's TLS refusal"
if qemu-img info "nbd://127.0.0.1:$port/disk" > "$T/plain-q.out" 2>&1; then
  fail "plaintext qemu-img against --tls require succeeded"
fi
log "plaintext qemu-img: $(tr '\n' ' ' < "$T/plain-q.out")"
assert_grep "TLS negotiation required" "$T/plain-q.out" "plaintext qemu-img gets NBD_REP_ERR_TLS_REQD"
assert_grep "server reported: TLS is required" "$T/plain-q.out" "plaintext qemu-img shows the server's message"
lazybd_stop

# ---------------------------------------------------------------- verify-peer
lazybd_spawn "$T/disk.img" --cache-dir "$T/cache" --control none \
  --listen "127.0.0.1:$port" --tls require --tls-certificates "$pki" --tls-verify-peer
lazybd_wait_ready "$(tls_uri "$auth")"
if nbdinfo --size "$(tls_uri "$anon")" > "$T/anon.out" 2>&1; then
  fail "--tls-verify-peer served a client without a certificate"
fi
log "client without a certificate: $(tr '\n' ' ' < "$T/anon.out")"
# shellcheck disable=SC2046
if qemu-img info $(qemu_opts "$anon") --image-opts "$(qemu_image)" > "$T/anon-q.out" 2>&1; then
  fail "--tls-verify-peer served qemu-img without a client certificate"
fi
assert_eq "$size" "$(nbdinfo --size "$(tls_uri "$auth")")" "nbdinfo with a client certificate"
# shellcheck disable=SC2046
qemu-img info $(qemu_opts "$auth") --image-opts "$(qemu_image)" > "$T/auth-q.out" 2>&1 ||
  fail "qemu-img with a client certificate: $(cat "$T/auth-q.out")"
assert_same_as_file "$T/disk.img" "$(tls_uri "$auth")"
lazybd_stop

# ---------------------------------------------------------------- on
lazybd_spawn "$T/disk.img" --cache-dir "$T/cache" --control none \
  --listen "127.0.0.1:$port" --tls on --tls-certificates "$pki"
lazybd_wait_ready "nbd://127.0.0.1:$port/disk" "$(tls_uri "$anon")"
assert_same_as_file "$T/disk.img" "nbd://127.0.0.1:$port/disk"
assert_same_as_file "$T/disk.img" "$(tls_uri "$anon")"
nbdinfo --json "nbd://127.0.0.1:$port/disk" | grep -q '"TLS": false' || fail "plaintext under --tls on"
lazybd_stop

# ---------------------------------------------------------------- bad files
printf 'not a key\n' > "$T/bad-key.pem"
mkdir -p "$T/badpki"
cp "$pki/ca-cert.pem" "$pki/server-cert.pem" "$T/badpki/"
cp "$T/bad-key.pem" "$T/badpki/server-key.pem"
lazybd_expect_start_failure 30 "$T/disk.img" --cache-dir "$T/cache" --control none \
  --listen "127.0.0.1:$(free_port)" --tls require --tls-certificates "$T/badpki"
assert_grep "badpki/server-key.pem" "$LAZYBD_LOG" "start error names the bad key file"
lazybd_expect_start_failure 30 "$T/disk.img" --cache-dir "$T/cache" --control none \
  --listen "127.0.0.1:$(free_port)" --tls require --tls-certificates "$T/nowhere"
assert_grep "nowhere/server-cert.pem" "$LAZYBD_LOG" "start error names the missing file"
lazybd_expect_start_failure 30 "$T/disk.img" --cache-dir "$T/cache" --control none \
  --listen "127.0.0.1:$(free_port)" --tls on
assert_grep "tls-certificates" "$LAZYBD_LOG" "--tls on without certificates"
log "bad TLS settings fail at start, naming the file"
