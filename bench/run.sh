#!/usr/bin/env bash
# bench/run.sh — lazybd against its peers, side by side, in one run (~22 min
# with the defaults, 3 rounds, on 2 cores).
#
# Origin: nginx on loopback (own temp config, max_ranges 1) serving a random
# raw image; for the "-rtt" cases a delay proxy (bench/delay-proxy.rs, 0.5 ms
# each way = 1 ms RTT, 1000 Mbit/s shared link) sits in front of it.
# Client: fio's libnbd `nbd` ioengine, one NBD connection per job.
#
# Peers (PEERS):
#   lazybd        target/release/lazybd serve URL (cold = fresh --cache-dir;
#                 its own default block, 4 KiB, unless LAZYBD_BLOCK_SIZE)
#   nbdkit-cache  nbdkit curl plugin + cache filter, cache-on-read=true,
#                 cache-min-block-size=$BLOCK_SIZE
#   qsd           qemu-storage-daemon: http (curl) blockdev, readahead=0 ->
#                 qcow2 overlay (cluster_size=$BLOCK_SIZE) -> copy-on-read filter
#   nbdkit-file   nbdkit file plugin on a local copy of the image   (warm ceiling)
#   nbd-server    nbd-server on the same local copy                  (warm ceiling)
# Cases (CASES): see bench/README.md. Every "cold" case runs on a freshly
# started server with an empty cache; warm cases follow a full sequential pass.
# Rounds (ROUNDS, 3): every case runs once per peer per round, the peers in
# PEERS order in odd rounds and reversed in even ones (A B C, C B A, A B C),
# so that a ratio pairs two servers that ran minutes apart at most; the report
# gives medians over the rounds and every round's ratio.
#
# Writes its section, "## lazybd against its peers (bench/run.sh)", into OUT
# (replacing an earlier one; bench/lib.sh stamps it) and the raw rows to
# ${OUT%.md}.tsv.
#
# Env knobs:
#   QUICK (1: IMG_MIB=64 RUNTIME=2 ROUNDS=2 SEQ_MAX=COLD_MAX=20 STALL_S=10, a smoke run)
#   ROUNDS (3)  IMG_MIB (1024)  RUNTIME (10 s per timed case)
#   BLOCK_SIZE (64k: the peers' cache granularity, qemu's and nbdkit's default)
#   LAZYBD_BLOCK_SIZE (lazybd's --block-size; empty: its default, 4k)
#   PEERS ("lazybd nbdkit-cache qsd nbdkit-file nbd-server")
#   CASES ("cold-seq warm-seq warm-rand1-tcp warm-rand32-tcp warm-rand1-unix
#           warm-rand32-unix cold-rand32-rtt cold-seq-rtt")
#   OUT (bench/RESULTS.md)   DELAY_MS (0.5 one way)   RATE_MBIT (1000)
#   COLD_READS (2048 first-touch reads for cold-rand32-rtt)
#   SEQ_MAX (120 s cap on one sequential pass)   COLD_MAX (120 s cap on cold reads)
#   STALL_S (20: a case whose fio completes no I/O for this long is killed as hung)
#   LAZYBD (binary path)  LAZYBD_ARGS (extra `serve` options)  IMG (reuse a raw image)
#   ACCESS_LOG (1: nginx logs each request; used to count origin requests/bytes)
#   KEEP (1: keep the temp dir)  BENCH_TMP (parent of the temp dir, default /tmp)
# Exit status: 0 if every selected (peer, case) produced numbers, 1 otherwise.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  IMG_MIB=${IMG_MIB:-64}; RUNTIME=${RUNTIME:-2}; ROUNDS=${ROUNDS:-2}
  SEQ_MAX=${SEQ_MAX:-20}; COLD_MAX=${COLD_MAX:-20}; STALL_S=${STALL_S:-10}
fi
ROUNDS=${ROUNDS:-3}
IMG_MIB=${IMG_MIB:-1024}
RUNTIME=${RUNTIME:-10}
BLOCK_SIZE=${BLOCK_SIZE:-64k}
LAZYBD_BLOCK_SIZE=${LAZYBD_BLOCK_SIZE:-}
PEERS=${PEERS:-lazybd nbdkit-cache qsd nbdkit-file nbd-server}
CASES=${CASES:-cold-seq warm-seq warm-rand1-tcp warm-rand32-tcp warm-rand1-unix warm-rand32-unix cold-rand32-rtt cold-seq-rtt}
OUT=${OUT:-$BENCH/RESULTS.md}
DELAY_MS=${DELAY_MS:-0.5}
RATE_MBIT=${RATE_MBIT:-1000}
COLD_READS=${COLD_READS:-2048}
SEQ_MAX=${SEQ_MAX:-120}
COLD_MAX=${COLD_MAX:-120}
LAZYBD=${LAZYBD:-$ROOT/target/release/lazybd}
LAZYBD_ARGS=${LAZYBD_ARGS:-}
ACCESS_LOG=${ACCESS_LOG:-1}

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }
has() { [[ " $1 " == *" $2 "* ]]; }

