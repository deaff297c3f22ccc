"""The fault suite's stack: everything real, every part a process the suite can kill.

* anvil, mining a block per transaction and one every second besides (as ``chain up`` runs
  it), dumping its state every `STATE_INTERVAL` seconds, so that kill -9 and a restart lose
  the blocks since the last dump, as a crashed node does;
* two :class:`RpcProxy` in front of it: the nodes' (``faulty``, which the suite makes drop,
  delay and refuse requests) and the suite's own (``clean``); both follow the chain node to
  its new port when it restarts;
* ``optinfer provider run`` twice, an honest provider and a lying one (``--lie last-token``,
  every answer's last token changed), and ``optinfer challenger run`` (eager mode), each with
  its own database: SQLite files, or a Postgres server of the suite's own
  (:class:`PostgresServer`), which it can restart under a running node;
* the suite is the consumer: it posts requests naming one provider or the other.

:func:`settle` brings every request to an end once the faults have healed (advancing the
chain's clock past the challenge window only when no game is open and the watchtower has
judged every claim: a jump during a game would time out whoever is to move), and
:func:`check_invariants` checks what must hold whatever happened: no false answer finalized,
every honest answer finalized, every fee accounted for, every node's database agreeing with
the chain.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import sqlalchemy as sa
from web3 import Web3

from optinfer.contracts.coordinator import InferenceCoordinator, RequestSpec, Status
from optinfer.contracts.dispute_game import DisputeGame
from optinfer.contracts.localchain import start_anvil
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.prover.game import Phase
from optinfer.services import store as st
from optinfer.services.chain import connect
from optinfer.services.deployments import DEMO_COORDINATOR_PARAMS, DeployParams, deploy_all
from optinfer.services.store import Store
from tests.challenger.conftest import (
    BOND,
    ETHER,
    FEE,
    INTEGER_DIR,
    MAX_TOKENS,
    PROMPT_TEXTS,
    REPO,
    VENV_BIN,
    honest_answer,
)

from .proxy import RpcProxy

STATE_INTERVAL = 2  # seconds between anvil's state dumps
CHALLENGE_WINDOW = 600
GAME_CLOCK = 3600
HONEST, LIAR, WATCHTOWER, CONSUMER = 1, 4, 2, 3  # dev account indices
NODE_STOP_SECONDS = 10.0
"""SIGTERM stops a node within this many seconds (issue 20: "within a few seconds")."""


# ----------------------------------------------------------------------------- the chain


class Anvil:
    """anvil behind the suite's proxies; killed with -9 and restarted from its state dump."""

    def __init__(self, directory: Path):
        self.state = directory / "anvil-state.json"
        self._running: contextlib.ExitStack | None = None
        self.chain = None
        self.start()

    def start(self) -> None:
        stack = contextlib.ExitStack()
        self.chain = stack.enter_context(start_anvil(
            block_time=1, extra_args=("--mixed-mining", "--state", str(self.state),
                                      "--state-interval", str(STATE_INTERVAL))))
        self._running = stack

    def kill(self) -> None:
        """kill -9: the blocks since the last state dump are lost."""
        os.killpg(self.chain.pid, signal.SIGKILL)
        self._running.close()

    def close(self) -> None:
        if self._running is not None:
            self._running.close()


# ------------------------------------------------------------------------------ Postgres


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """A Postgres cluster of the suite's own (initdb in a temporary folder, run as the
    `postgres` user), so that restarting it disturbs no other test."""

    def __init__(self):
        self.bin = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1])
        # Outside pytest's temporary folders, which only root may enter.
        self.home = Path(tempfile.mkdtemp(prefix="optinfer-faults-pg-"))
        self.home.chmod(0o755)
        self.data = self.home / "pgdata"
        self.port = _free_port()
        self.data.mkdir()
        shutil.chown(self.data, "postgres", "postgres")
        self._as_postgres(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres")
        self.start()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, args)], check=True,
                       capture_output=True, timeout=60)

    def start(self) -> None:
        self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-w", "-l", self.data / "log",
                          "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1",
                          "start")

    def restart(self) -> None:
        """An immediate stop (as a crash: no checkpoint) and a start."""
        self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-w", "-m", "immediate",
                          "stop")
        self.start()

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-w", "-m", "fast", "stop")
        shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------------------- the nodes


