#!/usr/bin/env bash
# t-17-origin-outage: the origin goes away while lazybd serves
# (--origin-timeout 2 --origin-retries 1 to keep it short).
#  A. nginx stopped (connection refused): a read of an uncached block fails
#     with an I/O error within 20 s instead of hanging; cached blocks are still
#     served; the server stays up.
#  B. a listener that accepts and never answers (stalled origin): the same.
#  C. nginx back on the same port: the failed reads now work and a full read
#     gives the origin's bytes, without restarting lazybd.
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io nbdcopy nginx
require_nbd_python

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
port=${ORIGIN_URL##*:}
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache" --origin-timeout 2 --origin-retries 1
out=$(qemu-io -r -f raw "$LAZYBD_URI" -c 'read 0 256k' 2>&1) || fail "warm-up read failed: $out"

read_during_outage() {  # LABEL OFFSET
  local s=$SECONDS out rc
  out=$(timeout 60 qemu-io -r -f raw "$LAZYBD_URI" -c "read $2 64k" 2>&1) && rc=0 || rc=$?
  local dt=$((SECONDS - s))
  ((rc != 0)) || fail "$1: read of uncached $2+64k succeeded with no origin: $out"
  ((rc != 124)) || fail "$1: read of uncached $2+64k hung for 60 s"
  ((dt <= 20)) || fail "$1: read took ${dt}s to fail (want <= 20 s)"
  log "$1: uncached read failed after ${dt}s as it must: $(echo "$out" | head -n 1)"
  out=$(qemu-io -r -f raw "$LAZYBD_URI" -c 'read 0 256k' 2>&1) || fail "$1: cached read failed: $out"
  nbdinfo --size "$LAZYBD_URI" >/dev/null || fail "$1: server no longer answers"
}

origin_stop
read_during_outage "origin down" 8M

# stalled origin: accepts TCP connections on the origin's port, never answers
"$NBD_PYTHON" - "$port" <<'PY' & stall=$!
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
conns = []
while True:
    c, _ = s.accept(); conns.append(c)
PY
bg_track "$stall"
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
read_during_outage "origin stalled" 16M
kill "$stall"; wait "$stall" 2>/dev/null || true

origin_resume
out=$(qemu-io -r -f raw "$LAZYBD_URI" -c 'read 8M 64k' -c 'read 16M 64k' 2>&1) ||
  fail "reads after the origin came back failed: $out"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"
lazybd_stop
