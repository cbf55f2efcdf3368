#!/usr/bin/env python3
"""bench/report.py RESULTS.tsv META.tsv CMDLINES.txt STOPS.tsv > SECTION.md

Turns the raw rows written by bench/run.sh into its section of RESULTS.md
("## lazybd against its peers (bench/run.sh)", stamped by bench/lib.sh):
goals, lazybd / peer ratios, the physical limits of the emulated link, raw
numbers, conditions. Every number is per (case, peer) the median over the
rounds; every ratio is the median of the per-round ratios (lazybd and the
peer of the same round), shown with each round's ratio. Standard library only.
"""
import csv
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resultsmd import median, paired, rounds_cell  # noqa: E402

TITLE = "## lazybd against its peers (bench/run.sh)"
results_path, meta_path, cmd_path, stops_path = sys.argv[1:5]

meta = {}
for line in open(meta_path):
    k, _, v = line.rstrip("\n").partition("\t")
    meta[k] = v
ROUNDS = int(meta.get("rounds", "1") or 1)

rows = list(csv.DictReader(open(results_path), delimiter="\t"))
for r in rows:
    r["round"] = r.get("round") or "1"
PEER_ORDER = ["lazybd", "nbdkit-cache", "qsd", "nbdkit-file", "nbd-server"]
CASE_ORDER = ["cold-seq", "warmup-qd1", "warm-seq", "warm-rand1-tcp", "warm-rand32-tcp", "cold-seq-unix",
              "warm-rand1-unix", "warm-rand32-unix", "cold-rand32-rtt", "cold-seq-rtt"]
PEER_DESC = {
    "lazybd": "lazybd",
    "nbdkit-cache": "nbdkit curl + cache filter",
    "qsd": "qemu-storage-daemon http + qcow2 + copy-on-read",
    "nbdkit-file": "nbdkit file (local copy)",
    "nbd-server": "nbd-server (local copy)",
}
CASE_DESC = {
    "cold-seq": "cold sequential 1 MiB reads, whole image, QD8, TCP, origin on loopback, fresh server",
    "warmup-qd1": "informational: a QD1 sequential pass that warms a restarted server after a failed case",
    "warm-seq": "the same pass again on the now warm server",
    "warm-rand1-tcp": "warm 4 KiB random reads, QD1, TCP",
    "warm-rand32-tcp": "warm 4 KiB random reads, QD32, TCP",
    "cold-seq-unix": "cold sequential pass over a Unix socket (warms the Unix-socket server)",
    "warm-rand1-unix": "warm 4 KiB random reads, QD1, Unix socket",
    "warm-rand32-unix": "warm 4 KiB random reads, QD32, Unix socket",
    "cold-rand32-rtt": "cold 4 KiB random first-touch reads, QD32, TCP, origin behind the delay proxy, fresh server",
    "cold-seq-rtt": "cold sequential 1 MiB reads, whole image, QD8, TCP, origin behind the delay proxy, fresh server",
}

present_peers = [p for p in PEER_ORDER if any(r["peer"] == p for r in rows)]
present_cases = [c for c in CASE_ORDER if any(r["case"] == c for r in rows)]


def rkey(x):
    return (len(x), x)


def row_key(r):
    base = r["case"].split("#")[0]
    idx = CASE_ORDER.index(base) if base in CASE_ORDER else len(CASE_ORDER)
    pidx = PEER_ORDER.index(r["peer"]) if r["peer"] in PEER_ORDER else len(PEER_ORDER)
    return (idx, r["transport"] != "tcp", pidx, r["case"], rkey(r["round"]))


res = {(r["case"], r["peer"], r["round"]): r for r in rows}


def metric(case):
    return ("MiB/s", "mibs") if "seq" in case else ("IOPS", "iops")


def oks(case, peer):
    """{round: row} of the rounds with numbers"""
    return {r["round"]: r for r in rows
            if r["case"] == case and r["peer"] == peer and r["status"] == "ok" and r["iops"]}


def per_round(case, peer, field=None):
    field = field or metric(case)[1]
    return {k: float(r[field]) for k, r in oks(case, peer).items() if r[field] != ""}


def val(case, peer, field=None):
    return median(list(per_round(case, peer, field).values()))


def ratios(case, a, b):
    return paired(per_round(case, a), per_round(case, b))


def fnum(x, nd=0):
    if x is None or x == "":
        return "—"
    return f"{float(x):,.{nd}f}"


def rcell(vals):
    return rounds_cell(vals, 2, "×", rounds=ROUNDS)


