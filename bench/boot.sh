#!/usr/bin/env bash
# bench/boot.sh — how long a real VM takes to boot from a remote image:
# lazybd against booting the local file and against its peers, side by side.
#
# Guest: the image of qemu-tests/boot-image.sh (64 MiB raw, BIOS, syslinux +
# Debian cloud kernel + busybox initramfs; /init reads and sha256-checks a
# 16 MiB data partition and prints LAZYBD-BOOT-OK), booted by
# qemu-system-x86_64 under TCG (qemu-tests/boot.sh), -drive if=virtio,
# readonly. Measured: seconds from starting qemu to the OK marker.
# Origin: nginx on loopback (qemu-tests/lib.sh origin_start, access log) behind
# bench/delay-proxy (RTT ms, RATE_MBIT cap shared by all connections), for
# each RTT in RTTS.
#
# Cases (CASES), each repeated REPEAT times (interleaved), median reported:
#   local           qemu opens the raw file directly (baseline)
#   lazybd-cold     lazybd serve URL --no-profile, fresh cache
#   lazybd-warm     lazybd restarted on lazybd-cold's cache (same repetition)
#   lazybd-profile  lazybd serve URL, fresh cache; a boot profile is published
#                   beside the image (base.img.lazybd-profile: recorded once
#                   with --record-profile 0 during a boot, saved at SIGTERM,
#                   `lazybd profile export`), so the cold start replays it
#   nbdkit-cache    nbdkit curl plugin + cache filter (cache-on-read=true,
#                   cache-min-block-size=BLOCK_SIZE)
#   qsd             qemu-storage-daemon: http blockdev (readahead=QSD_READAHEAD,
#                   0 as in bench/run.sh) -> qcow2 overlay (cluster_size=
#                   BLOCK_SIZE) -> copy-on-read, exported over NBD
#   qsd-ra          the same with readahead=QSD_RA (4 MiB): qemu's http driver
#                   boots much faster with a big readahead (0: ~2.7 s extra at
#                   10 ms RTT, its default 256 KiB ~2.3 s, 1 MiB ~0.5 s, 4 MiB
#                   ~0.2 s in one try each), so the goals are checked against
#                   the faster of qsd and qsd-ra
#   lazybd-4vm      NVMS VMs boot at once through one cold lazybd, one read-only
#                   export each (config file, one shared cache)
# Every server is started and answering (nbdinfo) before qemu starts; origin
# requests and bytes are counted from nginx's access log from server start to
# server stop (open probes and the profile download included).
#
# Report: a "Boot (bench/boot.sh)" section in OUT (replacing an earlier one):
# conditions, per RTT a table (median boot, extra over local = boot - local,
# origin requests and MiB, bytes fetched twice), ratios and the goals of
# issue 4 at 10 ms RTT with PASS/MISS. A MISS does not fail the script; a
# boot that fails (no marker, wrong data, timeout) does (exit 1). Ratios are
# per repetition (each repetition boots every case once, local file first),
# the median of them shown with every repetition's; bench/lib.sh stamps the
# section.
#
# Env:
#   QUICK=1        RTTS=10, REPEAT=1, CASES="local lazybd-cold lazybd-profile
#                  lazybd-warm", OUT="" (report on stdout only); ~1 min
#   RTTS ("10 1")  REPEAT (3)  RATE_MBIT (1000)  CASES (all)  NVMS (4)
#   BLOCK_SIZE (64k: nbdkit cache-min-block-size, qcow2 cluster_size)
#   LAZYBD_BLOCK_SIZE (lazybd's --block-size; empty: its default, 4k)  QSD_READAHEAD (0) QSD_RA (4194304): qemu http readahead, bytes
#   BOOT_TIMEOUT (180 s per boot)  OUT (bench/RESULTS.md; "" = none)
#   LAZYBD (target/release/lazybd; copied into the temp dir first)
#   LAZYBD_ARGS (extra `serve` options for every lazybd case)
#   KEEP_TMP=1 (keep the temp dir: logs, serial consoles, access log)
#   ROWS_OUT (a file: copy the raw rows there, and the conditions to ROWS_OUT.meta;
#             bench/block-size.sh reads them)
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  RTTS=${RTTS:-10}; REPEAT=${REPEAT:-1}
  CASES=${CASES:-local lazybd-cold lazybd-profile lazybd-warm}
  OUT=${OUT-}
