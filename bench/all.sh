#!/usr/bin/env bash
# bench/all.sh — regenerate the whole of bench/RESULTS.md from measurements,
# in one command.
#
# Runs every bench script in this fixed order; each writes only its own
# section of OUT (bench/lib.sh stamps it; any one can also be rerun alone):
#
#   script               section of RESULTS.md                                 full size, 2 cores
#   bench/run.sh         lazybd against its peers (bench/run.sh)               ~22 min (3 rounds)
#   bench/block-size.sh  Block size sweep (bench/block-size.sh)                ~22 min (6 sizes, 3 rounds + boots)
#   bench/boot.sh        Boot (bench/boot.sh)                                  ~5 min
#   bench/realboot.sh    Real distribution boot (bench/realboot.sh), also at 1 ms  ~20 min (3 rounds; + image build once)
#   bench/multi.sh       Many exports and writable exports (bench/multi.sh)    ~11 min (3 rounds)
#   bench/fleet.sh       Many VMs on one host (bench/fleet.sh)                 ~4 min (3 rounds)
#   bench/hydrate.sh     Hydration (bench/hydrate.sh)                          ~1 min
#   bench/origins.sh     Cloud origins (bench/origins.sh)                      ~10 min (3 rounds)
#   bench/cluster.sh     Many hosts, one origin (bench/cluster.sh)             ~12 min (3 rounds + sweep)
#   bench/crash.sh       Crash loop (bench/crash.sh)                           ~6 min (200 cycles)
#   bench/soak.sh        Soak (bench/soak.sh)                                  ~12 min
#   bench/power-cut.sh   Power-loss simulation (bench/power-cut.sh)            ~1 min (+ a test build)
#   bench/attach.sh      Attach of a 1 TiB template (bench/attach.sh)          ~1 min
#
# then bench/assemble.py (OUT's header with an index of the sections and their
# stamps, the sections in this order; after a run of every script, sections
# no script writes are dropped) and bench/reliability-table.py (RELIABILITY's
# table from OUT). About 2.1 h in all at full size.
#
# A failing script does not stop the others: its section is whatever it
# wrote (most scripts write their failures into it) or, if it wrote none, its
# earlier one with its old stamp. Exit status 1 if any script failed. Every
# script's output is in LOGDIR/NAME.log.
#
# Env:
#   QUICK=1      every script's QUICK knob (small images, short runs, 1-2
#                rounds): a smoke test of the whole chain in ~12 min; never into
#                bench/RESULTS.md (default OUT: a copy of it in a temp dir).
#                realboot is left out of it (its boots take ~30 s each and
#                its first run builds a Debian image) unless SCRIPTS names it
#   SCRIPTS      subset, in any order, run in the order above (e.g. "run boot");
#                the other sections are kept as they are
#   OUT          bench/RESULTS.md (QUICK: $TMPDIR/lazybd-quick/RESULTS.md)
#   RELIABILITY  RELIABILITY.md if OUT is bench/RESULTS.md, else RELIABILITY.md
#                beside OUT (a copy of the repository's, made if missing)
#   LAZYBD       ${CARGO_TARGET_DIR:-target}/release/lazybd (built if missing)
#   LOGDIR       a new temp dir (kept)
#   Any knob of the scripts (ROUNDS, LAZYBD_ARGS, ...) is passed to all of them;
#   CASES means different things to bench/run.sh and bench/boot.sh: to choose
#   cases, run that script alone.
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
ORDER="run block-size boot realboot multi fleet hydrate origins cluster crash soak power-cut attach"
QUICK_SKIP="realboot"   # not in a QUICK run of everything (see QUICK above)
QUICK=${QUICK:-0}
if [[ -z ${SCRIPTS:-} && $QUICK == 1 ]]; then
  SCRIPTS=""; for s in $ORDER; do [[ " $QUICK_SKIP " == *" $s "* ]] || SCRIPTS+="$s "; done
fi
SCRIPTS=${SCRIPTS:-$ORDER}
for s in $SCRIPTS; do
  [[ " $ORDER " == *" $s "* ]] || { echo "all.sh: unknown script $s (one of: $ORDER)" >&2; exit 2; }
