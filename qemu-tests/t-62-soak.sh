#!/usr/bin/env bash
# t-62-soak: sustained verified load on many exports, with lazybd's memory
# watched. One lazybd (serve --config) on a 128 MiB random image from nginx,
# cold cache: SOAK_EXPORTS (8) writable exports rw0.., one writable export
# "hostile" and one read-only export "ro".
#  - soak, SOAK_DURATION s (20): one fio process, 16 writer jobs (one NBD
#    connection each; 2 per writable export with 8 exports, on disjoint
#    48 MiB regions, some at offsets that are not page-aligned): randwrite,
#    bs 4k/8k/16k/64k, iodepth 8, verify=crc32c with verify_backlog=128
#    (every 128 blocks written are read back and checked while the load
#    goes on), verify_fatal; plus 4 reader jobs on ro (2 random 4k..256k, 2
#    sequential 1 MiB). fio must exit 0, every job error=0, every writer must
#    have verified data, every reader read data;
#  - lazybd's VmRSS / RssAnon sampled every second (soak_tools.py rss):
#    peak, mean of the first and the last quarter, growth between them;
#  - hostile phase, SOAK_HOSTILE_SECS s (10): the same fio jobs again while
#    one raw-socket client (soak_tools.py hostile) on export "hostile" keeps
#    2 connections sending 32 MiB NBD WRITEs trickled at 8 MiB/s (dropped
#    in the middle of a payload at the end) and 2 connections that each
#    send 8 READs of 32 MiB and never read a reply; every completed hostile
#    write must be answered with error 0, and fio must again verify clean.
#    Peak RSS recorded, and the RSS 3 s after the hostile connections are
#    gone;
#  - afterwards ro reads back exactly as the origin, lazybd is still running,
#    exits 0 on SIGTERM, and its log has no panic; after a restart the
#    writable exports read exactly as before it (sha256 of each).
# Fails if a peak VmRSS is above SOAK_PEAK_MAX_MIB (512), or, when
# SOAK_GROWTH_MAX is set (bench/soak.sh: 50), if VmRSS grew by more than that
# many percent between the first and the last quarter of the soak.
# Env also: SOAK_SUMMARY (file: append the summary line), SOAK_RSS_OUT (file:
# copy the RSS samples there, "SECONDS VmRSS RssAnon RssFile Threads"),
# SOAK_IMG_MIB (128), SOAK_HOSTILE_SECS, SOAK_EXPORTS.
. "$(dirname "$0")/lib.sh"
require_cmd fio nbdcopy nbdinfo nginx
require_nbd_python

DUR=${SOAK_DURATION:-20}
HOSTILE_SECS=${SOAK_HOSTILE_SECS:-10}
NRW=${SOAK_EXPORTS:-8}
IMG_MIB=${SOAK_IMG_MIB:-128}
PEAK_MAX_MIB=${SOAK_PEAK_MAX_MIB:-512}
GROWTH_MAX=${SOAK_GROWTH_MAX:-}
TOOLS=$REPO/qemu-tests/soak_tools.py
NWRITERS=16
M=$((1024 * 1024))

img=$T/origin/disk.img
mkimage "$img" "$IMG_MIB"
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
port=$(free_port)
TCP=nbd://127.0.0.1:$port
{
  printf '[server]\nlisten = ["127.0.0.1:%s"]\ncache_dir = "%s"\ncontrol = "%s"\n' "$port" "$T/cache" "$T/control.sock"
  for ((i = 0; i < NRW; i++)); do
    printf '\n[[export]]\nname = "rw%d"\nimage = "%s"\nwritable = true\noverlay_dir = "%s"\n' "$i" "$url" "$T/overlays/rw$i"
  done
  printf '\n[[export]]\nname = "hostile"\nimage = "%s"\nwritable = true\noverlay_dir = "%s"\n' "$url" "$T/overlays/hostile"
  printf '\n[[export]]\nname = "ro"\nimage = "%s"\n' "$url"
} > "$T/lazybd.toml"
uris=()
for ((i = 0; i < NRW; i++)); do uris+=("$TCP/rw$i"); done
uris+=("$TCP/hostile" "$TCP/ro")
lazybd_spawn --config "$T/lazybd.toml"
lazybd_wait_ready "${uris[@]}"

