#!/usr/bin/env bash
# bench/cluster.sh — many hosts booting one template at once, with and
# without peers (issue 13's benchmark).
#
# Hosts and origin as in qemu-tests/cluster.sh: one network namespace per
# host, each with its own lazybd and cache; the origin SeaweedFS (S3) behind a
# CL_RATE (1 Gbit/s) tbf link and a CL_RTT_MS (10 ms) delay proxy; the boot
# image's manifest published beside it. First one host alone: a cold VM boot
# (qemu TCG), recording its boot profile, which is the trace; then a cold
# replay of that trace (bench/replay.py, libnbd, 4 reads in flight).
#   storm-vm      VM_N (8) hosts boot a VM at once
#   storm-replay  REPLAY_N (32) hosts replay the trace at once
# each with peers (every host in every host's --peers) and without, ROUNDS
# (3) alternating rounds; medians. Then a sweep of the replay over
# SWEEP_N (1 2 4 8 16 32) hosts, one round each, plotted (gnuplot) to
# cluster.png beside OUT.
#
# Reported per case: origin bytes / one host's, time until every host is
# done (from the start of all) / one host alone, each host's peak
# uplink (its bridge port's rx bytes, sampled every 0.25 s; min, median and
# max over the hosts). Goals: origin bytes <=
# 1.1x one host's at any N with peers; all done in <= 1.5x one host's cold
# VM boot at N = 32 (the table also divides each case by its own kind alone).
#
# Env: VM_N (8) REPLAY_N (32) ROUNDS (3) SWEEP_N ("1 2 4 8 16 32")
#      CL_RATE (1gbit) CL_RTT_MS (10) OUT (bench/RESULTS.md) LAZYBD
#      QUICK (1: VM_N=2 REPLAY_N=4 ROUNDS=1 SWEEP_N="1 2 4", a smoke run)
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$BENCH/lib.sh"
stamp_begin
if [[ ${QUICK:-0} == 1 ]]; then
  VM_N=${VM_N:-2}; REPLAY_N=${REPLAY_N:-4}; ROUNDS=${ROUNDS:-1}; SWEEP_N=${SWEEP_N:-1 2 4}
fi
VM_N=${VM_N:-8}
REPLAY_N=${REPLAY_N:-32}
ROUNDS=${ROUNDS:-3}
SWEEP_N=${SWEEP_N:-1 2 4 8 16 32}
OUT=${OUT:-$BENCH/RESULTS.md}
. "$BENCH/../qemu-tests/lib.sh"
. "$BENCH/../qemu-tests/cluster.sh"
require_cmd qemu-system-x86_64 nbdinfo python3 gnuplot
MAXN=$(printf '%s\n' "$VM_N" "$REPLAY_N" $SWEEP_N | sort -n | tail -n 1)

boot_image "$T/img"
cluster_up "$MAXN"
cluster_put "$BOOT_IMG" base.img
now() { date +%s.%N; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a/b; else print "-" }'; }

# Sample every host's uplink until $T/sampling goes: what the bridge's port
# of each host received (= what the host sent), all read by one process.
sampler() {
  local n=$1 files="" i
  for ((i = 1; i <= n; i++)); do files+=" /sys/class/net/${CL_NS}h${i}b/statistics/rx_bytes"; done
  while [[ -e $T/sampling ]]; do
    # shellcheck disable=SC2086
    echo "$(now) $(ip netns exec "$CL_NS-sw" cat $files | tr '\n' ' ')"
    sleep 0.25
  done >"$T/uplink.samples"
}
peak_uplink() {  # -> each host's peak Mbit/s over one sample step: "MIN/MEDIAN/MAX"
  awk '{ if (NR > 1) { dt = $1 - t; for (i = 2; i <= NF; i++) { r = ($i - p[i]) * 8 / dt / 1e6; if (r > m[i]) m[i] = r } }
         t = $1; for (i = 2; i <= NF; i++) p[i] = $i; n = NF }
       END { for (i = 2; i <= n; i++) printf "%.0f\n", m[i] }' "$T/uplink.samples" |
    sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) { print "0/0/0"; exit }
      printf "%s/%s/%s", v[1], v[int((NR + 1) / 2)], v[NR] }'
}