fi
RTTS=${RTTS:-10 1}
REPEAT=${REPEAT:-3}
RATE_MBIT=${RATE_MBIT:-1000}
CASES=${CASES:-local lazybd-cold lazybd-warm lazybd-profile nbdkit-cache qsd qsd-ra lazybd-4vm}
NVMS=${NVMS:-4}
BLOCK_SIZE=${BLOCK_SIZE:-64k}
LAZYBD_BLOCK_SIZE=${LAZYBD_BLOCK_SIZE:-}
# lazybd's block option, when one is asked for (else its default).
LZ_BS=()
[[ -z $LAZYBD_BLOCK_SIZE ]] || LZ_BS=(--block-size "$LAZYBD_BLOCK_SIZE")
QSD_READAHEAD=${QSD_READAHEAD:-0}
QSD_RA=${QSD_RA:-4194304}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-180}
OUT=${OUT-$BENCH/RESULTS.md}
LAZYBD_ARGS=${LAZYBD_ARGS:-}
LAZYBD_SRC=${LAZYBD:-$ROOT/target/release/lazybd}

for c in $CASES; do
  case $c in local|lazybd-cold|lazybd-warm|lazybd-profile|nbdkit-cache|qsd|qsd-ra|lazybd-4vm) ;;
    *) echo "bench/boot.sh: unknown case $c" >&2; exit 2 ;; esac
done
has() { [[ " $CASES " == *" $1 "* ]]; }

