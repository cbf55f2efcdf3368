#!/usr/bin/env bash
# bench/origins.sh — lazybd against its peers on cloud origins and on a qcow2
# template (issue 12), in one run (~10 min with the defaults, ROUNDS=3, on 2
# cores; QUICK=1 ~1.5-2 min).
#
# Parts (PARTS):
#   s3     SeaweedFS ("weed mini", every port on 127.0.0.1) holding an
#          IMG_MIB MiB random object. lazybd `serve s3://BUCKET/KEY` (AWS_*
#          keys in its environment: it signs every GET with SigV4) beside
#          qemu-storage-daemon's http (curl) driver and nbdkit curl + cache
#          filter on a URL of the same object. Both peers send a HEAD before
#          any GET, and a SigV4 presigned URL is signed for one method: the
#          script tries the presigned GET URL first (qemu-img info, nbdkit)
#          and reports their error; the peers then read the object through
#          the bucket's anonymous read access (SeaweedFS identity
#          "anonymous", action Read on the bucket), unsigned.
#   swift  OpenStack Swift (qemu-tests/openstack.sh swift_start: Debian's
#          proxy with tempauth and tempurl, one replica, 127.0.0.1) holding
#          the same object. lazybd `serve swift://CONTAINER/OBJECT` with
#          ST_AUTH/ST_USER/ST_KEY beside qsd and nbdkit curl + cache on a
#          Swift temp URL (HMAC-SHA256, bench/presign.py; a GET temp URL
#          also allows HEAD).
#   qcow2  a qcow2 template made with `qemu-img convert -O qcow2` from an
#          IMG_MIB MiB raw image whose every 4 KiB page is 2 KiB random and 2
#          KiB zeros (compresses about 2:1), in two variants (QCOW2_VARIANTS):
#          `qcow2` (plain) and `qcow2-zlib` (`-c`, zlib clusters). lazybd
#          `serve --format qcow2 FILE` (local file origin, fresh cache) beside
#          `qemu-nbd -f qcow2 -r` and qemu-storage-daemon's qcow2 driver on
#          the same file. nbdkit 1.32 has no qcow2 decoder (its qcow2dec
#          filter came later), so it is not a peer here.
#
# Peers of s3 and swift: qsd = http blockdev (readahead=QSD_READAHEAD, 0: the
# best setting in bench/run.sh, for random and sequential reads alike) as the
# backing of a fresh qcow2 overlay (cluster_size=$BLOCK_SIZE) under a
# copy-on-read filter, exported read-only over NBD, as bench/run.sh starts
# it; nbdkit-cache = nbdkit curl plugin + cache filter, cache-on-read=true,
# cache-min-block-size=$BLOCK_SIZE. Both are caching peers like lazybd.
#
# Cases: cold-rand32 = COLD_READS first-touch 4 KiB random reads at QD32 on a
# freshly started server (empty cache); cold-seq = 1 MiB sequential reads over
# the whole image at QD8 on a fresh server (as bench/run.sh's cold-seq). qcow2
# also: warm-seq = the same pass again on that server, warm-rand32 = 4 KiB
# random reads at QD32 for RUNTIME s after it. "Cold" for qemu-nbd and qsd on
# the qcow2 file is a freshly started process (no L2 or cluster cache); the
# file itself is in the host's page cache for every server.
# Client: fio's libnbd `nbd` ioengine, one NBD connection over TCP.
#
# Rounds (ROUNDS, 3): every case runs once per peer per round, the peers in
# their list order in odd rounds and reversed in even ones; the report gives
# medians over the rounds, the ratio lazybd ÷ the best peer of each round
# (median, and every round's), goal ≥ 1.0×.
# Failures: a case whose fio completes no I/O for STALL_S seconds is killed
# (qemu's curl driver is known to stall on 1 MiB QD8 reads); a failed cold
# case is retried once on a fresh server. A peer that still fails is reported
# as such and left out of its case's "best peer".
#
# Writes its section, "## Cloud origins (bench/origins.sh)", into OUT
# (replacing an earlier one; bench/lib.sh stamps it), every round's numbers
# included; the raw rows stay in the temp dir (rows.tsv, with KEEP=1).
#
# Env knobs:
#   QUICK (1: IMG_MIB=64 ROUNDS=2 RUNTIME=1 COLD_READS=256 QCOW2_VARIANTS=qcow2-zlib
#          SEQ_MAX=COLD_MAX=20 STALL_S=5, a smoke run)
#   ROUNDS (3)  IMG_MIB (1024)  RUNTIME (5 s of warm-rand32)  BLOCK_SIZE (64k)
#   COLD_READS (2048 first-touch reads, at most half the blocks)
#   PARTS ("s3 swift qcow2")   QCOW2_VARIANTS ("qcow2 qcow2-zlib")
#   PEERS_S3 ("lazybd qsd nbdkit-cache")  PEERS_SWIFT (same)  PEERS_QCOW2 ("lazybd qemu-nbd qsd")
#   QSD_READAHEAD (0: qemu http readahead, bytes)
#   SEQ_MAX (120 s cap on one sequential pass)  COLD_MAX (120 s cap on the cold reads)
#   STALL_S (10: a case whose fio completes no I/O for this long is killed as
#          hung; every origin is on loopback, so 10 s without one completion is a hang)
#   OUT (bench/RESULTS.md)  LAZYBD (binary; copied first)  LAZYBD_ARGS (extra `serve` options)
#   KEEP (1: keep the temp dir)  BENCH_TMP (parent of the temp dir, default /tmp)
# Exit status: 0 if lazybd produced numbers in every case and round and every
# case has numbers from at least one peer; 1 otherwise; 2 on a set-up error.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  IMG_MIB=${IMG_MIB:-64}; ROUNDS=${ROUNDS:-2}; RUNTIME=${RUNTIME:-1}; COLD_READS=${COLD_READS:-256}
  QCOW2_VARIANTS=${QCOW2_VARIANTS:-qcow2-zlib}
  SEQ_MAX=${SEQ_MAX:-20}; COLD_MAX=${COLD_MAX:-20}; STALL_S=${STALL_S:-5}
