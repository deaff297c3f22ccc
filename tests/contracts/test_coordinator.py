"""InferenceCoordinator on a real anvil: providers and stake, requests, commitments, finality,
callbacks (honest and hostile), refunds, the dispute hooks, and the QuestionAsker example.

Accounts: 0 deploys, 1 and 3 are providers, 2 is the consumer (owner of the QuestionAsker),
4 is a challenger, 5 a third party that finalizes and refunds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from eth_utils import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3 import Web3

from optinfer.contracts.bindings import ContractRevert, contract_at, reverts_decoded
from optinfer.contracts.coordinator import (
    MAX_CALLBACK_GAS_LIMIT,
    TX_GAS_CAP,
    ZERO_ADDRESS,
    CoordinatorParams,
    InferenceCoordinator,
    QuestionAsker,
    RequestSpec,
    Reserve,
    Status,
    token_hash,
)
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.contracts.sender import TxSender
from tests.profiles import examples

TINY_R1 = Path(__file__).resolve().parents[2] / "models" / "tiny-r1" / "integer"
ETHER = 10**18
PARAMS = CoordinatorParams(
    minimum_stake=1 * ETHER,
    stake_per_claim=ETHER // 2,
    challenge_window=3600,
    challenger_share_bps=5000,
    consumer_share_bps=3000,  # the remaining 20% is burnt
    max_callback_gas_limit=500_000,
)
FEE = ETHER // 100
CALLBACK_GAS = 200_000
PROMPT = [1, 6, 7, 15, 8, 9, 16]  # "12+34=" in tiny-r1's tokenizer (checked below)
EOS = 2  # tiny-r1's one end-of-sequence token (its manifest's config)


def deploy(w3: Web3, name: str, signer, *constructor_args) -> str:
    """Deploy the committed artifact `name` (a mock or example contract) from `signer`."""
    return TxSender(w3, signer).deploy(name, *constructor_args)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_r1_spec() -> ModelSpec:
    return ModelSpec.from_manifest(TINY_R1 / "manifest.json", manifest_uri="optinfer:tiny-r1")


@pytest.fixture
def deployed(chain, isolated, registry_address, tiny_r1_spec) -> dict[str, str]:
    """tiny-r1 registered, a coordinator and the mock game wired into it, all inside this
    test's snapshot (nothing leaks into other test files' session state)."""
    deployer = chain.accounts[0]
    ModelRegistry(isolated, registry_address).register_send(tiny_r1_spec, deployer)
    coordinator = InferenceCoordinator.deploy(isolated, deployer, registry_address, PARAMS)
    game = deploy(isolated, "MockDisputeGame", deployer, coordinator.address)
    coordinator.set_dispute_game_send(game, deployer)
    return {"coordinator": coordinator.address, "game": game}


@pytest.fixture
def coordinator(deployed, isolated) -> InferenceCoordinator:
    return InferenceCoordinator(isolated, deployed["coordinator"])


@pytest.fixture
def game(deployed, isolated):
    return contract_at(isolated, "MockDisputeGame", deployed["game"])


@pytest.fixture
def provider(chain, coordinator):
    """Account 1, registered with the minimum stake."""
    coordinator.register_provider_send(PARAMS.minimum_stake, chain.accounts[1])
    return chain.accounts[1]


@pytest.fixture(scope="session")
def tiny_r1_answer() -> list[int]:
    """tiny-r1's greedy answer to "12+34=" (generated once with the integer runtime)."""
    from optinfer.models.runtime import IntegerModel

    model = IntegerModel(TINY_R1)
    assert model.encode("12+34=") == PROMPT
    answer = model.generate(PROMPT, 32)
    assert model.decode_text(answer).endswith("46")
    return answer


# ----------------------------------------------------------------------------- helpers


def now(w3: Web3) -> int:
    return w3.eth.get_block("latest")["timestamp"]


def advance(w3: Web3, seconds: int) -> None:
    """Move the chain's clock forward and mine a block at the new time."""
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


def spec_for(w3: Web3, model: bytes, **changes) -> RequestSpec:
    """A 32-token request for `model`, deadline in 10 minutes, with `changes` applied."""
    spec = RequestSpec(
        model_id=model, prompt=PROMPT, max_tokens=32, commit_deadline=now(w3) + 600
    )
    return replace(spec, **changes)


def post(coordinator, chain, spec: RequestSpec, fee: int = FEE) -> int:
    receipt = coordinator.post_request_send(spec, fee, chain.accounts[2])
    (event,) = coordinator.events(receipt, "RequestPosted")
    return event["requestId"]


def expect_revert(action, error_signature: str) -> ContractRevert:
    """Run `action`, require a revert with custom error `error_signature`; return it."""
    with pytest.raises(ContractRevert) as caught:
        action()
    err = caught.value
    assert err.data[:4] == keccak(text=error_signature)[:4], (err.name, err.data.hex())
    return err


def assert_solvent(coordinator, accounts) -> None:
    """The coordinator holds exactly what it owes (stakes + credited balances) plus burnt wei."""
    owed = sum(coordinator.provider_stake(a.address)[0] for a in accounts)
    owed += sum(coordinator.balance_of(a.address) for a in accounts)
    owed += coordinator.parameter("totalBurned")
    assert coordinator.w3.eth.get_balance(coordinator.address) == owed


def committed_request(coordinator, chain, provider, tiny_r1_spec, output=(5, 6, 2), **changes):
    """A request posted by account 2 and answered with `output` by `provider`."""
    request_id = post(coordinator, chain, spec_for(coordinator.w3, tiny_r1_spec.model_id,
                                                   **changes))
    coordinator.commit_output_send(request_id, list(output), provider)
    return request_id


# ----------------------------------------------------------------------------- honest flow


