#!/usr/bin/env bash
# bench/fleet.sh — many VMs on one host: N writable exports of one template,
# one fio client each, against nbdkit's cow filter with one process per VM.
#
# Every VM's disk is a writable export of the same IMG_MIB image (random
# bytes, nginx on loopback): lazybd serves all N from one process
# (`serve --config`, N `[[export]]` entries with `writable = true` and an
# overlay dir each, one shared cache warmed by one read of the image before
# the rounds); the peer is N `nbdkit --filter=cow file LOCAL_COPY` processes
# (the way a host would run nbdkit per disk; its base is a local copy, so it
# never waits for a network). On a fresh set of servers, all N fio jobs
# (libnbd `nbd` ioengine, one connection each) start together: 4 KiB random
# mixed reads and writes (RWMIX % reads), QD QD, over the first RW_MIB MiB of
# their disk, for RUNTIME s (RAMP s of ramp time first).
#
# Measured per run: the aggregate IOPS (reads + writes of every client) and
# each client's IOPS; fairness = the slowest client ÷ the mean (goal ≥ 0.5).
# ROUNDS rounds per N, the order of the two servers reversed every other
# round; the lazybd ÷ nbdkit ratio pairs the runs of one round (goal ≥ 1.0×).
#
# Report: a "Many VMs on one host (bench/fleet.sh)" section in OUT.
#
# Env: EXPORTS ("32 64")  ROUNDS (3)  RUNTIME (10 s)  RAMP (2 s)
#      IMG_MIB (512)  RW_MIB (64)  QD (4)  RWMIX (70)
#      BLOCK_SIZE (64k: nbdkit cow-block-size; lazybd: its default block)
#      OUT (bench/RESULTS.md; "" = stdout only)  QUICK=1: EXPORTS=4, ROUNDS=1,
#      RUNTIME=3, IMG_MIB=64, RW_MIB=16, OUT="" unless set
#      LAZYBD (target/release/lazybd)  KEEP_TMP=1 (keep the temp dir)
# About 4 min with the defaults on 2 cores.
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  EXPORTS=${EXPORTS:-4}; ROUNDS=${ROUNDS:-1}; RUNTIME=${RUNTIME:-3}; IMG_MIB=${IMG_MIB:-64}
  RW_MIB=${RW_MIB:-16}; OUT=${OUT-}
fi
EXPORTS=${EXPORTS:-32 64}
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
IMG_MIB=${IMG_MIB:-512}
RW_MIB=${RW_MIB:-64}
QD=${QD:-4}
RWMIX=${RWMIX:-70}
BLOCK_SIZE=${BLOCK_SIZE:-64k}
OUT=${OUT-$BENCH/RESULTS.md}
LAZYBD_SRC=${LAZYBD:-$ROOT/target/release/lazybd}
((RW_MIB <= IMG_MIB)) || RW_MIB=$IMG_MIB

tools_ok() {
  local t
  for t in fio nbdkit nbdinfo nbdcopy nginx curl python3; do command -v "$t" >/dev/null 2>&1 || return 1; done
  fio --enghelp=nbd >/dev/null 2>&1 && nbdkit --filter=cow file --version >/dev/null 2>&1
}
if ! tools_ok; then
  echo "bench/fleet.sh: tools missing: running scripts/install-deps.sh" >&2
  "$ROOT/scripts/install-deps.sh"
  tools_ok || { echo "bench/fleet.sh: tools still missing" >&2; exit 2; }
fi
[[ -x $LAZYBD_SRC ]] || { echo "bench/fleet.sh: no lazybd binary at $LAZYBD_SRC (cargo build --release)" >&2; exit 2; }

# qemu-tests/lib.sh: temp dir $T (removed at exit with every process it
# tracks), the nginx origin, lazybd start/stop, free_port
. "$ROOT/qemu-tests/lib.sh"
cp "$LAZYBD_SRC" "$T/lazybd"   # a rebuild during the run must not change it
LAZYBD=$T/lazybd
LAZYBD_INFO="$(readlink -f "$LAZYBD_SRC"), built $(date -u -r "$LAZYBD_SRC" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$LAZYBD_SRC" | cut -c1-12)"
START=$SECONDS
RW_BYTES=$((RW_MIB * 1048576))

