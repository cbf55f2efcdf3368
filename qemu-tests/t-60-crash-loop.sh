#!/usr/bin/env bash
# t-60-crash-loop: kill -9 at random moments under a mixed write load, with an
# oracle. One lazybd (serve --config) with a writable export "rw" (overlay in
# its own --overlay-dir) and a read-only export "ro" of one 64 MiB random
# image from nginx. Each cycle:
#  - qemu-tests/crash_client.py load on rw: random page-aligned writes of
#    1..16 pages with content derived from (page, version), WRITE_ZEROES,
#    reads checked strictly against the model, FLUSH every 3..12 operations,
#    up to 8 requests in flight; an fsync'd journal ("W page count version"
#    before a write is sent, "F" after a FLUSH is acknowledged);
#  - at the same time crash_client.py roload on ro: random and sequential
#    reads, each compared with the origin file. Every third cycle (1, 4,
#    7, ...) starts on a COLD cache (the image's cache directory deleted
#    while the server is stopped), so the kill lands while blocks are being
#    fetched and stored (by the reads of both exports);
#  - SIGKILL of lazybd 0.1..1.5 s after both clients are connected; both
#    clients must have seen only correct data and no error before the kill;
#  - `lazybd cache verify` exits 0; restart on the same cache and overlay;
#  - crash_client.py verify: every page of rw reads as the durable state
#    (everything before the last "F") or as one of the writes journalled
#    after it (never torn, never anything else; pages never written equal
#    the origin); the model is re-synced to what was read. ro reads back
#    exactly as the origin (nbdcopy | cmp);
#  - before a cold cycle, and at the end, lazybd is stopped with SIGTERM
#    (exit 0); otherwise the restarted server carries the next cycle. Every
#    CRASH_RESET_EVERY (24) cycles (at a cold cycle) the overlay starts
#    empty again, so that writes to pages not yet in the overlay keep
#    being cut, not only rewrites in place.
# After the loop `lazybd cache verify` exits 0 and no log has a panic.
#
# Env: CRASH_CYCLES (8), CRASH_SEED (random; logged: rerun with it to get the
# same kill delays and client seeds), CRASH_SUMMARY (file: append the summary
# line there too), CRASH_KEEP_GOING=1 (bench/crash.sh: on a wrong page, keep
# the evidence in $CRASH_EVIDENCE, start over from an empty overlay and go
# on; exit 1 at the end if anything failed).
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nbdinfo nginx
require_nbd_python

CYCLES=${CRASH_CYCLES:-8}
SEED=${CRASH_SEED:-$((RANDOM * 32768 + RANDOM))}
KEEP_GOING=${CRASH_KEEP_GOING:-0}
RESET_EVERY=${CRASH_RESET_EVERY:-24}
resets=0
EVIDENCE=${CRASH_EVIDENCE:-$T/evidence}
RANDOM=$SEED
CLIENT=$REPO/qemu-tests/crash_client.py
log "seed $SEED, $CYCLES cycles"

