# shellcheck shell=bash
# qemu-tests/openstack.sh — a real OpenStack Swift, Glance and Keystone
# (Debian 12 packages, scripts/install-deps.sh) on 127.0.0.1 for the
# integration tests.
# Sourced after lib.sh:
#
#   . "$(dirname "$0")/lib.sh"
#   . "$(dirname "$0")/openstack.sh"
#
# Everything lives under $T and binds 127.0.0.1 only; no syslog, no telemetry,
# nothing leaves loopback. Every process is registered with bg_track, so
# lib.sh's EXIT trap (_cleanup) kills them all; swift_stop / glance_stop /
# keystone_stop stop them earlier (idempotent). No hook in lib.sh is needed.
#
#   swift_start [TOKEN_LIFE_S]   memcached + account/container/object servers +
#                                proxy (tempauth, user test:tester key testing,
#                                .admin, account_autocreate; tempurl before
#                                tempauth, so temp URLs work once the account
#                                has X-Account-Meta-Temp-URL-Key), one replica in
#                                $SWIFT_STATE/srv. Exports SWIFT_AUTH_URL
#                                (http://127.0.0.1:P/auth/v1.0), SWIFT_USER,
#                                SWIFT_KEY, SWIFT_PROXY_URL, SWIFT_STATE,
#                                SWIFT_ACCOUNT_URL (the X-Storage-Url).
#   swift_token                  prints "TOKEN STORAGE_URL" (a fresh v1 auth)
#   swift_put CONTAINER OBJECT FILE   creates CONTAINER if needed, uploads FILE
#   swift_access_mark / swift_access_lines [MARK]   position in the proxy's
#                                access log / "METHOD PATH STATUS" lines after it
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
#                                Images of GLANCE_SWIFT_LARGE_OBJECT_MB (default
#                                5120) "MB" or more are stored as a DLO: a
#                                0-byte manifest glance/ID (X-Object-Manifest,
#                                ETag "quoted" MD5 of the segment ETags, not of
#                                the bytes) + segments glance/ID-00001... of
#                                GLANCE_SWIFT_CHUNK_MB (default 200) "MB";
#                                glance_store's MB is 1,024,000 bytes.
#   glance_upload NAME DISK_FORMAT FILE   (to $GLANCE_URL) prints the image id
#                                once it is active
#   glance_stop [GLANCE_URL]     stop that Glance, or every one
#   keystone_start [TOKEN_LIFE_S]  Keystone v3 (sqlite, fernet), user admin in
#                                project admin bootstrapped; exports OS_AUTH_URL, OS_USERNAME,
#                                OS_PASSWORD, OS_PROJECT_NAME,
#                                OS_{USER,PROJECT}_DOMAIN_NAME. After swift_start
#                                it adds a second Swift proxy that takes
#                                Keystone tokens (SWIFT_KEYSTONE_PROXY_URL,
#                                SWIFT_KEYSTONE_ACCOUNT_URL) and puts it in the
#                                catalog as object-store. See its comment.
#   keystone_token               prints "TOKEN PROJECT_ID"
#   keystone_endpoint TYPE NAME URL   add a service to the catalog
#   keystone_stop
#
# Logs:
#   $SWIFT_STATE/{proxy-server,account-server,container-server,object-server}.log
#   $SWIFT_STATE/proxy-access.log   one line per request (proxy-logging), e.g.
#       "02:34:10 proxy-access: 127.0.0.1 127.0.0.1 02/Dec/2026/02/34/10 GET
#        /v1/AUTH_test/c/o HTTP/1.0 206 - curl/7.88.1 AUTH_tk4360055c2... - 100
#        - tx... - 0.0056 - - START END 0": awk fields $6 method, $7 path
#       (URL-quoted, query included), $9 status, $13 bytes in, $14 bytes out;
#       the proxy's own subrequests (HEAD ...?format=json, user agent "Swift",
#       client "-") are logged too. A line lands a few ms after the response.
#   $SWIFT_STATE/memcached.log, $SWIFT_STATE/syslog-sink.log
#   $GLANCE_STATE/glance-api.log (and db_sync.log)
#   $KEYSTONE_STATE/keystone.log, server.log (one line per request), manage.log
# The Swift servers log in syslog framing to a Unix datagram socket
# ($SWIFT_STATE/log.sock; the access logger over UDP to 127.0.0.1) read by a
# small python3 sink that writes one file per log_name; their stderr
# (tracebacks) is appended to the same file.
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