log "making a $IMG_MIB MiB random image"
mkdir -p "$T/origin"
head -c "$((IMG_MIB * 1048576))" /dev/urandom >"$T/origin/disk.img"
cp "$T/origin/disk.img" "$T/local.img"
origin_start "$T/origin" >/dev/null
URL=$ORIGIN_URL/disk.img

# The shared cache, warmed once: the rounds measure serving, not fetching.
log "warming lazybd's cache with one read of the image"
lazybd_start "$URL" --cache-dir "$T/cache" --control none --no-profile
nbdcopy "$LAZYBD_URI" null: || fail "nbdcopy of the warm-up failed"
lazybd_stop

# fio_jobs FILE URI... : one job per URI, all started together
fio_jobs() {
  local f=$1 i=0 u; shift
  {
    printf '[global]\nioengine=nbd\nthread=1\nrw=randrw\nrwmixread=%s\nbs=4k\niodepth=%s\nsize=%s\n' \
      "$RWMIX" "$QD" "$RW_BYTES"
    printf 'time_based=1\nruntime=%s\nramp_time=%s\nrandrepeat=0\n' "$RUNTIME" "$RAMP"
    for u in "$@"; do printf '\n[vm%d]\nuri=%s\n' "$i" "$u"; i=$((i + 1)); done
  } >"$f"
}

ROWS=$T/rows.tsv
printf 'round\tserver\tn\tstatus\tclients_iops\tnote\n' >"$ROWS"
FAILED=0
# run_fio LABEL ROUND SERVER N URI... : the jobs, one row of per-client IOPS
run_fio() {
  local label=$1 rd=$2 srv=$3 n=$4 d=$T/runs/$1 rc=0; shift 4
  mkdir -p "$d"
  fio_jobs "$d/jobs.fio" "$@"
  timeout -k 5 "$((RUNTIME + RAMP + 120))" fio --output-format=json --output="$d/fio.json" "$d/jobs.fio" \
    >"$d/fio.out" 2>&1 || rc=$?
  python3 - "$d/fio.json" "$rd" "$srv" "$n" "$rc" >>"$ROWS" <<'PY' || { FAILED=1; printf '%s\t%s\t%s\tfail\t\tunreadable fio output\n' "$rd" "$srv" "$n" >>"$ROWS"; }
import json, sys
js, rd, srv, n, rc = sys.argv[1:]
try:
    text = open(js).read()
    # the nbd ioengine prints "fio: connected to NBD server" into the output
    jobs = json.loads(text[text.index("{"):])["jobs"]
except (OSError, ValueError):
    jobs = []
iops = [j["read"]["iops"] + j["write"]["iops"] for j in jobs]
errs = [j.get("error", 0) for j in jobs]
ok = rc == "0" and len(jobs) == int(n) and not any(errs) and all(x > 0 for x in iops)
note = "" if ok else f"fio rc={rc}, {len(jobs)} of {n} jobs, errors {sorted(set(errs))}"
print("\t".join([rd, srv, n, "ok" if ok else "fail", ",".join(f"{x:.1f}" for x in iops), note]))
PY
  [[ $(tail -n 1 "$ROWS" | cut -f4) == ok ]] || { FAILED=1; log "  $label: FAILED ($(tail -c 300 "$d/fio.out"))"; }
}

# lazybd: one process, N writable exports, each its own overlay
run_lazybd() {  # ROUND N
  local rd=$1 n=$2 label=lazybd-$2.r$1 cfg port i uris=()
  cfg=$T/runs/$label.toml; mkdir -p "$T/runs"
  port=$(free_port)
  {
    printf '[server]\nlisten = ["127.0.0.1:%s"]\ncache_dir = "%s"\ncontrol = "none"\n' "$port" "$T/cache"
    printf '\n[boot]\nprofile = false\n'
    for ((i = 0; i < n; i++)); do
      printf '\n[[export]]\nname = "vm%d"\nimage = "%s"\nwritable = true\noverlay_dir = "%s"\n' \
        "$i" "$URL" "$T/overlay/$label/vm$i"
      uris+=("nbd://127.0.0.1:$port/vm$i")
    done
  } >"$cfg"
  LAZYBD_CMD="$LAZYBD serve --config FILE   # [server] listen, cache_dir (warm), control=\"none\"; [boot] profile=false; $n x [[export]] name=\"vmI\" image=URL writable=true overlay_dir=DIR/vmI"
  log "round $rd: lazybd, $n writable exports"
  "$LAZYBD" serve --config "$cfg" >"$T/runs/$label.log" 2>&1 &
  local pid=$!
  bg_track "$pid"
  for i in "${uris[@]}"; do
    local k
    for ((k = 0; k < 300; k++)); do nbdinfo --size "$i" >/dev/null 2>&1 && break; sleep 0.1; done
  done
  run_fio "$label" "$rd" lazybd "$n" "${uris[@]}"
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || FAILED=1
  grep -a 'summary:' "$T/runs/$label.log" | tail -n 1 >"$T/runs/$label.summary" || true
  rm -rf "$T/overlay/$label"
}

