"""The dispute game as pure functions: the executable spec of DisputeGame.sol and of both
players' decisions (docs/protocol.md, "Dispute game").

One game is one provider defending a claim against one challenger; several games on one claim
are independent instances of this state machine.

* `GameState` (with its `Clock`) is an immutable snapshot of everything the contract stores.
* `apply(state, action, actor, now, verifier)` is the contract: it checks who may move, the
  clock, and the proof each move carries, and returns the next state. An illegal move raises
  `IllegalMove` (the contract reverts) and leaves nothing changed.
* `decide(state, trace, role, now)` is an honest player's solver, shared by the provider's
  defence and the watchtower: it returns the moves to make now and never sends anything.

Phases, in order (the party to move in brackets):

    AWAIT_ROOT [P]  -> BISECTION [P posts S_mid, C agrees or disagrees]  -> LEAF_REVEAL [P]
    -> DESCENT [P reveals children, C picks one] -> CHUNK_REVEAL [P]
    -> ONE_STEP [C names an element, then submits the one-step] -> RESOLVED

A *round* is one provider move and the challenger's answer to it; `GameState.rounds` counts
provider moves, so a game ends within `max_rounds(...)` rounds.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from optinfer.models.sampling import Sampling
from optinfer.prover import commitments
from optinfer.prover.claims import Refusal, claim_tensors
from optinfer.prover.commitments import LEAF_BYTES, ProofError, TensorTree
from optinfer.prover.one_step import Witness, WrongClaim, check_witness
from optinfer.prover.one_step_prover import CommittedModel, OneStepProver, TraceCommitment

DEFAULT_FAN_OUT_BITS = 4
"""A descent step reveals ``2**4 = 16`` children: 16 hashes of calldata per round, a quarter of
the rounds of a binary descent."""

DEFAULT_CLOCK_SECONDS = 3 * 24 * 3600
"""Each party's total time budget (a parameter of the contract, not a constant of the game)."""


class IllegalMove(Exception):
    """The move breaks a rule of the game: the contract reverts and the state is unchanged."""


class Phase(enum.Enum):
    AWAIT_ROOT = "await_root"
    BISECTION = "bisection"
    LEAF_REVEAL = "leaf_reveal"
    DESCENT = "descent"
    CHUNK_REVEAL = "chunk_reveal"
    ONE_STEP = "one_step"
    RESOLVED = "resolved"


class Role(enum.Enum):
    PROVIDER = "provider"
    CHALLENGER = "challenger"

    @property
    def opponent(self) -> Role:
        return Role.CHALLENGER if self is Role.PROVIDER else Role.PROVIDER


# ------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clock:
    """Chess clocks: seconds left to each party, whose clock runs, and when it last started.

    Only the party to move has its clock running; ``remaining(role, now)`` subtracts the time
    elapsed since ``last_move`` from the running party's budget. A party whose remaining time
    is zero or less can no longer move and loses on `Timeout`.
    """

    provider_seconds: float
    challenger_seconds: float
    running: Role
    last_move: float

    @classmethod
    def start(cls, now: float, seconds: float = DEFAULT_CLOCK_SECONDS) -> Clock:
        """Both parties get ``seconds``; the provider's clock runs first (it owes ``S_N``)."""
        return cls(seconds, seconds, Role.PROVIDER, now)

    def remaining(self, role: Role, now: float) -> float:
        budget = self.provider_seconds if role is Role.PROVIDER else self.challenger_seconds
        return budget - (now - self.last_move) if role is self.running else budget

    def expired(self, now: float) -> bool:
        """Has the running party's time run out at ``now``?"""
        return self.remaining(self.running, now) <= 0

    def hand_over(self, now: float, to: Role) -> Clock:
        """Charge the running party for the time since ``last_move`` and start ``to``'s clock
        (``to`` may be the same party when it owes a second move)."""
        spent = now - self.last_move
        provider, challenger = self.provider_seconds, self.challenger_seconds
        if self.running is Role.PROVIDER:
            provider -= spent
        else:
            challenger -= spent
        return Clock(provider, challenger, to, now)


