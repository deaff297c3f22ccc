"""Chain events into the database, each exactly once: :class:`EventCursor` hands each
confirmed event to a handler; events up to ``head - confirmations`` are fetched in block
ranges, and the handler's writes and the cursor's move past the range commit in one
transaction. A crash before the commit replays the range; nothing after it does.

:func:`request_record` and :func:`claim_record` turn the coordinator's events into the
store's records; :func:`chain_event` turns a web3 decoded event (a receipt's, or get_logs')
into the cursor's :class:`ChainEvent`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_typing import ChecksumAddress
from eth_utils import event_abi_to_log_topic
from sqlalchemy.engine import Connection
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import BlockNotFound, Web3RPCError

from optinfer.contracts.bindings import EventDecoder
from optinfer.services.chain import RpcUnavailable
from optinfer.services.statuses import ClaimStatus, RequestStatus
from optinfer.services.store import (
    ClaimRecord,
    RequestRecord,
    Store,
    checkpoints,
    lock_cursor,
    record_claim,
    rewind_cursor,
    set_claim_status,
    set_cursor,
    set_request_status,
    undo_unconfirmed,
)

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ChainEvent:
    """One decoded event log."""

    name: str
    address: ChecksumAddress
    args: dict[str, Any]
    block_number: int
    log_index: int
    tx_hash: str  # 0x-prefixed
    block_hash: str | None = None  # 0x-prefixed


Handler = Callable[[Connection, ChainEvent], None]
Rewind = Callable[[Connection, int], None]
Confirm = Callable[[Connection, int, int, list["ChainEvent"]], None]
"""Checks what a node wrote ahead of the cursor against the range [first, last] just read
and its events (``confirm_outcomes``)."""
"""Drops what a handler derived from the blocks after the given one (the chain lost them)."""


class EventCursor:
    """Delivers the events of `contracts` (all their events, or those named in `events`) to a
    handler, each exactly once, in chain order, once `confirmations` blocks cover them.

    The cursor `name` (the last block fully handled) lives in `store`; a new EventCursor on the
    same store and name resumes after it. Blocks before `start_block` (the deployment block,
    say) are never read. One range of at most `max_block_range` blocks is one transaction:
    the handler's writes and the cursor's move commit together or not at all.

    Reorganisations: an event is delivered once it is `confirmations` deep, and each range's
    last block is kept with its hash (a checkpoint, the last ``CHECKPOINTS_KEPT``). A poll
    checks that the newest checkpoint is still canonical, first and again after reading each
    range (before its checkpoint is written); when it is not, the chain
    lost blocks the cursor had read: it goes back to the newest checkpoint that is (its start,
    when none is), `on_rewind(conn, block)` drops what the handler derived from the later
    blocks, and they are read again (the handler's upserts take the events that replaced
    them).
    """

    def __init__(
        self, w3: Web3, store: Store, name: str, contracts: Sequence[Contract], *,
        events: Sequence[str] | None = None, start_block: int = 0, confirmations: int = 0,
        max_block_range: int = 2000, on_rewind: Rewind | None = None,
        on_read: Confirm | None = None,
    ):
        if confirmations < 0 or max_block_range < 1 or start_block < 0:
            raise ValueError("confirmations >= 0, max_block_range >= 1, start_block >= 0")
        self.w3 = w3
        self.store = store
        self.name = name
        self.start_block = start_block
        self.confirmations = confirmations
        self.max_block_range = max_block_range
        self.on_rewind = on_rewind
        self.on_read = on_read
        self._decoders: dict[tuple[str, bytes], EventDecoder] = {}
        for contract in contracts:
            for entry in contract.abi:
                if entry["type"] != "event" or (events is not None and entry["name"] not in events):
                    continue
                topic = bytes(event_abi_to_log_topic(entry))
                self._decoders[(contract.address, topic)] = EventDecoder(entry)
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
            events.append(ChainEvent(
                name=decoder.name, address=address, args=decoder.args(entry),
                block_number=entry["blockNumber"], log_index=entry["logIndex"],
                tx_hash="0x" + bytes(entry["transactionHash"]).hex(),
                block_hash="0x" + bytes(entry["blockHash"]).hex(),
            ))
        events.sort(key=lambda event: (event.block_number, event.log_index))
        return events

    def poll(self, handle: Handler) -> int:
        """Hand every confirmed, not yet handled event to `handle(conn, event)`; return how
        many were handled. An exception from `handle` rolls back its range and propagates
        (the range is delivered again on the next poll)."""
        handled = 0
        self._follow_reorganisation()
        head = self.safe_head()
        while True:
            with self.store.transaction() as conn:
                last = lock_cursor(conn, self.name, self.start_block - 1)
            first = last + 1
            if first > head:
                return handled
            last_in_range = min(head, first + self.max_block_range - 1)
            # Fetched outside the transaction: no database lock is held while the node answers.
            # The checkpoint's hash before the logs: a reorganisation between the two leaves a
            # checkpoint that the next poll finds lost, and the range is read again.
            end_hash = block_hash(self.w3, last_in_range)
            if end_hash is None:  # the chain got shorter (a restarted node): rewind next poll
                return handled
            # None: the chain got shorter since the hash was read (a reorganisation in
            # progress): rewind next poll.
            events = unless_shorter(self.w3, last_in_range,
                                    functools.partial(self.fetch, first, last_in_range))
            if events is None:
                return handled
            # What the cursor read before this range must still be the chain's: a
            # reorganisation since the check at the start of the poll would otherwise go
            # unseen for good (this range and its checkpoint are the new chain's).
            self._follow_reorganisation()
            with self.store.transaction() as conn:
                # The lock makes another process polling the same cursor wait for this
                # transaction; if one moved it meanwhile (or the check above went back),
                # start over from where it stopped.
                if lock_cursor(conn, self.name, self.start_block - 1) != last:
                    continue
                for event in events:
                    handle(conn, event)
                if self.on_read is not None:
                    self.on_read(conn, first, last_in_range, events)
                set_cursor(conn, self.name, last_in_range, end_hash)
            handled += len(events)

    def _follow_reorganisation(self) -> None:
        """Go back to the newest checkpoint still on the canonical chain, if the newest one
        is not (see the class docstring)."""
        with self.store.transaction() as conn:
            kept = checkpoints(conn, self.name)
        if not kept or block_hash(self.w3, kept[0][0]) == kept[0][1]:
            return
        back_to = next((number for number, kept_hash in kept[1:]
                        if block_hash(self.w3, number) == kept_hash), self.start_block - 1)
        log.warning("cursor %s: the chain lost blocks after %d that it had read; reading "
                    "them again", self.name, back_to)
        with self.store.transaction() as conn:
            lock_cursor(conn, self.name, self.start_block - 1)
            rewind_cursor(conn, self.name, back_to)
            if self.on_rewind is not None:
                self.on_rewind(conn, back_to)

    def run(self, handle: Handler, stop: threading.Event, poll_interval: float) -> None:
        """Poll every `poll_interval` seconds until `stop` is set. An unreachable node is
        logged and waited out; a handler's exception ends the loop."""
        while not stop.is_set():
            try:
                self.poll(handle)
            except RpcUnavailable as err:
                log.error("cursor %s: %s", self.name, err)
            stop.wait(poll_interval)


