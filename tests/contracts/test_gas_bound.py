"""Issue 17, point 3: every claim is disputable within the per-transaction gas cap.

On an anvil that enforces EIP-7825's 2**24 gas cap per transaction (`--enable-tx-gas-limit`),
the largest request the protocol accepts (a model registered at the registry's largest max
context, `MAX_CONTEXT_TOKENS`; as many output tokens as a claim can store, `MAX_TOKENS`) is
posted, committed, challenged and won by the honest challenger. Before, `challenge` wrote the
initial state and final leaf byte by byte: ~3.4k gas a prompt token, 6.2k an output token,
so ~2,700 output tokens already made a claim unchallengeable.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from web3 import Web3

from optinfer.contracts.bench import MAX_OUTPUT_TOKENS, largest_request_gas
from optinfer.contracts.bindings import TX_GAS_LIMIT_CAP
from optinfer.contracts.coordinator import InferenceCoordinator, RequestSpec, Status
from optinfer.contracts.dispute_game import DisputeGame, GameParams
from optinfer.contracts.localchain import LocalChain, start_anvil
from optinfer.contracts.one_step_binding import OneStepVerifier
from optinfer.contracts.registry import MAX_CONTEXT_TOKENS, ModelRegistry, ModelSpec
from optinfer.prover.game import Role, Timeout
from optinfer.services.deployments import DEMO_COORDINATOR_PARAMS

PARAMS = DEMO_COORDINATOR_PARAMS
GAME = GameParams(clock_seconds=3600, fan_out_bits=4, challenger_bond=10**17)
VOCABULARY = 151_936  # R1-Distill's


@pytest.fixture(scope="module")
def capped() -> Iterator[LocalChain]:
    """An anvil of its own that refuses any transaction asking for more than 2**24 gas."""
    with start_anvil(extra_args=("--enable-tx-gas-limit",)) as running:
        yield running


def _deploy(chain: LocalChain, w3: Web3):
    deployer = chain.accounts[0]
    registry = ModelRegistry.deploy(w3, deployer)
    spec = ModelSpec(nodes_root=b"\1" * 32, constants_root=b"\2" * 32, opset_version=2,
                     manifest_hash=b"\3" * 32, manifest_uri="test:largest",
                     max_context=MAX_CONTEXT_TOKENS, node_count=65_535,
                     eos_token_ids=(VOCABULARY - 1,))
    registry.register_send(spec, deployer)
    coordinator = InferenceCoordinator.deploy(w3, deployer, registry.address, PARAMS)
    verifier = OneStepVerifier.deploy(w3, deployer)
    game = DisputeGame.deploy(w3, deployer, coordinator.address, verifier.address, GAME)
    coordinator.set_dispute_game_send(game.address, deployer)
    coordinator.register_provider_send(PARAMS.minimum_stake, chain.accounts[1])
    return coordinator, game, spec.model_id


@pytest.mark.parametrize("output_tokens", [1, MAX_OUTPUT_TOKENS])
def test_the_largest_request_is_committed_challenged_and_won_under_the_gas_cap_point3(
        capped, output_tokens):
    """The whole context used: a prompt of MAX_CONTEXT_TOKENS - output + 1 tokens and an
    output of 1 or MAX_OUTPUT_TOKENS tokens, every id a large one. Each transaction fits the
    cap with room to spare; the provider that cannot defend loses on time, the challenger
    wins."""
    w3 = capped.web3()
    coordinator, game, model_id = _deploy(capped, w3)
    challenger = capped.accounts[4]
    gas = largest_request_gas(w3, coordinator, game, model_id, output_tokens,
                              (capped.accounts[2], capped.accounts[1], challenger),
                              eos_token_ids=(VOCABULARY - 1,))
    assert max(gas["post"], gas["commit"], gas["challenge"]) < TX_GAS_LIMIT_CAP * 3 // 4, gas
    assert gas["challenge"] < 8_000_000, gas

    w3.provider.make_request("evm_increaseTime", [GAME.clock_seconds + 1])
    w3.provider.make_request("evm_mine", [])
    assert game.play_turn(gas["game_id"], None, Role.CHALLENGER, challenger) == [Timeout()]
    assert game.state(gas["game_id"]).state.winner is Role.CHALLENGER
    assert coordinator.get_request(gas["request_id"]).status is Status.REJECTED


def test_a_request_beyond_the_models_context_is_refused_at_posting(capped):
    """The bound is enforced where the request is made: one token more than the registered
    max context (prompt + max tokens - 1) reverts ContextExceeded."""
    w3 = capped.web3()
    coordinator, _, model_id = _deploy(capped, w3)
    now = w3.eth.get_block("latest")["timestamp"]
    from optinfer.contracts.bindings import ContractRevert

    request = RequestSpec(model_id=model_id, prompt=[5] * (MAX_CONTEXT_TOKENS - 9),
                          max_tokens=11, commit_deadline=now + 600)
    with pytest.raises(ContractRevert) as raised:
        coordinator.post_request_send(request, 10**16, capped.accounts[2])
    assert raised.value.name == "ContextExceeded"
