"""The watchtower in eager mode, in one process with SQLite (how the demo runs it): Celery's
tasks run inline, `scan` verifies the new claims and plays a turn of every open game. Against
a real anvil and tiny-r1, with the provider driven from the test."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from optinfer.challenger import tasks
from optinfer.challenger.app import configure
from optinfer.challenger.policy import Verdict
from optinfer.challenger.watchtower import Watchtower
from optinfer.prover.game import Phase, Role
from optinfer.services import store as st
from optinfer.services.settings import load_settings
from tests.challenger.conftest import (
    BOND,
    DEMO_COORDINATOR_PARAMS,
    Stack,
    advance,
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
    instance = Watchtower(settings)
    tasks.use_watchtower(instance)
    yield instance
    tasks.use_watchtower(None)
    instance.close()


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
    assert {tasks.scan.name, tasks.verify.name, tasks.play.name} == {
        "optinfer.challenger.scan", "optinfer.challenger.verify", "optinfer.challenger.play"}


def test_honest_claims_are_verified_and_never_challenged(stack, watchtower):
    ids = [stack.claim(*map(list, honest_answer(text))) for text in ("12+34=", "5+7=")]
    assert tasks.scan.delay().get() == 2
    for request_id in ids:
        claim = claim_row(watchtower, request_id)
        assert claim.verdict == Verdict.VALID.value, claim.verdict_note
        assert stack.games_of(request_id) == []
    assert tasks.scan.delay().get() == 0  # nothing new, nothing verified twice


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
    other = type(other)(**{**other.__dict__, "model_root": bytes(31) + b"\x07"})
    registry = ModelRegistry(stack.w3, watchtower.deployments.address("ModelRegistry"))
    registry.register_send(other, stack.accounts[0])
    stack.model_id = other.model_root
    prompt, answer = honest_answer("12+34=")
    wrong = list(answer)
    wrong[-1] = (wrong[-1] + 1) % 20
    request_id = stack.claim(list(prompt), wrong)
    with caplog.at_level("WARNING", logger="optinfer.watchtower"):
        tasks.scan.delay()
    claim = claim_row(watchtower, request_id)
    assert claim.verdict == Verdict.UNVERIFIABLE.value
    assert "is not held here" in claim.verdict_note
    assert f"claim {request_id}" in caplog.text and "unverifiable" in caplog.text
    assert stack.games_of(request_id) == []


def test_a_truncated_answer_is_reported_as_unprovable_not_challenged(stack, watchtower):
    """Every token is the model's but the answer stops before EOS: the game could not
    convict it, so the watchtower says so instead of losing a bond."""
    prompt, answer = honest_answer("12+34=")
    request_id = stack.claim(list(prompt), list(answer[:-3]))
    tasks.scan.delay()
    claim = claim_row(watchtower, request_id)
    assert claim.verdict == Verdict.UNPROVABLE.value, claim.verdict_note
    assert stack.games_of(request_id) == []


def test_the_eager_loop_runs_until_stopped(stack, watchtower):
    request_id = stack.claim(*map(list, honest_answer("5+7=")))
    stop = threading.Event()
    loop = threading.Thread(target=tasks.run_eager, args=(stop,))
    loop.start()
    try:
        for _ in range(100):
            if claim_row(watchtower, request_id) is not None and \
                    claim_row(watchtower, request_id).verdict:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()
    assert claim_row(watchtower, request_id).verdict == Verdict.VALID.value
