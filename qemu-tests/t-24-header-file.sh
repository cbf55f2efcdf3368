#!/usr/bin/env bash
# t-24-header-file: origin secrets kept off the command line, and rotated
# without a restart. The origin (nginx /secure/) answers 403 unless the
# request has "X-Test-Token: <token>"; the token is changed by rewriting
# nginx's configuration and restarting it on its port.
#   1. --header-file FILE: reads match; the token is in neither lazybd's
#      command line (/proc/PID/cmdline) nor its log
#   2. the origin's token rotates: an uncached read fails (EIO); the file
#      is rewritten and SIGHUP sent: the next uncached read succeeds; again
#      with `lazybd reload` (control socket), which reports the origin
#   3. a broken header file: `lazybd reload` exits 1 naming the file and
#      line (never the value); the previous header stays in use
#   4. LAZYBD_HEADERS in the environment, for serve and for copy; copy
#      --header-file
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy nginx
require_nbd_python

export ORIGIN_TOKEN=tok-Alpha-1
mkimage "$T/origin/secure/disk.img" 16
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/secure/disk.img
img=$T/origin/secure/disk.img

# The origin now wants TOKEN (nginx restarted on its port; waits until it says so).
rotate_origin() {
  local new=$1
  # A restart, not a reload: old workers of a reload keep serving the
  # connections lazybd has open, with the old token, for as long as they like.
  origin_stop
  sed -i "s/\"$ORIGIN_TOKEN\"/\"$new\"/" "$NGINX_STATE/nginx.conf"
  origin_resume
  for _ in $(seq 100); do
    if curl -fsS -o /dev/null -r 0-0 -H "X-Test-Token: $new" "$url" 2>/dev/null &&
      ! curl -fsS -o /dev/null -r 0-0 -H "X-Test-Token: $ORIGIN_TOKEN" "$url" 2>/dev/null; then
      ORIGIN_TOKEN=$new
      log "origin token rotated"
      return 0
    fi
    sleep 0.05
  done
  fail "nginx did not take the new token"
}

# read_at OFF : 64 KiB at OFF of the export equal the image's (lib.sh)
read_at() { nbd_read_ok "$LAZYBD_URI" "$1" "$img"; }

# ---- 1. the token from a file
printf '# X-Test-Token is rotated by the sidecar\n\nX-Test-Token: %s\n' "$ORIGIN_TOKEN" > "$T/auth.headers"
chmod 600 "$T/auth.headers"
lazybd_start "$url" --cache-dir "$T/cache" --header-file "$T/auth.headers" --no-readahead \
  --control "$T/ctl.sock" --origin-deadline 3
read_at 0 || fail "read with the token from the header file"
cmdline=$(tr '\0' ' ' < "/proc/$LAZYBD_PID/cmdline")
[[ $cmdline != *tok-* ]] || fail "the token is on lazybd's command line: $cmdline"
log "command line: $cmdline"

# ---- 2. rotation: SIGHUP, then `lazybd reload`
rotate_origin tok-Beta-2
out=$(read_at $((1 * MIB))) && fail "an uncached read with a stale token succeeded"
log "stale token: $out"
printf 'X-Test-Token: %s\n' "$ORIGIN_TOKEN" > "$T/auth.headers"
kill -HUP "$LAZYBD_PID"
for _ in $(seq 100); do grep -q 'reload done' "$LAZYBD_LOG" && break; sleep 0.05; done
assert_grep 'reload done origins=1' "$LAZYBD_LOG" "SIGHUP reloaded the origin"
read_at $((2 * MIB)) || fail "read after SIGHUP with the rotated token"
kill -0 "$LAZYBD_PID" || fail "lazybd exited on SIGHUP"

rotate_origin tok-Gamma-3
printf 'X-Test-Token: %s\n' "$ORIGIN_TOKEN" > "$T/auth.headers"
out=$("$LAZYBD" reload --control "$T/ctl.sock" 2>&1) || fail "lazybd reload: $out"
assert_eq "ok: 1 origin(s) re-read their files" "$out" "lazybd reload's answer"
read_at $((3 * MIB)) || fail "read after lazybd reload with the rotated token"

# ---- 3. a broken file: refused, the previous header kept
printf 'X-Test-Token tok-Delta-4\n' > "$T/auth.headers"
if out=$("$LAZYBD" reload --control "$T/ctl.sock" 2>&1); then
  fail "lazybd reload accepted a broken header file: $out"
fi
log "broken file: $out"
[[ $out == *"$T/auth.headers"*"line 1"* ]] || fail "the error does not name the file and line: $out"
[[ $out != *tok-Delta-4* ]] || fail "the error shows the file's value: $out"
read_at $((4 * MIB)) || fail "read after a failed reload (the previous token should stay)"
lazybd_stop
assert_no_grep 'tok-(Alpha|Beta|Gamma|Delta)' "$LAZYBD_LOG" "a token in lazybd's log"

# ---- 4. LAZYBD_HEADERS, for serve and copy; copy --header-file
LAZYBD_HEADERS="X-Test-Token: $ORIGIN_TOKEN" lazybd_start "$url" --cache-dir "$T/cache-env" --control none
assert_same_as_file "$img" "$LAZYBD_URI"
lazybd_stop
out=$(LAZYBD_HEADERS="X-Test-Token: $ORIGIN_TOKEN" "$LAZYBD" copy --no-progress "$url" "$T/copy-env.img" 2>&1) ||
  fail "copy with LAZYBD_HEADERS: $out"
cmp "$img" "$T/copy-env.img" || fail "copy with LAZYBD_HEADERS differs"
printf 'X-Test-Token: %s\n' "$ORIGIN_TOKEN" > "$T/auth.headers"
out=$("$LAZYBD" copy --no-progress --header-file "$T/auth.headers" "$url" "$T/copy-file.img" 2>&1) ||
  fail "copy --header-file: $out"
cmp "$img" "$T/copy-file.img" || fail "copy --header-file differs"
log "LAZYBD_HEADERS (serve, copy) and copy --header-file: identical"
