#!/usr/bin/env bash
# t-36-many-exports: ONE lazybd (serve --config) with 8 read-only exports
# ro0..ro7 and 2 writable exports rw0 (overlay_dir set) and rw1 (default
# overlay dir) of one nginx-served 64 MiB image: one image, one cache.
#  - the 8 read-only exports are read in full at the same time (8 nbdcopy,
#    each piped into cmp with the origin file) on a fresh cache: all identical
#    to the origin; nginx's data GETs (Range other than the bytes=0-0 probe)
#    cover the image exactly once: their ranges do not overlap, their union is
#    [0, size) and their body bytes sum to the image size; lazybd's summary
#    counts the same (origin_requests = data GETs + probes, origin_bytes =
#    size: the probe's byte is not counted);
#  - baseline: a separate lazybd with 1 export on a fresh cache, one nbdcopy:
#    also exactly once, and about the same number of data GETs as the 8
#    readers (at most a quarter more: request boundaries depend on timing);
#  - different qemu-io writes (overlapping offsets, partial blocks,
#    write -z) into rw0 and rw1 at the same time: each reads back its own
#    writes and the template everywhere else (full libnbd read vs a model per
#    export), also after a restart of the server;
#  - afterwards the read-only exports still read back as the origin, and no
#    data GET was made after the first full read (the writes' partial blocks
#    came from the cache);
#  - the origin file is unchanged, nginx saw only GET/HEAD, the cache
#    verifies clean, rw1's overlay is under CACHE_DIR/overlays/rw1.
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nbdinfo qemu-io nginx
require_nbd_python

mkimage "$T/origin/disk.img" 64
img=$T/origin/disk.img
size=$(stat -c %s "$img")
origin_sha=$(sha_file "$img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
K=1024; M=$((1024 * 1024)); B=$((64 * K))
NRO=8

# ---- origin log helpers for this test
# data_ranges MARK : "START END BODY_BYTES" of each data GET after MARK (END inclusive)
data_ranges() {
  _origin_lines "$1" | awk -F'|' '$2=="GET" && $3=="/disk.img" && $5!="bytes=0-0" {
    r = $5; sub(/^bytes=/, "", r); split(r, a, "-"); print a[1], a[2], $7 }'
}
# check_once MARK WHAT : the data GETs after MARK cover [0, size) exactly once
check_once() {
  local mark=$1 what=$2
  data_ranges "$mark" > "$T/ranges.txt"
  "$NBD_PYTHON" - "$T/ranges.txt" "$size" "$what" <<'PY' || fail "$what: the origin was not read exactly once (see above)"
import sys
path, size, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rs = []
for line in open(path):
    a, b, n = line.split()
    if b == "": sys.exit(f"open-ended range {a}-")
    a, b, n = int(a), min(int(b), size - 1), int(n)
    if n != b - a + 1: print(f"  - range {a}-{b}: body {n} bytes (want {b - a + 1})")
    rs.append((a, b, n))
rs.sort()
bad, pos = [], 0
for a, b, n in rs:
    if a < pos: bad.append(f"range {a}-{b} overlaps earlier data (up to {pos - 1})")
    elif a > pos: bad.append(f"hole {pos}-{a - 1} never fetched")
    pos = max(pos, b + 1)
if pos < size: bad.append(f"hole {pos}-{size - 1} never fetched")
total = sum(n for _, _, n in rs)
if total != size: bad.append(f"body bytes {total} != image size {size}")
for x in bad[:8]: print("  -", x)
print(f"{what}: {len(rs)} data GETs, {total} body bytes, image {size} bytes: {'exactly once' if not bad else 'NOT exactly once'}")
sys.exit(1 if bad else 0)
PY
}

# ---- baseline: 1 export, fresh cache, one reader
mark0=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/cache-baseline" --control none --name base
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop
base_gets=$(origin_data_requests_since "$mark0" /disk.img)
base_bytes=$(origin_bytes_since "$mark0" /disk.img)
check_once "$mark0" "baseline (1 export, 1 reader)"
base_lz=$(lazybd_origin_requests)
log "baseline: $base_gets data GETs, $base_bytes body bytes; lazybd origin_requests=$base_lz"

