"""The chain client of the services: a retrying JSON-RPC connection and event polling with a
cursor kept in the database. (Transactions go through the one sender,
:class:`optinfer.contracts.sender.TxSender`, which numbers its own nonces.)

* :func:`connect` builds a Web3 whose every JSON-RPC request is retried with exponential
  back-off when the node drops the connection, times out or answers 429/5xx, and fails with
  :class:`RpcUnavailable` after the configured attempts. An answer, even an error, is never
  retried: a revert is final.
* :class:`EventCursor` hands each confirmed event to a handler exactly once: events up to
  ``head - confirmations`` are fetched in block ranges, and the handler's writes and the
  cursor's move past the range commit in one transaction. A crash before the commit replays
  the range; nothing after it does.
"""

from __future__ import annotations

import base64
import http.client
import logging
import re
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from eth_typing import ChecksumAddress
from eth_utils import event_abi_to_log_topic
from sqlalchemy.engine import Connection
from web3 import Web3
from web3.contract import Contract
from web3.providers.base import JSONBaseProvider
from web3.types import RPCEndpoint, RPCResponse

from optinfer.errors import UserError
from optinfer.services.store import ClaimRecord, RequestRecord, Store, lock_cursor, set_cursor

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


# ------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class ChainEvent:
    """One decoded event log."""

    name: str
    address: ChecksumAddress
    args: dict[str, Any]
    block_number: int
    log_index: int
    tx_hash: str  # 0x-prefixed


Handler = Callable[[Connection, ChainEvent], None]


class EventCursor:
    """Delivers the events of `contracts` (all their events, or those named in `events`) to a
    handler, each exactly once, in chain order, once `confirmations` blocks cover them.

    The cursor `name` (the last block fully handled) lives in `store`; a new EventCursor on the
    same store and name resumes after it. Blocks before `start_block` (the deployment block,
    say) are never read. One range of at most `max_block_range` blocks is one transaction:
    the handler's writes and the cursor's move commit together or not at all.

    Confirmations are the only defence against reorganisations: an event is delivered once
    it is `confirmations` deep and never taken back.
    """

    def __init__(
        self, w3: Web3, store: Store, name: str, contracts: Sequence[Contract], *,
        events: Sequence[str] | None = None, start_block: int = 0, confirmations: int = 0,
        max_block_range: int = 2000,
    ):
        if confirmations < 0 or max_block_range < 1 or start_block < 0:
            raise ValueError("confirmations >= 0, max_block_range >= 1, start_block >= 0")
        self.w3 = w3
        self.store = store
        self.name = name
        self.start_block = start_block
        self.confirmations = confirmations
        self.max_block_range = max_block_range
        self._decoders: dict[tuple[str, bytes], Any] = {}
        for contract in contracts:
            for entry in contract.abi:
                if entry["type"] != "event" or (events is not None and entry["name"] not in events):
                    continue
                topic = bytes(event_abi_to_log_topic(entry))
                self._decoders[(contract.address, topic)] = getattr(contract.events, entry["name"])
        if not self._decoders:
            raise ValueError(f"cursor {name!r}: the contracts have none of the events {events}")
        self._addresses = sorted({address for address, _ in self._decoders})
        self._topics = sorted({"0x" + topic.hex() for _, topic in self._decoders})

    def safe_head(self) -> int:
        """The newest block buried under `confirmations` blocks (-1 when there is none yet)."""
        return self.w3.eth.block_number - self.confirmations

    def fetch(self, from_block: int, to_block: int) -> list[ChainEvent]:
        """The watched events in blocks [from_block, to_block], in chain order."""
        logs = self.w3.eth.get_logs({
            "fromBlock": from_block, "toBlock": to_block, "address": self._addresses,
            "topics": [self._topics],
        })
        events = []
        for entry in logs:
            address = Web3.to_checksum_address(entry["address"])
            decoder = self._decoders.get((address, bytes(entry["topics"][0])))
            if decoder is None:
                continue
            decoded = decoder().process_log(entry)
            events.append(ChainEvent(
                name=decoded["event"], address=address, args=dict(decoded["args"]),
                block_number=entry["blockNumber"], log_index=entry["logIndex"],
                tx_hash="0x" + bytes(entry["transactionHash"]).hex(),
            ))
        events.sort(key=lambda event: (event.block_number, event.log_index))
        return events

    def poll(self, handle: Handler) -> int:
        """Hand every confirmed, not yet handled event to `handle(conn, event)`; return how
        many were handled. An exception from `handle` rolls back its range and propagates
        (the range is delivered again on the next poll)."""
        handled = 0
        head = self.safe_head()
        while True:
            with self.store.transaction() as conn:
                last = lock_cursor(conn, self.name, self.start_block - 1)
            first = last + 1
            if first > head:
                return handled
            last_in_range = min(head, first + self.max_block_range - 1)
            # Fetched outside the transaction: no database lock is held while the node answers.
            events = self.fetch(first, last_in_range)
            with self.store.transaction() as conn:
                # The lock makes another process polling the same cursor wait for this
                # transaction; if one moved it meanwhile, start over from where it stopped.
                if lock_cursor(conn, self.name, self.start_block - 1) != last:
                    continue
                for event in events:
                    handle(conn, event)
                set_cursor(conn, self.name, last_in_range)
            handled += len(events)

    def run(self, handle: Handler, stop: threading.Event, poll_interval: float) -> None:
        """Poll every `poll_interval` seconds until `stop` is set. An unreachable node is
        logged and waited out; a handler's exception ends the loop."""
        while not stop.is_set():
            try:
                self.poll(handle)
            except RpcUnavailable as err:
                log.error("cursor %s: %s", self.name, err)
            stop.wait(poll_interval)


def request_record(event: ChainEvent) -> RequestRecord:
    """The store's record of a ``RequestPosted`` event."""
    args = event.args
    return RequestRecord(
        request_id=args["requestId"],
        consumer=args["consumer"],
        model_id="0x" + bytes(args["modelId"]).hex(),
        prompt=list(args["prompt"]),
        max_tokens=args["maxTokens"],
        fee=args["fee"],
        callback=args["callback"],
        callback_gas_limit=args["callbackGasLimit"],
        named_provider=args["namedProvider"],
        commit_deadline=args["commitDeadline"],
        block_number=event.block_number,
        tx_hash=event.tx_hash,
    )


def claim_record(event: ChainEvent) -> ClaimRecord:
    """The store's record of an ``OutputCommitted`` event."""
    args = event.args
    return ClaimRecord(
        request_id=args["requestId"],
        provider=args["provider"],
        output=list(args["output"]),
        challenge_deadline=args["challengeDeadline"],
        block_number=event.block_number,
        tx_hash=event.tx_hash,
    )