block = int(meta["block_bytes"])
rate_bps = float(meta["rate_mbit"]) * 1e6 / 8
rtt_s = 2 * float(meta["delay_ms"]) / 1e3
qd = 32
link_mibs = rate_bps / 1048576
# The limit of a server that fetches only what each 4 KiB read asks for.
FETCH = 4096
lim_bw = rate_bps / FETCH
lim_qd = qd / rtt_s
phys = min(lim_bw, lim_qd)

out = []
w = out.append
w(TITLE)
w("")
w(f"{ROUNDS} round(s) of every case; in each round every peer runs the case once, in the order "
  f"{' '.join(meta['peers'].split())} in odd rounds and reversed in even ones (this host's speed drifts over minutes). "
  "Numbers are medians over the rounds; ratios are the median of the per-round ratios, every round's in parentheses. "
  f"{meta['elapsed_s']} s of cases.")
w("")
w(f"`{meta['invocation']}`")
w("")

# ---- goals
w("### Goals")
w("")
w("| goal | target | measured (median of rounds; each round) | met |")
w("|---|---|---|---|")


def goal(name, target, vals, shown):
    m = median(vals)
    if m is None:
        w(f"| {name} | {target} | — (no numbers) | ? |")
        return
    at_most = "≤" in target
    tv = target.split("≤" if at_most else "≥")[1].strip()
    tv = float(tv.rstrip("×%").split()[0]) / (100 if tv.endswith("%") else 1)
    met = m <= tv if at_most else m >= tv
    w(f"| {name} | {target} | {shown} | {'yes' if met else '**no**'} |")


def gratio(name, target, case, a, b):
    v = ratios(case, a, b)
    goal(name, target, v, f"{rcell(v)}; {fnum(val(case, a))} vs {fnum(val(case, b))} {metric(case)[0]}")


