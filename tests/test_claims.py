"""The honest trace of claims the model has no answer for, and the games it wins (issue 17
point 4): token ids outside the vocabulary in the output (first, middle, last position) or the
prompt, and a sequence beyond the context, on tiny-r1, refereed by `prover.game.apply` with the
real one-step (`check_witness`) against the committed model's roots.

(Before: the watchtower's trace builder refused every such claim, `IntegerModel.trace` raising
on the id, and the watchtower called it unprovable.)
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import INTEGER_DIR
from optinfer.prover import claims, commitments
from optinfer.prover.game import (
    GameSetup,
    GameState,
    ModelTrace,
    Phase,
    Role,
    apply,
    decide,
    one_step_verifier,
    open_game,
)
from optinfer.prover.one_step import WrongClaim, check_witness
from optinfer.prover.one_step_prover import CommittedModel
from tests.claim_lies import final_liar, oov_liar
from tests.profiles import examples

OOV = 2**32 - 1  # the largest id the coordinator takes


@pytest.fixture(scope="module")
def tiny():
    """tiny-r1, its commitments, a prompt, its answer and the one-step verifier."""
    model = IntegerModel(INTEGER_DIR)
    committed = CommittedModel(model)
    prompt = model.encode("12+34=")
    answer = model.generate(prompt, 40)
    verifier = one_step_verifier(committed.nodes_root, committed.constants_root)
    return model, committed, prompt, answer, verifier


def node_named(model: IntegerModel, name: str) -> int:
    return next(k for k, node in enumerate(model.verify_graph().graph.node, 1)
                if node.name == name)


def with_id(tokens: list[int], position: int, token: int = OOV) -> list[int]:
    changed = list(tokens)
    changed[position] = token
    return changed


def play(honest: ModelTrace, liar: ModelTrace, output: list[int], verifier) -> GameState:
    """The whole game: the liar defends its trace, the honest challenger holds `honest`.
    S_0 and T_N are the contract's, from the claim; every move must be legal."""
    setup = GameSetup(node_count=honest.node_count,
                      initial_state=commitments.state_root(
                          [commitments.tensor_root(honest.tensor(0))]),
                      final_leaf=commitments.tensor_root(np.asarray(output, np.int64)))
    now, state = 0.0, open_game(setup, 0.0)
    for _ in range(200):
        if state.phase is Phase.RESOLVED:
            return state
        mover = state.to_move
        now += 60.0
        (action,) = decide(state, liar if mover is Role.PROVIDER else honest, mover, now)
        state = apply(state, action, mover, now, verifier)
        # The honest challenger only agrees with true states.
        assert state.lo_root == honest.state_root(state.lo)
    raise AssertionError("the game did not end")


# ------------------------------------------------------------------------------- the trace


@pytest.mark.parametrize("where", ["first", "middle", "prompt"])
def test_an_id_outside_the_vocabulary_in_the_sequence_stops_the_trace_at_the_embedding_point4(
        tiny, where):
    model, committed, prompt, answer, _ = tiny
    output, position = answer, {"first": 0, "middle": 5}.get(where)
    if where == "prompt":
        prompt, position = with_id(prompt, 2, model.vocab_size), 2
    else:
        output = with_id(answer, position)
        position += len(prompt)
    trace = ModelTrace.from_claim(model, prompt, output, committed)
    embed = node_named(model, "embed.rows")
    hidden = model.verify_graph().graph.initializer
    width = next(t.dims[1] for t in hidden if t.name == "embed.W")
    assert (trace.refusal.k, trace.refusal.element) == (embed, position * width)
    assert "Gather" in trace.refusal.reason
    # Leaf 0 is the contract's: the claim's sequence, ids as they are.
    assert np.array_equal(trace.tensor(0), claims.claim_sequence(prompt, output))
    # The nodes before the embedding are the model's: ONNX Runtime on the same sequence with
    # the id replaced gives them too, but for the token slice, which holds the id itself.
    read = trace.tensor(0).copy()
    read[1 + position] = 0
    tokens = node_named(model, "tokens")
    for k, tensor in enumerate(model.trace_sequence(read)[:embed - 1], 1):
        expected = trace.tensor(0)[1:] if k == tokens else tensor
        assert np.array_equal(trace.tensor(k), expected), k
    # The stand-in has the header node k must output, and the game still has N nodes.
    assert trace.tensor(embed).shape == (len(read) - 1, width)
    assert trace.node_count == committed.node_count


