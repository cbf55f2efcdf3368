#!/usr/bin/env bash
# t-03-nbdinfo: what a client learns at handshake, from nbdinfo --json (libnbd
# 1.14 field names): fixed-newstyle protocol, structured replies negotiated, no
# TLS, export "disk" with the origin's size, read-only, base:allocation among
# the meta contexts, and sane NBD_INFO_BLOCK_SIZE (minimum <= preferred <=
# maximum, powers of two, as the NBD spec requires).
. "$(dirname "$0")/lib.sh"
require_cmd nbdinfo nginx

mkimage "$T/origin/disk.img" 64
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache"
size=$(stat -c %s "$T/origin/disk.img")

nbdinfo --json "$LAZYBD_URI" > "$T/info.json" 2> "$T/info.err" ||
  fail "nbdinfo --json $LAZYBD_URI failed: $(cat "$T/info.err")"
log "nbdinfo --json: $(tr -d '\n\t' < "$T/info.json")"

"$NBD_PYTHON" - "$T/info.json" "$size" <<'PY' || fail "nbdinfo --json checks failed (see above)"
import json, sys
j = json.load(open(sys.argv[1])); size = int(sys.argv[2])
errs = []
def check(cond, msg):
    if not cond: errs.append(msg)
check(j.get("protocol") == "newstyle-fixed", f'protocol is {j.get("protocol")!r}, want "newstyle-fixed"')
check(j.get("structured") is True, f'structured replies not negotiated ("structured": {j.get("structured")!r})')
check(j.get("TLS") is False, f'"TLS": {j.get("TLS")!r}')
ex = j.get("exports") or [{}]
e = ex[0]
check(e.get("export-name") == "disk", f'export-name {e.get("export-name")!r}')
check(e.get("export-size") == size, f'export-size {e.get("export-size")} != origin size {size}')
check("base:allocation" in (e.get("contexts") or []), f'contexts {e.get("contexts")} lack base:allocation')
check(e.get("is_read_only") is True, f'is_read_only {e.get("is_read_only")!r}')
check(e.get("can_trim") is not True and e.get("can_zero") is not True,
      f'read-only export advertises can_trim={e.get("can_trim")} can_zero={e.get("can_zero")}')
mn, pr, mx = (e.get("block_size_" + k) for k in ("minimum", "preferred", "maximum"))
if None in (mn, pr, mx):
    errs.append(f"block sizes not advertised (minimum={mn} preferred={pr} maximum={mx})")
else:
    p2 = lambda v: v > 0 and v & (v - 1) == 0
    check(p2(mn) and mn <= 65536, f"block_size_minimum {mn} must be a power of 2 <= 64K")
    check(p2(pr) and pr >= 512 and pr >= mn, f"block_size_preferred {pr} must be a power of 2 >= max(512, minimum)")
    check(mx >= pr and (mx == 0xffffffff or mx % mn == 0), f"block_size_maximum {mx} must be >= preferred and a multiple of minimum")
    print(f"block sizes: minimum={mn} preferred={pr} maximum={mx}; can_multi_conn={e.get('can_multi_conn')} can_cache={e.get('can_cache')} can_flush={e.get('can_flush')}")
for m in errs: print("  -", m)
sys.exit(1 if errs else 0)
PY

# human-readable form says the same
nbdinfo "$LAZYBD_URI" > "$T/info.txt"
assert_grep 'using structured packets' "$T/info.txt" "nbdinfo: structured replies"
assert_grep '^[[:space:]]+base:allocation$' "$T/info.txt" "nbdinfo: base:allocation context"

# the export list (NBD_OPT_LIST) is informational only
if nbdinfo --json --list "nbd://127.0.0.1:$LAZYBD_PORT" > "$T/list.json" 2>&1; then
  log "nbdinfo --list: $(tr -d '\n\t' < "$T/list.json")"
else
  log "note: nbdinfo --list failed: $(tr -d '\n' < "$T/list.json")"
fi

lazybd_stop
