#!/usr/bin/env bash
# bench/block-size.sh — the block-size sweep: which cache block size wins
# where (the reasons for the 64 KiB default are in ARCHITECTURE.md, "Block
# size and fetch size", and bench/README.md).
#
# reads (PARTS): bench/run.sh's cold cases with the origin behind the delay
#   proxy (1 ms RTT, 1 Gbit/s), CASES="cold-rand32-rtt cold-seq-rtt",
#   PEERS="lazybd qsd nbdkit-cache", at every size in BLOCK_SIZES: lazybd's
#   --block-size, nbdkit's cache-min-block-size and qemu's qcow2 cluster_size
#   are all set to it (run.sh's BLOCK_SIZE; LAZYBD_ARGS are passed through).
#   ROUNDS rounds; a round runs every size once (one run.sh call each, one
#   round of it, all on one image), sizes and peers in order in odd rounds and
#   reversed in even ones. Ratios lazybd ÷ peer are per round (same size, same
#   round), the median shown with every round's.
# boot (PARTS): bench/boot.sh BLOCK_SIZE=<bs> RTTS=BOOT_RTT REPEAT=BOOT_REPEAT
#   CASES="local lazybd-cold lazybd-profile" for every size: boot extra over
#   the local-file boot of the same repetition, origin requests and bytes.
# Report: "## Block size sweep (bench/block-size.sh)" in OUT (replacing an
# earlier one, stamped by bench/lib.sh): one table per part, then which size
# wins each measure (every size within TIE_PCT % / TIE_S s of the best is
# listed as a winner).
#
# Env: BLOCK_SIZES ("4k 16k 32k 64k 128k 256k 1M")  DEFAULT_BS (4k)  ROUNDS (3)
#      PARTS ("reads boot")  IMG_MIB (1024)  RUNTIME/COLD_READS/DELAY_MS/RATE_MBIT (run.sh's)
#      BOOT_RTT (10)  BOOT_REPEAT (3)  TIE_PCT (5)  TIE_S (0.05)
#      OUT (bench/RESULTS.md)  LAZYBD  LAZYBD_ARGS  KEEP (1: keep the temp dir)
#      QUICK (1: BLOCK_SIZES="4k 64k" IMG_MIB=64 ROUNDS=2 BOOT_REPEAT=1, a smoke run)
# Exit status: 0 if every run produced numbers, 1 otherwise.
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
. "$BENCH/lib.sh"
stamp_begin
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  BLOCK_SIZES=${BLOCK_SIZES:-4k 64k}; IMG_MIB=${IMG_MIB:-64}; ROUNDS=${ROUNDS:-2}; BOOT_REPEAT=${BOOT_REPEAT:-1}
fi
BLOCK_SIZES=${BLOCK_SIZES:-4k 16k 32k 64k 128k 256k 1M}
DEFAULT_BS=${DEFAULT_BS:-4k}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-reads boot}
IMG_MIB=${IMG_MIB:-1024}
BOOT_RTT=${BOOT_RTT:-10}
BOOT_REPEAT=${BOOT_REPEAT:-3}
TIE_PCT=${TIE_PCT:-5}
TIE_S=${TIE_S:-0.05}
OUT=${OUT:-$BENCH/RESULTS.md}
PEERS_SWEEP="lazybd qsd nbdkit-cache"
CASES_SWEEP="cold-rand32-rtt cold-seq-rtt"
export LAZYBD=${LAZYBD:-$ROOT/target/release/lazybd}
[[ -x $LAZYBD ]] || { echo "block-size.sh: $LAZYBD not found (cargo build --release)" >&2; exit 2; }

log() { printf '[block-size %s] %s\n' "$(date +%T)" "$*" >&2; }
has() { [[ " $1 " == *" $2 "* ]]; }
T=$(mktemp -d "${BENCH_TMP:-/tmp}/lazybd-block-size.XXXXXX")
chmod 755 "$T"
trap 'if [[ ${KEEP:-0} == 1 ]]; then log "temp dir kept: $T"; else rm -rf "$T"; fi' EXIT

FAILED=0
rev() { printf '%s\n' "$@" | tac | tr '\n' ' '; }
# shellcheck disable=SC2086
SIZES_REV=$(rev $BLOCK_SIZES)
# shellcheck disable=SC2086
PEERS_REV=$(rev $PEERS_SWEEP)