def test_finalize_honestTinyR1FlowThroughQuestionAsker_succeeds(
    chain, coordinator, provider, tiny_r1_spec, tiny_r1_answer
):
    w3 = coordinator.w3
    consumer, finalizer = chain.accounts[2], chain.accounts[5]
    asker = QuestionAsker.deploy(w3, consumer, coordinator.address)
    spec = spec_for(w3, tiny_r1_spec.model_id, callback_gas_limit=CALLBACK_GAS)

    receipt = asker.ask_send(spec, FEE, consumer)
    (posted,) = coordinator.events(receipt, "RequestPosted")
    request_id = posted["requestId"]
    assert posted == {
        "requestId": request_id,
        "consumer": asker.address,
        "modelId": tiny_r1_spec.model_id,
        "prompt": PROMPT,
        "maxTokens": 32,
        "fee": FEE,
        "callback": asker.address,
        "callbackGasLimit": CALLBACK_GAS,
        "namedProvider": "0x0000000000000000000000000000000000000000",
        "commitDeadline": spec.commit_deadline,
        "sampling": {"temperature": 0, "topP": 0, "seed": 0},  # greedy: nothing stored
    }
    request = coordinator.get_request(request_id)
    assert request.status is Status.OPEN
    assert request.prompt_hash == token_hash(PROMPT)
    assert request.prompt_hash == coordinator.contract.functions.hashTokens(PROMPT).call()

    receipt = coordinator.commit_output_send(request_id, tiny_r1_answer, provider)
    (committed,) = coordinator.events(receipt, "OutputCommitted")
    committed_at = w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    assert committed["output"] == tiny_r1_answer
    assert committed["challengeDeadline"] == committed_at + PARAMS.challenge_window
    assert coordinator.get_output(request_id) == tiny_r1_answer
    assert coordinator.provider_stake(provider.address) == (ETHER, PARAMS.stake_per_claim)

    # Within the window nobody can finalize.
    expect_revert(lambda: coordinator.finalize_send(request_id, finalizer),
                  "ChallengeWindowOpen(uint256)")
    advance(w3, PARAMS.challenge_window)

    receipt = coordinator.finalize_send(request_id, finalizer)
    assert coordinator.events(receipt, "Finalized") == [
        {"requestId": request_id, "provider": provider.address, "fee": FEE,
         "callbackSucceeded": True}
    ]
    assert asker.answered(request_id)
    assert asker.answer(request_id) == tiny_r1_answer
    result = coordinator.get_result(request_id)
    assert (result.status, result.provider, result.output) == (
        Status.FINALIZED, provider.address, tiny_r1_answer
    )
    assert result.callback_succeeded and result.committed_at == committed_at
    assert coordinator.provider_stake(provider.address) == (ETHER, 0)
    expect_revert(lambda: coordinator.finalize_send(request_id, finalizer),
                  "ClaimNotCommitted(uint256)")

    # The fee is the provider's to withdraw, once.
    assert coordinator.balance_of(provider.address) == FEE
    before = w3.eth.get_balance(provider.address)
    receipt = coordinator.withdraw_send(provider)
    gas_cost = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert w3.eth.get_balance(provider.address) == before + FEE - gas_cost
    assert coordinator.events(receipt, "Withdrawn") == [
        {"account": provider.address, "amount": FEE}
    ]
    expect_revert(lambda: coordinator.withdraw_send(provider), "NothingToWithdraw()")
    assert_solvent(coordinator, chain.accounts)


def test_gas_postCommit32TokensFinalize_withinBudget(chain, coordinator, provider, tiny_r1_spec):
    """Gas of the steps of a claim (printed with -s). Commit's fixed part is what a 1-token
    output costs; each further token adds calldata, log data and 4 bytes of stored code."""
    w3 = coordinator.w3
    consumer = chain.accounts[2]
    asker = QuestionAsker.deploy(w3, consumer, coordinator.address)
    spec = spec_for(w3, tiny_r1_spec.model_id, callback=asker.address,
                    callback_gas_limit=CALLBACK_GAS)
    # Asked through the asker: it stores answers only to requests it posted itself.
    (posted,) = coordinator.events(asker.ask_send(spec, FEE, consumer), "RequestPosted")
    output = [token if token != EOS else 1 for token in ((7 * i + 3) % 30 for i in range(32))]
    commit_receipt = coordinator.commit_output_send(posted["requestId"], output, provider)
    post_receipt = coordinator.post_request_send(spec, FEE, consumer)
    (one_token,) = coordinator.events(post_receipt, "RequestPosted")
    one_token_id = one_token["requestId"]
    commit_one_receipt = coordinator.commit_output_send(one_token_id, [2], provider)
    advance(w3, PARAMS.challenge_window)
    finalize_receipt = coordinator.finalize_send(posted["requestId"], chain.accounts[5])
    gas = {
        "post (7 prompt tokens, callback)": post_receipt["gasUsed"],
        "commit (1 output token)": commit_one_receipt["gasUsed"],
        "commit (32 output tokens)": commit_receipt["gasUsed"],
        "finalize (callback stores 32 tokens)": finalize_receipt["gasUsed"],
    }
    print(gas)
    assert asker.answer(posted["requestId"]) == output
    assert post_receipt["gasUsed"] < 200_000
    assert commit_one_receipt["gasUsed"] < 130_000
    # About 1.8k gas per further token: 32 calldata bytes (mostly zero), 32 bytes of log data,
    # 4 bytes of stored code (800), the decode/pack/encode loops and the EOS check (0.2k).
    assert commit_receipt["gasUsed"] - commit_one_receipt["gasUsed"] < 31 * 1_900
    assert finalize_receipt["gasUsed"] < 250_000


# ----------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"prompt": []}, "EmptyPrompt()"),
        ({"max_tokens": 0}, "ZeroMaxTokens()"),
        ({"max_tokens": 128 - len(PROMPT) + 2}, "ContextExceeded(uint256,uint256)"),
        ({"max_tokens": 7000}, "MaxTokensTooLarge(uint256,uint256)"),
        ({"model_id": b"\x01" * 32}, "ModelNotRegistered(bytes32)"),
        ({"commit_deadline": 1}, "CommitDeadlineNotInFuture(uint256)"),
        ({"callback_gas_limit": 500_001}, "CallbackGasLimitTooHigh(uint256,uint256)"),
    ],
)
def test_postRequest_invalidRequest_reverts(chain, coordinator, tiny_r1_spec, changes, error):
    spec = spec_for(coordinator.w3, tiny_r1_spec.model_id, **changes)
    expect_revert(lambda: coordinator.post_request_send(spec, FEE, chain.accounts[2]), error)
    assert coordinator.parameter("requestCount") == 0


def test_postRequest_longestOutputThatFitsTheContext_succeeds(chain, coordinator, tiny_r1_spec):
    # len(P) + maxTokens - 1 == max_context exactly.
    spec = spec_for(coordinator.w3, tiny_r1_spec.model_id, max_tokens=128 - len(PROMPT) + 1)
    assert coordinator.post_request_call(spec, FEE, chain.accounts[2].address) == 1
    assert post(coordinator, chain, spec) == 1
    assert coordinator.get_request(1).max_tokens == 128 - len(PROMPT) + 1


def test_getRequest_unknownId_reverts(coordinator):
    err = expect_revert(lambda: coordinator.get_request(7), "RequestNotFound(uint256)")
    assert err.args_decoded == (7,)


