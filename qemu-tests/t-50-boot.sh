#!/usr/bin/env bash
# t-50-boot: a real VM boots from lazybd (qemu-system-x86_64, TCG).
# The image (qemu-tests/boot-image.sh, cached between runs) is a BIOS disk:
# SeaBIOS reads syslinux, the Debian cloud kernel and an initramfs through
# the NBD disk; /init reads the 16 MiB data partition through virtio-blk and
# checks its sha256, then prints LAZYBD-BOOT-OK on the serial console.
#  - reference: the same image booted from the local file;
#  - cold: lazybd with an empty cache (nginx origin on loopback) boots it;
#    reported: time to the marker, origin requests and bytes (nginx access
#    log; no byte fetched twice), bytes the guest read (/metrics and the exit
#    summary);
#  - warm: lazybd restarted on the same cache boots it with no origin data
#    request at all;
#  - writable: a --writable export (copy-on-write overlay) boots; the guest
#    writes a record, which reads back from the export, also after a
#    restart, while the origin file is unchanged and saw only GET/HEAD.
. "$(dirname "$0")/lib.sh"
require_cmd nginx nbdinfo curl qemu-system-x86_64
require_nbd_python

boot_image "$T/origin"
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/base.img
size=$(stat -c %s "$BOOT_IMG")
orig_sha=$(sha_file "$BOOT_IMG")
mport=$(free_port)

# ---- reference: the local file
boot_vm "$BOOT_IMG"
assert_booted
local_s=$BOOT_S

# ---- cold
m0=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/cache" --control none --no-profile --metrics "127.0.0.1:$mport"
boot_vm "$LAZYBD_URI"
assert_booted
cold_s=$BOOT_S
read_bytes=$(lazybd_metric "$mport" lazybd_read_bytes_total)
read_reqs=$(lazybd_metric "$mport" lazybd_read_requests_total)
ra_bytes=$(lazybd_metric "$mport" lazybd_readahead_bytes_total)
lazybd_stop
summary=$(lazybd_summary)
cold_reqs=$(origin_data_requests_since "$m0" /base.img)
cold_bytes=$(origin_bytes_since "$m0" /base.img)
read -r uniq dup nranges < <(origin_ranges_since "$m0" /base.img)
log "cold boot: ${cold_s}s (local file ${local_s}s); origin: $cold_reqs data requests, $cold_bytes bytes" \
  "($uniq distinct, $dup fetched twice); guest read $read_bytes bytes in $read_reqs requests; readahead $ra_bytes bytes"
log "cold summary: $summary"
[[ -n $read_bytes ]] || fail "no lazybd_read_bytes_total in /metrics"
# the guest read the 16 MiB data partition and the kernel through the export
assert_ge "$read_bytes" $((20 * MIB)) "bytes the guest read"
assert_ge "$cold_reqs" 1 "origin data requests of a cold boot"
assert_eq 0 "$dup" "bytes the origin sent twice during the cold boot"
assert_le "$cold_bytes" "$((size + 1))" "origin bytes of a cold boot"
sb=$(sed -n 's/.*bytes_served=\([0-9]*\).*/\1/p' <<<"$summary")
assert_eq "$read_bytes" "$sb" "metrics read bytes vs the exit summary's bytes_served"

# ---- warm: same cache, restarted server
m1=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/cache" --control none --no-profile
boot_vm "$LAZYBD_URI"
assert_booted
warm_s=$BOOT_S
lazybd_stop
assert_eq 0 "$(origin_data_requests_since "$m1" /base.img)" "origin data requests of a warm boot"
assert_eq 0 "$(lazybd_summary | sed -n 's/.*origin_bytes=\([0-9]*\).*/\1/p')" "origin_bytes in the warm server's summary"
assert_eq 0 "$(lazybd_summary | sed -n 's/.* misses=\([0-9]*\).*/\1/p')" "misses in the warm server's summary"

# ---- writable export: copy-on-write overlay
lazybd_start "$url" --cache-dir "$T/cache" --control none --no-profile --writable --name vm1 \
  --overlay-dir "$T/overlay-vm1"
BOOT_READONLY=off boot_vm "$LAZYBD_URI"
assert_booted
rw_s=$BOOT_S
[[ $BOOT_WROTE == "$BOOT_WRITE_OFF":* ]] || fail "the guest did not report its write on the writable export ($BOOT_LINE)"
id=${BOOT_WROTE#*:}
check_record() {  # the guest's record reads back from the export
  "$NBD_PYTHON" - "$LAZYBD_URI" "$BOOT_WRITE_OFF" "LAZYBD-WRITE $id" <<'PY' || fail "the guest's write does not read back from $LAZYBD_URI"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
got = h.pread(4096, int(sys.argv[2]))
h.shutdown()
want = sys.argv[3].encode()
print(f"record at {sys.argv[2]}: {got[:len(want)]!r}")
sys.exit(0 if got.startswith(want + b"\n") and got[len(want) + 1:] == bytes(4096 - len(want) - 1) else 1)
PY
}
check_record
lazybd_stop
lazybd_start "$url" --cache-dir "$T/cache" --control none --no-profile --writable --name vm1 \
  --overlay-dir "$T/overlay-vm1"
check_record
lazybd_stop
assert_eq "$orig_sha" "$(sha_file "$BOOT_IMG")" "the origin image after a writable boot"
assert_origin_only_read

log "RESULT boot: local ${local_s}s, cold ${cold_s}s (origin $cold_reqs requests, $((cold_bytes / 1024)) KiB;" \
  "guest read $((read_bytes / 1024)) KiB in $read_reqs requests), warm ${warm_s}s (0 origin requests), writable ${rw_s}s"
