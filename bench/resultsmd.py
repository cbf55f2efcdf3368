"""bench/resultsmd.py — the structure of bench/RESULTS.md, shared by
bench/replace-section.py and bench/assemble.py (and the number formatting of
per-round ratios, shared by the report scripts). Standard library only.

RESULTS.md is a header (everything before the first "## " heading, written by
bench/all.sh) followed by "## " sections. Every section belongs to one bench
script and says so at the end of its heading, e.g. "## Soak (bench/soak.sh)";
its first paragraph is its stamp, a line that starts with "*Stamp: ".
"""
import contextlib
import fcntl
import os
import re
import statistics

HEADING = re.compile(r"^## .*$", re.M)
OWNER = re.compile(r"\((bench/[A-Za-z0-9_.-]+\.sh)\)\s*$")
STAMP = re.compile(r"^\*Stamp: (.*)\*\s*$", re.M)
INDEX_BEGIN = "<!-- section-index: written by bench/resultsmd.py from each section's stamp -->"
INDEX_END = "<!-- /section-index -->"


def split(text):
    """-> (header, [section text, ...]); each section starts with its "## " line."""
    starts = [m.start() for m in HEADING.finditer(text)]
    if not starts:
        return text, []
    secs = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    return text[:starts[0]], secs


def heading(sec):
    return sec.split("\n", 1)[0]


def owner(sec):
    """bench/NAME.sh of a section, or None (a section no script writes)."""
    m = OWNER.search(heading(sec))
    return m.group(1) if m else None


def stamp(sec):
    m = STAMP.search(sec)
    return m.group(1) if m else None


def add_stamp(sec, stamp_text):
    """Put the stamp paragraph right under the heading (replacing an old one)."""
    head, _, body = sec.partition("\n")
    body = body.lstrip("\n")
    if body.startswith("*Stamp: "):
        body = body.split("\n", 1)[1].lstrip("\n") if "\n" in body else ""
    return f"{head}\n\n*Stamp: {stamp_text}*\n\n{body}"


def index(secs):
    rows = ["| section | written by | stamp |", "|---|---|---|"]
    for s in secs:
        title = OWNER.sub("", heading(s)[3:]).strip()
        who = f"`{owner(s)}`" if owner(s) else "*not regenerated* (written before bench/all.sh)"
        rows.append(f"| {title} | {who} | {short_stamp(stamp(s)) if stamp(s) else old_run_line(s)} |")
    return INDEX_BEGIN + "\n" + "\n".join(rows) + "\n" + INDEX_END


def short_stamp(st):
    """The index's form of a stamp: commit, date, run time (and QUICK)."""
    m = re.match(r"git (\S+), run (.+? UTC) \(`[^`]*`, (\d+) s\)", st)
    if not m:
        return st
    return f"git {m.group(1)}, {m.group(2)}, {m.group(3)} s" + (", **QUICK mode**" if "QUICK mode" in st else "")


def old_run_line(sec):
    """What a section written before the stamps says about its run, if anything."""
    first = sec.split("\n", 1)[1][:1500] if "\n" in sec else ""
    date = re.search(r"\b(\d{4}-\d\d-\d\d(?: \d\d:\d\d)?)", first)
    rev = re.search(r"\b(?:git|lazybd):? ([0-9a-f]{7,}(?:\+dirty)?)\b", first)
    facts = ", ".join(x for x in (date and date.group(1), rev and f"git {rev.group(1)}") if x)
    return f"no stamp (older run line: {facts})" if facts else "no stamp"


def refresh_index(text):
    """Rewrite the header's section index (if the header has one) from the stamps."""
    header, secs = split(text)
    pat = re.compile(re.escape(INDEX_BEGIN) + r".*?" + re.escape(INDEX_END), re.S)
    if not pat.search(header):
        return text
    return pat.sub(lambda m: index(secs), header) + "".join(secs)


def put_section(text, sec):
    """Replace the section with the same heading, else append it."""
    sec = sec.rstrip("\n") + "\n\n"
    header, secs = split(text)
    head = heading(sec)
    for i, s in enumerate(secs):
        if heading(s) == head:
            secs[i] = sec
            break
    else:
        if secs:
            secs[-1] = secs[-1].rstrip("\n") + "\n\n"
        elif header.strip():
            header = header.rstrip("\n") + "\n\n"
        secs.append(sec)
    return refresh_index(header + "".join(secs))


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on the directory of path: two bench scripts
    finishing at once must not lose one another's section."""
    d = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        fcntl.flock(d, fcntl.LOCK_EX)
        yield
    finally:
        os.close(d)


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def write(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(tmp, path)


# ---- a bench's temp files ---------------------------------------------

def read_meta(path):
    """meta.tsv ("KEY<TAB>VALUE" lines) -> dict."""
    return dict(l.rstrip("\n").split("\t", 1) for l in open(path) if "\t" in l)


def read_rows(path):
    """rows.tsv (a header line, tab-separated) -> list of dicts."""
    import csv
    return list(csv.DictReader(open(path), delimiter="\t"))


# ---- per-round numbers -------------------------------------------------

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def paired(a, b):
    """a, b: {round: value} -> [a[r] / b[r]] for the rounds both have, in round order."""
    out = []
    for r in sorted(set(a) & set(b), key=lambda k: (len(str(k)), str(k))):
        if a[r] is not None and b[r]:
            out.append(a[r] / b[r])
    return out


def _fmt(x, nd):
    return f"{x:,.{nd}f}"


def rounds_cell(vals, nd=2, unit="×", scale=1.0, rounds=None):
    """Median of per-round values with every round's value:
    "1.92× (1.85 / 1.92 / 2.01)". rounds: how many rounds ran (a shorter
    list says how many of them had numbers on both sides)."""
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "—"
    m = median(vals)
    s = f"{_fmt(m, nd)}{unit}"
    if len(vals) == 1:
        s += " (1 round)"
    else:
        s += " (" + " / ".join(_fmt(v, nd) for v in vals) + ")"
    if rounds and len(vals) < rounds:
        s += f", {len(vals)} of {rounds} rounds"
    return s