READS=$T/reads.tsv
if has "$PARTS" reads; then
  log "making a ${IMG_MIB} MiB random image (one for every size)"
  mkdir -p "$T/img"; chmod 755 "$T/img"
  head -c $((IMG_MIB * 1048576)) /dev/urandom > "$T/img/disk.img"
  chmod 644 "$T/img/disk.img"
  for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2)); then sizes=$BLOCK_SIZES; peers=$PEERS_SWEEP; else sizes=$SIZES_REV; peers=$PEERS_REV; fi
    for bs in $sizes; do
      log "reads: round $round, block size $bs (peers: $peers)"
      rc=0
      BLOCK_SIZE=$bs LAZYBD_BLOCK_SIZE=$bs PEERS=$peers CASES=$CASES_SWEEP ROUNDS=1 IMG=$T/img/disk.img QUICK=$QUICK \
        OUT=$T/run-$bs-r$round.md "$BENCH/run.sh" > "$T/run-$bs-r$round.log" 2>&1 || rc=$?
      [[ $rc == 0 ]] || { FAILED=1; log "run.sh at $bs, round $round: exit $rc (its rows say why)"; tail -n 5 "$T/run-$bs-r$round.log" >&2; }
      if [[ -s $T/run-$bs-r$round.tsv ]]; then
        # the run's rows, with the size and the sweep's round number
        awk -F'\t' -v OFS='\t' -v bs="$bs" -v r="$round" -v hdr="$([[ -s $READS ]] && echo 0 || echo 1)" \
          'NR == 1 { if (hdr) print "bs", $0; next } { $14 = r; print bs, $0 }' "$T/run-$bs-r$round.tsv" >> "$READS"
        grep -m1 -o 'Measured 4 KiB ranged GET: [^.]*\.[0-9]* ms through the proxy' "$T/run-$bs-r$round.md" \
          > "$T/rtt.txt" 2>/dev/null || true
      fi
    done
  done
fi

if has "$PARTS" boot; then
  for bs in $BLOCK_SIZES; do
    log "boot: block size $bs, RTT $BOOT_RTT ms, $BOOT_REPEAT repetition(s)"
    rc=0
    BLOCK_SIZE=$bs LAZYBD_BLOCK_SIZE=$bs RTTS=$BOOT_RTT REPEAT=$BOOT_REPEAT CASES="local lazybd-cold lazybd-profile" QUICK=$QUICK \
      OUT="" ROWS_OUT=$T/boot-$bs.tsv "$BENCH/boot.sh" > "$T/boot-$bs.log" 2>&1 || rc=$?
    [[ $rc == 0 ]] || { FAILED=1; log "boot.sh at $bs: exit $rc"; tail -n 5 "$T/boot-$bs.log" >&2; }
  done
fi

python3 - "$T" "$BENCH" "$BLOCK_SIZES" "$DEFAULT_BS" "$ROUNDS" "$PARTS" "$TIE_PCT" "$TIE_S" \
  "$BOOT_RTT" "$BOOT_REPEAT" "$IMG_MIB" "${LAZYBD_ARGS:-}" "${RATE_MBIT:-1000}" "${DELAY_MS:-0.5}" > "$T/section.md" <<'PY'
import csv, os, re, sys
T, bench, sizes, dflt, rounds, parts, tie_pct, tie_s, boot_rtt, boot_rep, img_mib, lz_args, rate, delay = sys.argv[1:]
sys.path.insert(0, bench)
from resultsmd import median, paired, rounds_cell
sizes = sizes.split(); rounds = int(rounds); tie_pct = float(tie_pct); tie_s = float(tie_s)
rate_bps = float(rate) * 1e6 / 8; rtt_s = 2 * float(delay) / 1e3

def nbytes(s):
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", s)
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]

def label(s):
    b = nbytes(s)
    t = f"{b >> 20} MiB" if b >= 1 << 20 and b % (1 << 20) == 0 else f"{b >> 10} KiB"
    return t + (" (default)" if nbytes(s) == nbytes(dflt) else "")

def fnum(x, nd=0): return "—" if x is None else f"{x:,.{nd}f}"
def rc(v): return rounds_cell(v, 2, "×", rounds=rounds)

