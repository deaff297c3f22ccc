"""What every `optinfer` command module shares: the Typer apps, the consoles, the common
options, the helpers that print results and progress, stop on signals, and withdraw for a
role.

``services/cli.py`` holds ``main`` and the model, bench and demo commands; ``cli_*.py`` each add
one group of commands to these apps. All of them import this module, none of them each other,
so the command modules have no import cycle (``cli.py`` imports them last to register them).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from optinfer.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Verifiable LLM inference with optimistic fraud proofs.")


class _Options:
    debug = False  # `optinfer --debug ...`: a user error keeps its traceback too


options = _Options()


@app.callback()
def _root(debug: Annotated[bool, typer.Option(
        "--debug", help="Show the traceback of every error (for a bug report).")] = False,
          ) -> None:
    options.debug = debug

model_app = typer.Typer(no_args_is_help=True, help="Convert, inspect, train and demo models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON output).")
app.add_typer(model_app, name="model")
contracts_app = typer.Typer(no_args_is_help=True, help="Solidity contracts.")
app.add_typer(bench_app, name="bench")
app.add_typer(contracts_app, name="contracts")

out = Console()
err = Console(stderr=True)

ModelDir = Annotated[Path | None, typer.Option("--model", help="Converted model directory "
                                               "(default: the committed tiny-r1).")]
Temperature = Annotated[float, typer.Option(
    "--temperature", help="0 (the default) decodes greedily; 0.05-2 draws tokens (a model "
    "converted with --sampling; docs/models.md, \"Sampling\").")]
TopP = Annotated[float, typer.Option(
    "--top-p", help="Draw from the most probable tokens whose probabilities reach this.")]
Seed = Annotated[int, typer.Option("--seed", help="The draws' seed, 0 .. 2**63 - 1.")]


Threads = Annotated[int, typer.Option("--threads", help="ONNX Runtime intra-op threads.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
GENERATION_CPUS_HELP = ("CPUs of the generation process, the serving threads taking the "
                        "others: auto (the last --threads CPUs, when there are more), none, or "
                        "a list such as 2-3")
GenerationCpus = Annotated[str | None, typer.Option(
    "--generation-cpus",
    help=GENERATION_CPUS_HELP + " (default: the generation_cpus setting, auto).")]
ConfigFile = Annotated[Path | None, typer.Option(
    "--config", help="TOML settings file (default: $OPTINFER_CONFIG); see docs/operators.md.")]
RpcUrl = Annotated[str | None, typer.Option(
    "--rpc-url", help="JSON-RPC endpoint (default: the rpc_url setting).")]
ChatFormat = Annotated[bool, typer.Option(
    "--chat", help="Send --prompt as one user message in the model's chat template (the prompt "
    "layout an instruct model was trained on; docs/models.md, \"Chat templates\").")]
SystemMessage = Annotated[str | None, typer.Option(
    "--system", help="With --chat: a system message before the user's.")]


def default_model_dir() -> Path:
    from optinfer.models.tiny_r1 import INTEGER_DIR

    return INTEGER_DIR


def load_model(model: Path | None, threads: int = 1):
    from optinfer.models.runtime import IntegerModel

    return IntegerModel(model or default_model_dir(), threads=threads)


def prompt_ids(model, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """--prompt as token ids: the text through the tokenizer, or with --chat the conversation
    (--system, then the prompt as the user's message) in the model's chat template."""
    from optinfer.models.chat import chat_tokens, conversation

    if system is not None and not chat:
        raise UserError("--system needs --chat: a system message is part of a chat prompt")
    return chat_tokens(model, conversation(prompt, system)) if chat else model.encode(prompt)


@contextmanager
def progress_bar(description: str, enabled: bool = True):
    """A rich progress bar on stderr; yields progress(fraction, message)."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  TextColumn("{task.fields[message]}"), console=err, transient=False) as bar:
        task = bar.add_task(description, total=1.0, message="")

        def update(fraction: float, message: str = "") -> None:
            bar.update(task, completed=min(max(fraction, 0.0), 1.0), message=message)

        yield update


def emit(data: dict, as_json: bool, human) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        human(data)


# ------------------------------------------------------------------- inference


def log_to_stderr() -> None:
    """One line per event on stderr, with the time; the libraries' chatter stays out."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("web3", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (a clean stop between two steps)."""
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set())
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def withdraw_as(role: str, rpc_url: str | None, config: Path | None, as_json: bool) -> None:
    """Withdraw everything the coordinator and the game credited to `role`'s key (`provider`
    or `challenger`) and print what came from where."""
    from optinfer.services.deployments import Deployments
    from optinfer.services.payouts import withdraw
    from optinfer.services.settings import load_settings

    log_to_stderr()
    settings = load_settings(config=config, rpc_url=rpc_url)
    w3, deployments = Deployments.on_chain(settings)
    account = settings.signer(role, deployments.chain_id)
    withdrawn = withdraw(w3, deployments, account)
    emit({role: account.address, "withdrawn_wei": withdrawn}, as_json,
         lambda d: out.print(", ".join(f"{amount} wei from the {name}"
                                       for name, amount in d["withdrawn_wei"].items()),
                             highlight=False, soft_wrap=True))
