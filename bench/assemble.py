#!/usr/bin/env python3
"""bench/assemble.py OUT SCRIPT... [--drop-unowned]

Give OUT (bench/RESULTS.md) its header and its order: the header says how the
file is produced and indexes every section with its stamp; the sections of
the given scripts (bench/run.sh ...) follow in that order. Sections no script
writes (their heading does not end in "(bench/NAME.sh)", e.g. ones written by
hand before bench/all.sh existed) come first, or are dropped with
--drop-unowned (bench/all.sh after a run of every script). bench/all.sh runs
this at the end; the bench scripts themselves only ever replace their own
section (bench/replace-section.py), which also refreshes the index.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resultsmd  # noqa: E402

args = sys.argv[1:]
drop = "--drop-unowned" in args
args = [a for a in args if a != "--drop-unowned"]
if len(args) < 2:
    sys.exit(__doc__)
out, scripts = args[0], args[1:]

HEADER = f"""# lazybd benchmark results

Produced by `bench/all.sh`. It runs the bench scripts in this fixed order,
then `bench/reliability-table.py` (RELIABILITY.md's table from this file):

{" → ".join(f"`{s}`" for s in scripts)}

Each script writes only its own section (the one whose heading ends in its
name), so any one of them can be rerun alone and leaves the others intact.
Every section carries its own stamp: the commit (`+dirty` if the tree had
uncommitted changes), the date (UTC) and load average at its start, cores,
kernel, and the script's run time. Ratios are medians of alternating rounds,
every round's ratio in parentheses. The cases, knobs and how to read the
numbers: bench/README.md. Nothing here is typed by hand; a section marked
*not regenerated* below predates bench/all.sh.

{resultsmd.INDEX_BEGIN}
{resultsmd.INDEX_END}

"""

with resultsmd.locked(out):
    text = resultsmd.read(out)
    _, secs = resultsmd.split(text)
    unowned = [s for s in secs if resultsmd.owner(s) is None]
    owned = [s for s in secs if resultsmd.owner(s) is not None]
    rank = {s: i for i, s in enumerate(scripts)}
    owned.sort(key=lambda s: rank.get(resultsmd.owner(s), len(scripts)))  # stable: a script's sections keep their order
    for s in unowned:
        print(f"assemble: {'dropped' if drop else 'kept'} a section no script writes: {resultsmd.heading(s)}",
              file=sys.stderr)
    for sc in scripts:
        if not any(resultsmd.owner(s) == sc for s in owned):
            print(f"assemble: no section of {sc}", file=sys.stderr)
    body = ([] if drop else unowned) + owned
    body = [s.rstrip("\n") + "\n\n" for s in body]
    resultsmd.write(out, resultsmd.refresh_index(HEADER + "".join(body)))
