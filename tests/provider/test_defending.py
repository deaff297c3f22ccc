"""Defending: `optinfer provider run` plays its disputes on its own against a challenger
driven in the test process (prover.game.decide on the chain's state): it beats a dishonest
challenger even when killed -9 mid-game and restarted, and with the demonstration knob
`--lie last-token` it plays its lie to the end and loses."""

from __future__ import annotations

import json
import logging
import time

import pytest

from optinfer.contracts.coordinator import Status
from optinfer.prover import game as spec
from optinfer.prover.game import ModelTrace, Phase, Role
from optinfer.services import store as st
from optinfer.services.responder import move_summary
from optinfer.services.store import Store
from tests.lies import changed

from .conftest import MAX_TOKENS, PROMPT_TEXT, Protocol, ProviderProcess, optinfer

GAME_TIMEOUT_S = 150


def _open_game(protocol: Protocol, request_id: int, prompt: list[int], trace: ModelTrace,
               challenger) -> int:
    return protocol.game.challenge_send(request_id, prompt, challenger)


def _play_challenger(protocol: Protocol, game_id: int, trace: ModelTrace, challenger,
                     provider: ProviderProcess, restart=None) -> spec.GameState:
    """Answer every challenger turn with `decide` on `trace` until the game ends. When the
    provider process dies, `restart()` starts it again (once)."""
    deadline = time.monotonic() + GAME_TIMEOUT_S
    while time.monotonic() < deadline:
        block = protocol.w3.eth.block_number
        state = protocol.game.state(game_id).state
        if protocol.w3.eth.block_number != block:
            continue  # the provider moved while the game was read: read it again
        if state.phase is Phase.RESOLVED:
            return state
        if state.to_move is Role.CHALLENGER:
            for action in spec.decide(state, trace, Role.CHALLENGER, protocol.now()):
                protocol.game.submit(game_id, action, challenger, state)
            continue
        if provider.process.poll() is not None:
            assert restart is not None, f"the provider exited:\n{provider.log()}"
            provider, restart = restart(), None
        time.sleep(0.1)
    pytest.fail(f"the game did not end in {GAME_TIMEOUT_S} s:\n{provider.log()}")


def test_a_dishonest_challenger_loses_to_the_node_even_across_a_kill_9_mid_game(
        registered, sqlite_url, run_provider, model):
    """The node answers honestly; a challenger plays a corrupted trace against it. The node
    dies (SIGKILL) after recording its fourth move and before sending it; restarted, it reads
    the game back, sends that move once, wins on the one-step, and the bond is its to
    withdraw (`optinfer provider withdraw`)."""
    protocol = registered
    node = run_provider(protocol, sqlite_url, env={"OPTINFER_CRASH_AT": "before-move-4"})
    node.wait_for("serving model")
    prompt = model.encode(PROMPT_TEXT)
    request_id = protocol.post(prompt)
    node.wait_for(rf"served request {request_id}: ")
    output = protocol.coordinator.get_output(request_id)
    honest = ModelTrace.from_model(model, prompt, output)
    k = honest.node_count // 3
    corrupted = honest.with_output(k, changed(honest.tensor(k)))
    challenger = protocol.accounts[4]
    provider = protocol.provider.address
    nonce_before_game = protocol.w3.eth.get_transaction_count(provider)
    bond = protocol.game.parameter("challengerBond")
    game_id = _open_game(protocol, request_id, prompt, honest, challenger)

    restarted = []

    def restart() -> ProviderProcess:
        assert node.wait_exit() == -9
        restarted.append(run_provider(protocol, sqlite_url))
        return restarted[0]

    state = _play_challenger(protocol, game_id, corrupted, challenger, node, restart)
    assert restarted, "the node was never killed mid-game"
    assert (state.winner, state.reason, state.k) == (Role.PROVIDER, "one-step", k)
    assert protocol.game.balance_of(provider) == bond
    assert protocol.game.balance_of(challenger.address) == 0
    again = restarted[0]
    again.wait_for(rf"game {game_id} on request {request_id}: won \(one-step\)")
    assert again.stop() == 0

    store = Store(sqlite_url)
    with store.transaction() as conn:
        moves = st.game_moves(conn, game_id, Role.PROVIDER)
        game = st.get_game(conn, game_id, Role.PROVIDER)
    store.dispose()
    assert (game.status, game.k) == ("won", k)
    # One row per position (prover.game.move_position): a provider move every round.
    assert [move.seq for move in moves] == [2 * i for i in range(len(moves))]
    assert all(move.block_number is not None for move in moves), moves
    assert moves[0].kind == "PostRoot" and moves[-1].kind == "RevealChunk"
    # Every recorded move went out in exactly one transaction: none sent twice.
    assert protocol.w3.eth.get_transaction_count(provider) == nonce_before_game + len(moves)

    balance = protocol.w3.eth.get_balance(provider)
    withdrawn = optinfer("provider", "withdraw", "--json", env={
        "OPTINFER_RPC_URL": protocol.w3.provider.endpoint_uri,
        "OPTINFER_DEPLOYMENTS": str(protocol.file)})
    assert withdrawn.returncode == 0, withdrawn.stderr
    assert json.loads(withdrawn.stdout)["withdrawn_wei"] == {"InferenceCoordinator": 0,
                                                             "DisputeGame": bond}
    assert protocol.game.balance_of(provider) == 0
    assert protocol.w3.eth.get_balance(provider) > balance + bond * 99 // 100  # minus gas