# _os_port VAR : set VAR to a free 127.0.0.1 port (TCP and UDP) not handed
# out before in this test (not in $(...): the list of ports must persist)
_os_port() {
  local p
  for _ in $(seq 50); do
    p=$(free_port)
    [[ -z $(ss -Huan "( sport = :$p )" 2>/dev/null) ]] || continue
    if [[ " ${_OS_PORTS[*]} " != *" $p "* ]]; then _OS_PORTS+=("$p"); printf -v "$1" %s "$p"; return 0; fi
  done
  fail "_os_port: no free port"
}

# _os_listening PORT : something listens on 127.0.0.1:PORT (TCP)
_os_listening() { [[ -n $(ss -Htln "( sport = :$1 )" 2>/dev/null) ]]; }

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
  _os_port mp; _os_port pp; _os_port ap; _os_port cp; _os_port op; _os_port lp

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
pipeline = catch_errors proxy-logging cache tempurl tempauth proxy-logging proxy-server

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

[filter:tempurl]
use = egg:swift#tempurl

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
  # ready = the proxy hands out a token and the account, container and
  # object servers listen (they start at the same time as the proxy; a
  # request that reaches one not yet bound gets a 503 from the proxy)
  while :; do
    if tok=$(swift_token 2>/dev/null) && _os_listening "$ap" && _os_listening "$cp" && _os_listening "$op"; then
      break
    fi
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
  h=$(curl -sS -o /dev/null -D - --max-time 10 -H "X-Auth-New-Token: true" -H "X-Auth-User: $SWIFT_USER" -H "X-Auth-Key: $SWIFT_KEY" \
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
  _os_port port
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
swift_store_create_container_on_put = True
swift_store_large_object_size = ${GLANCE_SWIFT_LARGE_OBJECT_MB:-5120}
swift_store_large_object_chunk_size = ${GLANCE_SWIFT_CHUNK_MB:-200}"
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
swift_store_create_container_on_put = True
swift_store_large_object_size = ${GLANCE_SWIFT_LARGE_OBJECT_MB:-5120}
swift_store_large_object_chunk_size = ${GLANCE_SWIFT_CHUNK_MB:-200}"
  fi
  cat > "$d/glance-api.conf" <<EOF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $port
workers = 0
show_image_direct_url = ${GLANCE_SHOW_LOCATIONS:-True}
show_multiple_locations = ${GLANCE_SHOW_LOCATIONS:-True}
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

# ---------------------------------------------------------------- Keystone

KEYSTONE_STATE=$T/keystone
KEYSTONE_URL=""            # http://127.0.0.1:P (OS_AUTH_URL is $KEYSTONE_URL/v3)
KEYSTONE_PID=""
KEYSTONE_ADMIN_PASSWORD=lazybd-keystone-admin-0001
SWIFT_KEYSTONE_PROXY_URL=""  # the Keystone-authenticated Swift proxy (keystone_start)
SWIFT_KEYSTONE_ACCOUNT_URL=""
_SWIFT_KEYSTONE_PROXY_PID=""
export KEYSTONE_STATE KEYSTONE_URL SWIFT_KEYSTONE_PROXY_URL SWIFT_KEYSTONE_ACCOUNT_URL

# keystone_start [TOKEN_LIFE_S] : Keystone (Debian's keystone package) on a
# free 127.0.0.1 port: identity v3, sqlite, fernet tokens of TOKEN_LIFE_S
# (default 3600), served by keystone-wsgi-public (wsgiref, one thread), admin
# user/project bootstrapped (keystone-manage bootstrap, region RegionOne).
# Exports OS_AUTH_URL ($KEYSTONE_URL/v3), OS_USERNAME=admin, OS_PASSWORD,
# OS_PROJECT_NAME=admin, OS_USER_DOMAIN_NAME=Default,
# OS_PROJECT_DOMAIN_NAME=Default, OS_IDENTITY_API_VERSION=3 and
# KEYSTONE_URL/KEYSTONE_STATE.
# When Swift runs (swift_start before), it also starts a second Swift proxy
# on the same rings whose pipeline authenticates with Keystone
# (keystonemiddleware authtoken + swift keystoneauth, operator role admin),
# exports SWIFT_KEYSTONE_PROXY_URL and SWIFT_KEYSTONE_ACCOUNT_URL
# (.../v1/AUTH_<admin project id>), and registers it in the catalog as
# service "swift", type object-store (public/internal/admin, RegionOne,
# http://127.0.0.1:P/v1/AUTH_%(project_id)s). The tempauth proxy of
# swift_start keeps working; its account AUTH_test is another account.
# Logs: $KEYSTONE_STATE/{keystone,server,manage}.log; the second proxy's in
# $SWIFT_STATE/proxy-keystone.log and $SWIFT_STATE/proxy-keystone-access.log.
keystone_start() {
  local life=${1:-3600}
  require_cmd keystone-manage keystone-wsgi-public curl python3
  [[ -z $KEYSTONE_PID ]] || fail "keystone_start: Keystone is already running"
  local d=$KEYSTONE_STATE t0 port
  t0=$(date +%s.%N)
  rm -rf "$d"; mkdir -p "$d/policy.d"
  _os_port port
  cat > "$d/keystone.conf" <<EOF
[DEFAULT]
log_file = $d/keystone.log
use_stderr = false
use_syslog = false

[database]
connection = sqlite:///$d/keystone.sqlite

[token]
provider = fernet
expiration = $life

[fernet_tokens]
key_repository = $d/fernet-keys

[fernet_receipts]
key_repository = $d/fernet-keys

[credential]
key_repository = $d/credential-keys

[identity]
# bcrypt's cheapest cost: the default (12) costs seconds per password auth here
password_hash_rounds = 4

[cache]
enabled = false

[oslo_policy]
policy_dirs = $d/policy.d
EOF
  local km=(keystone-manage --config-file "$d/keystone.conf") u="http://127.0.0.1:$port/v3/"
  {
    "${km[@]}" db_sync &&
    # WAL: keystone opens a new sqlite connection per session (NullPool), and
    # POST /v3/endpoints commits while another of its connections still holds
    # a read transaction: "database is locked" after 5 s in the default
    # rollback-journal mode; in WAL mode readers do not block the commit.
    # The fernet and credential key repositories are made here as
    # "keystone-manage fernet_setup / credential_setup" make them (keys 0 =
    # staged, 1 = primary; 32 random bytes, urlsafe base64), which saves two
    # ~3 s keystone-manage runs.
    python3 - "$d" <<'PY' &&
import base64, os, sqlite3, sys
d = sys.argv[1]
sqlite3.connect(os.path.join(d, "keystone.sqlite")).execute("PRAGMA journal_mode=WAL")
for repo in ("fernet-keys", "credential-keys"):
    os.makedirs(os.path.join(d, repo), mode=0o700)
    for i in (0, 1):
        fd = os.open(os.path.join(d, repo, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, base64.urlsafe_b64encode(os.urandom(32)))
        os.close(fd)
PY
    "${km[@]}" bootstrap --bootstrap-password "$KEYSTONE_ADMIN_PASSWORD" \
      --bootstrap-admin-url "$u" --bootstrap-public-url "$u" --bootstrap-internal-url "$u" \
      --bootstrap-region-id RegionOne
  } </dev/null >"$d/manage.log" 2>&1 || _os_fail "$d" "keystone-manage failed"
  OS_KEYSTONE_CONFIG_DIR=$d keystone-wsgi-public --host 127.0.0.1 --port "$port" </dev/null >"$d/server.log" 2>&1 &
  KEYSTONE_PID=$!
  bg_track "$KEYSTONE_PID"
  KEYSTONE_URL=http://127.0.0.1:$port
  export OS_AUTH_URL=$KEYSTONE_URL/v3 OS_USERNAME=admin OS_PASSWORD=$KEYSTONE_ADMIN_PASSWORD \
    OS_PROJECT_NAME=admin OS_USER_DOMAIN_NAME=Default OS_PROJECT_DOMAIN_NAME=Default \
    OS_IDENTITY_API_VERSION=3
  # the Keystone-authenticated Swift proxy starts while Keystone does
  [[ -n ${SWIFT_PIDS[*]} ]] && _swift_keystone_proxy_start
  local deadline=$((SECONDS + ${OPENSTACK_START_TIMEOUT:-60}))
  until keystone_token >/dev/null 2>&1; do
    _pid_alive "$KEYSTONE_PID" || _os_fail "$d" "keystone-wsgi-public exited"
    ((SECONDS < deadline)) || _os_fail "$d" "Keystone at $OS_AUTH_URL: no token after ${OPENSTACK_START_TIMEOUT:-60} s"
    sleep 0.2
  done
  log "Keystone at $OS_AUTH_URL (pid $KEYSTONE_PID, token life ${life}s) up in $(_os_elapsed "$t0") s"
  if [[ -n ${SWIFT_PIDS[*]} ]]; then
    _swift_keystone_proxy_wait
    keystone_endpoint object-store swift "$SWIFT_KEYSTONE_PROXY_URL/v1/AUTH_%(project_id)s"
    local pid; pid=$(keystone_token | awk '{print $2}')
    SWIFT_KEYSTONE_ACCOUNT_URL=$SWIFT_KEYSTONE_PROXY_URL/v1/AUTH_$pid
    log "Swift with Keystone auth at $SWIFT_KEYSTONE_PROXY_URL, in the catalog as object-store (account $SWIFT_KEYSTONE_ACCOUNT_URL)"
  fi
}

# keystone_token : "TOKEN PROJECT_ID" from a fresh password auth of $OS_USERNAME
# (project scoped)
keystone_token() {
  local h body
  body=$(printf '{"auth":{"identity":{"methods":["password"],"password":{"user":{"name":"%s","domain":{"name":"%s"},"password":"%s"}}},"scope":{"project":{"name":"%s","domain":{"name":"%s"}}}}}' \
    "$OS_USERNAME" "$OS_USER_DOMAIN_NAME" "$OS_PASSWORD" "$OS_PROJECT_NAME" "$OS_PROJECT_DOMAIN_NAME")
  h=$(curl -fsS --max-time 10 -D - -o "$KEYSTONE_STATE/token.json" -H 'Content-Type: application/json' \
      -d "$body" "$OS_AUTH_URL/auth/tokens" | tr -d '\r') || return 1
  echo "$(awk -F': ' 'tolower($1)=="x-subject-token" {print $2}' <<<"$h") $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"]["project"]["id"])' "$KEYSTONE_STATE/token.json")"
}

