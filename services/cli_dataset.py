"""``optinfer dataset build | verify | export``: verified datasets (docs/datasets.md).

Registered on the app of ``services/cli.py`` when that module imports this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optinfer.errors import UserError
from optinfer.services.cli_app import (
    AsJson,
    ConfigFile,
    ModelDir,
    RpcUrl,
    Temperature,
    TopP,
    app,
    emit,
    err,
    out,
    stop_on_signals,
)
from optinfer.services.cli_chain import say
from optinfer.services.settings import load_settings

dataset_app = typer.Typer(no_args_is_help=True, help="Verified datasets: build them through "
                          "the network, check them against the chain, export a node's.")
app.add_typer(dataset_app, name="dataset")

Formats = Annotated[list[str] | None, typer.Option(
    "--format", help="parquet (the default) and/or jsonl; repeat for both.")]


def _chain(settings):
    from optinfer.services.dataset import ChainView
    from optinfer.services.deployments import Deployments

    w3, deployments = Deployments.on_chain(settings)
    return ChainView.of(w3, deployments)


@dataset_app.command("build")
def build(
    prompts: Annotated[Path, typer.Option("--prompts", help="One prompt per line, or a .jsonl "
                                          "file of {\"prompt\": ...} or {\"messages\": [...]} "
                                          "objects (an optional \"id\" each).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="The dataset folder (and the "
                                          "build's journal, to resume from).")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens an answer may "
                                            "hold.")] = 64,
    fee: Annotated[int | None, typer.Option("--fee", help="Wei paid per request (default "
                                            "10**16).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Requests in flight at "
                                             "once.")] = 8,
    max_attempts: Annotated[int, typer.Option(
        "--max-attempts", help="Requests per prompt at most (a slashed or unanswered one is "
        "posted again).")] = 3,
    commit_seconds: Annotated[int | None, typer.Option(
        "--commit-seconds", help="Seconds a provider has to commit (default 600).")] = None,
    chat: Annotated[bool | None, typer.Option(
        "--chat/--raw", help="Text prompts as a user message in the model's chat template, or "
        "as they are (default: the template when the model has one).")] = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="The consumer's seed of every request: "
                                      "the chain derives each draw's seed from it.")] = 0,
    formats: Formats = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="Stop after this many seconds (the build resumes when run "
        "again).")] = None,
    model: ModelDir = None,
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Post every prompt as a request, follow each to finality, write the answers.

    Killed and started again with the same options, it goes on where it stopped: no prompt is
    posted twice, no finalized answer is lost. Exits 1 when some prompt got no answer, or the
    build stopped (--timeout, Ctrl-C) before every answer was final.
    """
    from optinfer.contracts.sender import TxSender
    from optinfer.models.runtime import IntegerModel
    from optinfer.models.sampling import Sampling
    from optinfer.services import consumer
    from optinfer.services.cli_app import progress_bar
    from optinfer.services.dataset_build import BuildOptions, DatasetBuilder, read_prompts

    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds, got {timeout}")
    settings = load_settings(config=config, rpc_url=rpc_url, model_dir=model)
    integer_model = IntegerModel(settings.model_path)
    options = BuildOptions(
        max_tokens=max_tokens, fee=consumer.DEFAULT_FEE if fee is None else fee,
        commit_seconds=consumer.DEFAULT_COMMIT_SECONDS if commit_seconds is None
        else commit_seconds, sampling=Sampling.from_floats(temperature, top_p, seed),
        concurrency=concurrency, max_attempts=max_attempts,
        formats=tuple(formats or ("parquet",)))
    options.check()
    from optinfer.services.dataset import pyarrow_module

    if "parquet" in options.formats:
        pyarrow_module()  # before anything is posted
    loaded = read_prompts(prompts, integer_model, chat)
    view = _chain(settings)
    sender = TxSender(view.w3, settings.signer("consumer", view.chain_id), exclusive=True)
    builder = DatasetBuilder(view, sender, integer_model, loaded, out_dir, options, say)
    if builder.resumed:
        say(f"resuming the build in {out_dir}")
    try:
        with stop_on_signals() as stop, progress_bar("building") as bar:
            def show(counts) -> None:
                if bar is not None:
                    bar(counts.finalized / counts.prompts, counts.line())

            summary = builder.run(poll_interval=settings.poll_interval, timeout=timeout,
                                  progress=show, stop=stop.is_set)
    finally:
        builder.close()
    emit(summary, as_json, lambda s: out.print(
        f"{s['records']} of {s['prompts']} prompts answered and finalized in {out_dir}; fees "
        f"{s['fees_paid_wei']} wei; {s['slashed_and_reposted']} slashed answers and "
        f"{s['refunded_and_reposted']} unanswered requests posted again; {s['seconds']} s"
        + ("" if s["complete"] else " (incomplete: run the same command again to go on)"),
        highlight=False, soft_wrap=True))
    for record_id, note in summary["failed"].items():
        err.print(f"prompt {record_id}: {note}", highlight=False, soft_wrap=True)
    if not summary["complete"]:  # given up on, or stopped before every answer was final
        raise typer.Exit(1)