def test_commitOutput_namedProvider_rejectsOtherProviders(
    chain, coordinator, provider, tiny_r1_spec
):
    other = chain.accounts[3]
    coordinator.register_provider_send(PARAMS.minimum_stake, other)
    spec = spec_for(coordinator.w3, tiny_r1_spec.model_id, named_provider=provider.address)
    request_id = post(coordinator, chain, spec)

    err = expect_revert(lambda: coordinator.commit_output_send(request_id, [5, 2], other),
                        "NotNamedProvider(address)")
    assert err.args_decoded == (provider.address.lower(),)
    coordinator.commit_output_send(request_id, [5, 2], provider)
    assert coordinator.get_request(request_id).provider == provider.address


@pytest.mark.parametrize(
    ("output", "error"),
    [([], "EmptyOutput()"), ([5] * 33, "OutputTooLong(uint256,uint256)")],
)
def test_commitOutput_badLength_reverts(chain, coordinator, provider, tiny_r1_spec, output, error):
    request_id = post(coordinator, chain, spec_for(coordinator.w3, tiny_r1_spec.model_id))
    expect_revert(lambda: coordinator.commit_output_send(request_id, output, provider), error)
    assert coordinator.get_request(request_id).status is Status.OPEN


@pytest.mark.parametrize(("output", "max_tokens", "error", "args"), [
    ([5, EOS, 6, EOS], 32, "EosBeforeEnd(uint256)", (1,)),  # runs on past its end
    ([EOS, EOS], 2, "EosBeforeEnd(uint256)", (0,)),
    ([5, 6], 32, "OutputNotTerminated(uint256,uint256)", (2, 32)),  # truncated
    ([5], 2, "OutputNotTerminated(uint256,uint256)", (1, 2)),
])
def test_commitOutput_notShapedAsGreedyDecodingStops_reverts(
        chain, coordinator, provider, tiny_r1_spec, output, max_tokens, error, args):
    """Every token of a truncated answer is the model's, so no dispute could convict it:
    the commit itself refuses an answer that stops before EOS and before max tokens, or
    goes on after an EOS."""
    assert tiny_r1_spec.eos_token_ids == (EOS,)
    request_id = post(coordinator, chain, spec_for(coordinator.w3, tiny_r1_spec.model_id,
                                                   max_tokens=max_tokens))
    err = expect_revert(lambda: coordinator.commit_output_send(request_id, output, provider),
                        error)
    assert err.args_decoded == args
    assert coordinator.get_request(request_id).status is Status.OPEN


@pytest.mark.parametrize(("output", "max_tokens"), [
    ([EOS], 32), ([5, 6, EOS], 3), ([5, 6, EOS], 32), ([5, 6], 2), ([5, EOS], 2)])
def test_commitOutput_endsAtEosOrAtMaxTokens_succeeds(chain, coordinator, provider,
                                                     tiny_r1_spec, output, max_tokens):
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec, output=output,
                                   max_tokens=max_tokens)
    assert coordinator.get_output(request_id) == output


def test_commitOutput_unregisteredProvider_reverts(chain, coordinator, tiny_r1_spec):
    request_id = post(coordinator, chain, spec_for(coordinator.w3, tiny_r1_spec.model_id))
    expect_revert(lambda: coordinator.commit_output_send(request_id, [2], chain.accounts[3]),
                  "ProviderNotRegistered(address)")


def test_commitOutput_stakeAllLocked_reverts(chain, coordinator, provider, tiny_r1_spec):
    # 1 ether of stake backs exactly two claims of 0.5 ether.
    committed_request(coordinator, chain, provider, tiny_r1_spec)
    committed_request(coordinator, chain, provider, tiny_r1_spec)
    request_id = post(coordinator, chain, spec_for(coordinator.w3, tiny_r1_spec.model_id))
    err = expect_revert(lambda: coordinator.commit_output_send(request_id, [2], provider),
                        "InsufficientFreeStake(uint256,uint256)")
    assert err.args_decoded == (0, PARAMS.stake_per_claim)
    # More stake lets it answer.
    coordinator.add_stake_send(PARAMS.stake_per_claim, provider)
    coordinator.commit_output_send(request_id, [2], provider)


def test_commitOutput_twice_reverts(chain, coordinator, provider, tiny_r1_spec):
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    expect_revert(lambda: coordinator.commit_output_send(request_id, [9], provider),
                  "RequestNotOpen(uint256)")
    assert coordinator.get_output(request_id) == [5, 6, 2]


def test_getOutput_extremeTokenIds_roundTrip(chain, coordinator, provider, tiny_r1_spec):
    output = [0, 1, 2**32 - 1, 2**31, 255, 256, 65_536, 2**32 - 2]  # no EOS: max tokens long
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec, output=output,
                                   max_tokens=len(output))
    assert coordinator.get_output(request_id) == output
    # The data contract's code is STOP || the packed tokens.
    data = coordinator.get_request(request_id).output
    assert bytes(coordinator.w3.eth.get_code(data)) == b"\x00" + b"".join(
        t.to_bytes(4, "big") for t in output
    )


# Any tokens but EOS, committed to a request of exactly their length.
TOKEN_LISTS = st.lists(st.integers(0, 2**32 - 1).filter(lambda t: t != EOS), min_size=1,
                       max_size=32)


@settings(max_examples=examples(12), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(output=TOKEN_LISTS)
def test_packing_randomTokens_roundTripOnChain(chain, coordinator, provider, tiny_r1_spec,
                                               output):
    # The contract's packing and hash agree with Python's, and a commit reads back unchanged.
    assert coordinator.contract.functions.hashTokens(output).call() == token_hash(output)
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec, output=output,
                                   max_tokens=len(output))
    assert coordinator.get_output(request_id) == output
    coordinator.add_stake_send(PARAMS.stake_per_claim, provider)  # back the next example


# ----------------------------------------------------------------------------- refunds


