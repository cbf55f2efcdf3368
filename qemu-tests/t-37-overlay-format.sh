#!/usr/bin/env bash
# t-37-overlay-format: an overlay lazybd cannot read is refused, named and
# left byte-for-byte untouched; `lazybd overlay check` finds damage and
# `--repair` keeps every page that verifies. Image 16 MiB.
#  1. qemu-io writes 1 MiB of 0x5a + flush; SIGTERM.
#  2. The journal's version field (byte 8) set to 3 (a newer lazybd): the
#     server refuses to start, naming the file and the version; `export add`
#     of the same overlay on a running server fails the same way; every file
#     of the overlay is unchanged (sha256). Restored: the 0x5a reads back.
#  3. A flipped bit in the header's checksum-covered bytes: refused likewise.
#  4. overlay check: clean (exit 0); one data page damaged: exit 1, names
#     its offset; --repair: exit 0, that page reads as zeroes, every other
#     written page still reads 0x5a.
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io nbdcopy nginx

mkimage "$T/origin/disk.img" 16
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
OV=$T/overlays/vm
M=$((1024 * 1024))

overlay_sums() { (cd "$OV" && sha256sum base journal pages); }
expect_refused() {  # WHAT : the server must not start on the damaged overlay
  lazybd_expect_start_failure 30 "$url" --cache-dir "$T/cache" --writable --overlay-dir "$OV" \
    --listen "127.0.0.1:$(free_port)" --control none
  assert_grep "$OV/journal" "$LAZYBD_LOG" "the refusal names the journal ($1)"
  assert_grep "$2" "$LAZYBD_LOG" "the refusal says what is wrong ($1)"
  assert_eq "$sums" "$(overlay_sums)" "overlay files after the refused start ($1)"
}

# ---- 1
lazybd_start "$url" --cache-dir "$T/cache" --writable --overlay-dir "$OV" --control none
qemu-io -f raw "$LAZYBD_URI" -c "write -P 0x5a $M $M" -c flush >"$T/qio.out" 2>&1 ||
  fail "qemu-io write failed: $(cat "$T/qio.out")"
lazybd_stop
sums=$(overlay_sums)

# ---- 2: a newer format version
cp "$OV/journal" "$T/journal.orig"
printf '\x03' | dd of="$OV/journal" bs=1 seek=8 conv=notrunc status=none
sums=$(overlay_sums)
expect_refused "newer version" "format version 3, written by a newer lazybd"
# The same through the control socket of a running server.
ctl=$T/control.sock
lazybd_start "$url" --cache-dir "$T/cache" --name other --control "$ctl"
if out=$("$LAZYBD" export add vm --image "$url" --writable --overlay-dir "$OV" --control "$ctl" 2>&1); then
  fail "export add of a newer-format overlay succeeded: $out"
fi
assert_grep "newer lazybd" <(echo "$out") "export add refusal says why"
assert_grep "$OV/journal" <(echo "$out") "export add refusal names the file"
assert_eq "$sums" "$(overlay_sums)" "overlay files after the refused export add"
lazybd_stop
cp "$T/journal.orig" "$OV/journal"
log "a newer format version is refused and left untouched"

# ---- 3: a damaged header
printf '\x77' | dd of="$OV/journal" bs=1 seek=30 conv=notrunc status=none
sums=$(overlay_sums)
expect_refused "damaged header" "checksum mismatch"
cp "$T/journal.orig" "$OV/journal"
lazybd_start "$url" --cache-dir "$T/cache" --writable --overlay-dir "$OV" --control none
qemu-io -f raw -r "$LAZYBD_URI" -c "read -P 0x5a $M $M" >"$T/qio.out" 2>&1 ||
  fail "after restoring the header the writes do not read back: $(cat "$T/qio.out")"
assert_no_grep 'Pattern verification failed|error' "$T/qio.out" "read back after restore"
lazybd_stop
log "a damaged header is refused; restored, every write reads back"

# ---- 4: overlay check / --repair
"$LAZYBD" overlay check "$OV" >"$T/check.out" 2>&1 || fail "overlay check of a clean overlay: $(cat "$T/check.out")"
assert_grep '^ok: .* 256 data pages' "$T/check.out" "clean check"
# Damage the 11th data slot (slots start at byte 4096 of pages).
printf '\x00\x01\x02' | dd of="$OV/pages" bs=1 seek=$((11 * 4096 + 100)) conv=notrunc status=none
rc=0; "$LAZYBD" overlay check "$OV" >"$T/check.out" 2>&1 || rc=$?
assert_eq 1 "$rc" "overlay check exit status on damage ($(cat "$T/check.out"))"
assert_grep 'DAMAGED: .* 1 damaged' "$T/check.out" "damage is reported"
bad=$(sed -n 's/.*damaged pages at byte offsets: \([0-9]*\).*/\1/p' "$T/check.out")
[[ -n $bad ]] || fail "no damaged offset in: $(cat "$T/check.out")"
"$LAZYBD" overlay check --repair "$OV" >"$T/check.out" 2>&1 || fail "repair failed: $(cat "$T/check.out")"
assert_grep 'REPAIRED' "$T/check.out" "repair reported"
"$LAZYBD" overlay check "$OV" >"$T/check.out" 2>&1 || fail "check after repair: $(cat "$T/check.out")"
lazybd_start "$url" --cache-dir "$T/cache" --writable --overlay-dir "$OV" --control none
qemu-io -f raw -r "$LAZYBD_URI" -c "read -P 0 $bad 4096" -c "read -P 0x5a $M $((bad - M))" \
  -c "read -P 0x5a $((bad + 4096)) $((2 * M - bad - 4096))" >"$T/qio.out" 2>&1 ||
  fail "after repair: $(cat "$T/qio.out")"
assert_no_grep 'Pattern verification failed|error' "$T/qio.out" "reads after repair"
lazybd_stop
log "overlay check finds the damaged page at $bad; --repair zeroes it and keeps the other 255"
log "PASS"