# run MODE N PEERS: N hosts (1..N) start cold, then all boot (vm) or replay
# at once; sets R_TIME (s until the last is done), R_ORIGIN (origin bytes,
# all hosts), R_UPLINK (peak Mbit/s of any host)
run() {
  local mode=$1 n=$2 with=$3 i peers="" pids=() t0 t1 ok=0
  for ((i = 1; i <= n; i++)); do rm -rf "$T/h$i/cache"; done
  [[ $with == peers ]] && peers=$(cluster_peers $(seq 1 "$n"))
  for ((i = 1; i <= n; i++)); do cluster_host_start "$i" base.img "$peers" --no-profile; done
  touch "$T/sampling"; sampler "$n" & local sp=$!
  t0=$(now)
  for ((i = 1; i <= n; i++)); do
    if [[ $mode == vm ]]; then
      cluster_boot "$i" "$T/run-$i.out"; pids+=("$CL_BOOT_PID")
    else
      ip netns exec "$CL_NS-h$i" "$NBD_PYTHON" "$BENCH/replay.py" nbd://127.0.0.1:10809/disk "$T/trace" \
        >"$T/run-$i.out" 2>&1 &
      pids+=("$!")
    fi
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  t1=$(now)
  rm -f "$T/sampling"; wait "$sp" || true
  R_ORIGIN=0
  for ((i = 1; i <= n; i++)); do
    if [[ $mode == vm ]]; then grep -q 'status=ok' "$T/run-$i.out" && ok=$((ok + 1))
    else grep -q '^replay s=' "$T/run-$i.out" && ok=$((ok + 1)); fi
    cluster_host_stop "$i"
    R_ORIGIN=$((R_ORIGIN + $(cluster_counter "$i" origin_bytes)))
  done
  ((ok == n)) || fail "$mode x$n ($with): only $ok of $n hosts finished: $(cat "$T/run-1.out")"
  R_TIME=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
  R_UPLINK=$(peak_uplink)
  log "$mode x$n $with: ${R_TIME} s, origin $((R_ORIGIN >> 20)) MiB, hosts' peak uplink (min/median/max) ${R_UPLINK} Mbit/s"
}

# ---- one host alone: the VM boot (and its trace), then the replay
rm -rf "$T/h1/cache"
cluster_host_start 1 base.img "" --record-profile 120
t0=$(now)
cluster_boot 1 "$T/solo.out"
wait "$CL_BOOT_PID" || true
SOLO_BOOT=$(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}')
grep -q 'status=ok' "$T/solo.out" || fail "solo boot: $(cat "$T/solo.out")"
cluster_host_stop 1
SOLO_ORIGIN=$(cluster_counter 1 origin_bytes)
"$LAZYBD" profile show --all --cache-dir "$T/h1/cache" >"$T/trace"
log "one VM boot alone: ${SOLO_BOOT} s, origin $((SOLO_ORIGIN >> 20)) MiB; trace: $(sed -n 's/^ranges: *//p' "$T/trace")"
run replay 1 nopeers
SOLO_REPLAY=$R_TIME SOLO_REPLAY_ORIGIN=$R_ORIGIN

# ---- the storms, alternating rounds
declare -A T_ S_ U_
for ((r = 1; r <= ROUNDS; r++)); do
  order="peers nopeers"; ((r % 2 == 0)) && order="nopeers peers"
  for with in $order; do
    run vm "$VM_N" "$with"
    T_[vm-$with]+="$R_TIME "; S_[vm-$with]+="$R_ORIGIN "; U_[vm-$with]+="$R_UPLINK "
    run replay "$REPLAY_N" "$with"
    T_[replay-$with]+="$R_TIME "; S_[replay-$with]+="$R_ORIGIN "; U_[replay-$with]+="$R_UPLINK "
  done