# keystone_endpoint TYPE NAME URL : register service NAME of TYPE (e.g. image
# glance $GLANCE_URL) with a public, internal and admin endpoint URL in RegionOne
keystone_endpoint() {
  local type=$1 name=$2 url=$3 tok sid iface
  tok=$(keystone_token | awk '{print $1}') || fail "keystone_endpoint: no token"
  sid=$(curl -fsS -H "X-Auth-Token: $tok" -H 'Content-Type: application/json' \
        -d "{\"service\": {\"type\": \"$type\", \"name\": \"$name\", \"enabled\": true}}" "$OS_AUTH_URL/services" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["service"]["id"])') ||
    _os_fail "$KEYSTONE_STATE" "keystone_endpoint: POST /v3/services ($type) failed"
  for iface in public internal admin; do
    curl -fsS -o /dev/null -H "X-Auth-Token: $tok" -H 'Content-Type: application/json' \
      -d "{\"endpoint\": {\"service_id\": \"$sid\", \"interface\": \"$iface\", \"region_id\": \"RegionOne\", \"url\": \"$url\", \"enabled\": true}}" \
      "$OS_AUTH_URL/endpoints" || _os_fail "$KEYSTONE_STATE" "keystone_endpoint: POST /v3/endpoints ($type $iface) failed"
  done
}

