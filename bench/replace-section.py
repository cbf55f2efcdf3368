#!/usr/bin/env python3
"""bench/replace-section.py [--stamp TEXT] OUT SECTION_FILE

Put a report section into OUT (bench/RESULTS.md): the section file's first
line is its "## ..." heading; an existing section with that heading (up to
the next "## " heading) is replaced, otherwise the section is appended. With
--stamp, TEXT becomes the section's stamp paragraph ("*Stamp: TEXT*", right
under the heading; bench/lib.sh's write_section builds it). OUT "-": print
the (stamped) section only. The header's section index, if OUT has one, is
refreshed. Shared by the bench scripts that each own one section of
RESULTS.md; OUT's directory is locked while it is rewritten.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resultsmd  # noqa: E402

args = sys.argv[1:]
stamp = None
if args[:1] == ["--stamp"]:
    stamp, args = args[1], args[2:]
if len(args) != 2:
    sys.exit(__doc__)
out, sec_path = args
sec = open(sec_path).read()
if not sec.startswith("## "):
    sys.exit(f"replace-section: {sec_path} does not start with a '## ' heading")
if stamp is not None:
    sec = resultsmd.add_stamp(sec, stamp)
if out == "-":
    sys.stdout.write(sec)
    sys.exit(0)
with resultsmd.locked(out):
    resultsmd.write(out, resultsmd.put_section(resultsmd.read(out), sec))
