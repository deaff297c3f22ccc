"""The tiny-r1 dispute stack on anvil, shared by the contract game tests: the model's honest
trace of one answer (`tiny`), the deployed registry, coordinator, game and verifier with a
staked provider (`stack`, fixtures registered by tests/contracts/conftest.py), and `play`,
which runs a game to its end with any two policies.

Accounts: 0 deploys, 1 is the provider, 2 the consumer, 4 and 5 challengers, 6 a bystander.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from web3 import Web3

from optinfer.contracts.artifacts import ARTIFACTS_DIR
from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import InferenceCoordinator, RequestSpec
from optinfer.contracts.dispute_game import DisputeGame, GameParams
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.models.runtime import IntegerModel
from optinfer.prover import game as spec
from optinfer.prover.game import ModelTrace, Phase, Role
from optinfer.services.deployments import DEMO_COORDINATOR_PARAMS

TINY_R1 = Path(__file__).resolve().parents[2] / "models" / "tiny-r1" / "integer"
ETHER = 10**18
PARAMS = DEMO_COORDINATOR_PARAMS  # the deployment the demo and operators get
GAME = GameParams(clock_seconds=6 * 3600, fan_out_bits=4, challenger_bond=ETHER // 10)
FEE = ETHER // 100
PROMPT = [1, 6, 7, 15, 8, 9, 16]  # "12+34="


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
        """The consumer asks PROMPT for up to len(`output`) tokens (tiny-r1's first 12, no
        EOS yet: an answer that stops at max tokens); the provider commits `output`. Returns
        the request id."""
        spec_ = RequestSpec(model_id=self.model_id, prompt=PROMPT,
                            max_tokens=len(output), commit_deadline=chain_now(self.w3) + 600)
        receipt = self.coordinator.post_request_send(spec_, FEE, self.consumer)
        request_id = self.coordinator.events(receipt, "RequestPosted")[0]["requestId"]
        self.coordinator.commit_output_send(request_id, output, self.provider)
        return request_id

    def challenge(self, request_id: int, challenger) -> int:
        return self.game.challenge_send(request_id, PROMPT, challenger)


def verifier_address(w3, deployer, registry_address: str) -> str:
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
    verifier = verifier_address(isolated, deployer, registry_address)
    game = DisputeGame.deploy(isolated, deployer, coordinator.address, verifier, GAME)
    coordinator.set_dispute_game_send(game.address, deployer)
    coordinator.register_provider_send(PARAMS.minimum_stake, chain.accounts[1])
    return Stack(isolated, chain.accounts, coordinator, game, honest, list(output),
                 spec_.model_id)


def chain_now(w3: Web3) -> int:
    return w3.eth.get_block("latest")["timestamp"]


def advance(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


Policy = Callable[[spec.GameState, float], list]


def honest_policy(trace: ModelTrace, role: Role) -> Policy:
    return lambda state, now: spec.decide(state, trace, role, now)


def play(stack: Stack, game_id: int, policies: dict[Role, Policy],
          signers: dict, stall: dict[Role, float] | None = None) -> spec.GameState:
    """Play game `game_id` to the end on chain. The party to move tries its policy's moves in
    order until the contract accepts one; a party left without a legal move stalls, the chain's
    clock jumps past its budget, and its opponent's policy claims the timeout. A role in
    ``stall`` lets that fraction of its remaining clock pass before each move."""
    for _ in range(200):
        state = stack.game.state(game_id).state
        if state.phase is Phase.RESOLVED:
            return state
        mover = state.to_move
        if stall and mover in stall:
            advance(stack.w3, int(stall[mover] * state.clock.remaining(mover, chain_now(stack.w3))))
            state = stack.game.state(game_id).state
        for action in policies[mover](state, chain_now(stack.w3)):
            try:
                stack.game.submit(game_id, action, signers[mover], state)
                break
            except ContractRevert:
                continue
        else:
            advance(stack.w3, GAME.clock_seconds + 1)
            state = stack.game.state(game_id).state
            (timeout,) = policies[mover.opponent](state, chain_now(stack.w3))
            stack.game.submit(game_id, timeout, signers[mover.opponent], state)
    raise AssertionError("the game did not end in 200 moves")
