#!/usr/bin/env bash
# t-57-peers: hosts sharing their caches (--peer-listen, --peers), on
# loopback, with a real nginx origin and a published manifest.
#   1. three hosts read the whole image one after another: each 1 MiB unit
#      comes from the origin once (at its owner), origin bytes <= 1.1x the
#      image; every host's copy is identical; the later hosts' bytes came
#      from peers
#   2. a liar among the peers (right status, Content-Range and length,
#      flipped bytes) and a dead peer: a fresh host still reads the exact
#      image, the liar's blocks are refused (manifest_failures), and the
#      dead peer's units come from the origin
#   3. the endpoint wants the token (401 without); an image without a
#      manifest is not fetched from peers unless --peer-trust
#   4. a peers file, re-read on SIGHUP: a host alone in it reads the origin;
#      once another host is added and the file re-read, it reads from it
. "$(dirname "$0")/lib.sh"
require_cmd nbdcopy curl nginx python3

mkimage "$T/origin/disk.img" 24
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
size=$(stat -c %s "$T/origin/disk.img")
(cd "$T/origin" && "$LAZYBD" manifest build "$url" --no-progress >/dev/null) || fail "manifest build"
printf 'peer-secret-%s\n' "$RANDOM$RANDOM" > "$T/token"

ports=(); for i in 1 2 3 4 5; do ports+=("$(free_port)"); done
liar_port=$(free_port)
peer_url() { echo "http://127.0.0.1:${ports[$1]}"; }
all="$(peer_url 0),$(peer_url 1),$(peer_url 2)"

declare -A HOSTLOG
host() {  # host N IMAGE PEERS [ARGS...] : start lazybd N (stashed as hN)
  local n=$1 image=$2 peers=$3; shift 3
  lazybd_start "$image" --cache-dir "$T/cache$n" --control none --peer-listen "127.0.0.1:${ports[$n]}" \
    --peers "$peers" --peer-token-file "$T/token" --peer-timeout 2000 --no-readahead "$@"
  HOSTLOG[$n]=$LAZYBD_LOG
  lazybd_stash "h$n"
}
stop_hosts() { local n; for n in "$@"; do lazybd_unstash "h$n"; lazybd_stop; done; }
counter() {  # counter N NAME : the host's final summary value of NAME
  grep -o " $2=[0-9]*" "${HOSTLOG[$1]}" | tail -n 1 | cut -d= -f2
}

# ---- 1. three hosts, one origin fetch per unit
for n in 0 1 2; do host $n "$url" "$all"; done
m=$(origin_mark)
for n in 0 1 2; do
  lazybd_unstash "h$n"; assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"; lazybd_stash "h$n"
done
bytes=$(origin_bytes_since "$m" /disk.img)
log "three hosts read the image: $bytes origin bytes for a $size-byte image (unique, dup, GETs: $(origin_ranges_since "$m" /disk.img))"
assert_le "$bytes" $((size * 11 / 10)) "origin bytes for three hosts <= 1.1x one image"
code=$(curl -s -o /dev/null -w '%{http_code}' -r 0-4095 "$(peer_url 0)/v1/images/x")
assert_eq 401 "$code" "the peer endpoint without the token"
stop_hosts 0 1 2
peer_total=0
for n in 0 1 2; do peer_total=$((peer_total + $(counter $n peer_bytes))); done
log "bytes fetched from peers by the three hosts: $peer_total"
assert_ge "$peer_total" "$size" "the hosts read each other's units from their peers"
assert_eq 0 "$(counter 0 manifest_failures)" "no honest peer's bytes refused"

# ---- 2. a liar and a dead peer
python3 "$(dirname "$0")/liar_peer.py" "$liar_port" "$T/origin/disk.img" &
bg_track $!
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$liar_port/" -r 0-0 && break; sleep 0.1; done
host 0 "$url" "$all"
host 1 "$url" "$all"
# Host 2 is dead (not running); the liar is in the list.
m=$(origin_mark)
host 3 "$url" "$all,http://127.0.0.1:$liar_port,$(peer_url 3)"
lazybd_unstash h3
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"
lazybd_stash h3
stop_hosts 3 0 1
log "host 3: peer_bytes=$(counter 3 peer_bytes) peer_failures=$(counter 3 peer_failures) manifest_failures=$(counter 3 manifest_failures), origin bytes $(origin_bytes_since "$m" /disk.img)"
assert_ge "$(counter 3 manifest_failures)" 1 "the liar's bytes were refused"
assert_ge "$(counter 3 peer_failures)" 2 "the liar and the dead peer counted as failures"
assert_ge "$(counter 3 peer_bytes)" $((MIB)) "the honest peers still served"
assert_grep 'a peer sent bytes that do not match the manifest' "${HOSTLOG[3]}" "the lie is logged"

# ---- 3. no manifest: peers only with --peer-trust
mkimage "$T/origin/plain.img" 8
purl=$ORIGIN_URL/plain.img
two="$(peer_url 0),$(peer_url 1)"
host 0 "$purl" "$two" --peer-trust
lazybd_unstash h0; assert_same_as_file "$T/origin/plain.img" "$LAZYBD_URI"; lazybd_stash h0
host 1 "$purl" "$two" --peer-trust
lazybd_unstash h1; assert_same_as_file "$T/origin/plain.img" "$LAZYBD_URI"; lazybd_stash h1
host 4 "$purl" "$(peer_url 0),$(peer_url 4)"
lazybd_unstash h4; assert_same_as_file "$T/origin/plain.img" "$LAZYBD_URI"; lazybd_stash h4
stop_hosts 0 1 4
assert_ge "$(counter 1 peer_bytes)" $((MIB)) "with --peer-trust, an image without a manifest uses peers"
assert_eq 0 "$(counter 4 peer_bytes)" "without it, no peer bytes"
assert_grep 'no manifest for this image: its blocks are not fetched from peers' "${HOSTLOG[4]}" \
  "the refusal to use peers is said"

# ---- 4. a peers file re-read on reload
echo "$(peer_url 3)" > "$T/peers"
host 0 "$url" "$(peer_url 0),$(peer_url 3)"
lazybd_start "$url" --cache-dir "$T/cache-pf" --control none --peer-listen "127.0.0.1:${ports[3]}" \
  --peers-file "$T/peers" --peer-token-file "$T/token" --no-readahead
HOSTLOG[3]=$LAZYBD_LOG
nbd_read_ok "$LAZYBD_URI" 0 "$T/origin/disk.img" || fail "read before the reload"
printf '# the cluster\n%s\n%s\n' "$(peer_url 0)" "$(peer_url 3)" > "$T/peers"
kill -HUP "$LAZYBD_PID"
for _ in $(seq 50); do [[ $(grep -c 'peers list read' "$LAZYBD_LOG") -ge 2 ]] && break; sleep 0.1; done
assert_grep 'peers list read peers=2' "$LAZYBD_LOG" "the peers file was re-read"
assert_same_as_file "$T/origin/disk.img" "$LAZYBD_URI"
lazybd_stop
stop_hosts 0
assert_ge "$(counter 3 peer_bytes)" $((MIB)) "after the reload the new peer served"
