"""The local anvil: accounts, shutdown on exceptions, missing binary."""

from __future__ import annotations

import os
import signal
import time

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


def test_a_ctrl_c_while_anvil_starts_is_held_back_until_anvil_is_in_hand():
    """SIGINT raised inside the block that starts anvil surfaces when the block ends, where
    the cleanup already holds the process, not inside `subprocess.Popen`."""
    from optinfer.contracts.localchain import _interrupts_deferred

    reached_the_end = False
    with pytest.raises(KeyboardInterrupt), _interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # a signal handled here would raise here
        reached_the_end = True
    assert reached_the_end


def test_a_ctrl_c_at_anvil_start_up_stops_it():
    """The interrupt lands while anvil is starting (right after its process exists): anvil
    does not outlive the start-up."""
    import subprocess as sp

    started: list[int] = []
    real_popen = sp.Popen

    def popen_then_interrupt(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        started.append(process.pid)
        os.kill(os.getpid(), signal.SIGINT)  # before Popen has returned the handle
        return process

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sp, "Popen", popen_then_interrupt)
        with pytest.raises(KeyboardInterrupt), start_anvil():
            pytest.fail("anvil came up although the start-up was interrupted")
    (pid,) = started
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped
