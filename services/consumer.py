"""The consumer's side of a request: turn a prompt into token ids, post it on chain, follow it.

``optinfer request`` and ``POST /v1/requests`` both go through here, so the API and the CLI
refuse the same prompts with the same messages, before any gas is spent:

    model = IntegerModel(settings.model_path)
    tokens = prompt_tokens(model, text="12+34=")
    posted = post_request(coordinator, sender, model, tokens, max_tokens=12, fee=10**16,
                          sampling=Sampling.from_floats(0.6, 0.95, seed=7))  # or greedy
    result = wait_for_result(coordinator, posted.request_id, poll_interval=1.0)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from web3 import Web3
from web3.exceptions import BlockNotFound, Web3RPCError

from optinfer.contracts.coordinator import InferenceCoordinator, RequestSpec, Result, Status
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.contracts.sender import TxSender
from optinfer.errors import UserError
from optinfer.models.chat import chat_tokens
from optinfer.models.runtime import IntegerModel
from optinfer.models.sampling import Sampling

# `postRequest` keeps the fee in a uint96 (docs/protocol.md): larger values cannot be posted.
MAX_FEE = 2**96 - 1
DEFAULT_FEE = 10**16  # 0.01 ether
DEFAULT_COMMIT_SECONDS = 600
# A provider needs a few blocks to see a request, answer it and commit; and the deadline is
# counted from an estimate of the time of the block the request lands in.
MIN_COMMIT_SECONDS = 60
# A claim stores its output as contract code (a STOP byte, then 4 bytes a token), which
# EIP-170 caps at 24576 bytes: TokenPacking.MAX_TOKENS.
MAX_TOKENS_ON_CHAIN = (24_576 - 1) // 4
GREEDY = Sampling()


@dataclass(frozen=True)
class PostedRequest:
    """A request as posted: its id and where it landed."""

    request_id: int
    tx_hash: str
    block_number: int
    consumer: str
    model_id: str
    prompt: list[int]
    max_tokens: int
    fee: int
    commit_deadline: int
    #: How the answer is drawn, as the chain stored it: greedy is ``Sampling()``; a sampled
    #: request's seed is the one derived from the consumer's (docs/protocol.md, "Sampling").
    draw: Sampling = GREEDY


class RequestNotServed(UserError):
    """The request ended without a verified answer: refunded, rejected, or never committed."""


def next_block_time(w3: Web3) -> int:
    """About the timestamp of the next block, which the contract compares deadlines with.

    The pending block's where the node builds one (anvil's is exact, time jumps and reverts
    included; neither the wall clock nor the latest block is: blocks may be sparse and a
    development chain's clock is its own), else the latest block's.
    """
    try:
        return w3.eth.get_block("pending")["timestamp"]
    except (Web3RPCError, BlockNotFound, ValueError):
        return w3.eth.get_block("latest")["timestamp"]


def model_id(model: IntegerModel) -> bytes:
    """The id claims name for `model`, the registry's key (``ModelSpec.model_id``)."""
    return ModelSpec.from_manifest(model.dir / "manifest.json").model_id


def prompt_tokens(model: IntegerModel, text: str | None = None,
                  tokens: list[int] | None = None,
                  messages: list[dict[str, str]] | None = None) -> list[int]:
    """The prompt as token ids: `text` through the model's tokenizer, `tokens` as given
    (checked against the vocabulary), or `messages` ({role, content}, ...) formatted with the
    model's chat template (`models/chat.py`). Exactly one of the three."""
    if sum(given is not None for given in (text, tokens, messages)) != 1:
        raise UserError("give the prompt as text, as token ids or as chat messages: exactly "
                        "one of them")
    if text is not None:
        return model.encode(text)
    if messages is not None:
        return chat_tokens(model, messages)
    if not tokens:
        raise UserError("the prompt holds no tokens")
    model.check_tokens(tokens, "prompt")
    return list(tokens)


def check_request(model: IntegerModel, prompt: list[int], max_tokens: int, fee: int,
                  commit_seconds: int = DEFAULT_COMMIT_SECONDS,
                  sampling: Sampling = GREEDY) -> None:
    """UserError for what ``postRequest`` would revert on (and its fee type could not hold),
    so a bad request costs no gas and gets a message in the model's own terms. (`sampling`
    checked its own limits when it was made.)"""
    model.check_draw(sampling)
    if commit_seconds < MIN_COMMIT_SECONDS:
        raise UserError(f"the commit deadline must be at least {MIN_COMMIT_SECONDS} s away, "
                        f"got {commit_seconds}")
    if max_tokens < 1:
        raise UserError(f"max tokens must be >= 1, got {max_tokens}")
    if max_tokens > MAX_TOKENS_ON_CHAIN:
        raise UserError(f"max tokens must be <= {MAX_TOKENS_ON_CHAIN} (a claim's output is "
                        f"stored as contract code), got {max_tokens}")
    if not 0 <= fee <= MAX_FEE:
        raise UserError(f"the fee must be between 0 and 2**96 - 1 wei, got {fee}")
    model.check_length(len(prompt) + max_tokens - 1, "prompt plus max tokens")