def test_an_id_outside_the_vocabulary_at_the_last_position_keeps_the_whole_trace_point4(tiny):
    """O's last token is not in the verified sequence: the model runs it, and its last
    prediction (an argmax over the vocabulary) is never the claimed id."""
    model, committed, prompt, answer, _ = tiny
    output = with_id(answer, len(answer) - 1)
    trace = ModelTrace.from_claim(model, prompt, output, committed)
    assert trace.refusal is None
    same = ModelTrace.from_model(model, prompt, answer)  # O[-1] never enters the sequence
    assert trace.state_root(trace.node_count) == same.state_root(same.node_count)
    assert trace.tensor(trace.node_count)[-1] != OOV


def test_a_claim_beyond_the_context_stops_the_trace_at_the_rope_table_point4(tiny):
    """What else the model cannot run: a sequence past the context (the coordinator admits
    none, against the registered context): the rotary table has no row for its positions."""
    model, committed, prompt, answer, _ = tiny
    output = (answer * 8)[:model.max_context - len(prompt) + 2]  # T = max_context + 1
    assert claims.outside_domain(prompt, output, model.vocab_size, model.max_context)
    trace = ModelTrace.from_claim(model, prompt, output, committed)
    rope = node_named(model, "rope.cos")
    assert trace.refusal.k == rope
    head_dim = trace.tensor(rope).shape[-1]
    assert trace.refusal.element == model.max_context * head_dim  # position max_context


def test_a_witness_for_a_refused_element_opens_up_to_the_refusal_and_convicts_point4(tiny):
    """`OneStepProver.witness` used to raise the refusal; now it returns the openings up to
    the index the refusal shows on, and the one-step convicts whatever the provider claims."""
    model, committed, prompt, answer, _ = tiny
    output = with_id(answer, 3)
    trace = ModelTrace.from_claim(model, prompt, output, committed)
    k, element = trace.refusal.k, trace.refusal.element
    witness = trace.one_step_witness(k, element)
    assert [r.opening.input_position for r in witness.ranges] == [1]  # the index alone
    with pytest.raises(WrongClaim, match="no defined result"):
        check_witness(witness, nodes_root=committed.nodes_root,
                      constants_root=committed.constants_root,
                      agreed_state=trace.state_root(k - 1), output_root=trace.commitment.roots[k])


# ------------------------------------------------------------------------------- the games


@pytest.mark.parametrize("where, liar", [
    ("first", "reads it as token 0"),
    ("middle", "commits the challenger's own stand-in at the embedding"),
    ("middle", "already lies where the ids are sliced out"),
    ("prompt", "reads it as token 0"),
    ("last", "ends in the claimed id"),
])
def test_a_claim_with_an_id_outside_the_vocabulary_loses_its_game_point4(tiny, where, liar):
    model, committed, prompt, answer, verifier = tiny
    if where == "prompt":
        prompt, output = with_id(prompt, 1, model.vocab_size), answer
    else:
        output = with_id(answer, {"first": 0, "middle": 7, "last": len(answer) - 1}[where])
    honest = ModelTrace.from_claim(model, prompt, output, committed)
    if where == "last":
        lying = final_liar(honest, output)
    else:
        lying = oov_liar(model, honest, prompt, output, stand_in="stand-in" in liar,
                         honest_prefix="sliced" not in liar)
    state = play(honest, lying, output, verifier)
    assert state.winner is Role.CHALLENGER
    assert state.reason == "the one-step recomputed another value"
    if where == "last":
        assert (state.k, state.element) == (committed.node_count, len(output) - 1)
    elif "sliced" in liar:
        assert state.k == node_named(model, "tokens") < honest.refusal.k
    else:
        assert (state.k, state.element) == (honest.refusal.k, honest.refusal.element)


@settings(max_examples=examples(8), deadline=None)
@given(data=st.data())
def test_any_id_outside_the_vocabulary_anywhere_in_the_output_loses_point4(tiny, data):
    model, committed, prompt, answer, verifier = tiny
    position = data.draw(st.integers(0, len(answer) - 1), label="position")
    token = data.draw(st.integers(model.vocab_size, 2**32 - 1), label="id")
    output = with_id(answer, position, token)
    honest = ModelTrace.from_claim(model, prompt, output, committed)
    if honest.refusal is None:
        assert position == len(output) - 1
        lying = final_liar(honest, output)
    else:
        lying = oov_liar(model, honest, prompt, output,
                         read_as=data.draw(st.integers(0, model.vocab_size - 1), label="as"),
                         stand_in=data.draw(st.booleans(), label="stand-in"))
    assert play(honest, lying, output, verifier).winner is Role.CHALLENGER