img=$T/origin/disk.img
mkimage "$img" 64
size=$(stat -c %s "$img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
port=$(free_port)
TCP=nbd://127.0.0.1:$port
cat > "$T/lazybd.toml" <<EOF
[server]
listen = ["127.0.0.1:$port"]
cache_dir = "$T/cache"
control = "$T/control.sock"

[[export]]
name = "rw"
image = "$url"
writable = true
overlay_dir = "$T/overlay"

[[export]]
name = "ro"
image = "$url"
EOF
state=$T/state.json
"$NBD_PYTHON" "$CLIENT" init "$state" $((size / 4096))

start() { lazybd_spawn --config "$T/lazybd.toml"; lazybd_wait_ready "$TCP/rw" "$TCP/ro"; }

# totals
t_writes=0 t_zeroes=0 t_reads=0 t_read_pages=0 t_flushes=0 t_pages=0 t_unfl_new=0 t_unfl_old=0
t_acked_old=0 t_ro_bytes=0 t_cold=0 t_cold_mid=0 failures=0 cycles_done=0
jget() { "$NBD_PYTHON" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get(sys.argv[2], 0))' "$1" "$2"; }

# record_failure CYCLE WHAT : fail, or (CRASH_KEEP_GOING=1) keep the evidence and go on
record_failure() {
  local c=$1 what=$2 d
  failures=$((failures + 1))
  ((KEEP_GOING)) || fail "cycle $c: $what"
  d=$EVIDENCE/cycle-$c
  mkdir -p "$d"
  cp -a "$T"/journal.$c "$T"/load.$c.* "$T"/roload.$c.* "$T"/verify.$c.* "$state" "$d"/ 2>/dev/null
  cp -a "$T"/lazybd-$((_LAZYBD_N - 1)).log "$LAZYBD_LOG" "$d"/ 2>/dev/null
  log "cycle $c: FAILURE ($what); evidence in $d; starting over from an empty overlay"
  [[ -n $LAZYBD_PID ]] && lazybd_kill9
  rm -rf "$T/overlay"
  "$NBD_PYTHON" "$CLIENT" init "$state" $((size / 4096))
}

for ((c = 1; c <= CYCLES; c++)); do
  cold=0
  if ((c % 3 == 1)); then
    cold=1; t_cold=$((t_cold + 1))
    [[ -n $LAZYBD_PID ]] && lazybd_stop
    rm -rf "$T"/cache/disk.img-*
    if ((c % RESET_EVERY == 1 && c > 1)); then
      # a fresh overlay now and then: first writes to pages not yet in the
      # overlay (merge, publish) keep being cut, not only in-place rewrites
      rm -rf "$T/overlay"
      "$NBD_PYTHON" "$CLIENT" init "$state" $((size / 4096))
      resets=$((resets + 1))
      log "cycle $c: fresh overlay"
    fi
  fi
  [[ -n $LAZYBD_PID ]] || start
  rm -f "$T/marker" "$T/ready.rw" "$T/ready.ro"
  "$NBD_PYTHON" "$CLIENT" load "$TCP/rw" --origin "$img" --state "$state" --journal "$T/journal.$c" \
    --seed "$((SEED + c))" --marker "$T/marker" --ready "$T/ready.rw" --stats "$T/load.$c.json" \
    > "$T/load.$c.out" 2>&1 &
  lp=$!
  "$NBD_PYTHON" "$CLIENT" roload "$TCP/ro" --origin "$img" --seed "$((SEED - c))" --marker "$T/marker" \
    --ready "$T/ready.ro" --stats "$T/roload.$c.json" > "$T/roload.$c.out" 2>&1 &
  rp=$!
  bg_track "$lp" "$rp"
  for _ in $(seq 200); do
    [[ -e $T/ready.rw && -e $T/ready.ro ]] && break
    _pid_alive "$lp" && _pid_alive "$rp" || break
    sleep 0.02
  done
  [[ -e $T/ready.rw && -e $T/ready.ro ]] ||
    fail "cycle $c: clients not connected: $(cat "$T/load.$c.out" "$T/roload.$c.out" | tail -n 5 | tr '\n' ' ')"
  # (cold cycles: 0.1..0.3 s, so that the kill usually lands while the
  # image is being fetched)
  if ((cold)); then delay_ms=$((100 + RANDOM % 201)); else delay_ms=$((100 + RANDOM % 1401)); fi
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  touch "$T/marker"
  lazybd_kill9
  known=""
  if ((cold)); then
    known=$(lazybd_cache info "$T/cache" 2>/dev/null | sed -n 's/.*blocks: *\(.*\)/\1/p' | head -n 1)
    [[ $known == *"(100.0% known)"* ]] || t_cold_mid=$((t_cold_mid + 1))
    known="; cache at the kill: $known"
  fi
  lrc=0; wait "$lp" || lrc=$?
  rrc=0; wait "$rp" || rrc=$?
  log "cycle $c$( ((cold)) && echo ' (cold cache)'): killed after ${delay_ms} ms$known; $(tail -n 1 "$T/load.$c.out"); $(tail -n 1 "$T/roload.$c.out")"
  if ((lrc != 0 || rrc != 0)); then
    record_failure "$c" "a client saw wrong data or an error before the kill: $(grep -h FAILED "$T/load.$c.out" "$T/roload.$c.out" | tr '\n' ' ') $(tail -n 3 "$T/load.$c.out" "$T/roload.$c.out" | tr '\n' ' ')"
    continue
  fi
  if ! out=$(lazybd_cache verify "$T/cache" 2>&1); then
    record_failure "$c" "cache verify after kill -9 failed: $out"
    continue
  fi
  start
  if ! "$NBD_PYTHON" "$CLIENT" verify "$TCP/rw" --origin "$img" --state "$state" --journal "$T/journal.$c" \
      --load-stats "$T/load.$c.json" --report "$T/verify.$c.json" > "$T/verify.$c.out" 2>&1; then
    cat "$T/verify.$c.out" >&2
    record_failure "$c" "rw does not read back as the journal allows (see above)"
    continue
  fi
  log "cycle $c: $(tail -n 1 "$T/verify.$c.out")"
  if ! out=$( { nbdcopy "$TCP/ro" - | cmp - "$img"; } 2>&1 ); then
    record_failure "$c" "ro after the restart differs from the origin: $out"
    continue
  fi
  cycles_done=$((cycles_done + 1))
  t_writes=$((t_writes + $(jget "$T/load.$c.json" writes)))
  t_zeroes=$((t_zeroes + $(jget "$T/load.$c.json" zeroes)))
  t_reads=$((t_reads + $(jget "$T/load.$c.json" reads)))
  t_read_pages=$((t_read_pages + $(jget "$T/load.$c.json" read_pages)))
  t_flushes=$((t_flushes + $(jget "$T/load.$c.json" flushes)))
  t_ro_bytes=$((t_ro_bytes + $(jget "$T/roload.$c.json" bytes)))
  t_pages=$((t_pages + $(jget "$T/verify.$c.json" pages)))
  t_unfl_new=$((t_unfl_new + $(jget "$T/verify.$c.json" unflushed_new)))
  t_unfl_old=$((t_unfl_old + $(jget "$T/verify.$c.json" unflushed_old)))
  t_acked_old=$((t_acked_old + $(jget "$T/verify.$c.json" acked_unflushed_old)))
  rm -f "$T/journal.$c"   # (keeps $T small on long runs)
done

[[ -n $LAZYBD_PID ]] && lazybd_stop
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "final cache verify failed: $out"
log "final cache verify: $(echo "$out" | tail -n 1)"
for f in "$T"/lazybd-*.log; do assert_no_grep 'panicked|SIGBUS' "$f" "lazybd log $(basename "$f")"; done
written=$("$NBD_PYTHON" -c 'import json,sys; print(sum(1 for v in json.load(open(sys.argv[1]))["pages"] if v != -1))' "$state")

summary="crash loop: seed=$SEED cycles=$cycles_done/$CYCLES cold=$t_cold cold_killed_mid_fill=$t_cold_mid writes=$t_writes write_zeroes=$t_zeroes flushes=$t_flushes reads_checked=$t_reads (${t_read_pages} pages) ro_bytes_checked=$t_ro_bytes verified_pages=$t_pages unflushed_pages_new=$t_unfl_new unflushed_pages_old=$t_unfl_old acked_unflushed_pages_old=$t_acked_old pages_written_now=$written overlay_resets=$resets failures=$failures"
log "$summary"
[[ -n ${CRASH_SUMMARY:-} ]] && echo "$summary" >> "$CRASH_SUMMARY"
((failures == 0)) || fail "$failures cycle(s) failed; evidence in $EVIDENCE"
assert_eq "$CYCLES" "$cycles_done" "cycles completed"