@dataclass(frozen=True)
class GameSetup:
    """What the contract knows when the game opens.

    ``initial_state`` is ``S_0``, computed by the contract from the on-chain prompt and output;
    ``final_leaf`` is ``T_N = tensor_root(int64 O)`` for the claimed output ``O``;
    ``node_count`` is the model's N (from the registry).
    """

    node_count: int
    initial_state: bytes
    final_leaf: bytes
    fan_out_bits: int = DEFAULT_FAN_OUT_BITS
    clock_seconds: float = DEFAULT_CLOCK_SECONDS


@dataclass(frozen=True)
class GameState:
    """The contract's storage for one game.

    Bisection: ``S_lo`` (``lo_root``) is agreed, ``S_hi`` (``hi_root``) disputed; ``mid_root``
    is the provider's pending ``S_mid`` awaiting the challenger's verdict. From LEAF_REVEAL on,
    the disputed node is ``k = hi``; once revealed, ``tensor_root`` is ``T_k`` with its header
    (``dtype``, ``shape``) and ``data_root``. During DESCENT the disputed data-tree node is
    ``(node_height, node_index)`` with hash ``node_hash``; ``children`` are the provider's
    pending revealed children, and ``descent`` every children list revealed so far (enough to
    rebuild the chunk's Merkle path). ``chunk`` is the revealed leaf's data bytes (padding
    stripped), ``element`` the flat index of the disputed element of ``T_k``.
    """

    setup: GameSetup
    phase: Phase
    clock: Clock
    lo: int = 0
    hi: int = 0
    lo_root: bytes = b""
    hi_root: bytes = b""
    claimed_root: bytes = b""
    mid_root: bytes | None = None
    tensor_root: bytes | None = None
    dtype: int | None = None
    shape: tuple[int, ...] | None = None
    data_root: bytes | None = None
    node_height: int = 0
    node_index: int = 0
    node_hash: bytes | None = None
    children: tuple[bytes, ...] | None = None
    descent: tuple[tuple[bytes, ...], ...] = ()
    chunk: bytes | None = None
    element: int | None = None
    winner: Role | None = None
    reason: str = ""
    rounds: int = 0

    @property
    def k(self) -> int:
        """The disputed node once bisection has ended (``hi`` when ``hi == lo + 1``)."""
        return self.hi

    @property
    def disputed_node(self) -> int | None:
        """k once the bisection has narrowed the dispute to one node, else None."""
        return self.k if self.hi == self.lo + 1 else None

    @property
    def mid(self) -> int:
        """The midpoint rule: the provider must post ``S_{(lo + hi) // 2}``."""
        return (self.lo + self.hi) // 2

    @property
    def to_move(self) -> Role | None:
        """The party whose move it is (its clock runs); None once resolved."""
        if self.phase is Phase.RESOLVED:
            return None
        if self.phase is Phase.BISECTION:
            return Role.PROVIDER if self.mid_root is None else Role.CHALLENGER
        if self.phase is Phase.DESCENT:
            return Role.PROVIDER if self.children is None else Role.CHALLENGER
        if self.phase is Phase.ONE_STEP:
            return Role.CHALLENGER
        return Role.PROVIDER


def open_game(setup: GameSetup, now: float) -> GameState:
    """The state right after `challenge`: the provider owes ``S_N``."""
    if setup.node_count < 1:
        raise ValueError("a model has at least one node")
    if not 1 <= setup.fan_out_bits <= 8:
        raise ValueError("fan-out is 2..256 children per descent step")
    return GameState(setup=setup, phase=Phase.AWAIT_ROOT,
                     clock=Clock.start(now, setup.clock_seconds), lo=0, hi=setup.node_count,
                     lo_root=setup.initial_state)


# ------------------------------------------------------------------------------------------------
# Actions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostRoot:
    """Provider: ``S_N`` and the path proving its leaf N is ``T_N = tensor_root(int64 O)``."""

    state_root: bytes
    path: tuple[bytes, ...]


@dataclass(frozen=True)
class PostMid:
    """Provider: ``S_mid`` for ``mid = (lo + hi) // 2``."""

    mid: int
    state_root: bytes


