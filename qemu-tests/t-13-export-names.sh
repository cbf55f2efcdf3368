#!/usr/bin/env bash
# t-13-export-names: with --name vm1 the export answers to "vm1" and to the
# empty name "" (same size, same bytes); other names ("disk", "nope") are
# refused at handshake.
. "$(dirname "$0")/lib.sh"
require_cmd nbdinfo qemu-img nginx

mkimage "$T/origin/disk.img" 64
size=$(stat -c %s "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
lazybd_start "$ORIGIN_URL/disk.img" --cache-dir "$T/cache" --name vm1
base=nbd://127.0.0.1:$LAZYBD_PORT

assert_eq "$size" "$(nbdinfo --size "$base/vm1")" "size of export vm1"
assert_eq "$size" "$(nbdinfo --size "$base")" "size of export \"\""
out=$(qemu-img compare -f raw -F raw "$T/origin/disk.img" "$base/vm1" 2>&1) || fail "compare vm1: $out"
assert_same_as_file "$T/origin/disk.img" "$base/"
for n in disk nope; do
  if out=$(nbdinfo --size "$base/$n" 2>&1); then
    fail "export name '$n' was accepted (size $out); only 'vm1' and '' should be"
  fi
  log "export '$n' refused: $(echo "$out" | head -n 1)"
done
# the server is still fine after refused handshakes
assert_eq "$size" "$(nbdinfo --size "$base/vm1")" "size of export vm1 after refused names"
lazybd_stop