# ---------------------------------------------------------------- tools
tools_ok() {
  local t
  for t in qemu-system-x86_64 nginx curl rustc nbdinfo python3 syslinux mcopy; do
    command -v "$t" >/dev/null 2>&1 || return 1
  done
  if has nbdkit-cache; then nbdkit --filter=cache curl --version >/dev/null 2>&1 || return 1; fi
  if has qsd || has qsd-ra; then
    command -v qemu-storage-daemon >/dev/null 2>&1 || return 1
    ls /usr/lib/*/qemu/block-curl.so >/dev/null 2>&1 || return 1
  fi
}
if ! tools_ok; then
  echo "bench/boot.sh: tools missing: running scripts/install-deps.sh" >&2
  "$ROOT/scripts/install-deps.sh"
  tools_ok || { echo "bench/boot.sh: tools still missing" >&2; exit 2; }
fi
[[ -x $LAZYBD_SRC ]] || { echo "bench/boot.sh: no lazybd binary at $LAZYBD_SRC (cargo build --release)" >&2; exit 2; }

# qemu-tests/lib.sh: temp dir $T with cleanup of every process by pid, the
# nginx origin with its access log, lazybd start/stop, boot helpers
. "$ROOT/qemu-tests/lib.sh"
# a private copy of the binary: a rebuild during the run must not change it
cp "$LAZYBD_SRC" "$T/lazybd"
LAZYBD=$T/lazybd
LAZYBD_INFO="$(readlink -f "$LAZYBD_SRC"), built $(date -u -r "$LAZYBD_SRC" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$LAZYBD_SRC" | cut -c1-12)"
HAVE_PROFILE=1
"$LAZYBD" profile --help >/dev/null 2>&1 || HAVE_PROFILE=0
START=$SECONDS

boot_image "$T/origin"
origin_start "$T/origin" >/dev/null
HTTP_PORT=${ORIGIN_URL##*:}
URL_DIRECT=$ORIGIN_URL/base.img
IMG_BYTES=$(stat -c %s "$BOOT_IMG")
BLOCK_BYTES=$(python3 -c '
import re, sys
m = re.fullmatch(r"(\d+)([kKmM]?)", sys.argv[1]); print(int(m.group(1)) << {"": 0, "k": 10, "m": 20}[m.group(2).lower()])' "$BLOCK_SIZE")

log "building the delay proxy"
rustc -O -o "$T/delay-proxy" "$BENCH/delay-proxy.rs" 2>"$T/delay-proxy.build.log" ||
  { cat "$T/delay-proxy.build.log" >&2; fail "rustc delay-proxy.rs failed"; }

http_rtt() { # mean time of 20 keep-alive 4 KiB range GETs (first one excluded), in ms
  local u=$1 args=() i
  for i in $(seq 0 20); do args+=(-r "$((i * 65536))-$((i * 65536 + 4095))" -o /dev/null "$u"); done
  curl -fsS -w '%{time_total}\n' "${args[@]}" | tail -n +2 | awk '{s += $1; n++} END {printf "%.3f", s / n * 1000}'
}

# servers: stop_pid, lz_stop, nbdkit_start, qsd_start
. "$BENCH/boot-servers.sh"

# ---------------------------------------------------------------- profile
PROFILE_INFO="n/a"
if has lazybd-profile; then
  if [[ $HAVE_PROFILE == 1 ]]; then
    log "recording a boot profile (direct origin, --record-profile 0, saved at SIGTERM)"
    lazybd_start "$URL_DIRECT" --cache-dir "$T/rec-cache" --control none --no-profile --record-profile 0 \
      "${LZ_BS[@]}"
    boot_vm "$LAZYBD_URI" "$BOOT_TIMEOUT"
    assert_booted
    lazybd_stop
    "$LAZYBD" profile show --cache-dir "$T/rec-cache" --image "$URL_DIRECT" >"$T/profile-show.txt" 2>&1 ||
      fail "lazybd profile show failed: $(tail -n 3 "$T/profile-show.txt")"
    "$LAZYBD" profile export --cache-dir "$T/rec-cache" --image "$URL_DIRECT" "$T/origin/base.img.lazybd-profile" \
      >"$T/profile-export.txt" 2>&1 || fail "lazybd profile export failed: $(cat "$T/profile-export.txt")"
    chmod 0644 "$T/origin/base.img.lazybd-profile"
    PROFILE_INFO="$(grep -iE 'total|ranges|bytes' "$T/profile-show.txt" | tail -n 2 | tr '\n' ' ' | sed 's/  */ /g; s/ $//'); file $(stat -c %s "$T/origin/base.img.lazybd-profile") bytes"
    log "profile published as base.img.lazybd-profile: $PROFILE_INFO"
  else
    log "lazybd has no 'profile' command: lazybd-profile is n/a"
  fi
fi

# ---------------------------------------------------------------- cases
ROWS=$T/rows.tsv
printf 'rtt\tcase\trep\tstatus\tboot_s\tinit_s\tboot_max_s\torigin_reqs\torigin_bytes\tdup_bytes\tserved\treadahead\tprofile\tnote\n' >"$ROWS"
FAILED=0
R_STATUS="" R_BOOT="" R_INIT="" R_MAX="" R_NOTE="" R_SERVED="" R_RA="" R_PROF=""
WARM_CACHE=""

boot_one() {  # DISK : boot_vm + R_*
  boot_vm "$1" "$BOOT_TIMEOUT"
  R_STATUS=$BOOT_STATUS R_BOOT=$BOOT_S R_INIT=$BOOT_INIT_S R_MAX=$BOOT_S
  [[ $BOOT_RC == 0 ]] || R_NOTE+="boot $BOOT_STATUS (serial: $(grep -a 'LAZYBD-BOOT' "$BOOT_LOG" | tail -n 1 | cut -c1-80)); "
}

run_case() {  # RTT CASE REP URL
  local rtt=$1 c=$2 rep=$3 url=$4 mark i
  R_STATUS="" R_BOOT="" R_INIT="" R_MAX="" R_NOTE="" R_SERVED="" R_RA="" R_PROF=""
  log "rtt ${rtt} ms, rep $rep: $c"
  mark=$(origin_mark)
  # shellcheck disable=SC2086
  case $c in
    local)
      boot_one "$BOOT_IMG" ;;
    lazybd-cold)
      WARM_CACHE=$T/cache/cold-$rtt-$rep
      lazybd_start "$url" --cache-dir "$WARM_CACHE" --control none --no-profile "${LZ_BS[@]}" $LAZYBD_ARGS
      boot_one "$LAZYBD_URI"; lz_stop ;;
    lazybd-warm)
      if [[ -z $WARM_CACHE ]]; then  # lazybd-cold not selected: warm a cache first (untimed)
        WARM_CACHE=$T/cache/warm-$rtt-$rep
        lazybd_start "$url" --cache-dir "$WARM_CACHE" --control none --no-profile "${LZ_BS[@]}" $LAZYBD_ARGS
        boot_vm "$LAZYBD_URI" "$BOOT_TIMEOUT"; lz_stop
        mark=$(origin_mark)
      fi
      lazybd_start "$url" --cache-dir "$WARM_CACHE" --control none --no-profile "${LZ_BS[@]}" $LAZYBD_ARGS
      boot_one "$LAZYBD_URI"; lz_stop
      rm -rf "$WARM_CACHE"; WARM_CACHE="" ;;
    lazybd-profile)
      if [[ $HAVE_PROFILE != 1 ]]; then R_STATUS=n/a; R_NOTE="lazybd has no profile command; "
      else
        lazybd_start "$url" --cache-dir "$T/cache/profile-$rtt-$rep" --control none "${LZ_BS[@]}" $LAZYBD_ARGS
        boot_one "$LAZYBD_URI"; lz_stop
        rm -rf "$T/cache/profile-$rtt-$rep"
        [[ ${R_PROF:-0} -gt 0 ]] || R_NOTE+="no profile replay (profile_bytes=${R_PROF:-?}); "
      fi ;;
    nbdkit-cache)
      nbdkit_start "$url"; boot_one "$SRV_URI"; stop_pid "$SRV_PID" ;;
    qsd)
      qsd_start "$url" "$QSD_READAHEAD"; boot_one "$SRV_URI"; stop_pid "$SRV_PID" ;;
    qsd-ra)
      qsd_start "$url" "$QSD_RA"; boot_one "$SRV_URI"; stop_pid "$SRV_PID" ;;
    lazybd-4vm)
      local port cfg=$T/cache/4vm-$rtt-$rep.toml uris=() pids=() times=() st=ok line
      port=$(free_port)
      mkdir -p "$T/cache"
      {
        printf '[server]\nlisten = ["127.0.0.1:%s"]\ncache_dir = "%s"\ncontrol = "none"\n' \
          "$port" "$T/cache/4vm-$rtt-$rep"
        [[ -z $LAZYBD_BLOCK_SIZE ]] || printf 'block_size = "%s"\n' "$LAZYBD_BLOCK_SIZE"
        for ((i = 1; i <= NVMS; i++)); do
          printf '\n[[export]]\nname = "vm%s"\nimage = "%s"\n' "$i" "$url"
          uris+=("nbd://127.0.0.1:$port/vm$i")
        done
      } >"$cfg"
      lazybd_spawn --config "$cfg" --no-profile $LAZYBD_ARGS
      lazybd_wait_ready "${uris[@]}"
      for ((i = 1; i <= NVMS; i++)); do
        BOOT_LOG=$T/boot-4vm-$rtt-$rep-$i.log BOOT_SHA=$BOOT_SHA BOOT_QUIET=1 \
          "$REPO/qemu-tests/boot.sh" "${uris[i - 1]}" "$BOOT_TIMEOUT" >"$T/4vm-$i.out" 2>&1 &
        pids+=("$!")
      done
      bg_track "${pids[@]}"
      for ((i = 1; i <= NVMS; i++)); do
        wait "${pids[i - 1]}" || st=fail
        line=$(grep '^BOOT ' "$T/4vm-$i.out" || true)
        times+=("$(grep -o ' marker_s=[^ ]*' <<<"$line" | cut -d= -f2)")
        [[ $line == *"status=ok"* ]] || R_NOTE+="vm$i: $(cut -c1-60 <<<"$line"); "
      done
      R_STATUS=$st
      R_BOOT=$(printf '%s\n' "${times[@]}" | python3 -c 'import sys, statistics as s; v=[float(x) for x in sys.stdin.read().split()]; print(f"{s.median(v):.3f}" if v else "")')
      R_MAX=$(printf '%s\n' "${times[@]}" | python3 -c 'import sys; v=[float(x) for x in sys.stdin.read().split()]; print(f"{max(v):.3f}" if v else "")')
      R_NOTE+="each VM: ${times[*]} s; "
      lz_stop
      rm -rf "$T/cache/4vm-$rtt-$rep" ;;
  esac
  local reqs bytes uniq dup n
  reqs=$(origin_all_requests_since "$mark")
  bytes=$(origin_bytes_since "$mark")
  read -r uniq dup n < <(origin_ranges_since "$mark" /base.img)
  [[ $R_STATUS == ok || $R_STATUS == n/a ]] || FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rtt" "$c" "$rep" "${R_STATUS:-fail}" \
    "$R_BOOT" "$R_INIT" "$R_MAX" "$reqs" "$bytes" "$dup" "$R_SERVED" "$R_RA" "$R_PROF" "${R_NOTE%; }" >>"$ROWS"
  log "  -> ${R_STATUS:-fail} boot ${R_BOOT:-?} s; origin $reqs requests, $bytes bytes ($dup fetched twice)${R_NOTE:+; ${R_NOTE%; }}"
}

