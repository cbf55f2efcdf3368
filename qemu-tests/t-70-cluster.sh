#!/usr/bin/env bash
# t-70-cluster: a boot storm on CLUSTER_N (4) hosts, each in its own network
# namespace with its own lazybd, cache and peers list; the origin SeaweedFS
# (S3) behind a 1 Gbit/s tbf link and a 10 ms RTT delay proxy
# (qemu-tests/cluster.sh); the boot image's manifest published beside it.
#   1. one host alone, cold: what one boot costs the origin
#   2. all hosts boot at once (qemu TCG) with peers: every guest reaches its
#      marker with the right data, and the origin sends <= 1.1x one boot's bytes
#   3. a liar among the peers (right headers, flipped bytes) and a host killed
#      mid-boot: every other guest boots, and each surviving host's whole
#      export is the image, byte for byte (zero wrong bytes)
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/cluster.sh"
require_cmd qemu-system-x86_64 nbdinfo nbdcopy python3
N=${CLUSTER_N:-4}
LIAR=$((N + 1))

boot_image "$T/img"
img_sha=$(sha_file "$BOOT_IMG")
cluster_up "$LIAR"
cluster_put "$BOOT_IMG" base.img

# ---- 1. one host alone
cluster_host_start 1 base.img "" --no-profile
cluster_boot 1 "$T/solo.out"
wait "$CL_BOOT_PID" || true
grep -q 'status=ok' "$T/solo.out" || fail "solo boot: $(cat "$T/solo.out")"
cluster_host_stop 1
one=$(cluster_counter 1 origin_bytes)
log "one host alone: $(grep -o 'marker_s=[0-9.]*' "$T/solo.out"), origin bytes $one"
rm -rf "$T/h1/cache"

# ---- 2. the storm, with peers
peers=$(cluster_peers $(seq 1 "$N"))
for i in $(seq 1 "$N"); do cluster_host_start "$i" base.img "$peers" --no-profile; done
pids=()
for i in $(seq 1 "$N"); do cluster_boot "$i" "$T/storm-$i.out"; pids+=("$CL_BOOT_PID"); done
for p in "${pids[@]}"; do wait "$p" || true; done
total=0 served=0
for i in $(seq 1 "$N"); do
  grep -q 'status=ok' "$T/storm-$i.out" || fail "host $i's guest: $(cat "$T/storm-$i.out")"
  cluster_host_stop "$i"
  total=$((total + $(cluster_counter "$i" origin_bytes)))
  served=$((served + $(cluster_counter "$i" peer_served_bytes)))
  log "host $i: $(grep -o 'marker_s=[0-9.]*' "$T/storm-$i.out") origin_bytes=$(cluster_counter "$i" origin_bytes) peer_bytes=$(cluster_counter "$i" peer_bytes) peer_served=$(cluster_counter "$i" peer_served_bytes)"
done
log "storm of $N: origin bytes $total = $(awk -v a="$total" -v b="$one" 'BEGIN{printf "%.2f", a/b}')x one boot's; $served bytes served between peers"
assert_le "$total" $((one * 11 / 10)) "origin bytes of $N boots <= 1.1x one boot's"
assert_ge "$served" "$one" "the hosts served each other"

# ---- 3. a liar and a host killed mid-boot
for i in $(seq 1 "$N"); do rm -rf "$T/h$i/cache"; done
ip netns exec "$CL_NS-h$LIAR" python3 "$REPO/qemu-tests/liar_peer.py" "10.77.0.$((10 + LIAR)):7000" "$BOOT_IMG" &
bg_track $!
peers=$(cluster_peers $(seq 1 "$LIAR"))
for i in $(seq 1 "$N"); do cluster_host_start "$i" base.img "$peers" --no-profile; done
pids=()
for i in $(seq 1 "$N"); do cluster_boot "$i" "$T/bad-$i.out"; pids+=("$CL_BOOT_PID"); done
sleep 1.5
cluster_host_stop "$N" KILL
log "host $N's lazybd killed mid-boot"
kill -KILL "${pids[N - 1]}" 2>/dev/null
lies=0
for i in $(seq 1 $((N - 1))); do
  wait "${pids[i - 1]}" || true
  grep -q 'status=ok' "$T/bad-$i.out" || fail "host $i's guest with a liar and a dead peer: $(cat "$T/bad-$i.out")"
  got=$(ip netns exec "$CL_NS-h$i" nbdcopy nbd://127.0.0.1:10809/disk - | sha256sum | cut -d' ' -f1)
  assert_eq "$img_sha" "$got" "host $i's whole export after the storm"
  cluster_host_stop "$i"
  lies=$((lies + $(cluster_counter "$i" manifest_failures)))
  log "host $i: booted, export exact; manifest_failures=$(cluster_counter "$i" manifest_failures) peer_failures=$(cluster_counter "$i" peer_failures)"
done
assert_ge "$lies" 1 "the liar's bytes were caught"
