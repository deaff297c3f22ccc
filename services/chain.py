"""The chain client of the services: a retrying JSON-RPC connection, event polling with a
cursor kept in the database, and a transaction sender that manages its own nonces.

* :func:`connect` builds a Web3 whose every JSON-RPC request is retried with exponential
  back-off when the node drops the connection, times out or answers 429/5xx, and fails with
  :class:`RpcUnavailable` after the configured attempts. An answer, even an error, is never
  retried: a revert is final.
* :class:`EventCursor` hands each confirmed event to a handler exactly once: events up to
  ``head - confirmations`` are fetched in block ranges, and the handler's writes and the
  cursor's move past the range commit in one transaction. A crash before the commit replays
  the range; nothing after it does.
* :class:`TxSender` signs with a local key: it numbers its transactions itself (so several can
  be sent without waiting), resynchronises from the chain on "nonce too low", pads the gas
  estimate, and recognises its own transaction when a retried send reaches a node that already
  has it, so a dropped connection never sends a transaction twice.
"""

from __future__ import annotations

import base64
import http.client
import logging
import math
import re
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import rlp
from eth_account.signers.local import LocalAccount
from eth_keys.datatypes import PrivateKey
from eth_typing import ChecksumAddress
from eth_utils import event_abi_to_log_topic, keccak
from hexbytes import HexBytes
from sqlalchemy.engine import Connection
from web3 import Web3
from web3._utils.method_formatters import receipt_formatter  # web3 is pinned to 7.x
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.datastructures import AttributeDict
from web3.exceptions import TimeExhausted, TransactionNotFound, Web3RPCError
from web3.providers.base import JSONBaseProvider
from web3.types import RPCEndpoint, RPCResponse, TxParams, TxReceipt

from optinfer.contracts.artifacts import Artifact, load_artifact
from optinfer.contracts.bindings import ContractRevert, decode_revert, padded_gas
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


def _revert_of(err: Web3RPCError) -> bytes | None:
    """The revert data of a failed eth_call/eth_estimateGas (b"" for a bare revert), or None
    when the node's error is not a revert. Nodes answer code 3 with the data, or a message
    that says "revert"."""
    error = (err.rpc_response or {}).get("error")
    if not isinstance(error, dict):
        return None
    data = error.get("data")
    if isinstance(data, dict):  # some nodes nest it
        data = data.get("data")
    if error.get("code") != 3 and "revert" not in str(error.get("message", "")).lower():
        return None
    return bytes(HexBytes(data)) if isinstance(data, str) and data.startswith("0x") else b""


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


# ------------------------------------------------------------------------- transactions


class TxFailed(Exception):
    """A transaction was mined but failed (status 0)."""


class TxDropped(TxFailed):
    """A transaction that was sent is neither mined nor known to the node any more (its pool
    was cleared, or it restarted): nothing of it is on chain, as with a failed one."""


DYNAMIC_FEE_TYPE = b"\x02"  # EIP-2718's type byte of an EIP-1559 transaction


def sign_dynamic_fee(key: PrivateKey, tx: dict) -> tuple[bytes, bytes]:
    """The raw bytes and hash of EIP-1559 transaction `tx` (chainId, nonce,
    maxPriorityFeePerGas, maxFeePerGas, gas, value, data, optional to) signed with `key`:
    the bytes eth_account makes (tests check them), at a third of its CPU, which the
    provider's commit thread spends beside generation."""
    to = tx.get("to")
    fields = [tx["chainId"], tx["nonce"], tx["maxPriorityFeePerGas"], tx["maxFeePerGas"],
              tx["gas"], bytes(HexBytes(to)) if to else b"", tx["value"],
              bytes(HexBytes(tx["data"])), []]  # the empty access list
    signature = key.sign_msg_hash(keccak(DYNAMIC_FEE_TYPE + rlp.encode(fields)))
    raw = DYNAMIC_FEE_TYPE + rlp.encode([*fields, signature.v, signature.r, signature.s])
    return raw, keccak(raw)


DROP_CHECK_POLLS = 10
"""Receipt polls between two checks that the node still has the transaction."""


