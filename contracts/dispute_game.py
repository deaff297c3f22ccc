"""Python binding of ``DisputeGame.sol``: open games, send moves, read a game back as the
reference's ``prover.game.GameState``.

The contract is the on-chain twin of ``prover.game.apply``. This binding closes the loop for the
players: :meth:`DisputeGame.state` rebuilds the exact ``GameState`` the pure spec uses (from
``getGame`` and the game's events: the revealed children and chunk live only in events and
calldata), so a player's decision is ``prover.game.decide(state, trace, role, now)`` on it,
:meth:`DisputeGame.move_tx` builds the transaction of the resulting ``Action`` for a
``TxSender`` and :meth:`DisputeGame.submit` sends it. A move the contract rejects raises the
decoded ``ContractRevert`` and changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import ContractFunction
from web3.exceptions import Web3RPCError
from web3.types import TxParams, TxReceipt

from optinfer.contracts.bindings import BoundContract, ContractRevert, reverts_decoded
from optinfer.contracts.sender import TxSender
from optinfer.prover import commitments
from optinfer.prover import game as spec

CONTRACT_NAME = "DisputeGame"


class OnChainPhase(IntEnum):
    """``DisputeGame.Phase``."""

    NONE = 0
    AWAIT_ROOT = 1
    BISECTION = 2
    LEAF_REVEAL = 3
    DESCENT = 4
    CHUNK_REVEAL = 5
    ONE_STEP = 6
    RESOLVED = 7


class OnChainRole(IntEnum):
    """``DisputeGame.Role``."""

    NONE = 0
    PROVIDER = 1
    CHALLENGER = 2


_PHASES = {
    OnChainPhase.AWAIT_ROOT: spec.Phase.AWAIT_ROOT,
    OnChainPhase.BISECTION: spec.Phase.BISECTION,
    OnChainPhase.LEAF_REVEAL: spec.Phase.LEAF_REVEAL,
    OnChainPhase.DESCENT: spec.Phase.DESCENT,
    OnChainPhase.CHUNK_REVEAL: spec.Phase.CHUNK_REVEAL,
    OnChainPhase.ONE_STEP: spec.Phase.ONE_STEP,
    OnChainPhase.RESOLVED: spec.Phase.RESOLVED,
}
_ROLES = {OnChainRole.PROVIDER: spec.Role.PROVIDER, OnChainRole.CHALLENGER: spec.Role.CHALLENGER}


#: The events a game's state is rebuilt from (`DisputeGame.state`).
GAME_EVENTS = ("GameOpened", "RootPosted", "MidPosted", "MidAnswered", "ChildrenRevealed",
               "ChildPicked", "ChunkRevealed", "ElementNamed", "GameEnded")
#: The widest block range one game read asks ``eth_getLogs`` for (hosted RPC endpoints cap
#: it, commonly at 2,000-10,000 blocks; the event cursors' `max_block_range` default too).
LOG_BLOCK_RANGE = 2000


LOG_LAG_READS = 5
"""Reads of a game whose storage and logs disagree before :meth:`DisputeGame.state` gives up."""


@dataclass(frozen=True)
class GameParams:
    """The game's constructor parameters besides the coordinator and verifier."""

    clock_seconds: int = int(spec.DEFAULT_CLOCK_SECONDS)
    fan_out_bits: int = spec.DEFAULT_FAN_OUT_BITS
    challenger_bond: int = 10**17  # nonzero: the contract refuses a zero bond


@dataclass(frozen=True)
class OnChainGame:
    """What ``getGame`` returns besides the spec's state: who plays and for which request."""

    game_id: int
    request_id: int
    provider: str
    challenger: str
    nodes_root: bytes
    constants_root: bytes
    state: spec.GameState


