"""``optinfer api`` (the node's HTTP API under uvicorn) and ``optinfer request`` (a consumer
posting a prompt on chain and, with ``--wait``, reading the verified answer).

Registered on the app of ``services/cli.py`` when that module imports this one.
"""

from __future__ import annotations

from typing import Annotated

import typer

from optinfer.errors import UserError
from optinfer.services.cli_app import (
    AsJson,
    ChatFormat,
    ConfigFile,
    ModelDir,
    RpcUrl,
    SystemMessage,
    Temperature,
    TopP,
    app,
    emit,
    out,
    prompt_ids,
)
from optinfer.services.cli_chain import say
from optinfer.services.settings import load_settings


@app.command("api")
def api(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free port).")] = 8000,
    model: ModelDir = None,
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
) -> None:
    """Serve the node's HTTP API (model download, requests, games, health, metrics)."""
    import uvicorn

    from optinfer.services.api import create_app

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    settings = load_settings(config=config, rpc_url=rpc_url, model_dir=model)
    application = create_app(settings)
    say(f"serving model {application.state.node.model_id} from {settings.model_path}")
    uvicorn.run(application, host=host, port=port, log_level="info")


@app.command("request")
def request(
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt text.")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens to answer.")] = 64,
    chat: ChatFormat = False,
    system: SystemMessage = None,
    fee: Annotated[int | None, typer.Option(
        "--fee", help="Wei paid to the provider (default 10**16).")] = None,
    commit_seconds: Annotated[int | None, typer.Option(
        "--commit-seconds", help="Seconds a provider has to commit (default 600, at least 60)."
    )] = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Annotated[int, typer.Option(
        "--seed", help="Your seed, 0 .. 2**63 - 1: the chain derives the draw's seed from it "
        "and the request id when the request is posted.")] = 0,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the request to finality and print the answer.")] = False,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="With --wait: give up after this many seconds.")] = None,
    model: ModelDir = None,
    rpc_url: RpcUrl = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Post a prompt on chain from the consumer account; --wait prints the verified answer.

    With --chat the prompt is posted in the model's chat template (the token ids on chain are
    the formatted conversation). With --temperature the answer is drawn (a model registered
    as sampling), by a seed the chain fixes when the request is posted.

    Exits 2 with the reason when the request ends without one (refunded, rejected, or not
    committed before its deadline).
    """
    from optinfer.contracts.bindings import ContractRevert
    from optinfer.contracts.coordinator import InferenceCoordinator
    from optinfer.contracts.registry import ModelRegistry
    from optinfer.contracts.sender import TxSender
    from optinfer.models.runtime import IntegerModel
    from optinfer.models.sampling import Sampling
    from optinfer.services import consumer
    from optinfer.services.deployments import Deployments

    if not prompt:
        raise UserError("--prompt is empty: give the text to ask")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds, got {timeout}")
    if timeout is not None and not wait:
        raise UserError("--timeout needs --wait: without it the command returns at once")
    settings = load_settings(config=config, rpc_url=rpc_url, model_dir=model)
    integer_model = IntegerModel(settings.model_path)
    tokens = prompt_ids(integer_model, prompt, chat, system)
    fee = consumer.DEFAULT_FEE if fee is None else fee
    if commit_seconds is None:
        commit_seconds = consumer.DEFAULT_COMMIT_SECONDS
    sampling = Sampling.from_floats(temperature, top_p, seed)
    consumer.check_request(integer_model, tokens, max_tokens, fee, commit_seconds, sampling)
    w3, deployments = Deployments.on_chain(settings)
    coordinator = InferenceCoordinator(w3, deployments.address("InferenceCoordinator"))
    sender = TxSender(w3, settings.signer("consumer", deployments.chain_id))
    consumer.check_registered(ModelRegistry(w3, deployments.address("ModelRegistry")),
                              integer_model)
    balance = w3.eth.get_balance(sender.address)
    if balance < fee:
        raise UserError(f"the consumer account {sender.address} holds {balance} wei, less "
                        f"than the fee of {fee} wei: fund it, or lower --fee")
    try:
        posted = consumer.post_request(
            coordinator, sender, integer_model, tokens, max_tokens=max_tokens, fee=fee,
            commit_seconds=commit_seconds, sampling=sampling)
    except ContractRevert as err:
        raise UserError(f"the coordinator refuses the request: {err.name or err}"
                        f"{err.args_decoded if err.name else ''}") from None
    say(f"posted request {posted.request_id}: {len(tokens)} prompt tokens, fee {fee} wei, "
        f"tx {posted.tx_hash}")
    summary = {"request_id": posted.request_id, "tx_hash": posted.tx_hash,
               "prompt_tokens": tokens, "status": "open",
               "draw": {"temperature": posted.draw.temperature, "top_p": posted.draw.top_p,
                        "seed": posted.draw.seed}}
    if not wait:
        emit(summary, as_json, lambda d: out.print(d["request_id"], highlight=False))
        return
    result = consumer.wait_for_result(
        coordinator, posted.request_id, poll_interval=settings.poll_interval, timeout=timeout,
        on_change=lambda _status, line: say(line))
    text = integer_model.decode_text(result.output)
    summary.update(status="finalized", provider=result.provider, output_tokens=result.output,
                   text=text)
    emit(summary, as_json, lambda d: out.print(d["text"], markup=False, highlight=False,
                                              soft_wrap=True))