def test_refund_afterCommitDeadline_succeeds(chain, coordinator, provider, tiny_r1_spec):
    w3 = coordinator.w3
    consumer, anyone = chain.accounts[2], chain.accounts[5]
    asker = QuestionAsker.deploy(w3, consumer, coordinator.address)
    spec = spec_for(w3, tiny_r1_spec.model_id, callback_gas_limit=CALLBACK_GAS)
    receipt = asker.ask_send(spec, FEE, consumer)
    (posted,) = coordinator.events(receipt, "RequestPosted")
    request_id = posted["requestId"]

    expect_revert(lambda: coordinator.refund_send(request_id, anyone),
                  "CommitDeadlineNotPassed(uint256)")
    advance(w3, 601)
    expect_revert(lambda: coordinator.commit_output_send(request_id, [2], provider),
                  "CommitDeadlinePassed(uint256)")

    receipt = coordinator.refund_send(request_id, anyone)
    assert coordinator.events(receipt, "Refunded") == [
        {"requestId": request_id, "consumer": asker.address, "amount": FEE}
    ]
    assert coordinator.get_request(request_id).status is Status.REFUNDED
    expect_revert(lambda: coordinator.refund_send(request_id, anyone), "RequestNotOpen(uint256)")

    # The asker collects the refund for its owner.
    before = w3.eth.get_balance(consumer.address)
    receipt = asker.collect_refunds_send(consumer)
    gas_cost = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert w3.eth.get_balance(consumer.address) == before + FEE - gas_cost
    assert coordinator.balance_of(asker.address) == 0
    assert_solvent(coordinator, chain.accounts)


# ----------------------------------------------------------------------------- hostile callbacks


@pytest.mark.parametrize(
    "consumer_contract", ["RevertingConsumer", "GasBurningConsumer", "ReturnBombConsumer"]
)
def test_finalize_hostileCallback_stillFinalizes(
    chain, coordinator, provider, tiny_r1_spec, consumer_contract
):
    w3 = coordinator.w3
    callback = deploy(w3, consumer_contract, chain.accounts[2])
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec,
                                   callback=callback, callback_gas_limit=300_000)
    advance(w3, PARAMS.challenge_window)

    receipt = coordinator.finalize_send(request_id, chain.accounts[5])
    (finalized,) = coordinator.events(receipt, "Finalized")
    # The return bomb returns normally (its data is never copied); the others fail.
    assert finalized["callbackSucceeded"] is (consumer_contract == "ReturnBombConsumer")
    result = coordinator.get_result(request_id)
    assert result.status is Status.FINALIZED and result.output == [5, 6, 2]
    assert receipt["gasUsed"] < 300_000 + 150_000
    assert coordinator.balance_of(provider.address) == FEE
    coordinator.withdraw_send(provider)
    assert_solvent(coordinator, chain.accounts)


def test_finalize_reenteringCallback_cannotReenterOrDrain(
    chain, coordinator, provider, tiny_r1_spec
):
    w3 = coordinator.w3
    callback = contract_at(
        w3, "ReenteringConsumer", deploy(w3, "ReenteringConsumer", chain.accounts[2],
                                         coordinator.address)
    )
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec,
                                   callback=callback.address, callback_gas_limit=300_000)
    advance(w3, PARAMS.challenge_window)

    receipt = coordinator.finalize_send(request_id, chain.accounts[5])
    (finalized,) = coordinator.events(receipt, "Finalized")
    assert finalized["callbackSucceeded"] is True
    assert callback.functions.called().call()
    # Both re-entrant calls hit the guard; nothing was paid twice.
    reentrancy = keccak(text="Reentrancy()")[:4]
    assert bytes(callback.functions.finalizeRevert().call()) == reentrancy
    assert bytes(callback.functions.withdrawRevert().call()) == reentrancy
    assert len(coordinator.events(receipt, "Finalized")) == 1
    assert coordinator.balance_of(provider.address) == FEE
    assert w3.eth.get_balance(callback.address) == 0
    assert_solvent(coordinator, chain.accounts)


def test_finalize_tooLittleGasForTheCallback_reverts(chain, coordinator, provider, tiny_r1_spec):
    w3 = coordinator.w3
    callback = deploy(w3, "GasBurningConsumer", chain.accounts[2])
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec,
                                   callback=callback, callback_gas_limit=400_000)
    advance(w3, PARAMS.challenge_window)
    # A finalizer cannot starve the callback (and have its failure recorded) by sending less
    # gas than the limit needs: the whole finalize reverts instead.
    finalize = coordinator.contract.functions.finalize(request_id)
    params = {"from": chain.accounts[5].address, "gas": 300_000}
    err = expect_revert(
        lambda: reverts_decoded(coordinator.artifact, lambda: finalize.call(params)),
        "InsufficientGasForCallback(uint256,uint256)",
    )
    assert err.args_decoded[1] == 400_000 + 400_000 // 63 + 30_000
    assert coordinator.get_request(request_id).status is Status.COMMITTED
    # With enough gas it goes through (and the burner's failure is recorded).
    receipt = coordinator.finalize_send(request_id, chain.accounts[5])
    assert coordinator.events(receipt, "Finalized")[0]["callbackSucceeded"] is False


def test_questionAsker_onlyCoordinatorDelivers_onlyOwnerAsks(chain, coordinator, tiny_r1_spec):
    w3 = coordinator.w3
    asker = QuestionAsker.deploy(w3, chain.accounts[2], coordinator.address)
    forged = asker.tx("onInferenceResult", 1, asker.address, [4, 6])
    with pytest.raises(ContractRevert) as caught:
        TxSender(w3, chain.accounts[3]).send(forged, asker.artifact)
    assert caught.value.name == "NotCoordinator"
    assert not asker.answered(1)
    spec = spec_for(w3, tiny_r1_spec.model_id)
    with pytest.raises(ContractRevert) as caught:
        asker.ask_send(spec, FEE, chain.accounts[3])
    assert caught.value.name == "NotOwner"


# ----------------------------------------------------------------------------- stake


def test_removeStake_lockedStake_reverts(chain, coordinator, provider, tiny_r1_spec):
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    err = expect_revert(lambda: coordinator.remove_stake_send(ETHER, provider),
                        "InsufficientFreeStake(uint256,uint256)")
    assert err.args_decoded == (ETHER - PARAMS.stake_per_claim, ETHER)
    # The free half can go.
    coordinator.remove_stake_send(ETHER - PARAMS.stake_per_claim, provider)
    assert coordinator.provider_stake(provider.address) == (
        PARAMS.stake_per_claim, PARAMS.stake_per_claim
    )
    advance(coordinator.w3, PARAMS.challenge_window)
    coordinator.finalize_send(request_id, chain.accounts[5])
    coordinator.remove_stake_send(PARAMS.stake_per_claim, provider)
    assert coordinator.balance_of(provider.address) == ETHER + FEE
    coordinator.withdraw_send(provider)
    assert_solvent(coordinator, chain.accounts)


def test_registerProvider_belowMinimumOrTwice_reverts(chain, coordinator):
    expect_revert(
        lambda: coordinator.register_provider_send(ETHER - 1, chain.accounts[3]),
        "StakeBelowMinimum(uint256,uint256)",
    )
    coordinator.register_provider_send(ETHER, chain.accounts[3])
    expect_revert(
        lambda: coordinator.register_provider_send(ETHER, chain.accounts[3]),
        "ProviderAlreadyRegistered(address)",
    )
    expect_revert(lambda: coordinator.add_stake_send(ETHER, chain.accounts[4]),
                  "ProviderNotRegistered(address)")


