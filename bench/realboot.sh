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
# Every server is started and answering (nbdinfo) before qemu starts; origin
# requests and bytes are counted from nginx's access log from server start to
# server stop (open probe and profile download included). Guest bytes are
# what the guest read from its disk, as lazybd counts it (bytes_served of the
# round's lazybd-cold boot; the peers' guests read the same image the same
# way): origin bytes ÷ guest bytes says how much more than the guest needed a
# server fetched.
#
# Report: a "Real distribution boot (bench/realboot.sh)" section in OUT
# (replacing an earlier one): conditions and a table (median boot, extra over
# local per round, origin MiB, origin ÷ guest bytes, bytes fetched twice).
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
# About 30 s per boot on 2 cores: ~9 min at ROUNDS=3, plus the image build
# on the first run (qemu-tests/debian-image.sh; needs root).
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
CASES=${CASES:-local lazybd-cold lazybd-profile qsd-ra nbdkit-cache}
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
  case $c in local|lazybd-cold|lazybd-profile|qsd-ra|nbdkit-cache) ;;
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
LOAD_START=$STAMP_LOAD
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

# ---------------------------------------------------------------- rounds
ROWS=$T/rows.tsv
printf 'round\tcase\tstatus\tboot_s\tinit_s\torigin_reqs\torigin_bytes\tdup_bytes\tserved\tprofile\tnote\n' >"$ROWS"
FAILED=0

run_case() {  # ROUND CASE URL
  local rd=$1 c=$2 url=$3 mark reqs bytes uniq dup n
  R_STATUS="" R_BOOT="" R_INIT="" R_NOTE="" R_SERVED="" R_PROF=""
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
  esac
  R_STATUS=$BOOT_STATUS R_BOOT=$BOOT_S R_INIT=$BOOT_INIT_S
  [[ $BOOT_RC == 0 ]] || { R_NOTE+="boot $BOOT_STATUS (serial: $(grep -a 'LAZYBD-DEBIAN' "$BOOT_LOG" | tail -n 1 | cut -c1-80)); "; FAILED=1; }
  [[ $BOOT_RC != 0 || $DEBIAN_LINE == *"failed=none"* ]] || R_NOTE+="guest: failed units ${DEBIAN_LINE##*failed=}; "
  reqs=$(origin_all_requests_since "$mark")
  bytes=$(origin_bytes_since "$mark")
  read -r uniq dup n < <(origin_ranges_since "$mark" /debian.img)
  [[ $c == local ]] && reqs="" bytes="" dup=""
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rd" "$c" "${R_STATUS:-fail}" "$R_BOOT" "$R_INIT" \
    "$reqs" "$bytes" "$dup" "$R_SERVED" "$R_PROF" "${R_NOTE%; }" >>"$ROWS"
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
  printf 'machine\t%s cores (%s), %s, kernel %s\n' "$(nproc)" \
    "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    "$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)" "$(uname -r)"
  printf 'load\t%s at start, %s at end\n' "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
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
} >"$META"

SECTION=$T/section.md
python3 - "$ROWS" "$META" "$SECTION" "$BENCH" <<'PY'
import csv, statistics, sys
rows_p, meta_p, out_p, bench = sys.argv[1:]
sys.path.insert(0, bench)
from resultsmd import rounds_cell
meta = dict(l.rstrip("\n").split("\t", 1) for l in open(meta_p) if "\t" in l)
rows = list(csv.DictReader(open(rows_p), delimiter="\t"))
NR = int(meta["rounds"])
ORDER = ["local", "lazybd-cold", "lazybd-profile", "qsd-ra", "nbdkit-cache"]
LABEL = {
    "local": "local file (qemu opens the raw file)",
    "lazybd-cold": "lazybd cold, no profile",
    "lazybd-profile": "lazybd cold, with profile",
    "qsd-ra": f"qemu-storage-daemon http (readahead={int(meta['qsd_ra']) >> 10} KiB) + qcow2 + copy-on-read",
    "nbdkit-cache": "nbdkit curl + cache filter",
}
def med(v): return statistics.median(v) if v else None
def fnum(x, nd=2): return "—" if x is None else f"{x:.{nd}f}"
ok = lambda r: r["status"] == "ok" and r["boot_s"]
def by_round(c, key, conv=float):
    return {r["round"]: conv(r[key]) for r in rows if r["case"] == c and ok(r) and r[key]}
loc = by_round("local", "boot_s")
guest = by_round("lazybd-cold", "served", int)
o = [f"## Real distribution boot (bench/realboot.sh)\n"]
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
         "same round's cold boot); *fetched twice* is image bytes covered by more than one ranged GET.\n")
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
o.append("| case | boot s (median) | extra s | runs s | origin requests | origin MiB | origin ÷ guest bytes | fetched twice | notes |")
o.append("|---|---|---|---|---|---|---|---|---|")
for c in ORDER:
    rs = [r for r in rows if r["case"] == c]
    if not rs: continue
    good = [r for r in rs if ok(r)]
    boot = med([float(r["boot_s"]) for r in good])
    runs = ", ".join(r["boot_s"] or r["status"] for r in sorted(rs, key=lambda r: int(r["round"])))
    b = by_round(c, "boot_s")
    ex = [b[k] - loc[k] for k in sorted(b, key=int) if k in loc]
    notes = sorted({r["note"] for r in rs if r["note"]})
    if len(good) < len(rs): notes.append(f"{len(rs) - len(good)} of {len(rs)} runs FAILED")
    if c == "local":
        o.append(f"| {LABEL[c]} | {fnum(boot)} | — | {runs} | — | — | — | — | {'; '.join(notes)} |")
        continue
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
             f"{'—' if dup is None else dup} | {'; '.join(notes)} |")
g = med(list(guest.values()))
o.append("")
if g: o.append(f"Guest bytes (median of the rounds): {g / 2**20:.1f} MiB.\n")
o.append("Raw rows (every run) are in the bench's temp dir (`KEEP_TMP=1`), `rows.tsv`.\n")
open(out_p, "w").write("\n".join(o) + "\n")
PY
echo
write_section - "$SECTION"
if [[ -n $OUT ]]; then
  write_section "$OUT" "$SECTION"
  log "section written to $OUT"
fi
column -t -s $'\t' "$ROWS" >&2 || cat "$ROWS" >&2
if ((FAILED)); then log "some boots FAILED (see the table)"; exit 1; fi
exit 0
