"""The dispute game: honest solvers against scripted and generated adversaries on tiny-r1.

Every game is a full simulation: the contract (`apply`) referees, the one-step is the real
`prover.one_step.check_witness` against the committed model's roots, lies are built by changing
one tensor of the honest trace and recomputing every root. After every move the named
invariants below are checked.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import INTEGER_DIR, held_out_problems
from optinfer.prover import commitments
from optinfer.prover.game import (
    Agree,
    Clock,
    Disagree,
    GameSetup,
    GameState,
    IllegalMove,
    ModelTrace,
    NameElement,
    OneStep,
    Phase,
    PickChild,
    PostMid,
    Role,
    Timeout,
    apply,
    challenger_witness,
    chunk_proof,
    decide,
    descent_rounds,
    max_rounds,
    move_position,
    one_step_verifier,
    open_game,
)
from tests.lies import (
    STRUCTURAL_LIES,
    changed,
    forged_tree,
    lie_nodes,
    lying_trace,
    structural_lie,
)
from tests.profiles import examples

STEP_SECONDS = 600.0
"""Each move takes ten minutes of (simulated) time: far below the clock budget."""

Policy = Callable[[GameState, float], list]


@pytest.fixture(scope="module")
def tiny():
    """The committed tiny-r1, a generated answer, its honest trace and the one-step verifier."""
    model = IntegerModel(INTEGER_DIR)
    prompt = model.encode(held_out_problems(1, seed=3)[0].prompt)
    output = model.generate(prompt, 16)
    honest = ModelTrace.from_model(model, prompt, output)
    verifier = one_step_verifier(honest.committed.nodes_root, honest.committed.constants_root)
    return honest, output, verifier


def _setup(claimed: ModelTrace, honest: ModelTrace) -> GameSetup:
    """The contract computes S_0 from the request (honest inputs) and T_N from the claimed O."""
    output = claimed.tensor(claimed.node_count)
    assert output.dtype == np.int64
    return GameSetup(node_count=honest.node_count, initial_state=honest.state_root(0),
                     final_leaf=commitments.tensor_root(output))


def _largest_bytes(*traces: ModelTrace) -> int:
    return max(trace.tensor(k).nbytes for trace in traces for k in range(trace.node_count + 1))


def play(setup: GameSetup, policies: dict[Role, Policy], verifier, honest_role: Role,
         honest: ModelTrace, round_bound: int, stall: dict[Role, float] | None = None
         ) -> GameState:
    """Run a game to the end. The party to move asks its policy for moves and the contract
    applies the first legal one; a party with no legal move stalls, time jumps past its
    deadline and the opponent sends `Timeout`. A role in ``stall`` waits that fraction of its
    remaining clock before each move. Invariants are checked after every move, and at the end
    that each player's moves stand at increasing positions (``move_position``: the nodes'
    journals hold one row per position)."""
    now = 0.0
    state = open_game(setup, now)
    positions: dict[Role, list[int]] = {Role.PROVIDER: [], Role.CHALLENGER: []}
    for _ in range(500):
        if state.phase is Phase.RESOLVED:
            for made in positions.values():
                assert made == sorted(set(made)), made
            return state
        mover = state.to_move
        now += STEP_SECONDS + (stall or {}).get(mover, 0.0) * state.clock.remaining(mover, now)
        before = state
        for action in policies[mover](state, now):
            try:
                state = apply(state, action, mover, now, verifier)
                positions[mover].append(move_position(before, action))
                break
            except IllegalMove:
                assert state is before  # a reverted move changes nothing
        if state is before:
            now += state.clock.remaining(mover, now) + 1
            claims = decide(state, honest, mover.opponent, now)
            assert claims == [Timeout()] or mover is honest_role
            state = apply(state, Timeout(), mover.opponent, now, verifier)
            positions[mover.opponent].append(move_position(before, Timeout()))
        check_invariants(state, honest, honest_role, round_bound)
    raise AssertionError("the game did not end")


def check_invariants(state: GameState, honest: ModelTrace, honest_role: Role,
                     round_bound: int) -> None:
    # The honest player never loses: its every claim is checkable and true.
    if state.phase is Phase.RESOLVED:
        assert state.winner is honest_role, state.reason
    # Rounds <= ceil(log2 N) + descent rounds + 3: the game's cost is bounded up front.
    assert state.rounds <= round_bound
    # An honest challenger only agrees with true states: S_lo is always the honest one.
    if honest_role is Role.CHALLENGER:
        assert state.lo_root == honest.state_root(state.lo)
    # An honest challenger keeps the descent on a node where the provider's tree differs from
    # the honest one (same header), so the chunk it ends on holds a wrong element.
    if honest_role is Role.CHALLENGER and state.phase in (Phase.DESCENT, Phase.CHUNK_REVEAL):
        own = honest.tensor_tree(state.k)
        if tuple(own.array.shape) == state.shape and \
                commitments.dtype_code(own.array.dtype) == state.dtype:
            assert own.subtree_roots(state.node_height)[state.node_index] != state.node_hash
    # An honest provider only posts true states: S_hi (and a pending S_mid) are honest.
    if honest_role is Role.PROVIDER and state.phase is not Phase.AWAIT_ROOT:
        assert state.hi_root == honest.state_root(state.hi)
        assert state.mid_root in (None, honest.state_root(state.mid))
    # The bisection interval only shrinks, and ends at one node.
    assert 0 <= state.lo < state.hi <= state.setup.node_count
    if state.phase in (Phase.LEAF_REVEAL, Phase.DESCENT, Phase.CHUNK_REVEAL, Phase.ONE_STEP):
        assert state.hi == state.lo + 1


def _honest(trace: ModelTrace, role: Role) -> Policy:
    return lambda state, now: decide(state, trace, role, now)


def _lying_provider_game(tiny, k: int, tensor: np.ndarray) -> GameState:
    honest, _, verifier = tiny
    lying = honest.with_output(k, tensor)
    bound = max_rounds(honest.node_count, _largest_bytes(honest, lying))
    return play(_setup(lying, honest), {Role.PROVIDER: _honest(lying, Role.PROVIDER),
                                        Role.CHALLENGER: _honest(honest, Role.CHALLENGER)},
                verifier, Role.CHALLENGER, honest, bound)


_settings = settings(max_examples=examples(12), deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- lying providers


@_settings
@given(data=st.data())
def test_a_provider_lying_at_a_random_node_loses(tiny, data):
    honest = tiny[0]
    # Only a node with elements has one to lie about (an early return passed vacuously).
    k = data.draw(st.sampled_from([j for j in range(1, honest.node_count + 1)
                                   if honest.tensor(j).size]), label="k")
    tensor = honest.tensor(k)
    element = data.draw(st.integers(0, tensor.size - 1), label="element")
    delta = data.draw(st.integers(1, 255), label="delta")
    state = _lying_provider_game(tiny, k, changed(tensor, element, delta))
    assert state.winner is Role.CHALLENGER
    assert state.k == k and state.element == element  # the dispute lands on the lie itself


def test_a_wrong_final_token_loses(tiny):
    honest, output, _ = tiny
    n = honest.node_count
    state = _lying_provider_game(tiny, n, changed(honest.tensor(n), len(output) - 1, 1))
    assert state.winner is Role.CHALLENGER and state.k == n
    assert "one-step" in state.reason


@_settings
@given(data=st.data())
def test_a_wrong_element_of_the_largest_tensor_loses(tiny, data):
    honest = tiny[0]
    k = max(range(1, honest.node_count + 1), key=lambda j: honest.tensor(j).nbytes)
    tensor = honest.tensor(k)
    element = data.draw(st.integers(0, tensor.size - 1), label="element")
    state = _lying_provider_game(tiny, k, changed(tensor, element, 1))
    assert state.winner is Role.CHALLENGER and state.element == element
    assert len(state.descent) == 2  # 96 leaves: depth 7, two 16-way descent steps


def test_a_wrong_shape_with_the_same_bytes_loses(tiny):
    honest = tiny[0]
    k = max(range(1, honest.node_count + 1), key=lambda j: honest.tensor(j).nbytes)
    tensor = honest.tensor(k)
    wrong_shape = (2, -1) if tensor.ndim == 1 else (-1,)
    state = _lying_provider_game(tiny, k, tensor.reshape(wrong_shape))
    assert state.winner is Role.CHALLENGER and state.k == k


@_settings
@given(stop_after=st.integers(0, 16), node=st.integers(0, 2**20))
def test_a_provider_that_stops_answering_loses_on_time(tiny, stop_after, node):
    honest, _, verifier = tiny
    k = node % honest.node_count + 1
    lying = honest.with_output(k, changed(honest.tensor(k), 0, 1))
    moves = 0

    def stalling(state: GameState, now: float) -> list:
        nonlocal moves
        moves += 1
        return decide(state, lying, Role.PROVIDER, now) if moves <= stop_after else []

    bound = max_rounds(honest.node_count, _largest_bytes(honest, lying))
    state = play(_setup(lying, honest), {Role.PROVIDER: stalling,
                                         Role.CHALLENGER: _honest(honest, Role.CHALLENGER)},
                 verifier, Role.CHALLENGER, honest, bound)
    assert state.winner is Role.CHALLENGER
    assert state.reason == "provider ran out of time" or moves <= stop_after


@_settings
@given(seed=st.integers(0, 2**32))
def test_a_provider_posting_random_midpoints_loses(tiny, seed):
    honest, _, verifier = tiny
    rng = random.Random(seed)
    n = honest.node_count

    lying = honest.with_output(n, changed(honest.tensor(n), 0, 1))

    def garbling(state: GameState, now: float) -> list:
        if state.phase is Phase.BISECTION and rng.random() < 0.3:
            return [PostMid(state.mid, rng.randbytes(32))]
        return decide(state, lying, Role.PROVIDER, now)

    bound = max_rounds(n, _largest_bytes(honest, lying))
    policies = {Role.PROVIDER: garbling, Role.CHALLENGER: _honest(honest, Role.CHALLENGER)}
    # Once a random S_mid is disputed, no leaf update can ever connect it to S_lo.
    state = play(_setup(lying, honest), policies, verifier, Role.CHALLENGER, honest, bound)
    assert state.winner is Role.CHALLENGER
    assert state.rounds >= 2  # S_N was posted: the game was lost in the bisection or later


# ------------------------------------------------------------------- lies in structure


def structural_liar(honest: ModelTrace, output, kind: str, k: int, seed: int) -> ModelTrace:
    """A provider whose trace is honest but for a lie of ``kind`` at node k (`tests.lies`),
    and whose committed answer is wrong in its last token."""
    lie = structural_lie(honest.tensor(k), kind, np.random.default_rng(seed))
    n = honest.node_count
    return lying_trace(honest.with_output(n, changed(honest.tensor(n), len(output) - 1, 1)),
                       k, lie)


@_settings
@given(data=st.data(), kind=st.sampled_from(STRUCTURAL_LIES), stall=st.booleans())
def test_a_provider_lying_in_structure_loses(tiny, data, kind, stall):
    """Headers (dtype, shape, empty, grown, shrunk, 4 MiB, past 2**64 bytes), encodings (a
    bool byte above 1), padding (a non-zero byte after the data, a non-ZERO leaf past it) and
    roots without a preimage: whatever the lie, the honest challenger convicts it, by the
    one-step or because the liar cannot make its next move. A stalling liar spends most of
    its clock before every move, which changes nothing."""
    honest, output, verifier = tiny
    k = data.draw(st.sampled_from(lie_nodes(honest, kind)), label="k")
    liar = structural_liar(honest, output, kind, k, data.draw(st.integers(0, 2**32), "seed"))
    bound = max_rounds(honest.node_count, max(_largest_bytes(honest), 8 << 20))
    state = play(_setup(liar, honest), {Role.PROVIDER: _honest(liar, Role.PROVIDER),
                                        Role.CHALLENGER: _honest(honest, Role.CHALLENGER)},
                 verifier, Role.CHALLENGER, honest, bound,
                 stall={Role.PROVIDER: 0.45} if stall else {})
    assert state.winner is Role.CHALLENGER
    if stall:  # it may run out of time before its lie is reached
        assert state.reason in ("provider ran out of time",
                                "the one-step recomputed another value")
    elif kind in ("padding_bytes", "padding_leaf", "too_large_header", "no_preimage"):
        assert state.reason == "provider ran out of time"  # it cannot open what it committed
    else:
        assert state.k == k and state.reason == "the one-step recomputed another value"


def test_an_empty_tensor_in_place_of_a_full_one_loses_through_the_one_step_point1(tiny):
    """Issue 17, point 1: T_k is a zero-element int64 (0,) where the honest one has elements.
    The descent ends on an empty chunk; element 0 stands for the header, and the one-step
    convicts it (before: every NameElement was illegal and the liar won on time)."""
    honest, output, verifier = tiny
    k = next(k for k in range(1, honest.node_count) if honest.tensor(k).size)
    liar = structural_liar(honest, output, "empty", k, 0)
    state = play(_setup(liar, honest), {Role.PROVIDER: _honest(liar, Role.PROVIDER),
                                        Role.CHALLENGER: _honest(honest, Role.CHALLENGER)},
                 verifier, Role.CHALLENGER, honest, max_rounds(honest.node_count, 1 << 20))
    assert (state.winner, state.k, state.element, state.shape) == (Role.CHALLENGER, k, 0, (0,))


def test_a_non_canonical_bool_byte_loses_through_the_one_step_point2(tiny):
    """Issue 17, point 2: the only wrong element of T_k is a bool encoded as byte 0x02. The
    one-step reads it as 2, which no op computes: the provider loses (before: the one-step
    reverted InvalidBoolElement and the liar won on time)."""
    honest, output, verifier = tiny
    k = next(k for k in lie_nodes(honest, "noncanonical_bool"))
    data = bytearray(commitments.tensor_data(honest.tensor(k)))
    data[3] = 2
    tree = forged_tree(commitments.dtype_code(bool), honest.tensor(k).shape, bytes(data))
    n = honest.node_count
    liar = lying_trace(honest.with_output(n, changed(honest.tensor(n), len(output) - 1, 1)),
                       k, tree)
    state = play(_setup(liar, honest), {Role.PROVIDER: _honest(liar, Role.PROVIDER),
                                        Role.CHALLENGER: _honest(honest, Role.CHALLENGER)},
                 verifier, Role.CHALLENGER, honest, max_rounds(honest.node_count, 1 << 20))
    assert (state.winner, state.k, state.element) == (Role.CHALLENGER, k, 3)
    assert state.reason == "the one-step recomputed another value"


# ----------------------------------------------------------------------- dishonest challengers


@_settings
@given(seed=st.integers(0, 2**32), forge=st.booleans(), stall=st.booleans())
def test_a_dishonest_challenger_disputing_an_honest_claim_loses(tiny, seed, forge, stall):
    honest, _, verifier = tiny
    rng = random.Random(seed)

    def random_challenger(state: GameState, now: float) -> list:
        if state.phase is Phase.BISECTION:
            return [rng.choice([Agree(state.mid), Disagree(state.mid)])]
        if state.phase is Phase.DESCENT:
            return [PickChild(rng.randrange(len(state.children))) for _ in range(8)] \
                + [PickChild(0)]
        if state.element is None:
            return [NameElement(rng.randrange(10**6)), NameElement(_first_element(state))]
        witness = challenger_witness(state, honest)
        forged = [OneStep(dataclasses.replace(witness, claimed=witness.claimed + 1)),
                  OneStep(dataclasses.replace(witness, out_index=witness.out_index + 1)),
                  OneStep("not a witness")] if forge else []
        return forged + ([] if stall else [OneStep(witness)])

    bound = max_rounds(honest.node_count, _largest_bytes(honest))
    state = play(_setup(honest, honest), {Role.PROVIDER: _honest(honest, Role.PROVIDER),
                                          Role.CHALLENGER: random_challenger},
                 verifier, Role.PROVIDER, honest, bound)
    assert state.winner is Role.PROVIDER
    expected = "challenger ran out of time" if stall else "the one-step recomputed the " \
                                                          "claimed value"
    assert state.reason == expected


def _first_element(state: GameState) -> int:
    itemsize = commitments.numpy_dtype(state.dtype).itemsize
    return state.node_index * commitments.LEAF_BYTES // itemsize


# ----------------------------------------------------------------------------- contract rules


def test_moves_out_of_turn_wrong_midpoints_and_early_timeouts_revert(tiny):
    honest, _, verifier = tiny
    state = open_game(_setup(honest, honest), 0.0)
    [post_root] = decide(state, honest, Role.PROVIDER, 1.0)
    with pytest.raises(IllegalMove, match="provider's move"):
        apply(state, post_root, Role.CHALLENGER, 1.0)
    with pytest.raises(IllegalMove, match="not run out"):
        apply(state, Timeout(), Role.CHALLENGER, 1.0)
    forged = dataclasses.replace(post_root, state_root=bytes(32))
    with pytest.raises(IllegalMove, match="leaf N"):
        apply(state, forged, Role.PROVIDER, 1.0)
    state = apply(state, post_root, Role.PROVIDER, 1.0)
    assert state.phase is Phase.BISECTION and state.rounds == 1
    with pytest.raises(IllegalMove, match="midpoint"):
        apply(state, PostMid(state.mid + 1, bytes(32)), Role.PROVIDER, 2.0)
    with pytest.raises(IllegalMove, match="not a move"):
        apply(state, Agree(state.mid), Role.PROVIDER, 2.0)
    with pytest.raises(IllegalMove, match="32 bytes"):
        apply(state, PostMid(state.mid, b"short"), Role.PROVIDER, 2.0)
    assert state.mid_root is None  # nothing reverted changed the state


def test_the_clock_charges_only_the_party_to_move_and_expires():
    clock = Clock.start(100.0, seconds=50.0)
    assert clock.remaining(Role.PROVIDER, 130.0) == 20.0
    assert clock.remaining(Role.CHALLENGER, 130.0) == 50.0
    assert not clock.expired(149.0) and clock.expired(150.0)
    handed = clock.hand_over(130.0, Role.CHALLENGER)
    assert (handed.provider_seconds, handed.challenger_seconds) == (20.0, 50.0)
    assert handed.remaining(Role.CHALLENGER, 180.0) == 0.0 and handed.expired(180.0)


def test_a_late_move_reverts_and_the_opponent_wins_on_time(tiny):
    honest, _, verifier = tiny
    setup = dataclasses.replace(_setup(honest, honest), clock_seconds=60.0)
    state = open_game(setup, 0.0)
    [post_root] = decide(state, honest, Role.PROVIDER, 60.0)
    with pytest.raises(IllegalMove, match="clock ran out"):
        apply(state, post_root, Role.PROVIDER, 60.0)
    assert decide(state, honest, Role.CHALLENGER, 60.0) == [Timeout()]
    resolved = apply(state, Timeout(), Role.CHALLENGER, 60.0)
    assert resolved.winner is Role.CHALLENGER and resolved.phase is Phase.RESOLVED
    with pytest.raises(IllegalMove, match="resolved"):
        apply(resolved, Timeout(), Role.PROVIDER, 61.0)


def test_the_chunk_proof_rebuilt_from_the_descent_equals_the_tensor_range_proof(tiny):
    honest, _, verifier = tiny
    k = max(range(1, honest.node_count + 1), key=lambda j: honest.tensor(j).nbytes)
    lie = changed(honest.tensor(k), honest.tensor(k).size - 1, 1)  # the last leaf
    state = _lying_provider_game(tiny, k, lie)
    tree = commitments.TensorTree(lie)
    start = state.node_index * commitments.LEAF_BYTES
    assert chunk_proof(state) == tree.range_proof(start, start + len(state.chunk))


def test_round_counts_quoted_in_the_protocol_doc():
    # docs/protocol.md "Round counts": R1-1.5B has 5,874 nodes, logits up to (T, 151936) int32.
    logits = {1024: (5, 21), 4096: (6, 22), 32768: (7, 23)}
    for tokens, (descent, total) in logits.items():
        assert descent_rounds(tokens * 151936 * 4) == descent
        assert max_rounds(5874, tokens * 151936 * 4) == total
    assert descent_rounds(1024 * 151936 * 4, fan_out_bits=1) == 20
    assert max_rounds(898, 96 * 1024) == 15