@dataset_app.command("verify")
def verify(
    directory: Annotated[Path, typer.Argument(help="The dataset folder.")],
    recompute: Annotated[bool, typer.Option(
        "--recompute", help="Also recompute every answer with the integer model (one "
        "teacher-forced pass each).")] = False,
    model: ModelDir = None,
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Check every record against the chain (and its texts with the model's tokenizer); exit 1
    naming each record that is not what the chain finalized."""
    from optinfer.models.runtime import IntegerModel
    from optinfer.services import consumer
    from optinfer.services.cli_app import progress_bar
    from optinfer.services.dataset import check_record, read_rows

    rows = read_rows(directory)
    settings = load_settings(config=config, rpc_url=rpc_url, model_dir=model)
    integer_model = IntegerModel(settings.model_path)
    ours = "0x" + consumer.model_id(integer_model).hex()
    view = _chain(settings)
    bad: dict[str, str] = {}
    with progress_bar("verifying", enabled=not as_json and len(rows) > 1) as bar:
        for index, row in enumerate(rows):
            record_id = str(row.get("id", index))
            text_model = integer_model if str(row.get("model_id", "")).lower() == ours else None
            reason = check_record(row, view, text_model, recompute and text_model is not None)
            if reason is None and text_model is None:
                reason = (f"its model {row.get('model_id')} is not the one given ({ours}, "
                          f"{integer_model.dir}): give that model with --model")
            if reason is not None:
                bad[record_id] = reason
            if bar is not None:
                bar((index + 1) / len(rows), f"{len(bad)} bad")
    result = {"records": len(rows), "bad": bad, "ok": not bad, "recomputed": recompute}
    emit(result, as_json, lambda r: out.print(
        f"{r['records']} records: all verified against the chain"
        + (" and recomputed" if recompute else "") if r["ok"]
        else f"{r['records']} records, {len(r['bad'])} bad:", highlight=False))
    if bad:
        if not as_json:
            for record_id, reason in bad.items():
                out.print(f"  record {record_id}: {reason}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@dataset_app.command("export")
def export(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="The dataset folder.")],
    formats: Formats = None,
    model: ModelDir = None,
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """The finalized requests of this node's database for its model, each checked against the
    chain, as a dataset (the records' ids are the request ids)."""
    from optinfer.models.runtime import IntegerModel
    from optinfer.services import consumer
    from optinfer.services import store as st
    from optinfer.services.dataset import make_record, provenance, pyarrow_module, write_dataset

    formats = tuple(formats or ("parquet",))
    if "parquet" in formats:
        pyarrow_module()
    settings = load_settings(config=config, rpc_url=rpc_url, model_dir=model)
    integer_model = IntegerModel(settings.model_path)
    model_id = "0x" + consumer.model_id(integer_model).hex()
    view = _chain(settings)
    store = st.Store(settings.database)
    try:
        store.require_current()
        found, after = [], -1
        while page := _finalized_page(store, after):
            found += [r for r in page if r.model_id.lower() == model_id]
            after = page[-1].request_id
    finally:
        store.dispose()
    records, skipped = [], {}
    for request in found:
        chain = provenance(view, request.request_id)
        if chain.status != "finalized":
            skipped[str(request.request_id)] = f"the chain says {chain.status}"
            continue
        records.append(make_record(str(request.request_id), chain, integer_model,
                                   request.prompt))
    card = {"model_id": model_id, "model_root": integer_model.manifest["model_root"],
            "chain_id": view.chain_id, "coordinator": view.coordinator.address,
            "command": "dataset export"}
    files = write_dataset(out_dir, records, formats, card)
    summary = {"records": len(records), "skipped": skipped,
               "files": [str(path) for path in files]}
    emit(summary, as_json, lambda s: out.print(
        f"{s['records']} finalized answers written to {out_dir}"
        + (f"; {len(s['skipped'])} left out (not final on chain)" if s["skipped"] else ""),
        highlight=False))


def _finalized_page(store, after: int):
    from optinfer.services import store as st
    from optinfer.services.statuses import RequestStatus

    with store.transaction() as conn:
        return st.requests_with_status(conn, RequestStatus.FINALIZED, limit=500, after=after)
