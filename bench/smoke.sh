#!/usr/bin/env bash
# bench/smoke.sh — a short bench run for CI (about 2-3 min once the binary is
# built), through bench/all.sh's own plumbing: QUICK=1 SCRIPTS="run boot" on a
# temp copy of bench/RESULTS.md (and of RELIABILITY.md):
#   bench/run.sh   64 MiB image, 1 s per timed case, 2 rounds, lazybd plus one
#                  peer, every case;
#   bench/boot.sh  QUICK: one real VM boot per lazybd case at 10 ms RTT
#                  (SMOKE_BOOT=0 skips it).
# Fails (non-zero) if all.sh fails, any case of either server produced no
# numbers in a round, a regenerated section lacks its stamp or its per-round
# ratios, or a section of another script did not survive intact. Never
# writes to bench/RESULTS.md or RELIABILITY.md.
# Env: SMOKE_PEER (nbdkit-cache), SMOKE_TIMEOUT (480 s for the whole run),
#      SMOKE_BOOT (1), plus any bench/run.sh knob (e.g. LAZYBD, LAZYBD_ARGS).
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
peer=${SMOKE_PEER:-nbdkit-cache}
out=$(mktemp -d "${TMPDIR:-/tmp}/lazybd-smoke.XXXXXX")
trap 'rm -rf "$out"' EXIT
cp "$BENCH/RESULTS.md" "$out/RESULTS.md"
cp "$BENCH/../RELIABILITY.md" "$out/RELIABILITY.md"
cases="cold-seq warm-seq warm-rand1-tcp warm-rand32-tcp warm-rand1-unix warm-rand32-unix cold-rand32-rtt cold-seq-rtt"
scripts="run"; [[ ${SMOKE_BOOT:-1} == 1 ]] && scripts="run boot"
rounds=2
rc=0
QUICK=1 SCRIPTS=$scripts OUT=$out/RESULTS.md RELIABILITY=$out/RELIABILITY.md LOGDIR=$out/logs \
  IMG_MIB=64 RUNTIME=1 ROUNDS=$rounds SEQ_MAX=20 COLD_MAX=20 PEERS="lazybd $peer" \
  timeout -k 10 "${SMOKE_TIMEOUT:-480}" "$BENCH/all.sh" || rc=$?
if [[ $rc != 0 ]]; then
  for f in "$out"/logs/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 30 "$f" >&2; }; done
  echo "smoke: FAILED (all.sh rc=$rc)" >&2; exit 1
fi
[[ -s $out/RESULTS.tsv ]] || { echo "smoke: no raw rows from bench/run.sh" >&2; exit 1; }
bad=0
# every (case, server) that applies has an "ok" row with numbers in every round
for p in lazybd "$peer"; do
  for c in $cases; do
    case $p/$c in nbdkit-file/cold-*|nbd-server/cold-*) continue ;; esac
    for ((r = 1; r <= rounds; r++)); do
      if ! awk -F'\t' -v c="$c" -v p="$p" -v r="$r" '$1 == c && $2 == p && $12 == "ok" && $4 > 0 && $14 == r {f = 1} END {exit !f}' "$out/RESULTS.tsv"; then
        echo "smoke: no numbers for $c / $p in round $r" >&2; bad=1
      fi
    done
  done
done
# the file's structure: header, stamps, per-round ratios, the other sections intact
python3 - "$BENCH" "$out/RESULTS.md" "$BENCH/RESULTS.md" "$scripts" "$out/RELIABILITY.md" <<'EOF' || bad=1
import re, sys
bench, new_p, old_p, scripts, rel_p = sys.argv[1:]
sys.path.insert(0, bench)
import resultsmd
new, old = open(new_p).read(), open(old_p).read()
errs = []
if "Produced by `bench/all.sh`" not in resultsmd.split(new)[0]:
    errs.append("no all.sh header")
_, secs = resultsmd.split(new)
mine = {f"bench/{s}.sh" for s in scripts.split()}
for sc in mine:
    ss = [s for s in secs if resultsmd.owner(s) == sc]
    if not ss:
        errs.append(f"no section of {sc}"); continue
    st = resultsmd.stamp(ss[0]) or ""
    if not re.match(r"git [0-9a-f]{7,}(\+dirty)?, run \d{4}-\d\d-\d\d \d\d:\d\d UTC \(`" + re.escape(sc) + r"`, \d+ s\), load average [\d.]+ [\d.]+ [\d.]+ at start, \d+ cores, kernel \S+\.", st) or "QUICK" not in st:
        errs.append(f"{sc}: bad stamp {st!r}")
run = [s for s in secs if resultsmd.owner(s) == "bench/run.sh"]
if run and not re.search(r"\| [\d.]+× \([\d.]+ / [\d.]+\) \|", run[0]):
    errs.append("bench/run.sh: no per-round ratio like '1.23× (1.20 / 1.26)'")
for s in resultsmd.split(old)[1]:
    if resultsmd.owner(s) not in mine and s.rstrip() not in new:
        errs.append(f"section changed or lost: {resultsmd.heading(s)}")
if "<!-- reliability-table" not in open(rel_p).read():
    errs.append("RELIABILITY.md copy has no table")
for e in errs:
    print("smoke:", e, file=sys.stderr)
sys.exit(1 if errs else 0)
EOF
if [[ $bad != 0 ]]; then echo "smoke: FAILED" >&2; exit 1; fi
column -t -s $'\t' "$out/logs/summary.tsv" >&2 || true
echo "smoke: ok"
