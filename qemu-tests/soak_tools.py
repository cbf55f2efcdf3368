#!/usr/bin/python3
"""soak_tools.py — helpers of the soak test (qemu-tests/t-62-soak.sh,
bench/soak.sh). Standard library only.

  rss PID OUT [INTERVAL]
      Every INTERVAL s (1) append "SECONDS VmRSS_KiB RssAnon_KiB RssFile_KiB
      Threads" of PID (from /proc/PID/status) to OUT until PID exits or
      OUT.stop exists.
  rss-report FILE [FROM_S TO_S]
      Summary of a sample file, optionally only the samples with FROM_S <= t
      < TO_S: one line of key=value: samples, peak_rss_kib, peak_anon_kib,
      first_q_rss_kib / last_q_rss_kib (mean VmRSS of the first and last
      quarter of the samples), growth_pct (last vs first quarter), the same
      for RssAnon (anon_growth_pct), threads_max.
  hostile HOST PORT EXPORT OFFSET SECONDS [WRITERS] [READERS] [RATE] [SIZE]
      A hostile client with raw sockets (each connection negotiates with
      NBD_OPT_EXPORT_NAME, simple replies):
      - WRITERS (2) connections send NBD WRITE requests of SIZE bytes
        (32 MiB) at OFFSET + k*SIZE and trickle each payload at RATE bytes/s
        (8 MiB/s) in 64 KiB pieces; when a write completes its reply must
        be error 0, then the next one starts;
      - READERS (2) connections send 8 READ requests of SIZE bytes at once
        and never read a reply (the server must stop at its per-connection
        byte budget, not buffer 256 MiB each);
      after SECONDS every connection is dropped (writers in the middle of a
      payload). Prints "hostile: N writes completed, M bytes sent, E errors"
      and exits 1 on a non-zero NBD error or a protocol surprise.
"""
import os
import socket
import struct
import sys
import threading
import time


def status(pid):
    d = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            d[k] = v.split()[0] if v.split() else ""
    return d


def mode_rss():
    pid, out = int(sys.argv[2]), sys.argv[3]
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    t0 = time.time()
    with open(out, "a") as f:
        while not os.path.exists(out + ".stop"):
            try:
                s = status(pid)
                st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                break
            if st == "Z":
                break
            f.write(f"{time.time() - t0:.2f} {s.get('VmRSS', 0)} {s.get('RssAnon', 0)} "
                    f"{s.get('RssFile', 0)} {s.get('Threads', 0)}\n")
            f.flush()
            time.sleep(interval)


def mode_rss_report():
    rows = [tuple(float(x) for x in line.split()) for line in open(sys.argv[2]) if line.strip()]
    if len(sys.argv) > 4:
        lo, hi = float(sys.argv[3]), float(sys.argv[4])
        rows = [r for r in rows if lo <= r[0] < hi]
    if not rows:
        print("samples=0")
        return
    q = max(1, len(rows) // 4)
    mean = lambda rs, i: sum(r[i] for r in rs) / len(rs)
    f_rss, l_rss = mean(rows[:q], 1), mean(rows[-q:], 1)
    f_anon, l_anon = mean(rows[:q], 2), mean(rows[-q:], 2)
    print(f"samples={len(rows)} peak_rss_kib={max(r[1] for r in rows):.0f} "
          f"peak_anon_kib={max(r[2] for r in rows):.0f} "
          f"first_q_rss_kib={f_rss:.0f} last_q_rss_kib={l_rss:.0f} "
          f"growth_pct={100 * (l_rss - f_rss) / f_rss:.1f} "
          f"first_q_anon_kib={f_anon:.0f} last_q_anon_kib={l_anon:.0f} "
          f"anon_growth_pct={100 * (l_anon - f_anon) / max(f_anon, 1):.1f} "
          f"threads_max={max(r[4] for r in rows):.0f}")


NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698


def recv_exact(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise ConnectionError("server closed the connection")
        b += c
    return bytes(b)


def nbd_connect(host, port, export):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello = recv_exact(s, 18)
    if hello[:16] != b"NBDMAGICIHAVEOPT":
        raise RuntimeError(f"not a newstyle server: {hello!r}")
    (hflags,) = struct.unpack(">H", hello[16:])
    no_zeroes = hflags & 2
    s.sendall(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
    name = export.encode()
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)   # NBD_OPT_EXPORT_NAME
    size, _tflags = struct.unpack(">QH", recv_exact(s, 10))
    if not no_zeroes:
        recv_exact(s, 124)
    return s, size


def mode_hostile():
    host, port, export = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    offset, seconds = int(sys.argv[5]), float(sys.argv[6])
    writers = int(sys.argv[7]) if len(sys.argv) > 7 else 2
    readers = int(sys.argv[8]) if len(sys.argv) > 8 else 2
    rate = float(sys.argv[9]) if len(sys.argv) > 9 else 8 << 20
    size = int(sys.argv[10]) if len(sys.argv) > 10 else 32 << 20
    end = time.time() + seconds
    lock = threading.Lock()
    stats = dict(done=0, sent=0, errors=[])
    PIECE = 64 << 10

    def run(k):
        try:
            s, esize = nbd_connect(host, port, export)
            off = offset + k * size
            if off + size > esize:
                raise RuntimeError(f"write at {off}+{size} beyond the export ({esize})")
            n = 0
            while time.time() < end:
                n += 1
                fill = bytes([(k * 37 + n) % 251 + 1]) * PIECE
                s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 1, n, off, size))
                t0, sent = time.time(), 0
                while sent < size:
                    if time.time() >= end:
                        s.close()       # drop the connection in the middle of a payload
                        return
                    s.sendall(fill[:min(PIECE, size - sent)])
                    sent += min(PIECE, size - sent)
                    with lock:
                        stats["sent"] += PIECE
                    ahead = t0 + sent / rate - time.time()
                    if ahead > 0:
                        time.sleep(ahead)
                magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
                if magic != NBD_SIMPLE_REPLY_MAGIC or handle != n or err != 0:
                    raise RuntimeError(f"reply to write {n}: magic {magic:#x} error {err} handle {handle}")
                with lock:
                    stats["done"] += 1
            s.close()
        except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
            with lock:
                stats["errors"].append(f"connection {k}: {e}")

    def reader(k):
        try:
            s, esize = nbd_connect(host, port, export)
            for n in range(8):
                off = (k * size + n * size) % (esize - size + 1)
                s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 0, 1000 + n, off, size))
            while time.time() < end:
                time.sleep(0.1)
            s.close()
        except Exception as e:  # noqa: BLE001
            with lock:
                stats["errors"].append(f"reader connection {k}: {e}")

    ts = [threading.Thread(target=run, args=(k,)) for k in range(writers)]
    ts += [threading.Thread(target=reader, args=(k,)) for k in range(readers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(f"hostile: {writers} connections trickling {size >> 20} MiB writes at {rate / (1 << 20):.1f} MiB/s each, "
          f"{readers} connections with 8 unread {size >> 20} MiB reads each: "
          f"{stats['done']} writes completed, {stats['sent']} bytes sent, {len(stats['errors'])} errors")
    for e in stats["errors"]:
        print("  -", e)
    sys.exit(1 if stats["errors"] else 0)


if __name__ == "__main__":
    modes = {"rss": mode_rss, "rss-report": mode_rss_report, "hostile": mode_hostile}
    if len(sys.argv) < 3 or sys.argv[1] not in modes:
        sys.exit(__doc__)
    modes[sys.argv[1]]()
