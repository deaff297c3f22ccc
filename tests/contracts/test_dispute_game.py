"""DisputeGame on a real anvil with the real tiny-r1 model: the contract against its executable
spec (`prover.game.apply`), honest and dishonest players through whole games, clocks, bonds
and the coordinator's slashing.

Accounts: 0 deploys, 1 is the provider, 2 the consumer, 4 and 5 challengers, 6 a bystander.
Every game is played by `prover.game.decide` on the state the binding reads back from the
chain; lies are the honest trace with one tensor changed (`ModelTrace.with_output`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hexbytes import HexBytes

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import (
    InferenceCoordinator,
    RequestSpec,
    Status,
)
from optinfer.contracts.dispute_game import DisputeGame
from optinfer.contracts.sender import TxSender
from optinfer.prover import commitments
from optinfer.prover import game as spec
from optinfer.prover.game import ModelTrace, Phase, Role
from tests.contracts.tiny_chain import (
    FEE,
    GAME,
    PARAMS,
    PROMPT,
    Stack,
    advance,
    chain_now,
    honest_policy,
    play,
    verifier_address,
)
from tests.lies import changed

pytestmark = pytest.mark.xdist_group("tiny_r1_chain")


def _lie_at_last_token(honest: ModelTrace, output: list[int]) -> tuple[ModelTrace, list[int]]:
    claimed = list(output)
    claimed[-1] = (claimed[-1] + 1) % 20
    tensor = np.asarray(claimed, dtype=np.int64)
    return honest.with_output(honest.node_count, tensor), claimed


# ----------------------------------------------------------------------------- the mirror


def test_the_contract_and_the_spec_agree_move_by_move(stack):
    """A lying provider against an honest challenger up to the one-step: after every move the
    state read back from the chain is exactly what `prover.game.apply` computes from the
    previous one. Each move's transaction (`DisputeGame.move_tx`, encoded by eth_abi alone)
    carries web3's encoding of the same call, the one-step's too."""
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
        (action,) = spec.decide(state, trace, role, chain_now(stack.w3))
        _assert_encoded_as_web3_does(stack.game, game_id, action, state)
        receipt = stack.game.submit(game_id, action, signer, state)
        mined_at = stack.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
        expected = spec.apply(state, action, role, mined_at)
        state = stack.game.state(game_id).state
        assert state == expected, f"after {action!r}"
        moves += 1
    assert state.k == stack.honest.node_count  # the lie is in the last node only
    assert state.rounds <= spec.max_rounds(stack.honest.node_count, 1 << 20)
    assert moves > 2 * 9  # ten bisection rounds over 898 nodes, then descent and chunk
    (one_step,) = spec.decide(state, stack.honest, state.to_move, chain_now(stack.w3))
    assert isinstance(one_step, spec.OneStep)
    _assert_encoded_as_web3_does(stack.game, game_id, one_step, state)
    _assert_encoded_as_web3_does(stack.game, game_id, spec.Timeout(), state)


def _assert_encoded_as_web3_does(game: DisputeGame, game_id: int, action: spec.Action,
                                 state: spec.GameState) -> None:
    tx = game.move_tx(game_id, action, state)
    name, args = game.move_args(game_id, action, state)
    assert tx == {"to": game.address, "value": 0,
                  "data": bytes(HexBytes(game.contract.encode_abi(name, args)))}, action


def test_a_game_is_read_in_one_log_query_per_bounded_block_range(stack, monkeypatch):
    """`DisputeGame.state` reads every event of a game with one eth_getLogs per
    LOG_BLOCK_RANGE blocks (hosted endpoints refuse unbounded ranges): a game opened more than
    one range ago reads in two queries, and a read one block at a time gives the same state."""
    from optinfer.contracts import dispute_game

    liar, claimed = _lie_at_last_token(stack.honest, stack.output)
    request_id = stack.claim(claimed)
    opened_at = stack.w3.eth.block_number
    game_id = stack.challenge(request_id, stack.accounts[4])
    players = {Role.PROVIDER: (liar, stack.provider),
               Role.CHALLENGER: (stack.honest, stack.accounts[4])}
    state = stack.game.state(game_id, opened_at).state
    for _ in range(4):  # the root, then bisection moves
        trace, signer = players[state.to_move]
        (action,) = spec.decide(state, trace, state.to_move, chain_now(stack.w3))
        stack.game.submit(game_id, action, signer, state)
        state = stack.game.state(game_id, opened_at).state
    queries = []
    real_get_logs = stack.w3.eth.get_logs
    monkeypatch.setattr(stack.w3.eth, "get_logs",
                        lambda params: queries.append(params) or real_get_logs(params))
    assert stack.game.state(game_id, opened_at).state == state
    assert len(queries) == 1 and len(queries[0]["topics"][0]) == len(dispute_game.GAME_EVENTS)
    with monkeypatch.context() as one_block:  # every block its own query: the same state
        one_block.setattr(dispute_game, "LOG_BLOCK_RANGE", 1)
        queries.clear()
        assert stack.game.state(game_id, opened_at).state == state
        assert len(queries) == stack.w3.eth.block_number - opened_at + 1
    # Past one range: the same state, read in two bounded queries.
    stack.w3.provider.make_request("anvil_mine", [hex(dispute_game.LOG_BLOCK_RANGE), "0x0"])
    queries.clear()
    assert stack.game.state(game_id, opened_at).state == state
    assert len(queries) == 2
    assert all(q["toBlock"] - q["fromBlock"] < dispute_game.LOG_BLOCK_RANGE for q in queries)


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


def test_a_challenge_needs_the_bond_and_the_prompt_and_opens_the_registered_roots(stack):
    request_id = stack.claim(stack.output)
    committed = stack.honest.committed
    challenger = stack.accounts[4]
    game = stack.game
    with pytest.raises(ContractRevert) as raised:
        game.challenge_send(request_id, PROMPT[:-1], challenger)
    assert raised.value.name == "PromptMismatch"
    with pytest.raises(ContractRevert) as raised:
        TxSender(stack.w3, challenger).send(game.challenge_tx(request_id, PROMPT, bond=1),
                                            game.artifact)
    assert raised.value.name == "WrongBond"
    # The game opens the roots the registry computed the model id from; nobody names them.
    opened = game.state(stack.challenge(request_id, challenger))
    assert (opened.nodes_root, opened.constants_root) == (committed.nodes_root,
                                                          committed.constants_root)
    assert opened.state.hi == committed.node_count
    advance(stack.w3, PARAMS.challenge_window)
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
    advance(stack.w3, GAME.clock_seconds)
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
    # The game's reward was locked from the provider's free stake and paid; the reserve (the
    # challenger share of the slash) stays locked until the claim is settled, then, owed to
    # nobody, goes back to the provider's free stake: the provider lost stakePerClaim.
    assert stack.game.locked_reward(game_id) == share
    stake, locked = stack.coordinator.provider_stake(stack.provider.address)
    assert (stake, locked) == (PARAMS.minimum_stake - PARAMS.stake_per_claim, share)
    stack.coordinator.settle_reserve_send(request_id, stack.accounts[6])
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
    advance(stack.w3, max(GAME.clock_seconds, PARAMS.challenge_window))
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


# ----------------------------------------------------------------------------- whole games

def _assert_provider_lost(stack: Stack, request_id: int, state: spec.GameState,
                          challenger) -> None:
    assert state.winner is Role.CHALLENGER
    assert stack.coordinator.get_request(request_id).status is Status.REJECTED
    share = PARAMS.stake_per_claim * PARAMS.challenger_share_bps // 10_000
    assert stack.coordinator.balance_of(challenger.address) == share
    assert stack.game.balance_of(challenger.address) == GAME.challenger_bond
    consumer_share = PARAMS.stake_per_claim * PARAMS.consumer_share_bps // 10_000
    assert stack.coordinator.balance_of(stack.consumer.address) == FEE + consumer_share


def _liar_game(stack: Stack, liar: ModelTrace, claimed: list[int]):
    request_id = stack.claim(claimed)
    challenger = stack.accounts[4]
    game_id = stack.challenge(request_id, challenger)
    state = play(stack, game_id,
                 {Role.PROVIDER: honest_policy(liar, Role.PROVIDER),
                  Role.CHALLENGER: honest_policy(stack.honest, Role.CHALLENGER)},
                 {Role.PROVIDER: stack.provider, Role.CHALLENGER: challenger})
    _assert_provider_lost(stack, request_id, state, challenger)
    assert state.reason == "one-step"
    return state


@pytest.mark.parametrize("seed", [1, 2])
def test_a_provider_lying_at_a_random_node_loses_through_the_one_step(stack, seed):
    """(a) A wrong answer whose trace first departs from the honest one at a random node:
    the bisection lands on that node and the on-chain one-step convicts it."""
    rng = np.random.default_rng(seed)
    honest, n = stack.honest, stack.honest.node_count
    k = int(rng.integers(1, n))
    while honest.tensor(k).size == 0:
        k += 1
    element = int(rng.integers(0, honest.tensor(k).size))
    liar, claimed = _lie_at_last_token(honest, stack.output)
    liar = liar.with_output(k, changed(honest.tensor(k), element))
    state = _liar_game(stack, liar, claimed)
    assert (state.k, state.element) == (k, element)


def test_a_provider_lying_only_in_the_final_tokens_loses(stack):
    """(b) The trace is honest but the committed tokens are not: the dispute lands on node N."""
    liar, claimed = _lie_at_last_token(stack.honest, stack.output)
    state = _liar_game(stack, liar, claimed)
    assert state.k == stack.honest.node_count


def test_a_provider_lying_in_one_element_of_the_largest_tensor_loses(stack):
    """(c) One element of the largest tensor of the trace: two descent steps find it."""
    honest = stack.honest
    k = max(range(1, honest.node_count + 1), key=lambda j: honest.tensor(j).nbytes)
    element = honest.tensor(k).size - 3
    liar, claimed = _lie_at_last_token(honest, stack.output)
    liar = liar.with_output(k, changed(honest.tensor(k), element, 7))
    state = _liar_game(stack, liar, claimed)
    assert (state.k, state.element) == (k, element)
    assert len(state.descent) == spec.descent_rounds(honest.tensor(k).nbytes)


@pytest.mark.parametrize("misbehaviour", ["wrong_child", "forged_witness", "wrong_trace"])
def test_a_dishonest_challenger_loses_its_bond_and_the_honest_claim_finalizes(stack,
                                                                             misbehaviour):
    """A challenger disputing an honest claim: picking a child whose hashes agree, forging the
    one-step witness (reverts, so it runs out of time) or playing a corrupted trace: it loses
    its bond to the provider, and the claim finalizes after the window."""
    honest = stack.honest
    request_id = stack.claim(stack.output)
    challenger = stack.accounts[5]
    game_id = stack.challenge(request_id, challenger)
    k = honest.node_count // 3
    corrupted = honest.with_output(k, changed(honest.tensor(k), 0))

    def challenger_policy(state, now):
        if misbehaviour == "wrong_trace":
            return spec.decide(state, corrupted, Role.CHALLENGER, now)
        if state.phase is Phase.BISECTION:
            return [spec.Disagree(state.mid)]  # disputes every honest midpoint
        if misbehaviour == "wrong_child" and state.phase is Phase.DESCENT:
            return [spec.PickChild(0)]
        if state.phase is Phase.ONE_STEP and state.element is None:
            first, _ = spec.chunk_elements(state)
            return [spec.NameElement(first)]
        if state.phase is Phase.ONE_STEP:
            witness = spec.challenger_witness(state, honest)
            if misbehaviour == "forged_witness":  # the top sibling of the description's path
                path = (*witness.description_path[:-1], bytes(32))
                return [spec.OneStep(dataclasses.replace(witness, description_path=path))]
            return [spec.OneStep(witness)]
        return spec.decide(state, honest, Role.CHALLENGER, now)

    state = play(stack, game_id,
                 {Role.PROVIDER: honest_policy(honest, Role.PROVIDER), Role.CHALLENGER:
                  challenger_policy},
                 {Role.PROVIDER: stack.provider, Role.CHALLENGER: challenger})
    assert state.winner is Role.PROVIDER
    assert state.reason == ("timeout" if misbehaviour == "forged_witness" else "one-step")
    assert stack.game.balance_of(stack.provider.address) == GAME.challenger_bond
    assert stack.game.balance_of(challenger.address) == 0
    advance(stack.w3, PARAMS.challenge_window)
    stack.coordinator.finalize_send(request_id, stack.accounts[6])
    assert stack.coordinator.get_request(request_id).status is Status.FINALIZED


def test_a_colluding_challenger_that_concedes_cannot_save_a_false_claim(stack):
    """Two games on one false claim: the provider's accomplice opens one and lets it time out;
    the honest challenger's game still convicts the provider, and the claim never finalizes."""
    liar, claimed = _lie_at_last_token(stack.honest, stack.output)
    request_id = stack.claim(claimed)
    accomplice, watchtower = stack.accounts[5], stack.accounts[4]
    colluding = stack.challenge(request_id, accomplice)
    honest_game = stack.challenge(request_id, watchtower)
    signers = {Role.PROVIDER: stack.provider}
    # The accomplice never moves after the root: the provider wins that game on time.
    stack.game.play_turn(colluding, liar, Role.PROVIDER, stack.provider)
    state = play(stack, colluding, {Role.PROVIDER: honest_policy(liar, Role.PROVIDER),
                                     Role.CHALLENGER: lambda state, now: []},
                 {**signers, Role.CHALLENGER: accomplice})
    assert state.winner is Role.PROVIDER
    with pytest.raises(ContractRevert) as raised:
        stack.coordinator.finalize_send(request_id, stack.accounts[6])
    assert raised.value.name == "DisputesOpen"
    policies = {Role.PROVIDER: honest_policy(liar, Role.PROVIDER),
                Role.CHALLENGER: honest_policy(stack.honest, Role.CHALLENGER)}
    state = play(stack, honest_game, policies, {**signers, Role.CHALLENGER: watchtower})
    _assert_provider_lost(stack, request_id, state, watchtower)
    with pytest.raises(ContractRevert) as raised:
        stack.coordinator.finalize_send(request_id, stack.accounts[6])
    assert raised.value.name == "ClaimNotCommitted"


