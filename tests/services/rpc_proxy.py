"""A JSON-RPC proxy between a client and anvil that can fail on purpose: refuse to answer
(close the connection before forwarding), lose the answer (forward, then close without
replying) or delay it. Faults are armed per JSON-RPC method, so a test says exactly which
request fails and how often."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RpcProxy:
    """``with RpcProxy(upstream) as proxy:`` serves on ``proxy.url`` until the block ends."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.seen: Counter[str] = Counter()  # requests that arrived, per method
        self.forwarded: Counter[str] = Counter()  # requests that reached the upstream
        self._faults: dict[str, list[str]] = {}
        self._delays: dict[str, float] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                method = json.loads(body).get("method", "?")
                fault = proxy._take_fault(method)
                if fault == "refuse":
                    self.close_connection = True
                    return
                if fault in ("throttle", "busy"):  # as a hosted endpoint under load answers
                    self.send_response(429 if fault == "throttle" else 503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                time.sleep(proxy._delays.get(method, 0.0))
                request = urllib.request.Request(
                    proxy.upstream, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = response.read()
                with proxy._lock:
                    proxy.forwarded[method] += 1
                if fault == "lose":
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, method: str, how: str, times: int = 1) -> None:
        """The next `times` `method` requests: ``refuse`` (never forwarded), ``lose``
        (forwarded, answer dropped), ``throttle`` or ``busy`` (never forwarded, answered HTTP
        429 or 503)."""
        assert how in ("refuse", "lose", "throttle", "busy")
        with self._lock:
            self._faults.setdefault(method, []).extend([how] * times)

    def delay(self, method: str, seconds: float) -> None:
        self._delays[method] = seconds

    def _take_fault(self, method: str) -> str | None:
        with self._lock:
            self.seen[method] += 1
            pending = self._faults.get(method) or self._faults.get("*")
            return pending.pop(0) if pending else None

    def __enter__(self) -> RpcProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