fi
ROUNDS=${ROUNDS:-3}
IMG_MIB=${IMG_MIB:-1024}
RUNTIME=${RUNTIME:-5}
BLOCK_SIZE=${BLOCK_SIZE:-64k}
COLD_READS=${COLD_READS:-2048}
PARTS=${PARTS:-s3 swift qcow2}
QCOW2_VARIANTS=${QCOW2_VARIANTS:-qcow2 qcow2-zlib}
PEERS_S3=${PEERS_S3:-lazybd qsd nbdkit-cache}
PEERS_SWIFT=${PEERS_SWIFT:-lazybd qsd nbdkit-cache}
PEERS_QCOW2=${PEERS_QCOW2:-lazybd qemu-nbd qsd}
QSD_READAHEAD=${QSD_READAHEAD:-0}
SEQ_MAX=${SEQ_MAX:-120}
COLD_MAX=${COLD_MAX:-120}
STALL_S=${STALL_S:-10}
OUT=${OUT:-$BENCH/RESULTS.md}
LAZYBD=${LAZYBD:-$ROOT/target/release/lazybd}
LAZYBD_ARGS=${LAZYBD_ARGS:-}
SECTION_TITLE="## Cloud origins (bench/origins.sh)"
IMG_BYTES=$((IMG_MIB * 1048576))
[[ ${KEEP:-0} == 1 ]] && export KEEP_TMP=1

has() { [[ " $1 " == *" $2 "* ]]; }
for p in $PARTS; do case $p in s3|swift|qcow2) ;; *) echo "origins.sh: unknown part $p" >&2; exit 2 ;; esac; done
for v in $QCOW2_VARIANTS; do case $v in qcow2|qcow2-zlib) ;; *) echo "origins.sh: unknown qcow2 variant $v" >&2; exit 2 ;; esac; done
for p in $PEERS_S3 $PEERS_SWIFT; do case $p in lazybd|qsd|nbdkit-cache) ;; *) echo "origins.sh: unknown peer $p (s3/swift)" >&2; exit 2 ;; esac; done
for p in $PEERS_QCOW2; do case $p in lazybd|qemu-nbd|qsd) ;; *) echo "origins.sh: unknown peer $p (qcow2)" >&2; exit 2 ;; esac; done

