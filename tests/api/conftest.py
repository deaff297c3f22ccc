"""Fixtures for the API tests: the service tests' anvil, databases (SQLite and Postgres) and
deployment, plus the node's settings and an in-process client of its app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from optinfer.contracts.coordinator import InferenceCoordinator
from optinfer.services.deployments import Deployments
from optinfer.services.events import EventCursor, claim_record, request_record
from optinfer.services.settings import Settings, load_settings
from optinfer.services.statuses import RequestStatus
from optinfer.services.store import Store, record_claim, set_request_status, upsert_request
from tests.services import conftest as service_fixtures

# The service tests' fixtures, shared: settings isolation, anvil, SQLite and Postgres, and
# the registry and coordinator deployed with tiny-r1 registered.
_no_ambient_settings = service_fixtures._no_ambient_settings
postgres_admin = service_fixtures.postgres_admin
database_url = service_fixtures.database_url
chain = service_fixtures.chain
w3 = service_fixtures.w3
deployment = service_fixtures.deployment
TINY_R1 = service_fixtures.TINY_R1
tiny_r1_spec = service_fixtures.tiny_r1_spec

API_KEY = "test-api-key-0123456789"
ETHER = 10**18


@pytest.fixture
def deployments_file(deployment: Deployments, tmp_path: Path) -> Path:
    path = tmp_path / "deployments.json"
    deployment.write(path)
    return path


@pytest.fixture
def make_settings(chain, deployments_file: Path, database_url: str, tmp_path: Path
                  ) -> Callable[..., Settings]:
    """Settings of a node on the test chain, database and deployment; keywords override."""
    def make(**overrides) -> Settings:
        values = {"rpc_url": chain.url, "deployments": deployments_file,
                  "database_url": database_url, "api_key": API_KEY,
                  "state_dir": tmp_path / "state", "rpc_backoff": 0.05, **overrides}
        return load_settings(**values)
    return make


@pytest.fixture
def make_client(make_settings) -> Iterator[Callable[..., TestClient]]:
    """An in-process client of the app built from `make_settings(**overrides)`."""
    apps = []

    def make(**overrides) -> TestClient:
        from optinfer.services.api import create_app

        app = create_app(make_settings(**overrides))
        apps.append(app)
        return TestClient(app)

    yield make
    for app in apps:
        app.state.node.store.dispose()


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture
def coordinator(w3, deployment: Deployments) -> InferenceCoordinator:
    return InferenceCoordinator(w3, deployment.address("InferenceCoordinator"))


def sync_store(store: Store, coordinator: InferenceCoordinator, start_block: int) -> int:
    """What a node's chain cursor does: requests and claims from the events into `store`."""
    def handle(conn, event) -> None:
        if event.name == "RequestPosted":
            upsert_request(conn, request_record(event))
        elif event.name == "OutputCommitted":
            record_claim(conn, claim_record(event))
            set_request_status(conn, event.args["requestId"], RequestStatus.COMMITTED)
        elif event.name == "Finalized":
            set_request_status(conn, event.args["requestId"], RequestStatus.FINALIZED)

    cursor = EventCursor(coordinator.w3, store, "coordinator", [coordinator.contract],
                         events=["RequestPosted", "OutputCommitted", "Finalized"],
                         start_block=start_block)
    return cursor.poll(handle)
