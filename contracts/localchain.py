"""A local development chain: the project's `anvil` binary on a free 127.0.0.1 port.

    with start_anvil() as chain:
        w3 = chain.web3()
        ...

The binary is resolved as ``OPTINFER_ANVIL``, else ``<tools>/node_modules/.bin/anvil`` (what
``make install`` puts there from the npm package ``@foundry-rs/anvil-linux-amd64``), else
``anvil`` on ``PATH``. The process is started in its own process group and the whole group is
killed on exit, exceptions included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from optinfer.contracts.compiler import tools_dir
from optinfer.errors import UserError

# Anvil's (and Hardhat's) well-known development mnemonic, passed explicitly so the accounts
# below are derived from what the node actually uses rather than assumed.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_ACCOUNT_COUNT = 10
CHAIN_ID = 31337
STARTUP_TIMEOUT_S = 30.0

_LISTENING_RE = re.compile(r"Listening on 127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class LocalChain:
    """A running anvil: its JSON-RPC URL and its funded development accounts (with keys)."""

    url: str
    accounts: tuple[LocalAccount, ...]
    chain_id: int
    pid: int

    def web3(self) -> Web3:
        """A Web3 client on this chain (HTTP, 60 s request timeout)."""
        return Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": 60}))


def find_anvil() -> Path:
    """The anvil binary (see the module docstring for the order); UserError when there is none."""
    configured = os.environ.get("OPTINFER_ANVIL")
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UserError(f"OPTINFER_ANVIL={configured} is not an executable file")
        return path
    project = tools_dir() / "node_modules" / ".bin" / "anvil"
    if project.is_file() and os.access(project, os.X_OK):
        return project
    on_path = shutil.which("anvil")
    if on_path:
        return Path(on_path)
    raise UserError(
        f"anvil not found in {tools_dir()} nor on PATH. Run `make install` (it installs the npm "
        "package @foundry-rs/anvil-linux-amd64) or set OPTINFER_ANVIL to an anvil binary."
    )


def dev_accounts(count: int = DEV_ACCOUNT_COUNT) -> tuple[LocalAccount, ...]:
    """The first `count` accounts of :data:`DEV_MNEMONIC` on anvil's path m/44'/60'/0'/0/i."""
    Account.enable_unaudited_hdwallet_features()
    return tuple(
        Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
        for i in range(count)
    )


def _rpc_answers(url: str) -> bool:
    """Whether `url` answers ``eth_chainId`` (a bare HTTP request: no web3 retries)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return "result" in json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _stop(process: subprocess.Popen) -> None:
    """Terminate anvil's process group; kill it if it has not exited within 5 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


@contextmanager
def start_anvil(
    port: int | None = None, *, block_time: int | None = None, extra_args: tuple[str, ...] = (),
    host: str = "127.0.0.1",
) -> Iterator[LocalChain]:
    """Run anvil on 127.0.0.1 (or `host`, e.g. 0.0.0.0 in a container) and yield a
    :class:`LocalChain` once JSON-RPC answers (its URL is always the loopback one).

    `port` None lets the OS choose a free port (anvil binds port 0 and reports the port it got,
    so two concurrent chains never race for one). `block_time` None mines a block per
    transaction. The process group is killed on exit. Raises UserError when the binary is
    missing or anvil does not come up within 30 s (the message holds the end of its log).
    """
    binary = find_anvil()
    args = [
        str(binary),
        "--host", host,
        "--port", str(port or 0),
        "--mnemonic", DEV_MNEMONIC,
        "--accounts", str(DEV_ACCOUNT_COUNT),
        "--chain-id", str(CHAIN_ID),
        *(["--block-time", str(block_time)] if block_time else []),
        *extra_args,
    ]
    with tempfile.TemporaryDirectory(prefix="optinfer-anvil-") as tmp:
        log_path = Path(tmp) / "anvil.log"
        process = None
        try:
            with _interrupts_deferred(), log_path.open("wb") as log:
                # Own session: killpg reaches anvil and anything it spawns, never the test
                # runner.
                process = subprocess.Popen(
                    args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            url = _wait_until_ready(process, log_path)
            yield LocalChain(url=url, accounts=dev_accounts(), chain_id=CHAIN_ID, pid=process.pid)
        finally:
            if process is not None:
                _stop(process)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back until the block ends, then handled as it would have been.
    Around the start of anvil: a KeyboardInterrupt raised inside `subprocess.Popen`, after
    the child exists but before its handle is ours, would leave anvil running with nobody to
    stop it. Python runs signal handlers in the main thread only, so only there is anything
    to hold back."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is None:  # a handler not set from Python
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


def _wait_until_ready(process: subprocess.Popen, log_path: Path) -> str:
    """Wait for anvil to report its port and answer JSON-RPC; return its URL."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(
                f"anvil exited with code {process.returncode} at start-up:\n"
                + _log_tail(log_path)
            )
        if url is None:
            match = _LISTENING_RE.search(log_path.read_text(errors="replace"))
            if match:
                url = f"http://127.0.0.1:{match.group(1)}"
        if url is not None and _rpc_answers(url):
            return url
        time.sleep(0.05)
    _stop(process)
    raise UserError(
        f"anvil did not answer within {STARTUP_TIMEOUT_S:.0f} s:\n" + _log_tail(log_path)
    )


def _log_tail(log_path: Path, lines: int = 20) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