def test_an_honest_claim_through_the_example_consumer_finalizes_with_its_callback(stack):
    """The whole honest path with the real game deployed: QuestionAsker asks, the provider
    commits tiny-r1's answer, nobody disputes, the window passes, anyone finalizes: the
    provider is paid and the answer is stored by the callback."""
    from optinfer.contracts.coordinator import QuestionAsker

    asker = QuestionAsker.deploy(stack.w3, stack.consumer, stack.coordinator.address)
    request = RequestSpec(model_id=stack.model_id, prompt=PROMPT, max_tokens=len(stack.output),
                          commit_deadline=chain_now(stack.w3) + 600, callback_gas_limit=200_000)
    receipt = asker.ask_send(request, FEE, stack.consumer)
    request_id = stack.coordinator.events(receipt, "RequestPosted")[0]["requestId"]
    stack.coordinator.commit_output_send(request_id, stack.output, stack.provider)
    advance(stack.w3, PARAMS.challenge_window)
    stack.coordinator.finalize_send(request_id, stack.accounts[6])
    assert asker.answered(request_id) and asker.answer(request_id) == stack.output
    assert stack.coordinator.balance_of(stack.provider.address) == FEE
    assert stack.coordinator.provider_stake(stack.provider.address) == (PARAMS.minimum_stake, 0)
    assert stack.game.parameter("gameCount") == 0


