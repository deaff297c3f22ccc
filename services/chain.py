"""The services' connection to the chain: :func:`connect` builds a Web3 whose every JSON-RPC
request is retried with exponential back-off when the node drops the connection, times out or
answers 429/5xx, and fails with :class:`RpcUnavailable` after the configured attempts. An
answer, even an error, is never retried: a revert is final.

Events are read by ``services/events.py`` (a cursor kept in the database); transactions go
through the one sender, :class:`optinfer.contracts.sender.TxSender`.
"""

from __future__ import annotations

import base64
import http.client
import logging
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from web3 import Web3
from web3.providers.base import JSONBaseProvider
from web3.types import RPCEndpoint, RPCResponse

from optinfer.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

# HTTP answers that mean "the node is overloaded or restarting", not "your request is wrong".
RETRYABLE_HTTP_STATUS = frozenset({429, 502, 503, 504})


# ------------------------------------------------------------------------------ retries


class RpcUnavailable(UserError):
    """The node did not answer after every attempt (refused, dropped, timed out, 5xx)."""


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all; the n-th retry waits ``initial_delay * 2**(n-1)`` seconds, at
    most `max_delay`."""

    attempts: int = 5
    initial_delay: float = 0.5
    max_delay: float = 30.0

    @classmethod
    def from_settings(cls, settings) -> RetryPolicy:
        return cls(attempts=settings.rpc_attempts, initial_delay=settings.rpc_backoff)

    def delays(self) -> Iterator[float]:
        """The waits between attempts (one fewer than the attempts)."""
        for retry in range(self.attempts - 1):
            yield min(self.initial_delay * 2**retry, self.max_delay)

    def run(self, action: Callable[[], T], what: str) -> T:
        """`action()`, retried on transient failures; RpcUnavailable once they are spent."""
        delays = self.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                return action()
            except ssl.SSLError as err:
                # Not a passing fault: a TLS handshake with a plain-http node, or with a
                # certificate nobody here vouches for, fails the same way every time.
                hint = ("its certificate is not trusted here (SSL_CERT_FILE names a CA file "
                        "to trust)" if isinstance(err, ssl.SSLCertVerificationError)
                        else "is the node served over plain http://?")
                raise RpcUnavailable(f"{what}: TLS failed ({err.reason or err}); {hint}"
                                     ) from err
            except Exception as err:
                if not is_transient(err):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise RpcUnavailable(
                        f"{what}: no answer after {attempt} attempt(s): "
                        f"{type(err).__name__}: {_reason(err)}"
                    ) from err
                log.warning("%s failed (%s), retry %d in %.2fs", what, type(err).__name__,
                            attempt, delay)
                time.sleep(delay)


class RpcHTTPError(Exception):
    """The node answered with an HTTP error status instead of a JSON-RPC answer."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}")
        self.status = status


def is_transient(err: BaseException) -> bool:
    """Whether `err` (raised by :class:`RetryingHTTPProvider`) means the request may not have
    reached the node or it could not answer: a refused or dropped connection, a timeout, an
    answer cut short, or an HTTP 429/502/503/504."""
    if isinstance(err, RpcHTTPError):
        return err.status in RETRYABLE_HTTP_STATUS
    return isinstance(err, ConnectionError | TimeoutError | http.client.HTTPException)


def _reason(err: BaseException) -> str:
    """What went wrong, short: the OS error's errno and text, or the gist of the message."""
    text = str(err)
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if errno:
        return errno.group(0).strip()
    for marker in ("timed out", "without response"):
        if marker in text:
            return marker
    first = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return first[:120]


class RetryingHTTPProvider(JSONBaseProvider):
    """JSON-RPC over HTTP(S), every request retried under a :class:`RetryPolicy` when the node
    refuses or drops the connection, times out or answers 429/502/503/504.

    Each thread keeps one connection alive, through http.client: web3's own provider (on
    requests) spends 0.5 ms of CPU a call, this one 0.08, and a provider's commit makes
    three calls. Proxies from the environment (HTTP_PROXY) are not used.
    """

    def __init__(self, url: str, policy: RetryPolicy, timeout: float):
        super().__init__()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"RPC URL {url!r} is not an http:// or https:// URL")
        try:
            parts.port  # noqa: B018 (urllib checks the range when asked)
        except ValueError as err:
            raise UserError(f"RPC URL {url!r}: {err}") from None
        self.endpoint_uri = url
        self.policy = policy
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._address = (parts.hostname, parts.port or (443 if self._https else 80))
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if parts.username is not None:
            credentials = f"{urllib.parse.unquote(parts.username)}:" \
                          f"{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = \
                "Basic " + base64.b64encode(credentials.encode()).decode()
        self._local = threading.local()

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        body = self.encode_rpc_request(method, params)
        return self.policy.run(lambda: self._post(body), f"{method} on {self.endpoint_uri}")

    def _post(self, body: bytes) -> RPCResponse:
        connection = self._connection()
        try:
            connection.request("POST", self._path, body, self._headers)
            response = connection.getresponse()
            raw = response.read()
        except BaseException:
            # Whatever was half sent or half read, this connection is done.
            connection.close()
            self._local.connection = None
            raise
        if response.status >= 400:
            raise RpcHTTPError(response.status, response.reason)
        return self.decode_rpc_response(raw)

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's connection. One the node closed while it was idle (its keep-alive
        timeout, a restart) is readable: it is replaced, not used and failed."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None \
                and select.select([connection.sock], [], [], 0)[0]:
            connection.close()
            connection = None
        if connection is None:
            host, port = self._address
            kind = _NoDelayHTTPSConnection if self._https else _NoDelayHTTPConnection
            connection = kind(host, port, timeout=self.timeout)
            self._local.connection = connection
        return connection


class _NoDelay:
    """http.client sends a request's headers and body in two writes: without TCP_NODELAY the
    body waits for the headers' ACK, which the node may delay (Nagle's algorithm)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _NoDelayHTTPConnection(_NoDelay, http.client.HTTPConnection):
    pass


class _NoDelayHTTPSConnection(_NoDelay, http.client.HTTPSConnection):
    pass


def connect(url: str, policy: RetryPolicy | None = None, timeout: float = 30.0) -> Web3:
    """A Web3 client on `url` with retries; nothing is sent until the first call."""
    return Web3(RetryingHTTPProvider(url, policy or RetryPolicy(), timeout))


def connect_settings(settings) -> Web3:
    """:func:`connect` with the RPC URL, retry policy and timeout of `settings`."""
    return connect(settings.rpc_url, RetryPolicy.from_settings(settings), settings.request_timeout)
