"""Fixtures for the provider node's tests: a real anvil with the whole protocol deployed (inside
a snapshot per test), the real Postgres or a SQLite file, tiny-r1, and the node run as a user
runs it (`optinfer provider run` in a subprocess) or in-process one step at a time.

Accounts: 0 deploys, 1 is the provider, 3 the consumer, 4 a challenger, 5 another provider.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from web3 import Web3

from optinfer.contracts.coordinator import InferenceCoordinator, RequestSpec
from optinfer.contracts.dispute_game import DisputeGame
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import INTEGER_DIR
from optinfer.services.deployments import Deployments, deploy_all
from tests.services.conftest import drop_schema, postgres_schema_url

ETHER = 10**18
FEE = ETHER // 100
OPTINFER = str(Path(sys.executable).parent / "optinfer")
PROMPT_TEXT = "12+34="
MAX_TOKENS = 40


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch, tmp_path: Path) -> None:
    """Settings come from each test alone: no OPTINFER_* from the shell, state under tmp."""
    for name in list(os.environ):
        if name.startswith("OPTINFER_") and name not in ("OPTINFER_ANVIL",
                                                          "OPTINFER_TEST_POSTGRES"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OPTINFER_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def chain():
    from optinfer.contracts.localchain import start_anvil

    with start_anvil() as running:
        yield running


@pytest.fixture
def w3(chain) -> Iterator[Web3]:
    """The session chain, every state change of the test reverted afterwards."""
    from optinfer.services.chain import connect

    client = connect(chain.url)
    snapshot = client.provider.make_request("evm_snapshot", [])["result"]
    yield client
    assert client.provider.make_request("evm_revert", [snapshot])["result"] is True


@pytest.fixture(scope="session")
def model() -> IntegerModel:
    return IntegerModel(INTEGER_DIR)


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return ModelSpec.from_manifest(INTEGER_DIR / "manifest.json", manifest_uri="optinfer:tiny-r1")


@dataclasses.dataclass
class Protocol:
    """The deployed contracts, their deployments file and the accounts that use them."""

    w3: Web3
    accounts: tuple
    deployments: Deployments
    file: Path
    coordinator: InferenceCoordinator
    registry: ModelRegistry
    game: DisputeGame
    model_id: bytes

    @property
    def provider(self):
        return self.accounts[1]

    @property
    def consumer(self):
        return self.accounts[3]

    def now(self) -> int:
        return self.w3.eth.get_block("latest")["timestamp"]

    def advance(self, seconds: int) -> None:
        self.w3.provider.make_request("evm_increaseTime", [seconds])
        self.w3.provider.make_request("evm_mine", [])

    def post(self, prompt: list[int], max_tokens: int = MAX_TOKENS, *,
             model_id: bytes | None = None, named_provider: str | None = None,
             deadline_in: int = 600) -> int:
        """Post a request from the consumer; its id."""
        spec = RequestSpec(model_id=model_id or self.model_id, prompt=prompt,
                           max_tokens=max_tokens, commit_deadline=self.now() + deadline_in,
                           **({"named_provider": named_provider} if named_provider else {}))
        receipt = self.coordinator.post_request_send(spec, FEE, self.consumer)
        return self.coordinator.events(receipt, "RequestPosted")[0]["requestId"]


@pytest.fixture
def protocol(chain, w3, tmp_path, tiny_spec) -> Protocol:
    """Every contract deployed inside this test's snapshot; tiny-r1 NOT registered (the node's
    --register does it, or `registered`)."""
    deployments = deploy_all(w3, chain.accounts[0])
    file = tmp_path / "deployments.json"
    deployments.write(file)
    return Protocol(w3, chain.accounts, deployments, file,
                    InferenceCoordinator(w3, deployments.address("InferenceCoordinator")),
                    ModelRegistry(w3, deployments.address("ModelRegistry")),
                    DisputeGame(w3, deployments.address("DisputeGame")), tiny_spec.model_id)


@pytest.fixture
def registered(protocol: Protocol, tiny_spec) -> Protocol:
    """`protocol` with tiny-r1 registered by the deployer."""
    protocol.registry.register_send(tiny_spec, protocol.accounts[0])
    return protocol


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'provider.db'}"


@pytest.fixture
def postgres_url(request) -> Iterator[str]:
    admin = request.getfixturevalue("postgres_admin")
    schema, url = postgres_schema_url(admin)
    try:
        yield url
    finally:
        drop_schema(admin, schema)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(scope="session")
def postgres_admin():
    import sqlalchemy as sa

    from tests.services.conftest import POSTGRES_URL

    engine = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


# ---------------------------------------------------------------------- the node, as run


class ProviderProcess:
    """`optinfer provider run` in the background; its stderr (the node's log) in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.log_path = log_path
        self.log_file = log_path.open("a")
        self.process = subprocess.Popen([OPTINFER, "provider", "run", *args], env=env,
                                        stdout=self.log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60, *, count: int = 1) -> re.Match:
        """The `count`-th match of `pattern` in the log, once it appears; fails on timeout or
        when the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matches = list(re.finditer(pattern, self.log()))
            if len(matches) >= count:
                return matches[count - 1]
            if self.process.poll() is not None:
                pytest.fail(f"the provider exited ({self.process.returncode}) before logging "
                            f"{pattern!r}:\n{self.log()}")
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} in the provider's log after {timeout} s:\n{self.log()}")

    def wait_exit(self, timeout: float = 60) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> int:
        """SIGTERM, as a supervisor stops it; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.log_file.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log_file.close()


@pytest.fixture
def run_provider(chain, tmp_path) -> Iterator[Callable[..., ProviderProcess]]:
    """Start `optinfer provider run ARGS` on the chain with a deployments file and database;
    `env` adds variables. Every process still running at the end is killed."""
    started: list[ProviderProcess] = []

    def start(protocol: Protocol, database_url: str, *args: str,
              env: dict[str, str] | None = None) -> ProviderProcess:
        environment = {**os.environ, "OPTINFER_RPC_URL": chain.url,
                       "OPTINFER_DEPLOYMENTS": str(protocol.file),
                       "OPTINFER_DATABASE_URL": database_url, "OPTINFER_POLL_INTERVAL": "0.2",
                       **(env or {})}
        process = ProviderProcess(environment, tmp_path / "provider.log", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def optinfer(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([OPTINFER, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