# ----------------------------------------------------------------------------- dispute hooks


def test_setDisputeGame_secondTimeOrNotDeployer_reverts(chain, coordinator, game):
    assert coordinator.parameter("disputeGame") == game.address
    expect_revert(lambda: coordinator.set_dispute_game_send(chain.accounts[4].address,
                                                            chain.accounts[0]),
                  "DisputeGameAlreadySet(address)")
    expect_revert(lambda: coordinator.set_dispute_game_send(chain.accounts[4].address,
                                                            chain.accounts[4]),
                  "NotDeployer(address)")


def test_disputeHooks_calledByOtherThanGame_revert(chain, coordinator, provider, tiny_r1_spec):
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    outsider = chain.accounts[4]
    for tx in (
        coordinator.tx("openDispute", request_id),
        coordinator.tx("lockChallengeReward", request_id),
        coordinator.tx("resolveDispute", request_id, False, outsider.address, 0),
    ):
        err = expect_revert(
            lambda t=tx: TxSender(coordinator.w3, outsider).send(t, coordinator.artifact),
            "NotDisputeGame(address)",
        )
        assert err.args_decoded == (outsider.address.lower(),)
    assert coordinator.get_request(request_id).open_disputes == 0


def _game_send(coordinator, game, function_name: str, *args, signer=None):
    """Call the mock game (which forwards to the coordinator), decoding the coordinator's errors."""
    tx = {"to": game.address, "data": game.encode_abi(function_name, args)}
    return TxSender(coordinator.w3, signer).send(tx, coordinator.artifact)


def test_finalize_openDispute_blocksUntilProviderWins(chain, coordinator, game, provider,
                                                      tiny_r1_spec):
    w3 = coordinator.w3
    anyone, challenger = chain.accounts[5], chain.accounts[4]
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    _game_send(coordinator, game, "openDispute", request_id, signer=anyone)
    _game_send(coordinator, game, "openDispute", request_id, signer=anyone)  # a second game
    assert coordinator.get_request(request_id).open_disputes == 2
    advance(w3, PARAMS.challenge_window)

    # The window has passed but disputes are open; no new one can start.
    err = expect_revert(lambda: coordinator.finalize_send(request_id, anyone),
                        "DisputesOpen(uint256)")
    assert err.args_decoded == (2,)
    expect_revert(lambda: _game_send(coordinator, game, "openDispute", request_id, signer=anyone),
                  "ChallengeWindowClosed(uint256)")

    _game_send(coordinator, game, "resolveDispute", request_id, True, challenger.address, 0,
               signer=anyone)
    expect_revert(lambda: coordinator.finalize_send(request_id, anyone), "DisputesOpen(uint256)")
    receipt = _game_send(coordinator, game, "resolveDispute", request_id, True,
                         challenger.address, 0, signer=anyone)
    assert coordinator.events(receipt, "DisputeResolved")[0]["openDisputes"] == 0
    assert game.functions.lastChallengerAmount().call() == 0
    expect_revert(lambda: _game_send(coordinator, game, "resolveDispute", request_id, True,
                                     challenger.address, 0, signer=anyone),
                  "NoOpenDispute(uint256)")

    coordinator.finalize_send(request_id, anyone)
    assert coordinator.balance_of(provider.address) == FEE
    assert coordinator.balance_of(challenger.address) == 0


def test_resolveDispute_providerLost_slashesOnceAndPaysEveryWinner(
    chain, coordinator, game, provider, tiny_r1_spec
):
    anyone, challenger, consumer = chain.accounts[5], chain.accounts[4], chain.accounts[2]
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    reward = PARAMS.challenger_reward
    assert coordinator.parameter("challengerReward") == reward == ETHER // 4
    # Each game locks its reward from the provider's free stake (0.5 ether is free).
    assert [_open_game(coordinator, game, request_id, anyone) for _ in range(2)] == [reward] * 2
    assert coordinator.provider_stake(provider.address) == (ETHER, PARAMS.stake_per_claim
                                                            + 2 * reward)

    receipt = _game_send(coordinator, game, "resolveDispute", request_id, False,
                         challenger.address, reward, signer=anyone)
    slash = PARAMS.stake_per_claim
    consumer_amount = slash * 3000 // 10_000
    burned = slash - reward - consumer_amount
    assert coordinator.events(receipt, "Slashed") == [{
        "requestId": request_id, "provider": provider.address, "challenger": challenger.address,
        "reserve": reward, "consumerAmount": consumer_amount, "burnedAmount": burned,
    }]
    assert coordinator.events(receipt, "ChallengerRewarded") == [{
        "requestId": request_id, "challenger": challenger.address, "amount": reward,
        "shortfall": 0,
    }]
    assert game.functions.lastChallengerAmount().call() == reward
    assert coordinator.balance_of(challenger.address) == reward
    assert coordinator.balance_of(consumer.address) == FEE + consumer_amount
    assert coordinator.parameter("totalBurned") == burned
    # The reserve (challengerReward of the slash) and the other game's lock stay locked.
    assert coordinator.provider_stake(provider.address) == (
        ETHER - consumer_amount - burned - reward, 2 * reward)
    assert coordinator.get_request(request_id).status is Status.REJECTED

    # A second lost game on the rejected claim slashes nothing more and pays its own winner.
    receipt = _game_send(coordinator, game, "resolveDispute", request_id, False, anyone.address,
                         reward, signer=anyone)
    assert coordinator.events(receipt, "Slashed") == []
    assert game.functions.lastChallengerAmount().call() == reward
    assert coordinator.balance_of(anyone.address) == reward
    assert coordinator.provider_stake(provider.address) == (ETHER - slash - reward, reward)
    expect_revert(lambda: coordinator.settle_reserve_send(request_id, anyone),
                  "ChallengeWindowOpen(uint256)")
    advance(coordinator.w3, PARAMS.challenge_window)
    expect_revert(lambda: coordinator.finalize_send(request_id, anyone),
                  "ClaimNotCommitted(uint256)")
    # The rejected output stays readable.
    assert coordinator.get_result(request_id).output == [5, 6, 2]
    # Nobody was left short: settling returns the whole reserve to the provider's free stake.
    expect_revert(lambda: coordinator.claim_reserve_share_send(request_id, challenger.address,
                                                               anyone),
                  "NoReserveShare(uint256,address)")
    receipt = coordinator.settle_reserve_send(request_id, anyone)
    assert coordinator.events(receipt, "ReserveSettled") == [
        {"requestId": request_id, "owed": 0, "returned": reward}]
    assert coordinator.provider_stake(provider.address) == (ETHER - slash - reward, 0)
    expect_revert(lambda: coordinator.settle_reserve_send(request_id, anyone),
                  "ReserveAlreadySettled(uint256)")
    coordinator.withdraw_send(challenger)
    coordinator.withdraw_send(consumer)
    assert_solvent(coordinator, chain.accounts)