@dataclass(frozen=True)
class Agree:
    """Challenger: ``S_mid`` is right, the first wrong node lies after ``mid``."""

    mid: int


@dataclass(frozen=True)
class Disagree:
    """Challenger: ``S_mid`` is wrong, the first wrong node lies at or before ``mid``."""

    mid: int


@dataclass(frozen=True)
class RevealLeaf:
    """Provider: ``T_k`` with its header and data root, and the sibling path proving that
    ``S_k`` is ``S_{k-1}`` with leaf k set from ZERO to ``T_k``."""

    k: int
    tensor_root: bytes
    dtype: int
    shape: tuple[int, ...]
    data_root: bytes
    path: tuple[bytes, ...]


@dataclass(frozen=True)
class RevealChildren:
    """Provider: the ``2**m`` descendants of the disputed node ``m`` levels down."""

    children: tuple[bytes, ...]


@dataclass(frozen=True)
class PickChild:
    """Challenger: the child (position in the revealed list) it disputes."""

    position: int


@dataclass(frozen=True)
class RevealChunk:
    """Provider: the 1 KiB leaf chunk (zero-padded) under the disputed leaf hash."""

    chunk: bytes


@dataclass(frozen=True)
class NameElement:
    """Challenger: the flat index in ``T_k`` of the element it disputes (inside the chunk)."""

    index: int


@dataclass(frozen=True)
class OneStep:
    """Challenger: the one-step witness for the named element (`prover.one_step.Witness`, or
    whatever the game's verifier accepts)."""

    witness: object


@dataclass(frozen=True)
class Timeout:
    """Anyone: the party to move has run out of time and loses."""


Action = (PostRoot | PostMid | Agree | Disagree | RevealLeaf | RevealChildren | PickChild
          | RevealChunk | NameElement | OneStep | Timeout)



def move_position(state: GameState, action: Action) -> int:
    """Where `action`, made on `state`, stands among its player's moves: the same for every
    worker that reads the same state, so a player's journal keeps one row per move however
    often it is retried. Two positions per round (``state.rounds`` counts provider moves): the
    second for a one-step (which follows the element on the same round) or a timeout claim
    (which may follow the player's own move on the same round)."""
    second = isinstance(action, OneStep | Timeout)
    return 2 * state.rounds + (1 if second else 0)


Verifier = Callable[[GameState, object], bool]
"""The one-step: ``verifier(state, witness)`` returns True when the provider's element is wrong
(provider loses), False when it is right (challenger loses), and raises ``ProofError`` for a
malformed witness (the contract reverts). ``state`` is in ONE_STEP with ``element`` named."""


# ------------------------------------------------------------------------------------------------
# The contract: apply
# ------------------------------------------------------------------------------------------------


def apply(state: GameState, action: Action, actor: Role, now: float,
          verifier: Verifier | None = None) -> GameState:
    """The contract's transition for ``actor`` making ``action`` at time ``now``.

    Rules, in check order: the game is not resolved; `Timeout` (anyone may send it) succeeds
    only when the party to move has no time left, and that party loses; any other move must
    come from the party to move, before its clock runs out, and be the kind the phase expects
    with a proof that verifies. Raises `IllegalMove` otherwise (state unchanged).
    """
    if state.phase is Phase.RESOLVED:
        raise IllegalMove("the game is resolved")
    mover = state.to_move
    assert mover is not None
    if isinstance(action, Timeout):
        if not state.clock.expired(now):
            raise IllegalMove(f"the {mover.value}'s clock has not run out")
        return _resolve(state, now, mover.opponent, f"{mover.value} ran out of time")
    if actor is not mover:
        raise IllegalMove(f"it is the {mover.value}'s move")
    if state.clock.expired(now):
        raise IllegalMove(f"the {mover.value}'s clock ran out")
    try:
        return _transition(state, action, now, verifier)
    except ValueError as error:  # ProofError, or a header the commitments refuse
        raise IllegalMove(f"{type(action).__name__}: {error}") from None


