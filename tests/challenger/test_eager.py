"""The watchtower in eager mode, in one process with SQLite (how the demo runs it): Celery's
tasks run inline, `scan` verifies the new claims and plays a turn of every open game. Against
a real anvil and tiny-r1, with the provider driven from the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from optinfer.challenger import tasks
from optinfer.challenger.app import configure
from optinfer.challenger.policy import Verdict
from optinfer.challenger.watchtower import Watchtower
from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import RequestSpec
from optinfer.errors import UserError
from optinfer.prover.game import Phase, Role
from optinfer.services import store as st
from optinfer.services.settings import load_settings
from tests.challenger.conftest import (
    BOND,
    DEMO_COORDINATOR_PARAMS,
    FEE,
    MAX_TOKENS,
    Stack,
    advance,
    chain_time,
    honest_answer,
    lie,
)

SLASH_SHARE = (DEMO_COORDINATOR_PARAMS.stake_per_claim
               * DEMO_COORDINATOR_PARAMS.challenger_share_bps // 10_000)


@pytest.fixture
def watchtower(stack: Stack, tmp_path: Path):
    """An eager-mode watchtower on SQLite, used by the Celery tasks of this process."""
    settings = load_settings(rpc_url=stack.w3.provider.endpoint_uri,
                             deployments=stack.deployments_file,
                             database_url=f"sqlite:///{tmp_path / 'watchtower.db'}",
                             poll_interval=0.05, game_lease=5)
    assert settings.broker_url is None
    configure(settings)
    instance = Watchtower.start(settings)
    tasks.use_watchtower(instance)
    yield instance
    tasks.use_watchtower(None)
    instance.close()


def test_a_worker_child_refuses_a_database_not_yet_upgraded(stack: Stack, tmp_path: Path):
    """A Celery child builds its watchtower without migrating (`tasks.watchtower`): on an empty
    database it stops with the command that creates the schema; `Watchtower.start`, what
    `challenger run` does once, migrates first."""
    settings = load_settings(rpc_url=stack.w3.provider.endpoint_uri,
                             deployments=stack.deployments_file,
                             database_url=f"sqlite:///{tmp_path / 'fresh.db'}")
    with pytest.raises(UserError, match="run `optinfer db upgrade`"):
        Watchtower(settings)
    Watchtower.start(settings).close()
    Watchtower(settings).close()  # the schema is now there


def play_out(stack: Stack, game_id: int, trace, *, silent: bool = False, max_ticks=200):
    """Alternate the watchtower's scans (each plays one turn) and the provider's turns."""
    for _ in range(max_ticks):
        tasks.scan.delay()
        state = stack.game.state(game_id).state
        if state.phase is Phase.RESOLVED:
            return state
        if state.to_move is Role.PROVIDER:
            if silent:
                advance(stack.w3, stack.clock_seconds + 1)
            else:
                stack.game.play_turn(game_id, trace, Role.PROVIDER, stack.provider)
    raise AssertionError("the game did not end")


def metric(name: str, **labels: str) -> float:
    """A watchtower metric of this process (0 when it has no sample)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(f"optinfer_watchtower_{name}", labels) or 0.0


def claim_row(watchtower: Watchtower, request_id: int) -> st.ClaimRecord:
    with watchtower.store.transaction() as conn:
        return st.get_claim(conn, request_id)


def test_task_names_are_stable():
    # Queued messages name their task: renaming one strands every message in flight.
    assert {tasks.scan.name, tasks.verify.name, tasks.verify_many.name, tasks.play.name} == {
        "optinfer.challenger.scan", "optinfer.challenger.verify",
        "optinfer.challenger.verify_many", "optinfer.challenger.play"}


def test_honest_claims_are_verified_and_never_challenged(stack, watchtower):
    ids = [stack.claim(*map(list, honest_answer(text))) for text in ("12+34=", "5+7=")]
    assert tasks.scan.delay().get() == 2
    alone = stack.claim(*map(list, honest_answer("40+2=")))
    assert tasks.scan.delay().get() == 1  # a claim verified alone
    for request_id in [*ids, alone]:
        claim = claim_row(watchtower, request_id)
        assert claim.verdict == Verdict.VALID.value, claim.verdict_note
        assert stack.games_of(request_id) == []
    assert tasks.scan.delay().get() == 0  # nothing new, nothing verified twice
    # Predictions, shared or alone, run on the batch session: the watchtower holds two
    # copies of the weights (predictions, traces), not three.
    assert set(watchtower.model.model._sessions) == {"decode_batch", "trace"}


