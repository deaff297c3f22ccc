"""Fixtures for the watchtower tests: a real anvil, the whole protocol deployed on it, tiny-r1
registered, a provider driven from the test (honest or lying), the real Postgres and Redis,
and watchtower workers started as subprocesses.

Accounts: 0 deploys, 1 is the provider, 2 the watchtower (the challenger's development
account), 3 the consumer.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import redis
from web3 import Web3

from optinfer.contracts.coordinator import InferenceCoordinator, RequestSpec
from optinfer.contracts.dispute_game import DisputeGame
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.models.runtime import IntegerModel
from optinfer.prover import game as spec
from optinfer.prover.game import ModelTrace, Phase, Role
from optinfer.services.deployments import DEMO_COORDINATOR_PARAMS, DeployParams, deploy_all
from optinfer.services.provider import claimed_output
from tests.lies import changed
from tests.services.conftest import drop_schema, postgres_schema_url

ETHER = 10**18
FEE = ETHER // 100
BOND = ETHER // 10
PROVIDER_STAKE = 150 * ETHER  # 0.5 ETH locked per claim: room for the 200-claim burst
REDIS_URL = os.environ.get("OPTINFER_TEST_REDIS", "redis://127.0.0.1:6379")
REPO = Path(__file__).resolve().parents[2]
INTEGER_DIR = REPO / "models" / "tiny-r1" / "integer"  # (tiny_r1 itself imports torch)
VENV_BIN = Path(sys.executable).parent

# Prompts tiny-r1 answers ("a+b="), each answer ending in EOS well inside MAX_TOKENS.
PROMPT_TEXTS = ["12+34=", "5+7=", "23+19=", "40+2=", "8+8=", "31+11=", "9+90=", "66+3="]
MAX_TOKENS = 40


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch, tmp_path: Path) -> None:
    """Settings come from each test alone: no OPTINFER_* from the shell, state under tmp."""
    for name in list(os.environ):
        if name.startswith("OPTINFER_") and name not in ("OPTINFER_ANVIL",
                                                          "OPTINFER_TEST_POSTGRES",
                                                          "OPTINFER_TEST_REDIS"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OPTINFER_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def chain():
    from optinfer.contracts.localchain import start_anvil

    with start_anvil() as running:
        yield running


@pytest.fixture(scope="session")
def w3(chain) -> Web3:
    from optinfer.services.chain import connect

    return connect(chain.url)


@functools.cache
def tiny() -> IntegerModel:
    return IntegerModel(INTEGER_DIR)


@functools.cache
def honest_answer(prompt_text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt tokens, tiny-r1's greedy answer) for `prompt_text`."""
    model = tiny()
    prompt = model.encode(prompt_text)
    return tuple(prompt), tuple(model.generate(prompt, MAX_TOKENS))


def chain_time(w3: Web3) -> int:
    return w3.eth.get_block("latest")["timestamp"]