RTT_MEASURED=""
for rtt in $RTTS; do
  pport=$(free_port)
  delay=$(awk -v r="$rtt" 'BEGIN{print r / 2}')
  "$T/delay-proxy" --listen "127.0.0.1:$pport" --upstream "127.0.0.1:$HTTP_PORT" \
    --delay-ms "$delay" --rate-mbit "$RATE_MBIT" --duration-s 14400 2>"$T/delay-proxy-$rtt.log" &
  ppid=$!
  bg_track "$ppid"
  url=http://127.0.0.1:$pport/base.img
  for _ in $(seq 50); do curl -fsS -o /dev/null -r 0-0 "$url" 2>/dev/null && break; sleep 0.1; done
  m=$(http_rtt "$url")
  RTT_MEASURED+="${RTT_MEASURED:+, }$rtt ms: $m ms"
  log "origin at ${rtt} ms RTT, ${RATE_MBIT} Mbit/s: $url (4 KiB ranged GET: $m ms; direct $(http_rtt "$URL_DIRECT") ms)"
  for ((rep = 1; rep <= REPEAT; rep++)); do
    WARM_CACHE=""
    for c in $CASES; do
      run_case "$rtt" "$c" "$rep" "$url"
    done
  done
  kill -TERM "$ppid" 2>/dev/null || true
  wait "$ppid" 2>/dev/null || true
