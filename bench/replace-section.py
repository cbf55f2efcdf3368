#!/usr/bin/env python3
"""bench/replace-section.py OUT SECTION_FILE

Put a report section into OUT (bench/RESULTS.md): the section file's first
line is its "## ..." heading; an existing section with that heading (up to
the next "## " heading) is replaced, otherwise the section is appended.
Shared by the bench scripts that each own one section of RESULTS.md.
"""
import re
import sys

out, sec = sys.argv[1], open(sys.argv[2]).read()
heading = sec.split("\n", 1)[0]
if not heading.startswith("## "):
    sys.exit(f"replace-section: {sys.argv[2]} does not start with a '## ' heading")
try:
    text = open(out).read()
except FileNotFoundError:
    text = ""
pat = re.compile("^" + re.escape(heading) + r"\n.*?(?=^## |\Z)", re.S | re.M)
text = pat.sub(lambda m: sec, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + sec
open(out, "w").write(text)
