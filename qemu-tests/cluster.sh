# qemu-tests/cluster.sh — N "hosts" on one machine, each in its own network
# namespace, and an origin (SeaweedFS, S3) in another, for peer tests and
# bench/cluster.sh. Sourced after lib.sh.
#
#   switch ns  CL_NS-sw: a bridge, every host's and the origin's veth on it
#   origin ns  CL_NS-o:  10.77.0.2; SeaweedFS on its 127.0.0.1, reached by
#              the hosts through a delay proxy on 10.77.0.2:9000 (half the
#              RTT each way); its link shaped with tc tbf (egress, CL_RATE)
#   host i     CL_NS-hI: 10.77.0.(10+I); lazybd serving NBD on its own
#              127.0.0.1:10809, peers on 10.77.0.(10+I):7000
#
# Only these namespaces' addresses and loopback are used. Everything is
# removed at exit (CLEANUP_FNS).
#
# Env: CL_RATE (1gbit), CL_RTT_MS (10), CL_BUCKET (boot)

CL_NS=lzc$$
CL_RATE=${CL_RATE:-1gbit}
CL_RTT_MS=${CL_RTT_MS:-10}
CL_BUCKET=${CL_BUCKET:-boot}
CL_N=0
CL_PROXY=""            # http://10.77.0.2:9000, the hosts' S3 endpoint
declare -A CL_PID CL_LOG

_cl_down() {
  local ns p
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$CL_NS-" || true); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  return 0
}

# cluster_up N : the namespaces, bridge, links, the origin (SeaweedFS +
# delay proxy); sets CL_PROXY
cluster_up() {
  local n=$1 i
  require_cmd ip tc weed rustc curl
  CL_N=$n
  CLEANUP_FNS+=(_cl_down)
  ip netns add "$CL_NS-sw" || fail "cluster: cannot create network namespaces (root needed)"
  ip -n "$CL_NS-sw" link set lo up
  ip -n "$CL_NS-sw" link add br0 type bridge
  ip -n "$CL_NS-sw" link set br0 up
  _cl_link() {  # NS IFNAME ADDR
    ip netns add "$1"
    ip -n "$1" link set lo up
    ip link add "$2" type veth peer name "$2b"
    ip link set "$2" netns "$1"
    ip link set "$2b" netns "$CL_NS-sw"
    ip -n "$CL_NS-sw" link set "$2b" master br0 up
    ip -n "$1" addr add "$3/24" dev "$2"
    ip -n "$1" link set "$2" up
  }
  _cl_link "$CL_NS-o" "${CL_NS}o" 10.77.0.2
  ip netns exec "$CL_NS-o" tc qdisc add dev "${CL_NS}o" root tbf rate "$CL_RATE" burst 512kb latency 5ms ||
    fail "cluster: tc tbf on the origin's link"
  for ((i = 1; i <= n; i++)); do _cl_link "$CL_NS-h$i" "${CL_NS}h$i" "10.77.0.$((10 + i))"; done
  # The origin: SeaweedFS inside its namespace, behind the delay proxy.
  S3_NETNS=$CL_NS-o s3_start
  S3_NETNS=$CL_NS-o s3_mb "$CL_BUCKET"
  rustc -O -o "$T/delay-proxy" "$REPO/bench/delay-proxy.rs" 2>"$T/delay-proxy.build.log" ||
    fail "cluster: rustc delay-proxy: $(tail -n 3 "$T/delay-proxy.build.log")"
  ip netns exec "$CL_NS-o" "$T/delay-proxy" --listen 10.77.0.2:9000 --upstream "${S3_URL#http://}" \
    --delay-ms "$(awk -v r="$CL_RTT_MS" 'BEGIN{print r/2}')" --rate-mbit 0 --duration-s 7200 \
    2>"$T/delay-proxy.log" &
  bg_track $!
  CL_PROXY=http://10.77.0.2:9000
  for _ in $(seq 50); do
    ip netns exec "$CL_NS-h1" curl -s -o /dev/null "$CL_PROXY/" && break
    sleep 0.1
  done
  ip netns exec "$CL_NS-h1" curl -s -o /dev/null "$CL_PROXY/" || fail "cluster: host 1 cannot reach the origin at $CL_PROXY"
  log "cluster: $n hosts, origin $CL_PROXY (SeaweedFS $S3_URL in $CL_NS-o), link $CL_RATE, RTT $CL_RTT_MS ms"
}

