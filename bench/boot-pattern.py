#!/usr/bin/env python3
"""bench/boot-pattern.py LOGFILE [BLOCK]
bench/boot-pattern.py LOGFILE --unread RANGES IMAGE


The read pattern of one boot, from an nbdkit log filter's file (every
request the guest made, in order, with issue and completion times): how
many reads and how big, how much they overlap, how they form sequential
streams (how long a stream lives, how many interleave), and how many were
issued with no other read outstanding (the dependent chain a boot is: each
such read that misses costs one full round trip to the origin).

Record it with every read delayed (nbdkit --filter=log --filter=delay
rdelay=10ms file IMAGE): answered at local speed, every read would be done
before the guest issues the next, and the log could not show which reads a
guest issues together. Prints a markdown fragment (bench/realboot.sh puts
it in its section).

Streams: a read continues a stream when it starts where one of the
STREAMS_TRACKED most recently used streams ended (or up to GAP bytes past
it: a file system skips a few blocks between extents); otherwise it starts
a new one, displacing the least recently used. A stream *dies* when it is
displaced or the boot ends.

With --unread: RANGES holds a server's origin GETs of one cold boot of the
same image ("START END" per line, END exclusive): how many of the bytes it
fetched the guest never read (by the size of the GET that brought them),
and how many of those are zeros in IMAGE (the file system's free space:
what readahead running past the end of a file's data brings).
"""
import re
import statistics
import sys
from datetime import datetime

STREAMS_TRACKED = 8
GAP = 64 << 10

LINE = re.compile(r"^(\S+ \S+) connection=(\d+) (\.\.\.)?Read id=(\d+)(?: offset=0x([0-9a-f]+) count=0x([0-9a-f]+))?")


def parse(path):
    """-> [(issue_s, done_s, offset, length)] in issue order."""
    reads, pending, t0 = [], {}, None
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        t0 = t if t0 is None else t0
        key = (m.group(2), m.group(4))
        if m.group(3):  # completion
            i = pending.pop(key, None)
            if i is not None:
                reads[i][1] = t - t0
        elif m.group(5) is not None:
            pending[key] = len(reads)
            reads.append([t - t0, None, int(m.group(5), 16), int(m.group(6), 16)])
    return [tuple(r) for r in reads if r[1] is not None]


def streams(reads):
    """-> (streams, owner): each stream [reads, bytes, first_offset, end],
    in order of birth; owner[i] is the index of read i's stream."""
    every, live, owner = [], [], []  # live: most recently used last
    for _, _, off, ln in reads:
        for s in reversed(live):
            if s[3] <= off <= s[3] + GAP:
                s[0] += 1
                s[1] += ln
                s[3] = off + ln
                live.remove(s)
                live.append(s)
                break
        else:
            s = [1, ln, off, off + ln]
            every.append(s)
            live.append(s)
            if len(live) > STREAMS_TRACKED:
                live.pop(0)
        owner.append(id(s))
    return every, owner


SIZE_CLASSES = [(4 << 10, "4 KiB"), (16 << 10, "≤ 16 KiB"), (64 << 10, "≤ 64 KiB"),
                (256 << 10, "≤ 256 KiB"), (1 << 20, "≤ 1 MiB"), (1 << 62, "> 1 MiB")]


