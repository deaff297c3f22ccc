"""``optinfer provider run``, ``optinfer provider withdraw`` and ``optinfer bench provider``.

Registered on the apps of ``services/cli.py`` when that module imports this one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from optinfer.errors import UserError
from optinfer.services.cli_app import (
    GENERATION_CPUS_HELP,
    AsJson,
    ConfigFile,
    GenerationCpus,
    RpcUrl,
    Threads,
    app,
    bench_app,
    emit,
    log_to_stderr,
    out,
    stop_on_signals,
    withdraw_as,
)
from optinfer.services.settings import load_settings

provider_app = typer.Typer(no_args_is_help=True,
                           help="The provider node: serve requests, commit, defend disputes.")
app.add_typer(provider_app, name="provider")


@provider_app.command("run")
def provider_run(
    register: Annotated[bool, typer.Option(
        "--register", help="Register the model in the ModelRegistry if it is not yet "
        "(paid by the provider key).")] = False,
    stake: Annotated[int | None, typer.Option(
        "--stake", help="Wei to stake when the provider registers (default: the "
        "coordinator's minimum stake). Ignored once registered.")] = None,
    lie: Annotated[str | None, typer.Option(
        "--lie", help="Demonstrations only: last-token commits wrong answers, which lose "
        "their disputes (default: the provider_lie setting, off).")] = None,
    threads: Threads = 1,
    generation_cpus: GenerationCpus = None,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", help="Requests decoded together (default: the max_batch setting, 8; "
        "1: one at a time).")] = None,
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
) -> None:
    """Serve requests, commit answers and defend disputes until Ctrl-C (or SIGTERM)."""
    from optinfer.services.provider import ProviderNode

    log_to_stderr()
    settings = load_settings(config=config, rpc_url=rpc_url, provider_lie=lie,
                             generation_cpus=generation_cpus, max_batch=max_batch)
    if stake is not None and stake <= 0:
        raise UserError("--stake must be a positive number of wei")
    node = ProviderNode.start(settings, register=register, stake=stake, threads=threads)
    try:
        with stop_on_signals() as stop:
            node.run(stop)
    finally:
        node.close()
    logging.getLogger("optinfer.provider").info("stopped")


@provider_app.command("withdraw")
def provider_withdraw(
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Withdraw the fees credited by the coordinator and the bonds won in disputes."""
    withdraw_as("provider", rpc_url, config, as_json)


@bench_app.command("provider")
def bench_provider(
    requests: Annotated[int, typer.Option("--requests", help="Requests served.")] = 200,
    rounds: Annotated[int, typer.Option(
        "--rounds", help="Rounds, each generating its share of the answers alone, then "
                         "serving them; 4 or more give a 95% interval.")] = 2,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Max tokens per request.")
                          ] = 32,
    model: Annotated[Path | None, typer.Option(
        "--model", help="Converted model directory (default: the committed tiny-r1).")] = None,
    block_time: Annotated[int | None, typer.Option(
        "--block-time", help="Seconds between anvil's blocks (default: a block per "
                             "transaction).")] = None,
    threads: Threads = 1,
    generation_cpus: Annotated[str, typer.Option(
        "--generation-cpus", help=GENERATION_CPUS_HELP + "; the bench's anvil runs with the "
        "serving threads.")] = "auto",
    as_json: AsJson = True,
) -> None:
    """Honest-path overhead on a local anvil: serve-with-commit time / generation time."""
    from optinfer.services.provider_bench import bench_provider as run

    if requests < 1 or max_tokens < 1 or rounds < 1:
        raise UserError("--requests, --rounds and --max-tokens must be >= 1")
    if block_time is not None and block_time < 1:
        raise UserError("--block-time must be >= 1 second")
    if rounds > requests:
        raise UserError(f"--rounds {rounds} is more than --requests {requests}: a round serves "
                        "at least one request")
    result = run(requests=requests, rounds=rounds, max_tokens=max_tokens, model_dir=model,
                 threads=threads, block_time=block_time, generation_cpus=generation_cpus,
                 log=lambda line: print(line, file=sys.stderr))
    emit(result, as_json, lambda d: out.print_json(data=d))