# ----------------------------------------------------------------------------- rewards (issue 17)


@pytest.mark.parametrize("honest_game_ends", ["first", "last"])
def test_rewards_each_winner_paid_through_the_game_whatever_order_point6(stack,
                                                                        honest_game_ends):
    """The liar's accomplice and the honest watchtower both challenge; the liar stalls in both
    and the games end by timeout in either order. Each game locked the reward from the
    provider's free stake at its challenge, and each winner gets its bond and that reward: the
    accomplice's game ending first takes nothing from the watchtower's."""
    liar, claimed = _lie_at_last_token(stack.honest, stack.output)
    request_id = stack.claim(claimed)
    accomplice, watchtower = stack.accounts[5], stack.accounts[4]
    reward = PARAMS.challenger_reward
    games = {accomplice: stack.challenge(request_id, accomplice),
             watchtower: stack.challenge(request_id, watchtower)}
    assert [stack.game.locked_reward(g) for g in games.values()] == [reward, reward]
    advance(stack.w3, GAME.clock_seconds)
    order = [watchtower, accomplice] if honest_game_ends == "first" else [accomplice, watchtower]
    for who in order:
        stack.game.submit(games[who], spec.Timeout(), stack.accounts[6])
        assert stack.game.state(games[who]).state.winner is Role.CHALLENGER
    for who in (accomplice, watchtower):
        assert stack.game.balance_of(who.address) == GAME.challenger_bond
        assert stack.coordinator.balance_of(who.address) == reward
    assert stack.coordinator.get_request(request_id).status is Status.REJECTED
    stack.coordinator.settle_reserve_send(request_id, stack.accounts[6])
    stake, locked = stack.coordinator.provider_stake(stack.provider.address)
    assert locked == 0
    # Net of what its accomplice hands back, the liar lost exactly stakePerClaim.
    assert PARAMS.minimum_stake - stake - reward == PARAMS.stake_per_claim


