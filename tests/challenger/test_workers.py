"""Watchtower workers as real processes (`celery -A optinfer.challenger.app worker`, and
`optinfer challenger run`) on the real Redis broker and the real Postgres, against anvil:
racing workers, a worker killed with kill -9 mid-game, a burst of honest claims."""

from __future__ import annotations

import re
import socket
import sys
import urllib.request

import psutil
import pytest
import sqlalchemy as sa
from celery import Celery

from optinfer.challenger import tasks
from optinfer.challenger.bench import commit_claims, honest_answers
from optinfer.prover.game import Role
from optinfer.services import store as st
from tests.challenger.conftest import (
    BOND,
    DEMO_COORDINATOR_PARAMS,
    VENV_BIN,
    Stack,
    defend,
    deploy_stack,
    lie,
    tiny,
    wait_for,
    worker_env,
)

SLASH_SHARE = (DEMO_COORDINATOR_PARAMS.stake_per_claim
               * DEMO_COORDINATOR_PARAMS.challenger_share_bps // 10_000)

pytestmark = pytest.mark.xdist_group("watchtower_workers")


class Database:
    """Reads of the watchtower's Postgres schema, from the test."""

    def __init__(self, url: str):
        self.engine = sa.create_engine(url)

    def verdicts(self) -> dict[int, str | None]:
        try:
            with self.engine.connect() as conn:
                return dict(conn.execute(
                    sa.select(st.claims.c.request_id, st.claims.c.verdict)).all())
        except sa.exc.ProgrammingError:  # the worker has not created the tables yet
            return {}

    def moves(self, game_id: int) -> list[st.MoveRecord]:
        with self.engine.connect() as conn:
            return st.game_moves(conn, game_id, Role.CHALLENGER)

    def challenges(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(st.challenges)).scalar()


@pytest.fixture
def database(postgres_url):
    db = Database(postgres_url)
    yield db
    db.engine.dispose()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client(broker) -> Celery:
    """A Celery client that sends to the workers' queue (not the app of this process)."""
    return Celery("test-client", broker=broker[0],
                  task_default_queue=broker[1], broker_connection_retry_on_startup=True)


def game_of(stack: Stack, request_id: int, timeout: float = 60) -> int:
    (game_id,) = wait_for(lambda: stack.games_of(request_id), timeout, "the challenge")
    return game_id


def assert_no_repeated_transaction(stack: Stack, game_id: int, nonce_before: int,
                                   moves) -> None:
    """Every transaction the watchtower sent was the challenge or a move the game accepted:
    nothing was sent twice (the moves on chain are counted from the game's events). The
    moves recorded with a transaction name mined, successful ones, at distinct positions."""
    w3 = stack.w3
    events = stack.game.contract.events
    answered = [len(getattr(events, name).get_logs(argument_filters={"gameId": game_id},
                                                   from_block=0))
                for name in ("MidAnswered", "ChildPicked", "ElementNamed")]
    on_chain = sum(answered) + 1  # the one-step or the timeout claim, which ended the game
    assert w3.eth.get_transaction_count(stack.watchtower.address) == nonce_before + 1 + on_chain
    assert len({move.seq for move in moves}) == len(moves)
    sent = [move for move in moves if move.tx_hash is not None]
    assert len(sent) >= on_chain - 1  # at most the one killed between send and note
    for move in sent:
        assert w3.eth.get_transaction_receipt(move.tx_hash)["status"] == 1, move


def test_two_workers_racing_open_one_dispute_and_never_send_a_move_twice(
        stack, postgres_url, broker, workers, database, tmp_path):
    """Two workers, each with its own beat (so every scan happens twice), and the test keeps
    sending extra verify and play tasks for the same claim and game: one game is opened, and
    no move goes out twice."""
    env = worker_env(stack, postgres_url, broker, tmp_path / "state")
    for name in ("a", "b"):
        workers.celery(env, name)
    nonce_before = stack.w3.eth.get_transaction_count(stack.watchtower.address)
    reward_before = stack.watchtower_reward()
    liar = lie("node", seed=5)
    request_id = stack.claim(liar.prompt, liar.claimed)
    sender = client(broker)
    for _ in range(4):
        sender.send_task(tasks.VERIFY, args=[request_id])
    game_id = game_of(stack, request_id)
    extra_plays = 0

    def race() -> bool:
        nonlocal extra_plays
        if extra_plays < 60:
            sender.send_task(tasks.PLAY, args=[game_id])
            extra_plays += 1
        return False

    try:
        state = defend(stack, game_id, liar.trace, done=race)
        state = defend(stack, game_id, liar.trace)
    except AssertionError:
        print(workers.logs(), file=sys.stderr)
        raise
    assert state.winner is Role.CHALLENGER and state.k == liar.k
    assert stack.games_of(request_id) == [game_id]
    # No worker died: every move is noted with its block (the last one just after it mined).
    moves = wait_for(lambda: (m := database.moves(game_id)) and all(
        move.block_number for move in m) and m, 10, "every move's block")
    assert_no_repeated_transaction(stack, game_id, nonce_before, moves)
    assert stack.watchtower_reward() == reward_before + BOND + SLASH_SHARE


def test_a_worker_killed_mid_game_is_replaced_and_the_game_is_won_in_time(
        chain, w3, postgres_url, broker, workers, database, tmp_path):
    """`optinfer challenger run` plays a false claim's game; kill -9 takes it down (worker,
    beat and all) after a few moves; a fresh `celery ... worker` finds the game in the
    database and on chain and wins it with time to spare on a 10-minute clock."""
    stack = deploy_stack(chain, w3, tmp_path, clock_seconds=600)
    env = worker_env(stack, postgres_url, broker, tmp_path / "state")
    nonce_before = w3.eth.get_transaction_count(stack.watchtower.address)
    port = free_port()
    first = workers.start([str(VENV_BIN / "optinfer"), "challenger", "run", "--concurrency",
                           "2", "--metrics-port", str(port)], env, "first")
    liar = lie("node", seed=11)
    request_id = stack.claim(liar.prompt, liar.claimed)
    game_id = game_of(stack, request_id)
    try:
        defend(stack, game_id, liar.trace, done=lambda: len(database.moves(game_id)) >= 3)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        # Its beat is a thread of the worker's process (issue 20, point 8): Celery's `--beat`
        # child outlived a worker killed with -9 and sent scans beside the next one's beat.
        assert psutil.Process(first.pid).children(recursive=True) == []
        workers.kill(first)
        killed_after = len(database.moves(game_id))
        workers.celery(env, "second")
        state = defend(stack, game_id, liar.trace)
    except AssertionError:
        print(workers.logs(), file=sys.stderr)
        raise
    assert killed_after >= 3
    metrics = scraped.decode()
    assert 'optinfer_watchtower_disputes{status="open"} 1.0' in metrics
    assert f'optinfer_watchtower_bond_at_risk_wei {float(BOND)}' in metrics
    assert 'optinfer_watchtower_claims_verified_total{verdict="invalid"} 1.0' in metrics
    assert f'optinfer_watchtower_clock_seconds{{game="{game_id}",party="provider"}}' in metrics
    # At least one: a verification slower than VERIFY_REQUEUE_LEASES leases of 3 s (the
    # first, which loads the model, on a loaded machine) is queued again and may run twice;
    # the verdict counter above still counts the claim once.
    verifications = re.search(r"^optinfer_watchtower_verification_seconds_count (\S+)$",
                              metrics, re.MULTILINE)
    assert verifications is not None and float(verifications.group(1)) >= 1
    assert state.winner is Role.CHALLENGER and state.reason == "one-step"
    assert state.clock.challenger_seconds > 0
    moves = database.moves(game_id)
    assert len(moves) > killed_after
    assert_no_repeated_transaction(stack, game_id, nonce_before, moves)


def test_a_burst_of_200_honest_claims_is_all_verified_and_nothing_disputed(
        stack, postgres_url, broker, workers, database, tmp_path):
    """Claims committed as fast as the chain takes them, to a worker fed by a beat of its own
    (docker-compose's layout): every one verified valid, no challenge."""
    env = worker_env(stack, postgres_url, broker, tmp_path / "state")
    workers.celery(env, "burst", beat=False, concurrency=2)
    workers.beat(env, "beat")
    answers = honest_answers(tiny(), ["12+34=", "5+7=", "23+19=", "40+2="])
    ids = commit_claims(stack.w3, stack.coordinator, stack.model_id, stack.consumer,
                        stack.provider, answers, 200)
    try:
        verdicts = wait_for(
            lambda: (v := database.verdicts()) and len(v) == 200 and all(v.values()) and v,
            120, "200 verdicts", every=0.5)
    except AssertionError:
        print(workers.logs(), file=sys.stderr)
        raise
    assert sorted(verdicts) == ids
    assert set(verdicts.values()) == {"valid"}
    assert database.challenges() == 0
    assert all(stack.games_of(request_id) == [] for request_id in ids[:5] + ids[-5:])