# fio job file: 16 writers over the NRW writable exports, 4 readers on ro
region=$((48 * M))
slots=$(((NWRITERS + NRW - 1) / NRW))
(((slots - 1) * 64 * M + region + 4096 <= IMG_MIB * M)) || fail "image too small for $slots regions per export"
bss=(4k 8k 16k 64k)
{
  printf '[global]\nioengine=nbd\ntime_based=1\nverify_state_save=0\n'
  for ((j = 0; j < NWRITERS; j++)); do
    e=$((j % NRW)); r=$((j / NRW))
    off=$((r * 64 * M))
    ((j % 3 == 1)) && off=$((off + 1000))    # every I/O straddles two pages
    printf '\n[w%d]\nuri=%s/rw%d\nrw=randwrite\nbs=%s\noffset=%d\nsize=%d\niodepth=8\n' \
      "$j" "$TCP" "$e" "${bss[j % 4]}" "$off" "$region"
    printf 'verify=crc32c\ndo_verify=1\nverify_fatal=1\nverify_backlog=128\n'
  done
  for ((j = 0; j < 4; j++)); do
    if ((j < 2)); then
      printf '\n[r%d]\nuri=%s/ro\nrw=randread\nbsrange=4k-256k\niodepth=4\n' "$j" "$TCP"
    else
      printf '\n[r%d]\nuri=%s/ro\nrw=read\nbs=1m\niodepth=2\noffset=%d\n' "$j" "$TCP" $(((j - 2) * IMG_MIB / 2 * M))
    fi
  done
} > "$T/soak.fio"

# run_fio NAME SECONDS : the job file for SECONDS; checks errors and that data moved
run_fio() {
  local name=$1 secs=$2 rc=0
  (cd "$T" && fio --runtime="$secs" --output-format=json --output="$T/$name.json" "$T/soak.fio") \
    > "$T/$name.out" 2>&1 || rc=$?
  "$NBD_PYTHON" - "$T/$name.json" "$name" "$rc" > "$T/$name.check" <<'PY' || { cat "$T/$name.check" "$T/$name.out" | tail -n 30 >&2; fail "fio $name: errors (see above)"; }
import json, sys
path, name, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    t = open(path).read(); j = json.loads(t[t.index("{"):])
except Exception as e:
    print(f"fio {name}: no JSON output ({e}); exit status {rc}"); sys.exit(1)
bad, w_bytes, v_bytes, r_bytes = [], 0, 0, 0
for job in j["jobs"]:
    n, r, w = job["jobname"], job["read"], job["write"]
    if job["error"] != 0: bad.append(f"{n}: error={job['error']}")
    if n.startswith("w"):
        w_bytes += w["io_bytes"]; v_bytes += r["io_bytes"]
        if w["io_bytes"] == 0 or r["io_bytes"] == 0: bad.append(f"{n}: wrote {w['io_bytes']}, verified {r['io_bytes']} bytes")
    else:
        r_bytes += r["io_bytes"]
        if r["io_bytes"] == 0: bad.append(f"{n}: read nothing")
if rc != 0: bad.append(f"fio exit status {rc}")
for b in bad: print("  -", b)
print(f"fio_jobs={len(j['jobs'])} written_bytes={w_bytes} verified_bytes={v_bytes} ro_read_bytes={r_bytes} "
      f"fio_errors={sum(1 for job in j['jobs'] if job['error'] != 0)}")
sys.exit(1 if bad else 0)
PY
  log "fio $name (${secs}s): $(tail -n 1 "$T/$name.check")"
}

# rss_start FILE / rss_stop FILE : sample lazybd's memory every second
rss_start() {
  "$NBD_PYTHON" "$TOOLS" rss "$LAZYBD_PID" "$1" 1 & RSS_PID=$!
  bg_track "$RSS_PID"
}
rss_stop() {
  touch "$1.stop"; wait "$RSS_PID" || true
}
kv() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" <<<"$2"; }

idle_rss=$(awk '/^VmRSS/ {print $2}' "/proc/$LAZYBD_PID/status")
log "idle VmRSS ${idle_rss} KiB; soak for ${DUR}s: $NWRITERS verified writers on $NRW exports + 4 readers"
rss_start "$T/rss-soak.txt"
run_fio soak "$DUR"
rss_stop "$T/rss-soak.txt"
soak_fio=$(tail -n 1 "$T/soak.check")
soak_rss=$("$NBD_PYTHON" "$TOOLS" rss-report "$T/rss-soak.txt")
log "soak memory: $soak_rss"
_pid_alive "$LAZYBD_PID" || fail "lazybd died during the soak"