@pytest.mark.parametrize("kind", ["final", "node", "silent"])
def test_a_lying_provider_is_caught_disputed_and_loses(stack, watchtower, kind):
    """Lying in the final tokens only, at a random node, or lying and then going silent: the
    watchtower's verification catches the claim, its game convicts the provider (one-step, or
    timeout), and it is credited its bond back and its share of the slash."""
    liar = lie("node" if kind == "node" else "final", seed=3)
    before = stack.watchtower_reward()
    seen, invalid = metric("claims_seen_total"), metric("claims_verified_total",
                                                        verdict="invalid")
    request_id = stack.claim(liar.prompt, liar.claimed)
    tasks.scan.delay()
    claim = claim_row(watchtower, request_id)
    assert claim.verdict == Verdict.INVALID.value and "token" in claim.verdict_note
    (game_id,) = stack.games_of(request_id)
    assert (metric("claims_seen_total"), metric("claims_verified_total", verdict="invalid")) \
        == (seen + 1, invalid + 1)
    tasks.scan.delay()  # plays the first turn: the clocks are read
    assert metric("disputes", status="open") == 1
    assert metric("bond_at_risk_wei") == BOND
    assert 0 < metric("clock_seconds", game=str(game_id), party="challenger") \
        <= stack.clock_seconds
    state = play_out(stack, game_id, liar.trace, silent=kind == "silent")
    assert state.winner is Role.CHALLENGER
    assert state.reason == ("timeout" if kind == "silent" else "one-step")
    if kind != "silent":
        assert state.k == liar.k
    assert stack.watchtower_reward() == before + BOND + SLASH_SHARE
    with watchtower.store.transaction() as conn:
        game = st.get_game(conn, game_id, Role.CHALLENGER)
        moves = st.game_moves(conn, game_id, Role.CHALLENGER)
    assert game.status == "won"
    assert all(move.tx_hash is not None for move in moves)
    assert len({move.seq for move in moves}) == len(moves)
    tasks.scan.delay()
    assert (metric("disputes", status="open"), metric("disputes", status="won"),
            metric("bond_at_risk_wei")) == (0, 1, 0)
    assert metric("clock_seconds", game=str(game_id), party="challenger") == 0  # dropped


def test_a_claim_on_a_model_the_watchtower_does_not_hold_is_reported_not_challenged(
        stack, watchtower, caplog):
    from optinfer.contracts.registry import ModelRegistry, ModelSpec
    from tests.challenger.conftest import INTEGER_DIR

    other = ModelSpec.from_manifest(INTEGER_DIR / "manifest.json", manifest_uri="other")
    other = type(other)(**{**other.__dict__, "constants_root": bytes(31) + b"\x07"})
    registry = ModelRegistry(stack.w3, watchtower.deployments.address("ModelRegistry"))
    registry.register_send(other, stack.accounts[0])
    stack.model_id = other.model_id
    wrong = lie("final")  # a wrong answer, on a model this watchtower does not run
    request_id = stack.claim(wrong.prompt, wrong.claimed)
    with caplog.at_level("WARNING", logger="optinfer.watchtower"):
        tasks.scan.delay()
    claim = claim_row(watchtower, request_id)
    assert claim.verdict == Verdict.UNVERIFIABLE.value
    assert "is not held here" in claim.verdict_note
    assert f"claim {request_id}" in caplog.text and "unverifiable" in caplog.text
    assert stack.games_of(request_id) == []


def test_a_truncated_answer_cannot_be_committed_so_there_is_nothing_to_watch(stack,
                                                                             watchtower):
    """Every token is the model's but the answer stops before EOS: no game could convict it
    (the watchtower would have to call it unprovable), so the coordinator refuses the commit
    against the registered EOS ids, and the watchtower sees no claim."""
    prompt, answer = honest_answer("12+34=")
    request_id = stack.post(list(prompt))
    with pytest.raises(ContractRevert) as raised:
        stack.coordinator.commit_output_send(request_id, list(answer[:-3]), stack.provider)
    assert raised.value.name == "OutputNotTerminated"
    assert raised.value.args_decoded == (len(answer) - 3, MAX_TOKENS)
    tasks.scan.delay()
    with watchtower.store.transaction() as conn:
        assert st.get_claim(conn, request_id) is None


