"""A JSON-RPC proxy that misbehaves on purpose: the nodes of the fault suite talk to the chain
through it, and the suite makes it drop, delay or refuse their requests.

* ``error``: the fraction of requests answered HTTP 502 without being forwarded (an
  overloaded gateway: the node never saw them).
* ``drop``: the fraction forwarded to the chain whose answer is thrown away, the connection
  closed instead (the worst case for a sender: the transaction may be in the node's pool
  while its sender heard nothing).
* ``delay``: each request waits up to this many seconds (uniform) before it is forwarded.
* ``down``: every request refused with 502 (the chain node is away).

Draws come from one seeded generator, so a run's faults follow the seed.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Faults:
    error: float = 0.0
    drop: float = 0.0
    delay: float = 0.0
    down: bool = False


class RpcProxy:
    """Serves on a free port of 127.0.0.1 (`url`) and forwards to `upstream` (changeable, for
    a chain node restarted on another port). Counts what it did in `counts`."""

    def __init__(self, upstream: str, seed: int = 0):
        self.upstream = upstream
        self.faults = Faults()
        self.counts = {"forwarded": 0, "error": 0, "drop": 0, "down": 0}
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fate, wait = proxy._draw()
                if fate in ("error", "down"):
                    self._answer(502, b"injected fault")
                    return
                if wait:
                    time.sleep(wait)
                try:
                    status, answer = proxy._forward(body)
                except OSError:
                    self._answer(502, b"upstream unreachable")
                    return
                if fate == "drop":
                    self.close_connection = True  # answer lost: the client sees EOF
                    return
                self._answer(status, answer)

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _draw(self) -> tuple[str, float]:
        with self._lock:
            faults = self.faults
            if faults.down:
                fate = "down"
            else:
                roll = self._random.random()
                fate = ("error" if roll < faults.error else
                        "drop" if roll < faults.error + faults.drop else "forwarded")
            wait = self._random.uniform(0, faults.delay) if faults.delay else 0.0
            self.counts[fate] += 1
        return fate, wait

    def _forward(self, body: bytes) -> tuple[int, bytes]:
        parts = urllib.parse.urlsplit(self.upstream)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            connection.request("POST", parts.path or "/", body,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