def unread(reads, ranges_path, image_path, block=4096):
    """Markdown table: origin bytes the guest never read, by GET size."""
    guest = set()
    for _, _, off, ln in reads:
        guest.update(range(off // block, (off + ln - 1) // block + 1))
    gets = [tuple(map(int, l.split())) for l in open(ranges_path) if l.strip()]
    img = open(image_path, "rb")
    zero_page = bytes(block)

    def is_zero(b):
        img.seek(b * block)
        return img.read(block) == zero_page

    rows = {label: [0, 0, 0, 0] for _, label in SIZE_CLASSES}  # gets, bytes, unread, zero
    for a, z in gets:
        label = next(lb for hi, lb in SIZE_CLASSES if z - a <= hi)
        r = rows[label]
        r[0] += 1
        r[1] += z - a
        for b in range(a // block, (z - 1) // block + 1):
            if b not in guest:
                r[2] += block
                r[3] += block if is_zero(b) else 0
    tot = [sum(r[i] for r in rows.values()) for i in range(4)]
    mib = lambda x: f"{x / 2**20:.1f}"
    out = ["| origin GET size | GETs | MiB | MiB the guest never read | of them zeros |",
           "|---|---|---|---|---|"]
    for _, label in SIZE_CLASSES:
        g, b, u, zr = rows[label]
        if g:
            out.append(f"| {label} | {g} | {mib(b)} | {mib(u)} | {mib(zr)} |")
    out.append(f"| all | {tot[0]} | {mib(tot[1])} | {mib(tot[2])} ({tot[2] / max(1, tot[1]):.0%}) | "
               f"{mib(tot[3])} |")
    return "\n".join(out)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    reads = parse(sys.argv[1])
    if len(sys.argv) == 5 and sys.argv[2] == "--unread":
        print(unread(reads, sys.argv[3], sys.argv[4]))
        return
    block = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    if not reads:
        sys.exit(f"boot-pattern: no reads in {sys.argv[1]}")
    n = len(reads)
    total = sum(r[3] for r in reads)
    blocks = set()
    for _, _, off, ln in reads:
        blocks.update(range(off // block, (off + ln - 1) // block + 1))
    uniq = len(blocks) * block
    sizes = [r[3] for r in reads]
    buckets = [(4 << 10, "≤ 4 KiB"), (16 << 10, "≤ 16 KiB"), (64 << 10, "≤ 64 KiB"),
               (256 << 10, "≤ 256 KiB"), (1 << 30, "> 256 KiB")]
    hist, lo = [], 0
    for hi, label in buckets:
        k = [s for s in sizes if lo < s <= hi]
        hist.append(f"{label}: {len(k)} reads ({sum(k) / 2**20:.1f} MiB)")
        lo = hi
    # Outstanding reads when each was issued (the others issued before it
    # and not yet answered).
    qd = []
    for i, (t, _, _, _) in enumerate(reads):
        qd.append(sum(1 for j in range(max(0, i - 256), i) if reads[j][1] > t))
    alone = sum(1 for q in qd if q == 0)
    st, owner = streams(reads)
    one = [s for s in st if s[0] == 1]
    long = [s for s in st if s[1] >= 1 << 20]
    # Interleaving: distinct streams among each window of 16 consecutive reads.
    inter = [len(set(owner[i:i + 16])) for i in range(0, max(1, n - 15))]
    gaps = [reads[i + 1][2] - (reads[i][2] + reads[i][3]) for i in range(n - 1)]
    seq = sum(1 for g in gaps if g == 0)
    dur = reads[-1][1]
    out = []
    w = out.append
    w(f"- {n} reads, {total / 2**20:.1f} MiB in {dur:.1f} s; {uniq / 2**20:.1f} MiB distinct "
      f"({block >> 10} KiB blocks): {total / uniq:.2f}× read more than once")
    w(f"- sizes: median {statistics.median(sizes) / 1024:.0f} KiB; " + "; ".join(hist))
    w(f"- {seq} reads ({seq / max(1, n - 1):.0%}) start exactly where the one before ended")
    w(f"- streams (continuing within {GAP >> 10} KiB of one of the {STREAMS_TRACKED} most recent): "
      f"{len(st)}; {len(one)} are a single read ({sum(s[1] for s in one) / 2**20:.1f} MiB); "
      f"median {statistics.median(s[0] for s in st):.0f} reads, "
      f"{statistics.median(s[1] for s in st) / 1024:.0f} KiB; {len(long)} of ≥ 1 MiB carry "
      f"{sum(s[1] for s in long) / total:.0%} of the bytes; longest {max(s[1] for s in st) / 2**20:.1f} MiB")
    w(f"- interleaving: distinct streams in 16 consecutive reads: median {statistics.median(inter):.0f}, "
      f"max {max(inter)}")
    w(f"- {alone} reads ({alone / n:.0%}) were issued with no other read outstanding; "
      f"median outstanding at issue {statistics.median(qd):.0f}, max {max(qd)}: at an origin RTT away, "
      f"each of those that misses waits one full round trip with nothing overlapping it")
    print("\n".join(out))


if __name__ == "__main__":
    main()
