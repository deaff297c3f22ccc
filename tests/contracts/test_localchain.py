"""The local anvil: accounts, shutdown on exceptions, missing binary."""

from __future__ import annotations

import os

import pytest

from optinfer.contracts.localchain import CHAIN_ID, find_anvil, start_anvil
from optinfer.errors import UserError


def test_startAnvil_derivedAccounts_areTheNodesFundedAccounts(chain, w3):
    assert w3.eth.chain_id == CHAIN_ID == chain.chain_id
    assert [account.address for account in chain.accounts] == w3.eth.accounts
    assert all(w3.eth.get_balance(account.address) > 10**21 for account in chain.accounts)


def test_startAnvil_exceptionInside_killsTheProcess():
    with pytest.raises(RuntimeError, match="boom"), start_anvil() as chain:
        pid = chain.pid
        assert chain.web3().eth.block_number == 0
        raise RuntimeError("boom")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_findAnvil_missingBinary_raisesUserError(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTINFER_ANVIL", raising=False)
    monkeypatch.setenv("OPTINFER_TOOLS_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="make install"):
        find_anvil()
