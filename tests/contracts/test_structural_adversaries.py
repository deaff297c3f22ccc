"""The structural adversary suite (issue 17): liars that lie in headers, shapes, encodings,
padding, roots and timing, played through the real contracts on anvil against the shipped
honest `prover.game.decide`, with the real tiny-r1 trace and the real OneStepVerifier.

Invariants checked after every game, each with its reason:

* the honest side wins (every lie has a refuting move, docs/protocol.md, "Why the honest party
  always wins");
* no honest party loses funds (an honest challenger gets its bond back, an honest provider
  keeps its stake and is paid the liar's bond);
* a false answer never finalizes (the claim is Rejected, `finalize` reverts);
* a true answer always finalizes (after the window, whatever the challenger did).

The Python mirror of the same lies runs many more examples in tests/test_game.py; here every
kind of lie is played at least once per CI run, and `--hypothesis-profile=deep` plays more.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import Status
from optinfer.prover import commitments
from optinfer.prover import game as spec
from optinfer.prover.game import Phase, Role
from tests.contracts.tiny_chain import GAME, PARAMS, Stack, advance, honest_policy, play
from tests.lies import STRUCTURAL_LIES, forged_tree, lie_nodes, lying_trace, structural_lie
from tests.profiles import examples

pytestmark = pytest.mark.xdist_group("tiny_r1_chain")

_chain_settings = settings(max_examples=examples(1), deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture])


def _false_claim(stack: Stack) -> tuple[list[int], np.ndarray]:
    """The provider's answer, wrong in its last token, and the int64 tensor T_N of it."""
    claimed = list(stack.output)
    claimed[-1] = (claimed[-1] + 1) % 20
    return claimed, np.asarray(claimed, np.int64)


def _watchtower_game(stack: Stack, liar, claimed: list[int], stall: bool = False):
    """The provider commits ``claimed`` and plays ``liar``'s trace faithfully (letting 45% of
    its clock pass before each move when ``stall``); the honest watchtower (account 4)
    challenges and plays `decide`. The request id, the watchtower, the final state."""
    request_id = stack.claim(claimed)
    challenger = stack.accounts[4]
    game_id = stack.challenge(request_id, challenger)
    state = play(stack, game_id, {Role.PROVIDER: honest_policy(liar, Role.PROVIDER),
                                  Role.CHALLENGER: honest_policy(stack.honest, Role.CHALLENGER)},
                 {Role.PROVIDER: stack.provider, Role.CHALLENGER: challenger},
                 stall={Role.PROVIDER: 0.45} if stall else None)
    return request_id, challenger, state


def _assert_false_claim_lost(stack: Stack, request_id: int, state: spec.GameState,
                             challenger) -> None:
    assert state.winner is Role.CHALLENGER, state.reason
    assert stack.coordinator.get_request(request_id).status is Status.REJECTED
    assert stack.game.balance_of(challenger.address) >= GAME.challenger_bond
    advance(stack.w3, PARAMS.challenge_window)
    with pytest.raises(ContractRevert):
        stack.coordinator.finalize_send(request_id, stack.accounts[6])


@pytest.mark.parametrize("kind", STRUCTURAL_LIES)
@_chain_settings
@given(data=st.data(), stall=st.booleans())
def test_a_provider_lying_in_structure_loses_on_chain(stack, kind, data, stall):
    """One lie of ``kind`` at a drawn node of the trace, the rest honest but the final token;
    the liar plays its own trace faithfully (and, stalling, lets 45% of its clock pass before
    every move). The honest watchtower's `decide` convicts it on chain."""
    honest = stack.honest
    k = data.draw(st.sampled_from(lie_nodes(honest, kind)), label="k")
    seed = data.draw(st.integers(0, 2**32), label="seed")
    claimed, final = _false_claim(stack)
    liar = lying_trace(honest.with_output(honest.node_count, final), k,
                       structural_lie(honest.tensor(k), kind, np.random.default_rng(seed)))
    request_id, challenger, state = _watchtower_game(stack, liar, claimed, stall)
    _assert_false_claim_lost(stack, request_id, state, challenger)
    if not stall and kind not in ("padding_bytes", "padding_leaf", "too_large_header",
                                  "no_preimage"):
        assert state.k == k  # the dispute lands on the lie, and the one-step convicts it
        assert state.reason == "one-step"