def _transition(state: GameState, action: Action, now: float,
                verifier: Verifier | None) -> GameState:
    setup, phase = state.setup, state.phase
    if phase is Phase.AWAIT_ROOT and isinstance(action, PostRoot):
        # S_N must carry T_N = tensor_root(int64 O) at leaf N: the trace ends in the claim.
        if commitments.root_from_path(setup.final_leaf, setup.node_count,
                                      _path(action.path)) != action.state_root:
            raise ProofError("S_N does not hold the claimed output at leaf N")
        posted = dataclasses.replace(state, hi_root=action.state_root,
                                     claimed_root=action.state_root, rounds=state.rounds + 1)
        return _after_bisection_step(posted, now)

    if phase is Phase.BISECTION and state.mid_root is None and isinstance(action, PostMid):
        if action.mid != state.mid:
            raise IllegalMove(f"the midpoint is {state.mid}, not {action.mid}")
        if not isinstance(action.state_root, bytes) or len(action.state_root) != 32:
            raise ProofError("S_mid must be 32 bytes")
        return _move(state, now, mid_root=action.state_root, rounds=state.rounds + 1)

    if phase is Phase.BISECTION and state.mid_root is not None \
            and isinstance(action, Agree | Disagree):
        if action.mid != state.mid:
            raise IllegalMove(f"the pending midpoint is {state.mid}, not {action.mid}")
        if isinstance(action, Agree):
            narrowed = dataclasses.replace(state, lo=state.mid, lo_root=state.mid_root,
                                           mid_root=None)
        else:
            narrowed = dataclasses.replace(state, hi=state.mid, hi_root=state.mid_root,
                                           mid_root=None)
        return _after_bisection_step(narrowed, now)

    if phase is Phase.LEAF_REVEAL and isinstance(action, RevealLeaf):
        if action.k != state.k:
            raise IllegalMove(f"the disputed node is {state.k}, not {action.k}")
        header_root = commitments.tensor_root_from_data_root(action.dtype, action.shape,
                                                             action.data_root)
        if header_root != action.tensor_root:
            raise ProofError("the header and data root do not give T_k")
        commitments.verify_leaf_update(state.lo_root, state.hi_root, state.k,
                                       action.tensor_root, _path(action.path))
        depth = commitments.data_tree_depth(action.dtype, action.shape)
        return _move(state, now, phase=Phase.DESCENT if depth else Phase.CHUNK_REVEAL,
                     tensor_root=action.tensor_root, dtype=action.dtype,
                     shape=tuple(action.shape), data_root=action.data_root, node_height=depth,
                     node_index=0, node_hash=action.data_root, rounds=state.rounds + 1)

    if phase is Phase.DESCENT and state.children is None and isinstance(action,
                                                                         RevealChildren):
        expected = 2 ** min(setup.fan_out_bits, state.node_height)
        if len(action.children) != expected:
            raise IllegalMove(f"a descent step here reveals {expected} children")
        commitments.verify_descent_step(state.node_hash, state.node_height, state.node_index,
                                        action.children, state.dtype, state.shape)
        return _move(state, now, children=tuple(action.children), rounds=state.rounds + 1)

    if phase is Phase.DESCENT and state.children is not None and isinstance(action, PickChild):
        bits = (len(state.children) - 1).bit_length()
        child_height = state.node_height - bits
        child_index = (state.node_index << bits) + action.position
        leaves = commitments.leaf_count(commitments.tensor_byte_length(state.dtype, state.shape))
        # Children past the last leaf were proven to be ZERO subtrees: nothing to dispute there.
        if not 0 <= action.position < len(state.children) or child_index << child_height >= leaves:
            raise IllegalMove(f"child {action.position} is not a disputable child")
        return _move(state, now, phase=Phase.DESCENT if child_height else Phase.CHUNK_REVEAL,
                     node_height=child_height, node_index=child_index,
                     node_hash=state.children[action.position], children=None,
                     descent=(*state.descent, state.children))

    if phase is Phase.CHUNK_REVEAL and isinstance(action, RevealChunk):
        data = commitments.verify_leaf_chunk(state.node_hash, state.node_index, action.chunk,
                                             state.dtype, state.shape)
        return _move(state, now, phase=Phase.ONE_STEP, chunk=data, rounds=state.rounds + 1)

    if phase is Phase.ONE_STEP and state.element is None and isinstance(action, NameElement):
        first, end = chunk_elements(state)
        # An empty T_k has no element to name, yet can be wrong: its header may not be the
        # node's. Element 0 then stands for the header, the one thing the one-step can judge.
        header_only = first == end and action.index == 0
        if not (first <= action.index < end or header_only):
            raise IllegalMove(f"element {action.index} is not in the revealed chunk")
        return _move(state, now, element=action.index)

    if phase is Phase.ONE_STEP and state.element is not None and isinstance(action, OneStep):
        if verifier is None:
            raise IllegalMove("no one-step verifier")
        provider_wrong = verifier(state, action.witness)
        if provider_wrong:
            return _resolve(state, now, Role.CHALLENGER, "the one-step recomputed another value")
        return _resolve(state, now, Role.PROVIDER, "the one-step recomputed the claimed value")

    raise IllegalMove(f"{type(action).__name__} is not a move of phase {phase.value}"
                      f" now")


