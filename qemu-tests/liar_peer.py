#!/usr/bin/env python3
"""A lying lazybd peer for tests: answers every ranged GET of
/v1/images/KEY with 206, the right Content-Range and length, and the bytes
of FILE with every byte flipped (what a compromised or broken host would
send). Usage: liar_peer.py [ADDR:]PORT FILE (ADDR: 127.0.0.1)"""
import http.server
import os
import sys

ADDR, _, PORT = sys.argv[1].rpartition(":")
ADDR, PORT, FILE = ADDR or "127.0.0.1", int(PORT), sys.argv[2]
SIZE = os.path.getsize(FILE)


class Liar(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        r = self.headers.get("Range", "")
        a, b = (int(x) for x in r.removeprefix("bytes=").split("-"))
        with open(FILE, "rb") as f:
            f.seek(a)
            data = bytes(x ^ 0xFF for x in f.read(b - a + 1))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {a}-{b}/{SIZE}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((ADDR, PORT), Liar).serve_forever()