done
selected=""; for s in $ORDER; do [[ " $SCRIPTS " == *" $s "* ]] && selected+="$s "; done
selected=${selected% }

log() { printf '[all %s] %s\n' "$(date +%T)" "$*" >&2; }

# ------------------------------------------------------------- outputs -----
if [[ $QUICK == 1 && -z ${OUT:-} ]]; then
  OUT=${TMPDIR:-/tmp}/lazybd-quick/RESULTS.md
  mkdir -p "$(dirname "$OUT")"
  [[ -f $OUT ]] || cp "$BENCH/RESULTS.md" "$OUT"
fi
OUT=${OUT:-$BENCH/RESULTS.md}
mkdir -p "$(dirname "$OUT")"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
if [[ $QUICK == 1 && $OUT == "$BENCH/RESULTS.md" ]]; then
  echo "all.sh: QUICK=1 numbers are a smoke test; they do not go into bench/RESULTS.md (set OUT)" >&2
  exit 2
fi
if [[ -z ${RELIABILITY:-} ]]; then
  if [[ $OUT == "$BENCH/RESULTS.md" ]]; then RELIABILITY=$ROOT/RELIABILITY.md
  else
    RELIABILITY=$(dirname "$OUT")/RELIABILITY.md
    [[ -f $RELIABILITY ]] || cp "$ROOT/RELIABILITY.md" "$RELIABILITY"
  fi
fi
LOGDIR=${LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/lazybd-all.XXXXXX")}
mkdir -p "$LOGDIR"
export OUT QUICK

# --------------------------------------------------------------- binary ----
export LAZYBD=${LAZYBD:-${CARGO_TARGET_DIR:-$ROOT/target}/release/lazybd}
if [[ ! -x $LAZYBD ]]; then
  log "building lazybd (cargo build --release)"
  (cd "$ROOT" && cargo build --release --bin lazybd)
fi

# --------------------------------------------------------------- scripts ---
section_stamp() { # SCRIPT -> the stamp of its section in OUT (empty: none)
  python3 -c '
import os, sys
sys.path.insert(0, sys.argv[1])
import resultsmd
_, secs = resultsmd.split(resultsmd.read(sys.argv[2]))
print("\n".join(resultsmd.stamp(s) or "" for s in secs if resultsmd.owner(s) == sys.argv[3]))' "$BENCH" "$OUT" "bench/$1.sh"
}

log "QUICK=$QUICK; scripts: $selected; OUT=$OUT; RELIABILITY=$RELIABILITY; logs in $LOGDIR; lazybd $LAZYBD"
START=$SECONDS
SUMMARY=$LOGDIR/summary.tsv; : > "$SUMMARY"
FAILED=0
for s in $selected; do
  before=$(section_stamp "$s")
  log "bench/$s.sh (log: $LOGDIR/$s.log)"
  t0=$SECONDS rc=0
  bash "$BENCH/$s.sh" > "$LOGDIR/$s.log" 2>&1 < /dev/null || rc=$?
  after=$(section_stamp "$s")
  if [[ -n $after && $after != "$before" ]]; then written=written; else written="NOT written (earlier one kept)"; fi
  ((rc == 0)) || FAILED=1
  printf '%s\t%s\t%s\t%s\n' "bench/$s.sh" "$((SECONDS - t0))" "$rc" "$written" >> "$SUMMARY"
  log "bench/$s.sh: exit $rc after $((SECONDS - t0)) s; section $written"
  ((rc == 0)) || tail -n 15 "$LOGDIR/$s.log" >&2
done

# --------------------------------------------------- header, order, table ---
drop=""
[[ $selected == "$ORDER" ]] && drop=--drop-unowned
# shellcheck disable=SC2046
python3 "$BENCH/assemble.py" "$OUT" $(for s in $ORDER; do printf 'bench/%s.sh ' "$s"; done) $drop
python3 "$BENCH/reliability-table.py" "$OUT" "$RELIABILITY"

log "done in $((SECONDS - START)) s"
{
  printf 'script\tseconds\texit\tsection\n'
  cat "$SUMMARY"
} | column -t -s $'\t' >&2
exit "$FAILED"
