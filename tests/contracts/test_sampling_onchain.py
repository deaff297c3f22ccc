"""Sampled requests on a real anvil (issue 22): the limits `postRequest` checks, the seed the
chain fixes at posting, leaf 0 of a sampling model's dispute, and whole games over sampled
answers, played by `prover.game.decide` against the committed tiny-r1 sampling conversion.

Accounts: 0 deploys, 1 is the provider, 2 the consumer, 4 a challenger, 6 a bystander.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from eth_utils import keccak

from optinfer.contracts.bindings import ContractRevert, reverts_decoded
from optinfer.contracts.coordinator import (
    InferenceCoordinator,
    RequestSpec,
    Status,
    draw_seed,
)
from optinfer.contracts.dispute_game import DisputeGame
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.contracts.sender import TxSender
from optinfer.models.runtime import IntegerModel
from optinfer.models.sampling import Sampling
from optinfer.models.tiny_r1 import INTEGER_DIR, SAMPLING_DIR
from optinfer.prover.game import ModelTrace, Role
from tests.contracts.tiny_chain import (
    FEE,
    GAME,
    PARAMS,
    PROMPT,
    chain_now,
    honest_policy,
    play,
    verifier_address,
)

pytestmark = pytest.mark.xdist_group("tiny_r1_chain")

MAX_TOKENS = 12
HOT = Sampling(2000, 1000, 0)  # tiny-r1 is nearly one-hot: only T 2 moves its answers


@pytest.fixture(scope="module")
def sampler() -> IntegerModel:
    return IntegerModel(SAMPLING_DIR)


@dataclasses.dataclass
class SamplingStack:
    w3: object
    accounts: tuple
    coordinator: InferenceCoordinator
    game: DisputeGame
    model: IntegerModel
    sampling_id: bytes  # tiny-r1 converted --sampling
    greedy_id: bytes  # the committed greedy tiny-r1

    @property
    def consumer(self):
        return self.accounts[2]

    @property
    def provider(self):
        return self.accounts[1]

    def spec(self, sampling: Sampling, model_id: bytes | None = None) -> RequestSpec:
        return RequestSpec(model_id=model_id or self.sampling_id, prompt=PROMPT,
                           max_tokens=MAX_TOKENS, commit_deadline=chain_now(self.w3) + 600,
                           sampling=sampling)

    def post(self, sampling: Sampling) -> dict:
        """Post PROMPT with `sampling` (its seed the consumer's); the RequestPosted args."""
        receipt = self.coordinator.post_request_send(self.spec(sampling), FEE, self.consumer)
        (event,) = self.coordinator.events(receipt, "RequestPosted")
        return event

    def next_draw(self, sampling: Sampling) -> Sampling:
        """The draw the next request posted with `sampling` will get."""
        seed = draw_seed(self.w3.eth.chain_id, self.coordinator.address,
                         self.coordinator.parameter("requestCount") + 1,
                         self.consumer.address, sampling.seed)
        return dataclasses.replace(sampling, seed=seed)


@pytest.fixture
def stack(chain, isolated, registry_address, sampler) -> SamplingStack:
    deployer = chain.accounts[0]
    registry = ModelRegistry(isolated, registry_address)
    ids = []
    for directory in (SAMPLING_DIR, INTEGER_DIR):
        spec = ModelSpec.from_manifest(directory / "manifest.json",
                                       manifest_uri=f"optinfer:{directory.name}")
        registry.register_send(spec, deployer)
        ids.append(spec.model_id)
    coordinator = InferenceCoordinator.deploy(isolated, deployer, registry_address, PARAMS)
    verifier = verifier_address(isolated, deployer, registry_address)
    game = DisputeGame.deploy(isolated, deployer, coordinator.address, verifier, GAME)
    coordinator.set_dispute_game_send(game.address, deployer)
    coordinator.register_provider_send(PARAMS.minimum_stake, chain.accounts[1])
    return SamplingStack(isolated, chain.accounts, coordinator, game, sampler, *ids)


def _post_raw(stack: SamplingStack, draw: tuple[int, int, int], model_id: bytes | None = None):
    """Dry-run postRequest with a raw (temperature, topP, seed), past `Sampling`'s checks."""
    args = (*stack.spec(Sampling(), model_id).as_args()[:-1], draw)
    function = stack.coordinator.contract.functions.postRequest(*args)
    return reverts_decoded(stack.coordinator.artifact, lambda: function.call(
        {"from": stack.consumer.address, "value": FEE}))


@pytest.mark.parametrize("draw,error", [
    ((49, 950, 1), "TemperatureOutOfRange(uint256)"),
    ((2001, 950, 1), "TemperatureOutOfRange(uint256)"),
    ((600, 0, 1), "TopPOutOfRange(uint256)"),
    ((600, 1001, 1), "TopPOutOfRange(uint256)"),
])
def test_postRequest_refuses_a_draw_outside_the_limits(stack, draw, error):
    with pytest.raises(ContractRevert) as caught:
        _post_raw(stack, draw)
    assert caught.value.data[:4] == keccak(text=error)[:4]
    assert caught.value.args_decoded == (draw[0] if "Temperature" in error else draw[1],)


def test_postRequest_refuses_to_sample_a_greedy_only_model(stack):
    with pytest.raises(ContractRevert) as caught:
        _post_raw(stack, (600, 950, 1), stack.greedy_id)
    assert caught.value.name == "SamplingNotSupported"
    assert caught.value.args_decoded == (stack.greedy_id,)
    # Greedy requests are what such a model takes, whatever else the draw holds.
    assert _post_raw(stack, (0, 0, 5), stack.greedy_id) == 1


def test_the_limits_themselves_are_accepted_and_stored(stack):
    for sampling in (Sampling(50, 1, 3), Sampling(2000, 1000, 2**63 - 1)):
        event = stack.post(sampling)
        stored = stack.coordinator.get_request(event["requestId"])
        assert (stored.temperature, stored.top_p) == (sampling.temperature, sampling.top_p)
        assert event["sampling"] == {"temperature": sampling.temperature,
                                     "topP": sampling.top_p, "seed": stored.seed}


def test_a_greedy_request_stores_no_draw_whatever_else_it_carries(stack):
    """Temperature 0 is greedy: top-p and the seed are dropped, nothing is stored, and the
    draw reads as Sampling() (leaf 0's header [P, 0, 1000, 0])."""
    args = (*stack.spec(Sampling()).as_args()[:-1], (0, 7, 99))
    receipt = TxSender(stack.w3, stack.consumer).send(
        stack.coordinator.tx("postRequest", *args, value=FEE), stack.coordinator.artifact)
    (event,) = stack.coordinator.events(receipt, "RequestPosted")
    assert event["sampling"] == {"temperature": 0, "topP": 0, "seed": 0}
    stored = stack.coordinator.get_request(event["requestId"])
    assert (stored.temperature, stored.top_p, stored.seed) == (0, 0, 0)
    assert stored.draw == Sampling()


def test_the_seed_is_fixed_at_posting_from_the_request_and_the_consumer_s_seed(stack):
    """seed = keccak256(abi.encode(chainid, coordinator, requestId, consumer, consumerSeed))
    >> 193: the Python mirror gives the chain's value, two requests with the same consumer
    seed draw differently, and committing (the provider's only move) leaves it as it was."""
    first, second = stack.post(Sampling(600, 950, 42)), stack.post(Sampling(600, 950, 42))
    for event in (first, second):
        expected = draw_seed(stack.w3.eth.chain_id, stack.coordinator.address,
                             event["requestId"], stack.consumer.address, 42)
        assert event["sampling"]["seed"] == expected < 2**63
        assert stack.coordinator.contract.functions.drawSeed(
            event["requestId"], stack.consumer.address, 42).call() == expected
        assert stack.coordinator.get_request(event["requestId"]).seed == expected
    assert first["sampling"]["seed"] != second["sampling"]["seed"]

    request_id = first["requestId"]
    draw = stack.coordinator.get_request(request_id).draw
    output = stack.model.generate(PROMPT, MAX_TOKENS, draw=draw)
    stack.coordinator.commit_output_send(request_id, output, stack.provider)
    assert stack.coordinator.get_request(request_id).draw == draw
    assert stack.coordinator.get_request(request_id).status is Status.COMMITTED


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(600, 950, 7), HOT])
def test_S0_of_a_sampled_claim_is_leaf_zero_of_the_honest_trace_with_its_draw(stack, sampling):
    """The game builds leaf 0 as [len(P), temperature, top_p, seed] ++ P ++ O[:-1] from the
    stored request, the greedy request's as [len(P), 0, 1000, 0]: exactly the model's
    verify input, so an honest challenger agrees with S_0."""
    event = stack.post(sampling)
    request_id = event["requestId"]
    draw = stack.coordinator.get_request(request_id).draw
    output = stack.model.generate(PROMPT, MAX_TOKENS, draw=draw)
    stack.coordinator.commit_output_send(request_id, output, stack.provider)
    game_id = stack.game.challenge_send(request_id, PROMPT, stack.accounts[4])
    setup = stack.game.state(game_id).state.setup
    honest = ModelTrace.from_model(stack.model, PROMPT, output, draw)
    assert setup.initial_state == honest.state_root(0)
    other = dataclasses.replace(draw, seed=draw.seed ^ 1) if draw.temperature else HOT
    assert setup.initial_state != ModelTrace.from_model(
        stack.model, PROMPT, output, other).state_root(0)


