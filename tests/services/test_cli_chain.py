"""`optinfer chain up` and `optinfer contracts deploy`, run as a user runs them: subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from web3 import Web3

from optinfer.contracts.coordinator import InferenceCoordinator
from optinfer.services.deployments import Deployments

OPTINFER = str(Path(sys.executable).parent / "optinfer")


def optinfer(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([OPTINFER, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


class ChainUp:
    """`optinfer chain up --json` in the background: its summary line, and its processes."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen([OPTINFER, "chain", "up", "--port", "0", "--json",
                                         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline()
        assert line, self.process.stderr.read()
        self.summary = json.loads(line)
        self.children = psutil.Process(self.process.pid).children(recursive=True)

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=30)


def test_chain_up_answers_and_stops_cleanly_on_sigint(tmp_path):
    up = ChainUp("--ephemeral")
    try:
        w3 = Web3(Web3.HTTPProvider(up.summary["rpc_url"]))
        assert w3.eth.chain_id == up.summary["chain_id"] == 31337
        assert w3.eth.get_balance(up.summary["accounts"][0]["address"]) > 0
        assert [a["role"] for a in up.summary["accounts"][:3]] == [
            "deployer", "provider", "challenger"]
        assert any("anvil" in child.name() for child in up.children)
    finally:
        code = up.interrupt()
    assert code == 0, up.process.stderr.read()
    psutil.wait_procs(up.children, timeout=10)
    assert not [child for child in up.children if child.is_running()
                and child.status() != psutil.STATUS_ZOMBIE]


def test_issue20_point5_a_quiet_chain_up_chain_keeps_time_moving_and_mines_at_once(tmp_path):
    """With no traffic, anvil without a block time mined nothing and no time passed: nothing
    ever finalized and `request --wait` hung. `chain up` now adds a block every 2 seconds,
    while a transaction is still mined at once; `--block-time 0` keeps the old behaviour."""
    from optinfer.contracts.localchain import dev_accounts
    from optinfer.contracts.sender import TxSender
    from optinfer.services.chain import connect

    up = ChainUp("--ephemeral")
    try:
        assert up.summary["block_time"] == 2
        w3 = connect(up.summary["rpc_url"])
        first = w3.eth.get_block("latest")
        time.sleep(4.5)
        later = w3.eth.get_block("latest")
        assert later["number"] >= first["number"] + 2
        assert later["timestamp"] >= first["timestamp"] + 4
        started = time.monotonic()
        TxSender(w3, dev_accounts()[5]).send({"to": dev_accounts()[4].address, "value": 1})
        assert time.monotonic() - started < 1.0  # not held for the next interval block
    finally:
        assert up.interrupt() == 0
    still = ChainUp("--ephemeral", "--block-time", "0")
    try:
        assert still.summary["block_time"] is None
        w3 = connect(still.summary["rpc_url"])
        number = w3.eth.block_number
        time.sleep(2.5)
        assert w3.eth.block_number == number
    finally:
        assert still.interrupt() == 0


def test_chain_up_keeps_state_across_restarts_and_sigterm_stops_it(tmp_path):
    state = tmp_path / "chain"
    up = ChainUp("--state-dir", str(state))
    try:
        deployed = optinfer("contracts", "deploy", "--rpc-url", up.summary["rpc_url"],
                            "--out", tmp_path / "deployments.json", "--json")
        assert deployed.returncode == 0, deployed.stderr
        registry = json.loads(deployed.stdout)["contracts"]["ModelRegistry"]
    finally:
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(timeout=30) == 0
    assert (state / "anvil-state.json").is_file()
    again = ChainUp("--state-dir", str(state))
    try:
        w3 = Web3(Web3.HTTPProvider(again.summary["rpc_url"]))
        assert len(w3.eth.get_code(registry)) > 0
    finally:
        assert again.interrupt() == 0


def test_contracts_deploy_writes_addresses_with_code(chain, w3, tmp_path):
    out = tmp_path / "deployments.json"
    proc = optinfer("contracts", "deploy", "--rpc-url", chain.url, "--out", out,
                    "--challenge-window", "120", "--json")
    assert proc.returncode == 0, proc.stderr
    deployments = Deployments.read(out)
    assert json.loads(proc.stdout)["file"] == str(out)
    assert deployments.chain_id == chain.chain_id
    assert {"ModelRegistry", "InferenceCoordinator"} <= set(deployments.contracts)
    for address in deployments.contracts.values():
        assert len(w3.eth.get_code(address)) > 0
    coordinator = InferenceCoordinator(w3, deployments.address("InferenceCoordinator"))
    assert coordinator.parameter("challengeWindow") == 120
    assert coordinator.parameter("registry") == deployments.address("ModelRegistry")
    if "DisputeGame" in deployments.contracts:  # wired once the game is built
        assert coordinator.parameter("disputeGame") == deployments.address("DisputeGame")