class TxSender:
    """Signs and sends `account`'s transactions, numbering them locally.

    Thread-safe: concurrent sends get consecutive nonces. The gas limit is the node's estimate
    times `gas_margin`; an estimate that reverts raises the decoded :class:`ContractRevert`
    (with the contract's `artifact`) before anything is signed, and is never retried.
    """

    def __init__(self, w3: Web3, account: LocalAccount, *, gas_margin: float = 1.2,
                 receipt_timeout: float = 120.0, receipt_poll: float = 0.1):
        if gas_margin < 1:
            raise ValueError("gas_margin must be >= 1")
        self.w3 = w3
        self.account = account
        self.address: ChecksumAddress = account.address
        self.gas_margin = gas_margin
        self.receipt_timeout = receipt_timeout
        self.receipt_poll = receipt_poll
        self._lock = threading.Lock()
        self._next_nonce: int | None = None
        self._chain_id: int | None = None
        self._key = PrivateKey(bytes(account.key))

    @property
    def next_nonce(self) -> int | None:
        """The nonce the next transaction will use (None until the first send or resync)."""
        return self._next_nonce

    def resync(self) -> int:
        """Take the next nonce from the chain (pending transactions included)."""
        self._next_nonce = self.w3.eth.get_transaction_count(self.address, "pending")
        return self._next_nonce

    # -- sending ---------------------------------------------------------------------------

    def submit(self, tx: TxParams, artifact: Artifact | None = None,
               on_signed: Callable[[HexBytes], None] | None = None) -> HexBytes:
        """Estimate, sign and send `tx` (to, data, value; the rest is filled); its hash.

        `on_signed` gets the hash of each signed transaction before it is sent (to record it:
        an exception there sends nothing). The node is asked through :meth:`rpc`: a commit on
        a small model takes a few milliseconds of generation, and web3's request formatting
        cost as much again.
        """
        tx = dict(tx)
        tx.setdefault("value", 0)
        tx.setdefault("data", b"")
        if "gas" not in tx:
            estimate = self._estimate(tx, artifact)
            tx["gas"] = padded_gas(estimate, math.ceil(estimate * self.gas_margin))
        if "gasPrice" not in tx and "maxFeePerGas" not in tx:
            tx.update(self._fees())
        if self._chain_id is None:
            self._chain_id = self.w3.eth.chain_id
        tx["chainId"] = self._chain_id
        with self._lock:
            nonce = self._next_nonce if self._next_nonce is not None else self.resync()
            for attempt in range(3):
                raw, tx_hash = self._sign({**tx, "nonce": nonce})
                if on_signed is not None:
                    on_signed(HexBytes(tx_hash))
                if self._broadcast(raw, tx_hash):
                    self._next_nonce = nonce + 1
                    return HexBytes(tx_hash)
                # Our count was stale (another sender used this key, or the node restarted).
                nonce = self.resync()
                log.warning("%s: nonce was stale, resynchronised to %d (try %d)",
                            self.address, nonce, attempt + 1)
        raise RuntimeError(f"{self.address}: nonce still rejected after resynchronising")

    def _sign(self, tx: dict) -> tuple[bytes, bytes]:
        if "gasPrice" in tx:  # a chain without EIP-1559
            signed = self.account.sign_transaction(tx)
            return bytes(signed.raw_transaction), bytes(signed.hash)
        return sign_dynamic_fee(self._key, tx)

    def rpc(self, method: str, *params: Any) -> Any:
        """One JSON-RPC call through the retrying provider, without web3's formatters: the
        raw result, or Web3RPCError carrying the node's error object."""
        response = self.w3.provider.make_request(RPCEndpoint(method), list(params))
        if "error" in response:
            error = response["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            raise Web3RPCError(message, rpc_response=response)
        return response["result"]

    def _broadcast(self, raw: bytes, tx_hash: bytes) -> bool:
        """Send `raw`; True when the node has it (now or from an earlier attempt whose answer
        was lost), False when its nonce is taken by another transaction."""
        try:
            self.rpc("eth_sendRawTransaction", "0x" + bytes(raw).hex())
            return True
        except Web3RPCError as err:
            message = str(err).lower()
            if "already known" in message or "already imported" in message:
                return True
            if "nonce too low" in message or "replacement transaction underpriced" in message:
                # Ours, mined or pending after a retried send whose answer was lost? Then this
                # is success; anything else means another transaction holds the nonce.
                return self.known(tx_hash)
            raise

    def known(self, tx_hash: bytes) -> bool:
        """Whether the node has transaction `tx_hash`, pending or mined."""
        try:
            self.w3.eth.get_transaction(HexBytes(tx_hash))
            return True
        except TransactionNotFound:
            return False

    def wait(self, tx_hash: bytes) -> TxReceipt:
        """The receipt of `tx_hash` once mined (as web3 formats it); TxFailed when it failed,
        TxDropped when the node no longer has it (the next nonce is then taken from the
        chain again), web3's TimeExhausted when it is not mined within `receipt_timeout`."""
        deadline = time.monotonic() + self.receipt_timeout
        tx_hex = "0x" + bytes(tx_hash).hex()
        # A dev chain mines a few milliseconds after it accepts: ask again soon, then every
        # `receipt_poll` seconds (a first wait of 100 ms was a commit's whole cost there).
        pause = min(0.005, self.receipt_poll)
        polls = 0
        while (raw := self.rpc("eth_getTransactionReceipt", tx_hex)) is None:
            if time.monotonic() > deadline:
                raise TimeExhausted(f"transaction {tx_hex} is not in the chain after "
                                    f"{self.receipt_timeout} s")
            polls += 1
            if polls % DROP_CHECK_POLLS == 0 and not self.known(tx_hash):
                # With it went every later transaction of ours that it held back, and the
                # local nonce count is ahead of the chain: what is sent next would wait
                # forever behind the gap.
                with self._lock:
                    self.resync()
                raise TxDropped(f"transaction {tx_hex} was dropped by the node, not mined")
            time.sleep(pause)
            pause = min(2 * pause, self.receipt_poll)
        receipt = AttributeDict.recursive(receipt_formatter(raw))
        if receipt["status"] != 1:
            raise TxFailed(f"transaction {tx_hex} failed in block {receipt['blockNumber']}")
        return receipt

    def send(self, tx: TxParams, artifact: Artifact | None = None) -> TxReceipt:
        """:meth:`submit` then :meth:`wait`."""
        return self.wait(self.submit(tx, artifact))

    def transact(self, function: ContractFunction, *, value: int = 0,
                 artifact: Artifact | None = None) -> TxReceipt:
        """Send a contract function call (reverts decoded with `artifact`) and wait for it."""
        tx = {"to": function.address, "data": function._encode_transaction_data(),
              "value": value}
        return self.send(tx, artifact)

    def deploy(self, name: str, *constructor_args: Any) -> ChecksumAddress:
        """Deploy the committed artifact `name`; the new contract's address."""
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        data = factory.constructor(*constructor_args).data_in_transaction
        receipt = self.send({"data": data}, artifact)
        return Web3.to_checksum_address(receipt["contractAddress"])

    # -- helpers ---------------------------------------------------------------------------

    def _estimate(self, tx: dict, artifact: Artifact | None) -> int:
        call = {"from": self.address, "value": hex(tx["value"]),
                "data": "0x" + bytes(HexBytes(tx["data"])).hex()}
        if tx.get("to"):
            call["to"] = tx["to"]
        try:
            return int(self.rpc("eth_estimateGas", call), 16)
        except Web3RPCError as err:
            revert = _revert_of(err)
            if revert is None:
                raise
            if artifact is not None:
                raise decode_revert(artifact, revert) from err
            raise ContractRevert(None, (), revert, f"gas estimate reverted: {err}") from err

    def _fees(self) -> dict[str, int]:
        """EIP-1559 fees (room for the base fee to double), or a gas price on older chains."""
        base_fee = self.w3.eth.get_block("latest").get("baseFeePerGas")
        if base_fee is None:
            return {"gasPrice": self.w3.eth.gas_price}
        tip = self.w3.eth.max_priority_fee
        return {"maxFeePerGas": 2 * base_fee + tip, "maxPriorityFeePerGas": tip}