class Node:
    """One node process (`optinfer ARGS`), in its own process group, its output in a log."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path):
        self.name, self.args, self.env, self.log_path = name, args, env, log_path
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "optinfer"), *self.args], env=self.env, cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """kill -9 of the node and whatever it started (its generation process)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> tuple[int, float]:
        """SIGTERM, as a supervisor stops it: (exit status, seconds it took)."""
        started = time.monotonic()
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            status = self.process.returncode
        return status, time.monotonic() - started


# ----------------------------------------------------------------------------- the stack


@dataclass
class FaultStack:
    directory: Path
    anvil: Anvil
    faulty: RpcProxy
    clean: RpcProxy
    w3: Web3
    accounts: tuple
    deployments_file: Path
    coordinator: InferenceCoordinator
    game: DisputeGame
    model_id: bytes
    start_block: int
    databases: dict[str, str]
    nodes: dict[str, Node] = field(default_factory=dict)
    postgres: PostgresServer | None = None
    clock_moved_at: int | None = None  # the head when settle() last moved the clock

    # -- the chain -----------------------------------------------------------------------

    def restart_chain(self) -> None:
        """kill -9 anvil, then start it again from its last state dump (on a new port): the
        nodes meet refused connections meanwhile, then a chain that lost blocks."""
        self.anvil.kill()
        time.sleep(1.0)
        self.anvil.start()
        for proxy in (self.faulty, self.clean):
            proxy.upstream = self.anvil.chain.url

    def reorganise(self, depth: int) -> None:
        """Replace the last `depth` blocks with empty ones: their transactions leave the
        chain (commits, moves, posts, finalizations alike)."""
        answer = self.w3.provider.make_request("anvil_reorg", [depth, []])
        assert "error" not in answer, answer

    def now(self) -> int:
        return self.w3.eth.get_block("latest")["timestamp"]

    # -- the consumer --------------------------------------------------------------------

    def post(self, prompt_text: str, provider: int) -> int:
        prompt, _ = honest_answer(prompt_text)
        spec = RequestSpec(model_id=self.model_id, prompt=list(prompt), max_tokens=MAX_TOKENS,
                           commit_deadline=self.now() + 4 * CHALLENGE_WINDOW,
                           named_provider=self.accounts[provider].address)
        receipt = self.coordinator.post_request_send(spec, FEE, self.accounts[CONSUMER])
        return self.coordinator.events(receipt, "RequestPosted")[0]["requestId"]

    def post_many(self, count: int, provider: int, offset: int = 0) -> list[int]:
        return [self.post(PROMPT_TEXTS[(offset + i) % len(PROMPT_TEXTS)], provider)
                for i in range(count)]

    # -- what the chain holds --------------------------------------------------------------

    def requests(self) -> dict[int, dict]:
        """Every request on the chain now: id -> its RequestPosted arguments."""
        logs = self.coordinator.contract.events.RequestPosted.get_logs(
            from_block=self.start_block)
        return {entry["args"]["requestId"]: entry["args"] for entry in logs}

    def games(self) -> list[int]:
        logs = self.game.contract.events.GameOpened.get_logs(from_block=self.start_block)
        return [entry["args"]["gameId"] for entry in logs]

    def open_games(self) -> list[int]:
        return [game_id for game_id in self.games()
                if self.game.state(game_id).state.phase is not Phase.RESOLVED]

    # -- the nodes -----------------------------------------------------------------------

    def env(self, database: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTINFER_")
               or k in ("OPTINFER_ANVIL", "OPTINFER_TOOLS_DIR")}
        env.update({"OPTINFER_RPC_URL": self.faulty.url,
                    "OPTINFER_DEPLOYMENTS": str(self.deployments_file),
                    "OPTINFER_DATABASE_URL": database,
                    "OPTINFER_POLL_INTERVAL": "0.2", "OPTINFER_GAME_LEASE": "3",
                    "OPTINFER_RPC_ATTEMPTS": "6", "OPTINFER_RPC_BACKOFF": "0.2",
                    "PYTHONUNBUFFERED": "1"})
        env.update(extra)
        return env

    def start_node(self, name: str) -> Node:
        """Start (or start again) node `name`: ``honest``, ``liar`` or ``watchtower``."""
        key = {"honest": HONEST, "liar": LIAR}.get(name)
        if name == "watchtower":
            args = ["challenger", "run"]
            extra = {"OPTINFER_STATE_DIR": str(self.directory / "watchtower-state")}
        else:
            args = ["provider", "run", "--stake", str(20 * ETHER)]
            if name == "liar":
                args += ["--lie", "last-token"]
            extra = {"OPTINFER_PROVIDER_KEY": self.accounts[key].key.hex(),
                     "OPTINFER_STATE_DIR": str(self.directory / f"{name}-state")}
        node = self.nodes.get(name)
        if node is not None and node.running():
            raise AssertionError(f"{name} is already running")
        self.nodes[name] = Node(name, args, self.env(self.databases[name], **extra),
                                self.directory / f"{name}.log")
        return self.nodes[name]

    def wait_for_log(self, name: str, text: str, timeout: float = 90, after: int = 0) -> None:
        """Wait for `text` in node `name`'s log past its first `after` characters."""
        wait_until(lambda: text in self.nodes[name].log()[after:], timeout,
                   f"{text!r} in {name}'s log", on_timeout=lambda: self.nodes[name].log())

    def stop_all(self) -> dict[str, tuple[int, float]]:
        return {name: node.stop() for name, node in self.nodes.items()}

    def close(self) -> None:
        for node in self.nodes.values():
            if node.running():
                node.kill()
        self.faulty.close()
        self.clean.close()
        self.anvil.close()
        if self.postgres is not None:
            self.postgres.close()