# _swift_keystone_proxy_start : a second proxy-server on the rings of
# swift_start with authtoken + keystoneauth instead of tempauth
_swift_keystone_proxy_start() {
  local d=$SWIFT_STATE kp lp mp
  _os_port kp
  mp=$(sed -n 's/^memcache_servers = //p' "$d/etc/proxy-server.conf")
  cat > "$d/etc/proxy-keystone.conf" <<EOF
[DEFAULT]
$(sed -n '/^\[DEFAULT\]/,/^$/p' "$d/etc/proxy-server.conf" | sed '1d;/^bind_port/d;/^log_name/d;/^$/d')
bind_port = $kp
log_name = proxy-keystone

[pipeline:main]
pipeline = catch_errors proxy-logging cache authtoken keystoneauth proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:proxy-logging]
use = egg:swift#proxy_logging
access_log_name = proxy-keystone-access
access_log_udp_host = 127.0.0.1
access_log_udp_port = $(sed -n 's/^access_log_udp_port = //p' "$d/etc/proxy-server.conf")
access_log_level = INFO

[filter:cache]
use = egg:swift#memcache
memcache_servers = $mp

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
www_authenticate_uri = $OS_AUTH_URL
auth_url = $OS_AUTH_URL
auth_type = password
username = $OS_USERNAME
password = $OS_PASSWORD
project_name = $OS_PROJECT_NAME
user_domain_name = $OS_USER_DOMAIN_NAME
project_domain_name = $OS_PROJECT_DOMAIN_NAME
memcached_servers = $mp
delay_auth_decision = True
include_service_catalog = False

