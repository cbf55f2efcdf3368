#!/usr/bin/env bash
# t-31-overlay-persist: a writable export's overlay survives restarts and
# kill -9. Image 64 MiB.
#  1. qemu-io writes/zeroes/discard + flush, SIGTERM (exit 0), restart: the
#     whole export equals the model (origin + writes).
#  2. qemu-io writes + flush (8..16 MiB fully written, a rewrite inside a
#     written block, WRITE_ZEROES), then through libnbd a few writes + FLUSH,
#     then a stream of UNFLUSHED 512-aligned writes (1..16 sectors each, a
#     distinct fill byte each, shuffled, disjoint, queue depth 16) over
#     8..40 MiB: written, zero, trimmed, missing and base-zero blocks. The
#     writer kills lazybd with SIGKILL itself once 600 writes are acknowledged
#     and 16 are in flight. Restart on the same cache dir: everything outside
#     8..40 MiB reads exactly as the model (all of it was flushed); inside,
#     every 512-byte sector is its old content or the complete new fill of
#     its write, never anything else (and reads do not fail).
#  3. The same again over 8..16 MiB, now blocks that are all in the overlay
#     (rewrites in place), with the state after step 2 as the old content.
#  `lazybd cache verify` is clean after each kill; the origin is unchanged.
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io nbdcopy nginx
require_nbd_python

mkimage "$T/origin/disk.img" 64
size=$(stat -c %s "$T/origin/disk.img")
origin_sha=$(sha_file "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
K=1024; M=$((1024 * 1024)); B=$((64 * K))
cp "$T/origin/disk.img" "$T/model.img"

qio() {  # LABEL QEMU-IO-COMMAND... : run the commands (+ flush) in one qemu-io, all must succeed
  local label=$1; shift
  local a=() c
  for c in "$@"; do a+=(-c "$c"); done
  qemu-io -f raw --discard=unmap "$LAZYBD_URI" "${a[@]}" -c flush > "$T/qio.out" 2>&1 ||
    fail "qemu-io ($label) failed: $(tail -n 5 "$T/qio.out" | tr '\n' ' ')"
  assert_no_grep 'error|fail|Error' "$T/qio.out" "qemu-io ($label)"
}

# ---- 1: graceful restart
lazybd_start "$url" --cache-dir "$T/cache" --writable
qio phase1 "write -P 0xa1 1000 5000" "write -P 0xa2 65530 20" "write -P 0xa3 $((2 * M + 7)) 300000" \
  "write -P 0xa4 $((ZERO_OFF + 100)) 5000" "write -P 0xa5 $((size - 512)) 512" \
  "write -z $((4 * M + 1)) 70000" "discard $((6 * M)) $((2 * B))"
image_apply "$T/model.img" "w 1000 5000 0xa1" "w 65530 20 0xa2" "w $((2 * M + 7)) 300000 0xa3" \
  "w $((ZERO_OFF + 100)) 5000 0xa4" "w $((size - 512)) 512 0xa5" "z $((4 * M + 1)) 70000" "z $((6 * M)) $((2 * B))"
assert_export_model "$T/model.img" "$LAZYBD_URI"
lazybd_stop
lazybd_start "$url" --cache-dir "$T/cache" --writable
assert_export_model "$T/model.img" "$LAZYBD_URI"
log "phase 1: writes read back after SIGTERM + restart"

# ---- 2: flushed writes, then unflushed writes cut by kill -9
qio phase2 "write -P 0xb1 $((8 * M)) $((8 * M))" "write -P 0xb2 3000 100" \
  "write -P 0xb3 $((20 * M + 333)) 100000" "write -z $((24 * M)) $B" "discard $((26 * M)) $((3 * B))"
image_apply "$T/model.img" "w $((8 * M)) $((8 * M)) 0xb1" "w 3000 100 0xb2" "w $((20 * M + 333)) 100000 0xb3" \
  "z $((24 * M)) $B" "z $((26 * M)) $((3 * B))"

# writer URI PID LO HI KILL_AFTER SEED PLAN_JSON [PRE-FLUSH OPS "off len byte"...]
writer() {
  "$NBD_PYTHON" - "$@" <<'PY'
import json, nbd, os, random, signal, sys
uri, pid, lo, hi, kill_after, seed, plan_path = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:7]), sys.argv[7]
pre = [tuple(int(x, 0) for x in a.split()) for a in sys.argv[8:]]
rnd = random.Random(seed)
chunks, pos = [], lo
while pos < hi:
    n = min(rnd.randint(1, 16) * 512, hi - pos); chunks.append((pos, n)); pos += n
rnd.shuffle(chunks)
plan = [(off, n, 1 + i % 255) for i, (off, n) in enumerate(chunks)]
h = nbd.NBD(); h.connect_uri(uri)
for off, n, v in pre:
    h.pwrite(bytes([v]) * n, off)
