#!/usr/bin/env python3
"""A webhook receiver for the tests: python3 receiver.py PORT SECRET LOG

Checks each delivery's Keypal-Signature with the recipe of docs/USAGE.md and appends one
JSON line per request to LOG: path, event id, attempt, whether the signature holds, whether
the event id was seen before (a duplicate a receiver would drop), the answer, the time.
The path chooses the answer:
  /ok            200
  /fail/N        500 to the first N requests of each event, then 200
  /hang          no answer for 60 s (the sender's timeout ends it)
  /slow/MS       200, after MS milliseconds
  /slowfirst/MS  200, after MS milliseconds the first time for each event, at once after
  /status/CODE   CODE
  /redirect      302 to /ok
"""
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, SECRET, LOG = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
lock = threading.Lock()
seen = {}  # (path, event id) -> requests so far


def signature_ok(header, body, max_age=300):
    """The receiver's check: t and v1 from the header, HMAC-SHA256 over t + '.' + body."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    expected = hmac.new(SECRET, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", "")) and abs(time.time() - t) <= max_age


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each answer's last write waits for a delayed ACK

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        event_id = self.headers.get("Keypal-Event-Id", "")
        key = (self.path.split("/")[1], event_id)
        with lock:
            n = seen.get(key, 0)
            seen[key] = n + 1
        parts = self.path.strip("/").split("/")
        status = 200
        if parts[0] == "fail" and n < int(parts[1]):
            status = 500
        elif parts[0] == "hang":
            time.sleep(60)
        elif parts[0] == "slow" or (parts[0] == "slowfirst" and n == 0):
            time.sleep(int(parts[1]) / 1000)
        elif parts[0] == "status":
            status = int(parts[1])
        elif parts[0] == "redirect":
            status = 302
        entry = {
            "path": self.path,
            "event_id": event_id,
            "attempt": self.headers.get("Keypal-Attempt"),
            "content_type": self.headers.get("Content-Type"),
            "sig_ok": signature_ok(self.headers.get("Keypal-Signature", ""), body),
            "duplicate": n > 0 and not (parts[0] == "fail" and n <= int(parts[1])),
            "status": status,
            "body": json.loads(body or b"null"),
            "at": time.time(),
        }
        with lock, open(LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
        try:
            self.send_response(status)
            if status == 302:
                self.send_header("Location", "/ok")
            if status in (204, 304):
                self.end_headers()
            else:
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
        except OSError:
            pass  # the sender gave up (its timeout): what it did not read is lost


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