# ---------------------------------------------------------------- tools ----
tools_ok() {
  local t
  for t in fio nbdkit nbdinfo qemu-img qemu-nbd qemu-storage-daemon curl python3 ss; do
    command -v "$t" >/dev/null 2>&1 || return 1
  done
  if has "$PARTS" s3; then command -v weed >/dev/null 2>&1 || return 1; fi
  if has "$PARTS" swift; then
    for t in swift-proxy-server swift-account-server swift-container-server swift-object-server swift-ring-builder memcached; do
      command -v "$t" >/dev/null 2>&1 || return 1
    done
  fi
  nbdkit --filter=cache curl --version >/dev/null 2>&1 || return 1
  fio --enghelp=nbd >/dev/null 2>&1 || return 1
  ls /usr/lib/*/qemu/block-curl.so >/dev/null 2>&1 || return 1   # qemu-block-extra: http driver
}
if ! tools_ok; then
  echo "[origins] tools missing: running scripts/install-deps.sh" >&2
  "$ROOT/scripts/install-deps.sh"
  hash -r
  tools_ok || { echo "origins.sh: tools still missing after scripts/install-deps.sh" >&2; exit 2; }
fi
[[ -x $LAZYBD ]] || { echo "origins.sh: $LAZYBD missing (cargo build --release, or set LAZYBD)" >&2; exit 2; }

# qemu-tests/lib.sh: temp dir $T, the EXIT trap that stops every process
# registered with bg_track (and SeaweedFS by S3_PID), free_port, log, fail;
# qemu-tests/openstack.sh: swift_start and friends on top of it
_tmpdir_was=${TMPDIR-}
export TMPDIR=${BENCH_TMP:-${TMPDIR:-/tmp}}
. "$ROOT/qemu-tests/lib.sh"
. "$ROOT/qemu-tests/openstack.sh"
if [[ -n $_tmpdir_was ]]; then TMPDIR=$_tmpdir_was; else unset TMPDIR; fi
# the environment of every server is explicit: no AWS_*, ST_*, OS_* from outside
for v in $(compgen -e | grep -E '^(AWS_|ST_|OS_)' || true); do unset "$v"; done

cp "$LAZYBD" "$T/lazybd"   # a rebuild during the run must not change it
LAZYBD_INFO="$(readlink -f "$LAZYBD"), built $(date -u -r "$LAZYBD" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$LAZYBD" | cut -c1-12)"
LZ=$T/lazybd
CMDS=$T/cmdlines.txt; : > "$CMDS"
NOTES=$T/notes.tsv; : > "$NOTES"     # KEY<TAB>text for the report
note() { printf '%s\t%s\n' "$1" "$(printf '%s' "$2" | tr '\t\n' '  ')" >> "$NOTES"; }
note_cmd() { # KEY TEXT... : the first command line of each KEY, signatures and ports left out
  local k=$1; shift
  grep -q "^$k " "$CMDS" && return 0
  printf '%s %s\n' "$k" "$*" | sed -E 's/(temp_url_sig|X-Amz-Signature)=[0-9a-f]+/\1=…/g; s/127\.0\.0\.1([:=,])[0-9]{4,5}/127.0.0.1\1PORT/g; s/\.port=[0-9]+/.port=PORT/g; s/-p [0-9]+ /-p PORT /g' >> "$CMDS"
}
START=$SECONDS

# --------------------------------------------------------------- images ----
BLOCK_BYTES=$(python3 -c '
import re, sys
m = re.fullmatch(r"(\d+)([kKmM]?)", sys.argv[1]) or sys.exit("bad BLOCK_SIZE " + sys.argv[1])
print(int(m.group(1)) << {"": 0, "k": 10, "m": 20}[m.group(2).lower()])' "$BLOCK_SIZE")
nblocks=$((IMG_BYTES / BLOCK_BYTES))
COLD_N=$COLD_READS; ((COLD_N <= nblocks / 2)) || COLD_N=$((nblocks / 2))
mkdir -p "$T/img"
if has "$PARTS" s3 || has "$PARTS" swift; then
  log "making a ${IMG_MIB} MiB random image"
  head -c "$IMG_BYTES" /dev/urandom > "$T/img/disk.raw"
fi
if has "$PARTS" qcow2; then
  log "making a ${IMG_MIB} MiB half-compressible raw image and its qcow2 variants ($QCOW2_VARIANTS)"
  python3 - "$T/img/half.raw" "$IMG_BYTES" <<'EOF'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
zero = bytes(2048)
with open(path, "wb") as f:
    left = size
    while left > 0:
        n = min(left, 32 << 20)
        r = os.urandom(n // 2)
        f.write(b"".join(r[i:i + 2048] + zero for i in range(0, len(r), 2048))[:n])
        left -= n
EOF
  for v in $QCOW2_VARIANTS; do
    t0=$SECONDS
    c=(); [[ $v == qcow2-zlib ]] && c=(-c)
    qemu-img convert -f raw -O qcow2 "${c[@]}" -o cluster_size=65536 "$T/img/half.raw" "$T/img/$v.qcow2"
    note "qcow2_$v" "$(qemu-img info --output=json "$T/img/$v.qcow2" | python3 -c '
import json, sys
j = json.load(sys.stdin)
print("%.1f MiB file for %d MiB virtual, cluster %d KiB" % (j["actual-size"] / 1048576, j["virtual-size"] >> 20, j["cluster-size"] >> 10))'), made in $((SECONDS - t0)) s by qemu-img convert -f raw -O qcow2 ${c[*]}${c[*]:+ }-o cluster_size=65536"
  done
  rm -f "$T/img/half.raw"
fi

# --------------------------------------------------------------- origins ---
S3_URL_ANON=""; S3_PRESIGNED=""
s3_origin_start() { # SeaweedFS (qemu-tests/lib.sh's s3_start), bucket "images" also readable unsigned
  S3_ANON_READ=images s3_start
  note_cmd "origin-s3" "${S3_CMD[*]}   # ids.json: identity lazybd (keys, everything), identity anonymous (Read:images)"
  local t0=$SECONDS
  for _ in $(seq 50); do s3_curl -X PUT -o /dev/null "$S3_URL/images" 2>/dev/null && break; sleep 0.2; done
  s3_put "$T/img/disk.raw" images/disk.raw
  log "SeaweedFS at $S3_URL: images/disk.raw uploaded in $((SECONDS - t0)) s"
  S3_URL_ANON=$S3_URL/images/disk.raw
  S3_PRESIGNED=$(python3 "$BENCH/presign.py" s3 "$S3_URL/images/disk.raw" "$S3_AK" "$S3_SK" us-east-1 86400)
  # what a presigned GET URL gives a client that sends HEAD first
  local head get qerr nerr
  head=$(curl -s -o /dev/null -I -w '%{http_code}' "$S3_PRESIGNED" || true)
  get=$(curl -s -o /dev/null -r 0-4095 -w '%{http_code}' "$S3_PRESIGNED" || true)
  qerr=$(qemu-img info "json:{\"file\":{\"driver\":\"http\",\"url\":\"$S3_PRESIGNED\",\"readahead\":0}}" 2>&1 >/dev/null |
         sed -E 's/X-Amz-Signature=[0-9a-f]+/X-Amz-Signature=…/; s/^.*(CURL: )/\1/' | tail -n 1 || true)
  nerr=$(timeout 20 nbdkit -r -U - curl "$S3_PRESIGNED" --run 'nbdinfo --size "$uri"' 2>&1 >/dev/null |
         grep -m1 -o 'problem doing HEAD request.*' | sed -E 's/ \[[^]]*\]//' || true)
  note presigned_head "$head"; note presigned_get "$get"
  note presigned_qemu "${qerr:-opened (no error)}"; note presigned_nbdkit "${nerr:-opened (no error)}"
  log "presigned GET URL: HEAD $head, ranged GET $get; qemu: ${qerr:-ok}; nbdkit: ${nerr:-ok}"
  curl -fsS -o /dev/null -r 0-4095 "$S3_URL_ANON" || fail "anonymous read of $S3_URL_ANON refused"
}

SWIFT_TEMP_URL=""
SWIFT_TEMP_KEY=lazybd-bench-tempurl-key
swift_origin_start() {
  local t0=$SECONDS tok url code
  swift_start
  swift_put images disk.raw "$T/img/disk.raw"
  log "Swift: images/disk.raw uploaded in $((SECONDS - t0)) s (with the start)"
  read -r tok url < <(swift_token)
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "X-Auth-Token: $tok" \
         -H "X-Account-Meta-Temp-URL-Key: $SWIFT_TEMP_KEY" "$url") || code=000
  [[ $code == 204 ]] || fail "Swift: setting the account's temp URL key: HTTP $code"
  SWIFT_TEMP_URL=$(python3 "$BENCH/presign.py" swift "$url/images/disk.raw" "$SWIFT_TEMP_KEY" 86400 sha256)
  local head get
  for _ in $(seq 20); do   # the account's metadata reaches the proxy's cache
    get=$(curl -s -o /dev/null -r 0-4095 -w '%{http_code}' "$SWIFT_TEMP_URL" || true)
    [[ $get == 206 ]] && break; sleep 0.2
  done
  head=$(curl -s -o /dev/null -I -w '%{http_code}' "$SWIFT_TEMP_URL" || true)
  [[ $get == 206 && $head == 200 ]] || fail "Swift temp URL: HEAD $head, ranged GET $get"
  note swift_tempurl "HEAD $head, ranged GET $get"
  note_cmd "origin-swift" "qemu-tests/openstack.sh swift_start (proxy pipeline: $(sed -n 's/^pipeline = //p' "$SWIFT_STATE/etc/proxy-server.conf")); temp URL key set with POST X-Account-Meta-Temp-URL-Key; temp URL = bench/presign.py swift URL KEY 86400 sha256"
}

# -------------------------------------------------------------- servers ----
# start_server PART PEER LABEL -> SRV_PID SRV_URI SRV_LOG SRV_DIR (PART: s3,
# swift, qcow2 or qcow2-zlib); 1 if it does not come up
SRV_PID=""; SRV_URI=""; SRV_LOG=""; SRV_DIR=""; SRV_LABEL=""; SRV_PEER=""
start_server() {
  local part=$1 peer=$2 label=$3 port cmd=() envs=() url="" ck
  SRV_DIR=$T/srv/$label; rm -rf "$SRV_DIR"; mkdir -p "$SRV_DIR"
  SRV_LABEL=$label; SRV_PEER=$peer; SRV_LOG=$SRV_DIR/server.log; SRV_PID=""
  port=$(free_port); SRV_URI=nbd://127.0.0.1:$port/disk
  case $part in s3) url=$S3_URL_ANON ;; swift) url=$SWIFT_TEMP_URL ;; esac
  ck=$part/$peer
  case $part/$peer in
    s3/lazybd|swift/lazybd|qcow2*/lazybd)
      local origin fmt=()
      case $part in
        s3) origin=s3://images/disk.raw
            envs=(AWS_ACCESS_KEY_ID="$S3_AK" AWS_SECRET_ACCESS_KEY="$S3_SK" AWS_ENDPOINT_URL="$S3_URL" AWS_REGION=us-east-1) ;;
        swift) origin=swift://images/disk.raw
            envs=(ST_AUTH="$SWIFT_AUTH_URL" ST_USER="$SWIFT_USER" ST_KEY="$SWIFT_KEY") ;;
        *) origin=$T/img/$part.qcow2; fmt=(--format qcow2) ;;
      esac
      # shellcheck disable=SC2206
      cmd=("$LZ" serve "$origin" "${fmt[@]}" --cache-dir "$SRV_DIR/cache" --control none --listen "127.0.0.1:$port"
           --name disk --block-size "$BLOCK_SIZE" $LAZYBD_ARGS)
      local e shown=""
      for e in "${envs[@]}"; do shown+="${e%%=*}=… "; done
      note_cmd "$ck" "$shown${cmd[*]}"
      env --default-signal=INT,QUIT "${envs[@]}" "${cmd[@]}" </dev/null > "$SRV_LOG" 2>&1 &
      SRV_PID=$! ;;
    s3/nbdkit-cache|swift/nbdkit-cache)
      mkdir -p "$SRV_DIR/tmp"
      cmd=(nbdkit -P "$SRV_DIR/pid" --log=stderr -r -e disk -i 127.0.0.1 -p "$port" --filter=cache
           curl "$url" cache-on-read=true cache-min-block-size="$BLOCK_SIZE")
      note_cmd "$ck" "TMPDIR=FRESH ${cmd[*]}"
      TMPDIR=$SRV_DIR/tmp "${cmd[@]}" </dev/null > "$SRV_LOG" 2>&1 || true ;;
    s3/qsd|swift/qsd)
      qemu-img create -q -f qcow2 -o cluster_size="$BLOCK_SIZE" "$SRV_DIR/overlay.qcow2" "$IMG_BYTES" >> "$SRV_LOG" 2>&1
      cmd=(qemu-storage-daemon
           --blockdev "{\"driver\":\"http\",\"node-name\":\"origin\",\"url\":\"$url\",\"readahead\":$QSD_READAHEAD,\"read-only\":true}"
           --blockdev "driver=file,node-name=overlay-file,filename=$SRV_DIR/overlay.qcow2"
           --blockdev "driver=qcow2,node-name=overlay,file=overlay-file,backing=origin"
           --blockdev "driver=copy-on-read,node-name=cor,file=overlay"
           --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$port"
           --export "type=nbd,id=export0,node-name=cor,name=disk,writable=off"
           --daemonize --pidfile "$SRV_DIR/pid")
      note_cmd "$ck" "qemu-img create -f qcow2 -o cluster_size=$BLOCK_SIZE FRESH_OVERLAY $IMG_BYTES && ${cmd[*]}"
      "${cmd[@]}" </dev/null >> "$SRV_LOG" 2>&1 || true ;;
    qcow2*/qemu-nbd)
      cmd=(qemu-nbd -f qcow2 -r -t -e 8 -x disk -b 127.0.0.1 -p "$port" --pid-file "$SRV_DIR/pid" --fork "$T/img/$part.qcow2")
      note_cmd "$ck" "${cmd[*]}"
      "${cmd[@]}" </dev/null > "$SRV_LOG" 2>&1 || true ;;
    qcow2*/qsd)
      cmd=(qemu-storage-daemon
           --blockdev "driver=file,node-name=file,filename=$T/img/$part.qcow2,read-only=on"
           --blockdev "driver=qcow2,node-name=disk0,file=file,read-only=on"
           --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$port"
           --export "type=nbd,id=export0,node-name=disk0,name=disk,writable=off"
           --daemonize --pidfile "$SRV_DIR/pid")
      note_cmd "$ck" "${cmd[*]}"
      "${cmd[@]}" </dev/null >> "$SRV_LOG" 2>&1 || true ;;
    *) log "no such peer: $part/$peer"; return 1 ;;
  esac
  if [[ -z $SRV_PID ]]; then # daemons: pid from their pid file
    for _ in $(seq 50); do [[ -s $SRV_DIR/pid ]] && break; sleep 0.1; done
    SRV_PID=$(cat "$SRV_DIR/pid" 2>/dev/null || true)
  fi
  [[ -n $SRV_PID ]] || { log "$label: no pid; log: $(tail -c 400 "$SRV_LOG" | tr '\n' ' ')"; return 1; }
  bg_track "$SRV_PID"
  local i
  for ((i = 0; i < 600; i++)); do
    nbdinfo --size "$SRV_URI" > /dev/null 2>&1 && return 0
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.1
  done
  log "$label: server did not come up; log: $(tail -c 400 "$SRV_LOG" | tr '\n' ' ')"
  return 1
}

