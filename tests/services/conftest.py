"""Fixtures for the service tests: a migrated store on SQLite (a temporary file) and on the
machine's real Postgres (a schema of its own per test, dropped afterwards)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from optinfer.services.store import Store

# Trust authentication on 127.0.0.1; OPTINFER_TEST_POSTGRES points elsewhere if needed.
POSTGRES_URL = os.environ.get(
    "OPTINFER_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch, tmp_path: Path) -> None:
    """Settings come from each test alone: no OPTINFER_* (nor DATABASE_URL) from the shell,
    state under tmp."""
    for name in list(os.environ):
        if name.startswith("OPTINFER_") and name not in ("OPTINFER_ANVIL",
                                                          "OPTINFER_TEST_POSTGRES"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("OPTINFER_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[sa.Engine]:
    """An autocommit engine on the test database (creates and drops the test schemas)."""
    engine = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as err:
        pytest.fail(f"Postgres at {POSTGRES_URL} is not reachable (.ci/run starts it): {err}")
    yield engine
    engine.dispose()


def postgres_schema_url(admin: sa.Engine) -> tuple[str, str]:
    """A fresh schema on the test database and a URL whose connections use it."""
    schema = f"optinfer_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    return schema, f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


def drop_schema(admin: sa.Engine, schema: str) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    admin = request.getfixturevalue("postgres_admin")
    schema, url = postgres_schema_url(admin)
    try:
        yield url
    finally:
        drop_schema(admin, schema)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated store on `database_url`."""
    store = Store(database_url)
    store.migrate()
    yield store
    store.dispose()


# ----------------------------------------------------------------------------- chain


@pytest.fixture(scope="session")
def chain():
    """A real anvil for this worker's session, killed at the end."""
    from optinfer.contracts.localchain import start_anvil

    with start_anvil() as running:
        yield running


@pytest.fixture
def w3(chain):
    """The session chain, with every state change of the test reverted afterwards."""
    from optinfer.services.chain import connect

    client = connect(chain.url)
    snapshot = client.provider.make_request("evm_snapshot", [])["result"]
    yield client
    assert client.provider.make_request("evm_revert", [snapshot])["result"] is True


@pytest.fixture
def deployment(chain, w3):
    """The whole deployment (inside this test's snapshot), tiny-r1 registered: a coordinator
    takes commitments only once its dispute game is set."""
    from optinfer.contracts.registry import ModelRegistry
    from optinfer.services.deployments import deploy_all

    deployer = chain.accounts[0]
    deployed = deploy_all(w3, deployer)
    registry = ModelRegistry(w3, deployed.address("ModelRegistry"))
    registry.register_send(tiny_r1_spec(), deployer)
    return deployed


TINY_R1 = Path(__file__).resolve().parents[2] / "models" / "tiny-r1" / "integer"


def tiny_r1_spec():
    from optinfer.contracts.registry import ModelSpec

    return ModelSpec.from_manifest(TINY_R1 / "manifest.json", manifest_uri="optinfer:tiny-r1")