# nbdkit: one process per VM, cow filter over the local copy
run_nbdkit() {  # ROUND N
  local rd=$1 n=$2 label=nbdkit-$2.r$1 i port d uris=() pids=()
  for ((i = 0; i < n; i++)); do
    d=$T/nbdkit/$label/vm$i; mkdir -p "$d/tmp"; port=$(free_port)
    TMPDIR=$d/tmp nbdkit -P "$d/pid" --log=stderr -e disk -i 127.0.0.1 -p "$port" \
      --filter=cow file "$T/local.img" cow-block-size="$BLOCK_SIZE" >"$d/log" 2>&1 ||
      { FAILED=1; log "nbdkit $i did not start: $(tail -n 2 "$d/log")"; }
    uris+=("nbd://127.0.0.1:$port/disk")
  done
  NBDKIT_CMD="TMPDIR=DIR nbdkit -P PIDFILE --log=stderr -e disk -i 127.0.0.1 -p PORT --filter=cow file LOCAL_COPY cow-block-size=$BLOCK_SIZE   # one per VM"
  for ((i = 0; i < n; i++)); do
    d=$T/nbdkit/$label/vm$i
    local k
    for ((k = 0; k < 50; k++)); do [[ -s $d/pid ]] && break; sleep 0.1; done
    pids+=("$(cat "$d/pid" 2>/dev/null || true)")
    bg_track "${pids[-1]}"
  done
  log "round $rd: nbdkit cow, $n processes"
  run_fio "$label" "$rd" nbdkit "$n" "${uris[@]}"
  for i in "${pids[@]}"; do [[ -z $i ]] || kill -TERM "$i" 2>/dev/null || true; done
  for i in "${pids[@]}"; do
    local k
    for ((k = 0; k < 50; k++)); do kill -0 "$i" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$T/nbdkit/$label"
}

for n in $EXPORTS; do
  for ((rd = 1; rd <= ROUNDS; rd++)); do
    if ((rd % 2)); then run_lazybd "$rd" "$n"; run_nbdkit "$rd" "$n"
    else run_nbdkit "$rd" "$n"; run_lazybd "$rd" "$n"; fi
  done
done
ELAPSED=$((SECONDS - START))

META=$T/meta.tsv
{
  meta_host
  printf 'versions\tfio %s, nbdkit %s, libnbd %s, nginx %s\n' "$(fio --version | sed 's/^fio-//')" \
    "$(nbdkit --version | awk '{print $2}')" "$(nbdinfo --version 2>/dev/null | awk 'NR==1 {print $2}')" \
    "$(nginx -v 2>&1 | sed 's/.*\///')"
  printf 'lazybd\tbinary %s\n' "$LAZYBD_INFO"
  printf 'rounds\t%s\nruntime\t%s\nramp\t%s\nimg_mib\t%s\nrw_mib\t%s\nqd\t%s\nrwmix\t%s\nblock_size\t%s\n' \
    "$ROUNDS" "$RUNTIME" "$RAMP" "$IMG_MIB" "$RW_MIB" "$QD" "$RWMIX" "$BLOCK_SIZE"
  printf 'lazybd_cmd\t%s\n' "${LAZYBD_CMD:-}"
  printf 'nbdkit_cmd\t%s\n' "${NBDKIT_CMD:-}"
  printf 'elapsed_s\t%s\n' "$ELAPSED"
} >"$META"