def test_the_lie_knob_commits_a_wrong_last_token_plays_to_the_end_and_loses(
        registered, postgres_url, run_provider, model):
    """`--lie last-token`: the committed answer differs from the model's in its last token
    before EOS (the EOS stays: the coordinator refuses an unterminated answer); an honest
    challenger disputes it, the node defends its matching dishonest trace move by move down
    to the chunk, and the one-step convicts it: claim rejected, stake slashed."""
    protocol = registered
    node = run_provider(protocol, postgres_url, "--lie", "last-token")
    node.wait_for("serving model .*LYING at the last token")
    prompt = model.encode(PROMPT_TEXT)
    request_id = protocol.post(prompt)
    node.wait_for(rf"served request {request_id}: ")
    claimed = protocol.coordinator.get_output(request_id)
    answer = model.generate(prompt, MAX_TOKENS)
    assert answer[-1] in model.eos_ids and len(answer) < MAX_TOKENS
    assert claimed[:-2] == answer[:-2] and claimed[-2] != answer[-2]
    assert claimed[-1] == answer[-1] and claimed[-2] not in model.eos_ids

    honest = ModelTrace.from_model(model, prompt, claimed)  # what a watchtower recomputes
    challenger = protocol.accounts[4]
    game_id = _open_game(protocol, request_id, prompt, honest, challenger)
    state = _play_challenger(protocol, game_id, honest, challenger, node)
    assert (state.winner, state.reason, state.k) == (Role.CHALLENGER, "one-step",
                                                     honest.node_count)
    node.wait_for(rf"game {game_id} on request {request_id}: LOST \(one-step\)")
    assert protocol.coordinator.get_request(request_id).status is Status.REJECTED
    minimum = protocol.coordinator.parameter("minimumStake")
    slashed = protocol.coordinator.parameter("stakePerClaim")
    # The challenger's reward was locked from the free stake and paid; the claim's reserve
    # stays locked until the claim is settled (then back to the free stake: nobody is owed it).
    reserve = protocol.coordinator.parameter("challengerReward")
    assert protocol.coordinator.provider_stake(protocol.provider.address) == (
        minimum - slashed, reserve)
    assert node.stop() == 0

    store = Store(postgres_url)
    with store.transaction() as conn:
        game = st.get_game(conn, game_id, Role.PROVIDER)
        moves = st.game_moves(conn, game_id, Role.PROVIDER)
        request = st.get_request(conn, request_id)
        claim = st.get_claim(conn, request_id)
    store.dispose()
    assert game.status == "lost"
    # Node N holds the few output tokens: one leaf, no descent, then the chunk.
    assert [move.kind for move in moves][-2:] == ["RevealLeaf", "RevealChunk"]
    assert (request.status, claim.status) == ("rejected", "slashed")


def test_the_node_claims_the_timeout_of_a_silent_challenger_then_finalizes(registered,
                                                                          sqlite_url, model,
                                                                          caplog):
    """In-process, one poll at a time: a challenger opens a game and never moves after the
    first midpoint; once its clock has run out the node claims the timeout, wins the bond, and
    finalizes its claim. The trace is computed once, for the one move that needed it."""
    from .test_serving import _node

    protocol = registered
    node = _node(protocol, sqlite_url, model)
    node.ensure_provider_registered(None)
    prompt = model.encode(PROMPT_TEXT)
    request_id = protocol.post(prompt)
    with caplog.at_level(logging.INFO, logger="optinfer.provider"):
        assert [s.request_id for s in node.poll_once()] == [request_id]
        game_id = protocol.game.challenge_send(request_id, prompt, protocol.accounts[4])
        node.poll_once()  # records the game and posts S_N
        node.poll_once()  # the first S_mid
        node.poll_once()  # the challenger's move: nothing to do
        assert protocol.game.state(game_id).state.to_move is Role.CHALLENGER
        protocol.advance(protocol.game.parameter("clockSeconds") + 1)
        node.poll_once()  # Timeout
        node.poll_once()  # the game is over: recorded; the claim is finalized
    state = protocol.game.state(game_id).state
    assert (state.winner, state.reason) == (Role.PROVIDER, "timeout")
    assert protocol.game.balance_of(protocol.provider.address) == protocol.game.parameter(
        "challengerBond")
    assert protocol.coordinator.get_request(request_id).status is Status.FINALIZED
    nodes = sum(model.manifest["ops"].values())
    assert caplog.text.count(f"trace of {nodes} nodes computed") == 1
    assert f"game {game_id}: Timeout() at position 5 in tx" in caplog.text
    assert f"game {game_id} on request {request_id}: won (timeout)" in caplog.text
    with node.store.transaction() as conn:
        assert [m.kind for m in st.game_moves(conn, game_id, Role.PROVIDER)] == [
            "PostRoot", "PostMid", "Timeout"]
        assert st.get_game(conn, game_id, Role.PROVIDER).status == "won"
        assert st.get_request(conn, request_id).status == "finalized"
    node.store.dispose()


