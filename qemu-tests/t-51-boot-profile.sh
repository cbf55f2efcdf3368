#!/usr/bin/env bash
# t-51-boot-profile: boot profiles with a real VM boot (see t-50 for the image).
#  - record: `serve --record-profile 0` while a VM boots, `lazybd profile
#    stop` saves it (log "boot profile saved"); `profile show` lists ranges
#    covering what the boot read; `profile export` writes it to a file;
#  - import: into a fresh cache (`profile import`); the next start replays it
#    before any guest read: the origin has sent the profile's bytes before
#    qemu even starts (nginx access log), lazybd_profile_bytes_total > 0, and
#    the boot then finds (nearly) everything cached: no origin request while
#    it runs, (almost) no cache misses, nothing fetched twice;
#  - publish: the same file beside the image as base.img.lazybd-profile is
#    fetched at the first start of an empty cache and replayed ("using the
#    boot profile published beside the image"); --no-profile never asks for it;
#  - a damaged published profile is ignored with a warning, the boot works.
. "$(dirname "$0")/lib.sh"
require_cmd nginx nbdinfo curl qemu-system-x86_64

boot_image "$T/origin"
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/base.img
mport=$(free_port)
"$LAZYBD" profile --help >/dev/null 2>&1 || fail "this lazybd has no 'profile' command"

# wait_log ERE SECONDS : until the current lazybd's log has a matching line
wait_log() {
  local deadline=$((SECONDS + $2))
  until lazybd_log_plain | grep -Eq -- "$1"; do
    ((SECONDS < deadline)) || fail "no log line matching /$1/ after $2 s"
    _pid_alive "$LAZYBD_PID" || fail "lazybd exited while waiting for /$1/"
    sleep 0.1
  done
}

# ---- 1. record during a boot, stop the recording, show, export
lazybd_start "$url" --cache-dir "$T/rec" --no-profile --record-profile 0
boot_vm "$LAZYBD_URI"
assert_booted
"$LAZYBD" profile stop --control "$T/rec/control.sock" >"$T/stop.txt" 2>&1 ||
  fail "lazybd profile stop failed: $(cat "$T/stop.txt")"
wait_log 'boot profile saved' 10
lazybd_stop
served=$(lazybd_summary | sed -n 's/.*bytes_served=\([0-9]*\).*/\1/p')
"$LAZYBD" profile show --cache-dir "$T/rec" --image "$url" >"$T/show.txt" 2>&1 ||
  fail "lazybd profile show failed: $(cat "$T/show.txt")"
cat "$T/show.txt" >&2
assert_grep 'ranges: +[0-9]+ covering' "$T/show.txt" "profile show prints the ranges"
"$LAZYBD" profile export --cache-dir "$T/rec" --image "$url" "$T/profile.bin" >"$T/export.txt" 2>&1 ||
  fail "lazybd profile export failed: $(cat "$T/export.txt")"
[[ -s $T/profile.bin ]] || fail "profile export wrote nothing"
log "profile exported: $(stat -c %s "$T/profile.bin") bytes; the recorded boot read $served bytes"

# ---- 2. import into a fresh cache (served once first, so the image is known)
lazybd_start "$url" --cache-dir "$T/imp" --control none --no-profile
lazybd_stop
"$LAZYBD" profile import --cache-dir "$T/imp" --image "$url" "$T/profile.bin" >"$T/import.txt" 2>&1 ||
  fail "lazybd profile import failed: $(cat "$T/import.txt")"
"$LAZYBD" profile show --cache-dir "$T/imp" --image "$url" >"$T/show2.txt" 2>&1 || fail "profile show after import"
assert_eq "$(grep -E '^ranges:' "$T/show.txt")" "$(grep -E '^ranges:' "$T/show2.txt")" "imported profile = recorded one"

