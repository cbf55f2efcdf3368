#!/usr/bin/env bash
# bench/realboot.sh — how long a real distribution takes to boot from a
# remote image: lazybd against the local file and its peers.
#
# Guest: the image of qemu-tests/debian-image.sh (4 GiB raw, sparse; Debian
# bookworm, GRUB, the cloud kernel, systemd with udev and dbus; a service
# sha256-checks a 24 MiB payload and prints LAZYBD-DEBIAN-OK), booted by
# qemu-system-x86_64 under TCG (qemu-tests/boot.sh through lib.sh's
# debian_boot_vm: -drive if=virtio with snapshot=on, so the guest's writes
# stay in qemu). Measured: seconds from starting qemu to the marker.
# Origin: nginx on loopback (qemu-tests/lib.sh origin_start) behind
# bench/delay-proxy at RTT ms (RATE_MBIT cap), as bench/boot.sh does.
#
# Cases (CASES), every one once per round; rounds alternate the order (odd
# rounds as listed, even rounds reversed), ROUNDS rounds:
#   local           qemu opens the raw file directly (baseline)
#   lazybd-cold     lazybd serve URL --no-profile, fresh cache
#   lazybd-profile  lazybd serve URL, fresh cache; a boot profile is published
#                   beside the image (debian.img.lazybd-profile: recorded once
#                   before the rounds with --record-profile 0 during a boot,
#                   saved at SIGTERM, `lazybd profile export`), so the cold
#                   start replays it
#   qsd-ra          qemu-storage-daemon: http blockdev (readahead=QSD_RA,
#                   4 MiB) -> qcow2 overlay (cluster_size=BLOCK_SIZE) ->
#                   copy-on-read, exported over NBD
#   nbdkit-cache    nbdkit curl plugin + cache filter (cache-on-read=true,
#                   cache-min-block-size=BLOCK_SIZE)
#   local-4vm       four VMs at once, each opening the raw file (the baseline
#                   of four boots sharing the 2 cores)
#   lazybd-4vm      four VMs at once from one lazybd (--no-profile, fresh
#                   cache), all on one read-only export: each block should
#                   come from the origin once (*fetched twice* 0) and the
#                   origin bytes stay those of one boot
# A 4-VM case's boot time is its slowest VM's; its extra is over local-4vm.
# Every server is started and answering (nbdinfo) before qemu starts; origin
# requests and bytes are counted from nginx's access log from server start to
# server stop (open probe and profile download included). Guest bytes are
# what the guest read from its disk, as lazybd counts it (bytes_served of the
# round's lazybd-cold boot; the peers' guests read the same image the same
# way): origin bytes ÷ guest bytes says how much more than the guest needed a
# server fetched. For lazybd, the summary also tells how many guest reads
# waited for the origin and for how long in all: what a boot of dependent
# reads loses to the origin's distance.
#
# Report: a "Real distribution boot (bench/realboot.sh)" section in OUT
# (replacing an earlier one; at an RTT other than 10 ms, its own section
# "Real distribution boot at RTT ms RTT"): conditions and a table (median
# boot, extra over local per round, origin MiB, origin ÷ guest bytes, bytes
# fetched twice, guest waits). Then (not with QUICK=1) the script runs
# itself again at ALSO_RTT ms (1; "" = not) with ALSO_CASES (local
# lazybd-cold lazybd-profile nbdkit-cache), into that RTT's section.
# A boot that fails makes the script exit 1 (after the report).
#
# Env:
#   ROUNDS (3)  RTT (10 ms)  RATE_MBIT (1000)  CASES (all)
#   BLOCK_SIZE (64k: nbdkit cache-min-block-size, qcow2 cluster_size)
#   LAZYBD_BLOCK_SIZE (lazybd's --block-size; empty: its default, 4k)
#   QSD_RA (4194304)  BOOT_TIMEOUT (300 s per boot)
#   OUT (bench/RESULTS.md; "" = stdout only)  QUICK=1: ROUNDS=1, OUT="" unless set
#   LAZYBD (target/release/lazybd; copied into the temp dir first)
#   LAZYBD_ARGS (extra `serve` options for every lazybd case)
#   KEEP_TMP=1 (keep the temp dir: logs, serial consoles, access log, rows.tsv)
# About 45 s per boot on 2 cores and 2-3 min per 4-VM case: ~25 min at
# ROUNDS=3, plus the image build on the first run (qemu-tests/debian-image.sh;
# needs root); the run at ALSO_RTT another ~7 min.
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then ROUNDS=${ROUNDS:-1}; OUT=${OUT-}; fi
ROUNDS=${ROUNDS:-3}
RTT=${RTT:-10}
RATE_MBIT=${RATE_MBIT:-1000}
CASES=${CASES:-local lazybd-cold lazybd-profile qsd-ra nbdkit-cache local-4vm lazybd-4vm}
BLOCK_SIZE=${BLOCK_SIZE:-64k}
LAZYBD_BLOCK_SIZE=${LAZYBD_BLOCK_SIZE:-}
LZ_BS=()
[[ -z $LAZYBD_BLOCK_SIZE ]] || LZ_BS=(--block-size "$LAZYBD_BLOCK_SIZE")
QSD_RA=${QSD_RA:-4194304}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-300}
OUT=${OUT-$BENCH/RESULTS.md}
LAZYBD_ARGS=${LAZYBD_ARGS:-}
LAZYBD_SRC=${LAZYBD:-$ROOT/target/release/lazybd}

