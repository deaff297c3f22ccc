"""What the API checks of a request body before anything parses it: its size and how deeply its
JSON nests.

A JSON parser recurses once per nesting level. One library the nodes import (py_ecc, through
the Ethereum packages) raises the interpreter's recursion limit to 100,000 when it is
imported, and then a body nested 100,000 levels deep overflows the C stack of the parser and
kills the process: one unauthenticated POST took the API down. :class:`BodyGuard` refuses such
bodies before they are parsed (413 for a body over the size limit, 422 for one nested deeper
than any request needs), and :func:`restore_recursion_limit` puts the interpreter's limit back,
so that whatever else recurses fails with an exception, not a crash.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

MAX_BODY_BYTES = 2 * 1024 * 1024
"""The largest request body: 100,000 prompt tokens as JSON numbers take about 1.1 MB."""

MAX_JSON_DEPTH = 16
"""The deepest nesting a body may have; the deepest request (chat messages) needs 3."""

RECURSION_LIMIT = 1000
"""CPython's own default, put back by :func:`restore_recursion_limit`."""

_STRUCTURE = re.compile(rb'[\[\]{}"\\]')

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def restore_recursion_limit() -> None:
    """Put the interpreter's recursion limit back to CPython's default if a library raised it
    (deep recursion then raises RecursionError instead of overflowing the C stack)."""
    if sys.getrecursionlimit() > RECURSION_LIMIT:
        sys.setrecursionlimit(RECURSION_LIMIT)


def json_depth(body: bytes, limit: int) -> int:
    """How deeply the arrays and objects of JSON text `body` nest, counted up to `limit + 1`
    (enough to refuse it), without parsing it: brackets inside strings do not count."""
    depth = deepest = 0
    in_string = False
    escaped_at = -1  # the byte a backslash in a string escapes
    for match in _STRUCTURE.finditer(body):
        at, char = match.start(), match.group()
        if in_string:
            if at == escaped_at:
                continue
            if char == b"\\":
                escaped_at = at + 1
            elif char == b'"':
                in_string = False
        elif char == b'"':
            in_string = True
        elif char in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
        elif char in (b"]", b"}"):
            depth -= 1
    return deepest


class BodyGuard:
    """ASGI middleware: a request body over `max_bytes` is answered 413, a JSON body nested
    deeper than `max_depth` 422, both before the application reads it."""

    def __init__(self, app: App, max_bytes: int = MAX_BODY_BYTES,
                 max_depth: int = MAX_JSON_DEPTH):
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, 413, f"the request body is over {self.max_bytes} bytes")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)  # a disconnect: pass it on
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _refuse(send, 413, f"the request body is over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if json_depth(body, self.max_depth) > self.max_depth:
            await _refuse(send, 422, f"the request body nests deeper than {self.max_depth} "
                                     "levels")
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body,
                                        "more_body": False}]), send)


def _replay(messages: list[Message]) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        return {"type": "http.disconnect"}

    return receive


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