done
ELAPSED=$((SECONDS - START))

# ---------------------------------------------------------------- report
META=$T/meta.tsv
{
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  meta_host
  printf 'qemu\t%s\n' "$(qemu-system-x86_64 --version | head -n 1 | sed 's/QEMU emulator version //')"
  printf 'nbdkit\t%s\n' "$(nbdkit --version 2>/dev/null | awk '{print $2}')"
  printf 'nginx\t%s\n' "$(nginx -v 2>&1 | sed 's/.*\///')"
  printf 'lazybd\tbinary %s\n' "$LAZYBD_INFO"
  printf 'image\t%s MiB raw (%s MiB allocated), guest kernel %s, data partition %s MiB, initrd %s KiB\n' \
    "$((IMG_BYTES >> 20))" "$(( $(stat -c %b "$BOOT_IMG") * 512 >> 20 ))" \
    "$(sed -n 's/^kernel=//p' "$BOOT_IMG.meta")" "$(sed -n 's/^data_mib=//p' "$BOOT_IMG.meta")" \
    "$(sed -n 's/^initrd_kib=//p' "$BOOT_IMG.meta")"
  printf 'rate_mbit\t%s\n' "$RATE_MBIT"
  printf 'rtt_measured\t%s\n' "$RTT_MEASURED"
  printf 'repeat\t%s\n' "$REPEAT"
  printf 'block_size\t%s\n' "$BLOCK_SIZE"
  printf 'lazybd_block_size\t%s\n' "${LAZYBD_BLOCK_SIZE:-4k (its default)}"
  printf 'qsd_readahead\t%s\n' "$QSD_READAHEAD"
  printf 'qsd_ra\t%s\n' "$QSD_RA"
  printf 'nvms\t%s\n' "$NVMS"
  printf 'profile\t%s\n' "$PROFILE_INFO"
  printf 'lazybd_args\t%s\n' "$LAZYBD_ARGS"
  printf 'elapsed_s\t%s\n' "$ELAPSED"
  printf 'quick\t%s\n' "$QUICK"
} >"$META"

SECTION=$T/section.md
python3 - "$ROWS" "$META" "$SECTION" "$BENCH" <<'PY'
import statistics, sys
rows_p, meta_p, out_p, bench = sys.argv[1:]
sys.path.insert(0, bench)
from resultsmd import read_meta, read_rows, rounds_cell
meta = read_meta(meta_p)
rows = read_rows(rows_p)
rtts = []
for r in rows:
    if r["rtt"] not in rtts: rtts.append(r["rtt"])
ORDER = ["local", "lazybd-warm", "lazybd-cold", "lazybd-profile", "nbdkit-cache", "qsd", "qsd-ra", "lazybd-4vm"]
LABEL = {
    "local": "local file (qemu opens the raw file)",
    "lazybd-cold": "lazybd cold, no profile",
    "lazybd-profile": "lazybd cold, with profile",
    "lazybd-warm": "lazybd warm (restarted, same cache)",
    "nbdkit-cache": "nbdkit curl + cache filter",
    "qsd": f"qemu-storage-daemon http (readahead={meta.get('qsd_readahead')}) + qcow2 + copy-on-read",
    "qsd-ra": f"qemu-storage-daemon, http readahead={int(meta.get('qsd_ra', 0)) >> 10} KiB",
    "lazybd-4vm": f"lazybd cold, {meta.get('nvms', '4')} VMs at once (median VM)",
}
def med(v): return statistics.median(v) if v else None
def fnum(x, nd=2): return "—" if x is None else f"{x:.{nd}f}"