log "hostile phase, ${HOSTILE_SECS}s: the same load + 2 connections trickling 32 MiB writes + 2 not reading 32 MiB reads"
rss_start "$T/rss-hostile.txt"
"$NBD_PYTHON" "$TOOLS" hostile 127.0.0.1 "$port" hostile 0 "$HOSTILE_SECS" 2 2 $((8 * M)) $((32 * M)) \
  > "$T/hostile.out" 2>&1 & hp=$!
bg_track "$hp"
run_fio hostile-phase "$HOSTILE_SECS"
wait "$hp" || { cat "$T/hostile.out" >&2; fail "the hostile client got a wrong reply (see above)"; }
sleep 3   # (memory after the hostile connections are gone)
rss_stop "$T/rss-hostile.txt"
after_rss=$(awk '/^VmRSS/ {print $2}' "/proc/$LAZYBD_PID/status")
hostile_rss=$("$NBD_PYTHON" "$TOOLS" rss-report "$T/rss-hostile.txt")
log "$(head -n 1 "$T/hostile.out")"
log "hostile memory: $hostile_rss"
_pid_alive "$LAZYBD_PID" || fail "lazybd died in the hostile phase"

assert_same_as_file "$img" "$TCP/ro"
# what the writers left persists across a clean restart
shas() { local i; for ((i = 0; i < NRW; i++)); do sha_nbd "$TCP/rw$i"; done | sha256sum | cut -c1-16; }
before=$(shas)
lazybd_stop
assert_no_grep 'panicked' "$LAZYBD_LOG" "lazybd log"
lazybd_spawn --config "$T/lazybd.toml"
lazybd_wait_ready "${uris[@]}"
assert_eq "$before" "$(shas)" "sha256 of the $NRW writable exports before SIGTERM and after the restart"
log "the $NRW writable exports read the same after a restart"
lazybd_stop

peak=$(kv peak_rss_kib "$soak_rss"); hpeak=$(kv peak_rss_kib "$hostile_rss")
growth=$(kv growth_pct "$soak_rss")
summary="soak: duration=${DUR}s exports=$NRW+hostile+ro writers=$NWRITERS readers=4 $soak_fio idle_rss_kib=$idle_rss peak_rss_kib=$peak peak_anon_kib=$(kv peak_anon_kib "$soak_rss") first_q_rss_kib=$(kv first_q_rss_kib "$soak_rss") last_q_rss_kib=$(kv last_q_rss_kib "$soak_rss") growth_pct=$growth anon_growth_pct=$(kv anon_growth_pct "$soak_rss") threads_max=$(kv threads_max "$soak_rss") hostile_secs=$HOSTILE_SECS hostile_writes=$(sed -n 's/.*: \([0-9]*\) writes completed.*/\1/p' "$T/hostile.out") hostile_peak_rss_kib=$hpeak hostile_peak_anon_kib=$(kv peak_anon_kib "$hostile_rss") rss_after_hostile_kib=$after_rss hostile_$(tail -n 1 "$T/hostile-phase.check" | tr ' ' '\n' | grep -E '^(verified_bytes|fio_errors)=' | paste -sd' ' | sed 's/ / hostile_/')"
log "$summary"
[[ -n ${SOAK_SUMMARY:-} ]] && echo "$summary" >> "$SOAK_SUMMARY"
if [[ -n ${SOAK_RSS_OUT:-} ]]; then cp "$T/rss-soak.txt" "$SOAK_RSS_OUT"; cp "$T/rss-hostile.txt" "$SOAK_RSS_OUT.hostile"; fi
assert_le "$peak" $((PEAK_MAX_MIB * 1024)) "peak VmRSS (KiB) during the soak"
assert_le "$hpeak" $((PEAK_MAX_MIB * 1024)) "peak VmRSS (KiB) during the hostile phase"
if [[ -n $GROWTH_MAX ]]; then
  awk -v g="$growth" -v m="$GROWTH_MAX" 'BEGIN{exit !(g <= m)}' ||
    fail "VmRSS grew by ${growth}% between the first and the last quarter of the soak (limit ${GROWTH_MAX}%)"
fi
