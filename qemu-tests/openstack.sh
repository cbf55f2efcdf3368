# shellcheck shell=bash
# qemu-tests/openstack.sh — a real OpenStack Swift and Glance (Debian 12
# packages, scripts/install-deps.sh) on 127.0.0.1 for the integration tests.
# Sourced after lib.sh:
#
#   . "$(dirname "$0")/lib.sh"
#   . "$(dirname "$0")/openstack.sh"
#
# Everything lives under $T and binds 127.0.0.1 only; no syslog, no telemetry,
# nothing leaves loopback. Every process is registered with bg_track, so
# lib.sh's EXIT trap (_cleanup) kills them all; swift_stop / glance_stop
# stop them earlier (idempotent).
#
#   swift_start [TOKEN_LIFE_S]   memcached + account/container/object servers +
#                                proxy (tempauth, user test:tester key testing,
#                                .admin, account_autocreate), one replica in
#                                $SWIFT_STATE/srv. Exports SWIFT_AUTH_URL
#                                (http://127.0.0.1:P/auth/v1.0), SWIFT_USER,
#                                SWIFT_KEY, SWIFT_PROXY_URL, SWIFT_STATE,
#                                SWIFT_ACCOUNT_URL (the X-Storage-Url).
#   swift_token                  prints "TOKEN STORAGE_URL" (a fresh v1 auth)
#   swift_put CONTAINER OBJECT FILE   creates CONTAINER if needed, uploads FILE
#   swift_stop
#   glance_start [file|swift]    a glance-api without auth (paste flavor empty),
#                                sqlite db, direct_url/locations shown. Exports
#                                GLANCE_URL (http://127.0.0.1:P) and
#                                GLANCE_STATE of the one just started; several
#                                may run at once (copy GLANCE_URL after each).
#                                swift: the store is the Swift of swift_start
#                                (single tenant, auth v1, container "glance"
#                                made on the first put). Its locations are
#                                swift+config://ref1/glance/ID (credentials in
#                                $GLANCE_STATE/glance-swift.conf, not in the
#                                URL); GLANCE_SWIFT_INLINE_CREDS=1 instead uses
#                                the deprecated in-config credentials, and the
#                                location becomes
#                                swift+http://test%3Atester:testing@127.0.0.1:P/auth/v1.0/glance/ID
#   glance_upload NAME DISK_FORMAT FILE   (to $GLANCE_URL) prints the image id
#                                once it is active
#   glance_stop [GLANCE_URL]     stop that Glance, or every one
#
# Logs:
#   $SWIFT_STATE/{proxy-server,account-server,container-server,object-server}.log
#   $SWIFT_STATE/proxy-access.log   one line per client request (proxy-logging):
#       "proxy-access: CLIENT_IP REMOTE_ADDR DATE METHOD PATH PROTO STATUS REFERER
#        USER_AGENT TOKEN BYTES_IN BYTES_OUT ETAG TXID HEADERS TIME ..." where
#       fields are space-separated and URL-quoted (swift_access_lines helps)
#   $SWIFT_STATE/memcached.log, $SWIFT_STATE/syslog-sink.log
#   $GLANCE_STATE/glance-api.log (and db_sync.log)
# The Swift servers log through syslog(3) framing to a Unix datagram socket
# ($SWIFT_STATE/log.sock) read by a small python3 sink that writes one file
# per log_name; their stderr (tracebacks) is appended to the same file.
#
# Env: OPENSTACK_START_TIMEOUT (seconds, default 60) for each *_start.

SWIFT_STATE=$T/swift
SWIFT_AUTH_URL="" SWIFT_PROXY_URL="" SWIFT_ACCOUNT_URL=""
SWIFT_USER=test:tester
SWIFT_KEY=testing
SWIFT_PIDS=()
export SWIFT_STATE SWIFT_AUTH_URL SWIFT_PROXY_URL SWIFT_ACCOUNT_URL SWIFT_USER SWIFT_KEY
GLANCE_URL="" GLANCE_STATE=""
export GLANCE_URL GLANCE_STATE
_GLANCE_N=0
_GLANCE_STATES=()   # state dirs of every glance started (each has pid, url)
_OS_PORTS=()        # ports handed out by _os_port in this test

# _os_port : a free 127.0.0.1 port not handed out before in this test
_os_port() {
  local p
  for _ in $(seq 50); do
    p=$(free_port)
    if [[ " ${_OS_PORTS[*]} " != *" $p "* ]]; then _OS_PORTS+=("$p"); echo "$p"; return 0; fi
  done
  fail "_os_port: no free port"
}

