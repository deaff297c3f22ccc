"""The watchtower's pure decisions: sampling, the model check, the verdict, move positions,
when to look at a game again."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from optinfer.challenger import policy
from optinfer.challenger.policy import HeldModel, Verdict
from optinfer.contracts.registry import ModelSpec
from optinfer.prover import commitments
from optinfer.prover.game import Clock, GameSetup, GameState, Phase, Role

NODES, CONSTANTS = b"\x01" * 32, b"\x02" * 32


def held(opset: int = 1, nodes: int = 898) -> HeldModel:
    return HeldModel(b"\x05" * 32, NODES, CONSTANTS, opset, nodes)


def test_the_registered_root_is_what_the_manifest_commits():
    import json

    from tests.challenger.conftest import INTEGER_DIR

    manifest = json.loads((INTEGER_DIR / "manifest.json").read_text())
    root = commitments.model_root(bytes.fromhex(manifest["nodes_root"][2:]),
                                  bytes.fromhex(manifest["constants_root"][2:]),
                                  manifest["opset_version"], manifest["nodes"])
    assert "0x" + root.hex() == manifest["model_root"]


def test_the_held_model_id_is_the_id_its_manifest_registers_under():
    from optinfer.challenger.watchtower import LocalModel
    from tests.challenger.conftest import INTEGER_DIR

    registered = ModelSpec.from_manifest(INTEGER_DIR / "manifest.json")
    local = LocalModel(INTEGER_DIR)
    assert local.held.model_id == registered.model_id
    assert (local.held.max_context, local.held.eos_token_ids) == (registered.max_context,
                                                                   registered.eos_token_ids)


def test_a_claim_is_checked_only_on_the_held_registered_model():
    model = held()
    assert policy.model_problem(model.model_id, model, True) is None
    assert "holds no usable model" in policy.model_problem(model.model_id, None, True)
    assert "is not held here" in policy.model_problem(b"\x09" * 32, model, True)
    assert "is not registered" in policy.model_problem(model.model_id, model, False)


def test_a_squatters_registration_with_other_eos_ids_is_another_model_point5():
    """The id binds the max context and the EOS ids: a registration of the held model's roots
    with other ones is another model, whose claims this watchtower does not judge as its own."""
    from tests.challenger.conftest import INTEGER_DIR

    published = ModelSpec.from_manifest(INTEGER_DIR / "manifest.json")
    model = dataclasses.replace(held(), model_id=published.model_id)
    for squat in ({"eos_token_ids": ()}, {"max_context": 8}):
        squatter = dataclasses.replace(published, **squat)
        assert "is not held here" in policy.model_problem(squatter.model_id, model, True)
    assert policy.model_problem(published.model_id, model, True) is None


def test_only_a_differing_token_is_challenged():
    assert policy.judge(True, "ok", False) == policy.Judgement(Verdict.VALID, "ok", False)
    invalid = policy.judge(False, "token 3 is 5, the model gives 7", True)
    assert invalid.verdict is Verdict.INVALID and invalid.challenge
    truncated = policy.judge(False, "output stops before EOS and before max tokens", False)
    assert truncated.verdict is Verdict.UNPROVABLE and not truncated.challenge


@given(hs.floats(0.01, 1.0), hs.binary(min_size=1, max_size=32))
def test_sampling_is_deterministic_and_keeps_about_the_rate(rate, salt):
    picks = [policy.sampled(request_id, rate, salt) for request_id in range(2000)]
    assert picks == [policy.sampled(request_id, rate, salt) for request_id in range(2000)]
    assert abs(sum(picks) / len(picks) - rate) < 0.06
    assert all(policy.sampled(request_id, 1.0, salt) for request_id in range(50))


def test_the_salt_changes_which_claims_are_left_out():
    first = [policy.sampled(i, 0.5, b"operator a") for i in range(200)]
    second = [policy.sampled(i, 0.5, b"operator b") for i in range(200)]
    assert first != second


def a_state(phase: Phase, rounds: int, **changes) -> GameState:
    setup = GameSetup(node_count=898, initial_state=bytes(32), final_leaf=bytes(32))
    return GameState(setup=setup, phase=phase, clock=Clock(100.0, 100.0, Role.PROVIDER, 0.0),
                     rounds=rounds, **changes)


@pytest.mark.parametrize("to_move, left, expected", [
    (Role.CHALLENGER, 50.0, 2.0),  # our move: at the poll interval
    (Role.PROVIDER, 50.0, 2.0),  # the provider has time: at the poll interval
    (Role.PROVIDER, 0.5, 1.5),  # it runs out sooner: just after
    (Role.PROVIDER, -5.0, 0.0),  # already out: now (claim the timeout)
])
def test_the_next_look_comes_no_later_than_the_providers_clock(to_move, left, expected):
    state = a_state(Phase.BISECTION, 1, mid_root=b"x" if to_move is Role.CHALLENGER else None)
    state = dataclasses.replace(state, clock=Clock(left + 10, 100.0, to_move, 10.0))
    assert state.to_move is to_move
    assert policy.next_check(state, 20.0, 2.0) == expected


def test_the_challenge_window():
    assert policy.window_open(1000, 999)
    assert not policy.window_open(1000, 1000)