# ---- the config: 8 read-only + 2 writable exports of one image
port=$(free_port)
TCP=nbd://127.0.0.1:$port
{
  printf '# written by %s\n[server]\nlisten = ["127.0.0.1:%s"]\ncache_dir = "%s"\ncontrol = "none"\nblock_size = "64k"\n' \
    "$TEST_NAME" "$port" "$T/cache"
  for ((i = 0; i < NRO; i++)); do printf '\n[[export]]\nname = "ro%d"\nimage = "%s"\n' "$i" "$url"; done
  printf '\n[[export]]\nname = "rw0"\nimage = "%s"\nwritable = true\noverlay_dir = "%s"\n' "$url" "$T/overlays/rw0"
  printf '\n[[export]]\nname = "rw1"\nimage = "%s"\nwritable = true\n' "$url"
} > "$T/lazybd.toml"
all_uris=()
for ((i = 0; i < NRO; i++)); do all_uris+=("$TCP/ro$i"); done
all_uris+=("$TCP/rw0" "$TCP/rw1")

mark1=$(origin_mark)
lazybd_spawn --config "$T/lazybd.toml"
lazybd_wait_ready "${all_uris[@]}"
names=$(nbdinfo --list --json "$TCP" | "$NBD_PYTHON" -c \
  'import json,sys; print(" ".join(sorted(e["export-name"] for e in json.load(sys.stdin)["exports"])))')
assert_eq "ro0 ro1 ro2 ro3 ro4 ro5 ro6 ro7 rw0 rw1" "$names" "nbdinfo --list"
for u in "${all_uris[@]}"; do assert_eq "$size" "$(nbdinfo --size "$u")" "size of $u"; done
# Before any read: one data GET for the image, of its first block, which the
# format rule looks at (no format is given); one for all ten exports.
assert_eq 1 "$(origin_data_requests_since "$mark1" /disk.img)" "data GETs before any read"

# ---- 8 concurrent full reads of the 8 read-only exports, cold cache
pids=()
for ((i = 0; i < NRO; i++)); do
  { nbdcopy "$TCP/ro$i" - | cmp - "$img"; } > "$T/read$i.out" 2>&1 &
  pids+=("$!")
done
bg_track "${pids[@]}"
bad=0
for ((i = 0; i < NRO; i++)); do
  wait "${pids[i]}" || { log "reader ro$i failed or read wrong data: $(tr '\n' ' ' < "$T/read$i.out")"; bad=1; }
done
((bad == 0)) || fail "a concurrent reader of the read-only exports failed or read wrong data"
log "$NRO concurrent nbdcopy of ro0..ro$((NRO - 1)): all identical to the origin"
many_gets=$(origin_data_requests_since "$mark1" /disk.img)
many_bytes=$(origin_bytes_since "$mark1" /disk.img)
check_once "$mark1" "$NRO concurrent readers on $NRO exports"
log "origin data GETs: $many_gets with $NRO readers on $NRO exports vs $base_gets with 1 reader on 1 export (bytes $many_bytes vs $base_bytes)"
# Request boundaries depend on timing (readahead windows, coalescing of
# concurrent misses), so the count may differ by a few; the bytes may not.
assert_le "$many_gets" "$((base_gets + base_gets / 4 + 2))" "data GETs: $NRO readers on $NRO exports vs 1 reader on 1 export (fresh caches)"
assert_eq "$size" "$(_origin_lines "$mark1" | awk -F'|' '$2=="GET" && $3=="/disk.img" && $5!="bytes=0-0" {n+=$7} END {printf "%.0f", n+0}')" \
  "body bytes of the data GETs of the $NRO concurrent readers"

# ---- different writes into rw0 and rw1, at the same time
mark2=$(origin_mark)
ops0=("w 1000 5000 0xa1" "w $((2 * M)) $M 0xa2" "w $((ZERO_OFF + 7)) 100 0xa3" "z $((10 * M + 4 * K)) $((B - 8 * K))"
      "w $((40 * M - 3)) $((3 * B)) 0xa4" "w $((size - 512)) 512 0xa5")
ops1=("w 1000 5000 0xb1" "w $((2 * M + 512 * K)) $M 0xb2" "w $((20 * M + 1)) 33 0xb3" "z $((12 * M + 100)) $B"
      "w $((40 * M)) $B 0xb4" "w 0 512 0xb5")