class DisputeGame(BoundContract):
    """A deployed DisputeGame at `address`."""

    NAME = CONTRACT_NAME

    @classmethod
    def deploy(cls, w3: Web3, signer: LocalAccount, coordinator_address: str,
               verifier_address: str, params: GameParams = GameParams()) -> DisputeGame:
        """Deploy a game over the coordinator and one-step verifier at those addresses. The
        coordinator's deployer must then ``setDisputeGame`` to it."""
        return cls(w3, TxSender(w3, signer).deploy(
            CONTRACT_NAME, Web3.to_checksum_address(coordinator_address),
            Web3.to_checksum_address(verifier_address), params.clock_seconds,
            params.fan_out_bits, params.challenger_bond))

    # -- opening ------------------------------------------------------------------------

    def challenge_tx(self, request_id: int, prompt: list[int],
                     bond: int | None = None) -> TxParams:
        """The transaction opening a game against the claim on `request_id` (whose prompt is
        `prompt`), paying `bond` wei (default: the game's ``challengerBond``, read now)."""
        bond = self.parameter("challengerBond") if bond is None else bond
        return self.tx("challenge", request_id, list(prompt), value=bond)

    def challenge_send(self, request_id: int, prompt: list[int], signer: LocalAccount) -> int:
        """Open a game against the claim on `request_id` with the bond; returns its id. The
        game opens the registered model's own roots."""
        receipt = self._send(self.challenge_tx(request_id, prompt), signer)
        return self.events(receipt, "GameOpened")[0]["gameId"]

    # -- moves --------------------------------------------------------------------------

    def move_args(self, game_id: int, action: spec.Action,
                  state: spec.GameState | None = None) -> tuple[str, tuple]:
        """The contract function that makes `action` in game `game_id` and its arguments
        (ABI-ready). PickChild re-sends the revealed children, which the caller's `state` (or a
        fresh read) supplies."""
        match action:
            case spec.PostRoot(state_root=root, path=path):
                return "postRoot", (game_id, bytes(root), [bytes(p) for p in path])
            case spec.PostMid(mid=mid, state_root=root):
                return "postMid", (game_id, mid, bytes(root))
            case spec.Agree(mid=mid):
                return "agree", (game_id, mid)
            case spec.Disagree(mid=mid):
                return "disagree", (game_id, mid)
            case spec.RevealLeaf():
                return "revealLeaf", (game_id, action.k, bytes(action.tensor_root),
                                      action.dtype, [int(d) for d in action.shape],
                                      bytes(action.data_root), [bytes(p) for p in action.path])
            case spec.RevealChildren(children=children):
                return "revealChildren", (game_id, [bytes(c) for c in children])
            case spec.PickChild(position=position):
                children = (state or self.state(game_id).state).children
                return "pickChild", (game_id, position, [bytes(c) for c in children or ()])
            case spec.RevealChunk(chunk=chunk):
                return "revealChunk", (game_id, bytes(chunk))
            case spec.NameElement(index=index):
                return "nameElement", (game_id, index)
            case spec.OneStep(witness=witness):
                from optinfer.contracts.one_step_binding import encode_witness

                return "oneStep", (game_id, encode_witness(witness))
            case spec.Timeout():
                return "timeout", (game_id,)
        raise TypeError(f"not a move of the dispute game: {action!r}")

    def move_tx(self, game_id: int, action: spec.Action,
                state: spec.GameState | None = None) -> TxParams:
        """The transaction that makes `action` in game `game_id` (see :meth:`move_args`), for a
        ``TxSender``: ``sender.submit(game.move_tx(...), game.artifact)``."""
        name, args = self.move_args(game_id, action, state)
        return self.tx(name, *args)

    def move_function(self, game_id: int, action: spec.Action,
                      state: spec.GameState | None = None) -> ContractFunction:
        """:meth:`move_args` as a web3 contract function (for callers not yet on
        :meth:`move_tx`)."""
        name, args = self.move_args(game_id, action, state)
        return getattr(self.contract.functions, name)(*args)

    def submit(self, game_id: int, action: spec.Action, signer: LocalAccount,
               state: spec.GameState | None = None) -> TxReceipt:
        """Send `action` in game `game_id` as `signer` (gas estimated first: a move the
        contract rejects raises the decoded ContractRevert and nothing is sent)."""
        return self._send(self.move_tx(game_id, action, state), signer)

    def play_turn(self, game_id: int, trace: spec.Trace, role: spec.Role,
                  signer: LocalAccount, from_block: int = 0) -> list[spec.Action]:
        """One player's turn: read the game, ask ``prover.game.decide`` at the chain's time
        (the latest block's timestamp) and send each move. Returns the moves sent (none when
        it is the opponent's turn and its clock still runs)."""
        game = self.state(game_id, from_block).state
        now = self.w3.eth.get_block("latest")["timestamp"]
        actions = spec.decide(game, trace, role, now)
        for action in actions:
            self.submit(game_id, action, signer, game)
        return actions

    def withdraw_tx(self) -> TxParams:
        """The transaction sending its sender the bonds credited to it."""
        return self.tx("withdraw")

    def withdraw_send(self, signer: LocalAccount) -> TxReceipt:
        """Send `signer` the bonds credited to it."""
        return self._send(self.withdraw_tx(), signer)

    # -- reading ------------------------------------------------------------------------

    def state(self, game_id: int, from_block: int = 0,
              block: int | None = None) -> OnChainGame:
        """Game `game_id` as the spec's ``GameState`` (the Python ``apply`` would hold after
        the same moves), with its players, as of `block` (default: the latest).
        `from_block`: no earlier than the game's opening (where to start reading its events)."""
        for attempt in range(LOG_LAG_READS):
            read = self._state_pinned(game_id, from_block, block)
            # Storage says resolved, the block's logs lack the GameEnded that resolved it:
            # anvil answered eth_getLogs for a block it had just mined before its logs were
            # in (seen once in CI). The logs follow within moments: read them again.
            if read.state.phase is not spec.Phase.RESOLVED or read.state.reason:
                return read
            time.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"game {game_id} is resolved in storage but its GameEnded event "
                           f"is not in the node's logs after {LOG_LAG_READS} reads")

    def _state_pinned(self, game_id: int, from_block: int, block: int | None) -> OnChainGame:
        if block is not None:
            return self._state_at(game_id, from_block, block)
        pinned = self.w3.eth.block_number
        try:
            return self._state_at(game_id, from_block, pinned)
        except Web3RPCError:
            if self.w3.eth.block_number >= pinned:
                raise
            # The chain got shorter under the read (a node restarted from an older state):
            # read it again, at its new head.
            return self._state_at(game_id, from_block, self.w3.eth.block_number)

    def _state_at(self, game_id: int, from_block: int, block: int) -> OnChainGame:
        # Every read is pinned to one block: a move landing between two reads would otherwise
        # give a state that never existed (storage from after it, events from before).
        raw = reverts_decoded(self.artifact, lambda: self.contract.functions.getGame(
            game_id).call(block_identifier=block))
        game = dict(zip(_GAME_FIELDS, raw, strict=True))
        events = self._game_events(game_id, from_block, block)
        if not events["GameOpened"]:
            # Another game under this id, opened before `from_block`: the one opened there
            # left the chain (a reorganisation, and the id was given again).
            raise ContractRevert("GameNotFound", (game_id,), b"",
                                 f"game {game_id} was not opened from block {from_block}")
        opened = events["GameOpened"][0]
        phase = _PHASES[OnChainPhase(game["phase"])]
        # Pending S_mid / children / element are read from the events, not the phase: a game
        # resolved while one was pending keeps it, as the spec's state does.
        mid_pending = len(events["MidPosted"]) > len(events["MidAnswered"])
        revealed = [tuple(bytes(c) for c in e["children"]) for e in events["ChildrenRevealed"]]
        picked = len(events["ChildPicked"])
        to_move = reverts_decoded(self.artifact, lambda: self.contract.functions.toMove(
            game_id).call(block_identifier=block))
        running = _ROLES.get(OnChainRole(to_move))
        if running is None:  # resolved: the clock no longer matters, keep the spec's type
            running = spec.Role.PROVIDER
        shape = tuple(game["shape"]) if game["tensorRoot"] != bytes(32) else None
        chunk = None
        if events["ChunkRevealed"]:
            chunk = _chunk_data(bytes(events["ChunkRevealed"][0]["chunk"]), game, shape)
        ended = events["GameEnded"]
        state = spec.GameState(
            setup=spec.GameSetup(
                node_count=game["nodeCount"], initial_state=bytes(opened["initialState"]),
                final_leaf=bytes(opened["finalLeaf"]),
                fan_out_bits=self._immutable("fanOutBits"),
                clock_seconds=self._immutable("clockSeconds")),
            phase=phase,
            clock=spec.Clock(game["providerClock"], game["challengerClock"], running,
                             game["lastMoveAt"]),
            lo=game["lo"], hi=game["hi"],
            lo_root=bytes(game["loRoot"]),
            hi_root=bytes(game["hiRoot"]) if events["RootPosted"] else b"",
            claimed_root=bytes(events["RootPosted"][0]["stateRoot"]) if events["RootPosted"]
            else b"",
            mid_root=bytes(game["midRoot"]) if mid_pending else None,
            tensor_root=bytes(game["tensorRoot"]) if shape is not None else None,
            dtype=game["dtype"] if shape is not None else None,
            shape=shape,
            data_root=bytes(game["dataRoot"]) if shape is not None else None,
            node_height=game["nodeHeight"], node_index=game["nodeIndex"],
            node_hash=bytes(game["nodeHash"]) if shape is not None else None,
            children=revealed[-1] if len(revealed) > picked else None,
            descent=tuple(revealed[:picked]),
            chunk=chunk,
            element=game["element"] if events["ElementNamed"] else None,
            winner=_ROLES.get(OnChainRole(game["winner"])),
            reason=("timeout" if ended[0]["timedOut"] else "one-step") if ended else "",
            rounds=game["rounds"],
        )
        return OnChainGame(game_id, game["requestId"], Web3.to_checksum_address(game["provider"]),
                           Web3.to_checksum_address(game["challenger"]),
                           bytes(game["nodesRoot"]), bytes(game["constantsRoot"]), state)

    def _game_events(self, game_id: int, from_block: int, to_block: int
                     ) -> dict[str, list[dict]]:
        """The arguments of every event of game `game_id` in [from_block, to_block], by event
        name, in chain order: one ``eth_getLogs`` for all of `GAME_EVENTS` (each has the game
        id as its first indexed argument) per `LOG_BLOCK_RANGE` blocks, since hosted RPC
        endpoints refuse wider ranges (it was nine unbounded queries a read)."""
        events = {name: getattr(self.contract.events, name) for name in GAME_EVENTS}
        by_topic = {bytes(HexBytes(event.topic)): event for event in events.values()}
        game_topic = "0x" + game_id.to_bytes(32, "big").hex()
        found: dict[str, list[dict]] = {name: [] for name in GAME_EVENTS}
        for first in range(from_block, to_block + 1, LOG_BLOCK_RANGE):
            logs = self.w3.eth.get_logs({
                "address": self.address, "fromBlock": first,
                "toBlock": min(first + LOG_BLOCK_RANGE - 1, to_block),
                "topics": [["0x" + topic.hex() for topic in by_topic], game_topic]})
            for log in logs:
                event = by_topic[bytes(log["topics"][0])]
                found[event.event_name].append(dict(event().process_log(log)["args"]))
        return found

    def balance_of(self, account: str) -> int:
        """Wei of bonds credited to `account`."""
        return self.contract.functions.balanceOf(Web3.to_checksum_address(account)).call()

    def locked_reward(self, game_id: int) -> int:
        """The reward the coordinator locked from the provider's free stake when game
        `game_id` opened (the rest of ``challengerReward`` is backed by the claim's reserve)."""
        return self.contract.functions.lockedReward(game_id).call()

    def parameter(self, name: str) -> Any:
        """A public parameter or counter by its Solidity name."""
        return getattr(self.contract.functions, name)().call()

    def _immutable(self, name: str) -> Any:
        """A constructor parameter: read once, it never changes (every `state` needs two)."""
        cache = self.__dict__.setdefault("_immutables", {})
        if name not in cache:
            cache[name] = self.parameter(name)
        return cache[name]


_GAME_FIELDS = (
    "requestId", "provider", "phase", "winner", "pending", "dtype", "nodeHeight", "rounds",
    "challenger", "nodeCount", "lo", "hi", "providerClock", "challengerClock", "lastMoveAt",
    "nodeIndex", "element", "loRoot", "hiRoot", "midRoot", "tensorRoot", "dataRoot",
    "nodeHash", "childrenHash", "nodesRoot", "constantsRoot", "shape",
)


def _chunk_data(chunk: bytes, game: dict, shape: tuple[int, ...] | None) -> bytes:
    """The revealed chunk without the padding past the tensor's end (what the spec keeps)."""
    byte_length = commitments.tensor_byte_length(game["dtype"], shape)
    start = game["nodeIndex"] * commitments.LEAF_BYTES
    return chunk[:min(commitments.LEAF_BYTES, byte_length - start)]