def test_an_empty_tensor_header_loses_on_chain_point1(stack):
    """Issue 17, point 1, as reported: T_k is the root of an int64 tensor of shape (0,) where
    the honest one has elements, the last leaf holds the false tokens. Before, every
    `nameElement` reverted ElementNotInChunk and the provider won on time; now element 0 names
    the header and the on-chain one-step convicts it."""
    honest = stack.honest
    k = next(j for j in range(1, honest.node_count) if honest.tensor(j).size
             and honest.tensor(j).dtype == np.int64)
    claimed, final = _false_claim(stack)
    liar = lying_trace(honest.with_output(honest.node_count, final), k,
                       structural_lie(honest.tensor(k), "empty", np.random.default_rng(0)))
    request_id, challenger, state = _watchtower_game(stack, liar, claimed)
    assert (state.k, state.shape, state.element, state.reason) == (k, (0,), 0, "one-step")
    _assert_false_claim_lost(stack, request_id, state, challenger)


def test_a_non_canonical_bool_byte_loses_on_chain_point2(stack):
    """Issue 17, point 2, as reported: the liar's only wrong element is a bool encoded as
    0x02. Before, `revealChunk` accepted it and the one-step reverted InvalidBoolElement, so
    the provider won on time; now the one-step reads the byte as 2 and convicts it."""
    honest = stack.honest
    k = next(j for j in range(1, honest.node_count) if honest.tensor(j).dtype == bool
             and honest.tensor(j).size)
    data = bytearray(commitments.tensor_data(honest.tensor(k)))
    element = len(data) // 2
    data[element] = 2
    claimed, final = _false_claim(stack)
    liar = lying_trace(honest.with_output(honest.node_count, final), k,
                       forged_tree(commitments.dtype_code(bool), honest.tensor(k).shape,
                                   bytes(data)))
    request_id, challenger, state = _watchtower_game(stack, liar, claimed)
    assert (state.k, state.element, state.reason) == (k, element, "one-step")
    _assert_false_claim_lost(stack, request_id, state, challenger)


# ----------------------------------------------------------------------- lying challengers

LYING_CHALLENGERS = ("disagree_all", "agree_all", "random", "padding_child", "far_element",
                     "forged_claim", "forged_header", "wrong_trace", "stall")


@pytest.mark.parametrize("behaviour", LYING_CHALLENGERS)
@_chain_settings
@given(seed=st.integers(0, 2**32))
def test_a_lying_challenger_loses_and_the_true_answer_finalizes(stack, behaviour, seed):
    """A challenger disputing a true answer, lying in its answers (every midpoint, none, at
    random), its picks (padding children), its element (outside the chunk), its witness
    (another claimed value; a header witness against the honest header), its trace (one
    structurally wrong tensor) or its timing (it stalls). The honest provider's `decide` wins,
    it is paid the bond, and the answer finalizes."""
    honest = stack.honest
    rng = random.Random(seed)
    k = rng.randrange(1, honest.node_count)
    wrong = lying_trace(honest, k, structural_lie(honest.tensor(k), "grow",
                                                  np.random.default_rng(seed)))

    def challenger(state: spec.GameState, now: float) -> list:
        if behaviour == "wrong_trace":
            return spec.decide(state, wrong, Role.CHALLENGER, now)
        if behaviour == "stall":
            return spec.decide(state, honest, Role.CHALLENGER, now) if rng.random() < 0.5 \
                else []
        if state.phase is Phase.BISECTION:
            agree = {"disagree_all": False, "agree_all": True}.get(behaviour,
                                                                     rng.random() < 0.5)
            return [spec.Agree(state.mid) if agree else spec.Disagree(state.mid)]
        if state.phase is Phase.DESCENT:
            last = len(state.children) - 1
            return [spec.PickChild(last), spec.PickChild(rng.randrange(last + 1)),
                    spec.PickChild(0)] if behaviour == "padding_child" else [spec.PickChild(0)]
        first, end = spec.chunk_elements(state)
        if state.element is None:
            return [spec.NameElement(end + 1), spec.NameElement(2**63),
                    spec.NameElement(first)] if behaviour == "far_element" \
                else [spec.NameElement(first)]
        witness = spec.challenger_witness(state, honest)
        if behaviour == "forged_claim":
            return [spec.OneStep(dataclasses.replace(witness, claimed=witness.claimed + 1))]
        if behaviour == "forged_header":
            forged = honest.header_witness(state.k, state.dtype, state.shape, state.data_root,
                                           spec.chunk_proof(state), state.element)
            return [spec.OneStep(forged)]
        return [spec.OneStep(witness)]

    request_id = stack.claim(stack.output)
    liar = stack.accounts[5]
    game_id = stack.challenge(request_id, liar)
    state = play(stack, game_id, {Role.PROVIDER: honest_policy(honest, Role.PROVIDER),
                                   Role.CHALLENGER: challenger},
                 {Role.PROVIDER: stack.provider, Role.CHALLENGER: liar})
    assert state.winner is Role.PROVIDER, state.reason
    assert stack.game.balance_of(stack.provider.address) == GAME.challenger_bond
    assert stack.game.balance_of(liar.address) == 0
    assert stack.coordinator.provider_stake(stack.provider.address)[0] == PARAMS.minimum_stake
    advance(stack.w3, PARAMS.challenge_window)
    stack.coordinator.finalize_send(request_id, stack.accounts[6])
    assert stack.coordinator.get_request(request_id).status is Status.FINALIZED