def test_deploy_reads_settings_from_environment_and_config(chain, w3, tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(f'rpc_url = "{chain.url}"\nstate_dir = "{tmp_path / "state"}"\n')
    proc = optinfer("contracts", "deploy", "--config", config)
    assert proc.returncode == 0, proc.stderr
    assert "ModelRegistry" in Deployments.read(tmp_path / "state" / "deployments.json").contracts


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_deploy_to_a_dead_node_is_one_line_exit_2(tmp_path):
    started = time.monotonic()
    proc = optinfer("contracts", "deploy", "--rpc-url", f"http://127.0.0.1:{free_port()}",
                    env={"OPTINFER_RPC_ATTEMPTS": "2", "OPTINFER_RPC_BACKOFF": "0.01",
                         "OPTINFER_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 2
    # Retries are logged as they happen; the failure itself is one line.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "eth_chainId" in errors[0] and "no answer after 2 attempt(s)" in errors[0]
    assert "Connection refused" in errors[0]
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(("env", "variable"), [
    ({"OPTINFER_RPC_URL": "localhost:8545"}, "OPTINFER_RPC_URL"),
    ({"OPTINFER_DEPLOYER_KEY": "0xnothex"}, "OPTINFER_DEPLOYER_KEY"),
])
def test_bad_settings_stop_the_command_with_one_line(env, variable, tmp_path):
    proc = optinfer("contracts", "deploy", env={**env, "OPTINFER_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert variable in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_deployments_file_round_trip_and_errors(chain, w3, deployment, tmp_path):
    from optinfer.errors import UserError

    path = tmp_path / "d" / "deployments.json"
    written = Deployments(chain_id=chain.chain_id, block_number=3,
                          contracts={"ModelRegistry": deployment.address("ModelRegistry")})
    written.write(path)
    read = Deployments.read(path)
    assert read == written
    read.check_chain(w3)
    # An address without code (a chain restarted empty, another deployment's file).
    with pytest.raises(UserError, match="names ModelRegistry at addresses that hold no "
                                        "contract on chain 31337"):
        Deployments(chain_id=chain.chain_id, block_number=3,
                    contracts={"ModelRegistry": chain.accounts[0].address}).check_chain(w3)
    with pytest.raises(UserError, match="has no DisputeGame.*contracts deploy"):
        read.address("DisputeGame")
    with pytest.raises(UserError, match="for chain 1 but the RPC node is on chain 31337"):
        Deployments(chain_id=1, block_number=0).check_chain(w3)
    with pytest.raises(UserError, match="no deployments file.*contracts deploy"):
        Deployments.read(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"chain_id": 1}')
    with pytest.raises(UserError, match="not a deployments file"):
        Deployments.read(tmp_path / "bad.json")


def _one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "╭" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_issue20_point12_operator_mistakes_are_one_line_and_nothing_is_sent(chain, w3,
                                                                            tmp_path):
    """The mistakes an operator makes, each one line on stderr with what to do, exit status
    2, no traceback, and checked before anything is signed: the consumer's nonce and balance
    are what they were (the fee went first, and was lost, to an address without a contract)."""
    deployed = tmp_path / "deployments.json"
    assert optinfer("contracts", "deploy", "--rpc-url", chain.url, "--out", deployed,
                    env={"OPTINFER_STATE_DIR": str(tmp_path)}).returncode == 0
    elsewhere = tmp_path / "elsewhere.json"
    data = json.loads(deployed.read_text())
    data["contracts"]["InferenceCoordinator"] = "0x" + "12" * 20
    elsewhere.write_text(json.dumps(data))
    env = {"OPTINFER_RPC_URL": chain.url, "OPTINFER_DEPLOYMENTS": str(deployed),
           "OPTINFER_STATE_DIR": str(tmp_path / "state"), "OPTINFER_RPC_ATTEMPTS": "2",
           "OPTINFER_RPC_BACKOFF": "0.01"}
    consumer = chain.accounts[3].address
    before = (w3.eth.get_transaction_count(consumer), w3.eth.get_balance(consumer))
    tls = chain.url.replace("http://", "https://")
    cases = [
        (["request", "--prompt", "1+1=", "--rpc-url", tls], {}, ["TLS failed", "http://"]),
        (["request", "--prompt", "1+1=", "--rpc-url", "http://127.0.0.1:99999"], {},
         ["Port out of range"]),
        (["request", "--prompt", ""], {}, ["--prompt is empty"]),
        (["request", "--prompt", "1+1=", "--wait", "--timeout", "-1"], {},
         ["--timeout must be > 0"]),
        (["request", "--prompt", "1+1="], {},  # nobody registered tiny-r1 in this deployment
         ["is not registered", "optinfer provider run --register"]),
        (["request", "--prompt", "1+1="], {"OPTINFER_DEPLOYMENTS": str(elsewhere)},
         ["InferenceCoordinator at addresses that hold no contract", "contracts deploy"]),
        (["db", "upgrade"], {"OPTINFER_DATABASE_URL": "sqlite:////proc/nope/node.db"},
         ["cannot create the SQLite database's folder /proc/nope", "writable"]),
        (["contracts", "deploy", "--out", tmp_path / "never.json"],
         {"OPTINFER_DEPLOYER_KEY": "0x" + "ab" * 32}, ["cannot pay for the transaction",
                                                       "holds 0 wei", "fund it"]),
    ]
    for args, extra, fragments in cases:
        _one_error_line(optinfer(*args, env={**env, **extra}), *fragments)
    assert (w3.eth.get_transaction_count(consumer), w3.eth.get_balance(consumer)) == before
