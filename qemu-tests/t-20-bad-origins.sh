#!/usr/bin/env bash
# t-20-bad-origins: lazybd refuses, at start and with a non-zero exit, origins
# it cannot serve correctly: one that ignores Range (200 with the whole body,
# nginx max_ranges 0), a 404, a port where nothing listens, and a missing
# local file. (It must not start serving and fail later, nor serve garbage.)
. "$(dirname "$0")/lib.sh"
require_cmd nginx

mkimage "$T/origin/norange/disk.img" 16
origin_start "$T/origin" >/dev/null
dead=$(free_port)

lazybd_expect_start_failure 30 "$ORIGIN_URL/norange/disk.img" --cache-dir "$T/cache" --listen "127.0.0.1:$(free_port)"
lazybd_expect_start_failure 30 "$ORIGIN_URL/missing.img" --cache-dir "$T/cache" --listen "127.0.0.1:$(free_port)"
lazybd_expect_start_failure 60 "http://127.0.0.1:$dead/disk.img" --cache-dir "$T/cache" --listen "127.0.0.1:$(free_port)"
lazybd_expect_start_failure 30 "$T/no/such/file.img" --cache-dir "$T/cache" --listen "127.0.0.1:$(free_port)"
