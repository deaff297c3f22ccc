"""``optinfer challenger run`` (the watchtower) and ``optinfer bench watchtower``.

Registered on the apps of ``services/cli.py`` when that module imports this one.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from optinfer.errors import UserError
from optinfer.services.cli_app import (
    AsJson,
    ConfigFile,
    RpcUrl,
    app,
    bench_app,
    emit,
    log_to_stderr,
    out,
    withdraw_as,
)
from optinfer.services.settings import load_settings

challenger_app = typer.Typer(
    no_args_is_help=True,
    help="The watchtower: verify every claim, dispute the false ones, play their games.")
app.add_typer(challenger_app, name="challenger")

log = logging.getLogger("optinfer.watchtower")


@challenger_app.command("run")
def challenger_run(
    concurrency: Annotated[int, typer.Option(
        "--concurrency", help="Tasks this worker runs at once (threads; with a broker).")] = 2,
    beat: Annotated[bool, typer.Option(
        "--beat/--no-beat", help="Also send the periodic scan (with a broker; run it in at "
        "least one worker of a deployment).")] = True,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", help="Serve Prometheus metrics on this port (default: the "
        "metrics_port setting; unset: none).")] = None,
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
) -> None:
    """Run the watchtower until Ctrl-C (or SIGTERM).

    With a broker (broker_url): a Celery worker on the queue celery_queue, with beat unless
    --no-beat. Without one: everything in this process, scanning every poll_interval.
    """
    from optinfer.challenger import metrics, tasks
    from optinfer.challenger.app import configure
    from optinfer.challenger.watchtower import Watchtower

    if concurrency < 1:
        raise UserError("--concurrency must be >= 1")
    settings = load_settings(config=config, rpc_url=rpc_url, metrics_port=metrics_port)
    celery = configure(settings)
    if settings.broker_url is None:
        log_to_stderr()
    else:
        check_broker(celery, settings.broker_url)
    watchtower = Watchtower.start(settings)  # a bad deployment or model stops here, in one line
    tasks.use_watchtower(watchtower)
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port)
    mode = (f"broker {settings.broker_url}, queue {settings.celery_queue}"
            if settings.broker_url else "eager mode (one process)")
    print(f"watchtower {watchtower.address} on {settings.rpc_url}, model "
          f"0x{watchtower.model.held.model_id.hex()}, {mode}", file=sys.stderr, flush=True)
    if settings.broker_url is None:
        # Every poll is a scan task run inline, and Celery logged "Task ... succeeded" for
        # each at INFO: a line every poll interval saying nothing. Failures still log.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        tasks.run_eager(stop)
        log.info("stopped")
        return
    argv = ["worker", "--pool", "threads", "--concurrency", str(concurrency),
            "--loglevel", "INFO", "-n", f"watchtower-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle"]
    if not beat:
        celery.worker_main(argv)
        return
    # Beat on a thread of this process, not Celery's `--beat` child process: a worker killed
    # with -9 left that child sending scans beside the next worker's beat.
    from celery.beat import EmbeddedService

    settings.state_dir.mkdir(parents=True, exist_ok=True)  # the schedule file's folder
    scheduler = EmbeddedService(
        celery, thread=True, schedule_filename=str(settings.state_dir / "celerybeat-schedule"))
    scheduler.start()
    try:
        celery.worker_main(argv)
    finally:
        scheduler.stop()


BROKER_ATTEMPTS = 5
"""Connection attempts to the broker before `challenger run` gives up (about 10 s)."""


def check_broker(celery, url: str) -> None:
    """UserError unless the broker at `url` answers within `BROKER_ATTEMPTS` attempts, each
    logged (Celery itself would retry forever at start-up, without a word)."""
    from kombu.exceptions import OperationalError

    def retrying(err, interval) -> None:
        log.warning("broker %s: %s; trying again in %.1f s", url, err, interval)

    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=BROKER_ATTEMPTS - 1, interval_start=0.5,
                                         interval_step=1.0, interval_max=4.0,
                                         errback=retrying)
    except OperationalError as err:
        raise UserError(f"the broker {url} is unreachable after {BROKER_ATTEMPTS} attempts: "
                        f"{err}; start it, or fix OPTINFER_BROKER_URL") from None


@challenger_app.command("withdraw")
def challenger_withdraw(
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Withdraw the slash shares the coordinator credited and the bonds the game returned."""

    withdraw_as("challenger", rpc_url, config, as_json)



@bench_app.command("watchtower")
def bench_watchtower(
    claims: Annotated[int, typer.Option("--claims", help="Honest claims in the burst.")] = 200,
    prompts: Annotated[int, typer.Option(
        "--prompts", help="Distinct prompts the requests cycle through (1..8).")] = 8,
    batch: Annotated[int, typer.Option(
        "--batch", help="Claims verified together, as one verify_many task does (1: one "
        "at a time).")] = 16,
    model: Annotated[Path | None, typer.Option(
        "--model", help="A converted model directory with a tokenizer (default: the "
        "committed tiny-r1).")] = None,
    as_json: AsJson = True,
) -> None:
    """Verification throughput of one watchtower process (local anvil)."""
    from optinfer.challenger.bench import PROMPTS
    from optinfer.challenger.bench import bench_watchtower as run

    if claims < 1 or not 1 <= prompts <= len(PROMPTS):
        raise UserError(f"--claims must be >= 1 and --prompts in 1..{len(PROMPTS)}")
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    if model is not None and not (model / "manifest.json").is_file():
        raise UserError(f"{model} is not a converted model (no manifest.json)")
    result = run(claims=claims, prompts=prompts, batch=batch, model_dir=model,
                 log=lambda line: print(line, file=sys.stderr))
    emit(result, as_json, lambda d: out.print_json(data=d))