def _dispute(stack: SamplingStack, request_id: int, provider, challenger):
    """Account 4 challenges the claim on `request_id`; the game played to its end by the two
    policies; its final state."""
    game_id = stack.game.challenge_send(request_id, PROMPT, stack.accounts[4])
    return play(stack, game_id, {Role.PROVIDER: provider, Role.CHALLENGER: challenger},
                {Role.PROVIDER: stack.provider, Role.CHALLENGER: stack.accounts[4]})


def _differing_draw(stack: SamplingStack) -> tuple[Sampling, list[int], list[int]]:
    """A consumer seed whose draw at T 2 answers otherwise than greedy decoding: the next
    request's draw, its sampled answer and the greedy one."""
    greedy = stack.model.generate(PROMPT, MAX_TOKENS)
    for consumer_seed in range(64):
        draw = stack.next_draw(dataclasses.replace(HOT, seed=consumer_seed))
        sampled = stack.model.generate(PROMPT, MAX_TOKENS, draw=draw)
        if sampled != greedy:
            return dataclasses.replace(HOT, seed=consumer_seed), sampled, greedy
    raise AssertionError("no seed of 64 samples away from the greedy answer")


def test_a_provider_answering_greedily_when_asked_to_sample_loses_on_chain(stack):
    """The provider ignores the request's draw and commits tiny-r1's greedy answer,
    defending the trace of that claim under the request's draw with its final tokens
    replaced (consistent everywhere but the sampler's last node): the honest challenger's
    bisection ends at that node and the one-step convicts; the claim is rejected."""
    sampling, sampled, greedy = _differing_draw(stack)
    request_id = stack.post(sampling)["requestId"]
    draw = stack.coordinator.get_request(request_id).draw
    stack.coordinator.commit_output_send(request_id, greedy, stack.provider)

    honest = ModelTrace.from_claim(stack.model, PROMPT, greedy, draw=draw)
    assert [int(t) for t in honest.tensor(honest.node_count)] != greedy
    liar = honest.with_output(honest.node_count, np.asarray(greedy, np.int64))
    state = _dispute(stack, request_id, honest_policy(liar, Role.PROVIDER),
                     honest_policy(honest, Role.CHALLENGER))
    assert state.winner is Role.CHALLENGER and state.k == honest.node_count
    assert stack.coordinator.get_request(request_id).status is Status.REJECTED