def test_a_challenge_with_no_free_stake_behind_it_opens_and_is_paid_from_the_reserve_point6(
    stack
):
    """A provider whose stake is all locked by its claims cannot make a challenge revert (or
    its winner go unpaid): the game locks nothing, and the claim's reserve pays the winner the
    whole reward once the claim is settled."""
    liar, claimed = _lie_at_last_token(stack.honest, stack.output)
    stack.claim(stack.output)  # locks the provider's other 0.5 ether
    request_id = stack.claim(claimed)
    assert stack.coordinator.free_stake(stack.provider.address) == 0
    watchtower = stack.accounts[4]
    game_id = stack.challenge(request_id, watchtower)
    assert stack.game.locked_reward(game_id) == 0
    advance(stack.w3, GAME.clock_seconds)
    stack.game.submit(game_id, spec.Timeout(), stack.accounts[6])
    assert stack.coordinator.balance_of(watchtower.address) == 0
    assert stack.coordinator.shortfall_of(request_id, watchtower.address) == (
        PARAMS.challenger_reward)
    stack.coordinator.claim_reserve_share_send(request_id, watchtower.address, watchtower)
    assert stack.coordinator.balance_of(watchtower.address) == PARAMS.challenger_reward
    assert stack.game.balance_of(watchtower.address) == GAME.challenger_bond