def _path(path: Sequence[bytes]) -> tuple[bytes, ...]:
    if len(path) != commitments.STATE_DEPTH:
        raise ProofError(f"state path has {len(path)} siblings, expected "
                         f"{commitments.STATE_DEPTH}")
    return tuple(path)


def _move(state: GameState, now: float, **changes) -> GameState:
    """Apply ``changes`` and hand the clock to whoever moves next."""
    moved = dataclasses.replace(state, **changes)
    return dataclasses.replace(moved, clock=state.clock.hand_over(now, moved.to_move))


def _after_bisection_step(state: GameState, now: float) -> GameState:
    """Bisection continues while ``hi > lo + 1``; then node ``k = hi`` is revealed."""
    phase = Phase.LEAF_REVEAL if state.hi == state.lo + 1 else Phase.BISECTION
    return _move(state, now, phase=phase)


def _resolve(state: GameState, now: float, winner: Role, reason: str) -> GameState:
    clock = state.clock.hand_over(now, state.clock.running)
    return dataclasses.replace(state, phase=Phase.RESOLVED, clock=clock, winner=winner,
                               reason=reason)


def chunk_elements(state: GameState) -> tuple[int, int]:
    """``[first, end)``: flat indices of ``T_k``'s elements inside the revealed chunk."""
    itemsize = commitments.numpy_dtype(state.dtype).itemsize
    first = state.node_index * LEAF_BYTES // itemsize
    return first, first + len(state.chunk) // itemsize


def chunk_proof(state: GameState) -> commitments.RangeProof:
    """The range proof of the revealed chunk against ``T_k``, rebuilt from the children revealed
    during the descent (every sibling on the chunk's path was revealed in some step)."""
    chunk = state.chunk.ljust(LEAF_BYTES, b"\0")
    leaf = state.node_index
    depth = commitments.data_tree_depth(state.dtype, state.shape)
    nodes: dict[tuple[int, int], bytes] = {}
    height, index = depth, 0
    for children in state.descent:
        bits = (len(children) - 1).bit_length()
        base = index << bits
        for level_height, level in enumerate(commitments.tree_levels(children)):
            for offset, node in enumerate(level):
                nodes[(height - bits + level_height, (base >> level_height) + offset)] = node
        height -= bits
        index = leaf >> height
    siblings = tuple(nodes[(h, (leaf >> h) ^ 1)] for h in range(depth))
    return commitments.RangeProof(chunks=chunk, siblings=siblings)


# ------------------------------------------------------------------------------------------------
# Round counts
# ------------------------------------------------------------------------------------------------


