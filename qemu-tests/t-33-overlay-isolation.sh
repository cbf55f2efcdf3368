#!/usr/bin/env bash
# t-33-overlay-isolation: two writable exports of one image (two servers,
# each with its own --cache-dir; A with the default overlay dir, B named vm2
# with an explicit --overlay-dir) written at the same time, with different
# data at overlapping offsets, WRITE_ZEROES and TRIM.
#  - each export reads back exactly its own writes over the origin (full
#    libnbd read vs a model per export), also after both are restarted;
#  - a third server on A's cache dir, and one with its own cache dir but A's
#    overlay dir, must both refuse to start while A runs (non-zero exit,
#    message about the dir being in use), and change nothing;
#  - the origin file is unchanged, nginx saw only GET/HEAD requests (no PUT, POST,
#    ...), both caches verify clean.
. "$(dirname "$0")/lib.sh"
require_cmd qemu-io nginx
require_nbd_python

mkimage "$T/origin/disk.img" 32
origin_sha=$(sha_file "$T/origin/disk.img")
origin_start "$T/origin" >/dev/null
url=$ORIGIN_URL/disk.img
K=1024; M=$((1024 * 1024)); B=$((64 * K))

lazybd_start "$url" --cache-dir "$T/cacheA" --writable
lazybd_stash A
lazybd_start "$url" --cache-dir "$T/cacheB" --writable --name vm2 --overlay-dir "$T/overlayB"
lazybd_stash B
_v=_STASH_A_URI; uriA=${!_v}; _v=_STASH_B_URI; uriB=${!_v}
[[ $uriB == */vm2 ]] || fail "test bug: B's URI $uriB"

opsA=("w 1000 5000 0xa1" "w $((2 * M)) $M 0xa2" "z $((10 * M)) $B" "w $((ZERO_OFF + 7)) 100 0xa3" "w $((12 * M)) $((2 * B)) 0xa4")
opsB=("w 1000 5000 0xb1" "w $((2 * M + 512 * K)) $M 0xb2" "t $((10 * M)) $((2 * B))" "w $((20 * M + 1)) 33 0xb3" "z $((12 * M + 100)) $B")

qio_cmds() {  # OPS... -> qemu-io -c arguments on stdout, one per line
  local op k off len pat
  for op in "$@"; do
    read -r k off len pat <<<"$op"
    case $k in
      w) printf '%s\n' -c "write -P $pat $off $len" ;;
      z) printf '%s\n' -c "write -z $off $len" ;;
      t) printf '%s\n' -c "discard $off $len" ;;
    esac
  done
}
model_ops() {  # OPS... -> image_apply ops (an aligned TRIM reads as zeroes in lazybd)
  local op k off len pat
  for op in "$@"; do
    read -r k off len pat <<<"$op"
    case $k in w) echo "$op" ;; z|t) echo "z $off $len" ;; esac
  done
}

mapfile -t cA < <(qio_cmds "${opsA[@]}"); mapfile -t cB < <(qio_cmds "${opsB[@]}")
# both at once
qemu-io -f raw --discard=unmap "$uriA" "${cA[@]}" -c flush > "$T/qioA.out" 2>&1 & pa=$!
qemu-io -f raw --discard=unmap "$uriB" "${cB[@]}" -c flush > "$T/qioB.out" 2>&1 & pb=$!
bg_track "$pa" "$pb"
wait "$pa" || fail "qemu-io writes to A failed: $(tail -n 3 "$T/qioA.out" | tr '\n' ' ')"
wait "$pb" || fail "qemu-io writes to B failed: $(tail -n 3 "$T/qioB.out" | tr '\n' ' ')"
assert_no_grep 'error|fail|Error' "$T/qioA.out" "qemu-io A"
assert_no_grep 'error|fail|Error' "$T/qioB.out" "qemu-io B"
cp "$T/origin/disk.img" "$T/modelA.img"; cp "$T/origin/disk.img" "$T/modelB.img"
mapfile -t mA < <(model_ops "${opsA[@]}"); mapfile -t mB < <(model_ops "${opsB[@]}")
image_apply "$T/modelA.img" "${mA[@]}"
image_apply "$T/modelB.img" "${mB[@]}"
cmp -s "$T/modelA.img" "$T/modelB.img" && fail "test bug: the two models are equal"

assert_export_model "$T/modelA.img" "$uriA"
assert_export_model "$T/modelB.img" "$uriB"

# the locks: A's cache dir, A's overlay dir
lazybd_expect_start_failure 20 "$url" --cache-dir "$T/cacheA" --writable --listen "127.0.0.1:$(free_port)"
assert_grep 'in use|locked|lock|another' <(lazybd_log_plain) "second server on A's cache dir: error message"
lazybd_expect_start_failure 20 "$url" --cache-dir "$T/cacheC" --writable --overlay-dir "$T/cacheA/overlays/disk" \
  --listen "127.0.0.1:$(free_port)"
assert_grep 'overlay.*(in use|locked|lock)|(in use|locked|lock).*overlay' <(lazybd_log_plain) \
  "second server on A's overlay dir: error message"
assert_export_model "$T/modelA.img" "$uriA"

# restart both: still each its own
for s in A B; do
  lazybd_unstash "$s"; lazybd_stop
done
lazybd_start "$url" --cache-dir "$T/cacheB" --writable --name vm2 --overlay-dir "$T/overlayB"
assert_export_model "$T/modelB.img" "$LAZYBD_URI"
lazybd_stash B2
lazybd_start "$url" --cache-dir "$T/cacheA" --writable
assert_export_model "$T/modelA.img" "$LAZYBD_URI"
lazybd_stop
lazybd_unstash B2; lazybd_stop

assert_eq "$origin_sha" "$(sha_file "$T/origin/disk.img")" "origin file sha256"
assert_origin_only_read
for c in cacheA cacheB; do
  out=$(lazybd_cache verify "$T/$c" 2>&1) || fail "cache verify $c failed: $out"
done
[[ -f $T/overlayB/base && ! -e $T/cacheB/overlays/vm2 ]] ||
  fail "B's overlay is not (only) in --overlay-dir: $(ls "$T/overlayB" "$T/cacheB" 2>&1 | tr '\n' ' ')"
