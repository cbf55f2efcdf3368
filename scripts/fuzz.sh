#!/usr/bin/env bash
# scripts/fuzz.sh — build and run lazybd's cargo-fuzz targets (fuzz/).
#
#   scripts/fuzz.sh [TARGET...]      build all targets, replay fuzz/regressions/,
#                                    then fuzz each TARGET (default: all) for
#                                    FUZZ_SECONDS seconds
#
# Environment:
#   FUZZ_SECONDS=20        seconds per target; 0 = build and replay only
#   FUZZ_SANITIZER=address address | none (none builds and runs faster)
#   FUZZ_JOBS=1            cargo build jobs (CARGO_BUILD_JOBS), low by default
#   FUZZ_EXTRA_ARGS=       more libFuzzer flags for every run, e.g. "-runs=100000"
#
# Works on a stable toolchain: cargo-fuzz passes nightly-only -Z flags to
# rustc, which RUSTC_BOOTSTRAP=1 allows (see fuzz/README.md). cargo-fuzz is
# installed from crates.io when missing. Exits non-zero on a build failure,
# a regression input that crashes again, or a new crash (its input is saved
# under fuzz/artifacts/<target>/; copy it to fuzz/regressions/<target>/).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo/fuzz"

secs=${FUZZ_SECONDS:-20}
sanitizer=${FUZZ_SANITIZER:-address}
export CARGO_BUILD_JOBS=${FUZZ_JOBS:-${CARGO_BUILD_JOBS:-1}}
all_targets=(wire_decode handshake map_header profile_decode overlay_journal qcow2 manifest)
if (($#)); then targets=("$@"); else targets=("${all_targets[@]}"); fi

# Per-target libFuzzer options: inputs larger than the default 4096 bytes are
# needed for whole option streams and map files (fuzz/seeds/map_header has an
# 8 KiB one).
max_len() {
  case $1 in
    handshake) echo 8192 ;;
    map_header) echo 16384 ;;
    # whole images: 512-byte-cluster seeds are 4 KiB, 16 KiB-cluster ones ~84 KiB
    qcow2) echo 131072 ;;
    *) echo 4096 ;;
  esac
}

if ! command -v cargo >/dev/null 2>&1 && [[ -f $HOME/.cargo/env ]]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

# Nightly flags on whatever toolchain is active (stable here).
if ! rustc -V | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi
echo "fuzz.sh: $(cargo fuzz --version), $(rustc -V), sanitizer=$sanitizer," \
  "RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-unset}, jobs=$CARGO_BUILD_JOBS"

# Same flags for build and run, so `run` does not rebuild.
fuzz_flags=(--sanitizer "$sanitizer")

echo "fuzz.sh: building all targets"
cargo fuzz build "${fuzz_flags[@]}"

triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=target/$triple/release

# 1. Regression inputs: every committed crash input must now pass.
for t in "${all_targets[@]}"; do
  mapfile -t files < <(find "regressions/$t" -type f ! -name '.*' ! -name '*.md' 2>/dev/null | sort)
  if ((${#files[@]})); then
    echo "fuzz.sh: replaying ${#files[@]} regression input(s) for $t"
    "$bin_dir/$t" -runs=1 "${files[@]}" >"target/replay-$t.log" 2>&1 || {
      tail -40 "target/replay-$t.log" >&2
      echo "fuzz.sh: $t crashes on a regression input (log: fuzz/target/replay-$t.log)" >&2
      exit 1
    }
  fi
done

((secs > 0)) || { echo "fuzz.sh: FUZZ_SECONDS=0, build and replay only"; exit 0; }

# 2. Bounded fuzzing, one target after the other. New corpus entries go to
#    fuzz/corpus/<target> (ignored by git); fuzz/seeds/<target> is read only.
summary=()
failed=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log=target/fuzz-$t.log
  echo "fuzz.sh: fuzzing $t for ${secs}s"
  # shellcheck disable=SC2086
  if cargo fuzz run "${fuzz_flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 ${FUZZ_EXTRA_ARGS:-} >"$log" 2>&1; then
    status=ok
  else
    status=CRASH
    failed=1
    grep -aE '^(==[0-9]+==|thread .* panicked|SUMMARY|artifact_prefix|Test unit written)' "$log" | head -20 >&2 || true
    tail -30 "$log" >&2
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -aoE 'cov: [0-9]+' "$log" | tail -1 | tr -dc 0-9)
  summary+=("$(printf '%-12s %-6s execs=%-10s exec/s=%-7s cov=%s' "$t" "$status" "${execs:-?}" "${rate:-?}" "${cov:-?}")")
done

echo
echo "fuzz.sh summary (${secs}s per target; logs in fuzz/target/fuzz-<target>.log):"
printf '  %s\n' "${summary[@]}"
if ((failed)); then
  echo "fuzz.sh: crash found; inputs are in fuzz/artifacts/<target>/ — reproduce with" >&2
  echo "  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer TARGET artifacts/TARGET/crash-...)" >&2
  echo "  and copy the input to fuzz/regressions/TARGET/ once fixed" >&2
  exit 1
fi