def test_openDispute_onOpenRequest_reverts(chain, coordinator, game, tiny_r1_spec):
    request_id = post(coordinator, chain, spec_for(coordinator.w3, tiny_r1_spec.model_id))
    expect_revert(lambda: _game_send(coordinator, game, "openDispute", request_id,
                                     signer=chain.accounts[5]),
                  "ClaimNotCommitted(uint256)")


# ----------------------------------------------------------------------------- rewards (point 6)
#
# Every challenger that wins its own game against a false claim is paid challengerReward R
# (0.25 ether here): the part of R its game locked from the provider's free stake when it
# opened, credited when the game ends, and the rest (its shortfall) from the claim's reserve
# (R of the slashed stake) once every game on the claim is over, pro rata when the winners'
# shortfalls exceed R. Accounts: 1 the lying provider, 3 its accomplice, 4 the honest
# watchtower, 5 a bystander that sends the mock game's hooks.


def _open_game(coordinator, game, request_id: int, signer) -> int:
    """What DisputeGame.challenge does to the coordinator: open a dispute, lock the reward;
    returns the locked wei."""
    _game_send(coordinator, game, "openGame", request_id, signer=signer)
    return game.functions.lastLockedReward().call()


def _lose(coordinator, game, request_id: int, challenger, locked: int, signer) -> int:
    """The provider loses `challenger`'s game; the wei credited to the challenger now."""
    _game_send(coordinator, game, "resolveDispute", request_id, False, challenger.address,
               locked, signer=signer)
    return game.functions.lastChallengerAmount().call()


def _paid(coordinator, request_id: int, challenger, bystander) -> int:
    """Everything `challenger` was credited on the claim, its reserve share included (claimed
    once the claim is settled: window closed, no game open)."""
    if coordinator.shortfall_of(request_id, challenger.address):
        coordinator.claim_reserve_share_send(request_id, challenger.address, bystander)
    return coordinator.balance_of(challenger.address)


@pytest.mark.parametrize("honest_game_ends", ["first", "last"])
def test_rewards_honest_challenger_paid_whatever_order_games_end_point6(
    chain, coordinator, game, provider, tiny_r1_spec, honest_game_ends
):
    """The attack: the liar's accomplice challenges too, the liar loses the accomplice's game
    first and stalls the honest one. Before, only the first lost game paid a challenger share
    (to the accomplice) and the watchtower got its bond back only. Now each game pays its own
    winner R whichever ends first, and the liar's net loss stays the whole slash."""
    accomplice, watchtower, bystander = chain.accounts[3], chain.accounts[4], chain.accounts[5]
    reward, slash = PARAMS.challenger_reward, PARAMS.stake_per_claim
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    locked = {accomplice: _open_game(coordinator, game, request_id, bystander),
              watchtower: _open_game(coordinator, game, request_id, bystander)}
    order = [accomplice, watchtower] if honest_game_ends == "last" else [watchtower, accomplice]
    credited_now = {who: _lose(coordinator, game, request_id, who, locked[who], bystander)
                    for who in order}
    assert credited_now == {accomplice: reward, watchtower: reward}
    advance(coordinator.w3, PARAMS.challenge_window)
    assert _paid(coordinator, request_id, watchtower, bystander) == reward
    assert _paid(coordinator, request_id, accomplice, bystander) == reward
    coordinator.settle_reserve_send(request_id, bystander)
    stake, locked_now = coordinator.provider_stake(provider.address)
    assert locked_now == 0
    # The liar lost the slash plus the accomplice's reward, which the accomplice hands back.
    assert ETHER - stake - reward == slash
    assert coordinator.balance_of(chain.accounts[2].address) == FEE + slash * 3000 // 10_000
    assert_solvent(coordinator, chain.accounts)


def test_rewards_free_stake_taken_by_accomplices_reserve_pays_the_rest_point6(
    chain, coordinator, game, provider, tiny_r1_spec
):
    """The liar lets its accomplice's games lock all its free stake before the watchtower
    challenges: the watchtower's game locks nothing, and the reserve pays it the whole R
    (the accomplice games took no part of the reserve: their rewards were locked)."""
    accomplice, watchtower, bystander = chain.accounts[3], chain.accounts[4], chain.accounts[5]
    reward, slash = PARAMS.challenger_reward, PARAMS.stake_per_claim
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    first, second = (_open_game(coordinator, game, request_id, bystander) for _ in range(2))
    honest = _open_game(coordinator, game, request_id, bystander)
    assert (first, second, honest) == (reward, reward, 0)
    assert coordinator.free_stake(provider.address) == 0
    assert _lose(coordinator, game, request_id, watchtower, honest, bystander) == 0
    assert coordinator.shortfall_of(request_id, watchtower.address) == reward
    _lose(coordinator, game, request_id, accomplice, first, bystander)
    _lose(coordinator, game, request_id, accomplice, second, bystander)
    advance(coordinator.w3, PARAMS.challenge_window)
    assert _paid(coordinator, request_id, watchtower, bystander) == reward
    assert coordinator.balance_of(accomplice.address) == 2 * reward
    stake, locked_now = coordinator.provider_stake(provider.address)
    assert (stake, locked_now) == (ETHER - slash - 2 * reward, 0)
    assert coordinator.reserve(request_id).owed == 0
    assert_solvent(coordinator, chain.accounts)