h.flush()
QD = 16
inflight, acked, i, killed_with = {}, [], 0, None
while True:
    while len(inflight) < QD and i < len(plan) and killed_with is None:
        off, n, v = plan[i]
        inflight[h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([v]) * n), off)] = i
        i += 1
    if killed_with is None and len(acked) >= kill_after and len(inflight) == QD:
        os.kill(pid, signal.SIGKILL); killed_with = len(inflight)
        break
    if not inflight: break
    h.poll(-1)
    for c in list(inflight):
        try:
            done = h.aio_command_completed(c)
        except nbd.Error as e:
            sys.exit(f"write {plan[inflight[c]]} failed before the kill: {e}")
        if done:
            idx = inflight.pop(c)
            if killed_with is None: acked.append(idx)
json.dump({"plan": plan, "acked": acked, "sent": i}, open(plan_path, "w"))
if killed_with is None: sys.exit(f"all {len(plan)} writes finished before the kill: nothing was cut")
print(f"writer: {len(plan)} planned, {i} sent, {len(acked)} acknowledged, SIGKILL with {killed_with} in flight")
PY
}

# check MODEL URI PLAN_JSON : outside the plan's ranges exact; inside per sector old or new
check() {
  "$NBD_PYTHON" - "$@" <<'PY' || fail "export after kill -9 is wrong (see above)"
import json, nbd, sys
model, uri, p = open(sys.argv[1], "rb").read(), sys.argv[2], json.load(open(sys.argv[3]))
plan, acked = p["plan"], set(p["acked"])
h = nbd.NBD(); h.connect_uri(uri)
size = h.get_size()
got = bytearray()
for pos in range(0, size, 4 << 20):
    got += h.pread(min(4 << 20, size - pos), pos)
h.shutdown()
exp = bytearray(model)      # the model, with the planned writes' sectors taken as read
bad, new, old, same, acked_old, unacked_new = [], 0, 0, 0, 0, 0
for idx, (off, n, v) in enumerate(plan):
    fill = bytes([v]) * 512
    for s in range(off, off + n, 512):
        g, o = bytes(got[s:s + 512]), model[s:s + 512]
        if g == fill and g == o: same += 1      # the write did not change this sector
        elif g == fill: new += 1; unacked_new += idx not in acked
        elif g == o: old += 1; acked_old += idx in acked
        else: bad.append(f"sector at {s} (write #{idx} {n}@{off} fill {v:#04x}): neither old nor new: {g[:16].hex()}..")
    exp[off:off + n] = got[off:off + n]
# outside the planned writes: exact
if got != exp:
    CH = 1 << 16
    for pos in range(0, size, CH):
        if got[pos:pos + CH] != exp[pos:pos + CH]:
            i = next(i for i in range(CH) if got[pos + i] != exp[pos + i])
            bad.append(f"flushed/untouched bytes differ from {pos + i} (64K chunk at {pos}): got {bytes(got[pos+i:pos+i+8]).hex()} want {bytes(exp[pos+i:pos+i+8]).hex()}")
            if len(bad) >= 20: break
for b in bad[:20]: print("  -", b)
print(f"after kill -9: {new} sectors new, {old} old ({acked_old} of them in acknowledged writes), {same} unchanged by their write, "
      f"{unacked_new} new sectors from unacknowledged writes, {len(bad)} bad")
if acked_old: print(f"note: {acked_old} sectors of acknowledged (unflushed) writes read as old: allowed without FLUSH")
sys.exit(1 if bad else 0)
PY
}

writer "$LAZYBD_URI" "$LAZYBD_PID" $((8 * M)) $((40 * M)) 600 1 "$T/plan1.json" \
  "$((48 * M + 5)) 1000 0xc0" "$((50 * M)) $B 0xc1" "$((8 * M + 512)) 1024 0xc2" ||
  fail "writer (phase 2) failed"
lazybd_kill9
image_apply "$T/model.img" "w $((48 * M + 5)) 1000 0xc0" "w $((50 * M)) $B 0xc1" "w $((8 * M + 512)) 1024 0xc2"
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "cache verify after kill -9 (phase 2) failed: $out"
lazybd_start "$url" --cache-dir "$T/cache" --writable
check "$T/model.img" "$LAZYBD_URI" "$T/plan1.json"
log "phase 2 checked"

# ---- 3: again, over blocks that are all in the overlay (in-place rewrites)
nbdcopy "$LAZYBD_URI" "$T/model2.img" || fail "nbdcopy of the export after phase 2 failed"
log "phase 3: export copied as the old content"
writer "$LAZYBD_URI" "$LAZYBD_PID" $((8 * M)) $((16 * M)) 300 2 "$T/plan2.json" || fail "writer (phase 3) failed"
lazybd_kill9
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "cache verify after kill -9 (phase 3) failed: $out"
lazybd_start "$url" --cache-dir "$T/cache" --writable
check "$T/model2.img" "$LAZYBD_URI" "$T/plan2.json"
log "phase 3 checked"
lazybd_stop

assert_eq "$origin_sha" "$(sha_file "$T/origin/disk.img")" "origin file sha256"
assert_origin_only_read
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "final cache verify failed: $out"
log "cache verify: $(echo "$out" | tail -n 1)"
