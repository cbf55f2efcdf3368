#!/usr/bin/env python3
"""Replay a boot trace against an NBD export: a light stand-in for a VM's
boot, so many hosts fit on 2 cores (bench/cluster.sh).

Usage: replay.py URI TRACE [QD]
TRACE: `lazybd profile show --all` output (lines "  N  [OFFSET+LEN]"), the
ranges in the order the boot first read them. Reads them in that order with
up to QD (4) in flight, each at most 1 MiB, and prints "replay s=SECONDS
bytes=N reads=N". Exit 1 on a read error."""
import re
import sys
import time

import nbd

uri, trace = sys.argv[1], sys.argv[2]
qd = int(sys.argv[3]) if len(sys.argv) > 3 else 4
ranges = []
for line in open(trace):
    m = re.search(r"\[(\d+)\+(\d+)\]", line)
    if m:
        off, ln = int(m.group(1)), int(m.group(2))
        while ln > 0:
            n = min(ln, 1 << 20)
            ranges.append((off, n))
            off, ln = off + n, ln - n
if not ranges:
    sys.exit(f"replay: no ranges in {trace}")
h = nbd.NBD()
h.connect_uri(uri)
t0 = time.monotonic()
inflight, total, i = [], 0, 0
while i < len(ranges) or inflight:
    while i < len(ranges) and len(inflight) < qd:
        off, n = ranges[i]
        inflight.append(h.aio_pread(nbd.Buffer(n), off))
        total += n
        i += 1
    h.poll(-1)
    inflight = [c for c in inflight if not h.aio_command_completed(c)]
print(f"replay s={time.monotonic() - t0:.3f} bytes={total} reads={len(ranges)}")
h.shutdown()
