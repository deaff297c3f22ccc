"""One player's side of its dispute games, the same for the provider and the watchtower: read
the game from the chain, ask ``prover.game.decide``, journal the move, send it, confirm it.

Each node keeps only what is its own: the provider leases all its open games each poll and
sends their moves before it waits for any; the watchtower plays one game per Celery task, a
few moves at a time, and schedules the next look. Both call :class:`GameResponder` for a turn.

The journal is the ``moves`` table: one row per move of this player, at the move's position
in the game (``prover.game.move_position``: the same for every worker that reads the same
state), written before its transaction is signed, then given the transaction's hash, then its
block. When the chain asks for a move at a position that has a row:

* the same move, its transaction mined or pending: waited for, never sent again;
* the same move whose transaction failed, was dropped or never left: sent again;
* another move (the recorded one never landed, and the game went on without it): the row is
  rewritten and the new move sent.

So a crash anywhere, a second worker or a retried task sends each move at most once that
lands; a restarted node recomputes nothing but its trace.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hexbytes import HexBytes
from sqlalchemy.engine import Connection
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3RPCError

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.dispute_game import DisputeGame
from optinfer.contracts.sender import TxSender
from optinfer.prover import game as spec
from optinfer.prover.game import ModelTrace, Phase, Role
from optinfer.services import store as st
from optinfer.services.statuses import GameStatus
from optinfer.services.store import GameRecord, MoveRecord, Store


def move_summary(action: spec.Action) -> dict[str, Any]:
    """What the journal keeps of a move, as JSON: its scalars, roots (0x-hex) and shape, the
    length of its Merkle paths and children lists; a one-step as its node and element (its
    witness runs to megabytes). A retried move has the same summary, another move at the same
    position not."""
    if isinstance(action, spec.OneStep):
        return {"k": action.witness.k, "element": action.witness.out_index}
    kept: dict[str, Any] = {}
    for name, value in vars(action).items():
        if isinstance(value, bytes):
            kept[name] = "0x" + value.hex()
        elif isinstance(value, tuple | list):
            hashes = any(isinstance(item, bytes) for item in value)
            kept[name] = len(value) if hashes else [int(item) for item in value]
        else:
            kept[name] = value
    return kept


def describe(action: spec.Action) -> str:
    """One short name for a log line: ``PostMid(mid=449)``, ``RevealChildren(children=16)``."""
    inner = ", ".join(f"{name}={value}" for name, value in move_summary(action).items()
                      if not str(value).startswith("0x"))
    return f"{type(action).__name__}({inner})"


class Landing(enum.Enum):
    """What became of a journaled move's transaction."""

    MINED = "mined"  # in a block, and it succeeded
    PENDING = "pending"  # known to the node, not yet mined
    MISSING = "missing"  # failed, dropped, or never sent: the move has to be sent again


@dataclass(frozen=True)
class SentMove:
    """A move whose transaction is out (sent now, or found sent by an earlier holder)."""

    game_id: int
    seq: int
    tx_hash: HexBytes
    action: spec.Action


class GameGone(Exception):
    """A game this node recorded is not on the chain: a reorganisation took the block that
    opened it, perhaps before any event cursor read it (the node drops the row)."""


@dataclass(frozen=True)
class Turn:
    """One read of a game and what this player did with it: `outcome` once it is resolved
    (won or lost, for this player), else `sent`, its move (None when it has none now)."""

    state: spec.GameState
    now: int
    outcome: GameStatus | None = None
    sent: SentMove | None = None


class _LazyTrace:
    """A trace computed on first use: ``decide`` touches the trace only when this player has to
    move, so a game that only waits for the opponent computes nothing."""

    def __init__(self, compute: Callable[[], ModelTrace]):
        self._compute = compute

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compute(), name)


Resolved = Callable[[Connection, GameRecord, spec.GameState, GameStatus], None]
"""A node's own bookkeeping when one of its games ends, in the transaction that records it."""