stats = {}  # (rtt, case) -> dict
for rtt in rtts:
    for c in ORDER:
        rs = [r for r in rows if r["rtt"] == rtt and r["case"] == c]
        if not rs: continue
        ok = [r for r in rs if r["status"] == "ok"]
        d = {"n": len(rs), "ok": len(ok), "na": all(r["status"] == "n/a" for r in rs),
             "boot": med([float(r["boot_s"]) for r in ok if r["boot_s"]]),
             "runs": [r["boot_s"] or r["status"] for r in rs],
             "max": med([float(r["boot_max_s"]) for r in ok if r["boot_max_s"]]),
             "reqs": med([int(r["origin_reqs"]) for r in ok]) if ok else None,
             "bytes": med([int(r["origin_bytes"]) for r in ok]) if ok else None,
             "dup": max([int(r["dup_bytes"] or 0) for r in ok]) if ok else None,
             "prof": med([int(r["profile"]) for r in ok if r["profile"]]),
             "ra": med([int(r["readahead"]) for r in ok if r["readahead"]]),
             "notes": sorted({r["note"] for r in rs if r["note"] and not r["note"].startswith("each VM")})}
        if c == "lazybd-4vm":
            d["vm_times"] = [r["note"] for r in rs]
        stats[(rtt, c)] = d

def per_rep(rtt, c, how):
    # {rep: boot - local} or {rep: boot / local}: each repetition against that
    # repetition's local-file boot (load on the machine drifts between
    # repetitions more than within one)
    loc = {r["rep"]: float(r["boot_s"]) for r in rows
           if r["rtt"] == rtt and r["case"] == "local" and r["status"] == "ok" and r["boot_s"]}
    return {r["rep"]: (float(r["boot_s"]) - loc[r["rep"]] if how == "diff" else float(r["boot_s"]) / loc[r["rep"]])
            for r in rows if r["rtt"] == rtt and r["case"] == c and r["status"] == "ok" and r["boot_s"] and r["rep"] in loc}

def reps_sorted(d): return [d[k] for k in sorted(d, key=int)]
def extra(rtt, c): return med(reps_sorted(per_rep(rtt, c, "diff")))
def rel(rtt, c): return med(reps_sorted(per_rep(rtt, c, "ratio")))
NREP = int(meta.get("repeat", "1"))

def ratio_reps(rtt, a, b):
    # per repetition: a's extra ÷ b's extra, for the repetitions where b's extra > 0
    ea, eb = per_rep(rtt, a, "diff"), per_rep(rtt, b, "diff")
    both = [k for k in sorted(ea, key=int) if k in eb]
    return [ea[k] / eb[k] for k in both if eb[k] > 0], len(both)

def ratio_cell(rtt, a, b):
    v, n = ratio_reps(rtt, a, b)
    xa, xb = extra(rtt, a), extra(rtt, b)
    if not n: return "—", None
    cell = rounds_cell(v, 2, "×") if v else "—"
    if len(v) < n: cell += f"; the divisor was ≤ 0 s (within the noise of the local boot) in {n - len(v)} of {n} repetitions"
    return cell + f"; median extras {fnum(xa)} / {fnum(xb)} s", med(v)

def ratio(x, y):
    if x is None or y is None or y <= 0: return None
    return x / y

def bytes_reps(rtt, a, b):
    # per repetition: a's origin bytes ÷ b's
    def by(c): return {r["rep"]: int(r["origin_bytes"]) for r in rows
                       if r["rtt"] == rtt and r["case"] == c and r["status"] == "ok" and r["origin_bytes"]}
    ba, bb = by(a), by(b)
    return [ba[k] / bb[k] for k in sorted(ba, key=int) if k in bb and bb[k] > 0]

o = []
o.append("## Boot (bench/boot.sh)\n")
o.append(f"{meta['repeat']} repetition(s) of every case, interleaved (each repetition boots every case once, the local file first); "
         f"{meta['elapsed_s']} s.\n")
o.append("Time from starting `qemu-system-x86_64` (TCG; KVM is unusable on these machines) to the guest's "
         "`LAZYBD-BOOT-OK` line on its serial console. The guest is the image of `qemu-tests/boot-image.sh`: "
         "SeaBIOS reads syslinux, the kernel and the initramfs through the virtio disk, then `/init` loads "
         "virtio_blk, reads its data partition and checks its sha256. Every server is started and answering "
         "before qemu starts. *Extra* = boot − local-file boot, taken per repetition (each repetition boots the "
         "local file first) and then the median: the part of the boot the disk costs (at low RTT the boot is "
         "TCG CPU time); *× local* is the same per-repetition ratio (median, then every repetition's). Origin requests and bytes come from nginx's access log "
         "from server start to stop (open probe and profile download included); *fetched twice* is image "
         "bytes covered by more than one ranged GET.\n")
