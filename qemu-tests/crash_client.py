#!/usr/bin/python3
"""crash_client.py — the client and the oracle of the crash loop
(qemu-tests/t-60-crash-loop.sh, bench/crash.sh). Needs python3-libnbd.

The export is seen as 4 KiB pages. The model (a JSON state file) holds,
for every page, what it must read as:
   -1  the origin image's bytes (never written)
    0  zeroes (WRITE_ZEROES)
   v>0 the content of write version v: gen(page, v) — a 16-byte header
       "LZBD" + page + version, then bytes derived from (page, version) by
       BLAKE2b, so a page identifies the write it came from and a torn page
       (half old, half new) matches nothing.

Modes:
  init STATE PAGES
      a fresh model: every page is the origin's.
  load URI --origin FILE --state STATE --journal J --seed N --marker M
       --ready R --stats OUT
      Mixed load on one connection, up to 8 requests in flight on disjoint
      page ranges: writes of 1..16 pages (half of them inside a 4 MiB hot
      region, so pages are rewritten in place), WRITE_ZEROES of 1..32
      pages, reads of 1..32 pages checked strictly against the model (every
      acknowledged write must be seen), and a FLUSH every 3..12 operations
      (after draining: a FLUSH covers every write acknowledged before it).
      The journal J is append-only and fsync'd: "W page count version" or
      "Z page count" is written before the request is sent, "F" after a
      FLUSH is acknowledged. Runs until the connection dies; an NBD error
      is expected only once the driver has created the marker file M (it
      does so just before SIGKILL); any other error, or a wrong read, is a
      failure (exit 3). Stats (ops, acknowledged-but-unflushed writes) go to
      OUT as JSON.
  roload URI --origin FILE --seed N --marker M --ready R --stats OUT
      Reads of a read-only export (random 4 KiB..1 MiB, some unaligned, and
      a sequential stream), 4 in flight, each compared with the origin file
      as soon as it completes; same error rules as load.
  verify URI --origin FILE --state STATE --journal J [--load-stats OUT]
         --report REPORT
      After the restart: every page must read as the durable state (the
      model plus every journalled operation before the last "F") or as one
      of the operations journalled after the last "F" that touched it
      (unflushed writes may or may not have persisted; a page is never
      torn). Writes STATE re-synced to what was read (the next cycle
      continues from it) and REPORT (JSON counts). Exit 1 on any wrong page.
"""
import hashlib
import json
import mmap
import os
import random
import struct
import sys
import time

PAGE = 4096
MAGIC = b"LZBD"
ZERO_PAGE = bytes(PAGE)


def gen(p, v):
    d = hashlib.blake2b(struct.pack("<QQ", p, v), digest_size=64).digest()
    return struct.pack("<4sIQ", MAGIC, p & 0xFFFFFFFF, v) + d[16:] + d * 63


class Origin:
    def __init__(self, path):
        self.f = open(path, "rb")
        self.m = mmap.mmap(self.f.fileno(), 0, prot=mmap.PROT_READ)
        self.size = len(self.m)

    def page(self, p):
        return self.m[p * PAGE:(p + 1) * PAGE]

    def expected(self, p, val):
        if val == -1:
            return self.page(p)
        if val == 0:
            return ZERO_PAGE
        return gen(p, val)


def describe(origin, p, data):
    """What a page holds, for messages."""
    if data == origin.page(p):
        return "origin"
    if data == ZERO_PAGE:
        return "zeroes"
    if data[:4] == MAGIC:
        _, pp, v = struct.unpack("<4sIQ", data[:16])
        if pp == p and gen(p, v) == data:
            return f"version {v}"
        return f"header of page {pp} version {v} but not its content (torn or misplaced)"
    return f"unknown bytes {data[:16].hex()}.."


def load_state(path):
    return json.load(open(path))


def save_state(path, st):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.replace(tmp, path)


def arg(name, default=None):
    a = sys.argv
    if name in a:
        return a[a.index(name) + 1]
    if default is None:
        sys.exit(f"crash_client: missing {name}")
    return default


def expected_end(marker):
    """An NBD error is expected only once the driver announced the kill."""
    return os.path.exists(marker)


def touch(path):
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


# ------------------------------------------------------------------ load