o = []; w = o.append
w("## Block size sweep (bench/block-size.sh)"); w("")
wins = []  # (measure, better, {size: value}, unit, nd, kind)

reads_p = os.path.join(T, "reads.tsv")
if "reads" in parts.split() and os.path.exists(reads_p):
    rows = list(csv.DictReader(open(reads_p), delimiter="\t"))
    def pr(bs, case, peer, field):
        return {r["round"]: float(r[field]) for r in rows
                if r["bs"] == bs and r["case"] == case and r["peer"] == peer and r["status"] == "ok" and r[field]}
    def med(bs, case, peer, field): return median(list(pr(bs, case, peer, field).values()))
    rtt = open(os.path.join(T, "rtt.txt")).read().strip() if os.path.exists(os.path.join(T, "rtt.txt")) else ""
    w(f"### Cold reads, origin at {rtt_s * 1e3:g} ms RTT, {float(rate):g} Mbit/s (bench/run.sh cases)"); w("")
    w(f"`BLOCK_SIZE=<bs> PEERS=\"lazybd qsd nbdkit-cache\" CASES=\"cold-rand32-rtt cold-seq-rtt\" ROUNDS=1 bench/run.sh` "
      f"for every size, {rounds} round(s) (sizes and peers reversed in even rounds), one {img_mib} MiB random image; "
      "the cache block of lazybd (`--block-size`), `cache-min-block-size` of nbdkit's cache filter and the qcow2 "
      "`cluster_size` of qemu-storage-daemon are all `<bs>`. Cold 4K: first-touch 4 KiB random reads at QD32 on a fresh "
      "server (2048, at most half the blocks); cold seq: one pass of 1 MiB reads at QD8. "
      "Physical limit of cold 4K = min(link ÷ block, 32 ÷ RTT). "
      + (f"{rtt}. " if rtt else "") + (f"lazybd options `{lz_args}`. " if lz_args else "")
      + "Values are medians over the rounds, ratios medians of the per-round ratios (each round's in parentheses).")
    w("")
    w("| block | cold 4K IOPS: lazybd | qsd | nbdkit curl+cache | lazybd ÷ qsd | lazybd ÷ nbdkit | lazybd % of physical limit "
      "| cold seq MiB/s: lazybd | qsd | nbdkit | lazybd ÷ qsd | lazybd ÷ nbdkit |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    iops, rq, seq, sq = {}, {}, {}, {}
    for bs in sizes:
        c4, cs = "cold-rand32-rtt", "cold-seq-rtt"
        lim = min(rate_bps / nbytes(bs), 32 / rtt_s)
        li = pr(bs, c4, "lazybd", "iops"); ls = pr(bs, cs, "lazybd", "mibs")
        rq4 = paired(li, pr(bs, c4, "qsd", "iops")); rqs = paired(ls, pr(bs, cs, "qsd", "mibs"))
        iops[bs] = median(list(li.values())); seq[bs] = median(list(ls.values()))
        rq[bs] = median(rq4); sq[bs] = median(rqs)
        pct = [x / lim for x in li.values()]
        w(f"| {label(bs)} | {fnum(iops[bs])} | {fnum(med(bs, c4, 'qsd', 'iops'))} | {fnum(med(bs, c4, 'nbdkit-cache', 'iops'))} | "
          f"{rc(rq4)} | {rc(paired(li, pr(bs, c4, 'nbdkit-cache', 'iops')))} | "
          f"{rounds_cell(pct, 0, '%', 100, rounds)} of {lim:,.0f} | "
          f"{fnum(seq[bs], 1)} | {fnum(med(bs, cs, 'qsd', 'mibs'), 1)} | {fnum(med(bs, cs, 'nbdkit-cache', 'mibs'), 1)} | "
          f"{rc(rqs)} | {rc(paired(ls, pr(bs, cs, 'nbdkit-cache', 'mibs')))} |")
    w("")
    fails = [r for r in rows if r["status"] != "ok"]
    if fails:
        w("Failed attempts (run.sh retries a failed cold case once on a fresh server): " + "; ".join(f"{r['bs']} round {r['round']} {r['case']}/{r['peer']}: {r['note'][:200]}" for r in fails))
        w("")
    wins += [("cold 4K random reads, lazybd IOPS", "max", iops, "", 0, "pct"),
             ("cold 4K random reads, lazybd ÷ qsd", "max", rq, "×", 2, "pct"),
             ("cold sequential, lazybd MiB/s", "max", seq, "", 1, "pct"),
             ("cold sequential, lazybd ÷ qsd", "max", sq, "×", 2, "pct")]

boot = {bs: os.path.join(T, f"boot-{bs}.tsv") for bs in sizes}
if "boot" in parts.split() and any(os.path.exists(p) for p in boot.values()):
    w(f"### The same sweep on a real VM boot (bench/boot.sh)"); w("")
    w(f"`BLOCK_SIZE=<bs> RTTS={boot_rtt} REPEAT={boot_rep} CASES=\"local lazybd-cold lazybd-profile\" bench/boot.sh` for every size "
      f"({boot_rtt} ms RTT, {float(rate):g} Mbit/s; the guest of bench/boot.sh). Extra = boot minus the local-file boot of the same "
      "repetition; the median, every repetition's in parentheses. Origin requests and MB: medians.")
    w("")
    w("| block | cold extra s | cold origin requests / MB | with profile extra s | with profile origin requests / MB |")
    w("|---|---|---|---|---|")
    cx, px, creq, cmb = {}, {}, {}, {}
    for bs in sizes:
        if not os.path.exists(boot[bs]):
            w(f"| {label(bs)} | no numbers | | | |"); continue
        br = [r for r in csv.DictReader(open(boot[bs]), delimiter="\t") if r["status"] == "ok" and r["boot_s"]]
        loc = {r["rep"]: float(r["boot_s"]) for r in br if r["case"] == "local"}
        def ex(c): return [float(r["boot_s"]) - loc[r["rep"]] for r in sorted(br, key=lambda r: int(r["rep"]))
                           if r["case"] == c and r["rep"] in loc]
        def mq(c, f): return median([int(r[f]) for r in br if r["case"] == c and r[f]])
        cx[bs] = median(ex("lazybd-cold")); px[bs] = median(ex("lazybd-profile"))
        creq[bs] = mq("lazybd-cold", "origin_reqs"); b = mq("lazybd-cold", "origin_bytes")
        cmb[bs] = b / 1e6 if b is not None else None
        pb = mq("lazybd-profile", "origin_bytes")
        w(f"| {label(bs)} | {rounds_cell(ex('lazybd-cold'), 2, ' s')} | {fnum(creq[bs])} / {fnum(cmb[bs], 1)} | "
          f"{rounds_cell(ex('lazybd-profile'), 2, ' s')} | {fnum(mq('lazybd-profile', 'origin_reqs'))} / "
          f"{fnum(pb / 1e6 if pb is not None else None, 1)} |")
    w("")
    wins += [(f"cold boot at {boot_rtt} ms RTT, extra s", "min", cx, " s", 2, "abs"),
             (f"boot with profile at {boot_rtt} ms RTT, extra s", "min", px, " s", 2, "abs"),
             ("cold boot, origin requests", "min", creq, "", 0, "pct"),
             ("cold boot, origin MB", "min", cmb, "", 1, "pct")]

if wins:
    w("### Which size wins where"); w("")
    w(f"Winners: every size within {tie_pct:g} % (seconds: {tie_s:g} s) of the best median above.")
    w("")
    w(f"| measure | better | winner(s) | best | {label(dflt)} |")
    w("|---|---|---|---|---|")
    for name, better, vals, unit, nd, kind in wins:
        v = {k: x for k, x in vals.items() if x is not None}
        if not v:
            w(f"| {name} | {better} | — | — | — |"); continue
        best = max(v.values()) if better == "max" else min(v.values())
        def near(x):
            if kind == "abs": return abs(x - best) <= tie_s
            return abs(x - best) <= abs(best) * tie_pct / 100
        winners = [label(k).replace(" (default)", "") for k in sizes if k in v and near(v[k])]
        d = next((x for k, x in v.items() if nbytes(k) == nbytes(dflt)), None)
        w(f"| {name} | {'higher' if better == 'max' else 'lower'} | {', '.join(winners)} | {fnum(best, nd)}{unit} | "
          f"{fnum(d, nd) + unit if d is not None else '—'} |")
    w("")
print("\n".join(o))
PY
write_section "$OUT" "$T/section.md"
log "section written to $OUT"
exit "$FAILED"