def advance(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


# ------------------------------------------------------------------------------ the stack


@dataclass
class Stack:
    """The protocol deployed afresh, with its deployments file, and the test's accounts."""

    w3: Web3
    accounts: tuple
    deployments_file: Path
    coordinator: InferenceCoordinator
    game: DisputeGame
    model_id: bytes
    clock_seconds: int

    @property
    def provider(self):
        return self.accounts[1]

    @property
    def watchtower(self):
        return self.accounts[2]

    @property
    def consumer(self):
        return self.accounts[3]

    def post(self, prompt: list[int], max_tokens: int = MAX_TOKENS) -> int:
        spec_ = RequestSpec(model_id=self.model_id, prompt=list(prompt), max_tokens=max_tokens,
                            commit_deadline=chain_time(self.w3) + 3600)
        receipt = self.coordinator.post_request_send(spec_, FEE, self.consumer)
        return self.coordinator.events(receipt, "RequestPosted")[0]["requestId"]

    def claim(self, prompt: list[int], output: list[int]) -> int:
        """The consumer asks `prompt`; the provider commits `output`. The request id."""
        request_id = self.post(prompt)
        self.coordinator.commit_output_send(request_id, list(output), self.provider)
        return request_id

    def games_of(self, request_id: int) -> list[int]:
        logs = self.game.contract.events.GameOpened.get_logs(
            argument_filters={"requestId": request_id}, from_block=0)
        return [entry["args"]["gameId"] for entry in logs]

    def watchtower_reward(self) -> int:
        """The watchtower's credits: slash share on the coordinator, bonds on the game."""
        address = self.watchtower.address
        return self.coordinator.balance_of(address) + self.game.balance_of(address)


def deploy_stack(chain, w3: Web3, directory: Path, clock_seconds: int = 3600) -> Stack:
    deployer = chain.accounts[0]
    params = DeployParams(coordinator=replace(DEMO_COORDINATOR_PARAMS, challenge_window=3600),
                          game_clock_seconds=clock_seconds, challenger_bond=BOND)
    deployments = deploy_all(w3, deployer, params)
    path = directory / "deployments.json"
    deployments.write(path)
    registry = ModelRegistry(w3, deployments.address("ModelRegistry"))
    model_spec = ModelSpec.from_manifest(INTEGER_DIR / "manifest.json",
                                         manifest_uri="optinfer:tiny-r1")
    registry.register_send(model_spec, deployer)
    coordinator = InferenceCoordinator(w3, deployments.address("InferenceCoordinator"))
    coordinator.register_provider_send(PROVIDER_STAKE, chain.accounts[1])
    return Stack(w3, chain.accounts, path, coordinator,
                 DisputeGame(w3, deployments.address("DisputeGame")), model_spec.model_id,
                 clock_seconds)


@pytest.fixture
def stack(chain, w3, tmp_path) -> Stack:
    return deploy_stack(chain, w3, tmp_path)


# ------------------------------------------------------------------------- the provider


@dataclass(frozen=True)
class Lie:
    """A false claim: the tokens committed and the trace the provider defends them with."""

    prompt: list[int]
    claimed: list[int]
    trace: ModelTrace
    k: int  # the first node where the provider's trace departs from the honest one


def lie(kind: str, prompt_text: str = "12+34=", seed: int = 0) -> Lie:
    """A lying provider's claim: `final` changes only the last token before EOS, as the
    provider's lie knob does (the trace is honest up to the last node); `node` also changes
    one element of a random node's tensor."""
    prompt, answer = honest_answer(prompt_text)
    model = tiny()
    claimed = claimed_output(list(answer), "last-token", model.vocab_size, model.eos_ids)
    honest = ModelTrace.from_model(tiny(), list(prompt), claimed)
    liar = honest.with_output(honest.node_count, np.asarray(claimed, np.int64))
    k = honest.node_count
    if kind == "node":
        rng = np.random.default_rng(seed)
        k = int(rng.integers(1, honest.node_count))
        while honest.tensor(k).size == 0:
            k += 1
        element = int(rng.integers(0, honest.tensor(k).size))
        liar = liar.with_output(k, changed(honest.tensor(k), element))
    return Lie(list(prompt), claimed, liar, k)


def defend(stack: Stack, game_id: int, trace: ModelTrace, *, done: Callable[[], bool] = None,
           silent_after: int | None = None, timeout: float = 150.0) -> spec.GameState:
    """Play the provider's side of `game_id` with `trace` until the game is resolved (or
    `done()`); with `silent_after`, stop moving after that many moves and wait."""
    deadline = time.monotonic() + timeout
    moves = 0
    while time.monotonic() < deadline:
        state = stack.game.state(game_id).state
        if state.phase is Phase.RESOLVED or (done is not None and done()):
            return state
        if state.to_move is Role.PROVIDER and (silent_after is None or moves < silent_after):
            moves += len(stack.game.play_turn(game_id, trace, Role.PROVIDER, stack.provider))
        else:
            time.sleep(0.1)
    raise AssertionError(f"game {game_id} not over after {timeout}s: {state.phase}")


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ----------------------------------------------------------------- Postgres, Redis, workers


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema on the real Postgres (dropped afterwards)."""
    import sqlalchemy as sa

    from tests.services.conftest import POSTGRES_URL

    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    schema, url = postgres_schema_url(admin)
    try:
        yield url
    finally:
        drop_schema(admin, schema)
        admin.dispose()


@pytest.fixture
def broker() -> Iterator[tuple[str, str]]:
    """(broker URL, queue name) on the real Redis: a database number and a queue of this
    test's own, emptied afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    database = 1 + os.getpid() % 15
    queue = f"optinfer-test-{uuid.uuid4().hex[:10]}"
    url = f"{REDIS_URL}/{database}"
    yield url, queue
    scoped = redis.Redis.from_url(url)
    for key in scoped.scan_iter(f"*{queue}*"):
        scoped.delete(key)


def worker_env(stack: Stack, database_url: str, broker: tuple[str, str], state_dir: Path,
               **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTINFER_")
           or k in ("OPTINFER_ANVIL", "OPTINFER_TOOLS_DIR")}
    env.update({
        "OPTINFER_RPC_URL": stack.w3.provider.endpoint_uri,
        "OPTINFER_DEPLOYMENTS": str(stack.deployments_file),
        "OPTINFER_DATABASE_URL": database_url,
        "OPTINFER_BROKER_URL": broker[0],
        "OPTINFER_CELERY_QUEUE": broker[1],
        "OPTINFER_STATE_DIR": str(state_dir),
        "OPTINFER_POLL_INTERVAL": "0.3",
        "OPTINFER_GAME_LEASE": "3",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


class Workers:
    """Watchtower processes started by a test; each in its own process group, so that
    kill -9 reaches the worker and every process it started."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.processes: list[subprocess.Popen] = []

    def start(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        log = (self.directory / f"{name}.log").open("ab")
        process = subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        process.log_path = self.directory / f"{name}.log"
        self.processes.append(process)
        return process

    def celery(self, env: dict[str, str], name: str, *, beat: bool = True,
               concurrency: int = 2) -> subprocess.Popen:
        """`celery -A optinfer.challenger.app worker` (threads pool, embedded beat), after
        `optinfer db upgrade` as the compose file's migrate job runs it: a worker's tasks
        build their watchtower on the schema as they find it."""
        subprocess.run([str(VENV_BIN / "optinfer"), "db", "upgrade"], env=env, cwd=REPO,
                       check=True, capture_output=True, timeout=120)
        args = [str(VENV_BIN / "celery"), "-A", "optinfer.challenger.app", "worker",
                "--pool", "threads", "--concurrency", str(concurrency), "--loglevel", "INFO",
                "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if beat:
            args += ["--beat", "--schedule", str(self.directory / f"{name}-beat")]
        return self.start(args, env, name)

    def beat(self, env: dict[str, str], name: str) -> subprocess.Popen:
        """`celery -A optinfer.challenger.app beat` on its own, as docker-compose runs it."""
        return self.start([str(VENV_BIN / "celery"), "-A", "optinfer.challenger.app", "beat",
                           "--loglevel", "INFO"], env, name)

    def kill(self, process: subprocess.Popen) -> None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.args[:3]} ---\n" + p.log_path.read_text(errors="replace")[-4000:]
                         for p in self.processes)


@pytest.fixture
def workers(tmp_path) -> Iterator[Workers]:
    started = Workers(tmp_path)
    yield started
    started.stop_all()