[filter:keystoneauth]
use = egg:swift#keystoneauth
operator_roles = admin, member
EOF
  /usr/bin/python3 -c "$_swift_proxy_py" "$d/etc/proxy-keystone.conf" </dev/null >>"$d/proxy-keystone.log" 2>&1 &
  local pid=$!
  SWIFT_PIDS+=("$pid"); bg_track "$pid"
  SWIFT_KEYSTONE_PROXY_URL=http://127.0.0.1:$kp
  _SWIFT_KEYSTONE_PROXY_PID=$pid
}

# _swift_keystone_proxy_wait : until the proxy of _swift_keystone_proxy_start answers /info
_swift_keystone_proxy_wait() {
  local d=$SWIFT_STATE pid=$_SWIFT_KEYSTONE_PROXY_PID
  local deadline=$((SECONDS + ${OPENSTACK_START_TIMEOUT:-60})) code
  while :; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$SWIFT_KEYSTONE_PROXY_URL/info" 2>/dev/null || true)
    [[ $code == 200 ]] && break
    _pid_alive "$pid" || _os_fail "$d" "the Keystone Swift proxy exited"
    ((SECONDS < deadline)) || _os_fail "$d" "the Keystone Swift proxy at $SWIFT_KEYSTONE_PROXY_URL: no /info after ${OPENSTACK_START_TIMEOUT:-60} s"
    sleep 0.2
  done
}

keystone_stop() {
  _os_kill "$KEYSTONE_PID"
  KEYSTONE_PID=""
  return 0
}
