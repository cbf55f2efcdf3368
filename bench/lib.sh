# shellcheck shell=bash
# bench/lib.sh — sourced by every bench script that writes a section of
# bench/RESULTS.md: the section's stamp, and the one way a section gets into
# the file.
#
#   . "$BENCH/lib.sh"
#   stamp_begin                      # when the measurement starts
#   ...
#   write_section "$OUT" "$section"  # stamp it, replace its earlier version in OUT
#
# The stamp: commit (`git rev-parse --short HEAD`, +dirty if the tree has
# changes other than the results files), date (UTC) and load average at the
# start, cores, kernel, the script and its run time; with QUICK=1 it says the
# numbers are a smoke test. Nothing else is written into RESULTS.md.
BENCH_LIB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

git_stamp() { # short HEAD, +dirty when files other than the results differ from it
  local rev
  rev=$(git -C "$BENCH_LIB_ROOT" rev-parse --short HEAD 2>/dev/null) || { echo "none (not a git tree)"; return 0; }
  if [[ -n $(git -C "$BENCH_LIB_ROOT" status --porcelain -- . ':!bench/RESULTS.md' ':!bench/RESULTS.tsv' \
      ':!RELIABILITY.md' ':!bench/crash-evidence-*' ':!bench/cluster.png' 2>/dev/null) ]]; then
    rev+=+dirty
  fi
  echo "$rev"
}

stamp_begin() { # record what the stamp says about the start of the run
  STAMP_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
  STAMP_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
  STAMP_GIT=$(git_stamp)
  STAMP_T0=$SECONDS
}

meta_host() { # -> the "machine" and "load" lines of a bench's meta.tsv (load: from stamp_begin to now)
  printf 'machine\t%s cores (%s), %s, kernel %s\n' "$(nproc)" \
    "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    "$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)" "$(uname -r)"
  printf 'load\t%s at start, %s at end\n' "$STAMP_LOAD" "$(cut -d' ' -f1-3 /proc/loadavg)"
}

stamp_text() { # -> the stamp line of the running script (without the *Stamp: ...* markup)
  local script quick=""
  script=bench/$(basename "$0")
  [[ -n ${STAMP_DATE:-} ]] || stamp_begin
  [[ ${QUICK:-0} == 1 ]] && quick=" QUICK mode: small sizes and short runs, a smoke test of the scripts, not a measurement."
  # shellcheck disable=SC2016 # the backquotes are markdown
  printf 'git %s, run %s (`%s`, %s s), load average %s at start, %s cores, kernel %s.%s' \
    "$STAMP_GIT" "$STAMP_DATE" "$script" "$((SECONDS - STAMP_T0))" "$STAMP_LOAD" "$(nproc)" "$(uname -r)" "$quick"
}

write_section() { # OUT SECTION_FILE : stamp the section and put it into OUT; OUT "" or "-": stdout only
  local out=${1:--} sec=$2
  python3 "$BENCH_LIB_ROOT/bench/replace-section.py" --stamp "$(stamp_text)" "$out" "$sec"
}