done
median() { printf '%s\n' $1 | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# ---- the sweep
: >"$T/sweep.dat"
for n in $SWEEP_N; do
  run replay "$n" peers; tp=$R_TIME sp=$R_ORIGIN
  run replay "$n" nopeers; tn=$R_TIME sn=$R_ORIGIN
  echo "$n $tp $tn $(ratio "$sp" "$SOLO_REPLAY_ORIGIN") $(ratio "$sn" "$SOLO_REPLAY_ORIGIN")" >>"$T/sweep.dat"
done
png_dir=$(dirname "$OUT")
png=$png_dir/cluster.png
gnuplot <<EOF
set terminal pngcairo size 800,480 font ",10"
set output "$png"
set title "Cold boot-trace replay on N hosts at once (origin: S3, $CL_RATE, ${CL_RTT_MS} ms RTT)"
set xlabel "hosts (N)"; set ylabel "seconds until every host is done"
set logscale x 2; set key left top; set grid
plot "$T/sweep.dat" using 1:2 with linespoints title "with peers", \
     "$T/sweep.dat" using 1:3 with linespoints title "without peers"
EOF
log "plot: $png"

# ---- the section
section=$T/section.md
goal() { awk -v v="$1" -v g="$2" 'BEGIN{print (v <= g) ? "yes" : "no"}'; }
{
  echo "## Many hosts, one origin (bench/cluster.sh)"
  echo
  echo "lazybd $("$LAZYBD" --version | cut -d' ' -f2) (binary sha256 $(sha256sum "$LAZYBD" | cut -c1-12)), SeaweedFS $(weed version 2>/dev/null | awk '{print $3; exit}')," \
    "qemu $(qemu-system-x86_64 --version | awk 'NR==1{print $4}'). Each host is a network namespace with its own lazybd (cache, NBD on its 127.0.0.1," \
    "peers on its bridge address); the origin SeaweedFS (S3) in another, behind a $CL_RATE tc tbf link and a ${CL_RTT_MS} ms RTT delay proxy;" \
    "the boot image's manifest (\`lazybd manifest build\`) beside it, so every peer byte is checked. A VM boot is qemu TCG (the test boot image," \
    "$(stat -c %s "$BOOT_IMG") bytes); a replay is bench/replay.py reading the boot's recorded profile ($(sed -n 's/^ranges: *//p' "$T/trace")) with 4 reads in flight." \
    "All hosts start cold, together; \"done\" is the last host's marker (VM) or last read (replay), from the start of all. Every host shares the $(nproc) cores," \
    "so N TCG guests at once are CPU-bound: the VM rows measure the cluster, not the link. Medians of $ROUNDS alternating rounds (every round's values in brackets)."
  echo
  echo "\`VM_N=$VM_N REPLAY_N=$REPLAY_N ROUNDS=$ROUNDS CL_RATE=$CL_RATE CL_RTT_MS=$CL_RTT_MS bench/cluster.sh\`"
  echo
  echo "One host alone, cold: VM boot **${SOLO_BOOT} s**, $((SOLO_ORIGIN >> 20)) MiB from the origin; trace replay **${SOLO_REPLAY} s**, $((SOLO_REPLAY_ORIGIN >> 20)) MiB."
  echo
  echo "| case | peers | all done (s) | ÷ one host alone | origin bytes ÷ one host's | each host's peak uplink, min/median/max (Mbit/s) |"
  echo "|---|---|---|---|---|---|"
  for c in vm replay; do
    n=$VM_N solo=$SOLO_BOOT solo_o=$SOLO_ORIGIN
    [[ $c == replay ]] && n=$REPLAY_N solo=$SOLO_REPLAY solo_o=$SOLO_REPLAY_ORIGIN
    for with in peers nopeers; do
      t=$(median "${T_[$c-$with]}") s=$(median "${S_[$c-$with]}")
      rs=""; for x in ${S_[$c-$with]}; do rs+="$(ratio "$x" "$solo_o") "; done
      echo "| $c × $n | ${with/nopeers/none} | $t [${T_[$c-$with]% }] | $(ratio "$t" "$solo") | **$(ratio "$s" "$solo_o")** [${rs% }] | ${U_[$c-$with]% } (each round) |"
    done
  done
  echo
  vo=$(ratio "$(median "${S_[vm-peers]}")" "$SOLO_ORIGIN"); ro=$(ratio "$(median "${S_[replay-peers]}")" "$SOLO_REPLAY_ORIGIN")
  rt=$(ratio "$(median "${T_[replay-peers]}")" "$SOLO_BOOT"); vt=$(ratio "$(median "${T_[vm-peers]}")" "$SOLO_BOOT")
  echo "| goal | target | measured | met |"
  echo "|---|---|---|---|"
  echo "| origin bytes with peers, VM × $VM_N | ≤ 1.1× one host's | ${vo}× | $(goal "$vo" 1.1) |"
  echo "| origin bytes with peers, replay × $REPLAY_N | ≤ 1.1× one host's | ${ro}× | $(goal "$ro" 1.1) |"
  echo "| all $REPLAY_N replays done, with peers | ≤ 1.5× one host's cold VM boot | ${rt}× | $(goal "$rt" 1.5) |"
  echo "| all $VM_N VMs booted, with peers | (CPU-bound on $(nproc) cores; shown) | ${vt}× | - |"
  echo
  echo "Replay sweep, one round per N ($(basename "$png")):"
  echo
  echo "| hosts | all done, peers (s) | all done, none (s) | origin ÷ one host's, peers | origin ÷ one host's, none |"
  echo "|---|---|---|---|---|"
  while read -r n tp tn rp rn; do echo "| $n | $tp | $tn | $rp | $rn |"; done <"$T/sweep.dat"
  echo
  echo "![completion time against N]($(basename "$png"))"
  echo
} >"$section"
write_section - "$section"
write_section "$OUT" "$section"
log "section written to $OUT"
