#!/usr/bin/env bash
# bench/smoke.sh — a short bench run for CI (under a minute once the binary is
# built): 64 MiB image, 2 s per timed case, lazybd plus one peer, every case;
# then bench/boot.sh QUICK=1 (one real VM boot per lazybd case at 10 ms RTT,
# report on stdout only; SMOKE_BOOT=0 skips it).
# Fails (non-zero) if any case of either server produced no numbers or a boot
# failed. Writes its report to a temp file, never to bench/RESULTS.md.
# Env: SMOKE_PEER (nbdkit-cache), SMOKE_TIMEOUT (240 s for the whole run),
#      plus any bench/run.sh knob (e.g. LAZYBD, LAZYBD_ARGS).
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
peer=${SMOKE_PEER:-nbdkit-cache}
out=$(mktemp -d "${TMPDIR:-/tmp}/lazybd-smoke.XXXXXX")
trap 'rm -rf "$out"' EXIT
cases="cold-seq warm-seq warm-rand1-tcp warm-rand32-tcp warm-rand1-unix warm-rand32-unix cold-rand32-rtt cold-seq-rtt"
rc=0
IMG_MIB=64 RUNTIME=2 SEQ_MAX=20 COLD_MAX=20 PEERS="lazybd $peer" CASES="$cases" OUT="$out/RESULTS.md" \
  timeout -k 10 "${SMOKE_TIMEOUT:-240}" "$BENCH/run.sh" || rc=$?
[[ -s $out/RESULTS.tsv ]] || { echo "smoke: no results (run.sh rc=$rc)" >&2; exit 1; }
# every (case, server) that applies must have an "ok" row with numbers
missing=0
for p in lazybd "$peer"; do
  for c in $cases; do
    case $p/$c in nbdkit-file/cold-*|nbd-server/cold-*) continue ;; esac
    if ! awk -F'\t' -v c="$c" -v p="$p" '$1 == c && $2 == p && $12 == "ok" && $4 > 0 {f = 1} END {exit !f}' "$out/RESULTS.tsv"; then
      echo "smoke: no numbers for $c / $p" >&2; missing=1
    fi
  done
done
if [[ $rc != 0 || $missing != 0 ]]; then echo "smoke: FAILED (run.sh rc=$rc)" >&2; exit 1; fi
if [[ ${SMOKE_BOOT:-1} == 1 ]]; then
  QUICK=1 timeout -k 10 300 "$BENCH/boot.sh" || { echo "smoke: bench/boot.sh QUICK=1 FAILED" >&2; exit 1; }
fi
echo "smoke: ok"