m0=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/imp" --control none --metrics "127.0.0.1:$mport"
wait_log 'boot profile replayed' 30
pre_bytes=$(origin_bytes_since "$m0" /base.img)
pb=$(lazybd_metric "$mport" lazybd_profile_bytes_total)
log "replay before the boot: origin sent $pre_bytes bytes; lazybd_profile_bytes_total=$pb"
assert_ge "${pb:-0}" $((16 * MIB)) "lazybd_profile_bytes_total after replay"
assert_ge "$pre_bytes" $((16 * MIB)) "origin bytes sent by the replay before the guest started"
m1=$(origin_mark)
boot_vm "$LAZYBD_URI"
assert_booted
misses=$(lazybd_metric "$mport" lazybd_cache_misses_total)
during=$(origin_data_requests_since "$m1" /base.img)
during_bytes=$(origin_bytes_since "$m1" /base.img)
lazybd_stop
read -r _uniq dup _n < <(origin_ranges_since "$m0" /base.img)
# (what the origin sends during the boot is sequential readahead past the
# profile's ranges, never a guest miss)
log "boot after replay: ${BOOT_S}s, $misses cache misses; during the boot $during origin requests" \
  "($during_bytes bytes, readahead); $dup bytes fetched twice"
assert_le "${misses:-999}" 2 "cache misses of a boot after profile replay"
assert_eq 0 "$dup" "bytes fetched twice (replay + boot)"

# ---- 3. published beside the image: used by an empty cache's first start
cp "$T/profile.bin" "$T/origin/base.img.lazybd-profile"
chmod 0644 "$T/origin/base.img.lazybd-profile"
m2=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/pub" --control none --metrics "127.0.0.1:$mport"
wait_log 'using the boot profile published beside the image' 30
wait_log 'boot profile replayed' 30
sidecar=$(_origin_lines "$m2" | awk -F'|' '$2=="GET" && $3=="/base.img.lazybd-profile" && $4==200 {n++} END {print n+0}')
assert_eq 1 "$sidecar" "GETs of base.img.lazybd-profile (200)"
boot_vm "$LAZYBD_URI"
assert_booted
pb=$(lazybd_metric "$mport" lazybd_profile_bytes_total)
misses=$(lazybd_metric "$mport" lazybd_cache_misses_total)
lazybd_stop
log "published profile: replayed $pb bytes, boot ${BOOT_S}s with $misses misses"
assert_ge "${pb:-0}" $((16 * MIB)) "lazybd_profile_bytes_total with a published profile"
assert_le "${misses:-999}" 2 "cache misses of a boot after the published profile's replay"
# the published profile was kept in the cache: a restart replays nothing new
# and does not fetch the sidecar again
m3=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/pub" --control none
sleep 1
lazybd_stop
assert_eq 0 "$(origin_data_requests_since "$m3" /base.img.lazybd-profile)" "sidecar GETs after a restart"
assert_eq 0 "$(origin_data_requests_since "$m3" /base.img)" "image GETs after a restart of a cache that holds the boot"

# ---- 4. --no-profile never asks for it
m4=$(origin_mark)
lazybd_start "$url" --cache-dir "$T/nop" --control none --no-profile --metrics "127.0.0.1:$mport"
sleep 1
assert_eq 0 "$(lazybd_metric "$mport" lazybd_profile_bytes_total)" "profile bytes with --no-profile"
lazybd_stop
assert_eq 0 "$(origin_data_requests_since "$m4" /base.img.lazybd-profile)" "sidecar GETs with --no-profile"

# ---- 5. a damaged published profile: warning, no replay, the boot works
head -c 200 /dev/urandom >"$T/origin/base.img.lazybd-profile"
lazybd_start "$url" --cache-dir "$T/bad" --control none --metrics "127.0.0.1:$mport"
wait_log 'boot profile not used' 30
boot_vm "$LAZYBD_URI"
assert_booted
assert_eq 0 "$(lazybd_metric "$mport" lazybd_profile_bytes_total)" "profile bytes with a damaged published profile"
lazybd_stop
log "RESULT profile: recorded, exported, imported, published; replay before the boot, damaged one ignored"