def _until_stuck(policy):
    """`policy`, with no move where it finds nothing to dispute."""
    def moves(state, now):
        try:
            return policy(state, now)
        except StopIteration:
            return []
    return moves


def test_an_honest_sampled_answer_wins_its_game_against_a_greedy_minded_challenger(stack):
    """The other way round: the sampled answer committed, and a challenger who disputes it
    with the greedy trace (ignoring the draw). Its S_0 is not the chain's, so its bisection
    leads it to a node whose tensor it cannot tell apart from the provider's, where it has no
    move left; its clock runs out, and the claim stays committed."""
    sampling, sampled, _ = _differing_draw(stack)
    request_id = stack.post(sampling)["requestId"]
    draw = stack.coordinator.get_request(request_id).draw
    stack.coordinator.commit_output_send(request_id, sampled, stack.provider)
    honest = ModelTrace.from_model(stack.model, PROMPT, sampled, draw)
    mistaken = ModelTrace.from_model(stack.model, PROMPT, sampled, Sampling())
    state = _dispute(stack, request_id, honest_policy(honest, Role.PROVIDER),
                     _until_stuck(honest_policy(mistaken, Role.CHALLENGER)))
    assert state.winner is Role.PROVIDER
    assert stack.coordinator.get_request(request_id).status is Status.COMMITTED


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_substituted_token_anywhere_in_a_sampled_answer_loses_on_chain(stack, where):
    """The honest draw with one token replaced (the first, a middle one, or the last before
    the EOS), defended by the trace of that claim whose last node is made to agree with it:
    the one-step convicts at the last node."""
    sampling, sampled, _ = _differing_draw(stack)
    request_id = stack.post(sampling)["requestId"]
    draw = stack.coordinator.get_request(request_id).draw
    claimed = list(sampled)
    end = len(claimed) - (claimed[-1] in stack.model.eos_ids)  # the EOS stays where it is
    position = {"first": 0, "middle": end // 2, "last": end - 1}[where]
    while True:  # another token, and not an EOS (commitOutput refuses one before the end)
        claimed[position] = (claimed[position] + 1) % stack.model.vocab_size
        if claimed[position] not in stack.model.eos_ids:
            break
    stack.coordinator.commit_output_send(request_id, claimed, stack.provider)
    honest = ModelTrace.from_claim(stack.model, PROMPT, claimed, draw=draw)
    liar = honest.with_output(honest.node_count, np.asarray(claimed, np.int64))
    state = _dispute(stack, request_id, honest_policy(liar, Role.PROVIDER),
                     honest_policy(honest, Role.CHALLENGER))
    assert state.winner is Role.CHALLENGER
    assert stack.coordinator.get_request(request_id).status is Status.REJECTED


def test_a_provider_drawing_with_the_consumer_s_seed_instead_of_the_chain_s_loses(stack):
    """A plausible provider bug, or a provider grinding: it draws with the consumer's seed as
    posted rather than the seed the coordinator derived, and defends the honest trace of that
    other draw. Its leaf 0 is not the contract's S_0, so no consistent move is left to it
    once the bisection reaches the first node; it runs out of time and is slashed."""
    greedy = stack.model.generate(PROMPT, MAX_TOKENS)
    wrong = next(s for s in range(64)
                 if stack.model.generate(PROMPT, MAX_TOKENS,
                                         draw=dataclasses.replace(HOT, seed=s)) != greedy)
    sampling = dataclasses.replace(HOT, seed=wrong)
    request_id = stack.post(sampling)["requestId"]
    draw = stack.coordinator.get_request(request_id).draw
    claimed = stack.model.generate(PROMPT, MAX_TOKENS, draw=sampling)  # the consumer's seed
    assert claimed != stack.model.generate(PROMPT, MAX_TOKENS, draw=draw)
    stack.coordinator.commit_output_send(request_id, claimed, stack.provider)
    own = ModelTrace.from_model(stack.model, PROMPT, claimed, sampling)
    honest = ModelTrace.from_claim(stack.model, PROMPT, claimed, draw=draw)
    state = _dispute(stack, request_id, _until_stuck(honest_policy(own, Role.PROVIDER)),
                     honest_policy(honest, Role.CHALLENGER))
    assert state.winner is Role.CHALLENGER
    assert stack.coordinator.get_request(request_id).status is Status.REJECTED
