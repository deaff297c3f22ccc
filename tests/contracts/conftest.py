"""Fixtures for the contract tests: one anvil per test worker, a snapshot per test."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

# web3 7 imports websockets' legacy module, which warns on import; nothing here uses websockets.
warnings.filterwarnings("ignore", "websockets.legacy is deprecated", DeprecationWarning)
from web3 import Web3  # noqa: E402  (after the filter above)

from optinfer.contracts.localchain import LocalChain, start_anvil  # noqa: E402
from optinfer.contracts.registry import ModelRegistry  # noqa: E402
from tests.contracts.tiny_chain import stack, tiny  # noqa: E402, F401  (fixtures)


@pytest.fixture(scope="session")
def chain() -> Iterator[LocalChain]:
    """A real anvil for the whole session (of this worker), killed at the end."""
    with start_anvil() as running:
        yield running


@pytest.fixture(scope="session")
def w3(chain: LocalChain) -> Web3:
    return chain.web3()


@pytest.fixture
def isolated(w3: Web3) -> Iterator[Web3]:
    """Revert every state change a test makes: evm_snapshot before, evm_revert after."""
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    yield w3
    assert w3.provider.make_request("evm_revert", [snapshot])["result"] is True


@pytest.fixture(scope="session")
def registry_address(chain: LocalChain, w3: Web3) -> str:
    """A ModelRegistry deployed once per session (tests see it empty thanks to `isolated`)."""
    return ModelRegistry.deploy(w3, chain.accounts[0]).address


@pytest.fixture
def registry(registry_address: str, isolated: Web3) -> ModelRegistry:
    """The session's ModelRegistry, with this test's registrations reverted afterwards.

    (Session fixtures are set up before function ones, so the deployment precedes the
    snapshot and survives every revert.)
    """
    return ModelRegistry(isolated, registry_address)