def mode_load():
    import nbd
    uri = sys.argv[2]
    origin = Origin(arg("--origin"))
    st = load_state(arg("--state"))
    cur = list(st["pages"])
    npages = len(cur)
    version = st["next_version"]
    rnd = random.Random(int(arg("--seed")))
    marker, ready, stats_path = arg("--marker"), arg("--ready"), arg("--stats")
    deadline = time.time() + float(arg("--max-seconds", "60"))
    jf = open(arg("--journal"), "a")
    QD = 8
    HOT = min(npages, 1024)   # first 4 MiB

    stats = dict(writes=0, zeroes=0, reads=0, read_pages=0, flushes=0, acked_unflushed=[],
                 sent=0, ended="", error="")
    h = nbd.NBD()
    h.set_handle_name("crash-load")
    h.connect_uri(uri)
    size = h.get_size()
    if size != origin.size or size // PAGE != npages:
        sys.exit(f"export size {size} != origin {origin.size} / model {npages} pages")
    touch(ready)

    busy = bytearray(npages)           # pages covered by a request in flight
    inflight = {}                      # cookie -> (kind, p, n, v, buf)
    acked_since_flush = []
    ops_to_flush = rnd.randint(3, 12)

    def pick(maxn):
        for _ in range(16):
            n = rnd.randint(1, maxn)
            if rnd.random() < 0.5:
                p = rnd.randrange(0, HOT - n + 1) if HOT >= n else 0
            else:
                p = rnd.randrange(0, npages - n + 1)
            if not any(busy[p:p + n]):
                return p, n
        return None

    def complete(c):
        kind, p, n, v, buf = inflight.pop(c)
        for i in range(p, p + n):
            busy[i] = 0
        if kind == "W":
            for i in range(p, p + n):
                cur[i] = v
            stats["writes"] += 1
            acked_since_flush.append(["W", p, n, v])
        elif kind == "Z":
            for i in range(p, p + n):
                cur[i] = 0
            stats["zeroes"] += 1
            acked_since_flush.append(["Z", p, n, 0])
        else:
            got = buf.to_bytearray()
            for i in range(n):
                g = bytes(got[i * PAGE:(i + 1) * PAGE])
                want = origin.expected(p + i, cur[p + i])
                if g != want:
                    raise Mismatch(f"read of {n} pages at page {p}: page {p + i} reads as "
                                   f"{describe(origin, p + i, g)}, the model says "
                                   f"{'origin' if cur[p + i] == -1 else 'zeroes' if cur[p + i] == 0 else 'version %d' % cur[p + i]}"
                                   f" (acknowledged before this read was sent)")
            stats["reads"] += 1
            stats["read_pages"] += n

    def reap(block):
        if block and inflight:
            h.poll(-1)
        for c in list(inflight):
            if h.aio_command_completed(c):
                complete(c)

    try:
        while True:
            if time.time() > deadline:
                raise Mismatch("the load ran out of time: it was never killed")
            if ops_to_flush <= 0:
                while inflight:
                    reap(True)
                h.flush()
                jf.write("F\n"); jf.flush(); os.fsync(jf.fileno())
                stats["flushes"] += 1
                acked_since_flush = []
                ops_to_flush = rnd.randint(3, 12)
                continue
            batch = []
            while len(inflight) + len(batch) < QD and ops_to_flush > 0:
                r = rnd.random()
                kind = "W" if r < 0.55 else "Z" if r < 0.70 else "R"
                got = pick(16 if kind == "W" else 32)
                if got is None:
                    break
                p, n = got
                for i in range(p, p + n):
                    busy[i] = 1
                v = 0
                if kind == "W":
                    v = version; version += 1
                batch.append((kind, p, n, v))
                if kind != "R":
                    ops_to_flush -= 1
            lines = [f"W {p} {n} {v}\n" if k == "W" else f"Z {p} {n}\n"
                     for k, p, n, v in batch if k != "R"]
            if lines:
                jf.write("".join(lines)); jf.flush(); os.fsync(jf.fileno())
            for kind, p, n, v in batch:
                if kind == "W":
                    buf = nbd.Buffer.from_bytearray(bytearray(b"".join(gen(i, v) for i in range(p, p + n))))
                    c = h.aio_pwrite(buf, p * PAGE)
                elif kind == "Z":
                    buf = None
                    c = h.aio_zero(n * PAGE, p * PAGE,
                                   flags=nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.3 else 0)
                else:
                    buf = nbd.Buffer(n * PAGE)
                    c = h.aio_pread(buf, p * PAGE)
                inflight[c] = (kind, p, n, v, buf)
                stats["sent"] += 1
            reap(True)
    except Mismatch as e:
        stats["ended"] = "mismatch"; stats["error"] = str(e)
    except nbd.Error as e:
        if expected_end(marker):
            stats["ended"] = "killed"
        else:
            time.sleep(0.3)   # (the marker is created before the kill; give it a moment)
            stats["ended"] = "killed" if expected_end(marker) else "nbd-error"
            stats["error"] = f"NBD error before the kill: {e}"
    stats["acked_unflushed"] = acked_since_flush
    stats["next_version"] = version
    jf.close()
    json.dump(stats, open(stats_path, "w"))
    print(f"load: {stats['writes']} writes, {stats['zeroes']} write_zeroes, {stats['reads']} reads "
          f"({stats['read_pages']} pages checked), {stats['flushes']} flushes, "
          f"{len(acked_since_flush)} acknowledged since the last flush, {len(inflight)} in flight; "
          f"ended: {stats['ended']}")
    if stats["ended"] != "killed":
        print(f"load FAILED: {stats['error']}")
        sys.exit(3)