kill_pid() { # TERM, wait up to $2 s, then KILL; 0 if it exited on TERM
  local pid=$1 i lim=$(( ${2:-10} * 10 ))
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < lim; i++)); do _pid_alive "$pid" || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  return 1
}
STOPS=$T/stops.tsv; : > "$STOPS"
stop_server() { # SIGTERM, record whether it exited and lazybd's summary line
  local how=term-exit summary="" grace=3
  [[ -n $SRV_PID ]] || return 0
  [[ $SRV_PEER == lazybd ]] && grace=15
  kill_pid "$SRV_PID" "$grace" || how="KILLED-after-${grace}s"
  wait "$SRV_PID" 2>/dev/null || true
  summary=$(sed -E 's/\x1b\[[0-9;]*m//g' "$SRV_LOG" 2>/dev/null | grep -E 'origin_requests=' | tail -1 || true)
  printf '%s\t%s\t%s\n' "$SRV_LABEL" "$how" "$summary" >> "$STOPS"
  rm -rf "$SRV_DIR/cache" "$SRV_DIR/tmp" "$SRV_DIR/overlay.qcow2"
  SRV_PID=""
}

# ----------------------------------------------------------------- fio -----
ROWS=$T/rows.tsv
printf 'part\tcase\tpeer\tround\tiops\tmibs\tlat_mean_us\tlat_p99_us\tseconds\tio_bytes\tstatus\tnote\n' > "$ROWS"
ROUND=1
record_fail() { # PART CASE PEER NOTE
  printf '%s\t%s\t%s\t%s\t\t\t\t\t\t\tFAIL\t%s\n' "$1" "$2" "$3" "$ROUND" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-400)" >> "$ROWS"
  log "FAIL $1 $2 $3 (round $ROUND): $4"
}
fio_activity() { # context switches of the given processes' threads: they stop when no I/O completes
  local p f k v s=0
  for p in "$@"; do
    for f in /proc/"$p"/task/*/status; do
      [[ -r $f ]] || continue
      while read -r k v _; do
        case $k in voluntary_ctxt_switches:|nonvoluntary_ctxt_switches:) s=$((s + v)) ;; esac
      done < "$f" 2>/dev/null || true
    done
  done
  echo "$s"
}
# run_fio HARD_CAP OUTFILE ARGS... — fio with bench/run.sh's stall watchdog:
# killed if its job process does not wake up for STALL_S seconds or runs past
# HARD_CAP. Returns fio's status, or 124 with FIO_NOTE set.
FIO_NOTE=""
usec() { local t=${EPOCHREALTIME/./}; echo "${t#0}"; }
run_fio() {
  local hard=$1 outf=$2 fp kids="" last=-1 now t0 tnow tlast rc=0; shift 2
  FIO_NOTE=""
  fio "$@" > "$outf" 2>&1 &
  fp=$!; bg_track "$fp"
  t0=$(usec); tlast=$t0
  while kill -0 "$fp" 2>/dev/null; do
    sleep 0.2
    [[ -n $kids ]] || kids=$(pgrep -P "$fp" || true)
    # shellcheck disable=SC2086
    now=$(fio_activity ${kids:-$fp}); tnow=$(usec)
    if [[ $now != "$last" ]]; then last=$now; tlast=$tnow; fi
    if ((tnow - tlast >= STALL_S * 1000000 || tnow - t0 >= hard * 1000000)); then
      if ((tnow - tlast >= STALL_S * 1000000)); then
        FIO_NOTE="stalled: no I/O completed for ${STALL_S} s, $(((tnow - t0) / 1000000)) s into the case"
      else FIO_NOTE="over the ${hard} s cap"; fi
      # shellcheck disable=SC2046
      kill -KILL $(pgrep -P "$fp" || true) "$fp" 2>/dev/null || true
      wait "$fp" 2>/dev/null || true
      return 124
    fi
  done
  wait "$fp" || rc=$?
  return "$rc"
}
FIO_ROW='
import json, sys
js, part, case, peer, rnd, want, extra = sys.argv[1:]
t = open(js).read()
j = json.loads(t[t.index("{"):])
job = j["jobs"][0]; r = job["read"]
note = [extra] if extra else []
err, got = job.get("error"), r["io_bytes"]
if err: note.append("fio error %s" % err)
if want and got < int(want): note.append("INCOMPLETE %d/%s bytes" % (got, want))
status = "ok" if got > 0 and not err and not (want and got < int(want)) else "FAIL"
p99 = r["lat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
print("\t".join(map(str, [part, case, peer, rnd, "%.1f" % r["iops"], "%.2f" % (r["bw_bytes"] / 1048576),
      "%.1f" % (r["lat_ns"]["mean"] / 1000), "%.1f" % p99, "%.3f" % (r["runtime"] / 1000), got,
      status, "; ".join(note)])))'
# run_case PART CASE PEER : on the running server; 0 and a row, or 1 with FAIL_MSG
EXTRA_NOTE=""; FAIL_MSG=""
run_case() {
  local part=$1 case=$2 peer=$3 js cap rc=0 args want="" row
  js=$SRV_DIR/$case.json
  args=(--name="$case" --ioengine=nbd --uri="$SRV_URI" --size="$IMG_BYTES" --lat_percentiles=1
        --output-format=json --output="$js")
  case $case in
    cold-seq|warm-seq) cap=$SEQ_MAX; want=$IMG_BYTES; args+=(--rw=read --bs=1M --iodepth=8 --runtime="$cap") ;;
    warm-rand32) cap=$RUNTIME; args+=(--rw=randread --bs=4k --iodepth=32 --time_based --runtime="$cap") ;;
    cold-rand32) cap=$COLD_MAX; want=$((COLD_N * 4096))
                 args+=(--rw=randread --bs=4k --iodepth=32 --io_size="$want" --runtime="$cap") ;;
  esac
  [[ $ROUND == 1 ]] && note_cmd "fio-$case" "fio ${args[*]}"
  log "round $ROUND: $part $case $peer${EXTRA_NOTE:+  [$EXTRA_NOTE]}"
  rm -f "$js"
  run_fio "$((cap + 30))" "$SRV_DIR/$case.fio.out" "${args[@]}" || rc=$?
  if [[ $rc != 0 || ! -s $js ]]; then
    FAIL_MSG="fio rc=$rc${FIO_NOTE:+ ($FIO_NOTE)}: $(tail -c 200 "$SRV_DIR/$case.fio.out" | tr '\t\n' '  ')"
    kill -0 "$SRV_PID" 2>/dev/null || FAIL_MSG="$FAIL_MSG; server exited, log: $(tail -c 300 "$SRV_LOG" | tr '\t\n' '  ')"
    return 1
  fi
  row=$(python3 -c "$FIO_ROW" "$js" "$part" "$case" "$peer" "$ROUND" "$want" "$EXTRA_NOTE") || {
    FAIL_MSG="unreadable fio json"; return 1; }
  if [[ $(cut -f11 <<< "$row") != ok ]]; then FAIL_MSG="fio: $(cut -f12 <<< "$row")"; return 1; fi
  printf '%s\n' "$row" >> "$ROWS"
  return 0
}

# session PART PEER LABEL CASE... : one fresh server, the cases in order. A
# failed cold case is retried once on a fresh server (the first attempt is
# kept as CASE#1); after a failure that is not retried, the rest of the
# session is reported as not run.
session() {
  local part=$1 peer=$2 label=$3 i c msg restarts=0; shift 3
  local cs=("$@")
  fresh() {
    [[ -z $SRV_PID ]] || stop_server
    local l=$label; ((restarts == 0)) || l=$label.restart$restarts
    restarts=$((restarts + 1))
    start_server "$part" "$peer" "$l" && return 0
    msg="server failed to start: $(tail -c 300 "$SRV_LOG" | tr '\t\n' '  ')"
    [[ -z $SRV_PID ]] || stop_server
    return 1
  }
  fail_rest() { local j; for ((j = $1; j < ${#cs[@]}; j++)); do record_fail "$part" "${cs[j]}" "$peer" "$2"; done; }
  if ! fresh; then fail_rest 0 "$msg"; return 0; fi
  for ((i = 0; i < ${#cs[@]}; i++)); do
    c=${cs[i]}
    run_case "$part" "$c" "$peer" && continue
    msg=$FAIL_MSG
    if [[ $c == cold-* ]] && fresh; then
      EXTRA_NOTE="2nd attempt on a fresh server"
      if run_case "$part" "$c" "$peer"; then
        EXTRA_NOTE=""
        record_fail "$part" "$c#1" "$peer" "1st attempt: $msg"
        continue
      fi
      EXTRA_NOTE=""
      msg="$FAIL_MSG; 1st attempt: $msg"
    fi
    record_fail "$part" "$c" "$peer" "$msg"
    fail_rest "$((i + 1))" "not run: $c failed before it"
    break
  done
  stop_server
}

# ---------------------------------------------------------------- run ------
if has "$PARTS" s3; then s3_origin_start; fi
if has "$PARTS" swift; then swift_origin_start; fi
SETUP_S=$((SECONDS - START))
LOAD_START=$STAMP_LOAD
log "temp dir $T; parts: $PARTS; $ROUNDS round(s); set-up took $SETUP_S s"
reversed() { printf '%s\n' $1 | tac | tr '\n' ' '; }
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  for part in $PARTS; do
    case $part in
      s3) peers=$PEERS_S3; groups=s3 ;;
      swift) peers=$PEERS_SWIFT; groups=swift ;;
      qcow2) peers=$PEERS_QCOW2; groups=$QCOW2_VARIANTS ;;
    esac
    ((ROUND % 2)) || peers=$(reversed "$peers")
    for g in $groups; do
      for p in $peers; do session "$g" "$p" "$g.$p.cold-rand32.r$ROUND" cold-rand32; done
      if [[ $part == qcow2 ]]; then
        for p in $peers; do session "$g" "$p" "$g.$p.seq.r$ROUND" cold-seq warm-seq warm-rand32; done
      else
        for p in $peers; do session "$g" "$p" "$g.$p.cold-seq.r$ROUND" cold-seq; done
      fi
    done
  done
done
ELAPSED=$((SECONDS - START))
# the origins stop now, gently (lib.sh's EXIT trap would also KILL what is slow to go)
if has "$PARTS" swift; then swift_stop || true; fi
if has "$PARTS" s3; then s3_stop || true; fi

# --------------------------------------------------------------- report ----
META=$T/meta.tsv
{
  printf 'host\t%s cores, %s, %s, kernel %s\n' "$(nproc)" "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    "$(awk '/^MemTotal/ {printf "%.1f GiB RAM", $2 / 1048576}' /proc/meminfo)" "$(uname -r)"
  printf 'versions\tfio %s, qemu %s, nbdkit %s, libnbd %s, SeaweedFS %s, Swift %s\n' "$(fio --version | sed 's/^fio-//')" \
    "$(qemu-storage-daemon --version | head -1 | awk '{print $3}')" "$(nbdkit --version | awk '{print $2}')" \
    "$(nbdinfo --version 2>/dev/null | awk 'NR==1 {print $2}')" \
    "$(weed version 2>/dev/null | awk '/version/ {print $3; exit}' || echo -)" \
    "$(dpkg-query -W -f='${Version}' python3-swift 2>/dev/null || echo -)"
  printf 'lazybd\tbinary %s\n' "$LAZYBD_INFO"
  printf 'load\t%s at start, %s at end\n' "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'elapsed_s\t%s\n' "$ELAPSED"
  printf 'setup_s\t%s\n' "$SETUP_S"
  printf 'invocation\t%s\n' "QUICK=$QUICK ROUNDS=$ROUNDS IMG_MIB=$IMG_MIB RUNTIME=$RUNTIME BLOCK_SIZE=$BLOCK_SIZE COLD_READS=$COLD_READS PARTS=\"$PARTS\" QCOW2_VARIANTS=\"$QCOW2_VARIANTS\" QSD_READAHEAD=$QSD_READAHEAD${LAZYBD_ARGS:+ LAZYBD_ARGS=\"$LAZYBD_ARGS\"} bench/origins.sh"
  printf 'rounds\t%s\nimg_mib\t%s\nruntime\t%s\nblock_size\t%s\ncold_n\t%s\nqsd_readahead\t%s\n' \
    "$ROUNDS" "$IMG_MIB" "$RUNTIME" "$BLOCK_SIZE" "$COLD_N" "$QSD_READAHEAD"
  printf 'peers_s3\t%s\npeers_swift\t%s\npeers_qcow2\t%s\nparts\t%s\nvariants\t%s\n' \
    "$PEERS_S3" "$PEERS_SWIFT" "$PEERS_QCOW2" "$PARTS" "$QCOW2_VARIANTS"
} > "$META"
python3 - "$ROWS" "$META" "$NOTES" "$CMDS" "$STOPS" "$SECTION_TITLE" "$BENCH" > "$T/section.md" <<'EOF'
import sys
rows_p, meta_p, notes_p, cmds_p, stops_p, title, bench = sys.argv[1:]
sys.path.insert(0, bench)
from resultsmd import median, rounds_cell
meta = dict(l.rstrip("\n").split("\t", 1) for l in open(meta_p) if "\t" in l)
notes = dict(l.rstrip("\n").split("\t", 1) for l in open(notes_p) if "\t" in l)
lines = [l.rstrip("\n").split("\t") for l in open(rows_p) if l.strip()]
hdr, rows = lines[0], [dict(zip(lines[0], l + [""] * (len(lines[0]) - len(l)))) for l in lines[1:]]
stops = [l.rstrip("\n").split("\t") for l in open(stops_p) if l.strip()]
nr = int(meta["rounds"])
out = []; w = out.append
def fn(x, nd=0):
    try: return f"{float(x):,.{nd}f}"
    except (TypeError, ValueError): return "—"
CASES = {"cold-rand32": ("IOPS", "iops", 0), "cold-seq": ("MiB/s", "mibs", 1),
         "warm-seq": ("MiB/s", "mibs", 1), "warm-rand32": ("IOPS", "iops", 0)}
CASE_TEXT = {
    "cold-rand32": f"cold 4K random QD32 ({meta['cold_n']} first-touch reads, fresh server)",
    "cold-seq": "cold sequential 1 MiB QD8 (whole image, fresh server)",
    "warm-seq": "warm sequential 1 MiB QD8 (the same pass again)",
    "warm-rand32": f"warm 4K random QD32 ({meta['runtime']} s)",
}
def ok(part, case, peer):
    """{round: value} of the ok rows"""
    m = CASES[case][1]
    return {r["round"]: float(r[m]) for r in rows
            if r["part"] == part and r["case"] == case and r["peer"] == peer and r["status"] == "ok"}
goals = []
def part_table(part, peers, cases):
    w("| case | " + " | ".join(peers) + " | best peer | lazybd ÷ best peer: median (each round) | goal | met |")
    w("|---|" + "---|" * len(peers) + "---|---|---|---|")
    others = [p for p in peers if p != "lazybd"]
    for case in cases:
        unit, _, nd = CASES[case]
        vals = {p: ok(part, case, p) for p in peers}
        cells = []
        for p in peers:
            v = vals[p]
            fails = [r for r in rows if r["part"] == part and r["case"] == case and r["peer"] == p and r["status"] != "ok"]
            c = f"{fn(median(list(v.values())), nd)} {unit}" if v else "FAIL"
            if v and len(v) < nr: c += f" ({len(v)} of {nr} rounds)"
            cells.append(c)
        per, bests = [], []
        for rnd in sorted(vals.get("lazybd", {}), key=int):
            cand = [(vals[p][rnd], p) for p in others if rnd in vals[p]]
            if not cand: continue
            b, bp = max(cand)
            per.append(vals["lazybd"][rnd] / b); bests.append(bp)
        bestname = max(set(bests), key=bests.count) if bests else "—"
        if bests and len(set(bests)) > 1:
            bestname += " (" + " / ".join(bests) + ")"
        m = median(per)
        met = "—" if m is None else "yes" if m >= 1.0 else "no"
        rc = rounds_cell(per, 2, "×", rounds=nr)
        w(f"| {CASE_TEXT[case]} | " + " | ".join(cells) + f" | {bestname} | {rc} | ≥ 1.0× best peer | {met} |")
        goals.append((PART_NAME[part], CASE_TEXT[case], rc, met))
PART_NAME = {"s3": "S3 (SeaweedFS)", "swift": "Swift", "qcow2": "qcow2 template", "qcow2-zlib": "qcow2 template, zlib-compressed clusters"}

w(title); w("")
w(f"{meta['elapsed_s']} s ({meta['setup_s']} s of set-up: images, uploads, origins); load average {meta['load']}. "
  f"{meta['host']}. {meta['versions']}. lazybd {meta['lazybd']}.")
w(""); w(f"`{meta['invocation']}`"); w("")
w(f"Client: fio's libnbd `nbd` ioengine, one NBD connection over TCP, on the same 2 cores as the server and the origin. "
  f"Image: {meta['img_mib']} MiB. lazybd `--block-size {meta['block_size']}`; every origin on 127.0.0.1 (no added delay). "
  f"{nr} rounds; the peers run in list order in odd rounds and reversed in even ones, and every ratio pairs lazybd with the best "
  "peer of the same round (the median over the rounds, then each round's). Values are medians over the rounds. "
  "A peer that failed a case in a round (after one retry on a fresh server) is left out of that round's best peer; "
  "its failures are listed at the end.")
w("")
parts = meta["parts"].split()

if "s3" in parts:
    peers = meta["peers_s3"].split()
    w("### S3: SeaweedFS")
    w("")
    w("SeaweedFS `weed mini` on 127.0.0.1 with the image as object `images/disk.raw`. lazybd: `serve s3://images/disk.raw` "
      "with the keys in `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` and `AWS_ENDPOINT_URL`: every GET SigV4-signed by lazybd, "
      "`If-Match` on every ranged GET. qsd: http driver "
      f"(`readahead={meta['qsd_readahead']}`) → fresh qcow2 overlay → copy-on-read, as in bench/run.sh; nbdkit-cache: "
      "`nbdkit --filter=cache curl URL cache-on-read=true`.")
    w("")
    w("**A presigned URL cannot be used by either peer.** qemu's curl driver and nbdkit's curl plugin both send a `HEAD` "
      "to learn the size before any `GET`, and a SigV4 signature covers the method: a URL presigned for GET answers "
      f"HEAD with HTTP {notes.get('presigned_head', '?')} (a ranged GET on it: HTTP {notes.get('presigned_get', '?')}). "
      f"qemu-img on that URL: `{notes.get('presigned_qemu', '?')}`; nbdkit: `{notes.get('presigned_nbdkit', '?')}` "
      "(both checked in this run). The peers therefore read the same object on the same server through the bucket's "
      "anonymous read access (SeaweedFS identity `anonymous` with `Read:images`), a plain unsigned URL: the server checks "
      "no signature for them.")
    w("")
    part_table("s3", peers, ["cold-rand32", "cold-seq"])
    w("")

if "swift" in parts:
    peers = meta["peers_swift"].split()
    w("### Swift")
    w("")
    w("OpenStack Swift from Debian (qemu-tests/openstack.sh `swift_start`: proxy with `tempurl` and `tempauth`, "
      "account, container and object servers with `workers = 0`, one replica on a plain directory, 127.0.0.1) holding "
      "the image as `images/disk.raw`. lazybd: `serve swift://images/disk.raw` with `ST_AUTH`/`ST_USER`/`ST_KEY` (v1 auth, "
      "token in `X-Auth-Token`, `If-Match` on every ranged GET). qsd and nbdkit-cache as for S3, on a Swift temp URL "
      f"(`temp_url_sig` HMAC-SHA256 with the account's `X-Account-Meta-Temp-URL-Key`; checked: {notes.get('swift_tempurl', '?')}).")
    w("")
    part_table("swift", peers, ["cold-rand32", "cold-seq"])
    w("")

vs = [v for v in meta["variants"].split() if "qcow2" in parts]
if vs:
    peers = meta["peers_qcow2"].split()
    w("### qcow2 template")
    w("")
    w("A raw image whose every 4 KiB page is 2 KiB random and 2 KiB zeros, converted with `qemu-img convert -O qcow2` "
      "(64 KiB clusters): " + "; ".join(f"`{v}`: {notes.get('qcow2_' + v, '?')}" for v in vs) + ". "
      "lazybd: `serve --format qcow2 FILE` (a local file origin, fresh cache: the first read of a table or cluster copies "
      "it into the cache, every later one is local; the decoder runs on every read); qemu-nbd: `qemu-nbd -f qcow2 -r` "
      "(default cache mode, writeback through the page cache); qsd: `file` → `qcow2` blockdevs, exported read-only. "
      "Cold means a freshly started server (lazybd with an empty cache, the others with empty L2 and cluster caches); "
      "the file is in the host's page cache for all three. nbdkit 1.32 (this machine's) has no qcow2 decoder — its "
      "`qcow2dec` filter came in a later release — so it is not a peer here.")
    w("")
    for v in vs:
        w(f"**{PART_NAME[v]}** (`{v}`)")
        w("")
        part_table(v, peers, ["cold-rand32", "cold-seq", "warm-seq", "warm-rand32"])
        w("")

if goals:
    n_met = sum(1 for g in goals if g[3] == "yes")
    w("### Goals")
    w("")
    w(f"{n_met} of {len(goals)} met (goal of every case: lazybd ≥ 1.0× the best peer, median of the per-round ratios).")
    w("")
    w("| origin | case | lazybd ÷ best peer | met |"); w("|---|---|---|---|")
    for g in goals: w("| " + " | ".join(g) + " |")
    w("")

w("### Every round")
w("")
w("| part | case | peer | round | IOPS | MiB/s | mean µs | p99 µs | seconds | status |")
w("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    st = r["status"] + (f": {r['note']}" if r["note"] else "")
    w(f"| {r['part']} | {r['case']} | {r['peer']} | {r['round']} | {fn(r['iops'])} | {fn(r['mibs'], 1)} | "
      f"{fn(r['lat_mean_us'], 1)} | {fn(r['lat_p99_us'], 1)} | {r['seconds'] or '—'} | {st} |")
w("")
fails = [r for r in rows if r["status"] != "ok"]
if fails:
    w("Failures: " + "; ".join(f"{r['part']} {r['case']} {r['peer']} round {r['round']}: {r['note']}" for r in fails))
    w("")
w("### lazybd's origin traffic, server shutdowns, command lines")
w("")
import re
def field(line, name):
    m = re.search(r"\b" + name + r"=(\d+)", line)
    return int(m.group(1)) if m else None
lz = [s + [""] * (3 - len(s)) for s in stops if ".lazybd." in s[0]]
if lz:
    w("From lazybd's summary line at each SIGTERM (one server per row; `seq` = cold-seq, warm-seq and, for qcow2, "
      "warm-rand32 on one server):")
    w("")
    w("| lazybd server | exit | reads | origin requests | origin MiB | readahead MiB |"); w("|---|---|---|---|---|---|")
    for s in lz:
        v = [field(s[2], k) for k in ("reads", "origin_requests", "origin_bytes", "readahead_bytes")]
        mib = lambda x: "—" if x is None else f"{x / 1048576:,.1f}"
        w(f"| {s[0]} | {s[1]} | {fn(v[0])} | {fn(v[1])} | {mib(v[2])} | {mib(v[3])} |")
    w("")
others = [s + [""] * (3 - len(s)) for s in stops if ".lazybd." not in s[0]]
bad = [s for s in others if s[1] != "term-exit"]
w(f"Peer servers: {len(others)}, " + ("all exited on SIGTERM." if not bad else
  f"{len(others) - len(bad)} exited on SIGTERM; killed: " + ", ".join(f"{s[0]} ({s[1]})" for s in bad) + "."))
bad_lz = [s for s in lz if s[1] != "term-exit"]
if bad_lz:
    w("")
    w("lazybd servers that did not exit on SIGTERM: " + ", ".join(s[0] for s in bad_lz) + ".")
w("")
w("```")
for l in open(cmds_p): w(l.rstrip("\n"))
w("```")
w("")
w("Paths are the temp dir of that run; PORT is a free port picked at run time; FRESH a new empty directory or file per server; `…` a key or signature left out.")
print("\n".join(out))
EOF
mkdir -p "$(dirname "$OUT")"
write_section "$OUT" "$T/section.md"
log "wrote its section of $OUT (${ELAPSED} s)"
column -t -s $'\t' "$ROWS" >&2 || cat "$ROWS" >&2

# exit status: lazybd has numbers in every case and round; every case has a peer's
python3 - "$ROWS" "$ROUNDS" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
nr = int(sys.argv[2])
ok = {(r[0], r[1], r[2], r[3]) for r in rows if r[10] == "ok"}
cases = {(r[0], r[1]) for r in rows if "#" not in r[1]}
bad = []
for part, case in sorted(cases):
    for rnd in range(1, nr + 1):
        if (part, case, "lazybd", str(rnd)) not in ok:
            bad.append(f"{part} {case}: lazybd has no numbers in round {rnd}")
    if not any(k[0] == part and k[1] == case and k[2] != "lazybd" for k in ok):
        bad.append(f"{part} {case}: no peer has numbers")
for b in bad: print("origins.sh:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