# _os_fail DIR MESSAGE : fail, showing the last lines of every log in DIR
_os_fail() {
  local dir=$1 f; shift
  for f in "$dir"/*.log; do
    [[ -s $f ]] || continue
    echo "---- last lines of $f ----" >&2
    tail -n 12 "$f" >&2
  done
  fail "$*"
}

# _os_elapsed T0 : seconds since T0 (date +%s.%N), one decimal
_os_elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# _os_kill PID : TERM the process tree, wait up to 5 s, then KILL; reap
_os_kill() {
  local pid=$1
  [[ -n $pid ]] || return 0
  if _pid_alive "$pid"; then
    _kill_tree TERM "$pid"
    for _ in $(seq 50); do _pid_alive "$pid" || break; sleep 0.1; done
    _pid_alive "$pid" && _kill_tree KILL "$pid"
  fi
  wait "$pid" 2>/dev/null || true   # its status (143 after TERM) must not trip set -e
  return 0
}

# ---------------------------------------------------------------- Swift

# the syslog sink (python3 -c "$_swift_sink_py" SOCKET UDP_PORT DIR, in the
# background): every datagram "<PRI>name: message", on the Unix socket SOCKET
# (the servers' log_address) or on 127.0.0.1:UDP_PORT (proxy-logging's access
# logger, which has no log_address option, only access_log_udp_host/port), is
# appended to DIR/name.log with a timestamp, unbuffered
_swift_sink_py='
import os, re, select, socket, sys, time
path, port, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
try: os.unlink(path)
except FileNotFoundError: pass
u.bind(path + ".tmp"); os.rename(path + ".tmp", path)
i = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
    try: i.setsockopt(socket.SOL_SOCKET, opt, 16 << 20); break
    except (OSError, TypeError): pass
i.bind(("127.0.0.1", port))
files = {}
pat = re.compile(rb"^<\d+>([A-Za-z0-9_.-]+): ?(.*)$", re.S)
while True:
    for s in select.select([u, i], [], [])[0]:
        m = s.recv(262144).rstrip(b"\0\n")
        g = pat.match(m)
        name, msg = (g.group(1).decode(), g.group(2)) if g else ("unparsed", m)
        f = files.get(name)
        if f is None:
            f = files[name] = open(os.path.join(d, name + ".log"), "ab", buffering=0)
        f.write(time.strftime("%H:%M:%S ").encode() + name.encode() + b": " + msg + b"\n")
'

# the proxy runs under this wrapper (/usr/bin/python3 -c "$_swift_proxy_py"
# CONF): proxy-logging's access logger can only log to syslog over UDP, and a
# UDP socket that just sends would be bound by the kernel to 0.0.0.0:<any>;
# the wrapper binds every UDP syslog socket of the process to 127.0.0.1:0
# first, then runs /usr/bin/swift-proxy-server unchanged
_swift_proxy_py='
import logging.handlers, runpy, socket, sys
H = logging.handlers.SysLogHandler
def _loopback(h):
    s = getattr(h, "socket", None)
    if s is not None and not h.unixsocket and s.family == socket.AF_INET and s.getsockname()[1] == 0:
        s.bind(("127.0.0.1", 0))
for _name in ("__init__", "createSocket"):
    _orig = getattr(H, _name, None)
    if _orig is not None:
        def _wrap(self, *a, _orig=_orig, **k):
            r = _orig(self, *a, **k)
            _loopback(self)
            return r
        setattr(H, _name, _wrap)
sys.argv[0] = "/usr/bin/swift-proxy-server"
runpy.run_path(sys.argv[0], run_name="__main__")
'

# swift_start [TOKEN_LIFE_S] : see the header
swift_start() {
  local life=${1:-86400}
  require_cmd swift-ring-builder /usr/bin/swift-proxy-server swift-account-server \
    swift-container-server swift-object-server memcached curl python3
  [[ -z ${SWIFT_PIDS[*]} ]] || fail "swift_start: Swift is already running"
  local d=$SWIFT_STATE t0 me
  t0=$(date +%s.%N)
  me=$(id -un)
  rm -rf "$d"; mkdir -p "$d/etc" "$d/srv/d1" "$d/cache" "$d/run"
  local mp pp ap cp op lp
  mp=$(_os_port); pp=$(_os_port); ap=$(_os_port); cp=$(_os_port); op=$(_os_port); lp=$(_os_port)

  # log sink first: the servers pick syslog-to-socket only if it exists
  python3 -c "$_swift_sink_py" "$d/log.sock" "$lp" "$d" </dev/null >"$d/syslog-sink.log" 2>&1 &
  SWIFT_PIDS+=($!); bg_track $!
  local memc_user=()
  ((EUID == 0)) && memc_user=(-u root)
  memcached -l 127.0.0.1 -p "$mp" -U 0 -m 64 -c 256 "${memc_user[@]}" </dev/null >"$d/memcached.log" 2>&1 &
  SWIFT_PIDS+=($!); bg_track $!

  local common="mount_check = false
disable_fallocate = true
devices = $d/srv
swift_dir = $d/etc
recon_cache_path = $d/cache
bind_ip = 127.0.0.1
workers = 0
user = $me
log_address = $d/log.sock
log_level = INFO"
  local kind port
  for kind in account container object; do
    case $kind in account) port=$ap ;; container) port=$cp ;; object) port=$op ;; esac
    cat > "$d/etc/$kind-server.conf" <<EOF
[DEFAULT]
$common
bind_port = $port
log_name = $kind-server

[pipeline:main]
pipeline = $kind-server

[app:$kind-server]
use = egg:swift#$kind
EOF
  done
  # rings: swift-ring-builder's own main() (swift.cli.ringbuilder) run for
  # "X.builder create 6 1 1", "add r1z1-127.0.0.1:PORT/d1 1", "rebalance" of
  # each ring in one python process (nine separate runs cost ~4 s of CPU)
  /usr/bin/python3 - "$d/etc" "$ap" "$cp" "$op" >"$d/rings.log" 2>&1 <<'PY' ||
import os, sys
from swift.cli.ringbuilder import main
os.chdir(sys.argv[1])
for kind, port in zip(("account", "container", "object"), sys.argv[2:5]):
    for cmd in (["create", "6", "1", "1"], ["add", "r1z1-127.0.0.1:%s/d1" % port, "1"], ["rebalance"]):
        print("swift-ring-builder %s.builder %s" % (kind, " ".join(cmd)), flush=True)
        try:
            rc = main(["swift-ring-builder", kind + ".builder"] + cmd)
        except SystemExit as e:
            rc = e.code
        if rc not in (None, 0, 1):   # 1 = EXIT_WARNING
            sys.exit("swift-ring-builder %s.builder %s: status %s" % (kind, " ".join(cmd), rc))
PY
    _os_fail "$d" "swift-ring-builder failed: $(tail -n 3 "$d/rings.log" | tr '\n' ' ')"
  local t_rings; t_rings=$(_os_elapsed "$t0")
  for kind in account container object; do
    [[ -s $d/etc/$kind.ring.gz ]] || _os_fail "$d" "swift-ring-builder: no $kind.ring.gz"
  done
  cat > "$d/etc/proxy-server.conf" <<EOF
[DEFAULT]
$common
bind_port = $pp
log_name = proxy-server

[pipeline:main]
pipeline = catch_errors proxy-logging cache tempauth proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:proxy-logging]
use = egg:swift#proxy_logging
access_log_name = proxy-access
access_log_udp_host = 127.0.0.1
access_log_udp_port = $lp
access_log_level = INFO

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$mp

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = $SWIFT_KEY .admin
token_life = $life
EOF
  for _ in $(seq 50); do [[ -S $d/log.sock ]] && break; sleep 0.05; done
  [[ -S $d/log.sock ]] || _os_fail "$d" "swift_start: the log sink did not create $d/log.sock"
  for kind in account container object; do
    "swift-$kind-server" "$d/etc/$kind-server.conf" </dev/null >>"$d/$kind-server.log" 2>&1 &
    SWIFT_PIDS+=($!); bg_track $!
  done
  /usr/bin/python3 -c "$_swift_proxy_py" "$d/etc/proxy-server.conf" </dev/null >>"$d/proxy-server.log" 2>&1 &
  SWIFT_PIDS+=($!); bg_track $!

  SWIFT_PROXY_URL=http://127.0.0.1:$pp
  SWIFT_AUTH_URL=$SWIFT_PROXY_URL/auth/v1.0
  local deadline=$((SECONDS + ${OPENSTACK_START_TIMEOUT:-60})) tok="" p
  while :; do
    tok=$(swift_token 2>/dev/null) && break
    for p in "${SWIFT_PIDS[@]}"; do
      _pid_alive "$p" || _os_fail "$d" "swift_start: a Swift process (pid $p: $(_swift_pid_name "$p")) exited"
    done
    ((SECONDS < deadline)) ||
      _os_fail "$d" "swift_start: no token from GET $SWIFT_AUTH_URL after ${OPENSTACK_START_TIMEOUT:-60} s"
    sleep 0.2
  done
  SWIFT_ACCOUNT_URL=${tok#* }
  log "Swift at $SWIFT_PROXY_URL (auth $SWIFT_AUTH_URL, account $SWIFT_ACCOUNT_URL, token_life ${life}s) up in $(_os_elapsed "$t0") s (rings built at $t_rings s)"
}

_swift_pid_name() { tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | cut -c1-80; }

# swift_token : "TOKEN STORAGE_URL" from a fresh GET $SWIFT_AUTH_URL
swift_token() {
  [[ -n $SWIFT_AUTH_URL ]] || { echo "swift_token: no Swift started" >&2; return 1; }
  local h tok url
  h=$(curl -sS -o /dev/null -D - --max-time 10 -H "X-Auth-User: $SWIFT_USER" -H "X-Auth-Key: $SWIFT_KEY" \
      "$SWIFT_AUTH_URL" | tr -d '\r') || return 1
  tok=$(awk -F': ' 'tolower($1)=="x-auth-token" {print $2}' <<<"$h")
  url=$(awk -F': ' 'tolower($1)=="x-storage-url" {print $2}' <<<"$h")
  [[ -n $tok && -n $url ]] || { echo "swift_token: no token in: $(head -n 1 <<<"$h")" >&2; return 1; }
  echo "$tok $url"
}

# swift_put CONTAINER OBJECT FILE : create CONTAINER if needed, upload FILE
swift_put() {
  local c=$1 o=$2 f=$3 tu tok url code
  [[ -f $f ]] || fail "swift_put: no file $f"
  tu=$(swift_token) || fail "swift_put: no token from $SWIFT_AUTH_URL"
  tok=${tu%% *} url=${tu#* }
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X PUT -H "X-Auth-Token: $tok" "$url/$c") || code=000
  [[ $code == 201 || $code == 202 ]] || fail "swift_put: PUT container $c: HTTP $code"
  code=$(curl -sS -o /dev/null -w '%{http_code}' -T "$f" -H "X-Auth-Token: $tok" \
         -H "Content-Type: application/octet-stream" "$url/$c/$o") || code=000
  [[ $code == 201 ]] || fail "swift_put: PUT $c/$o: HTTP $code"
}

# swift_access_lines [MARK] : proxy access log lines after line MARK (see
# swift_access_mark), as "METHOD PATH STATUS"
swift_access_mark() { wc -l < "$SWIFT_STATE/proxy-access.log" 2>/dev/null | tr -d ' ' || echo 0; }
swift_access_lines() {
  [[ -f $SWIFT_STATE/proxy-access.log ]] || return 0
  tail -n "+$((${1:-0} + 1))" "$SWIFT_STATE/proxy-access.log" | awk '{print $6, $7, $9}'
}

swift_stop() {
  local p
  for p in "${SWIFT_PIDS[@]}"; do _os_kill "$p"; done
  SWIFT_PIDS=()
  return 0
}

# ---------------------------------------------------------------- Glance

# glance_start [file|swift] : see the header
glance_start() {
  local store=${1:-file}
  require_cmd glance-api glance-manage curl python3
  [[ $store == file || $store == swift ]] || fail "glance_start: store must be file or swift, not '$store'"
  if [[ $store == swift && -z $SWIFT_AUTH_URL ]]; then fail "glance_start swift: call swift_start first"; fi
  local t0 d port
  t0=$(date +%s.%N)
  _GLANCE_N=$((_GLANCE_N + 1))
  d=$T/glance-$_GLANCE_N-$store
  rm -rf "$d"; mkdir -p "$d/images" "$d/staging" "$d/tasks" "$d/lock"
  port=$(_os_port)
  local backend enabled
  if [[ $store == file ]]; then
    enabled=fs:file
    backend="[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = $d/images"
  elif [[ ${GLANCE_SWIFT_INLINE_CREDS:-0} == 1 ]]; then
    enabled=swift:swift
    backend="[glance_store]
default_backend = swift

[swift]
swift_store_auth_address = $SWIFT_AUTH_URL
swift_store_user = $SWIFT_USER
swift_store_key = $SWIFT_KEY
swift_store_auth_version = 1
swift_store_container = glance
swift_store_create_container_on_put = True"
  else
    cat > "$d/glance-swift.conf" <<EOF
[ref1]
auth_address = $SWIFT_AUTH_URL
user = $SWIFT_USER
key = $SWIFT_KEY
auth_version = 1
EOF
    enabled=swift:swift
    backend="[glance_store]
default_backend = swift

[swift]
swift_store_config_file = $d/glance-swift.conf
default_swift_reference = ref1
swift_store_auth_version = 1
swift_store_container = glance
swift_store_create_container_on_put = True"
  fi
  cat > "$d/glance-api.conf" <<EOF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $port
workers = 0
show_image_direct_url = True
show_multiple_locations = True
log_file = $d/glance-api.log
use_stderr = False
use_syslog = False
debug = False
enabled_backends = $enabled

$backend

[database]
connection = sqlite:///$d/glance.sqlite

[paste_deploy]
flavor =
config_file = /etc/glance/glance-api-paste.ini

[os_glance_staging_store]
filesystem_store_datadir = $d/staging

[os_glance_tasks_store]
filesystem_store_datadir = $d/tasks

[oslo_concurrency]
lock_path = $d/lock

[oslo_policy]
enforce_scope = False
enforce_new_defaults = False

[profiler]
enabled = False
EOF
  glance-manage --config-file "$d/glance-api.conf" db_sync >"$d/db_sync.log" 2>&1 ||
    _os_fail "$d" "glance-manage db_sync failed"
  glance-api --config-file "$d/glance-api.conf" </dev/null >>"$d/glance-api.stderr.log" 2>&1 &
  local pid=$!
  bg_track "$pid"
  echo "$pid" > "$d/pid"
  echo "http://127.0.0.1:$port" > "$d/url"
  _GLANCE_STATES+=("$d")
  local deadline=$((SECONDS + ${OPENSTACK_START_TIMEOUT:-60})) code
  while :; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$port/v2/images" 2>/dev/null || true)
    [[ $code == 200 ]] && break
    _pid_alive "$pid" || _os_fail "$d" "glance-api ($store) exited"
    ((SECONDS < deadline)) ||
      _os_fail "$d" "glance-api ($store) on 127.0.0.1:$port: no 200 on /v2/images after ${OPENSTACK_START_TIMEOUT:-60} s (last HTTP $code)"
    sleep 0.2
  done
  GLANCE_URL=http://127.0.0.1:$port
  GLANCE_STATE=$d
  log "Glance ($store store) at $GLANCE_URL (pid $pid, state $d) up in $(_os_elapsed "$t0") s"
}

# glance_upload NAME DISK_FORMAT FILE : create and upload an image (container
# format bare) to $GLANCE_URL; waits until it is active; prints its id
glance_upload() {
  local name=$1 fmt=$2 f=$3 id code st=""
  [[ -n $GLANCE_URL ]] || fail "glance_upload: no Glance started"
  [[ -f $f ]] || fail "glance_upload: no file $f"
  id=$(curl -fsS -X POST -H 'Content-Type: application/json' \
       -d "{\"name\": \"$name\", \"disk_format\": \"$fmt\", \"container_format\": \"bare\"}" \
       "$GLANCE_URL/v2/images" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])') ||
    _os_fail "$GLANCE_STATE" "glance_upload: POST $GLANCE_URL/v2/images failed"
  code=$(curl -sS -o "$GLANCE_STATE/upload-$id.out" -w '%{http_code}' -T "$f" \
         -H 'Content-Type: application/octet-stream' "$GLANCE_URL/v2/images/$id/file") || code=000
  [[ $code == 204 ]] ||
    _os_fail "$GLANCE_STATE" "glance_upload: PUT /v2/images/$id/file: HTTP $code $(head -c 300 "$GLANCE_STATE/upload-$id.out")"
  local deadline=$((SECONDS + ${OPENSTACK_START_TIMEOUT:-60}))
  while :; do
    st=$(curl -fsS "$GLANCE_URL/v2/images/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])') || st=""
    [[ $st == active ]] && break
    [[ $st == killed || $st == deleted ]] && _os_fail "$GLANCE_STATE" "glance_upload: image $id is $st"
    ((SECONDS < deadline)) || _os_fail "$GLANCE_STATE" "glance_upload: image $id still '$st' after ${OPENSTACK_START_TIMEOUT:-60} s"
    sleep 0.2
  done
  echo "$id"
}

# glance_stop [GLANCE_URL] : stop the Glance at that URL, or all of them
glance_stop() {
  local want=${1:-} d
  for d in "${_GLANCE_STATES[@]}"; do
    [[ -z $want || $(cat "$d/url" 2>/dev/null) == "$want" ]] || continue
    [[ -f $d/pid ]] || continue
    _os_kill "$(cat "$d/pid")"
    rm -f "$d/pid"
  done
  return 0
}