for c in $CASES; do
  case $c in local|lazybd-cold|lazybd-profile|qsd-ra|nbdkit-cache|local-4vm|lazybd-4vm) ;;
    *) echo "bench/realboot.sh: unknown case $c" >&2; exit 2 ;; esac
done
has() { [[ " $CASES " == *" $1 "* ]]; }

tools_ok() {
  local t
  for t in qemu-system-x86_64 nginx curl rustc nbdinfo python3 debootstrap grub-install; do
    command -v "$t" >/dev/null 2>&1 || return 1
  done
  if has nbdkit-cache; then nbdkit --filter=cache curl --version >/dev/null 2>&1 || return 1; fi
  if has qsd-ra; then
    command -v qemu-storage-daemon >/dev/null 2>&1 || return 1
    ls /usr/lib/*/qemu/block-curl.so >/dev/null 2>&1 || return 1
  fi
}
if ! tools_ok; then
  echo "bench/realboot.sh: tools missing: running scripts/install-deps.sh" >&2
  "$ROOT/scripts/install-deps.sh"
  tools_ok || { echo "bench/realboot.sh: tools still missing" >&2; exit 2; }
fi
[[ -x $LAZYBD_SRC ]] || { echo "bench/realboot.sh: no lazybd binary at $LAZYBD_SRC (cargo build --release)" >&2; exit 2; }

# qemu-tests/lib.sh: temp dir $T with cleanup of every process by pid, the
# nginx origin with its access log, lazybd start/stop, boot helpers
. "$ROOT/qemu-tests/lib.sh"
cp "$LAZYBD_SRC" "$T/lazybd"
LAZYBD=$T/lazybd
LAZYBD_INFO="$(readlink -f "$LAZYBD_SRC"), built $(date -u -r "$LAZYBD_SRC" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$LAZYBD_SRC" | cut -c1-12)"
START=$SECONDS

debian_image "$T/origin"
origin_start "$T/origin" >/dev/null
HTTP_PORT=${ORIGIN_URL##*:}
URL_DIRECT=$ORIGIN_URL/debian.img
IMG_BYTES=$(stat -c %s "$DEBIAN_IMG")

log "building the delay proxy"
rustc -O -o "$T/delay-proxy" "$BENCH/delay-proxy.rs" 2>"$T/delay-proxy.build.log" ||
  { cat "$T/delay-proxy.build.log" >&2; fail "rustc delay-proxy.rs failed"; }

# servers: stop_pid, lz_stop, nbdkit_start, qsd_start
. "$BENCH/boot-servers.sh"

# ---------------------------------------------------------------- profile
PROFILE_INFO="n/a"
if has lazybd-profile; then
  log "recording a boot profile (direct origin, --record-profile 0, saved at SIGTERM)"
  lazybd_start "$URL_DIRECT" --cache-dir "$T/rec-cache" --control none --no-profile --record-profile 0 \
    "${LZ_BS[@]}"
  debian_boot_vm "$LAZYBD_URI" "$BOOT_TIMEOUT"
  assert_booted
  lazybd_stop
  "$LAZYBD" profile show --cache-dir "$T/rec-cache" --image "$URL_DIRECT" >"$T/profile-show.txt" 2>&1 ||
    fail "lazybd profile show failed: $(tail -n 3 "$T/profile-show.txt")"
  "$LAZYBD" profile export --cache-dir "$T/rec-cache" --image "$URL_DIRECT" "$T/origin/debian.img.lazybd-profile" \
    >"$T/profile-export.txt" 2>&1 || fail "lazybd profile export failed: $(cat "$T/profile-export.txt")"
  chmod 0644 "$T/origin/debian.img.lazybd-profile"
  rm -rf "$T/rec-cache"
  PROFILE_INFO="$(grep -iE 'total|ranges|bytes' "$T/profile-show.txt" | tail -n 2 | tr '\n' ' ' | sed 's/  */ /g; s/ $//'); file $(stat -c %s "$T/origin/debian.img.lazybd-profile") bytes"
  log "profile published as debian.img.lazybd-profile: $PROFILE_INFO"
fi

# ---------------------------------------------------------------- pattern
# One boot from the local file through nbdkit's log filter, every read
# delayed by RTT ms (the delay filter, below the log): every read the guest
# makes, in order, with its issue and answer times, as a guest sees them
# when every read is a miss at the origin's distance (bench/boot-pattern.py
# reads them). At local speed every read would be answered before the next
# one was issued, and the log could not tell which reads the guest issues
# together.
PATTERN_MD=$T/pattern.md
if [[ ${PATTERN:-1} == 1 ]]; then
  log "recording the boot's read pattern (nbdkit --filter=log --filter=delay rdelay=${RTT}ms file, local)"
  pport=$(free_port)
  mkdir -p "$T/pattern"
  nbdkit -P "$T/pattern/pid" --log=stderr -r -e disk -i 127.0.0.1 -p "$pport" --filter=log --filter=delay \
    file "$DEBIAN_IMG" logfile="$T/pattern/requests.log" rdelay="${RTT}ms" >"$T/pattern/log" 2>&1 || true
  _daemon_ready "$T/pattern" "nbd://127.0.0.1:$pport/disk"
  debian_boot_vm "$SRV_URI" "$BOOT_TIMEOUT"
  assert_booted
  stop_pid "$SRV_PID"
  "$BENCH/boot-pattern.py" "$T/pattern/requests.log" >"$PATTERN_MD" || fail "bench/boot-pattern.py failed"
  cat "$PATTERN_MD" >&2
fi

# ---------------------------------------------------------------- rounds
ROWS=$T/rows.tsv
printf 'round\tcase\tstatus\tboot_s\tinit_s\torigin_reqs\torigin_bytes\tdup_bytes\tserved\tprofile\twaits\twait_ms\tnote\n' >"$ROWS"
FAILED=0

# debian_boot_many N DISK : N VMs boot DISK at once (debian_boot_vm's
# settings, each its own serial log). Sets BOOT_RC (0: all reached the OK
# marker), BOOT_STATUS, BOOT_S (the slowest VM's marker time), BOOT_INIT_S
# (the slowest VM's systemd start), BOOT_LOG (a failed VM's log, else the
# last), DEBIAN_LINE (a VM's marker line with failed units, else the last),
# and appends every VM's time to R_NOTE.
MANY_N=0
debian_boot_many() {
  local n=$1 disk=$2 i line st ms ok=0 times=() inits=() pids=()
  MANY_N=$((MANY_N + 1))
  for ((i = 1; i <= n; i++)); do
    # exec: the pid waited for is boot.sh's own, not a subshell's
    BOOT_QUIET=1 BOOT_LOG=$T/many-$MANY_N-$i.log \
      debian_boot_env exec "$ROOT/qemu-tests/boot.sh" "$disk" "$BOOT_TIMEOUT" >"$T/many-$MANY_N-$i.line" 2>&1 &
    pids+=("$!")
  done
  # boot.sh ends its qemu at the marker or the timeout: these waits end.
  for i in "${pids[@]}"; do wait "$i" || true; done
  BOOT_STATUS="" BOOT_S="" BOOT_INIT_S="" DEBIAN_LINE=""
  for ((i = 1; i <= n; i++)); do
    line=$(grep -a '^BOOT ' "$T/many-$MANY_N-$i.line" | tail -n 1 || true)
    st=$(grep -o ' status=[^ ]*' <<<"$line" | cut -d= -f2 || true)
    ms=$(grep -o ' marker_s=[^ ]*' <<<"$line" | cut -d= -f2 || true)
    BOOT_LOG=$T/many-$MANY_N-$i.log
    local dl; dl=$(grep -ao 'LAZYBD-DEBIAN-\(OK\|BAD\) .*' "$BOOT_LOG" | tail -n 1 | tr -d '\r' || true)
    [[ -n $DEBIAN_LINE && $DEBIAN_LINE != *"failed=none"* ]] || DEBIAN_LINE=$dl
    if [[ $st == ok && -n $ms ]]; then
      ok=$((ok + 1)); times+=("$ms")
      inits+=("$(grep -o ' init_s=[^ ]*' <<<"$line" | cut -d= -f2 || true)")
    else
      FAILED_LOG=$BOOT_LOG
    fi
  done
  [[ -z ${FAILED_LOG:-} ]] || BOOT_LOG=$FAILED_LOG
  unset FAILED_LOG
  R_NOTE+="VMs ${times[*]:-none} s; "
  if ((ok == n)); then
    BOOT_RC=0 BOOT_STATUS=ok
    BOOT_S=$(printf '%s\n' "${times[@]}" | sort -g | tail -n 1)
    BOOT_INIT_S=$(printf '%s\n' "${inits[@]}" | sort -g | tail -n 1)
  else
    BOOT_RC=1 BOOT_STATUS="$((n - ok))-of-$n-failed"
  fi
  log "  $n VMs from $disk: $ok ok, slowest ${BOOT_S:-?} s"
}

run_case() {  # ROUND CASE URL
  local rd=$1 c=$2 url=$3 mark reqs bytes uniq dup n
  R_STATUS="" R_BOOT="" R_INIT="" R_NOTE="" R_SERVED="" R_PROF="" R_WAITS="" R_WAIT_MS=""
  log "round $rd: $c"
  mark=$(origin_mark)
  # shellcheck disable=SC2086
  case $c in
    local) debian_boot_vm "$DEBIAN_IMG" "$BOOT_TIMEOUT" ;;
    lazybd-cold)
      lazybd_start "$url" --cache-dir "$T/cache/cold-$rd" --control none --no-profile "${LZ_BS[@]}" $LAZYBD_ARGS
      debian_boot_vm "$LAZYBD_URI" "$BOOT_TIMEOUT"; lz_stop; rm -rf "$T/cache/cold-$rd" ;;
    lazybd-profile)
      lazybd_start "$url" --cache-dir "$T/cache/profile-$rd" --control none "${LZ_BS[@]}" $LAZYBD_ARGS
      debian_boot_vm "$LAZYBD_URI" "$BOOT_TIMEOUT"; lz_stop; rm -rf "$T/cache/profile-$rd"
      [[ ${R_PROF:-0} -gt 0 ]] || R_NOTE+="no profile replay (profile_bytes=${R_PROF:-?}); " ;;
    qsd-ra) qsd_start "$url" "$QSD_RA"; debian_boot_vm "$SRV_URI" "$BOOT_TIMEOUT"; stop_pid "$SRV_PID" ;;
    nbdkit-cache) nbdkit_start "$url"; debian_boot_vm "$SRV_URI" "$BOOT_TIMEOUT"; stop_pid "$SRV_PID" ;;
    local-4vm) debian_boot_many 4 "$DEBIAN_IMG" ;;
    lazybd-4vm)
      lazybd_start "$url" --cache-dir "$T/cache/4vm-$rd" --control none --no-profile "${LZ_BS[@]}" $LAZYBD_ARGS
      debian_boot_many 4 "$LAZYBD_URI"; lz_stop; rm -rf "$T/cache/4vm-$rd" ;;
  esac
  R_STATUS=$BOOT_STATUS R_BOOT=$BOOT_S R_INIT=$BOOT_INIT_S
  [[ $BOOT_RC == 0 ]] || { R_NOTE+="boot $BOOT_STATUS (serial: $(grep -a 'LAZYBD-DEBIAN' "$BOOT_LOG" | tail -n 1 | cut -c1-80)); "; FAILED=1; }
  [[ $BOOT_RC != 0 || $DEBIAN_LINE == *"failed=none"* ]] || R_NOTE+="guest: failed units ${DEBIAN_LINE##*failed=}; "
  reqs=$(origin_all_requests_since "$mark")
  bytes=$(origin_bytes_since "$mark")
  read -r uniq dup n < <(origin_ranges_since "$mark" /debian.img)
  # The first cold boot's GETs, for what it fetched that the guest never read
  if [[ $c == lazybd-cold && ! -s $T/cold-gets.txt ]]; then
    _origin_lines "$mark" | awk -F'|' '$2 == "GET" && $3 == "/debian.img" && $5 ~ /^bytes=[0-9]+-[0-9]+$/ && $5 != "bytes=0-0" {
      split(substr($5, 7), r, "-"); printf "%.0f %.0f\n", r[1], r[2] + 1 }' >"$T/cold-gets.txt"
  fi
  [[ $c == local* ]] && reqs="" bytes="" dup=""
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rd" "$c" "${R_STATUS:-fail}" "$R_BOOT" "$R_INIT" \
    "$reqs" "$bytes" "$dup" "$R_SERVED" "$R_PROF" "$R_WAITS" "$R_WAIT_MS" "${R_NOTE%; }" >>"$ROWS"
  log "  -> ${R_STATUS:-fail} boot ${R_BOOT:-?} s (systemd at ${R_INIT:-?} s); origin ${reqs:-0} requests, ${bytes:-0} bytes (${dup:-0} fetched twice)${R_NOTE:+; ${R_NOTE%; }}"
}