def build_stack(directory: Path, *, postgres_for: tuple[str, ...] = (), seed: int = 0
                ) -> FaultStack:
    """Deploy the protocol on a fresh anvil, register tiny-r1 and the lying provider's
    stake, and give each node a database (Postgres of the suite's own for `postgres_for`,
    SQLite files otherwise). No node runs yet."""
    anvil = Anvil(directory)
    faulty, clean = RpcProxy(anvil.chain.url, seed), RpcProxy(anvil.chain.url)
    w3 = connect(clean.url)
    accounts = anvil.chain.accounts
    params = DeployParams(coordinator=replace(DEMO_COORDINATOR_PARAMS,
                                              challenge_window=CHALLENGE_WINDOW),
                          game_clock_seconds=GAME_CLOCK, challenger_bond=BOND)
    deployments = deploy_all(w3, accounts[0], params)
    deployments_file = directory / "deployments.json"
    deployments.write(deployments_file)
    model_spec = ModelSpec.from_manifest(INTEGER_DIR / "manifest.json",
                                         manifest_uri="optinfer:tiny-r1")
    ModelRegistry(w3, deployments.address("ModelRegistry")).register_send(model_spec,
                                                                           accounts[0])
    postgres = PostgresServer() if postgres_for else None
    databases = {}
    for name in ("honest", "liar", "watchtower"):
        if name in postgres_for:
            engine = sa.create_engine(postgres.url, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.execute(sa.text(f"CREATE DATABASE {name}"))
            engine.dispose()
            databases[name] = postgres.url.rsplit("/", 1)[0] + f"/{name}"
        else:
            databases[name] = f"sqlite:///{directory / f'{name}.db'}"
    return FaultStack(
        directory=directory, anvil=anvil, faulty=faulty, clean=clean, w3=w3,
        accounts=accounts, deployments_file=deployments_file,
        coordinator=InferenceCoordinator(w3, deployments.address("InferenceCoordinator")),
        game=DisputeGame(w3, deployments.address("DisputeGame")),
        model_id=model_spec.model_id, start_block=deployments.block_number,
        databases=databases, postgres=postgres)


# ------------------------------------------------------------------------ waiting, settling


def wait_until(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2,
               on_timeout: Callable[[], str] | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    detail = f"\n{on_timeout()[-6000:]}" if on_timeout is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")


SETTLED = (Status.FINALIZED, Status.REJECTED, Status.REFUNDED)


def _judged(stack: FaultStack, request_ids: list[int]) -> bool:
    """Whether the watchtower has judged the claims on `request_ids` that the chain holds now
    (its rows name the chain's commit transactions) and opened a game on each false one."""
    commits = {entry["args"]["requestId"]: "0x" + bytes(entry["transactionHash"]).hex()
               for entry in stack.coordinator.contract.events.OutputCommitted.get_logs(
                   from_block=stack.start_block)}
    disputed = {entry["args"]["requestId"] for entry in
                stack.game.contract.events.GameOpened.get_logs(from_block=stack.start_block)}
    store = Store(stack.databases["watchtower"])
    try:
        with store.transaction() as conn:
            claims = [st.get_claim(conn, request_id) for request_id in request_ids]
    except sa.exc.OperationalError:  # the database mid-restart, or not created yet
        return False
    finally:
        store.dispose()
    return all(claim is not None and claim.tx_hash == commits.get(claim.request_id)
               and claim.verdict is not None
               and (claim.verdict == "valid" or claim.request_id in disputed)
               for claim in claims)


def settle(stack: FaultStack, timeout: float = 240) -> dict[int, Status]:
    """Wait until every request on the chain is settled (the faults healed): each committed
    one judged by the watchtower and, when disputed, its game resolved; then the chain's clock
    is moved past the challenge windows (the chain's next interval block carries it) and the
    providers finalize. The final status of every request."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = {request_id: stack.coordinator.get_request(request_id).status
                    for request_id in stack.requests()}
        if all(status in SETTLED for status in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            for node in stack.nodes.values():  # every thread's stack, into its log
                if node.running():
                    node.process.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            logs = "\n".join(f"--- {name}\n{node.log()[-8000:]}"
                             for name, node in stack.nodes.items())
            raise AssertionError(f"not settled after {timeout} s: {statuses}\n{logs}")
        committed = [request_id for request_id, status in statuses.items()
                     if status is Status.COMMITTED]
        waiting_for_answers = any(status is Status.OPEN for status in statuses.values())
        if committed and not waiting_for_answers and not stack.open_games() \
                and _judged(stack, committed):
            stack.clock_moved_at = stack.w3.eth.block_number
            stack.w3.provider.make_request("evm_increaseTime", [CHALLENGE_WINDOW + 1])
            time.sleep(2.0)  # the next interval block carries the new time
        time.sleep(0.5)


def check_invariants(stack: FaultStack, statuses: dict[int, Status]) -> None:
    """What must hold once every request settled, whatever the faults were."""
    requests = stack.requests()
    honest, liar, consumer = (stack.accounts[i].address for i in (HONEST, LIAR, CONSUMER))
    finalized_by = {honest: 0, liar: 0}
    for request_id, args in requests.items():
        status = statuses[request_id]
        prompt, answer = honest_answer_for(args["prompt"])
        named = args["namedProvider"]
        if status is Status.FINALIZED:
            # No false answer finalizes.
            assert stack.coordinator.get_output(request_id) == list(answer), request_id
            finalized_by[stack.coordinator.get_request(request_id).provider] += 1
        # Every true answer finalizes; every lie is rejected.
        expected = Status.FINALIZED if named == honest else Status.REJECTED
        assert status is expected, (request_id, named, status)
    # No fee is lost: the honest provider holds a fee per answer it finalized, the liar none,
    # the consumer every refund the chain announced.
    assert stack.coordinator.balance_of(honest) == FEE * finalized_by[honest]
    assert stack.coordinator.balance_of(liar) == 0
    refunds = stack.coordinator.contract.events.Refunded.get_logs(from_block=stack.start_block)
    assert len({entry["args"]["requestId"] for entry in refunds}) == len(refunds)
    assert stack.coordinator.balance_of(consumer) == sum(e["args"]["amount"] for e in refunds)
    assert len(refunds) == sum(status is not Status.FINALIZED for status in statuses.values())


@functools.cache
def _answers_by_prompt() -> dict[tuple[int, ...], tuple[int, ...]]:
    return dict(honest_answer(text) for text in PROMPT_TEXTS)


def honest_answer_for(prompt) -> tuple[tuple[int, ...], tuple[int, ...]]:
    prompt = tuple(prompt)
    return prompt, _answers_by_prompt()[prompt]


ROW_STATUS = {Status.FINALIZED: "finalized", Status.REJECTED: "rejected",
              Status.REFUNDED: "refunded"}


def check_rows(stack: FaultStack, statuses: dict[int, Status], names: tuple[str, ...]
               ) -> None:
    """Every node's database agrees with the chain: each request the chain has is a row with
    the chain's status, and no row names a request the chain does not have."""
    for name in names:
        store = Store(stack.databases[name])
        try:
            with store.transaction() as conn:
                rows = {row.request_id: row.status
                        for row in conn.execute(sa.select(st.requests)).all()}
        finally:
            store.dispose()
        expected = {request_id: ROW_STATUS[status] for request_id, status in statuses.items()}
        assert rows == expected, (name, rows, expected)
