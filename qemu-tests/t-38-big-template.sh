#!/usr/bin/env bash
# t-38-big-template: metadata grows with what is written, not with the
# image. A 1 TiB sparse template (local file, 8 MiB of data at 100 GiB):
#  1. serve it writable: after reading the data and a few other places, the
#     cache directory and the overlay directory each hold under 1 MiB on
#     disk (the cache map of a 1 TiB image is 1 GiB of address space), and
#     RSS stays under 64 MiB;
#  2. write 1 GiB (qemu-io) and flush: the overlay's journal
#     and headers stay under 16 MiB; `export list` reports the bytes held
#     (a counter); reads give back what was written, and the template's
#     data where nothing was.
# (The attach time is measured by bench/attach.sh, not here: no timing
# checks in tests.)
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io nbdinfo
T_IMG=$T/origin/big.img
mkdir -p "$T/origin"
truncate -s 1T "$T_IMG"
head -c $((8 << 20)) /dev/urandom > "$T/data.bin"
dd if="$T/data.bin" of="$T_IMG" bs=1M seek=$((100 * 1024)) conv=notrunc status=none
ctl=$T/control.sock
lazybd_start "$T_IMG" --cache-dir "$T/cache" --writable --overlay-dir "$T/ov" --control "$ctl"
assert_eq $((1 << 40)) "$(nbdinfo --size "$LAZYBD_URI")" "size of the 1 TiB export"
G=$((1 << 30))
qemu-io -f raw -r "$LAZYBD_URI" -c "read 0 1M" -c "read $((512 * G)) 1M" -c "read $(((1 << 40) - (1 << 20))) 1M" \
  > "$T/qio.out" 2>&1 || fail "reads of the 1 TiB export: $(cat "$T/qio.out")"
"$NBD_PYTHON" - "$LAZYBD_URI" "$T/data.bin" <<'PY' || fail "the template's data reads wrong"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
want = open(sys.argv[2], "rb").read()
if h.pread(len(want), 100 << 30) != want: sys.exit("8 MiB at 100 GiB differ from the template")
PY
du_k() { du -sk "$1" | cut -f1; }
cache_k=$(du_k "$T/cache"); ov_k=$(du_k "$T/ov")
rss_k=$(awk '/^VmRSS/ {print $2}' "/proc/$LAZYBD_PID/status")
log "untouched writable export of a 1 TiB template: cache dir ${cache_k} KiB (8 MiB of it data), overlay ${ov_k} KiB, RSS ${rss_k} KiB"
assert_le "$ov_k" 1024 "KiB on disk of an untouched overlay of a 1 TiB template"
assert_le "$((cache_k - 8 * 1024))" 1024 "KiB of cache metadata for a 1 TiB template after 8 MiB read"
assert_le "$rss_k" $((64 * 1024)) "RSS KiB serving a 1 TiB template"

# ---- 2: 1 GiB written
qemu-io -f raw "$LAZYBD_URI" -c "write -P 0x3c $((200 * G)) 1G" -c flush > "$T/qio.out" 2>&1 ||
  fail "writing 1 GiB: $(tail -n 3 "$T/qio.out")"
meta_k=$(( $(du -k "$T/ov/journal" | cut -f1) + 4 ))
pages_k=$(du_k "$T/ov/pages")
log "after writing 1 GiB: overlay journal ${meta_k} KiB, pages ${pages_k} KiB"
assert_le "$meta_k" $((16 * 1024)) "KiB of overlay metadata after 1 GiB written"
held=$("$LAZYBD" export list --json --control "$ctl" | python3 -c 'import json,sys; print([e for e in json.load(sys.stdin) if e["name"]=="disk"][0]["overlay_bytes"])')
assert_eq "$G" "$held" "overlay bytes in export list"
qemu-io -f raw -r "$LAZYBD_URI" -c "read -P 0x3c $((200 * G)) 1M" -c "read -P 0x3c $((201 * G - (1 << 20))) 1M" \
  -c "read -P 0 $((300 * G)) 1M" > "$T/qio.out" 2>&1 || fail "read back: $(cat "$T/qio.out")"
assert_no_grep 'Pattern verification failed' "$T/qio.out" "read back of the 1 GiB written"
lazybd_stop
log "PASS"