def confirm_outcomes(conn: Connection, first: int, last: int, events: list[ChainEvent]
                     ) -> list[int]:
    """The requests cursors' `on_read`: a status or claim a node wrote from its own receipt in
    a block of [first, last] stands only if the cursor found its event there; the others were
    in blocks the chain lost (``store.undo_unconfirmed``). The request ids undone."""
    seen = {(event.args["requestId"], event.block_number) for event in events
            if event.name in OUTCOMES}
    return undo_unconfirmed(conn, first, last, seen)


def block_hash(w3: Web3, number: int) -> str | None:
    """The canonical hash of block `number` (0x-hex); None past the head (a shorter chain)."""
    try:
        return "0x" + bytes(w3.eth.get_block(number)["hash"]).hex()
    except BlockNotFound:
        return None


def unless_shorter(w3: Web3, block: int, read: Callable[[], Any]) -> Any:
    """`read()`, or None when the node refused it because its chain is now shorter than
    `block` (a reorganisation, or a node restarted from an older state); any other refusal
    is raised."""
    try:
        return read()
    except Web3RPCError:
        if w3.eth.block_number < block:
            return None
        raise


def logs_since(w3: Web3, event: Any, from_block: int, **argument_filters: Any) -> list:
    """`event`'s logs (a contract's ``contract.events.Name``) from block `from_block`,
    filtered by `argument_filters`; none when the chain is shorter than `from_block` now (a
    reorganisation took the block a node read it from: the node's cursor follows it)."""
    logs = unless_shorter(w3, from_block, lambda: list(event.get_logs(
        argument_filters=argument_filters or None, from_block=from_block)))
    return [] if logs is None else logs


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
        block_hash=event.block_hash,
        temperature=args["sampling"]["temperature"],
        top_p=args["sampling"]["topP"],
        seed=args["sampling"]["seed"],
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
        block_hash=event.block_hash,
    )


def chain_event(event) -> ChainEvent:
    """A web3 decoded event (from a receipt or get_logs) as the cursor's ChainEvent."""
    return ChainEvent(name=event["event"], address=Web3.to_checksum_address(event["address"]),
                      args=dict(event["args"]), block_number=event["blockNumber"],
                      log_index=event["logIndex"],
                      tx_hash="0x" + bytes(event["transactionHash"]).hex(),
                      block_hash="0x" + bytes(event["blockHash"]).hex()
                      if event.get("blockHash") is not None else None)


OUTCOMES = ("OutputCommitted", "Finalized", "Slashed", "Refunded")
"""The coordinator's events that settle what became of a request: a node's cursor watches them
so that its database agrees with the chain, whichever node filled it."""


def follow_outcome(conn: Connection, event: ChainEvent) -> bool:
    """Record what `event` (one of `OUTCOMES`) says became of its request: a claim committed
    (recorded, the request committed), finalized, slashed (the request rejected) or the fee
    refunded. Each write is guarded by the status table, so a repeated or late event changes
    nothing; True when this was a new claim."""
    request_id = event.args["requestId"]
    block = event.block_number
    if event.name == "OutputCommitted":
        new = record_claim(conn, claim_record(event))
        set_request_status(conn, request_id, RequestStatus.COMMITTED, status_block=block)
        return new
    if event.name == "Finalized":
        set_request_status(conn, request_id, RequestStatus.FINALIZED, status_block=block)
        set_claim_status(conn, request_id, ClaimStatus.FINALIZED)
    elif event.name == "Slashed":
        set_request_status(conn, request_id, RequestStatus.REJECTED, status_block=block)
        set_claim_status(conn, request_id, ClaimStatus.SLASHED)
    elif event.name == "Refunded":
        set_request_status(conn, request_id, RequestStatus.REFUNDED, status_block=block)
    else:
        raise ValueError(f"{event.name} is not one of {OUTCOMES}")
    return False