def descent_rounds(byte_length: int, fan_out_bits: int = DEFAULT_FAN_OUT_BITS) -> int:
    """Descent steps from the data root of a ``byte_length``-byte tensor to one leaf."""
    depth = commitments.tree_depth(commitments.leaf_count(byte_length))
    return -(-depth // fan_out_bits)


def max_rounds(node_count: int, largest_tensor_bytes: int,
               fan_out_bits: int = DEFAULT_FAN_OUT_BITS) -> int:
    """Most provider moves a game can take: ``S_N``, ``ceil(log2 N)`` midpoints, the leaf
    reveal, the descent steps of the largest tensor, the chunk reveal."""
    bisection = math.ceil(math.log2(node_count)) if node_count > 1 else 0
    return bisection + descent_rounds(largest_tensor_bytes, fan_out_bits) + 3


# ------------------------------------------------------------------------------------------------
# Players: the trace they know and the honest decision
# ------------------------------------------------------------------------------------------------


class Trace(Protocol):
    """What a player knows of a verification trace (its own: honest, or a provider's lie)."""

    node_count: int
    refusal: Refusal | None
    """Set when the honest computation has no value at node ``refusal.k`` (the op set refuses
    the claim's inputs there, `prover.claims`): the trace then stops at that node."""

    def state_root(self, k: int) -> bytes:
        """``S_k``."""

    def state_path(self, index: int, state: int) -> list[bytes]:
        """Sibling path of leaf ``index`` in the state tree at ``S_state``."""

    def tensor(self, k: int) -> np.ndarray:
        """``T_k``'s tensor (k = 0: the inputs)."""

    def tensor_tree(self, k: int) -> TensorTree:
        """``T_k``'s data tree."""

    def one_step_witness(self, k: int, element: int) -> Witness:
        """A one-step witness for element ``element`` of node k, inputs from this trace."""

    def header_witness(self, k: int, dtype: int, shape: tuple[int, ...], data_root: bytes,
                       proof: commitments.RangeProof, element: int) -> Witness:
        """A one-step witness convicting a ``T_k`` with header (``dtype``, ``shape``), which is
        not this trace's, for the named ``element``."""


class ModelTrace:
    """A `Trace` over a converted model's verification trace (`IntegerModel.trace`), reusing
    `prover.one_step_prover`'s `TraceCommitment` (every root once) and `OneStepProver`."""

    def __init__(self, committed: CommittedModel, commitment: TraceCommitment,
                 refusal: Refusal | None = None) -> None:
        self.committed, self.commitment, self.refusal = committed, commitment, refusal
        # A refused trace stops at node refusal.k (a stand-in); the game still has N nodes.
        self.node_count = committed.node_count if refusal else len(commitment.tensors) - 1
        self._prover = OneStepProver(committed, commitment)

    @classmethod
    def from_model(cls, model, prompt: Sequence[int], output: Sequence[int],
                   draw: Sampling | None = None) -> ModelTrace:
        """The honest trace of (``prompt``, ``output``) on ``model`` (an IntegerModel),
        decoded by `draw` (greedy when None)."""
        sequence, outputs = model.trace(list(prompt), list(output), draw)
        return cls(CommittedModel(model), TraceCommitment(sequence, outputs))

    @classmethod
    def from_claim(cls, model, prompt: Sequence[int], output: Sequence[int],
                   committed: CommittedModel | None = None, draw: Sampling | None = None
                   ) -> ModelTrace:
        """The honest trace of any claim (``prover.claims``): ``from_model``'s where the
        model runs the claim's sequence, else the trace up to the node the op set refuses,
        with its `Refusal` (an id outside the vocabulary in the prompt or in ``O[:-1]``)."""
        committed = committed or CommittedModel(model)
        sequence, outputs, refusal = claim_tensors(model, committed, prompt, output, draw)
        return cls(committed, TraceCommitment(sequence, outputs), refusal)

    def with_output(self, k: int, tensor: np.ndarray) -> ModelTrace:
        """The same trace with node k's output replaced and every root recomputed: what a
        provider lying at node k commits to."""
        return ModelTrace(self.committed, self.commitment.with_output(k, tensor))

    def state_root(self, k: int) -> bytes:
        return self.commitment.state.root(k)

    def state_path(self, index: int, state: int) -> list[bytes]:
        return self.commitment.state.path(index, state)

    def tensor(self, k: int) -> np.ndarray:
        return self.commitment.tensors[k]

    def tensor_tree(self, k: int) -> TensorTree:
        return self.commitment.tree(k)

    def one_step_witness(self, k: int, element: int) -> Witness:
        return self._prover.witness(k, element)

    def header_witness(self, k: int, dtype: int, shape: tuple[int, ...], data_root: bytes,
                       proof: commitments.RangeProof, element: int) -> Witness:
        return self._prover.header_witness(k, dtype, shape, data_root, proof, element)


def decide(state: GameState, trace: Trace, role: Role, now: float) -> list[Action]:
    """The honest player's moves at ``now`` (empty when there is nothing to do).

    The provider plays its own ``trace`` faithfully (its defence is only as good as the trace).
    The challenger holds the honest trace and keeps the dispute on a node and element where the
    provider's commitments differ from it: it agrees with ``S_mid`` iff it equals its own, picks
    the first child that differs from its own, names the first element that differs, and
    submits the one-step for it. When the provider's header (dtype/shape) differs, every
    element is disputable (the one-step checks the header first), so it takes the first one.
    On a trace with a `Refusal` at node k, no ``T_k`` is right: the challenger disagrees with
    every ``S_mid`` for ``mid >= k`` and, at k, descends to the refused element and convicts it.
    Either role claims a `Timeout` as soon as the opponent's clock has run out.
    """
    if state.phase is Phase.RESOLVED:
        return []
    if state.to_move is role.opponent:
        return [Timeout()] if state.clock.expired(now) else []
    if role is Role.PROVIDER:
        return [_provider_move(state, trace)]
    return [_challenger_move(state, trace)]


def _provider_move(state: GameState, trace: Trace) -> Action:
    n = state.setup.node_count
    if state.phase is Phase.AWAIT_ROOT:
        return PostRoot(trace.state_root(n), tuple(trace.state_path(n, n)))
    if state.phase is Phase.BISECTION:
        return PostMid(state.mid, trace.state_root(state.mid))
    tree = trace.tensor_tree(state.k)
    if state.phase is Phase.LEAF_REVEAL:
        return RevealLeaf(state.k, tree.root, commitments.dtype_code(tree.array.dtype),
                          tuple(tree.array.shape), tree.data_root,
                          tuple(trace.state_path(state.k, state.k - 1)))
    if state.phase is Phase.DESCENT:
        bits = min(state.setup.fan_out_bits, state.node_height)
        level = tree.subtree_roots(state.node_height - bits)
        return RevealChildren(tuple(level[state.node_index << bits:
                                          (state.node_index + 1) << bits]))
    if state.phase is Phase.CHUNK_REVEAL:
        start = state.node_index * LEAF_BYTES
        return RevealChunk(bytes(tree.data[start:start + LEAF_BYTES]).ljust(LEAF_BYTES, b"\0"))
    raise AssertionError(f"the provider does not move in {state.phase}")


def _challenger_move(state: GameState, trace: Trace) -> Action:
    refusal = trace.refusal
    if refusal is not None and (state.mid >= refusal.k if state.phase is Phase.BISECTION
                                else state.k == refusal.k):
        return _refused_node_move(state, trace, refusal.element)
    if state.phase is Phase.BISECTION:
        ours = trace.state_root(state.mid)
        return Agree(state.mid) if ours == state.mid_root else Disagree(state.mid)
    own = trace.tensor_tree(state.k)
    same_header = _same_header(state, own)
    if state.phase is Phase.DESCENT:
        if not same_header:
            return PickChild(0)
        bits = (len(state.children) - 1).bit_length()
        level = own.subtree_roots(state.node_height - bits)
        ours = level[state.node_index << bits:(state.node_index + 1) << bits]
        return PickChild(next(i for i, (a, b) in enumerate(zip(ours, state.children,
                                                                strict=True)) if a != b))
    if state.phase is Phase.ONE_STEP and state.element is None:
        first, end = chunk_elements(state)
        if not same_header:  # the one-step convicts on the header: any element does
            return NameElement(first)
        start = state.node_index * LEAF_BYTES
        ours = bytes(own.data[start:start + len(state.chunk)])
        itemsize = commitments.numpy_dtype(state.dtype).itemsize
        differing = next(i for i in range(end - first)
                         if ours[i * itemsize:(i + 1) * itemsize]
                         != state.chunk[i * itemsize:(i + 1) * itemsize])
        return NameElement(first + differing)
    if state.phase is Phase.ONE_STEP:
        return OneStep(challenger_witness(state, trace))
    raise AssertionError(f"the challenger does not move in {state.phase}")


def _refused_node_move(state: GameState, trace: Trace, element: int) -> Action:
    """The challenger's move where no provider's value can be right: an ``S_mid`` past the
    refused node (it holds some ``T_k``) is disputed; at node k the descent goes to the chunk
    of the refused `element` and names it, whose one-step the op set refuses (the provider's
    tensor may even equal the trace's stand-in). A header other than the one node k must have
    is convicted at element 0, as anywhere."""
    if state.phase is Phase.BISECTION:
        return Disagree(state.mid)
    own = trace.tensor_tree(state.k)  # the stand-in: zeros with node k's header
    same_header = _same_header(state, own)
    if state.phase is Phase.DESCENT:
        if not same_header:
            return PickChild(0)
        bits = (len(state.children) - 1).bit_length()
        leaf = element * own.array.dtype.itemsize // LEAF_BYTES
        return PickChild((leaf >> (state.node_height - bits)) - (state.node_index << bits))
    if state.phase is Phase.ONE_STEP and state.element is None:
        return NameElement(element if same_header else chunk_elements(state)[0])
    if state.phase is Phase.ONE_STEP:
        return OneStep(challenger_witness(state, trace))
    raise AssertionError(f"the challenger does not move in {state.phase}")


def _same_header(state: GameState, own: TensorTree) -> bool:
    """Whether the revealed ``T_k`` has the header (dtype, shape) of the player's own."""
    return (commitments.dtype_code(own.array.dtype), tuple(own.array.shape)) == \
        (state.dtype, state.shape)


def challenger_witness(state: GameState, trace: Trace) -> Witness:
    """The one-step witness for the named element: inputs opened from the challenger's (agreed)
    trace, the provider's element and its proof taken from the game state (revealed chunk and
    descent), since the challenger never sees the provider's tensor.

    When the provider's header is not the honest one, the witness judges the header alone
    (`OneStepProver.header_witness`): the honest output may have no element at the named
    index (it may be smaller, or the provider's tensor empty)."""
    if not _same_header(state, trace.tensor_tree(state.k)):
        return trace.header_witness(state.k, state.dtype, state.shape, state.data_root,
                                    chunk_proof(state), state.element)
    honest = trace.one_step_witness(state.k, state.element)
    itemsize = commitments.numpy_dtype(state.dtype).itemsize
    first, _ = chunk_elements(state)
    offset = (state.element - first) * itemsize
    claimed = commitments.claimed_element(state.dtype, state.chunk[offset:offset + itemsize])
    return dataclasses.replace(honest, output_dtype=state.dtype, output_shape=state.shape,
                               output_data_root=state.data_root,
                               output_proof=chunk_proof(state), claimed=claimed)


def one_step_verifier(nodes_root: bytes, constants_root: bytes) -> Verifier:
    """The contract's one-step over `prover.one_step.check_witness`, bound to a registered
    model's roots. The witness must be for the game's node k and named element, against the
    agreed ``S_{k-1}`` and the revealed ``T_k``; a malformed witness raises ``ProofError``."""

    def verify(state: GameState, witness: object) -> bool:
        if not isinstance(witness, Witness):
            raise ProofError("not a one-step witness")
        if (witness.k, witness.out_index) != (state.k, state.element):
            raise ProofError(f"the witness is for element {witness.out_index} of node "
                             f"{witness.k}, not {state.element} of {state.k}")
        try:
            check_witness(witness, nodes_root=nodes_root, constants_root=constants_root,
                          agreed_state=state.lo_root, output_root=state.tensor_root)
        except WrongClaim:
            return True
        return False

    return verify