# cluster_put FILE KEY : upload FILE to the bucket, and its manifest beside it
cluster_put() {
  S3_NETNS=$CL_NS-o s3_put "$1" "$CL_BUCKET/$2"
  ip netns exec "$CL_NS-o" env AWS_ACCESS_KEY_ID="$S3_AK" AWS_SECRET_ACCESS_KEY="$S3_SK" \
    AWS_REGION=us-east-1 AWS_ENDPOINT_URL="$S3_URL" \
    "$LAZYBD" manifest build "s3://$CL_BUCKET/$2" -o "$T/$2.lazybd-manifest" --no-progress >/dev/null ||
    fail "cluster: manifest build of $2"
  S3_NETNS=$CL_NS-o s3_put "$T/$2.lazybd-manifest" "$CL_BUCKET/$2.lazybd-manifest"
}

cluster_peer_url() { echo "http://10.77.0.$((10 + $1)):7000"; }

# cluster_peers I... : the peers list of hosts I...
cluster_peers() {
  local out="" i
  for i in "$@"; do out+="${out:+,}$(cluster_peer_url "$i")"; done
  echo "$out"
}

# cluster_host_start I KEY PEERS [SERVE-ARGS...] : lazybd on host I serving
# s3://BUCKET/KEY as export "disk" at nbd://127.0.0.1:10809/disk (in its
# namespace), with PEERS ("" for none); waits until it answers
cluster_host_start() {
  local i=$1 key=$2 peers=$3 ns=$CL_NS-h$1 args=()
  shift 3
  [[ -n $peers ]] && args+=(--peers "$peers" --peer-listen "10.77.0.$((10 + i)):7000")
  mkdir -p "$T/h$i"
  printf '%s\n' "${CL_TOKEN:=cluster-token-$RANDOM$RANDOM}" > "$T/peer-token"
  CL_LOG[$i]=$T/h$i/lazybd-$SECONDS-$RANDOM.log
  ip netns exec "$ns" env AWS_ACCESS_KEY_ID="$S3_AK" AWS_SECRET_ACCESS_KEY="$S3_SK" \
    AWS_REGION=us-east-1 AWS_ENDPOINT_URL="$CL_PROXY" \
    "$LAZYBD" serve "s3://$CL_BUCKET/$key" --cache-dir "$T/h$i/cache" --control none \
    --listen 127.0.0.1:10809 --peer-token-file "$T/peer-token" "${args[@]}" "$@" \
    </dev/null >"${CL_LOG[$i]}" 2>&1 &
  CL_PID[$i]=$!
  bg_track "${CL_PID[$i]}"
  local deadline=$((SECONDS + 30))
  until ip netns exec "$ns" nbdinfo --size nbd://127.0.0.1:10809/disk >/dev/null 2>&1; do
    _pid_alive "${CL_PID[$i]}" || fail "host $i: lazybd exited: $(tail -n 5 "${CL_LOG[$i]}" | tr '\n' ' ')"
    ((SECONDS < deadline)) || fail "host $i: lazybd not ready after 30 s"
    sleep 0.1
  done
}

# cluster_host_stop I [SIGNAL] : stop host I's lazybd (TERM: waits for its summary)
cluster_host_stop() {
  local i=$1 sig=${2:-TERM} p=${CL_PID[$1]}
  kill -"$sig" "$p" 2>/dev/null
  for _ in $(seq 100); do _pid_alive "$p" || break; sleep 0.1; done
  _pid_alive "$p" && { kill -KILL "$p"; fail "host $i: lazybd did not stop on SIG$sig"; }
  wait "$p" 2>/dev/null || true
}

# cluster_counter I NAME : host I's final summary value of NAME
cluster_counter() {
  grep -o " $2=[0-9]*" "${CL_LOG[$1]}" | tail -n 1 | cut -d= -f2
}

# cluster_boot I OUT : boot a VM in host I's namespace from its lazybd, in
# the background; its boot.sh line goes to OUT. Sets CL_BOOT_PID.
cluster_boot() {
  ip netns exec "$CL_NS-h$1" env BOOT_LOG="$T/h$1/boot-$RANDOM.log" BOOT_SHA="$BOOT_SHA" BOOT_QUIET=1 \
    "$REPO/qemu-tests/boot.sh" nbd://127.0.0.1:10809/disk "${CL_BOOT_TIMEOUT:-240}" >"$2" 2>&1 &
  CL_BOOT_PID=$!
  bg_track "$CL_BOOT_PID"
}