class Mismatch(Exception):
    pass


# ------------------------------------------------------------------ roload

def mode_roload():
    import nbd
    uri = sys.argv[2]
    origin = Origin(arg("--origin"))
    rnd = random.Random(int(arg("--seed")))
    marker, ready, stats_path = arg("--marker"), arg("--ready"), arg("--stats")
    deadline = time.time() + float(arg("--max-seconds", "60"))
    h = nbd.NBD()
    h.set_handle_name("crash-roload")
    h.connect_uri(uri)
    size = h.get_size()
    if size != origin.size:
        sys.exit(f"read-only export size {size} != origin {origin.size}")
    touch(ready)
    stats = dict(reads=0, bytes=0, ended="", error="")
    inflight = {}
    seq = rnd.randrange(0, size // 2)
    try:
        while True:
            if time.time() > deadline:
                raise Mismatch("the read-only load ran out of time: it was never killed")
            while len(inflight) < 4:
                if rnd.random() < 0.5:
                    n = min(256 << 10, size - seq); off = seq
                    seq = (seq + n) % size
                else:
                    n = rnd.choice([4096, 65536, 1 << 20, rnd.randint(1, 1 << 20)])
                    off = rnd.randrange(0, size - n + 1)
                    if rnd.random() < 0.7:
                        off -= off % 4096
                buf = nbd.Buffer(n)
                inflight[h.aio_pread(buf, off)] = (off, n, buf)
            h.poll(-1)
            for c in list(inflight):
                if h.aio_command_completed(c):
                    off, n, buf = inflight.pop(c)
                    got = buf.to_bytearray()
                    if got != origin.m[off:off + n]:
                        i = next(i for i in range(n) if got[i] != origin.m[off + i])
                        raise Mismatch(f"read-only export: read of {n} bytes at {off} differs from the "
                                       f"origin at byte {off + i}")
                    stats["reads"] += 1; stats["bytes"] += n
    except Mismatch as e:
        stats["ended"] = "mismatch"; stats["error"] = str(e)
    except nbd.Error as e:
        if not expected_end(marker):
            time.sleep(0.3)
        if expected_end(marker):
            stats["ended"] = "killed"
        else:
            stats["ended"] = "nbd-error"; stats["error"] = f"NBD error before the kill: {e}"
    json.dump(stats, open(stats_path, "w"))
    print(f"roload: {stats['reads']} reads, {stats['bytes']} bytes equal to the origin; ended: {stats['ended']}")
    if stats["ended"] != "killed":
        print(f"roload FAILED: {stats['error']}")
        sys.exit(3)


# ------------------------------------------------------------------ verify

def parse_journal(path):
    ops, last_f = [], -1
    for line in open(path):
        a = line.split()
        if not a:
            continue
        if a[0] == "F":
            last_f = len(ops)
        elif a[0] == "W":
            ops.append((int(a[1]), int(a[2]), int(a[3])))
        elif a[0] == "Z":
            ops.append((int(a[1]), int(a[2]), 0))
        else:
            # a torn last line cannot happen (the client is never killed), so
            # anything else is a bug in this script
            sys.exit(f"bad journal line {line!r}")
    return ops, last_f


def mode_verify():
    import nbd
    uri = sys.argv[2]
    origin = Origin(arg("--origin"))
    state_path = arg("--state")
    st = load_state(state_path)
    durable = list(st["pages"])
    npages = len(durable)
    ops, last_f = parse_journal(arg("--journal"))
    flushed, unflushed = ops[:max(last_f, 0)], ops[max(last_f, 0):]
    for p, n, v in flushed:
        for i in range(p, p + n):
            durable[i] = v
    # candidates per page touched after the last flush: newest first
    cand = {}
    for p, n, v in reversed(unflushed):
        for i in range(p, p + n):
            c = cand.setdefault(i, [])
            if v not in c:
                c.append(v)
    acked = set()
    ls = arg("--load-stats", "")
    if ls and os.path.exists(ls):
        for k, p, n, v in json.load(open(ls)).get("acked_unflushed", []):
            for i in range(p, p + n):
                acked.add((i, v))

    h = nbd.NBD()
    h.set_handle_name("crash-verify")
    h.connect_uri(uri)
    size = h.get_size()
    if size != npages * PAGE:
        sys.exit(f"export size {size} != model {npages} pages")
    new = list(durable)
    bad = []
    n_old = n_new = n_acked_old = n_unacked_new = n_written = n_origin = 0
    CH = 4 << 20
    for pos in range(0, size, CH):
        data = h.pread(min(CH, size - pos), pos)
        for j in range(len(data) // PAGE):
            p = pos // PAGE + j
            g = data[j * PAGE:(j + 1) * PAGE]
            d = durable[p]
            if d == -1:
                n_origin += 1
            else:
                n_written += 1
            if p not in cand:
                if g != origin.expected(p, d):
                    bad.append(f"page {p} (byte {p * PAGE}): reads as {describe(origin, p, g)}, "
                               f"the durable state is {d} and no unflushed write touched it")
                continue
            match = None
            for v in cand[p]:
                if g == origin.expected(p, v):
                    match = v
                    break
            if match is not None:
                new[p] = match
                n_new += 1
                if (p, match) not in acked:
                    n_unacked_new += 1
            elif g == origin.expected(p, d):
                n_old += 1
                if any((p, v) in acked for v in cand[p]):
                    n_acked_old += 1
            else:
                bad.append(f"page {p} (byte {p * PAGE}): reads as {describe(origin, p, g)}; allowed: "
                           f"durable {d} or unflushed {cand[p]}")
    h.shutdown()
    top = max([v for _, _, v in ops] + [st["next_version"] - 1])
    st["pages"] = new
    st["next_version"] = top + 1
    report = dict(pages=npages, bad=len(bad), flushed_ops=len(flushed), unflushed_ops=len(unflushed),
                  unflushed_pages=len(cand), unflushed_new=n_new, unflushed_old=n_old,
                  acked_unflushed_old=n_acked_old, unacked_new=n_unacked_new,
                  pages_origin=n_origin, pages_written=n_written, errors=bad[:20])
    json.dump(report, open(arg("--report"), "w"))
    for b in bad[:20]:
        print("  -", b)
    print(f"verify: {npages} pages, {n_written} written/zeroed ({n_origin} origin); "
          f"{len(flushed)} flushed ops, {len(unflushed)} unflushed ops over {len(cand)} pages: "
          f"{n_new} pages new, {n_old} old ({n_acked_old} of them acknowledged), "
          f"{n_unacked_new} new from unacknowledged writes; {len(bad)} bad")
    if not bad:
        save_state(state_path, st)
    sys.exit(1 if bad else 0)


def mode_init():
    path, npages = sys.argv[2], int(sys.argv[3])
    save_state(path, {"pages": [-1] * npages, "next_version": 1})


if __name__ == "__main__":
    modes = {"init": mode_init, "load": mode_load, "roload": mode_roload, "verify": mode_verify}
    if len(sys.argv) < 3 or sys.argv[1] not in modes:
        sys.exit(__doc__)
    modes[sys.argv[1]]()