class GameResponder:
    """`role`'s turns in its games on `game`, journaled in `store`, sent by `sender`.

    `trace_of` gives the trace this player plays a game's request with (computed once per
    request and kept until no open game of this player needs it); `log` is the node's logger;
    `before_send` runs after a move is journaled and before it is sent (crash tests);
    `on_resolved` is the node's bookkeeping when a game ends."""

    def __init__(self, *, w3: Web3, store: Store, game: DisputeGame, sender: TxSender,
                 role: Role, trace_of: Callable[[GameRecord], ModelTrace],
                 log: logging.Logger, before_send: Callable[[], None] | None = None,
                 on_resolved: Resolved | None = None):
        self.w3, self.store, self.game, self.sender, self.role = w3, store, game, sender, role
        self.log = log
        self._trace_of = trace_of
        self._before_send = before_send
        self._on_resolved = on_resolved
        self._traces: dict[int, ModelTrace] = {}
        self._traces_lock = threading.Lock()
        self._time_cache: tuple[int | None, float] = (None, 0.0)

    # -- a turn ----------------------------------------------------------------------------

    def turn(self, record: GameRecord, worker: str) -> Turn:
        """Read game `record` (leased by `worker`) and make this player's move if it has one:
        journaled and sent, not waited for (:meth:`confirm`). A resolved game is recorded as
        won or lost and its lease released."""
        self.reconcile(record.game_id)
        state = self.read(record)
        now = self.chain_time()
        if state.phase is Phase.RESOLVED:
            return Turn(state, now, outcome=self.finish(record, state, worker))
        self.save(record, state, worker, now)
        trace = _LazyTrace(lambda: self.trace(record))
        actions = spec.decide(state, trace, self.role, now)  # one move at most
        sent = self.send(record, state, actions[0]) if actions else None
        return Turn(state, now, sent=sent)

    def read(self, record: GameRecord) -> spec.GameState:
        """The game as the chain holds it, read at one block (``DisputeGame.state``: one
        bounded log query from the block it opened in). GameGone when the chain no longer
        has it."""
        opened = record.state.get("opened_block", 0)
        try:
            return self.game.state(record.game_id, opened).state
        except ContractRevert as err:
            if err.name != "GameNotFound":
                raise
        except Web3RPCError:
            if opened <= self.w3.eth.block_number:
                raise
        raise GameGone(f"game {record.game_id} (opened in block {opened}) is not on the chain: "
                       "a reorganisation took it")

    def send(self, record: GameRecord, state: spec.GameState, action: spec.Action
             ) -> SentMove | None:
        """Journal `action` at its position and send it, or take over the transaction an
        earlier holder sent for it; None when the contract refuses it now (the game moved on
        since it was read: the next turn reads it again)."""
        game_id, seq = record.game_id, spec.move_position(state, action)
        move = MoveRecord(game_id, self.role, seq, self.role, type(action).__name__,
                          move_summary(action))
        with self.store.transaction() as conn:
            recorded = st.journal_move(conn, move)
        if (recorded.kind, recorded.payload) == (move.kind, move.payload) \
                and recorded.tx_hash is not None \
                and self.landing(recorded.tx_hash) is not Landing.MISSING:
            self.log.info("game %d: %s at position %d was sent before (tx %s); waiting for it",
                          game_id, move.kind, seq, recorded.tx_hash)
            return SentMove(game_id, seq, HexBytes(recorded.tx_hash), action)
        if self._before_send is not None:
            self._before_send()

        def note_hash(tx_hash: HexBytes, _nonce: int) -> None:  # before it is broadcast
            with self.store.transaction() as conn:
                st.set_move_transaction(conn, game_id, self.role, seq, tx_hash.to_0x_hex())

        try:
            tx_hash = self.sender.submit(self.game.move_tx(game_id, action, state),
                                         self.game.artifact, on_signed=note_hash)
        except ContractRevert as err:
            with self.store.transaction() as conn:
                st.forget_unsent_move(conn, game_id, self.role, seq)
            self.log.warning("game %d: %s at position %d not accepted (%s); reading the game "
                             "again next turn", game_id, move.kind, seq, err.name or err)
            return None
        return SentMove(game_id, seq, tx_hash, action)

    def confirm(self, move: SentMove) -> int:
        """Wait for `move` to be mined and record its block (returned). TxFailed when it
        failed or was dropped: the next turn reads the game and sends what it asks for."""
        receipt = self.sender.wait(move.tx_hash)
        block = receipt["blockNumber"]
        with self.store.transaction() as conn:
            st.set_move_transaction(conn, move.game_id, self.role, move.seq,
                                    move.tx_hash.to_0x_hex(), block)
        self.log.info("game %d: %s at position %d in tx %s", move.game_id,
                      describe(move.action), move.seq, move.tx_hash.to_0x_hex())
        return block

    def landing(self, tx_hash: str) -> Landing:
        """Whether the transaction of a journaled move is mined, pending or missing."""
        try:
            receipt = self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return Landing.PENDING if self.sender.known(HexBytes(tx_hash)) else Landing.MISSING
        return Landing.MINED if receipt["status"] == 1 else Landing.MISSING

    def reconcile(self, game_id: int) -> None:
        """Fill in the blocks of moves whose transaction was sent by a holder that stopped
        before it saw the receipt (the game may have gone past them since)."""
        with self.store.transaction() as conn:
            unconfirmed = [m for m in st.game_moves(conn, game_id, self.role)
                           if m.tx_hash is not None and m.block_number is None]
        for move in unconfirmed:
            try:
                receipt = self.w3.eth.get_transaction_receipt(HexBytes(move.tx_hash))
            except TransactionNotFound:
                continue
            if receipt["status"] == 1:
                with self.store.transaction() as conn:
                    st.set_move_transaction(conn, game_id, self.role, move.seq, move.tx_hash,
                                            receipt["blockNumber"])

    # -- the record ------------------------------------------------------------------------

    def save(self, record: GameRecord, state: spec.GameState, worker: str, now: float,
             **kept: Any) -> None:
        """Keep what the chain shows of the game in its row (the chain stays the authority),
        with the node's own `kept` entries (the watchtower's next look, say)."""
        with self.store.transaction() as conn:
            st.update_game(conn, record.game_id, self.role, worker, phase=state.phase,
                           k=state.disputed_node, rounds=state.rounds, status=GameStatus.OPEN,
                           state={**record.state, **summary(state, now), **kept})

    def finish(self, record: GameRecord, state: spec.GameState, worker: str) -> GameStatus:
        """Record the resolved game as won or lost for this player and release it; its
        trace is dropped once no open game of this player needs it."""
        status = GameStatus.WON if state.winner is self.role else GameStatus.LOST
        with self.store.transaction() as conn:
            st.update_game(conn, record.game_id, self.role, worker, phase=state.phase,
                           k=state.disputed_node, rounds=state.rounds, status=status,
                           state={**record.state, **summary(state, None)})
            st.release_game(conn, record.game_id, self.role, worker)
            if self._on_resolved is not None:
                self._on_resolved(conn, record, state, status)
            still_open = {game.request_id for game in
                          st.games_with_status(conn, self.role, GameStatus.OPEN)}
        if record.request_id not in still_open:
            with self._traces_lock:
                self._traces.pop(record.request_id, None)
        self.log.info("game %d on request %d: %s (%s) after %d rounds", record.game_id,
                      record.request_id, "won" if status is GameStatus.WON else "LOST",
                      state.reason, state.rounds)
        return status

    # -- what a turn needs -----------------------------------------------------------------

    def trace(self, record: GameRecord) -> ModelTrace:
        """The trace this player plays `record`'s request with, computed once per request (it
        is deterministic: a restarted node computes the same one)."""
        with self._traces_lock:
            trace = self._traces.get(record.request_id)
            if trace is None:
                started = time.perf_counter()
                trace = self._trace_of(record)
                self._traces[record.request_id] = trace
                self.log.info("request %d: trace of %d nodes computed in %.1f s",
                              record.request_id, trace.node_count,
                              time.perf_counter() - started)
            return trace

    def chain_time(self, max_age: float = 0.0) -> int:
        """The latest block's timestamp, asked of the node again once the last answer is
        `max_age` seconds old (0: always; a game's clocks are never judged on a cached one)."""
        timestamp, asked_at = self._time_cache
        if timestamp is None or time.monotonic() - asked_at >= max_age:
            timestamp = self.w3.eth.get_block("latest")["timestamp"]
            self._time_cache = (timestamp, time.monotonic())
        return timestamp


def summary(state: spec.GameState, now: float | None) -> dict[str, Any]:
    """What a game's row keeps of the chain's state: the bisection's range, whose move it is,
    the result, and (while it runs) each clock's seconds left at `now`."""
    kept: dict[str, Any] = {
        "lo": state.lo, "hi": state.hi,
        "to_move": state.to_move.value if state.to_move else None,
        "winner": state.winner.value if state.winner else None, "reason": state.reason}
    if now is not None:
        for role in Role:
            kept[f"{role.value}_seconds_left"] = state.clock.remaining(role, now)
    return kept