o.append("Conditions:\n")
o.append(f"- machine: {meta['machine']}; load average {meta['load']} (the 2 cores are shared by qemu, the server, nginx and the proxy)")
o.append(f"- qemu {meta['qemu']}, nbdkit {meta['nbdkit']}, nginx {meta['nginx']}")
o.append(f"- lazybd {meta['lazybd']}")
o.append(f"- image: {meta['image']}")
o.append(f"- origin: nginx on loopback behind `bench/delay-proxy` (half the RTT each way, {meta['rate_mbit']} Mbit/s per direction shared by all connections); measured 4 KiB ranged GET: {meta['rtt_measured']}")
o.append(f"- {meta['repeat']} repetitions per case, interleaved; medians reported; lazybd block {meta.get('lazybd_block_size', meta['block_size'])} (`--block-size`), peers' cache block {meta['block_size']} (nbdkit `cache-min-block-size`, qcow2 `cluster_size`), qsd http `readahead={meta['qsd_readahead']}` (as bench/run.sh) and `readahead={meta['qsd_ra']}` (qsd-ra)")
o.append(f"- profile for `lazybd cold, with profile`: recorded once during a boot (`serve --record-profile 0`, saved at SIGTERM), published beside the image with `lazybd profile export` as `base.img.lazybd-profile`; each run starts with an empty cache and fetches it at open. {meta['profile']}")
if meta.get("lazybd_args"): o.append(f"- extra lazybd options: `{meta['lazybd_args']}`")
o.append("")

for rtt in rtts:
    o.append(f"### RTT {rtt} ms\n")
    o.append("| case | boot s (median) | extra s | × local | runs s | origin requests | origin MiB | fetched twice | notes |")
    o.append("|---|---|---|---|---|---|---|---|---|")
    for c in ORDER:
        d = stats.get((rtt, c))
        if not d: continue
        if d["na"]:
            o.append(f"| {LABEL[c]} | n/a | | | | | | | {'; '.join(d['notes'])} |"); continue
        notes = list(d["notes"])
        if c == "lazybd-profile" and d["prof"] is not None: notes.append(f"profile replay fetched {d['prof'] / 2**20:.1f} MiB")
        if c == "lazybd-4vm":
            if d["max"] is not None: notes.append(f"last VM at {d['max']:.2f} s")
            v = bytes_reps(rtt, "lazybd-4vm", "lazybd-cold")
            if v: notes.append(f"origin bytes {rounds_cell(v, 2, '×', rounds=NREP)} one cold boot")
        if d["ok"] < d["n"]: notes.append(f"{d['n'] - d['ok']} of {d['n']} runs FAILED")
        ex = extra(rtt, c) if c != "local" else None
        mib = None if d["bytes"] is None else d["bytes"] / 2**20
        rl = rounds_cell(reps_sorted(per_rep(rtt, c, "ratio")), 2, "×", rounds=NREP) if c != "local" else "—"
        o.append(f"| {LABEL[c]} | {fnum(d['boot'])} | {'—' if c == 'local' else fnum(ex)} | "
                 f"{rl} | {', '.join(d['runs'])} | "
                 f"{'—' if d['reqs'] is None else int(d['reqs'])} | {fnum(mib, 1)} | "
                 f"{'—' if d['dup'] is None else d['dup']} | {'; '.join(notes)} |")
    o.append("")
    rat = []
    for q in ("qsd", "qsd-ra"):
        if not stats.get((rtt, q)): continue
        rat.append((f"lazybd cold extra ÷ {q} extra", "lazybd-cold", q))
        rat.append((f"lazybd with-profile extra ÷ {q} extra", "lazybd-profile", q))
    rat += [
        ("lazybd with-profile extra ÷ lazybd without-profile extra", "lazybd-profile", "lazybd-cold"),
        ("lazybd with-profile total ÷ local total", "lazybd-profile", "rel"),
        ("lazybd cold extra ÷ nbdkit curl+cache extra", "lazybd-cold", "nbdkit-cache"),
        ("lazybd warm total ÷ local total", "lazybd-warm", "rel"),
    ]
    o.append("| ratio | median of the repetitions' ratios (each repetition's) |")
    o.append("|---|---|")
    for name, a, b in rat:
        if not stats.get((rtt, a)) or (b != "rel" and not stats.get((rtt, b))):
            continue
        if b == "rel":
            v = rounds_cell(reps_sorted(per_rep(rtt, a, "ratio")), 2, "×", rounds=NREP)
        else:
            v = ratio_cell(rtt, a, b)[0]
        o.append(f"| {name} | {v} |")
    o.append("")

