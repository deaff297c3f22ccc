"""DisputeGame on a real anvil with the real tiny-r1 model: the contract against its executable
spec (`prover.game.apply`), honest and dishonest players through whole games, clocks, bonds
and the coordinator's slashing.

Accounts: 0 deploys, 1 is the provider, 2 the consumer, 4 and 5 challengers, 6 a bystander.
Every game is played by `prover.game.decide` on the state the binding reads back from the
chain; lies are the honest trace with one tensor changed (`ModelTrace.with_output`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from web3 import Web3

from optinfer.contracts.artifacts import ARTIFACTS_DIR
from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import (
    CoordinatorParams,
    InferenceCoordinator,
    RequestSpec,
    Status,
)
from optinfer.contracts.dispute_game import DisputeGame, GameParams
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.models.runtime import IntegerModel
from optinfer.prover import commitments
from optinfer.prover import game as spec
from optinfer.prover.game import ModelTrace, Phase, Role

TINY_R1 = Path(__file__).resolve().parents[2] / "models" / "tiny-r1" / "integer"
ETHER = 10**18
PARAMS = CoordinatorParams(
    minimum_stake=1 * ETHER,
    stake_per_claim=ETHER // 2,
    challenge_window=3600,
    challenger_share_bps=5000,
    consumer_share_bps=3000,
    max_callback_gas_limit=500_000,
)
GAME = GameParams(clock_seconds=6 * 3600, fan_out_bits=4, challenger_bond=ETHER // 10)
FEE = ETHER // 100
PROMPT = [1, 6, 7, 15, 8, 9, 16]  # "12+34="

pytestmark = pytest.mark.xdist_group("tiny_r1_chain")


@pytest.fixture(scope="module")
def tiny():
    """tiny-r1's answer to "12+34=" and its honest trace (computed once)."""
    model = IntegerModel(TINY_R1)
    output = model.generate(PROMPT, 12)
    return model, output, ModelTrace.from_model(model, PROMPT, output)


@dataclasses.dataclass
class Stack:
    w3: Web3
    accounts: tuple
    coordinator: InferenceCoordinator
    game: DisputeGame
    honest: ModelTrace
    output: list[int]
    model_id: bytes

    @property
    def provider(self):
        return self.accounts[1]

    @property
    def consumer(self):
        return self.accounts[2]

    def claim(self, output: list[int]) -> int:
        """The consumer asks PROMPT; the provider commits `output`. Returns the request id."""
        spec_ = RequestSpec(model_id=self.model_id, prompt=PROMPT,
                            max_tokens=32, commit_deadline=_now(self.w3) + 600)
        receipt = self.coordinator.post_request_send(spec_, FEE, self.consumer)
        request_id = self.coordinator.events(receipt, "RequestPosted")[0]["requestId"]
        self.coordinator.commit_output_send(request_id, output, self.provider)
        return request_id

    def challenge(self, request_id: int, challenger) -> int:
        committed = self.honest.committed
        return self.game.challenge_send(request_id, PROMPT, committed.nodes_root,
                                        committed.constants_root, challenger)


def _verifier_address(w3, deployer, registry_address: str) -> str:
    """The real OneStepVerifier once its artifact exists; until then an address without the
    function, so that only the final one-step move is unavailable."""
    if (ARTIFACTS_DIR / "OneStepVerifier.json").exists():
        from optinfer.contracts.one_step_binding import OneStepVerifier

        return OneStepVerifier.deploy(w3, deployer).address
    return registry_address


@pytest.fixture
def stack(chain, isolated, registry_address, tiny) -> Stack:
    model, output, honest = tiny
    deployer = chain.accounts[0]
    spec_ = ModelSpec.from_manifest(TINY_R1 / "manifest.json", manifest_uri="optinfer:tiny-r1")
    ModelRegistry(isolated, registry_address).register_send(spec_, deployer)
    coordinator = InferenceCoordinator.deploy(isolated, deployer, registry_address, PARAMS)
    verifier = _verifier_address(isolated, deployer, registry_address)
    game = DisputeGame.deploy(isolated, deployer, coordinator.address, verifier, GAME)
    coordinator.set_dispute_game_send(game.address, deployer)
    coordinator.register_provider_send(PARAMS.minimum_stake, chain.accounts[1])
    return Stack(isolated, chain.accounts, coordinator, game, honest, list(output),
                 spec_.model_root)


