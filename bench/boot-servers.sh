# bench/boot-servers.sh — starting and stopping the servers a boot benchmark
# compares (sourced by bench/boot.sh and bench/realboot.sh, after
# qemu-tests/lib.sh). Uses T, BLOCK_SIZE (the peers' cache block) and
# IMG_BYTES; appends to R_NOTE what went wrong while stopping; lz_stop sets
# R_SERVED, R_RA, R_PROF, R_WAITS and R_WAIT_MS (guest reads that waited for
# the origin, and their total wait) from lazybd's exit summary, and notes
# hedged origin requests (they show as bytes fetched twice).

stop_pid() {  # PID : TERM, up to 5 s, then KILL (daemons too: no wait needed)
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do _pid_alive "$pid" || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  R_NOTE+="server killed after 5 s of SIGTERM; "
}

SRV_N=0
lz_stop() {  # stop the current lazybd without failing the bench
  [[ -n $LAZYBD_PID ]] || return 0
  kill -TERM "$LAZYBD_PID" 2>/dev/null || true
  if ! _lazybd_wait_exit 30; then
    kill -KILL "$LAZYBD_PID" 2>/dev/null || true; _lazybd_wait_exit 5 || true
    R_NOTE+="lazybd killed after 30 s of SIGTERM; "
  fi
  [[ ${LAZYBD_RC:-0} == 0 ]] || R_NOTE+="lazybd exit status $LAZYBD_RC; "
  local s; s=$(lazybd_summary || true)
  R_SERVED=$(sed -n 's/.*bytes_served=\([0-9]*\).*/\1/p' <<<"$s")
  R_RA=$(sed -n 's/.*readahead_bytes=\([0-9]*\).*/\1/p' <<<"$s")
  R_PROF=$(sed -n 's/.*profile_bytes=\([0-9]*\).*/\1/p' <<<"$s")
  R_WAITS=$(sed -n 's/.*guest_waits=\([0-9]*\).*/\1/p' <<<"$s")
  R_WAIT_MS=$(sed -n 's/.*guest_wait_ms=\([0-9]*\).*/\1/p' <<<"$s")
  local h; h=$(sed -n 's/.*origin_hedges=\([0-9]*\).*/\1/p' <<<"$s")
  [[ ${h:-0} == 0 ]] || R_NOTE+="$h origin requests hedged (sent twice: slow answers); "
}

nbdkit_start() {  # URL -> SRV_URI, SRV_PID
  SRV_N=$((SRV_N + 1))
  local d=$T/srv/nbdkit-$SRV_N port; port=$(free_port)
  mkdir -p "$d/tmp"
  TMPDIR=$d/tmp nbdkit -P "$d/pid" --log=stderr -r -e disk -i 127.0.0.1 -p "$port" --filter=cache \
    curl "$1" cache-on-read=true cache-min-block-size="$BLOCK_SIZE" >"$d/log" 2>&1 || true
  _daemon_ready "$d" "nbd://127.0.0.1:$port/disk"
}

qsd_start() {  # URL READAHEAD -> SRV_URI, SRV_PID
  SRV_N=$((SRV_N + 1))
  local d=$T/srv/qsd-$SRV_N port; port=$(free_port)
  mkdir -p "$d"
  qemu-img create -q -f qcow2 -o cluster_size="$BLOCK_SIZE" "$d/overlay.qcow2" "$IMG_BYTES" >"$d/log" 2>&1
  qemu-storage-daemon \
    --blockdev "driver=http,node-name=origin,url=$1,readahead=$2,read-only=on" \
    --blockdev "driver=file,node-name=overlay-file,filename=$d/overlay.qcow2" \
    --blockdev "driver=qcow2,node-name=overlay,file=overlay-file,backing=origin" \
    --blockdev "driver=copy-on-read,node-name=cor,file=overlay" \
    --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$port" \
    --export "type=nbd,id=export0,node-name=cor,name=disk,writable=off" \
    --daemonize --pidfile "$d/pid" >>"$d/log" 2>&1 || true
  _daemon_ready "$d" "nbd://127.0.0.1:$port/disk"
}

_daemon_ready() {  # DIR URI
  local i
  SRV_PID="" SRV_URI=$2
  for ((i = 0; i < 50; i++)); do [[ -s $1/pid ]] && break; sleep 0.1; done
  SRV_PID=$(cat "$1/pid" 2>/dev/null || true)
  [[ -n $SRV_PID ]] || fail "server in $1 did not start: $(tail -n 5 "$1/log" | tr '\n' ' ')"
  bg_track "$SRV_PID"
  for ((i = 0; i < 300; i++)); do
    nbdinfo --size "$SRV_URI" >/dev/null 2>&1 && return 0
    _pid_alive "$SRV_PID" || break
    sleep 0.1
  done
  fail "server in $1 not answering on $SRV_URI: $(tail -n 5 "$1/log" | tr '\n' ' ')"
}