def _contradictions(action: spec.Action) -> list[spec.Action]:
    """Variants of a provider's reveal that contradict what it committed before: another
    dtype or shape under the same data root, another data root, a swapped pair of children, a
    chunk with one byte changed or padded with one byte more."""
    if isinstance(action, spec.RevealLeaf):
        other = 7 if action.dtype != 7 else 6
        return [dataclasses.replace(action, dtype=other),
                dataclasses.replace(action, shape=(*action.shape, 1)),
                dataclasses.replace(action, data_root=bytes(32))]
    if isinstance(action, spec.RevealChildren):
        children = list(action.children)
        children[0], children[1] = children[1], children[0]
        return [spec.RevealChildren(tuple(children))] if children[0] != children[1] else []
    if isinstance(action, spec.RevealChunk):
        flipped = bytearray(action.chunk)
        flipped[0] ^= 1
        return [spec.RevealChunk(bytes(flipped)), spec.RevealChunk(action.chunk + b"\0")]
    return []


def test_reveals_that_contradict_the_committed_roots_revert_and_the_liar_loses(stack):
    """Before every reveal of its own trace (one element of the largest tensor wrong, so the
    dispute descends, and the final token), the liar tries reveals that contradict its earlier
    posts: each reverts, changes nothing, and the game goes on to the liar's conviction."""
    honest = stack.honest
    claimed, final = _false_claim(stack)
    k = max(range(1, honest.node_count), key=lambda j: honest.tensor(j).nbytes)
    liar = lying_trace(honest.with_output(honest.node_count, final), k,
                       structural_lie(honest.tensor(k), "value", np.random.default_rng(1)))
    request_id = stack.claim(claimed)
    challenger = stack.accounts[4]
    game_id = stack.challenge(request_id, challenger)
    refused = []

    def contradicting(state: spec.GameState, now: float) -> list:
        moves = spec.decide(state, liar, Role.PROVIDER, now)
        for forged in (c for move in moves for c in _contradictions(move)):
            with pytest.raises(ContractRevert) as raised:
                stack.game.submit(game_id, forged, stack.provider, state)
            refused.append(raised.value.name)
            assert stack.game.state(game_id).state == state  # a reverted move changes nothing
        return moves

    state = play(stack, game_id, {Role.PROVIDER: contradicting,
                                  Role.CHALLENGER: honest_policy(honest, Role.CHALLENGER)},
                 {Role.PROVIDER: stack.provider, Role.CHALLENGER: challenger})
    assert {"TensorHeaderMismatch", "DescentChildrenMismatch", "LeafChunkHashMismatch",
            "LeafChunkLengthMismatch"} <= set(refused)
    _assert_false_claim_lost(stack, request_id, state, challenger)