pport=$(free_port)
"$T/delay-proxy" --listen "127.0.0.1:$pport" --upstream "127.0.0.1:$HTTP_PORT" \
  --delay-ms "$(awk -v r="$RTT" 'BEGIN{print r / 2}')" --rate-mbit "$RATE_MBIT" --duration-s 14400 \
  2>"$T/delay-proxy.log" &
bg_track "$!"
url=http://127.0.0.1:$pport/debian.img
for _ in $(seq 50); do curl -fsS -o /dev/null -r 0-0 "$url" 2>/dev/null && break; sleep 0.1; done
RTT_MEASURED=$(for i in $(seq 0 20); do printf -- '-r %d-%d -o /dev/null %s\n' $((i * 65536)) $((i * 65536 + 4095)) "$url"; done |
  xargs curl -fsS -w '%{time_total}\n' | tail -n +2 | awk '{s += $1; n++} END {printf "%.3f", s / n * 1000}')
log "origin at ${RTT} ms RTT, ${RATE_MBIT} Mbit/s: $url (4 KiB ranged GET: $RTT_MEASURED ms)"
read -ra order <<<"$CASES"
for ((rd = 1; rd <= ROUNDS; rd++)); do
  seq_cases=("${order[@]}")
  if ((rd % 2 == 0)); then
    seq_cases=(); for ((i = ${#order[@]} - 1; i >= 0; i--)); do seq_cases+=("${order[i]}"); done
  fi
  for c in "${seq_cases[@]}"; do run_case "$rd" "$c" "$url"; done
done
ELAPSED=$((SECONDS - START))

# ---------------------------------------------------------------- report
META=$T/meta.tsv
{
  meta_host
  printf 'qemu\t%s\n' "$(qemu-system-x86_64 --version | head -n 1 | sed 's/QEMU emulator version //')"
  printf 'nbdkit\t%s\n' "$(nbdkit --version 2>/dev/null | awk '{print $2}')"
  printf 'nginx\t%s\n' "$(nginx -v 2>&1 | sed 's/.*\///')"
  printf 'lazybd\tbinary %s\n' "$LAZYBD_INFO"
  printf 'image\t%s MiB raw (%s MiB allocated), Debian %s, kernel %s, payload %s MiB\n' \
    "$((IMG_BYTES >> 20))" "$(( $(stat -c %b "$DEBIAN_IMG") * 512 >> 20 ))" \
    "$(sed -n 's/^suite=//p' "$DEBIAN_IMG.meta")" "$(sed -n 's/^kernel=//p' "$DEBIAN_IMG.meta")" \
    "$(sed -n 's/^payload_mib=//p' "$DEBIAN_IMG.meta")"
  printf 'rtt\t%s\n' "$RTT"
  printf 'rtt_measured\t%s\n' "$RTT_MEASURED"
  printf 'rate_mbit\t%s\n' "$RATE_MBIT"
  printf 'rounds\t%s\n' "$ROUNDS"
  printf 'block_size\t%s\n' "$BLOCK_SIZE"
  printf 'lazybd_block_size\t%s\n' "${LAZYBD_BLOCK_SIZE:-4k (its default)}"
  printf 'qsd_ra\t%s\n' "$QSD_RA"
  printf 'profile\t%s\n' "$PROFILE_INFO"
  printf 'lazybd_args\t%s\n' "$LAZYBD_ARGS"
  printf 'elapsed_s\t%s\n' "$ELAPSED"
  printf 'pattern_md\t%s\n' "$PATTERN_MD"
  if [[ -s $T/cold-gets.txt && -s $T/pattern/requests.log ]]; then
    "$BENCH/boot-pattern.py" "$T/pattern/requests.log" --unread "$T/cold-gets.txt" "$DEBIAN_IMG" >"$T/unread.md" ||
      log "boot-pattern.py --unread failed"
    printf 'unread_md\t%s\n' "$T/unread.md"
  fi
} >"$META"

SECTION=$T/section.md
python3 - "$ROWS" "$META" "$SECTION" "$BENCH" <<'PY'
import statistics, sys
rows_p, meta_p, out_p, bench = sys.argv[1:]
sys.path.insert(0, bench)
from resultsmd import read_meta, read_rows, rounds_cell
meta = read_meta(meta_p)
rows = read_rows(rows_p)
NR = int(meta["rounds"])
ORDER = ["local", "lazybd-cold", "lazybd-profile", "qsd-ra", "nbdkit-cache", "local-4vm", "lazybd-4vm"]
LABEL = {
    "local": "local file (qemu opens the raw file)",
    "lazybd-cold": "lazybd cold, no profile",
    "lazybd-profile": "lazybd cold, with profile",
    "qsd-ra": f"qemu-storage-daemon http (readahead={int(meta['qsd_ra']) >> 10} KiB) + qcow2 + copy-on-read",
    "nbdkit-cache": "nbdkit curl + cache filter",
    "local-4vm": "4 VMs at once, local file",
    "lazybd-4vm": "4 VMs at once, one lazybd, cold, no profile",
}
def med(v): return statistics.median(v) if v else None
def fnum(x, nd=2): return "—" if x is None else f"{x:.{nd}f}"
ok = lambda r: r["status"] == "ok" and r["boot_s"]
def by_round(c, key, conv=float):
    return {r["round"]: conv(r[key]) for r in rows if r["case"] == c and ok(r) and r[key]}
loc = by_round("local", "boot_s")
loc4 = by_round("local-4vm", "boot_s")
guest = by_round("lazybd-cold", "served", int)
# Without a single cold boot in a round, one of the four VMs' share.
for k, v in by_round("lazybd-4vm", "served", int).items():
    guest.setdefault(k, v // 4)
title = "## Real distribution boot (bench/realboot.sh)"
if float(meta["rtt"]) != 10:
    title = f"## Real distribution boot at {meta['rtt']} ms RTT (bench/realboot.sh)"
o = [title + "\n"]
o.append(f"{NR} round(s) of every case, the order alternating (odd rounds as listed, even rounds reversed); "
         f"{meta['elapsed_s']} s.\n")
o.append("Time from starting `qemu-system-x86_64` (TCG) to the `LAZYBD-DEBIAN-OK` line on the guest's serial console. "
         "The guest is the image of `qemu-tests/debian-image.sh`: a 4 GiB Debian disk; SeaBIOS loads GRUB, GRUB the "
         "cloud kernel and its initramfs from ext4, systemd (with udev, journald, dbus) brings the system up, and a "
         "service checks the sha256 of a payload file, prints the marker and powers off. The disk is "
         "`if=virtio,snapshot=on` (the guest's writes stay in qemu). Every server is started and answering before "
         "qemu starts. *Extra* = boot − the same round's local-file boot (median of the rounds, each round's in "
         "parentheses). Origin bytes come from nginx's access log from server start to stop (open probe and profile "
         "download included); *guest bytes* are the bytes the guest read from its disk (lazybd's bytes_served in the "
         "same round's cold boot; for 4 VMs, still one guest's bytes); *fetched twice* is image bytes covered by more "
         "than one ranged GET. *Guest waits* (lazybd only): guest reads that waited for the origin, and the sum of "
         "their waits (`guest_waits`, `guest_wait_ms` of its summary; medians): a boot is mostly one chain of "
         "dependent reads, so this sum is about what the origin's distance adds to it. A 4-VM case's boot is its "
         "slowest VM's and its extra is over the same round's 4-VM local boot.\n")
o.append("Conditions:\n")
o.append(f"- machine: {meta['machine']}; load average {meta['load']}")
o.append(f"- qemu {meta['qemu']}, nbdkit {meta['nbdkit']}, nginx {meta['nginx']}")
o.append(f"- lazybd {meta['lazybd']}")
o.append(f"- image: {meta['image']}")
o.append(f"- origin: nginx on loopback behind `bench/delay-proxy` at {meta['rtt']} ms RTT, {meta['rate_mbit']} Mbit/s "
         f"per direction; measured 4 KiB ranged GET: {meta['rtt_measured']} ms")
o.append(f"- lazybd block {meta.get('lazybd_block_size', meta['block_size'])} (`--block-size`); peers' cache block {meta['block_size']} (nbdkit `cache-min-block-size`, qcow2 `cluster_size`)")
o.append(f"- profile for `lazybd cold, with profile`: recorded once during a boot (`serve --record-profile 0`), published "
         f"beside the image with `lazybd profile export`; each run starts with an empty cache. {meta['profile']}")
if meta.get("lazybd_args"): o.append(f"- extra lazybd options: `{meta['lazybd_args']}`")
o.append("")
o.append("| case | boot s (median) | extra s | runs s | origin requests | origin MiB | origin ÷ guest bytes | fetched twice | guest waits | notes |")
o.append("|---|---|---|---|---|---|---|---|---|---|")
for c in ORDER:
    rs = [r for r in rows if r["case"] == c]
    if not rs: continue
    good = [r for r in rs if ok(r)]
    boot = med([float(r["boot_s"]) for r in good])
    runs = ", ".join(r["boot_s"] or r["status"] for r in sorted(rs, key=lambda r: int(r["round"])))
    b = by_round(c, "boot_s")
    base = loc4 if c.endswith("-4vm") else loc
    ex = [b[k] - base[k] for k in sorted(b, key=int) if k in base]
    notes = sorted({r["note"] for r in rs if r["note"]})
    if len(good) < len(rs): notes.append(f"{len(rs) - len(good)} of {len(rs)} runs FAILED")
    if c.startswith("local"):
        o.append(f"| {LABEL[c]} | {fnum(boot)} | — | {runs} | — | — | — | — | — | {'; '.join(notes)} |")
        continue
    waits = med([int(r["waits"]) for r in good if r["waits"]])
    wait_s = med([int(r["wait_ms"]) / 1e3 for r in good if r["wait_ms"]])
    wcell = "—" if waits is None or wait_s is None else f"{int(waits)} reads, {wait_s:.2f} s"

    ob = by_round(c, "origin_bytes", int)
    ratio = [ob[k] / guest[k] for k in sorted(ob, key=int) if k in guest and guest[k] > 0]
    reqs = med([int(r["origin_reqs"]) for r in good if r["origin_reqs"]])
    mib = med([int(r["origin_bytes"]) / 2**20 for r in good if r["origin_bytes"]])
    dup = max([int(r["dup_bytes"] or 0) for r in good], default=None)
    if c == "lazybd-profile":
        pb = med([int(r["profile"]) for r in good if r["profile"]])
        if pb is not None: notes.append(f"profile replay fetched {pb / 2**20:.1f} MiB")
    o.append(f"| {LABEL[c]} | {fnum(boot)} | {rounds_cell(ex, 2, ' s', rounds=NR)} | {runs} | "
             f"{'—' if reqs is None else int(reqs)} | {fnum(mib, 1)} | {rounds_cell(ratio, 2, '×', rounds=NR)} | "
             f"{'—' if dup is None else dup} | {wcell} | {'; '.join(notes)} |")
g = med(list(guest.values()))
o.append("")
if g: o.append(f"Guest bytes (median of the rounds): {g / 2**20:.1f} MiB.\n")
o.append("Raw rows (every run) are in the bench's temp dir (`KEEP_TMP=1`), `rows.tsv`.\n")
try:
    pattern = open(meta["pattern_md"]).read().strip()
except OSError:
    pattern = ""
if pattern:
    o.append("### The boot's read pattern\n")
    o.append(f"One boot from the local file through `nbdkit --filter=log --filter=delay rdelay={meta['rtt']}ms file` "
             "(every read answered one RTT late, as if each were a miss at the origin), analysed by "
             "`bench/boot-pattern.py`:\n")
    o.append(pattern + "\n")
try:
    unread = open(meta.get("unread_md", "")).read().strip()
except OSError:
    unread = ""
if unread:
    o.append("What lazybd's first cold boot (no profile) fetched that the guest never read (the guest's reads: the "
             "boot above; its own would differ by a few requests), by the size of the ranged GET that brought it; "
             "*zeros*: blocks that are zero in the image (free space of the file system):\n")
    o.append(unread + "\n")
open(out_p, "w").write("\n".join(o) + "\n")
PY
echo
write_section - "$SECTION"
if [[ -n $OUT ]]; then
  write_section "$OUT" "$SECTION"
  log "section written to $OUT"
fi
column -t -s $'\t' "$ROWS" >&2 || cat "$ROWS" >&2
ALSO_RTT=${ALSO_RTT-1}
if [[ -n $ALSO_RTT && $QUICK != 1 && -z ${REALBOOT_AGAIN:-} && $ALSO_RTT != "$RTT" ]]; then
  log "again at $ALSO_RTT ms RTT"
  REALBOOT_AGAIN=1 RTT=$ALSO_RTT ROUNDS=$ROUNDS OUT=$OUT LAZYBD=$LAZYBD_SRC PATTERN=0 \
    CASES=${ALSO_CASES:-local lazybd-cold lazybd-profile nbdkit-cache} "$BENCH/realboot.sh" || FAILED=1
fi
if ((FAILED)); then log "some boots FAILED (see the table)"; exit 1; fi
exit 0
