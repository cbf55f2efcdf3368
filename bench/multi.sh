#!/usr/bin/env bash
# bench/multi.sh — many exports of one image, and writable exports, in one run
# (~11 min with the defaults, ROUNDS=3, on 2 cores; ROUNDS=5 ~17 min).
#
# A. Many readers, one image: one lazybd (`serve --config`) with READERS
#    read-only exports vm0..vmN-1 of the same IMG_MIB image, origin behind the
#    delay proxy (bench/delay-proxy.rs: DELAY_MS each way, RATE_MBIT shared
#    link). READERS concurrent fio jobs (libnbd `nbd` ioengine), one per export,
#    each reading the whole image sequentially (1 MiB, QD8), on a fresh cache.
#    Compared with a fresh run of 1 reader on a 1-export config. Counted: origin
#    requests and body bytes (nginx access log; lazybd's summary line), the
#    ratio READERS ÷ 1 (goal ≤ 1.05×) and the aggregate MiB/s of the readers.
#    ROUNDS rounds of the pair (1 reader, READERS readers; reversed in even
#    rounds); every ratio is per round, the median shown with each round's.
# B. Warm writable export vs nbdkit's cow filter: lazybd `--writable` (origin
#    nginx on loopback, base warmed by one sequential read pass of the image;
#    once per LAZYBD_BLOCK_SIZES value, each with its own cache) and
#    `nbdkit --filter=cow file LOCAL_COPY` (once per COW_BLOCK_SIZES value).
#    On each fresh server: fio 4 KiB randwrite QD32 over the first RW_MIB MiB for
#    RUNTIME s, then 4 KiB randread QD32 over the same region for RUNTIME s;
#    over TCP and over a Unix socket. ROUNDS rounds, the order of the servers
#    reversed every other round (this host's speed drifts by ±15 % over
#    minutes, so single runs mislead). Median of the per-round ratios lazybd
#    (block size BLOCK_SIZE) ÷ the best nbdkit cow variant (goal ≥ 1.0×), with
#    each round's ratio, and the same for lazybd ÷ nbdkit at equal block sizes.
# The report section "## Many exports and writable exports (bench/multi.sh)"
# is written into OUT (bench/RESULTS.md), replacing an earlier section of
# that name (bench/lib.sh stamps it); APPEND=0: printed only.
#
# Env knobs:
#   IMG_MIB (1024)  READERS (8)  RUNTIME (10 s per timed phase)  RW_MIB (256)
#   BLOCK_SIZE (64k)  DELAY_MS (0.5)  RATE_MBIT (1000)  SEQ_MAX (120 s cap per pass)
#   COW_BLOCK_SIZES ("64k 4k": nbdkit cow-block-size values to try; 64k is 1.32's default)
#   LAZYBD_BLOCK_SIZES ("$BLOCK_SIZE 4k": lazybd --block-size values for part B)
#   ROUNDS (3: rounds of part A and of part B)  PARTS ("a b")  LAZYBD (binary)  OUT (bench/RESULTS.md)  APPEND (1)
#   QUICK (1: IMG_MIB=64 READERS=2 RUNTIME=2 RW_MIB=32 ROUNDS=2, a smoke run)
#   KEEP (1: keep the temp dir)  BENCH_TMP (parent of the temp dir, default /tmp)
# Exit status: 0 if every measurement produced numbers, 1 otherwise, 2 on a set-up error.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  IMG_MIB=${IMG_MIB:-64}; READERS=${READERS:-2}; RUNTIME=${RUNTIME:-2}; RW_MIB=${RW_MIB:-32}; ROUNDS=${ROUNDS:-2}
fi
IMG_MIB=${IMG_MIB:-1024}
READERS=${READERS:-8}
RUNTIME=${RUNTIME:-10}
RW_MIB=${RW_MIB:-256}
BLOCK_SIZE=${BLOCK_SIZE:-64k}
DELAY_MS=${DELAY_MS:-0.5}
RATE_MBIT=${RATE_MBIT:-1000}
SEQ_MAX=${SEQ_MAX:-120}
COW_BLOCK_SIZES=${COW_BLOCK_SIZES:-64k 4k}
LAZYBD_BLOCK_SIZES=${LAZYBD_BLOCK_SIZES:-$BLOCK_SIZE 4k}
LAZYBD_BLOCK_SIZES=$(printf '%s\n' $LAZYBD_BLOCK_SIZES | awk '!seen[tolower($0)]++' | tr '\n' ' ')
LAZYBD_BLOCK_SIZES=${LAZYBD_BLOCK_SIZES% }
PARTS=${PARTS:-a b}
ROUNDS=${ROUNDS:-3}
LAZYBD=${LAZYBD:-$ROOT/target/release/lazybd}
OUT=${OUT:-$BENCH/RESULTS.md}
APPEND=${APPEND:-1}
IMG_BYTES=$((IMG_MIB * 1048576))
((RW_MIB <= IMG_MIB)) || RW_MIB=$IMG_MIB
SECTION_TITLE="## Many exports and writable exports (bench/multi.sh)"

