"""``optinfer chain up``, ``optinfer contracts deploy`` and ``optinfer bench rpc``: a local chain,
the contracts on it, and what one JSON-RPC call costs the nodes' client.

Registered on the apps of ``services/cli.py`` when that module imports this one.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import psutil
import typer

from optinfer.errors import UserError
from optinfer.services.cli_app import (
    AsJson,
    ConfigFile,
    RpcUrl,
    app,
    bench_app,
    contracts_app,
    emit,
    err,
    out,
)
from optinfer.services.settings import DEV_ACCOUNT_INDEX, load_settings

chain_app = typer.Typer(no_args_is_help=True, help="A local development chain (anvil).")
app.add_typer(chain_app, name="chain")

STATE_FILE = "anvil-state.json"
DEFAULT_BLOCK_TIME = 2
"""`chain up`'s seconds between blocks on a quiet chain."""


@chain_app.command("up")
def chain_up(
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).")
                    ] = 8545,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (0.0.0.0 inside a container).")] = "127.0.0.1",
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", help="Where the chain's state is kept across restarts "
        "(default: <state_dir setting>/chain).")] = None,
    ephemeral: Annotated[bool, typer.Option(
        "--ephemeral", help="Start from an empty chain and keep nothing.")] = False,
    block_time: Annotated[int, typer.Option(
        "--block-time", help="Seconds between blocks when no transaction comes (each "
        "transaction is still mined at once); 0: blocks only for transactions, so the "
        "chain's clock stands still while nothing is sent.")] = DEFAULT_BLOCK_TIME,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Run anvil in the foreground until Ctrl-C; print its URL and funded dev accounts."""
    from optinfer.contracts.localchain import start_anvil

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    if block_time < 0:
        raise UserError(f"--block-time must be >= 0 seconds, got {block_time}")
    state_file = None
    if not ephemeral:
        directory = state_dir or load_settings(config=config).state_dir / "chain"
        directory.mkdir(parents=True, exist_ok=True)
        state_file = directory / STATE_FILE

    stop = threading.Event()
    # SIGTERM too: the default action would kill this process and leave anvil (in a session
    # of its own) running.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    extra = ("--state", str(state_file)) if state_file else ()
    if block_time:
        # Mixed mining: a block for each transaction at once, and one every `block_time`
        # seconds besides, so that time passes on a quiet chain and claims reach the end of
        # their challenge window (with blocks only for transactions, nothing ever finalizes).
        extra += ("--mixed-mining",)
    with start_anvil(port, extra_args=extra, host=host,
                     block_time=block_time or None) as chain:
        roles = {index: role for role, index in DEV_ACCOUNT_INDEX.items()}
        accounts = [{"address": account.address, "private_key": "0x" + bytes(account.key).hex(),
                     "role": roles.get(index)}
                    for index, account in enumerate(chain.accounts)]
        summary = {"rpc_url": chain.url, "chain_id": chain.chain_id,
                   "state_file": str(state_file) if state_file else None,
                   "block_time": block_time or None, "accounts": accounts}
        emit(summary, as_json, _print_chain)
        sys.stdout.flush()  # a supervisor reading the URL must not wait for exit
        anvil = psutil.Process(chain.pid)
        while not stop.wait(0.5):
            if not anvil.is_running() or anvil.status() == psutil.STATUS_ZOMBIE:
                raise UserError("anvil exited unexpectedly")
        say("stopping anvil" + (f", saving its state to {state_file}" if state_file else ""))


def say(line: str) -> None:
    """Progress on stderr, unwrapped (addresses and keys must stay on one line)."""
    err.print(line, highlight=False, soft_wrap=True)


def _print_chain(summary: dict) -> None:
    out.print(f"anvil on {summary['rpc_url']} (chain id {summary['chain_id']})",
              highlight=False, soft_wrap=True)
    if summary["state_file"]:
        out.print(f"state kept in {summary['state_file']}", highlight=False, soft_wrap=True)
    out.print("funded development accounts (never use these keys on a public chain):",
              highlight=False, soft_wrap=True)
    for index, account in enumerate(summary["accounts"]):
        role = f"  ({account['role']})" if account["role"] else ""
        out.print(f"  {index}  {account['address']}  {account['private_key']}{role}",
                  highlight=False, soft_wrap=True)
    out.print("Ctrl-C to stop.", highlight=False, soft_wrap=True)


@contracts_app.command("deploy")
def contracts_deploy(
    rpc_url: RpcUrl = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="Addresses file to write (default: the deployments setting).")] = None,
    challenge_window: Annotated[int | None, typer.Option(
        "--challenge-window", help="Seconds a claim can be disputed (default 3600).")] = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Deploy the contracts; write their addresses and chain id for the other commands.

    The registry and the coordinator, then the one-step verifier and the dispute game (wired
    into the coordinator) once their artifacts are built.
    """
    from optinfer.services.chain import connect_settings
    from optinfer.services.deployments import DEMO_COORDINATOR_PARAMS, DeployParams, deploy_all

    settings = load_settings(config=config, rpc_url=rpc_url)
    if challenge_window is not None and challenge_window <= 0:
        raise UserError("--challenge-window must be > 0 seconds")
    w3 = connect_settings(settings)
    deployer = settings.signer("deployer", w3.eth.chain_id)
    params = DeployParams(coordinator=replace(
        DEMO_COORDINATOR_PARAMS,
        challenge_window=challenge_window or DEMO_COORDINATOR_PARAMS.challenge_window))
    say(f"deploying from {deployer.address} on {settings.rpc_url}")
    deployments = deploy_all(w3, deployer, params, log=say)
    path = out_file or settings.deployments_file
    deployments.write(path)
    emit({"file": str(path), **deployments.to_json()}, as_json,
         lambda d: out.print(f"wrote {d['file']}: {', '.join(d['contracts'])}",
                             highlight=False, soft_wrap=True))


@bench_app.command("rpc")
def bench_rpc(
    calls: Annotated[int, typer.Option("--calls", help="Calls of each method a round.")] = 1000,
    rounds: Annotated[int, typer.Option("--rounds", help="Alternating rounds.")] = 5,
    as_json: AsJson = True,
) -> None:
    """One JSON-RPC call's wall and CPU time: optinfer's client against web3's, on anvil."""
    from optinfer.services.rpc_bench import bench_rpc as run

    if calls < 1 or rounds < 1:
        raise UserError("--calls and --rounds must be >= 1")
    emit(run(calls=calls, rounds=rounds, log=err.print), as_json,
         lambda d: out.print_json(data=d))