def test_rewards_unfunded_games_share_the_reserve_point6(
    chain, coordinator, game, provider, tiny_r1_spec
):
    """The one case no order-independent rule can pay everyone R: the provider has no free
    stake at all, so every game's reward is backed by the reserve alone, and the winners'
    shortfalls (here 3R) exceed it (R): each is paid its pro rata share, R / 3, whatever order
    the games ended in and the shares are claimed in. The consumer's share and the burn are
    untouched, and the liar keeps none of the reserve."""
    bystander = chain.accounts[5]
    winners = [chain.accounts[3], chain.accounts[6], chain.accounts[4]]
    reward, slash = PARAMS.challenger_reward, PARAMS.stake_per_claim
    other = committed_request(coordinator, chain, provider, tiny_r1_spec)  # the other 0.5
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    assert coordinator.free_stake(provider.address) == 0
    locks = [_open_game(coordinator, game, request_id, bystander) for _ in winners]
    assert locks == [0, 0, 0]
    for winner in reversed(winners):
        assert _lose(coordinator, game, request_id, winner, 0, bystander) == 0
    assert coordinator.reserve(request_id) == Reserve(3 * reward, 0, False)
    # Settling needs every game over and the window closed.
    expect_revert(lambda: coordinator.claim_reserve_share_send(request_id, winners[0].address,
                                                               bystander),
                  "ChallengeWindowOpen(uint256)")
    advance(coordinator.w3, PARAMS.challenge_window)
    shares = [_paid(coordinator, request_id, winner, bystander) for winner in winners]
    assert shares == [reward // 3, reward // 3, reward - 2 * (reward // 3)]
    assert coordinator.reserve(request_id) == Reserve(0, 0, True)
    coordinator.finalize_send(other, bystander)
    assert coordinator.provider_stake(provider.address) == (ETHER - slash, 0)
    assert coordinator.parameter("totalBurned") == slash - reward - slash * 3000 // 10_000
    assert_solvent(coordinator, chain.accounts)


def test_rewards_challenge_never_blocked_point6(chain, coordinator, game, provider,
                                               tiny_r1_spec):
    """No game on a claim keeps another from opening: not the provider's lack of free stake,
    not a lost game that already rejected the claim (an accomplice can lose one in a block),
    not the number of games. Every one opened in the window is counted, and its winner paid."""
    accomplice, watchtower, bystander = chain.accounts[3], chain.accounts[4], chain.accounts[5]
    reward = PARAMS.challenger_reward
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    locks = [_open_game(coordinator, game, request_id, bystander) for _ in range(5)]
    assert locks == [reward, reward, 0, 0, 0]  # the free 0.5 ether backs two rewards
    _lose(coordinator, game, request_id, accomplice, locks[0], bystander)
    assert coordinator.get_request(request_id).status is Status.REJECTED
    late = _open_game(coordinator, game, request_id, bystander)  # after the rejection
    assert late == 0 and coordinator.get_request(request_id).open_disputes == 5
    _lose(coordinator, game, request_id, watchtower, late, bystander)
    for locked in locks[1:]:  # the other games: the provider wins them
        _game_send(coordinator, game, "resolveDispute", request_id, True, bystander.address,
                   locked, signer=bystander)
    advance(coordinator.w3, PARAMS.challenge_window)
    expect_revert(lambda: _open_game(coordinator, game, request_id, bystander),
                  "ChallengeWindowClosed(uint256)")
    assert _paid(coordinator, request_id, watchtower, bystander) == reward
    assert coordinator.provider_stake(provider.address)[1] == 0
    assert_solvent(coordinator, chain.accounts)


def test_rewards_provider_that_wins_gets_its_locked_reward_back_point6(
    chain, coordinator, game, provider, tiny_r1_spec
):
    bystander = chain.accounts[5]
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    locked = _open_game(coordinator, game, request_id, bystander)
    assert coordinator.free_stake(provider.address) == ETHER - PARAMS.stake_per_claim - locked
    _game_send(coordinator, game, "resolveDispute", request_id, True, chain.accounts[4].address,
               locked, signer=bystander)
    assert game.functions.lastChallengerAmount().call() == 0
    assert coordinator.free_stake(provider.address) == ETHER - PARAMS.stake_per_claim
    advance(coordinator.w3, PARAMS.challenge_window)
    expect_revert(lambda: coordinator.settle_reserve_send(request_id, bystander),
                  "ClaimNotRejected(uint256)")
    coordinator.finalize_send(request_id, bystander)
    assert coordinator.provider_stake(provider.address) == (ETHER, 0)
    assert coordinator.balance_of(provider.address) == FEE


# ----------------------------------------------------------------------------- callback (point 7)


def test_example_consumer_ignores_answers_to_others_requests_point7(
    chain, coordinator, provider, tiny_r1_spec
):
    """Anyone may name the asker as a request's callback; the coordinator passes the request's
    poster to the callback, and the asker stores only answers to requests it posted itself."""
    w3 = coordinator.w3
    owner, stranger = chain.accounts[2], chain.accounts[3]
    asker = QuestionAsker.deploy(w3, owner, coordinator.address)
    spec = spec_for(w3, tiny_r1_spec.model_id, callback=asker.address,
                    callback_gas_limit=CALLBACK_GAS)
    receipt = coordinator.post_request_send(spec, FEE, stranger)
    foreign = coordinator.events(receipt, "RequestPosted")[0]["requestId"]
    receipt = asker.ask_send(spec, FEE, owner)
    own = coordinator.events(receipt, "RequestPosted")[0]["requestId"]
    assert coordinator.get_request(foreign).consumer == stranger.address
    for request_id in (foreign, own):
        coordinator.commit_output_send(request_id, [5, 6, 2], provider)
    advance(w3, PARAMS.challenge_window)

    receipt = coordinator.finalize_send(foreign, chain.accounts[5])
    assert coordinator.events(receipt, "Finalized")[0]["callbackSucceeded"] is False
    assert not asker.answered(foreign) and asker.answer(foreign) == []
    receipt = coordinator.finalize_send(own, chain.accounts[5])
    assert coordinator.events(receipt, "Finalized")[0]["callbackSucceeded"] is True
    assert asker.answered(own) and asker.answer(own) == [5, 6, 2]
    # The refusal, as the callback's own dry run reports it.
    delivery = asker.contract.functions.onInferenceResult(foreign, stranger.address, [5, 6, 2])
    with pytest.raises(ContractRevert) as caught:
        reverts_decoded(asker.artifact, lambda: delivery.call({"from": coordinator.address}))
    assert caught.value.name == "NotOwnRequest"
    assert caught.value.args_decoded == (foreign, stranger.address.lower())


# ----------------------------------------------------------------------------- wiring (point 8)


def test_set_dispute_game_rejects_non_game_point8(chain, isolated, registry_address,
                                                  tiny_r1_spec):
    """The coordinator takes as its game only a contract that names it as its coordinator, and
    refuses commitments until one is set (a claim nobody can dispute would finalize anyway)."""
    deployer, consumer = chain.accounts[0], chain.accounts[2]
    ModelRegistry(isolated, registry_address).register_send(tiny_r1_spec, deployer)
    coordinator = InferenceCoordinator.deploy(isolated, deployer, registry_address, PARAMS)
    other = InferenceCoordinator.deploy(isolated, deployer, registry_address, PARAMS)
    coordinator.register_provider_send(PARAMS.minimum_stake, chain.accounts[1])
    request_id = post(coordinator, chain, spec_for(isolated, tiny_r1_spec.model_id))
    expect_revert(lambda: coordinator.commit_output_send(request_id, [2], chain.accounts[1]),
                  "DisputeGameNotSet()")

    not_games = {
        "an account": chain.accounts[4].address,
        "a contract without coordinator()": registry_address,
        "another coordinator's game": deploy(isolated, "MockDisputeGame", deployer,
                                             other.address),
        "a contract naming another coordinator": deploy(isolated, "ForeignDisputeGame",
                                                        deployer, other.address),
    }
    for address in not_games.values():
        err = expect_revert(lambda a=address: coordinator.set_dispute_game_send(a, deployer),
                            "DisputeGameNotForThisCoordinator(address)")
        assert err.args_decoded == (address.lower(),)
    assert coordinator.parameter("disputeGame") == ZERO_ADDRESS
    game = deploy(isolated, "MockDisputeGame", deployer, coordinator.address)
    coordinator.set_dispute_game_send(game, deployer)
    assert coordinator.parameter("disputeGame") == game
    coordinator.commit_output_send(request_id, [2], chain.accounts[1])
    assert coordinator.get_request(request_id).status is Status.COMMITTED
    assert coordinator.get_request(request_id).consumer == consumer.address


def test_open_disputes_cannot_overflow_point8(chain, coordinator, game, provider, tiny_r1_spec):
    """openDisputes was a uint16: 65 535 games by a griefer and the next honest challenge
    reverted on overflow. It is a uint64 in a slot of its own now (2**64 challenges of 100k+
    gas each cannot fit a window). Set the count to 65 535 directly and open one more."""
    w3 = coordinator.w3
    request_id = committed_request(coordinator, chain, provider, tiny_r1_spec)
    (outputs,) = [e["outputs"] for e in coordinator.artifact.abi
                  if e.get("name") == "getRequest"]
    types = {c["name"]: c["type"] for c in outputs[0]["components"]}
    assert types["openDisputes"] == "uint64"
    _game_send(coordinator, game, "openDispute", request_id, signer=chain.accounts[5])
    # Request storage: mapping `_requests` at slot 4, openDisputes alone in the struct's slot 6.
    base = int.from_bytes(keccak(request_id.to_bytes(32, "big") + (4).to_bytes(32, "big")),
                          "big")
    slot = hex(base + 6)
    assert int.from_bytes(w3.eth.get_storage_at(coordinator.address, slot), "big") == 1
    near_old_max = "0x" + (2**16 - 1).to_bytes(32, "big").hex()
    w3.provider.make_request("anvil_setStorageAt", [coordinator.address, slot, near_old_max])
    assert coordinator.get_request(request_id).open_disputes == 2**16 - 1
    _game_send(coordinator, game, "openDispute", request_id, signer=chain.accounts[5])
    assert coordinator.get_request(request_id).open_disputes == 2**16
    _game_send(coordinator, game, "resolveDispute", request_id, True, chain.accounts[4].address,
               0, signer=chain.accounts[5])
    assert coordinator.get_request(request_id).open_disputes == 2**16 - 1
    # The rest of the request is untouched by the count.
    request = coordinator.get_request(request_id)
    assert (request.status, request.fee, request.provider) == (Status.COMMITTED, FEE,
                                                               provider.address)


def test_max_callback_gas_limit_bounded_point8(chain, isolated, registry_address, tiny_r1_spec):
    """maxCallbackGasLimit is bounded so that finalize, with the largest callback limit and the
    longest output a claim can hold (6143 tokens), fits EIP-7825's 2**24 gas per transaction.
    Deployed at the bound, such a finalize goes through with gas = 2**24 exactly."""
    deployer = chain.accounts[0]
    cap = MAX_CALLBACK_GAS_LIMIT
    err = expect_revert(
        lambda: InferenceCoordinator.deploy(isolated, deployer, registry_address,
                                            replace(PARAMS, max_callback_gas_limit=cap + 1)),
        "MaxCallbackGasLimitAboveCap(uint256,uint256)")
    assert err.args_decoded == (cap + 1, cap)
    coordinator = InferenceCoordinator.deploy(isolated, deployer, registry_address,
                                              replace(PARAMS, max_callback_gas_limit=cap))
    assert coordinator.parameter("MAX_CALLBACK_GAS_LIMIT") == cap
    assert coordinator.parameter("TX_GAS_CAP") == TX_GAS_CAP
    game = deploy(isolated, "MockDisputeGame", deployer, coordinator.address)
    coordinator.set_dispute_game_send(game, deployer)
    # A model whose context takes the longest output a claim can store.
    longest = 6143
    spec = replace(tiny_r1_spec, max_context=longest)
    ModelRegistry(isolated, registry_address).register_send(spec, deployer)
    coordinator.register_provider_send(PARAMS.minimum_stake, chain.accounts[1])
    burner = deploy(isolated, "GasBurningConsumer", chain.accounts[2])
    request = replace(spec_for(isolated, spec.model_id, callback=burner, callback_gas_limit=cap),
                      prompt=[1], max_tokens=longest)
    request_id = post(coordinator, chain, request)
    coordinator.commit_output_send(request_id, [5] * longest, chain.accounts[1])
    advance(isolated, PARAMS.challenge_window)
    finalizer = chain.accounts[5]
    finalize = {**coordinator.finalize_tx(request_id), "gas": TX_GAS_CAP}
    receipt = TxSender(isolated, finalizer).send(finalize, coordinator.artifact)
    (finalized,) = coordinator.events(receipt, "Finalized")
    assert finalized["callbackSucceeded"] is False  # the burner used its whole limit
    used = receipt["gasUsed"]
    print({"finalize gas at the cap": used, "outside the callback": used - cap})
    assert used <= TX_GAS_CAP
    # What finalize spends besides the callback's limit (1.52M measured: reading 6143 tokens
    # back and encoding the call) is inside what the bound keeps for it.
    assert used - cap < 2_000_000


# ----------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"stake_per_claim": 0}, "ZeroStakePerClaim()"),
        ({"challenge_window": 0}, "ZeroChallengeWindow()"),
        ({"challenger_share_bps": 7001}, "SlashSharesExceedWhole(uint256)"),
    ],
)
def test_constructor_badParameters_reverts(chain, isolated, registry_address, changes, error):
    params = replace(PARAMS, **changes)
    expect_revert(
        lambda: InferenceCoordinator.deploy(isolated, chain.accounts[0], registry_address, params),
        error,
    )