def test_challenger_run_without_a_broker_catches_a_silent_liar_and_withdraw_pays_out(
        stack, tmp_path):
    """`optinfer challenger run` with no broker is the whole watchtower in one process: it
    verifies an honest claim, challenges a false one whose provider then never answers, and
    claims the timeout; SIGTERM stops it cleanly, and `optinfer challenger withdraw` sends
    the bond back and the slash share to the watchtower's account."""
    import json
    import os
    import signal
    import subprocess

    from tests.challenger.conftest import REPO, VENV_BIN, wait_for

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTINFER_")}
    env.update(OPTINFER_RPC_URL=stack.w3.provider.endpoint_uri,
               OPTINFER_DEPLOYMENTS=str(stack.deployments_file),
               OPTINFER_DATABASE_URL=f"sqlite:///{tmp_path / 'run.db'}",
               OPTINFER_STATE_DIR=str(tmp_path / "state"), OPTINFER_POLL_INTERVAL="0.2")
    log = (tmp_path / "run.log").open("wb")
    process = subprocess.Popen([str(VENV_BIN / "optinfer"), "challenger", "run"], env=env,
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        honest = stack.claim(*map(list, honest_answer("40+2=")))
        liar = lie("final", "8+8=")
        false = stack.claim(liar.prompt, liar.claimed)
        (game_id,) = wait_for(lambda: stack.games_of(false), 60, "the challenge")
        advance(stack.w3, stack.clock_seconds + 1)
        wait_for(lambda: stack.game.state(game_id).state.phase is Phase.RESOLVED, 30,
                 "the timeout claim")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = (tmp_path / "run.log").read_text()
    assert f"claim {honest} by {stack.provider.address}: valid" in output
    assert f"claim {false} by {stack.provider.address}: FALSE" in output
    assert f"game {game_id} on request {false}: won (timeout)" in output
    assert "succeeded in" not in output  # no line per poll (Celery's task trace)
    assert stack.games_of(honest) == []
    state = stack.game.state(game_id).state
    assert (state.winner, state.reason) == (Role.CHALLENGER, "timeout")

    before = stack.w3.eth.get_balance(stack.watchtower.address)
    done = subprocess.run([str(VENV_BIN / "optinfer"), "challenger", "withdraw", "--json"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    withdrawn = json.loads(done.stdout)["withdrawn_wei"]
    assert withdrawn == {"InferenceCoordinator": SLASH_SHARE, "DisputeGame": BOND}
    assert stack.w3.eth.get_balance(stack.watchtower.address) > before + BOND  # less gas
    assert stack.watchtower_reward() == 0


@pytest.mark.parametrize("crash", ["before_sending", "after_sending"])
def test_a_challenge_cut_short_by_a_crash_is_finished_once(stack, watchtower, crash):
    """A worker died with the challenge row `sending` (before its transaction, or after it
    was mined but before the game was noted): once the lease has expired, the next scan
    finishes it, and the claim is challenged exactly once."""
    import sqlalchemy as sa

    liar = lie("final", "23+19=")
    request_id = stack.claim(liar.prompt, liar.claimed)
    address = watchtower.address
    if crash == "after_sending":
        tasks.scan.delay()
        (game_id,) = stack.games_of(request_id)
        with watchtower.store.transaction() as conn:  # what the dead worker never wrote
            conn.execute(sa.delete(st.games).where(st.games.c.game_id == game_id))
            conn.execute(sa.update(st.challenges).values(status="sending", game_id=None,
                                                         tx_hash=None))
    else:
        watchtower.scan()  # records the claim; the verdict and the row as the crash left them
        with watchtower.store.transaction() as conn:
            st.set_claim_verdict(conn, request_id, "invalid", "token 21 differs")
            conn.execute(sa.insert(st.challenges).values(request_id=request_id,
                                                         challenger=address, status="sending"))
        assert stack.games_of(request_id) == []
    with watchtower.store.transaction() as conn:
        conn.execute(sa.update(st.challenges).values(lease_owner="dead-worker:1:1",
                                                     lease_expires=0.0))
    tasks.scan.delay()
    games = stack.games_of(request_id)
    assert len(games) == 1
    with watchtower.store.transaction() as conn:
        row = st.get_challenge(conn, request_id, address)
        game = st.get_game(conn, games[0], Role.CHALLENGER)
    assert (row.status, row.game_id) == ("opened", games[0])
    assert game is not None and game.status == "open"
    tasks.scan.delay()  # and the game goes on: the provider owes S_N, nothing else to do
    assert stack.games_of(request_id) == games


def test_issue20_point1_a_lie_put_in_a_verified_claim_s_place_by_a_reorganisation_is_challenged(
        stack, watchtower, caplog):
    """The chain reorganises: the block holding an honest commit, already judged valid, is
    replaced by one where the provider's key commits a false answer to the same request. The
    watchtower notices that blocks it had read left the chain, reads the new commit, judges it
    afresh and challenges it; the game convicts the provider."""
    liar = lie("final")
    prompt, answer = map(list, honest_answer("12+34="))
    request_id = stack.post(prompt)
    fork = stack.w3.provider.make_request("evm_snapshot", [])["result"]
    stack.coordinator.commit_output_send(request_id, answer, stack.provider)
    assert tasks.scan.delay().get() == 1
    assert claim_row(watchtower, request_id).verdict == Verdict.VALID.value
    lost_height = stack.w3.eth.block_number

    stack.w3.provider.make_request("evm_revert", [fork])
    stack.coordinator.commit_output_send(request_id, liar.claimed, stack.provider)
    while stack.w3.eth.block_number <= lost_height:  # the new branch is the longer one
        stack.w3.provider.make_request("evm_mine", [])
    with caplog.at_level("WARNING", logger="optinfer.services.events"):
        tasks.scan.delay()
    assert "the chain lost blocks" in caplog.text
    claim = claim_row(watchtower, request_id)
    assert claim.output == liar.claimed
    assert claim.verdict == Verdict.INVALID.value, claim.verdict_note
    (game_id,) = stack.games_of(request_id)
    state = play_out(stack, game_id, liar.trace)
    assert (state.winner, state.reason) == (Role.CHALLENGER, "one-step")


def test_issue20_point1_a_claim_is_judged_only_once_confirmed_whoever_recorded_it(
        stack, tmp_path):
    """A provider sharing the watchtower's database records its claim at once; with
    `confirmations=3` the watchtower still leaves it unjudged until three blocks cover it."""
    settings = load_settings(rpc_url=stack.w3.provider.endpoint_uri,
                             deployments=stack.deployments_file,
                             database_url=f"sqlite:///{tmp_path / 'shared.db'}",
                             poll_interval=0.05, game_lease=5, confirmations=3)
    configure(settings)
    instance = Watchtower.start(settings)
    tasks.use_watchtower(instance)
    try:
        from optinfer.services.events import chain_event, claim_record, request_record

        prompt, answer = map(list, honest_answer("5+7="))
        spec_ = RequestSpec(model_id=stack.model_id, prompt=prompt, max_tokens=MAX_TOKENS,
                            commit_deadline=chain_time(stack.w3) + 3600)
        posted = stack.coordinator.post_request_send(spec_, FEE, stack.consumer)
        (request,) = stack.coordinator.receipt_events(posted, "RequestPosted")
        request_id = request["args"]["requestId"]
        committed = stack.coordinator.commit_output_send(request_id, answer, stack.provider)
        (claim,) = stack.coordinator.receipt_events(committed, "OutputCommitted")
        with instance.store.transaction() as conn:  # as the provider node records them
            st.upsert_request(conn, request_record(chain_event(request)))
            st.record_claim(conn, claim_record(chain_event(claim)))
        tasks.scan.delay()
        assert claim_row(instance, request_id).verdict is None
        for _ in range(3):
            stack.w3.provider.make_request("evm_mine", [])
        tasks.scan.delay()
        assert claim_row(instance, request_id).verdict == Verdict.VALID.value
    finally:
        tasks.use_watchtower(None)
        instance.close()


def test_issue20_point6_a_watchtower_s_database_shows_what_the_chain_says_became_of_requests(
        stack, watchtower):
    """A database only the watchtower fills showed a slashed claim's request as `open`: its
    cursor follows the coordinator's outcomes too, so the rows (and the API reading them) say
    rejected and slashed, finalized, and refunded, as the chain does."""
    liar = lie("final")
    false = stack.claim(liar.prompt, liar.claimed)
    prompt, answer = map(list, honest_answer("5+7="))
    honest = stack.claim(prompt, answer)
    unanswered = stack.post(prompt)
    tasks.scan.delay()
    (game_id,) = stack.games_of(false)
    assert play_out(stack, game_id, liar.trace).winner is Role.CHALLENGER
    advance(stack.w3, 3601)  # past the challenge window and the commit deadline
    stack.coordinator.finalize_send(honest, stack.consumer)
    stack.coordinator.refund_send(unanswered, stack.consumer)
    tasks.scan.delay()
    with watchtower.store.transaction() as conn:
        rows = {request_id: (st.get_request(conn, request_id).status,
                             getattr(st.get_claim(conn, request_id), "status", None))
                for request_id in (false, honest, unanswered)}
    assert rows == {false: ("rejected", "slashed"), honest: ("finalized", "finalized"),
                    unanswered: ("refunded", None)}