log() { printf '[multi %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }
has() { [[ " $1 " == *" $2 "* ]]; }

for t in fio nbdkit nbdinfo nginx curl rustc python3; do
  command -v "$t" >/dev/null 2>&1 || die "missing $t (scripts/install-deps.sh)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "fio has no nbd ioengine"
nbdkit --filter=cow file --version >/dev/null 2>&1 || die "nbdkit has no file plugin / cow filter"
[[ -x $LAZYBD ]] || die "$LAZYBD missing (cargo build --release)"

# ------------------------------------------------------------ temp dir -----
T=$(mktemp -d "${BENCH_TMP:-/tmp}/lazybd-multi.XXXXXX")
chmod 755 "$T"     # nginx workers run unprivileged and must reach origin/
PIDS=()
forget_pid() { local p keep=(); for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done; PIDS=("${keep[@]}"); }
kill_pid() { # TERM, wait up to $2 s (default 10), then KILL; 0 if it exited on TERM
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

START=$(date +%s)
LOAD_START=$STAMP_LOAD
cp "$LAZYBD" "$T/lazybd"   # a rebuild during the run must not change it
LAZYBD_INFO="$(readlink -f "$LAZYBD"), built $(date -u -r "$LAZYBD" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$LAZYBD" | cut -c1-12)"
LZ=$T/lazybd
CMDS=$T/cmdlines.txt; : > "$CMDS"
note_cmd() { printf '%s\n' "$*" >> "$CMDS"; }

# --------------------------------------------------------------- origin ----
log "making a ${IMG_MIB} MiB random image"
mkdir -p "$T/origin"
head -c "$IMG_BYTES" /dev/urandom > "$T/origin/disk.img"
chmod 644 "$T/origin/disk.img"
NGX=$T/nginx; mkdir -p "$NGX/tmp"
HTTP_PORT=$(free_port)
ALOG=$NGX/access.log
cat > "$NGX/nginx.conf" <<EOF
daemon on;
worker_processes 2;
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
events { worker_connections 4096; }
http {
  log_format origin '\$msec \$request_method \$status \$body_bytes_sent "\$http_range"';
  access_log $ALOG origin;
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

log_mark() { stat -c %s "$ALOG" 2>/dev/null || echo 0; }
origin_since() { # byte offset -> "requests data_gets body_bytes" (data GET: a GET whose Range is not bytes=0-0)
  tail -c +"$(($1 + 1))" "$ALOG" |
    awk '{n++; b += $4; if ($2 == "GET" && $5 != "\"bytes=0-0\"") d++} END {printf "%d %d %d", n, d, b}'
}

URL_RTT=""
if has "$PARTS" a; then
  log "building the delay proxy"
  rustc -O -o "$T/delay-proxy" "$BENCH/delay-proxy.rs" 2> "$T/delay-proxy.build.log" || { cat "$T/delay-proxy.build.log" >&2; die "rustc failed"; }
  PROXY_PORT=$(free_port)
  "$T/delay-proxy" --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$HTTP_PORT" \
    --delay-ms "$DELAY_MS" --rate-mbit "$RATE_MBIT" --duration-s 3600 2> "$T/delay-proxy.log" &
  PIDS+=("$!")
  URL_RTT=http://127.0.0.1:$PROXY_PORT/disk.img
  for _ in $(seq 50); do curl -fsS -o /dev/null -r 0-0 "$URL_RTT" 2>/dev/null && break; sleep 0.1; done
  note_cmd "delay proxy: $T/delay-proxy --listen 127.0.0.1:$PROXY_PORT --upstream 127.0.0.1:$HTTP_PORT --delay-ms $DELAY_MS --rate-mbit $RATE_MBIT --duration-s 3600"
fi

# ----------------------------------------------------------- lazybd run ----
SRV_PID=""; SRV_LOG=""; SRV_KIND=""
wait_nbd() { # URI... : every URI answers, or the server died / 60 s passed
  local u i
  for u in "$@"; do
    for ((i = 0; i < 600; i++)); do
      nbdinfo --size "$u" > /dev/null 2>&1 && continue 2
      kill -0 "$SRV_PID" 2>/dev/null || { log "server exited; log:"; tail -20 "$SRV_LOG" >&2; return 1; }
      sleep 0.1
    done
    log "$u did not answer; log:"; tail -20 "$SRV_LOG" >&2; return 1
  done
}
STOPS=$T/stops.tsv; : > "$STOPS"
stop_server() { # LABEL : SIGTERM (15 s grace for lazybd, 3 s else), record the summary line
  local label=$1 how=term-exit summary="" grace=3
  [[ -n $SRV_PID ]] || return 0
  [[ $SRV_KIND == lazybd ]] && grace=15
  kill_pid "$SRV_PID" "$grace" || how="KILLED-after-${grace}s"
  wait "$SRV_PID" 2>/dev/null || true
  forget_pid "$SRV_PID"
  summary=$(sed -E 's/\x1b\[[0-9;]*m//g' "$SRV_LOG" 2>/dev/null | grep -E 'origin_requests=' | tail -1 || true)
  printf '%s\t%s\t%s\n' "$label" "$how" "$summary" >> "$STOPS"
  SRV_PID=""
}
summary_field() { # LABEL FIELD -> value from that server's summary line
  awk -F'\t' -v l="$1" '$1 == l {print $3}' "$STOPS" | tail -1 | sed -n "s/.*[ ]$2=\([0-9]*\).*/\1/p"
}

ROWS=$T/rows.tsv; : > "$ROWS"
FAILED=0
fail_row() { printf '%s\tFAIL\t%s\n' "$1" "$(printf '%s' "$2" | tr '\t\n' '  ')" >> "$ROWS"; FAILED=1; log "FAIL $1: $2"; }

# run_fio CAP JSON ARGS... : fio with a hard cap (CAP + 30 s); returns fio's status
run_fio() {
  local cap=$1 js=$2 fp rc=0; shift 2
  timeout -k 5 "$((cap + 30))" fio --output-format=json --output="$js" "$@" > "$js.out" 2>&1 &
  fp=$!; PIDS+=("$fp")
  wait "$fp" || rc=$?
  forget_pid "$fp"
  return "$rc"
}

# ------------------------------------------------ A: many readers, one image
# part_a N ROUND : fresh lazybd, config with N exports vm0..vmN-1 of URL_RTT, N readers
part_a() {
  local n=$1 label=a-readers$1.r$2 d port cfg i uris=() jobf js mark t0 t1 rc=0 origin
  d=$T/a/$label; mkdir -p "$d"
  port=$(free_port)
  cfg=$d/lazybd.toml
  {
    printf '[server]\nlisten = ["127.0.0.1:%s"]\ncache_dir = "%s"\ncontrol = "none"\nblock_size = "%s"\n' \
      "$port" "$d/cache" "$BLOCK_SIZE"
    for ((i = 0; i < n; i++)); do
      printf '\n[[export]]\nname = "vm%d"\nimage = "%s"\n' "$i" "$URL_RTT"
      uris+=("nbd://127.0.0.1:$port/vm$i")
    done
  } > "$cfg"
  jobf=$d/readers.fio
  {
    printf '[global]\nioengine=nbd\nrw=read\nbs=1M\niodepth=8\nsize=%s\nruntime=%s\n' "$IMG_BYTES" "$SEQ_MAX"
    for ((i = 0; i < n; i++)); do printf '\n[vm%d]\nuri=%s\n' "$i" "${uris[i]}"; done
  } > "$jobf"
  mark=$(log_mark)
  SRV_LOG=$d/lazybd.log; SRV_KIND=lazybd
  [[ $2 == 1 ]] && note_cmd "A ($n reader(s)): $LZ serve --config $cfg   # config: [server] listen=[\"127.0.0.1:PORT\"] cache_dir=FRESH control=\"none\" block_size=\"$BLOCK_SIZE\"; $n x [[export]] name=\"vmI\" image=\"$URL_RTT\""
  [[ $2 == 1 ]] && note_cmd "A ($n reader(s)): fio --output-format=json JOBFILE   # [global] ioengine=nbd rw=read bs=1M iodepth=8 size=$IMG_BYTES runtime=$SEQ_MAX; one [vmI] job per export with uri=nbd://127.0.0.1:PORT/vmI"
  "$LZ" serve --config "$cfg" > "$SRV_LOG" 2>&1 &
  SRV_PID=$!; PIDS+=("$SRV_PID")
  if ! wait_nbd "${uris[@]}"; then fail_row "$label" "lazybd did not come up"; stop_server "$label"; return 0; fi
  log "A: round $2: $n concurrent sequential reader(s) on $n export(s), origin behind the proxy, fresh cache"
  js=$d/fio.json
  t0=$(date +%s.%N)
  run_fio "$SEQ_MAX" "$js" "$jobf" || rc=$?
  t1=$(date +%s.%N)
  sleep 0.5   # let nginx flush its log lines
  stop_server "$label"
  origin=$(origin_since "$mark")
  if [[ $rc != 0 || ! -s $js ]]; then
    fail_row "$label" "fio rc=$rc: $(tail -c 300 "$js.out" 2>/dev/null)"; return 0
  fi
  python3 - "$js" "$label" "$n" "$t0" "$t1" "$origin" "$(summary_field "$label" origin_requests)" \
      "$(summary_field "$label" origin_bytes)" "$IMG_BYTES" >> "$ROWS" <<'EOF' || fail_row "$label" "unreadable fio json"
import json, sys
js, label, n, t0, t1, origin, lzr, lzb, want = sys.argv[1:]
jobs = json.load(open(js))["jobs"]
got = [j["read"]["io_bytes"] for j in jobs]
rt = [j["read"]["runtime"] / 1000 for j in jobs]
mibs = [j["read"]["bw_bytes"] / 1048576 for j in jobs]
errs = [j.get("error", 0) for j in jobs]
wall = float(t1) - float(t0)
ok = len(jobs) == int(n) and all(g == int(want) for g in got) and not any(errs)
note = "" if ok else "jobs=%d io_bytes=%s errors=%s" % (len(jobs), got, errs)
oreq, odata, obytes = origin.split()
print("\t".join(map(str, [label, "ok" if ok else "FAIL", note, n, "%.2f" % wall, "%.2f" % max(rt),
      "%.1f" % (sum(got) / 1048576 / max(rt)), "%.1f" % min(mibs), "%.1f" % max(mibs), sum(got),
      oreq, odata, obytes, lzr, lzb])))
EOF
  [[ $(tail -1 "$ROWS" | cut -f2) == ok ]] || FAILED=1
  rm -rf "$d/cache"
}
if has "$PARTS" a; then
  for round in $(seq "$ROUNDS"); do
    if ((round % 2)); then part_a 1 "$round"; part_a "$READERS" "$round"
    else part_a "$READERS" "$round"; part_a 1 "$round"; fi
  done
fi

# ------------------------------------------ B: warm writable vs nbdkit cow
RW_BYTES=$((RW_MIB * 1048576))
if has "$PARTS" b; then
  cp "$T/origin/disk.img" "$T/local.img"
  mkdir -p "$T/b"
fi
# start_b KIND TRANSPORT LABEL BS -> SRV_PID SRV_LOG B_URI (BS: lazybd --block-size
# / nbdkit cow-block-size; lazybd's cache dir is per block size)
B_URI=""
start_b() {
  local kind=$1 tr=$2 label=$3 cbs=$4 d port sock la nk=() cmd=()
  d=$T/b/$label; mkdir -p "$d"; SRV_LOG=$d/server.log; SRV_KIND=$kind; SRV_PID=""
  if [[ $tr == tcp ]]; then
    port=$(free_port); B_URI=nbd://127.0.0.1:$port/disk; la=127.0.0.1:$port; nk=(-i 127.0.0.1 -p "$port")
  else
    sock=$d/nbd.sock; B_URI="nbd+unix:///disk?socket=$sock"; la=unix:$sock; nk=(-U "$sock")
  fi
  case $kind in
    lazybd)
      cmd=("$LZ" serve "$URL_DIRECT" --cache-dir "$T/b/cache-$cbs" --control none --listen "$la" --name disk
           --block-size "$cbs" --writable --overlay-dir "$d/overlay")
      [[ $label == *.r1 ]] && note_cmd "B lazybd-$cbs/$tr: ${cmd[*]}"
      "${cmd[@]}" > "$SRV_LOG" 2>&1 &
      SRV_PID=$!; PIDS+=("$SRV_PID") ;;
    nbdkit)
      mkdir -p "$d/tmp"
      cmd=(nbdkit -P "$d/pid" --log=stderr -e disk "${nk[@]}" --filter=cow file "$T/local.img" cow-block-size="$cbs")
      [[ $label == *.r1 ]] && note_cmd "B nbdkit-cow-$cbs/$tr: TMPDIR=$d/tmp ${cmd[*]}"
      TMPDIR=$d/tmp "${cmd[@]}" > "$SRV_LOG" 2>&1 || true
      for _ in $(seq 50); do [[ -s $d/pid ]] && break; sleep 0.1; done
      SRV_PID=$(cat "$d/pid" 2>/dev/null || true)
      [[ -n $SRV_PID ]] && PIDS+=("$SRV_PID") ;;
  esac
  [[ -n $SRV_PID ]] || { log "$label: no pid"; tail -20 "$SRV_LOG" >&2; return 1; }
  wait_nbd "$B_URI"
}
FIO_ROW='
import json, sys
js, label, phase, origin = sys.argv[1:]
j = json.load(open(js)); job = j["jobs"][0]
r = job["write" if phase.endswith("write") else "read"]
p99 = r["lat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
ok = r["io_bytes"] > 0 and not job.get("error")
oreq, odata, obytes = origin.split()
print("\t".join(map(str, [label, "ok" if ok else "FAIL", "" if ok else "fio error %s" % job.get("error"), phase,
      "%.1f" % r["iops"], "%.2f" % (r["bw_bytes"] / 1048576), "%.1f" % (r["lat_ns"]["mean"] / 1000), "%.1f" % p99,
      "%.3f" % (r["runtime"] / 1000), r["io_bytes"], oreq, odata, obytes])))'
# b_phase LABEL PHASE(warm|randwrite|randread) : fio on B_URI, one row
b_phase() {
  local label=$1 phase=$2 js mark rc=0 args cap=$RUNTIME
  js=$T/b/$label/$phase.json
  args=(--name="$phase" --ioengine=nbd --uri="$B_URI" --lat_percentiles=1)
  case $phase in
    warm)      cap=$SEQ_MAX; args+=(--rw=read --bs=1M --iodepth=8 --size="$IMG_BYTES" --runtime="$SEQ_MAX") ;;
    randwrite) args+=(--rw=randwrite --bs=4k --iodepth=32 --size="$RW_BYTES" --time_based --runtime="$RUNTIME") ;;
    randread)  args+=(--rw=randread --bs=4k --iodepth=32 --size="$RW_BYTES" --time_based --runtime="$RUNTIME") ;;
  esac
  [[ $label == */tcp.r1 ]] && note_cmd "B $label $phase: fio ${args[*]} --output-format=json"
  log "B: $label $phase"
  # write back what earlier steps left dirty (the image copy, the cache a warm
  # pass filled, earlier overlays) so that no timed phase pays for it
  [[ $phase == warm ]] || sync
  mark=$(log_mark)
  run_fio "$cap" "$js" "${args[@]}" || rc=$?
  if [[ $rc != 0 || ! -s $js ]]; then fail_row "b-$label-$phase" "fio rc=$rc: $(tail -c 300 "$js.out" 2>/dev/null)"; return 1; fi
  python3 -c "$FIO_ROW" "$js" "b-$label" "$phase" "$(origin_since "$mark")" >> "$ROWS" || { fail_row "b-$label-$phase" "unreadable fio json"; return 1; }
  [[ $(tail -1 "$ROWS" | cut -f2) == ok ]] || { FAILED=1; return 1; }
}
b_session() { # KIND TRANSPORT LABEL BS
  local kind=$1 tr=$2 label=$3 cbs=$4
  if ! start_b "$kind" "$tr" "$label" "$cbs"; then
    fail_row "b-$label-randwrite" "server did not come up"; fail_row "b-$label-randread" "server did not come up"
    stop_server "$label"; return 0
  fi
  if [[ $kind == lazybd && ! -d $T/b/warmed-$cbs ]]; then   # once per cache
    b_phase "$label" warm && mkdir -p "$T/b/warmed-$cbs"
  fi
  b_phase "$label" randwrite && b_phase "$label" randread || true
  # disk space the overlay takes (allocated bytes; nbdkit's overlay is an
  # unlinked temp file: found through the server's open files)
  local ob=0 f
  if [[ $kind == lazybd ]]; then
    ob=$(du -s --block-size=1 "$T/b/$label/overlay" | cut -f1)
  else
    for f in /proc/"$SRV_PID"/fd/*; do
      [[ $(readlink "$f" 2>/dev/null) == "$T/b/$label/tmp/"* ]] || continue
      ob=$((ob + $(stat -L -c '%b * %B' "$f")))
    done
  fi
  printf '%s\toverlay\t%s\n' "$label" "$ob" >> "$T/b/sizes.tsv"
  stop_server "$label"
  rm -rf "$T/b/$label/overlay" "$T/b/$label/tmp"
}
if has "$PARTS" b; then
  for round in $(seq "$ROUNDS"); do
    for tr in tcp unix; do
      lz_first=$((round % 2))
      ((lz_first)) && for bs in $LAZYBD_BLOCK_SIZES; do b_session lazybd "$tr" "lazybd-$bs/$tr.r$round" "$bs"; done
      for cbs in $COW_BLOCK_SIZES; do b_session nbdkit "$tr" "nbdkit-cow-$cbs/$tr.r$round" "$cbs"; done
      ((lz_first)) || for bs in $LAZYBD_BLOCK_SIZES; do b_session lazybd "$tr" "lazybd-$bs/$tr.r$round" "$bs"; done
    done
  done
fi
ELAPSED=$(( $(date +%s) - START ))

# --------------------------------------------------------------- report ----
META=$T/meta.tsv
{
  printf 'host\t%s cores, %s, %s, kernel %s\n' "$(nproc)" "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    "$(awk '/^MemTotal/ {printf "%.1f GiB RAM", $2 / 1048576}' /proc/meminfo)" "$(uname -r)"
  printf 'versions\tfio %s, nbdkit %s, nginx %s, libnbd %s, rustc %s\n' "$(fio --version | sed 's/^fio-//')" \
    "$(nbdkit --version | awk '{print $2}')" "$(nginx -v 2>&1 | sed 's/.*\///')" \
    "$(nbdinfo --version 2>/dev/null | awk 'NR==1 {print $2}')" "$(rustc --version | awk '{print $2}')"
  printf 'lazybd\tbinary %s\n' "$LAZYBD_INFO"
  printf 'load\t%s at start, %s at end\n' "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'elapsed_s\t%s\n' "$ELAPSED"
  printf 'invocation\t%s\n' "QUICK=$QUICK IMG_MIB=$IMG_MIB READERS=$READERS RUNTIME=$RUNTIME RW_MIB=$RW_MIB BLOCK_SIZE=$BLOCK_SIZE DELAY_MS=$DELAY_MS RATE_MBIT=$RATE_MBIT ROUNDS=$ROUNDS COW_BLOCK_SIZES=\"$COW_BLOCK_SIZES\" LAZYBD_BLOCK_SIZES=\"$LAZYBD_BLOCK_SIZES\" PARTS=\"$PARTS\" bench/multi.sh"
  printf 'lazybd_default_bs\t%s\n' "lazybd-$BLOCK_SIZE"
  printf 'rounds\t%s\n' "$ROUNDS"
  printf 'img_mib\t%s\nreaders\t%s\nruntime\t%s\nrw_mib\t%s\nblock_size\t%s\ndelay_ms\t%s\nrate_mbit\t%s\n' \
    "$IMG_MIB" "$READERS" "$RUNTIME" "$RW_MIB" "$BLOCK_SIZE" "$DELAY_MS" "$RATE_MBIT"
} > "$META"
touch "$T/b/sizes.tsv" 2>/dev/null || true
python3 - "$ROWS" "$META" "$CMDS" "$STOPS" "$T/b/sizes.tsv" "$SECTION_TITLE" "$BENCH" > "$T/section.md" <<'EOF'
import sys
rows_p, meta_p, cmds_p, stops_p, sizes_p, title, bench = sys.argv[1:]
sys.path.insert(0, bench)
from resultsmd import median, paired, rounds_cell
meta = dict(l.rstrip("\n").split("\t", 1) for l in open(meta_p) if "\t" in l)
rows = [l.rstrip("\n").split("\t") for l in open(rows_p) if l.strip()]
stops = [l.rstrip("\n").split("\t") for l in open(stops_p) if l.strip()]
try:
    sizes = {l.split("\t")[0]: int(l.split("\t")[2]) for l in open(sizes_p) if l.strip()}
except FileNotFoundError:
    sizes = {}
out = []
w = out.append
def fn(x, nd=0):
    try: return f"{float(x):,.{nd}f}"
    except (TypeError, ValueError): return "—"
def ratio(a, b):
    try: return float(a) / float(b) if float(b) else None
    except (TypeError, ValueError): return None
def fr(r): return "—" if r is None else f"{r:.3f}×" if abs(r - 1) < 0.1 else f"{r:.2f}×"
goals = []
w(title); w("")
w(f"{meta['elapsed_s']} s; load average {meta['load']}. "
  f"{meta['host']}. {meta['versions']}. lazybd {meta['lazybd']}.")
w(""); w(f"`{meta['invocation']}`"); w("")

a = {r[0]: r for r in rows if r[0].startswith("a-")}
if a:
    n = meta["readers"]
    w(f"### {n} readers on {n} exports of one image")
    w("")
    w(f"One lazybd (`serve --config`, `block_size = \"{meta['block_size']}\"`, fresh cache) with read-only exports vm0..vm{int(n)-1} "
      f"of the same {meta['img_mib']} MiB image; origin nginx behind the delay proxy ({meta['delay_ms']} ms each way, "
      f"{meta['rate_mbit']} Mbit/s shared link). fio (libnbd `nbd` ioengine) with one job per export, each a full "
      "sequential pass of 1 MiB reads at QD8, all started at once; baseline: a fresh run of 1 reader on a 1-export config. "
      "nginx counts come from its access log (data GETs: ranges other than the `bytes=0-0` probe); lazybd's from its "
      "SIGTERM summary line. Aggregate MiB/s = bytes read by all readers ÷ the longest reader's runtime.")
    w("")
    w("| run | readers | status | wall s | aggregate MiB/s | per reader MiB/s (min–max) | nginx requests | nginx data GETs | nginx body bytes (incl. 1-byte probe) | lazybd origin_requests | lazybd origin_bytes |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    def akey(k):
        base, _, rnd = k.partition(".r")
        return (int(rnd or 1), int(base.split("readers")[1]))
    for k in sorted(a, key=akey):
        r = a[k]
        if r[1] != "ok" and len(r) < 15:
            w(f"| {k} | — | FAIL: {r[2]} | | | | | | | | |"); continue
        w(f"| {k} | {r[3]} | {r[1]}{(' ' + r[2]) if r[2] else ''} | {r[4]} | {fn(r[6],1)} | {fn(r[7],1)}–{fn(r[8],1)} | "
          f"{fn(r[10])} | {fn(r[11])} | {fn(r[12])} | {fn(r[13])} | {fn(r[14])} |")
    # per round: the N-reader run ÷ the 1-reader run of the same round
    nr = int(meta.get("rounds", "1"))
    def col(readers, i):
        out = {}
        for k, r in a.items():
            base, _, rnd = k.partition(".r")
            if base == f"a-readers{readers}" and r[1] == "ok" and len(r) >= 15:
                try: out[rnd or "1"] = float(r[i])
                except ValueError: pass
        return out
    per = {i: paired(col(n, i), col(1, i)) for i in (6, 10, 11, 12, 13, 14)}
    def rc(i): return rounds_cell(per[i], 3, "×", rounds=nr)
    if any(per.values()):
        w(f"| ratio {n} ÷ 1: median of the rounds (each round) | | | | {rc(6)} | | {rc(10)} | {rc(11)} | {rc(12)} | {rc(13)} | {rc(14)} |")
        for what, i in [("origin data requests (nginx)", 11), ("origin bytes (nginx)", 12),
                        ("origin_requests (lazybd summary)", 13), ("origin_bytes (lazybd summary)", 14)]:
            v = median(per[i])
            goals.append((f"{n} readers ÷ 1 reader: {what}, median of {len(per[i])} rounds", "≤ 1.05×", rc(i),
                          "met" if v is not None and v <= 1.05 else "NOT met"))
        link = float(meta["rate_mbit"]) * 1e6 / 8 / 1048576
        def rate(readers):
            v = [float(r[12]) / 1048576 / float(r[5]) for k, r in a.items()
                 if k.partition(".r")[0] == f"a-readers{readers}" and r[1] == "ok" and len(r) >= 15 and float(r[5]) > 0]
            return rounds_cell(v, 1, " MiB/s")
        w("")
        w(f"Link: {link:.1f} MiB/s; the origin delivered {rate(n)} during the {n}-reader runs (body bytes ÷ longest "
          f"reader runtime) and {rate(1)} in the 1-reader runs.")
    w("")

b = [r for r in rows if r[0].startswith("b-")]
if b:
    w("### Warm 4 KiB random writes and reads: writable export vs nbdkit cow")
    w("")
    w(f"lazybd `--writable` (fresh overlay dir per server; base = the {meta['img_mib']} MiB image from nginx on loopback, "
      "cached by one sequential 1 MiB QD8 read pass before the first timed phase, `warm` row; one cache per `--block-size` tried) vs "
      "`nbdkit --filter=cow file LOCAL_COPY` (base: a local copy of the image; overlay in nbdkit's TMPDIR, same file system), "
      "for each `cow-block-size` tried. On each fresh server: fio 4 KiB `randwrite` QD32 over the first "
      f"{meta['rw_mib']} MiB for {meta['runtime']} s, then 4 KiB `randread` QD32 over the same region for {meta['runtime']} s; "
      f"one NBD connection; {meta.get('rounds', '1')} rounds, server order reversed every other round. The curl plugin as the cow base (`--filter=cow --filter=cache curl URL`) was not run: its "
      "base reads go through nbdkit-curl (one HTTP request at a time in 1.32), so it cannot beat the file plugin.")
    w("")
    w("| round | server | transport | phase | IOPS | MiB/s | mean µs | p99 µs | origin requests | overlay after |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    runs = {}  # (server, transport, phase) -> {round: IOPS}
    for r in b:
        label = r[0][2:]
        base, rnd = label.rsplit(".r", 1) if ".r" in label else (label, "1")
        srv, tr = base.rsplit("/", 1) if "/" in base else (base, "")
        if r[1] != "ok" and len(r) < 13:
            w(f"| {rnd} | {srv} | {tr} | {r[0]} | FAIL: {r[2]} | | | | | |"); continue
        ph = r[3]
        if ph != "warm":
            runs.setdefault((srv, tr, ph), {})[rnd] = float(r[4])
        ov = sizes.get(label)
        ovs = f"{ov / 1048576:.1f} MiB" if ov is not None and ph == "randread" else ""
        w(f"| {rnd} | {srv} | {tr} | {ph} | {fn(r[4])} | {fn(r[5],1)} | {fn(r[6],1)} | {fn(r[7],1)} | {fn(r[10])} | {ovs} |")
    w("")
    vals = {k: median(list(v.values())) for k, v in runs.items()}
    def bsz(name):  # "lazybd-64k" -> 65536
        v = name.rsplit("-", 1)[1].lower(); m = {"k": 1 << 10, "m": 1 << 20}
        return int(v[:-1]) * m[v[-1]] if v[-1] in m else int(v)
    cows = sorted({k[0] for k in vals if k[0].startswith("nbdkit-cow")}, key=bsz, reverse=True)
    lzs = sorted({k[0] for k in vals if k[0].startswith("lazybd")}, key=bsz, reverse=True)
    dflt = meta.get("lazybd_default_bs", "")
    w(f"The goal compares lazybd with its default block size ({dflt}) against the best nbdkit cow variant of each row; "
      "the last column compares equal block sizes (lazybd's cache block = `--block-size`, its overlay always "
      "tracks 4 KiB pages; nbdkit's cow block = `cow-block-size`).")
    w("")
    nr = int(meta.get("rounds", "1"))
    def rc(v): return rounds_cell(v, 2, "×", rounds=nr)
    w("IOPS are medians over the rounds. Every ratio pairs the two servers of one round (they ran minutes apart, "
      "which cancels most of this host's drift): the median of the per-round ratios, then each round's. "
      "The goal is judged on that median.")
    w("")
    w("| transport | phase | " + " | ".join(f"{c}" for c in lzs + cows) + f" | best nbdkit cow | {dflt} ÷ best cow | same block size: lazybd ÷ nbdkit |")
    w("|---|---|" + "---|" * len(lzs + cows) + "---|---|---|")
    for tr in ("tcp", "unix"):
        for ph in ("randwrite", "randread"):
            cv = {c: vals.get((c, tr, ph)) for c in lzs + cows}
            best = max((c for c in cows if cv[c] is not None), key=lambda c: cv[c], default=None)
            lz = cv.get(dflt)
            if lz is None and best is None: continue
            same = []
            for l in lzs:
                c = "nbdkit-cow-" + l.split("-", 1)[1]
                if c in cv and cv[c] and cv[l]:
                    same.append(f"{l.split('-', 1)[1]}: {rc(paired(runs.get((l, tr, ph), {}), runs.get((c, tr, ph), {})))}")
            per = paired(runs.get((dflt, tr, ph), {}), runs.get((best, tr, ph), {})) if best and dflt else []
            mr = median(per)
            w(f"| {tr} | {ph} | " + " | ".join(fn(cv[c]) for c in lzs + cows) +
              f" | {best or '—'} | {rc(per)} | {'; '.join(same) or '—'} |")
            goals.append((f"warm 4K {ph} QD32 {tr}: {dflt} ÷ best nbdkit cow ({best}), median of {len(per)} rounds", "≥ 1.0×", rc(per),
                          "met" if mr is not None and mr >= 1.0 else "NOT met"))
    w("")

if goals:
    w("### Goals")
    w("")
    w("| goal | target | measured | |"); w("|---|---|---|---|")
    for g in goals: w("| " + " | ".join(g) + " |")
    w("")
fails = [r for r in rows if r[1] != "ok"]
if fails:
    w("Failures: " + "; ".join(f"{r[0]}: {r[2]}" for r in fails)); w("")
w("### Server shutdowns (SIGTERM) and command lines")
w("")
w("| server | exit | summary line |"); w("|---|---|---|")
for s in stops:
    s += [""] * (3 - len(s))
    w(f"| {s[0]} | {s[1]} | {('`' + s[2] + '`') if s[2] else ''} |")
w("")
w("```")
for l in open(cmds_p): w(l.rstrip("\n"))
w("```")
w("")
w("Paths are the temp dir of that run; PORT is a free port picked at run time.")
print("\n".join(out))
EOF

write_section - "$T/section.md"
if [[ $APPEND == 1 ]]; then
  write_section "$OUT" "$T/section.md"
  log "section written to $OUT"
fi
log "done in ${ELAPSED}s"
exit "$FAILED"