def test_in_several_games_the_node_moves_in_all_of_them_each_block(registered, sqlite_url,
                                                                   model):
    """Two disputes at once: the node sends its move in each before it waits for either, so
    on a chain with block times a provider in many games (a griefer's way to run its clocks
    down) still moves in every one of them each block."""
    from .test_serving import _in_process_node, one_block_for

    protocol, w3 = registered, registered.w3
    prompt = model.encode(PROMPT_TEXT)
    ids = [protocol.post(prompt, max_tokens=8) for _ in range(2)]
    node = _in_process_node(protocol, sqlite_url, model, stake=2 * 10**18)
    assert [s.request_id for s in node.serve_pending()] == ids
    games = [protocol.game.challenge_send(i, prompt, protocol.accounts[4]) for i in ids]
    node.watch()  # records both games
    before = w3.eth.block_number
    one_block_for(w3, node.defend, protocol.provider.address, 2)
    with node.store.transaction() as conn:
        moves = [st.game_moves(conn, game_id, Role.PROVIDER) for game_id in games]
    assert [[m.kind for m in game_moves] for game_moves in moves] == [["PostRoot"]] * 2
    assert {game_moves[0].block_number for game_moves in moves} == {before + 1}
    for game_id in games:
        assert protocol.game.state(game_id).state.rounds == 1  # the root, posted on chain
    node.store.dispose()


def test_the_journal_waits_for_a_pending_move_resends_a_lost_one_and_rewrites_a_stale_one(
        registered, sqlite_url, model):
    """The responder's journal on chain: a row left at the root's position for another move
    that never landed is rewritten and the root sent; a restarted node finds that root
    pending and waits for it (nothing sent twice); a row whose transaction the node never had
    is sent again."""
    from .test_serving import _blocks_on_demand, _in_process_node, _node

    protocol, w3 = registered, registered.w3
    provider = protocol.provider.address
    prompt = model.encode(PROMPT_TEXT)
    request_id = protocol.post(prompt, max_tokens=8)
    node = _in_process_node(protocol, sqlite_url, model, stake=None)
    assert [s.request_id for s in node.serve_pending()] == [request_id]
    game_id = protocol.game.challenge_send(request_id, prompt, protocol.accounts[4])
    node.watch()

    def leased(holder):
        with holder.store.transaction() as conn:
            return st.claim_game(conn, game_id, Role.PROVIDER, holder.worker, lease_seconds=60)

    def journal():
        with node.store.transaction() as conn:
            return st.game_moves(conn, game_id, Role.PROVIDER)

    with node.store.transaction() as conn:
        st.record_move(conn, st.MoveRecord(game_id, Role.PROVIDER, 0, Role.PROVIDER, "Timeout",
                                           {}, "0x" + "ab" * 32))
    with _blocks_on_demand(w3):
        root = node.responder.turn(leased(node), node.worker).sent
        assert isinstance(root.action, spec.PostRoot) and root.seq == 0
        (row,) = journal()
        assert (row.kind, row.tx_hash, row.block_number) == (
            "PostRoot", root.tx_hash.to_0x_hex(), None)
        sent = w3.eth.get_transaction_count(provider, "pending")
        restarted = _node(protocol, sqlite_url, model)
        again = restarted.responder.turn(leased(restarted), restarted.worker).sent
        assert (again.seq, again.tx_hash) == (0, root.tx_hash)
        assert w3.eth.get_transaction_count(provider, "pending") == sent
        w3.provider.make_request("evm_mine", [])
    block = restarted.responder.confirm(again)
    assert journal()[0].block_number == block

    record = leased(restarted)
    state = protocol.game.state(game_id).state
    (mid,) = spec.decide(state, restarted.responder.trace(record), Role.PROVIDER,
                         protocol.now())
    lost = "0x" + "cd" * 32  # signed, noted, never broadcast: the node does not know it
    with node.store.transaction() as conn:
        st.journal_move(conn, st.MoveRecord(game_id, Role.PROVIDER, 2, Role.PROVIDER,
                                            "PostMid", move_summary(mid)))
        st.set_move_transaction(conn, game_id, Role.PROVIDER, 2, lost)
    nonce = w3.eth.get_transaction_count(provider)
    resent = restarted.responder.turn(record, restarted.worker).sent
    assert resent.seq == 2 and resent.tx_hash.to_0x_hex() != lost
    restarted.responder.confirm(resent)
    assert w3.eth.get_transaction_count(provider) == nonce + 1
    assert [(m.seq, m.kind, m.tx_hash) for m in journal()] == [
        (0, "PostRoot", root.tx_hash.to_0x_hex()), (2, "PostMid", resent.tx_hash.to_0x_hex())]
    assert protocol.game.state(game_id).state.mid_root == mid.state_root
    for holder in (node, restarted):
        holder.store.dispose()