to_bytes() { # 64k / 64K / 64KiB / 1M / 65536 -> bytes
  python3 - "$1" <<'EOF'
import re, sys
m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", sys.argv[1])
if not m: sys.exit(f"bad size {sys.argv[1]!r}")
print(int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()])
EOF
}
BLOCK_BYTES=$(to_bytes "$BLOCK_SIZE")
IMG_BYTES=$((IMG_MIB * 1024 * 1024))

for p in $PEERS; do
  case $p in lazybd|nbdkit-cache|qsd|nbdkit-file|nbd-server) ;; *) die "unknown peer $p" ;; esac
done
for c in $CASES; do
  case $c in cold-seq|warm-seq|warm-rand1-tcp|warm-rand32-tcp|warm-rand1-unix|warm-rand32-unix|cold-rand32-rtt|cold-seq-rtt) ;;
  *) die "unknown case $c" ;; esac
done

# ---------------------------------------------------------------- tools ----
tools_ok() {
  local t
  for t in fio nbdkit nbdinfo qemu-img qemu-storage-daemon nginx nbd-server curl rustc python3; do
    command -v "$t" >/dev/null 2>&1 || return 1
  done
  nbdkit curl --version >/dev/null 2>&1 || return 1
  nbdkit file --version >/dev/null 2>&1 || return 1
  nbdkit --filter=cache null --version >/dev/null 2>&1 || return 1
  fio --enghelp=nbd >/dev/null 2>&1 || return 1
  ls /usr/lib/*/qemu/block-curl.so >/dev/null 2>&1 || return 1   # qemu-block-extra: http driver
}
if ! tools_ok; then
  log "tools missing: running scripts/install-deps.sh"
  "$ROOT/scripts/install-deps.sh"
  tools_ok || die "tools still missing after scripts/install-deps.sh"
fi
if has "$PEERS" lazybd && [[ ! -x $LAZYBD ]]; then
  log "building lazybd (cargo build --release)"
  (cd "$ROOT" && cargo build --release --bin lazybd) || die "cargo build failed"
fi

# ------------------------------------------------------------ temp dir -----
T=$(mktemp -d "${BENCH_TMP:-/tmp}/lazybd-bench.XXXXXX")
chmod 755 "$T"     # nginx workers run unprivileged and must reach origin/
PIDS=()            # every process we started that is (maybe) still running
forget_pid() { local p keep=(); for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done; PIDS=("${keep[@]}"); }
kill_pid() { # TERM, wait up to $2 s (default 10), then KILL; returns 0 if it exited on TERM
  local pid=$1 i lim=$(( ${2:-10} * 10 ))
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < lim; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  return 1
}
cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill_pid "$p" 3 || true; done
  if [[ ${KEEP:-0} == 1 || $rc == 2 ]]; then log "temp dir kept: $T"; else rm -rf "$T"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --------------------------------------------------------------- origin ----
if [[ -n ${IMG:-} ]]; then
  [[ -f $IMG ]] || die "IMG=$IMG not found"
  mkdir -p "$T/origin"; ln -s "$(readlink -f "$IMG")" "$T/origin/disk.img"
  IMG_BYTES=$(stat -L -c %s "$IMG"); IMG_MIB=$((IMG_BYTES / 1048576))
else
  log "making a ${IMG_MIB} MiB random image"
  mkdir -p "$T/origin"
  head -c "$IMG_BYTES" /dev/urandom > "$T/origin/disk.img"
  chmod 644 "$T/origin/disk.img"
fi
IMAGE=$T/origin/disk.img

NGX=$T/nginx; mkdir -p "$NGX/tmp"
HTTP_PORT=$(free_port)
if [[ $ACCESS_LOG == 1 ]]; then alog="access_log $NGX/access.log origin;"; else alog="access_log off;"; fi
cat > "$NGX/nginx.conf" <<EOF
daemon on;
worker_processes 2;
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
events { worker_connections 4096; }
http {
  log_format origin '\$msec \$status \$body_bytes_sent "\$http_range"';
  $alog
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 10000000; keepalive_timeout 600s;
  max_ranges 1;
  client_body_temp_path $NGX/tmp; proxy_temp_path $NGX/tmp; fastcgi_temp_path $NGX/tmp;
  uwsgi_temp_path $NGX/tmp; scgi_temp_path $NGX/tmp;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$HTTP_PORT;
    root $T/origin;
  }
}
EOF
nginx -c "$NGX/nginx.conf" -p "$NGX" -e "$NGX/error.log" || die "nginx failed to start"
for _ in $(seq 50); do [[ -s $NGX/nginx.pid ]] && break; sleep 0.1; done
PIDS+=("$(cat "$NGX/nginx.pid")")
URL_DIRECT=http://127.0.0.1:$HTTP_PORT/disk.img
curl -fsS -o /dev/null -r 0-4095 "$URL_DIRECT" || die "nginx does not serve $URL_DIRECT"
[[ $(curl -s -o /dev/null -w '%{http_code}' -r 0-1,4-5 "$URL_DIRECT") == 200 ]] || log "warning: nginx answered a multi-range request with a 206"

need_rtt=0; for c in $CASES; do [[ $c == *-rtt ]] && need_rtt=1; done
URL_RTT=""; RTT_MEASURED=""; RTT_DIRECT=""
http_rtt() { # mean time of 20 keep-alive 4 KiB range GETs (first one excluded), in ms
  local u=$1 args=() i
  for i in $(seq 0 20); do args+=(-r "$((i * 1048576))-$((i * 1048576 + 4095))" -o /dev/null "$u"); done
  curl -fsS -w '%{time_total}\n' "${args[@]}" | tail -n +2 | awk '{s += $1; n++} END {printf "%.3f", s / n * 1000}'
}
if [[ $need_rtt == 1 ]]; then
  log "building the delay proxy"
  rustc -O -o "$T/delay-proxy" "$BENCH/delay-proxy.rs" 2> "$T/delay-proxy.build.log" || { cat "$T/delay-proxy.build.log" >&2; die "rustc failed"; }
  PROXY_PORT=$(free_port)
  "$T/delay-proxy" --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$HTTP_PORT" \
    --delay-ms "$DELAY_MS" --rate-mbit "$RATE_MBIT" --duration-s 14400 2> "$T/delay-proxy.log" &
  PIDS+=("$!")
  URL_RTT=http://127.0.0.1:$PROXY_PORT/disk.img
  for _ in $(seq 50); do curl -fsS -o /dev/null -r 0-0 "$URL_RTT" 2>/dev/null && break; sleep 0.1; done
  RTT_DIRECT=$(http_rtt "$URL_DIRECT"); RTT_MEASURED=$(http_rtt "$URL_RTT")
  log "4 KiB range GET: direct ${RTT_DIRECT} ms, through the proxy ${RTT_MEASURED} ms"
fi

# a private copy of the binary: a rebuild during the run must not change it
if has "$PEERS" lazybd; then
  cp "$LAZYBD" "$T/lazybd"
  LAZYBD_INFO="$(readlink -f "$LAZYBD"), built $(date -u -r "$LAZYBD" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$LAZYBD" | cut -c1-12)"
  LAZYBD=$T/lazybd
fi
has_file_peer=0; for p in $PEERS; do [[ $p == nbdkit-file || $p == nbd-server ]] && has_file_peer=1; done
if [[ $has_file_peer == 1 ]]; then cp "$IMAGE" "$T/local.img"; fi

# -------------------------------------------------------------- servers ----
# start_server PEER TRANSPORT(tcp|unix) ORIGIN_URL LABEL -> SRV_PID SRV_URI SRV_LOG SRV_DIR
SRV_PID=""; SRV_URI=""; SRV_LOG=""; SRV_DIR=""; SRV_LABEL=""
CMDLINES=$T/cmdlines.txt; : > "$CMDLINES"
note_cmd() { local peer=$1; shift; grep -q "^$peer " "$CMDLINES" || printf '%s %s\n' "$peer" "$*" >> "$CMDLINES"; }
start_server() {
  local peer=$1 tr=$2 url=$3 label=$4 port sock listen_nk=() cmd=()
  SRV_DIR=$T/srv/$label; rm -rf "$SRV_DIR"; mkdir -p "$SRV_DIR"; SRV_LABEL=$label
  SRV_LOG=$SRV_DIR/server.log; SRV_PID=""
  if [[ $tr == tcp ]]; then
    port=$(free_port); SRV_URI="nbd://127.0.0.1:$port/disk"; listen_nk=(-i 127.0.0.1 -p "$port")
  else
    sock=$SRV_DIR/nbd.sock; SRV_URI="nbd+unix:///disk?socket=$sock"; listen_nk=(-U "$sock")
  fi
  case $peer in
    lazybd)
      local la; if [[ $tr == tcp ]]; then la=127.0.0.1:$port; else la=unix:$sock; fi
      # shellcheck disable=SC2206
      cmd=("$LAZYBD" serve "$url" --cache-dir "$SRV_DIR/cache" --listen "$la" --name disk
           ${LAZYBD_BLOCK_SIZE:+--block-size "$LAZYBD_BLOCK_SIZE"} $LAZYBD_ARGS)
      note_cmd lazybd "${cmd[@]}"
      "${cmd[@]}" > "$SRV_LOG" 2>&1 &
      SRV_PID=$! ;;
    nbdkit-cache)
      mkdir -p "$SRV_DIR/tmp"
      cmd=(nbdkit -P "$SRV_DIR/pid" --log=stderr -r -e disk "${listen_nk[@]}" --filter=cache
           curl "$url" cache-on-read=true cache-min-block-size="$BLOCK_SIZE")
      note_cmd nbdkit-cache "TMPDIR=$SRV_DIR/tmp" "${cmd[@]}"
      TMPDIR=$SRV_DIR/tmp "${cmd[@]}" > "$SRV_LOG" 2>&1 || true ;;
    nbdkit-file)
      cmd=(nbdkit -P "$SRV_DIR/pid" --log=stderr -r -e disk "${listen_nk[@]}" file "$T/local.img")
      note_cmd nbdkit-file "${cmd[@]}"
      "${cmd[@]}" > "$SRV_LOG" 2>&1 || true ;;
    qsd)
      local addr
      if [[ $tr == tcp ]]; then addr=addr.type=inet,addr.host=127.0.0.1,addr.port=$port; else addr=addr.type=unix,addr.path=$sock; fi
      qemu-img create -q -f qcow2 -o cluster_size="$BLOCK_SIZE" "$SRV_DIR/overlay.qcow2" "$IMG_BYTES" >> "$SRV_LOG" 2>&1
      cmd=(qemu-storage-daemon
           --blockdev "driver=http,node-name=origin,url=$url,readahead=0,read-only=on"
           --blockdev "driver=file,node-name=overlay-file,filename=$SRV_DIR/overlay.qcow2"
           --blockdev "driver=qcow2,node-name=overlay,file=overlay-file,backing=origin"
           --blockdev "driver=copy-on-read,node-name=cor,file=overlay"
           --nbd-server "$addr"
           --export "type=nbd,id=export0,node-name=cor,name=disk,writable=off"
           --daemonize --pidfile "$SRV_DIR/pid")
      note_cmd qsd "qemu-img create -f qcow2 -o cluster_size=$BLOCK_SIZE OVERLAY $IMG_BYTES &&" "${cmd[@]}"
      "${cmd[@]}" >> "$SRV_LOG" 2>&1 || true ;;
    nbd-server)
      {
        echo "[generic]"
        if [[ $tr == tcp ]]; then printf 'listenaddr = 127.0.0.1\nport = %s\n' "$port"; else echo "unixsock = $sock"; fi
        printf 'allowlist = true\n[disk]\nexportname = %s\nreadonly = true\n' "$T/local.img"
      } > "$SRV_DIR/nbd-server.conf"
      cmd=(nbd-server -C "$SRV_DIR/nbd-server.conf" -p "$SRV_DIR/pid")
      note_cmd nbd-server "${cmd[@]}" "(config: [generic] listenaddr/port or unixsock, allowlist=true; [disk] exportname=LOCAL_COPY readonly=true)"
      "${cmd[@]}" > "$SRV_LOG" 2>&1 || true ;;
  esac
  if [[ -z $SRV_PID ]]; then # daemons: pid from their pid file
    for _ in $(seq 50); do [[ -s $SRV_DIR/pid ]] && break; sleep 0.1; done
    SRV_PID=$(cat "$SRV_DIR/pid" 2>/dev/null || true)
  fi
  [[ -n $SRV_PID ]] || { log "$label: no pid; log:"; tail -20 "$SRV_LOG" >&2; return 1; }
  PIDS+=("$SRV_PID")
  local i
  for ((i = 0; i < 600; i++)); do
    nbdinfo --size "$SRV_URI" > /dev/null 2>&1 && return 0
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.1
  done
  log "$label: server did not come up; log:"; tail -20 "$SRV_LOG" >&2
  return 1
}

STOPS=$T/stops.tsv; : > "$STOPS"
stop_server() { # SIGTERM, record whether it exited and lazybd's summary line
  local label=$SRV_LABEL how=term-exit summary="" grace=3
  [[ -n $SRV_PID ]] || return 0
  [[ $label == lazybd* ]] && grace=15    # lazybd's graceful exit is part of what we check
  kill_pid "$SRV_PID" "$grace" || how="KILLED-after-${grace}s"
  wait "$SRV_PID" 2>/dev/null || true
  forget_pid "$SRV_PID"
  summary=$(grep -E 'origin_requests=' "$SRV_LOG" 2>/dev/null | tail -1 | sed -E 's/\x1b\[[0-9;]*m//g' || true)
  printf '%s\t%s\t%s\n' "$label" "$how" "$summary" >> "$STOPS"
  rm -rf "$SRV_DIR/cache" "$SRV_DIR/tmp" "$SRV_DIR/overlay.qcow2"
  SRV_PID=""
}

# ----------------------------------------------------------------- fio -----
RESULTS=$T/results.tsv
printf 'case\tpeer\ttransport\tiops\tmibs\tlat_mean_us\tlat_p99_us\tseconds\tio_bytes\torigin_reqs\torigin_bytes\tstatus\tnote\tround\n' > "$RESULTS"
ROUND=1
FAILED=0
record_fail() { # CASE PEER TRANSPORT NOTE — a selected case without numbers fails the run
  printf '%s\t%s\t%s\t\t\t\t\t\t\t\t\tFAIL\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ')" "$ROUND" >> "$RESULTS"
  if has "$CASES" "$1"; then FAILED=1; fi
  log "FAIL $1 $2/$3: $4"
}
log_mark() { if [[ -f $NGX/access.log ]]; then stat -c %s "$NGX/access.log"; else echo 0; fi; }
origin_since() { # byte offset -> "requests<TAB>body_bytes"
  if [[ $ACCESS_LOG != 1 ]]; then printf '\t'; return; fi
  tail -c +"$(($1 + 1))" "$NGX/access.log" | awk '{n++; b += $3} END {printf "%d\t%d", n, b}'
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
# run_fio HARD_CAP OUTFILE ARGS... — fio with a stall watchdog: killed if its job
# process does not wake up for STALL_S seconds (a request the server never
# answers) or if it runs past HARD_CAP. Returns fio's status, or 124 with FIO_NOTE set.
STALL_S=${STALL_S:-20}
FIO_NOTE=""
usec() { local t=${EPOCHREALTIME/./}; echo "${t#0}"; }
run_fio() {
  local hard=$1 outf=$2 fp kids="" last=-1 now t0 tnow tlast rc=0; shift 2
  FIO_NOTE=""
  fio "$@" > "$outf" 2>&1 &
  fp=$!; PIDS+=("$fp")
  t0=$(usec); tlast=$t0
  while kill -0 "$fp" 2>/dev/null; do
    sleep 0.2
    [[ -n $kids ]] || kids=$(pgrep -P "$fp" || true)   # fio's job process(es)
    now=$(fio_activity ${kids:-$fp}); tnow=$(usec)
    if [[ $now != "$last" ]]; then last=$now; tlast=$tnow; fi
    if ((tnow - tlast >= STALL_S * 1000000 || tnow - t0 >= hard * 1000000)); then
      if ((tnow - tlast >= STALL_S * 1000000)); then
        FIO_NOTE="stalled: no I/O completed for ${STALL_S} s, $(((tnow - t0) / 1000000)) s into the case"
      else FIO_NOTE="over the ${hard} s cap"; fi
      # shellcheck disable=SC2046
      kill -KILL $(pgrep -P "$fp" || true) "$fp" 2>/dev/null || true
      wait "$fp" 2>/dev/null || true
      forget_pid "$fp"
      return 124
    fi
  done
  wait "$fp" || rc=$?
  forget_pid "$fp"
  return "$rc"
}
# run_case CASE KIND PEER TRANSPORT — on the running server ($SRV_*).
# KIND: seq (1 MiB, QD8, one pass) | seq1 (same at QD1) | rand1 | rand32 | cold32.
# Success: appends a row (with $EXTRA_NOTE), returns 0. Failure: no row,
# FAIL_MSG says why, returns 1.
EXTRA_NOTE=""; FAIL_MSG=""
FIO_SUMMARY='
import json, sys
js, case, peer, tr, origin, want, extra, rnd = sys.argv[1:]
j = json.load(open(js))
job = j["jobs"][0]; r = job["read"]
oreq, obytes = (origin.split("\t") + ["", ""])[:2]
note = [extra] if extra else []
err, got = job.get("error"), r["io_bytes"]
if err: note.append("fio error %s" % err)
if want and got < int(want): note.append("INCOMPLETE %d/%s bytes" % (got, want))
status = "ok" if got > 0 and not err else "FAIL"
p99 = r["lat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
print("\t".join(map(str, [case, peer, tr, "%.1f" % r["iops"], "%.2f" % (r["bw_bytes"] / 1048576),
      "%.1f" % (r["lat_ns"]["mean"] / 1000), "%.1f" % p99, "%.3f" % (r["runtime"] / 1000), got,
      oreq, obytes, status, "; ".join(note), rnd])))'
run_case() {
  local case=$1 kind=$2 peer=$3 tr=$4 js mark cap rc=0 args want=""
  js=$SRV_DIR/$case.json
  args=(--name="$case" --ioengine=nbd --uri="$SRV_URI" --size="$IMG_BYTES" --lat_percentiles=1
        --output-format=json --output="$js")
  case $kind in
    seq)    cap=$SEQ_MAX; want=$IMG_BYTES; args+=(--rw=read --bs=1M --iodepth=8 --runtime="$cap") ;;
    seq1)   cap=$SEQ_MAX; want=$IMG_BYTES; args+=(--rw=read --bs=1M --iodepth=1 --runtime="$cap") ;;
    rand1)  cap=$RUNTIME; args+=(--rw=randread --bs=4k --iodepth=1 --time_based --runtime="$cap") ;;
    rand32) cap=$RUNTIME; args+=(--rw=randread --bs=4k --iodepth=32 --time_based --runtime="$cap") ;;
    cold32) cap=$COLD_MAX; want=$((COLD_N * 4096))
            args+=(--rw=randread --bs=4k --iodepth=32 --io_size="$want" --runtime="$cap") ;;
  esac
  log "round $ROUND: $case  $peer/$tr  ($kind)${EXTRA_NOTE:+  [$EXTRA_NOTE]}"
  rm -f "$js"
  mark=$(log_mark)
  run_fio "$((cap + 30))" "$SRV_DIR/$case.fio.out" "${args[@]}" || rc=$?
  local origin row
  origin=$(origin_since "$mark")
  if [[ $rc != 0 || ! -s $js ]]; then
    FAIL_MSG="fio rc=$rc${FIO_NOTE:+ ($FIO_NOTE)}: $(tail -c 200 "$SRV_DIR/$case.fio.out" | tr '\t\n' '  ')"
    kill -0 "$SRV_PID" 2>/dev/null || FAIL_MSG="$FAIL_MSG; server exited, log: $(tail -c 300 "$SRV_LOG" | tr '\t\n' '  ')"
    return 1
  fi
  row=$(python3 -c "$FIO_SUMMARY" "$js" "$case" "$peer" "$tr" "$origin" "$want" "$EXTRA_NOTE" "$ROUND") || {
    FAIL_MSG="unreadable fio json"; return 1; }
  if [[ $(cut -f12 <<< "$row") != ok ]]; then FAIL_MSG="fio: $(cut -f13 <<< "$row")"; return 1; fi
  printf '%s\n' "$row" >> "$RESULTS"
  if ! kill -0 "$SRV_PID" 2>/dev/null; then log "$peer/$tr exited after $case"; fi
  return 0
}

remote() { [[ $1 == lazybd || $1 == nbdkit-cache || $1 == qsd ]]; }

# session PEER TRANSPORT ORIGIN_URL LABEL CASE:KIND... — one fresh server, the
# cases in order. Warm cases need a server warmed by a full pass: after a
# failure the server is restarted fresh and warmed by a QD1 pass (row
# `warmup-qd1`). A failed cold case is retried once on a fresh server; the
# first attempt stays in the report as `CASE#1`.
session() {
  local peer=$1 tr=$2 url=$3 label=$4 restarts=0; shift 4
  local cks=("$@") i ck case kind warm=0 msg=""
  remote "$peer" || warm=1
  fresh() { # (re)start a fresh server; 1 if it does not come up
    if [[ -n $SRV_PID ]]; then stop_server; fi
    local l=$label; ((restarts == 0)) || l=$label.restart$restarts
    restarts=$((restarts + 1))
    warm=0; remote "$peer" || warm=1
    start_server "$peer" "$tr" "$url" "$l" && return 0
    msg="server failed to start: $(tail -c 300 "$SRV_LOG" | tr '\t\n' '  ')"
    if [[ -n $SRV_PID ]]; then stop_server; fi
    return 1
  }
  fail_rest() { local j; for ((j = $1; j < ${#cks[@]}; j++)); do record_fail "${cks[j]%%:*}" "$peer" "$tr" "$2"; done; }
  if ! fresh; then fail_rest 0 "$msg"; return 0; fi
  for ((i = 0; i < ${#cks[@]}; i++)); do
    ck=${cks[i]}; case=${ck%%:*}; kind=${ck##*:}
    if ! kill -0 "$SRV_PID" 2>/dev/null; then
      log "$peer/$tr: server is gone before $case; restarting"
      fresh || { fail_rest "$i" "server gone, restart failed: $msg"; return 0; }
    fi
    if [[ $case == warm-* && $warm == 0 ]]; then
      if run_case warmup-qd1 seq1 "$peer" "$tr"; then warm=1
      else
        record_fail warmup-qd1 "$peer" "$tr" "$FAIL_MSG"
        fail_rest "$i" "not run: the server could not be warmed"; stop_server; return 0
      fi
    fi
    if run_case "$case" "$kind" "$peer" "$tr"; then
      if [[ $kind == seq* ]]; then warm=1; fi
      continue
    fi
    msg=$FAIL_MSG
    if [[ $case == cold-* ]] && fresh; then
      EXTRA_NOTE="2nd attempt on a fresh server"
      if run_case "$case" "$kind" "$peer" "$tr"; then
        EXTRA_NOTE=""
        record_fail "$case#1" "$peer" "$tr" "1st attempt: $msg"
        if [[ $kind == seq* ]]; then warm=1; fi
        continue
      fi
      EXTRA_NOTE=""
      msg="$FAIL_MSG; 1st attempt: $msg"
    fi
    record_fail "$case" "$peer" "$tr" "$msg"
    # whatever follows starts from a fresh server
    if ((i + 1 < ${#cks[@]})); then
      fresh || { fail_rest "$((i + 1))" "server restart failed: $msg"; return 0; }
    fi
  done
  stop_server
}

# cold-rand32-rtt: first-touch reads; leave at least half the blocks untouched
nblocks=$((IMG_BYTES / BLOCK_BYTES))
COLD_N=$COLD_READS; ((COLD_N <= nblocks / 2)) || COLD_N=$((nblocks / 2))

want() { has "$CASES" "$1"; }
START=$(date +%s)
LOAD_START=$STAMP_LOAD
log "temp dir $T; peers: $PEERS; cases: $CASES; $ROUNDS round(s)"
# shellcheck disable=SC2086
PEERS_REV=$(printf '%s\n' $PEERS | tac | tr '\n' ' ')

for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  # odd rounds in PEERS order, even rounds reversed: a drift of the host's
  # speed over the run does not favour the peer that always goes first
  if ((ROUND % 2)); then order=$PEERS; else order=$PEERS_REV; fi
  # 1. TCP, origin on loopback: cold pass, warm pass, warm 4K random
  if want cold-seq || want warm-seq || want warm-rand1-tcp || want warm-rand32-tcp; then
    for p in $order; do
      cks=()
      if remote "$p"; then cks+=(cold-seq:seq); fi
      if want warm-seq || ! remote "$p"; then cks+=(warm-seq:seq); fi
      want warm-rand1-tcp && cks+=(warm-rand1-tcp:rand1)
      want warm-rand32-tcp && cks+=(warm-rand32-tcp:rand32)
      session "$p" tcp "$URL_DIRECT" "$p.tcp.r$ROUND" "${cks[@]}"
    done
  fi
  # 2. Unix socket: a fresh server warmed by one sequential pass, then 4K random
  if want warm-rand1-unix || want warm-rand32-unix; then
    for p in $order; do
      cks=(); remote "$p" && cks+=(cold-seq-unix:seq)
      want warm-rand1-unix && cks+=(warm-rand1-unix:rand1)
      want warm-rand32-unix && cks+=(warm-rand32-unix:rand32)
      session "$p" unix "$URL_DIRECT" "$p.unix.r$ROUND" "${cks[@]}"
    done
  fi
  # 3. origin behind the delay proxy, fresh server per case
  for c in cold-rand32-rtt cold-seq-rtt; do
    want "$c" || continue
    for p in $order; do
      remote "$p" || continue
      if [[ $c == cold-rand32-rtt ]]; then k=cold32; else k=seq; fi
      session "$p" tcp "$URL_RTT" "$p.$c.r$ROUND" "$c:$k"
    done
  done
done
ELAPSED=$(( $(date +%s) - START ))

# --------------------------------------------------------------- report ----
META=$T/meta.tsv
{
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  printf 'nproc\t%s\n' "$(nproc)"
  printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  printf 'mem\t%s\n' "$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  printf 'kernel\t%s\n' "$(uname -r)"
  printf 'fio\t%s\n' "$(fio --version)"
  printf 'nbdkit\t%s\n' "$(nbdkit --version | awk '{print $2}')"
  printf 'qemu\t%s\n' "$(qemu-storage-daemon --version | head -1 | awk '{print $3, $4, $5}')"
  printf 'nginx\t%s\n' "$(nginx -v 2>&1 | sed 's/.*\///')"
  printf 'nbd_server\t%s\n' "$(nbd-server -V 2>&1 | awk '/version/ {print $NF; exit}')"
  printf 'libnbd\t%s\n' "$(nbdinfo --version 2>/dev/null | awk 'NR==1 {print $2}')"
  printf 'rustc\t%s\n' "$(rustc --version | awk '{print $2}')"
  printf 'lazybd_rev\t%s\n' "${LAZYBD_INFO:+binary $LAZYBD_INFO}"
  printf 'img_bytes\t%s\n' "$IMG_BYTES"
  printf 'block_size\t%s\n' "$BLOCK_SIZE"
  printf 'block_bytes\t%s\n' "$BLOCK_BYTES"
  printf 'lazybd_block_size\t%s\n' "${LAZYBD_BLOCK_SIZE:-4k (its default)}"
  printf 'runtime\t%s\n' "$RUNTIME"
  printf 'delay_ms\t%s\n' "$DELAY_MS"
  printf 'rate_mbit\t%s\n' "$RATE_MBIT"
  printf 'cold_reads\t%s\n' "$COLD_N"
  printf 'rtt_measured_ms\t%s\n' "$RTT_MEASURED"
  printf 'rtt_direct_ms\t%s\n' "$RTT_DIRECT"
  printf 'peers\t%s\n' "$PEERS"
  printf 'cases\t%s\n' "$CASES"
  printf 'lazybd_args\t%s\n' "$LAZYBD_ARGS"
  printf 'elapsed_s\t%s\n' "$ELAPSED"
  printf 'rounds\t%s\n' "$ROUNDS"
  printf 'invocation\t%s\n' "QUICK=$QUICK ROUNDS=$ROUNDS IMG_MIB=$IMG_MIB RUNTIME=$RUNTIME BLOCK_SIZE=$BLOCK_SIZE${LAZYBD_BLOCK_SIZE:+ LAZYBD_BLOCK_SIZE=$LAZYBD_BLOCK_SIZE} PEERS=\"$PEERS\" CASES=\"$CASES\" DELAY_MS=$DELAY_MS RATE_MBIT=$RATE_MBIT COLD_READS=$COLD_READS${LAZYBD_ARGS:+ LAZYBD_ARGS=\"$LAZYBD_ARGS\"} bench/run.sh"
  printf 'load\t%s at start, %s at end\n' "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
} > "$META"
mkdir -p "$(dirname "$OUT")"
python3 "$BENCH/report.py" "$RESULTS" "$META" "$CMDLINES" "$STOPS" > "$T/section.md"
write_section "$OUT" "$T/section.md"
cp "$RESULTS" "${OUT%.md}.tsv" 2>/dev/null || true
log "wrote its section of $OUT and the raw rows to ${OUT%.md}.tsv (${ELAPSED}s of cases)"
column -t -s $'\t' "$RESULTS" >&2 || cat "$RESULTS" >&2
exit "$FAILED"