def check_registered(registry: ModelRegistry, model: IntegerModel) -> None:
    """UserError unless `model`'s id is registered: ``postRequest`` reverts for an unknown
    model, and a provider registers its model when it starts with ``--register``."""
    if not registry.is_registered(model_id(model)):
        raise UserError(f"model 0x{model_id(model).hex()} ({model.dir}) is not registered in "
                        f"the ModelRegistry at {registry.address}: a provider serving it "
                        "registers it (`optinfer provider run --register`)")


def post_request(
    coordinator: InferenceCoordinator, sender: TxSender, model: IntegerModel, prompt: list[int],
    *, max_tokens: int, fee: int, commit_seconds: int = DEFAULT_COMMIT_SECONDS,
    sampling: Sampling = GREEDY,
) -> PostedRequest:
    """Post `prompt` for `model` from `sender`'s account, paying `fee` wei, decoded as
    `sampling` says (its seed the consumer's); a provider must commit within `commit_seconds`
    of the latest block. A revert raises ContractRevert."""
    check_request(model, prompt, max_tokens, fee, commit_seconds, sampling)
    now = next_block_time(coordinator.w3)
    spec = RequestSpec(model_id=model_id(model), prompt=prompt, max_tokens=max_tokens,
                       commit_deadline=now + commit_seconds, sampling=sampling)
    receipt = sender.send(coordinator.post_request_tx(spec, fee), coordinator.artifact)
    (event,) = coordinator.events(receipt, "RequestPosted")
    return PostedRequest(
        request_id=event["requestId"],
        tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
        block_number=receipt["blockNumber"],
        consumer=sender.address,
        model_id="0x" + spec.model_id.hex(),
        prompt=list(prompt),
        max_tokens=max_tokens,
        fee=fee,
        commit_deadline=spec.commit_deadline,
        draw=Sampling.from_chain(*(event["sampling"][k] for k in ("temperature", "topP",
                                                                   "seed"))),
    )


def wait_for_result(
    coordinator: InferenceCoordinator, request_id: int, *, poll_interval: float = 1.0,
    timeout: float | None = None, on_change: Callable[[Status, str], None] = lambda *_: None,
) -> Result:
    """Poll `request_id` until it is final; its verified result.

    RequestNotServed when it was refunded, rejected, or its commit deadline passed with no
    claim (nobody will answer it); UserError when `timeout` seconds pass first. `on_change`
    hears each new status with a one-line explanation.
    """
    started = time.monotonic()
    seen: Status | None = None
    while True:
        # The time before the status: a request still open after a time past its deadline
        # can never be committed (read the other way round, a commit landing between the two
        # reads would look like a missed deadline).
        now = next_block_time(coordinator.w3)
        request = coordinator.get_request(request_id)
        if request.status != seen:
            seen = request.status
            on_change(seen, _explain(coordinator, request_id, request))
        if request.status == Status.FINALIZED:
            return coordinator.get_result(request_id)
        if request.status == Status.REFUNDED:
            raise RequestNotServed(f"request {request_id} was refunded: no provider committed "
                                   "an answer before its deadline")
        if request.status == Status.REJECTED:
            raise RequestNotServed(f"request {request_id} was rejected: its provider lost a "
                                   "dispute over the answer, and the fee was refunded")
        if request.status == Status.OPEN and now > request.commit_deadline:
            raise RequestNotServed(
                f"request {request_id}: no provider committed an answer before its "
                f"deadline ({request.commit_deadline}); the coordinator's refund({request_id})"
                " credits the fee back")
        if timeout is not None and time.monotonic() - started > timeout:
            raise UserError(f"request {request_id} is still {request.status.name.lower()} "
                            f"after {timeout:g} s")
        time.sleep(poll_interval)


def _explain(coordinator: InferenceCoordinator, request_id: int, request) -> str:
    if request.status == Status.OPEN:
        return f"request {request_id} is open until {request.commit_deadline}"
    if request.status == Status.COMMITTED:
        deadline = coordinator.challenge_deadline(request_id)
        return (f"request {request_id} answered by {request.provider}; final from {deadline} "
                "unless disputed")
    return f"request {request_id} is {request.status.name.lower()}"