def bytes_per_read(case, peer):
    """Origin bytes per 4 KiB read, each round (None where not counted)."""
    return [int(r["origin_bytes"]) / (int(r["io_bytes"]) // 4096) for r in oks(case, peer).values()
            if r["origin_bytes"] and int(r["io_bytes"]) >= 4096]


# Issue 14's goals (and the warm 4K lead that must hold).
gratio("cold 4K QD32 @1 ms RTT: lazybd ÷ qemu-storage-daemon (http readahead=0)", "≥ 5×",
       "cold-rand32-rtt", "lazybd", "qsd")
v = [x / phys for x in per_round("cold-rand32-rtt", "lazybd").values()]
goal("cold 4K QD32 @1 ms RTT: lazybd ÷ physical limit for 4 KiB fetches", "≥ 50%", v,
     f"{rounds_cell(v, 0, '%', 100, ROUNDS)} of {phys:,.0f} IOPS")
v = bytes_per_read("cold-rand32-rtt", "lazybd")
goal("cold 4K QD32 @1 ms RTT: lazybd origin bytes per read", "≤ 8192 B", v,
     f"{fnum(median(v))} B (" + ", ".join(fnum(x) for x in v) + ")" if v else "—")
for peer in ("nbdkit-file", "nbd-server"):
    gratio(f"warm sequential 1 MiB QD8 TCP: lazybd ÷ {peer}", "≥ 1.2×", "warm-seq", "lazybd", peer)
for case in ("warm-rand1-tcp", "warm-rand32-tcp", "warm-rand1-unix", "warm-rand32-unix"):
    gratio(f"{case}: lazybd ÷ nbdkit file", "≥ 1.2×", case, "lazybd", "nbdkit-file")
v = [x / link_mibs for x in per_round("cold-seq-rtt", "lazybd").values()]
goal("cold sequential @1 ms RTT: lazybd ÷ link", "≥ 90%", v,
     f"{rounds_cell(v, 0, '%', 100, ROUNDS)} of {link_mibs:.1f} MiB/s")
w("")

# ---- ratios
others = [p for p in present_peers if p != "lazybd"]
if "lazybd" in present_peers and others:
    w("### Ratios: lazybd ÷ peer")
    w("")
    w("Same metric on both sides (IOPS for 4K cases, MiB/s for sequential); > 1 means lazybd is faster. "
      "Median of the per-round ratios, then each round's.")
    w("")
    w("| case | metric | lazybd (median) | " + " | ".join(f"÷ {p}" for p in others) + " |")
    w("|---|---|---|" + "---|" * len(others))
    for c in present_cases:
        if c == "warmup-qd1":
            continue
        m = metric(c)[0]
        a = val(c, "lazybd")
        w(f"| {c} | {m} | {fnum(a, 1 if m == 'MiB/s' else 0)} | "
          + " | ".join(rcell(ratios(c, "lazybd", p)) for p in others) + " |")
    w("")

# ---- physical limits
if "cold-rand32-rtt" in present_cases or "cold-seq-rtt" in present_cases:
    w("### Physical limits of the emulated link")
    w("")
    if "cold-rand32-rtt" in present_cases:
        w(f"cold-rand32-rtt: limit = min(link ÷ 4 KiB fetched per read, QD ÷ RTT) = "
          f"min({rate_bps / 1e6:g} MB/s ÷ {FETCH} B = {lim_bw:,.0f}, {qd} ÷ {rtt_s * 1e3:g} ms = {lim_qd:,.0f}) "
          f"= **{phys:,.0f} IOPS** for a server that fetches only what is read; one that fetches a "
          f"{block} B block per miss is limited to {rate_bps / block:,.0f} IOPS by the link.")
        w("")
        w("| peer | IOPS (median) | % of limit (each round) | mean lat µs | p99 lat µs | origin requests | origin bytes per read |")
        w("|---|---|---|---|---|---|---|")
        for p in present_peers:
            if not any(k[0] == "cold-rand32-rtt" and k[1] == p for k in res):
                continue
            rr = oks("cold-rand32-rtt", p)
            if not rr:
                w(f"| {p} | FAIL | | | | | |")
                continue
            iops = val("cold-rand32-rtt", p)
            bpr = median(bytes_per_read("cold-rand32-rtt", p))
            pct = [x / phys for x in per_round("cold-rand32-rtt", p).values()]
            w(f"| {p} | {iops:,.0f} | {rounds_cell(pct, 0, '%', 100, ROUNDS)} | {fnum(val('cold-rand32-rtt', p, 'lat_mean_us'))} | "
              f"{fnum(val('cold-rand32-rtt', p, 'lat_p99_us'))} | {fnum(val('cold-rand32-rtt', p, 'origin_reqs'))} | "
              f"{fnum(bpr)} |")
        w("")
    if "cold-seq-rtt" in present_cases:
        w(f"cold-seq-rtt: link = {float(meta['rate_mbit']):g} Mbit/s = **{link_mibs:.1f} MiB/s** "
          "(HTTP headers included, so image bytes can reach slightly less).")
        w("")
        w("| peer | MiB/s (median) | % of link (each round) | seconds | origin requests | origin MiB |")
        w("|---|---|---|---|---|---|")
        for p in present_peers:
            if not any(k[0] == "cold-seq-rtt" and k[1] == p for k in res):
                continue
            if not oks("cold-seq-rtt", p):
                w(f"| {p} | FAIL | | | | |")
                continue
            m = val("cold-seq-rtt", p)
            pct = [x / link_mibs for x in per_round("cold-seq-rtt", p).values()]
            ob = val("cold-seq-rtt", p, "origin_bytes")
            w(f"| {p} | {m:.1f} | {rounds_cell(pct, 0, '%', 100, ROUNDS)} | {fnum(val('cold-seq-rtt', p, 'seconds'), 3)} | "
              f"{fnum(val('cold-seq-rtt', p, 'origin_reqs'))} | {fnum(ob / 1048576 if ob is not None else None, 1)} |")
        w("")

# ---- raw
w("### Raw numbers")
w("")
w("| case | peer | transport | round | IOPS | MiB/s | mean lat µs | p99 lat µs | seconds | origin requests | origin MiB | note |")
w("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows, key=row_key):
    c, p = r["case"], r["peer"]
    note = r["note"].replace("|", "/")
    if len(note) > 400:
        note = note[:400] + "…"
    if r["status"] != "ok":
        w(f"| {c} | {p} | {r['transport']} | {r['round']} | **FAIL** | | | | | | | {note} |")
        continue
    om = f"{int(r['origin_bytes']) / 1048576:,.1f}" if r["origin_bytes"] else "—"
    w(f"| {c} | {p} | {r['transport']} | {r['round']} | {fnum(r['iops'])} | {fnum(r['mibs'], 1)} | "
      f"{fnum(r['lat_mean_us'])} | {fnum(r['lat_p99_us'])} | {r['seconds']} | {r['origin_reqs'] or '—'} | {om} | {note} |")
w("")
w("Origin requests/bytes are counted from nginx's access log while the case ran (`—` with ACCESS_LOG=0).")
w("")

# ---- conditions
w("### Conditions")
w("")
w(f"- Machine: {meta['nproc']} cores ({meta['cpu']}), {meta['mem']}; load average {meta['load']}. "
  "The client, the servers, nginx and the proxy share these cores: other work on the machine skews the numbers.")
w(f"- {meta['fio']} (libnbd `nbd` ioengine, libnbd {meta['libnbd']}), nbdkit {meta['nbdkit']}, "
  f"qemu-storage-daemon {meta['qemu']}, nbd-server {meta['nbd_server']}, nginx {meta['nginx']}, rustc {meta['rustc']}")
w(f"- lazybd: {meta['lazybd_rev']}" + (f", extra args `{meta['lazybd_args']}`" if meta.get("lazybd_args") else ""))
w(f"- Image: {int(meta['img_bytes']) // 1048576} MiB of random bytes, served by nginx on 127.0.0.1 "
  "(`max_ranges 1`, sendfile, keep-alive); the image file is in the page cache.")
w(f"- Cache block: lazybd {meta.get('lazybd_block_size', meta['block_size'])} (`--block-size`; what a miss "
  f"fetches adapts per read); the peers {meta['block_size']} ({block} B: nbdkit `cache-min-block-size`, "
  "qemu qcow2 `cluster_size`, with http `readahead=0`).")
w(f"- Remote-looking origin (`-rtt` cases): bench/delay-proxy in front of nginx, {meta['delay_ms']} ms each way "
  f"(RTT {rtt_s * 1e3:g} ms), {float(meta['rate_mbit']):g} Mbit/s per direction shared by all connections. "
  + (f"Measured 4 KiB ranged GET: {meta['rtt_measured_ms']} ms through the proxy, {meta['rtt_direct_ms']} ms direct."
     if meta.get("rtt_measured_ms") else ""))
w(f"- Client: fio `ioengine=nbd`, one NBD connection. "
  f"Timed random cases run {meta['runtime']} s; sequential cases are one pass over the image; "
  f"cold-rand32-rtt is {meta['cold_reads']} first-touch 4 KiB reads (fio random map, no offset read twice) "
  "at QD32 on a fresh server.")
w("- Every cold case runs on a freshly started server with an empty cache; warm cases run after a full "
  "sequential pass on the same server. Over the Unix socket each server is started fresh and warmed by "
  "one pass (`cold-seq-unix`). Every round starts every server afresh.")
w("- Latency is fio's total latency (submission to completion) per request; p99 is its 99th percentile.")
w("")
w("Cases:")
w("")
for c in present_cases:
    w(f"- `{c}`: {CASE_DESC[c]}")
w("")

# ---- commands
w("### Server command lines")
w("")
for line in open(cmd_path):
    peer, _, cmd = line.rstrip("\n").partition(" ")
    w(f"- {PEER_DESC.get(peer, peer)}:")
    w("")
    w("  ```")
    w(f"  {cmd}")
    w("  ```")
w("")
w("Paths are the temp dir of that run (first round); the URL is the nginx origin, or the delay proxy for `-rtt` cases.")
w("")

# ---- server exits: one row per server and session, the rounds side by side
stops = [l.rstrip("\n").split("\t") for l in open(stops_path) if l.strip()]
if stops:
    w("### Server shutdowns (SIGTERM)")
    w("")
    w("| server | exit, each round | summary line of the last round |")
    w("|---|---|---|")
    by = {}
    for s in stops:
        s += [""] * (3 - len(s))
        m = re.fullmatch(r"(.*)\.r(\d+)((?:\.restart\d+)?)", s[0])
        base, rnd = (m.group(1) + m.group(3), m.group(2)) if m else (s[0], "1")
        by.setdefault(base, []).append((rnd, s[1], s[2]))
    for base, v in by.items():
        exits = ", ".join(f"r{rnd} {how}" for rnd, how, _ in v)
        summ = next((x[2] for x in reversed(v) if x[2]), "").replace("|", "/")
        if len(summ) > 300:
            summ = summ[:300] + "…"
        w(f"| {base} | {exits} | {('`' + summ + '`') if summ else ''} |")
    w("")

fails = [r for r in rows if r["status"] != "ok" or r["note"]]
if fails:
    w("### Failures and notes")
    w("")
    for r in fails:
        w(f"- {r['case']} / {r['peer']} ({r['transport']}, round {r['round']}): {r['status']} {r['note']}")
    w("")
    w("A case is killed as *stalled* when fio completes no I/O for STALL_S (20) seconds: the server "
      "stopped answering a request. A failed cold case is retried once on a fresh server (the first "
      "attempt is kept as `CASE#1`); warm cases after a failure run on a fresh server warmed by a QD1 pass "
      "(`warmup-qd1`).")
    if any(r["peer"] == "qsd" and "stalled" in r["note"] for r in fails):
        w("")
        w("qemu-storage-daemon stalls are a qemu problem seen while building this bench: with the loopback "
          "origin and 1 MiB reads at QD8, its http (curl) driver stops completing requests in about two "
          "runs out of three (also without the copy-on-read filter, and with readahead 0 or 256 KiB); "
          "at QD1, or with the origin behind the 1 ms delay proxy, it did not happen in our tries. The "
          "origin had served every range; the hung daemon also ignores SIGTERM.")
    w("")

print("\n".join(out))