goal_rtt = "10" if "10" in rtts else (rtts[0] if rtts else None)
results = []
if goal_rtt:
    ex = {c: extra(goal_rtt, c) for c in ORDER}
    loc = stats.get((goal_rtt, "local"), {}).get("boot")
    prof_total = stats.get((goal_rtt, "lazybd-profile"), {}).get("boot")
    # the faster qemu-storage-daemon configuration is the reference
    qs = [(ex[q], q) for q in ("qsd", "qsd-ra") if ex[q] is not None]
    qx, qn = min(qs) if qs else (None, None)
    def g(name, target, a, k, b, what=""):
        # goal: the median of the per-repetition ratios a ÷ b is at most k
        if b == "rel":
            v = reps_sorted(per_rep(goal_rtt, a, "ratio"))
            m = med(v)
            shown = rounds_cell(v, 2, "×", rounds=NREP) + f" per-repetition ratios{what}"
        elif b is None or not stats.get((goal_rtt, a)) or not stats.get((goal_rtt, b)):
            results.append((name, target, "not measured", "—")); return
        else:
            shown, m = ratio_cell(goal_rtt, a, b)
            shown += f" ({b})" if b.startswith("qsd") else ""
        if m is None:
            results.append((name, target, shown if shown != "—" else "not measured", "—")); return
        results.append((name, target, shown, "PASS" if m <= k else "MISS"))
    g("cold boot without profile: extra ÷ qsd's extra", "≤ 1.0×", "lazybd-cold", 1.0, qn)
    g("cold boot with profile: extra ÷ qsd's extra", "≤ 0.5×", "lazybd-profile", 0.5, qn)
    g("cold boot with profile: extra ÷ lazybd's extra without profile", "≤ 0.5×", "lazybd-profile", 0.5, "lazybd-cold")
    g("cold boot with profile: total ÷ local-file boot", "≤ 1.2×", "lazybd-profile", 1.2, "rel",
      f"; medians {fnum(prof_total)} vs {fnum(loc)} s")
    d4, d1 = stats.get((goal_rtt, "lazybd-4vm")), stats.get((goal_rtt, "lazybd-cold"))
    name4 = f"{meta.get('nvms', '4')} VMs at once through one lazybd: each block fetched once"
    target4 = "0 bytes twice, origin bytes ≤ 1.1× one boot"
    if d4 and not d4["na"] and d4["dup"] is not None:
        v = bytes_reps(goal_rtt, "lazybd-4vm", "lazybd-cold")
        r = med(v)
        ok = d4["dup"] == 0 and d4["ok"] == d4["n"] and (r is None or r <= 1.1)
        results.append((name4, target4,
          f"{d4['dup']} bytes twice; {d4['bytes'] / 2**20:.1f} MiB"
          + ("" if r is None else f" = {rounds_cell(v, 2, '×', rounds=NREP)} one cold boot ({d1['bytes'] / 2**20:.1f} MiB)"),
          "PASS" if ok else "MISS"))
    else:
        results.append((name4, target4, "not measured", "—"))
    o.append(f"### Goals (issue 4, at {goal_rtt} ms RTT)\n")
    o.append("Every ratio is the median of the per-repetition ratios (each repetition's in parentheses); extras "
             "are differences of boots that vary by a few tenths of a second with the load on the machine (see the "
             "runs column; lazybd warm's extra is the noise floor of a boot through NBD); the qsd reference is the "
             "faster (smaller median extra) of the two qemu-storage-daemon configurations.\n")
    o.append("| goal | target | measured | |")
    o.append("|---|---|---|---|")
    for name, target, shown, verdict in results:
        o.append(f"| {name} | {target} | {shown} | {verdict} |")
    o.append("")
o.append("Raw rows (every run) are in the bench's temp dir (`KEEP_TMP=1`), `rows.tsv`.\n")
open(out_p, "w").write("\n".join(o) + "\n")
for name, target, shown, verdict in results:
    print(f"GOAL {verdict:4} {name}: {shown} (target {target})")
PY
cp "$ROWS" "$T/rows-final.tsv"
if [[ -n ${ROWS_OUT:-} ]]; then cp "$ROWS" "$ROWS_OUT"; cp "$META" "$ROWS_OUT.meta"; fi
echo
write_section - "$SECTION"
if [[ -n $OUT ]]; then
  write_section "$OUT" "$SECTION"
  log "section written to $OUT"
fi
column -t -s $'\t' "$ROWS" >&2 || cat "$ROWS" >&2
if ((FAILED)); then log "some boots FAILED (see the table)"; exit 1; fi
exit 0