def _now(w3: Web3) -> int:
    return w3.eth.get_block("latest")["timestamp"]


def _advance(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


def _lie_at_last_token(honest: ModelTrace, output: list[int]) -> tuple[ModelTrace, list[int]]:
    claimed = list(output)
    claimed[-1] = (claimed[-1] + 1) % 20
    tensor = np.asarray(claimed, dtype=np.int64)
    return honest.with_output(honest.node_count, tensor), claimed


# ----------------------------------------------------------------------------- the mirror


def test_the_contract_and_the_spec_agree_move_by_move(stack):
    """A lying provider against an honest challenger up to the one-step: after every move the
    state read back from the chain is exactly what `prover.game.apply` computes from the
    previous one."""
    liar, claimed = _lie_at_last_token(stack.honest, stack.output)
    request_id = stack.claim(claimed)
    game_id = stack.challenge(request_id, stack.accounts[4])
    players = {Role.PROVIDER: (liar, stack.provider), Role.CHALLENGER: (stack.honest,
                                                                        stack.accounts[4])}
    state = stack.game.state(game_id).state
    assert state.phase is Phase.AWAIT_ROOT
    assert state.setup.initial_state == stack.honest.state_root(0)
    assert state.setup.final_leaf == commitments.tensor_root(np.asarray(claimed, np.int64))
    moves = 0
    while not (state.phase is Phase.ONE_STEP and state.element is not None):
        role = state.to_move
        trace, signer = players[role]
        (action,) = spec.decide(state, trace, role, _now(stack.w3))
        receipt = stack.game.submit(game_id, action, signer, state)
        mined_at = stack.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
        expected = spec.apply(state, action, role, mined_at)
        state = stack.game.state(game_id).state
        assert state == expected, f"after {action!r}"
        moves += 1
    assert state.k == stack.honest.node_count  # the lie is in the last node only
    assert state.rounds <= spec.max_rounds(stack.honest.node_count, 1 << 20)
    assert moves > 2 * 9  # ten bisection rounds over 898 nodes, then descent and chunk


# ----------------------------------------------------------------------------- rules


def test_moves_out_of_turn_wrong_midpoints_and_early_timeouts_revert(stack):
    request_id = stack.claim(stack.output)
    challenger = stack.accounts[4]
    game_id = stack.challenge(request_id, challenger)
    n = stack.honest.node_count
    root_move = spec.PostRoot(stack.honest.state_root(n), tuple(stack.honest.state_path(n, n)))
    with pytest.raises(ContractRevert) as raised:
        stack.game.submit(game_id, root_move, challenger)
    assert raised.value.name == "NotYourMove"
    with pytest.raises(ContractRevert) as raised:
        stack.game.submit(game_id, spec.Timeout(), stack.accounts[6])
    assert raised.value.name == "ClockNotExpired"
    forged = spec.PostRoot(stack.honest.state_root(n - 1), root_move.path)
    with pytest.raises(ContractRevert) as raised:
        stack.game.submit(game_id, forged, stack.provider)
    assert raised.value.name == "FinalLeafMismatch"
    stack.game.submit(game_id, root_move, stack.provider)
    with pytest.raises(ContractRevert) as raised:
        stack.game.submit(game_id, spec.PostMid(n // 2 + 1, bytes(32)), stack.provider)
    assert raised.value.name == "WrongMidpoint"
    with pytest.raises(ContractRevert) as raised:
        stack.game.submit(game_id, spec.Agree(n // 2), challenger)
    assert raised.value.name == "NotYourMove"


def test_a_challenge_needs_the_bond_the_prompt_and_the_model_roots(stack):
    request_id = stack.claim(stack.output)
    committed = stack.honest.committed
    challenger = stack.accounts[4]
    game = stack.game
    cases = {
        "PromptMismatch": (PROMPT[:-1], committed.nodes_root, committed.constants_root),
        "ModelRootMismatch": (PROMPT, committed.constants_root, committed.nodes_root),
    }
    for error, (prompt, nodes_root, constants_root) in cases.items():
        with pytest.raises(ContractRevert) as raised:
            game.challenge_send(request_id, prompt, nodes_root, constants_root, challenger)
        assert raised.value.name == error
    function = game.contract.functions.challenge(request_id, PROMPT, committed.nodes_root,
                                                 committed.constants_root)
    from optinfer.contracts.bindings import send_function

    with pytest.raises(ContractRevert) as raised:
        send_function(stack.w3, game.artifact, function, challenger, value=1)
    assert raised.value.name == "WrongBond"
    _advance(stack.w3, PARAMS.challenge_window)
    with pytest.raises(ContractRevert) as raised:
        stack.challenge(request_id, challenger)
    assert raised.value.name == "ChallengeWindowClosed"


# ----------------------------------------------------------------------------- clocks


@pytest.mark.parametrize("silent_after", [0, 5])
def test_a_provider_that_stops_answering_is_slashed_and_the_request_refunded(stack,
                                                                            silent_after):
    """(d) The provider goes silent (at once, or mid-bisection): the challenger claims the
    timeout; the claim is rejected, the provider slashed, the consumer refunded, the
    challenger gets its bond back and its share of the slash."""
    liar, claimed = _lie_at_last_token(stack.honest, stack.output)
    request_id = stack.claim(claimed)
    challenger = stack.accounts[4]
    game_id = stack.challenge(request_id, challenger)
    for _ in range(silent_after):
        stack.game.play_turn(game_id, liar, Role.PROVIDER, stack.provider)
        stack.game.play_turn(game_id, stack.honest, Role.CHALLENGER, challenger)
    assert stack.game.play_turn(game_id, stack.honest, Role.CHALLENGER, challenger) == []
    _advance(stack.w3, GAME.clock_seconds)
    actions = stack.game.play_turn(game_id, stack.honest, Role.CHALLENGER, challenger)
    assert actions == [spec.Timeout()]
    state = stack.game.state(game_id).state
    assert state.phase is Phase.RESOLVED and state.winner is Role.CHALLENGER
    assert stack.coordinator.get_request(request_id).status is Status.REJECTED
    share = PARAMS.stake_per_claim * PARAMS.challenger_share_bps // 10_000
    assert stack.coordinator.balance_of(challenger.address) == share
    assert stack.game.balance_of(challenger.address) == GAME.challenger_bond
    consumer_share = PARAMS.stake_per_claim * PARAMS.consumer_share_bps // 10_000
    assert stack.coordinator.balance_of(stack.consumer.address) == FEE + consumer_share
    stake, locked = stack.coordinator.provider_stake(stack.provider.address)
    assert (stake, locked) == (PARAMS.minimum_stake - PARAMS.stake_per_claim, 0)
    with pytest.raises(ContractRevert) as raised:
        stack.game.submit(game_id, spec.Timeout(), stack.accounts[6])
    assert raised.value.name == "GameResolved"


def test_a_challenger_that_stops_answering_loses_its_bond_and_the_claim_finalizes(stack):
    """An honest claim disputed by a challenger that then goes silent: the provider claims
    the timeout and the bond, and the claim finalizes after the window."""
    request_id = stack.claim(stack.output)
    challenger = stack.accounts[4]
    game_id = stack.challenge(request_id, challenger)
    stack.game.play_turn(game_id, stack.honest, Role.PROVIDER, stack.provider)
    stack.game.play_turn(game_id, stack.honest, Role.PROVIDER, stack.provider)  # S_mid
    with pytest.raises(ContractRevert) as raised:
        stack.coordinator.finalize_send(request_id, stack.accounts[6])
    assert raised.value.name in {"ChallengeWindowOpen", "DisputesOpen"}
    _advance(stack.w3, max(GAME.clock_seconds, PARAMS.challenge_window))
    actions = stack.game.play_turn(game_id, stack.honest, Role.PROVIDER, stack.provider)
    assert actions == [spec.Timeout()]
    assert stack.game.state(game_id).state.winner is Role.PROVIDER
    assert stack.game.balance_of(stack.provider.address) == GAME.challenger_bond
    before = stack.w3.eth.get_balance(stack.provider.address)
    receipt = stack.game.withdraw_send(stack.provider)
    cost = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert stack.w3.eth.get_balance(stack.provider.address) == before + GAME.challenger_bond - cost
    stack.coordinator.finalize_send(request_id, stack.accounts[6])
    assert stack.coordinator.get_request(request_id).status is Status.FINALIZED
