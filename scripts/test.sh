#!/usr/bin/env bash
# scripts/test.sh — the one command that runs every lazybd check, on a fresh
# Debian 12 machine as root:
#   1. scripts/install-deps.sh (qemu, libnbd tools + python3-libnbd, nbdkit,
#      fio, nginx, ...; idempotent)
#   2. rustfmt / clippy components (added with rustup only if missing)
#   3. cargo fmt --check, cargo clippy -D warnings
#   4. cargo test --release, cargo build --release (same profile: one build)
#   5. qemu-tests/run.sh (shell integration tests against target/release/lazybd)
#   6. bench/smoke.sh, if present
#   7. fuzz target build, if fuzz/ exists (hook below)
# Stops at the first failing step (set -e) and says which one.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

step=""
section() {
  step=$1
  printf '\n==================== %s ====================\n' "$1"
}
on_exit() {
  local rc=$?
  if ((rc != 0)); then
    printf '\nscripts/test.sh: FAILED in step: %s (exit %s)\n' "$step" "$rc" >&2
  fi
}
trap on_exit EXIT

t_start=$SECONDS

section "install dependencies"
bash scripts/install-deps.sh

section "rust toolchain"
if ! command -v cargo >/dev/null 2>&1 && [[ -f $HOME/.cargo/env ]]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found (install Rust with rustup)" >&2; exit 1; }
if command -v rustup >/dev/null 2>&1; then
  installed=$(rustup component list --installed 2>/dev/null || true)
  missing=()
  grep -q '^rustfmt' <<<"$installed" || missing+=(rustfmt)
  grep -q '^clippy' <<<"$installed" || missing+=(clippy)
  if ((${#missing[@]})); then
    echo "adding rustup components: ${missing[*]}"
    rustup component add "${missing[@]}"
  fi
fi
cargo --version
cargo fmt --version
cargo clippy --version

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy"
cargo clippy --all-targets -- -D warnings

section "cargo test --release"
logs=$(mktemp -d)
cargo test --release 2>&1 | tee "$logs/cargo-test.log"

section "cargo build --release"
cargo build --release
export LAZYBD=$repo/target/release/lazybd
"$LAZYBD" --help >/dev/null

section "integration tests (qemu-tests/run.sh)"
qemu-tests/run.sh 2>&1 | tee "$logs/qemu-tests.log"

if [[ -x bench/smoke.sh || -f bench/smoke.sh ]]; then
  section "benchmark smoke (bench/smoke.sh)"
  bash bench/smoke.sh
fi

if [[ -d fuzz ]]; then
  section "fuzz targets build"
  # ---- FUZZ BUILD HOOK -------------------------------------------------------
  # scripts/fuzz.sh (see fuzz/README.md): installs cargo-fuzz if missing,
  # builds every target on the stable toolchain (RUSTC_BOOTSTRAP=1), replays
  # fuzz/regressions/, then fuzzes each target FUZZ_SECONDS (default 20) s.
  # FUZZ_SECONDS=0 builds and replays only. Fails on any crash.
  # CI has the machine to itself: build with both cores.
  FUZZ_JOBS=${FUZZ_JOBS:-2} bash scripts/fuzz.sh
  # ---- END FUZZ BUILD HOOK ---------------------------------------------------
fi

section "done"
echo "all checks passed in $((SECONDS - t_start))s"
# One closing line for the whole run: cargo's tests plus the integration tests.
unit=$(awk '/^test result: ok\./ {n += $4} END {print n + 0}' "$logs/cargo-test.log")
integ=$(awk '/^[0-9]+ passed, 0 failed$/ {n = $1} END {print n + 0}' "$logs/qemu-tests.log")
rm -rf "$logs"
echo "tests: $((unit + integ)) passed, 0 failed"