def test_zero_challenger_bond_reverts_point8(chain, isolated, registry_address):
    """A zero bond made challenges free to open and worthless to lose."""
    deployer = chain.accounts[0]
    coordinator = InferenceCoordinator.deploy(isolated, deployer, registry_address, PARAMS)
    verifier = verifier_address(isolated, deployer, registry_address)
    with pytest.raises(ContractRevert) as raised:
        DisputeGame.deploy(isolated, deployer, coordinator.address, verifier,
                           dataclasses.replace(GAME, challenger_bond=0))
    assert raised.value.name == "ZeroChallengerBond"
    game = DisputeGame.deploy(isolated, deployer, coordinator.address, verifier,
                              dataclasses.replace(GAME, challenger_bond=1))
    assert game.parameter("challengerBond") == 1


def test_withdraw_collects_reserve_shares_and_settles_the_liars_reserves_point6(stack):
    """What the reserve owes is collected by the nodes' own `withdraw`, not left for an
    operator to find: the watchtower's share is claimed and paid out with its bond, and the
    slashed provider's reserve is settled (the part no winner is owed unlocked)."""
    from optinfer.services.deployments import Deployments
    from optinfer.services.payouts import collect_reserves, withdraw

    deployments = Deployments(chain_id=stack.w3.eth.chain_id, block_number=0, contracts={
        "InferenceCoordinator": stack.coordinator.address, "DisputeGame": stack.game.address})
    liar, claimed = _lie_at_last_token(stack.honest, stack.output)
    stack.claim(stack.output)  # all of the provider's stake locked: the game locks nothing
    request_id = stack.claim(claimed)
    watchtower = stack.accounts[4]
    game_id = stack.challenge(request_id, watchtower)
    advance(stack.w3, PARAMS.challenge_window)
    # The window is closed but the game is open: nothing can be collected yet.
    assert collect_reserves(stack.w3, deployments, watchtower) == {"claimed": [], "settled": []}
    advance(stack.w3, GAME.clock_seconds)
    stack.game.submit(game_id, spec.Timeout(), stack.accounts[6])
    before = stack.w3.eth.get_balance(watchtower.address)
    withdrawn = withdraw(stack.w3, deployments, watchtower)
    assert withdrawn == {"InferenceCoordinator": PARAMS.challenger_reward,
                         "DisputeGame": GAME.challenger_bond}
    assert stack.w3.eth.get_balance(watchtower.address) > before
    assert stack.coordinator.shortfall_of(request_id, watchtower.address) == 0
    # The watchtower's claim settled the reserve; the provider has nothing left to settle.
    assert collect_reserves(stack.w3, deployments, stack.provider) == {"claimed": [],
                                                                        "settled": []}
    assert stack.coordinator.reserve(request_id).settled


def test_a_providers_withdraw_settles_a_reserve_no_winner_is_owed_point6(stack):
    """A lost game whose reward was fully locked leaves the claim's reserve owed to nobody:
    the provider's `collect_reserves` settles it and its stake is unlocked."""
    from optinfer.services.deployments import Deployments
    from optinfer.services.payouts import collect_reserves

    deployments = Deployments(chain_id=stack.w3.eth.chain_id, block_number=0, contracts={
        "InferenceCoordinator": stack.coordinator.address, "DisputeGame": stack.game.address})
    liar, claimed = _lie_at_last_token(stack.honest, stack.output)
    request_id = stack.claim(claimed)
    game_id = stack.challenge(request_id, stack.accounts[4])
    advance(stack.w3, max(GAME.clock_seconds, PARAMS.challenge_window))
    stack.game.submit(game_id, spec.Timeout(), stack.accounts[6])
    assert stack.coordinator.provider_stake(stack.provider.address)[1] > 0  # the reserve
    assert collect_reserves(stack.w3, deployments, stack.provider) == {
        "claimed": [], "settled": [request_id]}
    assert stack.coordinator.provider_stake(stack.provider.address)[1] == 0