qio_cmds() {  # OPS... -> qemu-io -c arguments, one per line
  local op k off len pat
  for op in "$@"; do
    read -r k off len pat <<<"$op"
    case $k in
      w) printf '%s\n' -c "write -P $pat $off $len" ;;
      z) printf '%s\n' -c "write -z $off $len" ;;
    esac
  done
}
model_ops() {  # OPS... -> image_apply ops
  local op k off len pat
  for op in "$@"; do
    read -r k off len pat <<<"$op"
    case $k in w) echo "$op" ;; z) echo "z $off $len" ;; esac
  done
}
mapfile -t c0 < <(qio_cmds "${ops0[@]}"); mapfile -t c1 < <(qio_cmds "${ops1[@]}")
qemu-io -f raw "$TCP/rw0" "${c0[@]}" -c flush > "$T/qio0.out" 2>&1 & q0=$!
qemu-io -f raw "$TCP/rw1" "${c1[@]}" -c flush > "$T/qio1.out" 2>&1 & q1=$!
bg_track "$q0" "$q1"
wait "$q0" || fail "qemu-io writes to rw0 failed: $(tail -n 3 "$T/qio0.out" | tr '\n' ' ')"
wait "$q1" || fail "qemu-io writes to rw1 failed: $(tail -n 3 "$T/qio1.out" | tr '\n' ' ')"
assert_no_grep 'error|fail|Error' "$T/qio0.out" "qemu-io rw0"
assert_no_grep 'error|fail|Error' "$T/qio1.out" "qemu-io rw1"
cp "$img" "$T/model0.img"; cp "$img" "$T/model1.img"
mapfile -t m0 < <(model_ops "${ops0[@]}"); mapfile -t m1 < <(model_ops "${ops1[@]}")
image_apply "$T/model0.img" "${m0[@]}"
image_apply "$T/model1.img" "${m1[@]}"
cmp -s "$T/model0.img" "$T/model1.img" && fail "test bug: the two models are equal"
cmp -s "$T/model0.img" "$img" && fail "test bug: model0 equals the origin"

assert_export_model "$T/model0.img" "$TCP/rw0"
assert_export_model "$T/model1.img" "$TCP/rw1"
# the read-only exports did not see any of it
for ((i = 0; i < NRO; i++)); do assert_same_as_file "$img" "$TCP/ro$i"; done
assert_eq 0 "$(origin_data_requests_since "$mark2" /disk.img)" \
  "data GETs after the first full read (writes, read-backs, re-reads all served from the cache)"

# ---- restart: the same again from the persisted cache and overlays
lazybd_stop
log "summary: $(lazybd_summary)"
lz_req=$(lazybd_origin_requests)
lz_bytes=$(lazybd_summary | sed -n 's/.* origin_bytes=\([0-9][0-9]*\).*/\1/p')
probe_bytes=$(_origin_lines "$mark1" | awk -F'|' '$2=="GET" && $5=="bytes=0-0" {n+=$7} END {printf "%.0f", n+0}')
probes=$(origin_probes_since "$mark1" /disk.img)
log "lazybd summary: origin_requests=$lz_req origin_bytes=$lz_bytes; nginx: $many_gets data GETs + $probes probe(s) ($probe_bytes bytes)"
assert_eq "$((many_gets + probes))" "$lz_req" "lazybd origin_requests vs nginx's data GETs + probes"
assert_eq "$size" "$lz_bytes" "lazybd origin_bytes (data only) vs the image size"

mark3=$(origin_mark)
lazybd_spawn --config "$T/lazybd.toml"
lazybd_wait_ready "${all_uris[@]}"
assert_export_model "$T/model0.img" "$TCP/rw0"
assert_export_model "$T/model1.img" "$TCP/rw1"
for i in 0 $((NRO - 1)); do assert_same_as_file "$img" "$TCP/ro$i"; done
assert_eq 0 "$(origin_data_requests_since "$mark3" /disk.img)" "data GETs after the restart"
lazybd_stop

assert_eq "$origin_sha" "$(sha_file "$img")" "origin file sha256"
assert_origin_only_read
out=$(lazybd_cache verify "$T/cache" 2>&1) || fail "cache verify failed: $out"
[[ -f $T/overlays/rw0/base ]] || fail "rw0's overlay is not in its overlay_dir: $(ls -R "$T/overlays" 2>&1 | tr '\n' ' ')"
[[ -f $T/cache/overlays/rw1/base ]] || fail "rw1's overlay is not in CACHE_DIR/overlays/rw1: $(ls "$T/cache" "$T/cache/overlays" 2>&1 | tr '\n' ' ')"
[[ ! -e $T/cache/overlays/rw0 ]] || fail "rw0 has an overlay dir under the cache dir too"
log "OK: $NRO read-only + 2 writable exports, one process, the origin read exactly once"