SECTION=$T/section.md
python3 - "$ROWS" "$META" "$SECTION" "$BENCH" <<'PY'
import statistics, sys
rows_p, meta_p, out_p, bench = sys.argv[1:]
sys.path.insert(0, bench)
from resultsmd import paired, read_meta, read_rows, rounds_cell
meta = read_meta(meta_p)
rows = read_rows(rows_p)
NR = int(meta["rounds"])
def clients(r): return [float(x) for x in r["clients_iops"].split(",") if x]
o = ["## Many VMs on one host (bench/fleet.sh)\n"]
o.append(f"{NR} round(s) per size, the servers' order reversed every other round; {meta['elapsed_s']} s. "
         f"Each VM's disk is a writable export of one {meta['img_mib']} MiB template; all clients start together: "
         f"fio (libnbd `nbd` ioengine, one connection per VM), 4 KiB random reads and writes ({meta['rwmix']} % reads), "
         f"QD {meta['qd']}, over the first {meta['rw_mib']} MiB of the disk, {meta['runtime']} s after "
         f"{meta['ramp']} s of ramp. *Aggregate* is the sum of every client's read and write IOPS; *fairness* is the "
         "slowest client ÷ the mean (1.0: all equal). lazybd serves every VM from one process with one shared cache "
         "(warmed before the rounds) and an overlay per VM; nbdkit runs one process per VM, the cow filter over a local "
         "copy of the template (no network at all).\n")
o.append("Conditions:\n")
o.append(f"- machine: {meta['machine']}; load average {meta['load']}")
o.append(f"- {meta['versions']}")
o.append(f"- lazybd {meta['lazybd']}")
o.append(f"- lazybd: `{meta['lazybd_cmd']}`")
o.append(f"- nbdkit: `{meta['nbdkit_cmd']}`")
o.append("")
o.append("| VMs | server | aggregate IOPS (median) | every round | per client min–max (median round) | fairness min ÷ mean | lazybd ÷ nbdkit | notes |")
o.append("|---|---|---|---|---|---|---|---|")
goals = []
for n in sorted({int(r["n"]) for r in rows}):
    agg = {}
    for srv in ("lazybd", "nbdkit"):
        rs = [r for r in rows if r["server"] == srv and int(r["n"]) == n]
        good = [r for r in rs if r["status"] == "ok"]
        agg[srv] = {r["round"]: sum(clients(r)) for r in good}
        fair = [min(clients(r)) / (sum(clients(r)) / len(clients(r))) for r in good]
        med = statistics.median(agg[srv].values()) if agg[srv] else None
        mid = min(good, key=lambda r: abs(sum(clients(r)) - med)) if good else None
        notes = sorted({r["note"] for r in rs if r["note"]})
        if len(good) < len(rs): notes.append(f"{len(rs) - len(good)} of {len(rs)} runs FAILED")
        ratio = rounds_cell(paired(agg["lazybd"], agg["nbdkit"]), 2, "×", rounds=NR) if srv == "nbdkit" else ""
        o.append(f"| {n} | {srv} | {'—' if med is None else f'{med:,.0f}'} | "
                 f"{' / '.join(f'{agg[srv][k]:,.0f}' for k in sorted(agg[srv], key=int)) or '—'} | "
                 f"{'—' if mid is None else f'{min(clients(mid)):,.0f}–{max(clients(mid)):,.0f}'} | "
                 f"{rounds_cell(fair, 2, '', rounds=NR)} | {ratio} | {'; '.join(notes)} |")
        if srv == "lazybd":
            goals.append((f"{n} VMs: fairness, slowest client ÷ mean, worst round", "≥ 0.5",
                          f"{min(fair):.2f}" if fair else "—", bool(fair) and min(fair) >= 0.5))
    rat = paired(agg["lazybd"], agg["nbdkit"])
    goals.append((f"{n} VMs: aggregate IOPS lazybd ÷ nbdkit cow per VM, median of the rounds", "≥ 1.0×",
                  rounds_cell(rat, 2, "×", rounds=NR), bool(rat) and statistics.median(rat) >= 1.0))
o.append("\n### Goals (issue 14, part 3)\n")
o.append("| goal | target | measured | |")
o.append("|---|---|---|---|")
for g, t, m, ok in goals:
    o.append(f"| {g} | {t} | {m} | {'met' if ok else 'NOT met'} |")
o.append("")
open(out_p, "w").write("\n".join(o) + "\n")
PY
write_section - "$SECTION"
if [[ -n $OUT ]]; then
  write_section "$OUT" "$SECTION"
  log "section written to $OUT"
fi
if ((FAILED)); then log "some runs FAILED (see the table)"; exit 1; fi
exit 0
