"""The node's HTTP API (FastAPI): its model for download, the requests and games in its
database, posting requests for clients without a wallet, health and metrics.

    app = create_app(load_settings())      # `optinfer api` serves it with uvicorn

Reads come from the store the provider node and the watchtower fill (nothing here writes to
it), so the API can run in a process of its own. The chain is reached on first use: a node
whose chain or deployments file is missing still serves its model and its database, and the
routes that need the chain answer 503.

Errors are JSON ``{"detail": ...}``: 400 for input the model refuses (a prompt too long, a
character the tokenizer lacks, chat messages for a model without a chat template), 401/403 for
a missing/wrong API key, 404 for an unknown id, 413 for a body over 2 MiB, 422 for input that
breaks the schema (strict types: no true, "5" or 5.0 for an integer; finite numbers; Unicode
text) or nests deeper than 16 levels, 503 with ``Retry-After`` when the chain or the database
does not answer.
The OpenAPI schema is at ``/openapi.json``.
"""

from __future__ import annotations

import hmac
import logging
import threading
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from web3.exceptions import TimeExhausted, Web3RPCError

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import InferenceCoordinator
from optinfer.contracts.registry import ModelSpec
from optinfer.contracts.sender import InsufficientFunds, TxFailed, TxSender
from optinfer.errors import UserError
from optinfer.models.runtime import IntegerModel
from optinfer.models.sampling import (
    MAX_TEMPERATURE,
    SEED_LIMIT,
    TEMPERATURE_UNIT,
    TOP_P_UNIT,
    Sampling,
)
from optinfer.services import consumer
from optinfer.services import store as st
from optinfer.services.api_guard import BodyGuard, restore_recursion_limit
from optinfer.services.chain import RetryPolicy, connect, connect_settings
from optinfer.services.deployments import Deployments
from optinfer.services.metrics import ChainView, NodeMetrics
from optinfer.services.settings import Settings
from optinfer.services.statuses import ClaimStatus, GameStatus, RequestStatus
from optinfer.services.store import Store

log = logging.getLogger(__name__)

API_VERSION = "1"
MAX_ID = 2**63 - 1  # ids are BIGINT columns
MAX_LIMIT = 1000
HEALTH_TIMEOUT_S = 5.0
# A wei amount as decimal digits: JSON numbers lose precision above 2**53 in most clients.
WEI = r"^[0-9]{1,78}$"
MODEL_ID = r"^0x[0-9a-fA-F]{64}$"


# ----------------------------------------------------------------------------- schemas


class ErrorBody(BaseModel):
    detail: str = Field(description="What was wrong, in one line.")


class ModelSummary(BaseModel):
    id: str = Field(description="The model id: what requests name and the registry keys by "
                    "(ModelSpec.model_id).")
    format: str
    opset_version: int
    max_context: int = Field(description="Most tokens of prompt + output - 1.")
    nodes: int = Field(description="Nodes of the verify graph (the trace's length).")
    config: dict[str, Any] = Field(description="Architecture (hidden size, layers, vocab...).")
    files: dict[str, str] = Field(description="File name -> SHA-256 (hex) of each model file, "
                                  "downloadable at /v1/models/{id}/files/{name}.")


class ModelList(BaseModel):
    models: list[ModelSummary]


class ClaimView(BaseModel):
    provider: str
    output: list[int]
    output_text: str | None = Field(None, description="The output decoded by this node's "
                                    "tokenizer (when the request is for its model).")
    challenge_deadline: int
    block_number: int
    tx_hash: str
    status: ClaimStatus
    verdict: str | None


class DrawView(BaseModel):
    """How a request's answer is decoded, as the chain stored it (docs/protocol.md,
    "Sampling")."""

    temperature: float = Field(description="0: greedy decoding.")
    top_p: float
    seed: int = Field(description="The draw's seed, which the chain derived from the "
                      "consumer's seed and the request id when the request was posted.")

    @classmethod
    def of(cls, draw: Sampling) -> DrawView:
        return cls(temperature=draw.temperature / TEMPERATURE_UNIT,
                   top_p=draw.top_p / TOP_P_UNIT, seed=draw.seed)


class RequestView(BaseModel):
    request_id: int
    consumer: str
    model_id: str
    prompt: list[int]
    prompt_text: str | None = None
    max_tokens: int
    fee: str = Field(description="Wei, as decimal digits.")
    callback: str
    callback_gas_limit: int
    named_provider: str
    commit_deadline: int
    draw: DrawView
    block_number: int
    tx_hash: str
    status: RequestStatus = Field(description="The node's view, following the chain: open, "
                                  "committing (answer written, commit sent), committed, "
                                  "finalized, rejected, refunded (nobody answered in time), or "
                                  "skipped (this node will not serve it, `note` says why).")
    note: str | None
    claim: ClaimView | None
    games: list[int] = Field(description="Ids of the dispute games on this request.")


class RequestPage(BaseModel):
    requests: list[RequestView]
    next_after: int | None = Field(description="Pass as `after` for the next page (null: "
                                   "this was the last).")


class MoveView(BaseModel):
    seq: int = Field(description="The move's position among its player's moves: two per "
                     "round, the second for a one-step or a timeout claim.")
    actor: str
    kind: str
    payload: dict[str, Any] = Field(description="The move's scalars, roots and shape; its "
                                    "paths and children lists by their length; a one-step "
                                    "by its node and element.")
    tx_hash: str | None
    block_number: int | None


class GameRoleView(BaseModel):
    role: str = Field(description="The role this node plays in the game.")
    phase: str
    k: int | None = Field(description="The disputed node once bisection found it.")
    rounds: int
    status: GameStatus
    moves: list[MoveView]


class GameView(BaseModel):
    game_id: int
    request_id: int
    roles: list[GameRoleView]


def unicode_text(value: str) -> str:
    """`value` if it is text a tokenizer can read: JSON's \\u escapes can spell a lone UTF-16
    surrogate, which is no character and has no UTF-8 form."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"must be Unicode text: a lone surrogate at character {err.start}"
                         ) from None
    return value


class RequestOptions(BaseModel):
    """What a posted request holds besides its prompt."""

    # Unknown keys are refused: with the three prompt forms below, a body holding two (or a
    # misspelt key) must not be read as one of them. Strict: an integer is a JSON integer,
    # never true, "5" or 5.0 (what is posted on chain is what the client wrote).
    model_config = ConfigDict(extra="forbid", strict=True)

    max_tokens: int = Field(ge=1, le=consumer.MAX_TOKENS_ON_CHAIN)
    fee: str = Field(str(consumer.DEFAULT_FEE), pattern=WEI,
                     description="Wei paid to the provider, as decimal digits (< 2**96).")
    commit_seconds: int = Field(consumer.DEFAULT_COMMIT_SECONDS,
                                ge=consumer.MIN_COMMIT_SECONDS, le=30 * 86400,
                                description="Seconds a provider has to commit an answer.")
    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE / TEMPERATURE_UNIT,
                               description="0 decodes greedily; 0.05-2 draws the answer (a "
                               "model registered as sampling).")
    top_p: float = Field(1.0, gt=0, le=1, description="With a temperature: draw from the "
                         "most probable tokens whose probabilities reach this.")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="The consumer's seed: the chain "
                      "derives the draw's seed from it and the request id.")

    def sampling(self) -> Sampling:
        """The request's `Sampling` (UserError outside the limits)."""
        return Sampling.from_floats(self.temperature, self.top_p, self.seed)


class TextPrompt(RequestOptions):
    prompt: str = Field(min_length=1, max_length=100_000,
                        description="Prompt text, tokenized by the model's tokenizer.")

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return unicode_text(value)


class TokenPrompt(RequestOptions):
    prompt_tokens: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field(
        min_length=1, max_length=100_000, description="The prompt as token ids.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return unicode_text(value)


class ChatPrompt(RequestOptions):
    messages: list[ChatMessage] = Field(
        min_length=1, max_length=1000,
        description="A conversation, formatted with the model's chat template into the prompt's "
        "token ids (ending with the opening of the assistant's turn). 400 when the model has "
        "no chat template.")


class PostedRequestView(BaseModel):
    request_id: int
    tx_hash: str
    block_number: int
    consumer: str
    model_id: str
    prompt: list[int]
    max_tokens: int
    fee: str
    commit_deadline: int
    draw: DrawView


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: str = Field(description="ok, or why it is unreachable.")
    rpc: str = Field(description="ok, or why it is unreachable.")
    chain_id: int | None = None
    block_number: int | None = None


# ------------------------------------------------------------------------------- node


@dataclass(frozen=True)
class Chain:
    deployments: Deployments
    coordinator: InferenceCoordinator


class ApiNode:
    """What the routes share: settings, the store, the model served, the chain (opened on
    first use and kept) and the metrics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store(settings.database)
        # The API may start before the node that fills the store: the tables must exist.
        self.store.migrate()
        self.model = IntegerModel(settings.model_path)
        self.manifest_bytes = (self.model.dir / "manifest.json").read_bytes()
        self.model_id = "0x" + ModelSpec.from_manifest_bytes(
            self.manifest_bytes, "", what=str(self.model.dir / "manifest.json")).model_id.hex()
        self.w3 = connect_settings(settings)
        # Health checks and scrapes must answer quickly: one try, a short timeout.
        self.quick_w3 = connect(settings.rpc_url, RetryPolicy(attempts=1),
                                min(settings.request_timeout, HEALTH_TIMEOUT_S))
        self._lock = threading.Lock()
        self._chain: Chain | None = None
        self._sender: TxSender | None = None
        self._view: ChainView | None = None
        self.metrics = NodeMetrics(self.store, self._chain_view)

    def chain(self) -> Chain:
        """The deployment on the configured chain; UserError when it cannot be reached."""
        with self._lock:
            if self._chain is None:
                deployments = Deployments.read(self.settings.deployments_file)
                # One quick try: a scrape or a health check must not wait for retries.
                deployments.check_chain(self.quick_w3)
                self._chain = Chain(deployments, InferenceCoordinator(
                    self.w3, deployments.address("InferenceCoordinator")))
            return self._chain

    def consumer_sender(self) -> TxSender:
        """The account that pays for posted requests (one sender: it numbers the nonces)."""
        chain = self.chain()
        with self._lock:
            if self._sender is None:
                account = self.settings.signer("consumer", chain.deployments.chain_id)
                self._sender = TxSender(self.w3, account)
            return self._sender

    def _chain_view(self) -> ChainView:
        chain = self.chain()
        with self._lock:
            if self._view is None:
                try:
                    provider = self.settings.signer("provider", chain.deployments.chain_id).address
                except UserError:  # no provider key off the development chain
                    provider = None
                coordinator = InferenceCoordinator(self.quick_w3, chain.coordinator.address)
                self._view = ChainView(self.quick_w3, coordinator, provider)
            return self._view

    def decode(self, model_id: str, tokens: list[int]) -> str | None:
        """`tokens` as text, when they are for this node's model and its tokenizer has them."""
        if model_id.lower() != self.model_id:
            return None
        try:
            self.model.check_tokens(tokens, "tokens")
            return self.model.decode_text(tokens)
        except Exception:  # noqa: BLE001 -- text is a convenience; the ids are the answer
            return None


def get_node(request: Request) -> ApiNode:
    return request.app.state.node


NodeDep = Annotated[ApiNode, Depends(get_node)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="The node's api_key setting.")


def require_api_key(node: NodeDep, given: Annotated[str | None, Security(api_key_header)]
                    ) -> None:
    expected = node.settings.api_key
    if given is None:
        raise HTTPException(401, "missing X-API-Key header",
                            headers={"WWW-Authenticate": "APIKey"})
    if expected is None:
        raise HTTPException(403, "this node does not post requests (no api_key setting)")
    # Constant time: the comparison must not tell how much of a guess was right.
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPException(403, "wrong X-API-Key")


RETRY_AFTER = {"Retry-After": "5"}
"""Sent with every 503: the chain or the database is expected back; ask again then."""


def unavailable(err: Exception) -> HTTPException:
    return HTTPException(503, f"the chain is unavailable: {err}", headers=RETRY_AFTER)


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 503)}


def errors(*codes: int) -> dict:
    return {code: ERRORS[code] for code in codes}


# ----------------------------------------------------------------------------- models

models_router = APIRouter(prefix="/v1/models", tags=["models"])
ModelIdPath = Annotated[str, Path(pattern=MODEL_ID, description="The model id, 0x + 64 hex.")]


def served_manifest(node: ApiNode, model_id: str) -> dict:
    if model_id.lower() != node.model_id:
        raise HTTPException(404, f"this node does not serve model {model_id}")
    return node.model.manifest


@models_router.get("", response_model=ModelList)
def list_models(node: NodeDep) -> ModelList:
    """The model this node serves (its id is the one the registry keys it by)."""
    manifest = node.model.manifest
    return ModelList(models=[ModelSummary(
        id=node.model_id, format=manifest["format"], opset_version=manifest["opset_version"],
        max_context=manifest["max_context"], nodes=manifest["nodes"],
        config=manifest["config"], files=manifest["files"])])


@models_router.get(
    "/{model_id}", response_class=Response, responses={
        200: {"content": {"application/json": {"schema": {"type": "object"}}},
              "description": "manifest.json, byte for byte (the registry holds its SHA-256)."},
        **errors(404)})
def get_manifest(model_id: ModelIdPath, node: NodeDep) -> Response:
    """The model's manifest file, exactly as registered."""
    served_manifest(node, model_id)
    return Response(node.manifest_bytes, media_type="application/json")


@models_router.get(
    "/{model_id}/files/{name}", response_class=FileResponse, responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                  "format": "binary"}}},
              "description": "The file, streamed."},
        **errors(404)})
def get_model_file(model_id: ModelIdPath, name: str, node: NodeDep) -> FileResponse:
    """A file the manifest lists (model.onnx, weights.bin, tokenizer.json, ...)."""
    manifest = served_manifest(node, model_id)
    # Only names the manifest lists: never a path a client made up.
    if name not in manifest["files"]:
        raise HTTPException(404, f"model {model_id} has no file {name!r} (it has "
                            f"{', '.join(sorted(manifest['files']))})")
    return FileResponse(node.model.dir / name, media_type="application/octet-stream",
                        filename=name)


# --------------------------------------------------------------------------- requests

requests_router = APIRouter(prefix="/v1/requests", tags=["requests"])


def request_view(node: ApiNode, request: st.RequestRecord, claim: st.ClaimRecord | None,
                 game_ids: list[int]) -> RequestView:
    claim_view = None
    if claim is not None:
        claim_view = ClaimView(
            provider=claim.provider, output=claim.output,
            output_text=node.decode(request.model_id, claim.output),
            challenge_deadline=claim.challenge_deadline, block_number=claim.block_number,
            tx_hash=claim.tx_hash, status=claim.status, verdict=claim.verdict)
    return RequestView(
        request_id=request.request_id, consumer=request.consumer, model_id=request.model_id,
        prompt=request.prompt, prompt_text=node.decode(request.model_id, request.prompt),
        max_tokens=request.max_tokens, fee=str(request.fee), callback=request.callback,
        callback_gas_limit=request.callback_gas_limit, named_provider=request.named_provider,
        commit_deadline=request.commit_deadline, draw=DrawView.of(request.draw),
        block_number=request.block_number,
        tx_hash=request.tx_hash, status=request.status, note=request.note, claim=claim_view,
        games=game_ids)


def request_views(node: ApiNode, *, status: RequestStatus | None = None, after: int = -1,
                  limit: int = 100) -> list[RequestView]:
    with node.store.transaction() as conn:
        page = st.requests_page(conn, status=status, after=after, limit=limit)
        game_ids = st.game_ids_by_request(conn, [request.request_id for request, _ in page])
    return [request_view(node, request, claim, game_ids.get(request.request_id, []))
            for request, claim in page]


@requests_router.get("", response_model=RequestPage)
def list_requests(
    node: NodeDep,
    status: Annotated[RequestStatus | None, Query(description="Only requests in this "
                                                  "status.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    after: Annotated[int, Query(ge=-1, le=MAX_ID, description="Only ids above this one.")] = -1,
) -> RequestPage:
    """Requests the node has seen, by id."""
    page = request_views(node, status=status, after=after, limit=limit)
    last = page[-1].request_id if len(page) == limit else None
    return RequestPage(requests=page, next_after=last)


@requests_router.get("/{request_id}", response_model=RequestView, responses=errors(404))
def get_request(request_id: Annotated[int, Path(ge=0, le=MAX_ID)], node: NodeDep
                ) -> RequestView:
    """One request with its claim and the ids of its games."""
    found = request_views(node, after=request_id - 1, limit=1)  # the first id from it on
    if not found or found[0].request_id != request_id:
        raise HTTPException(404, f"request {request_id} is not known to this node")
    return found[0]


@requests_router.post(
    "", status_code=201, response_model=PostedRequestView,
    dependencies=[Depends(require_api_key)], responses=errors(400, 401, 403, 413, 503))
def post_request(body: TextPrompt | TokenPrompt | ChatPrompt, node: NodeDep
                 ) -> PostedRequestView:
    """Post a request on chain for the node's model, paid by the node's consumer account.
    The prompt is one of `prompt` (text), `prompt_tokens` (ids) or `messages` (a conversation
    in the model's chat template); the response's `prompt` holds the ids posted."""
    try:
        if isinstance(body, TextPrompt):
            tokens = consumer.prompt_tokens(node.model, text=body.prompt)
        elif isinstance(body, ChatPrompt):
            tokens = consumer.prompt_tokens(
                node.model, messages=[message.model_dump() for message in body.messages])
        else:
            tokens = consumer.prompt_tokens(node.model, tokens=body.prompt_tokens)
        sampling = body.sampling()
        consumer.check_request(node.model, tokens, body.max_tokens, int(body.fee),
                               body.commit_seconds, sampling)
    except UserError as err:
        raise HTTPException(400, str(err)) from None
    try:
        coordinator = node.chain().coordinator
        sender = node.consumer_sender()
        balance = node.w3.eth.get_balance(sender.address)
        if int(body.fee) > balance:
            raise HTTPException(400, f"the node's consumer account holds {balance} wei: it "
                                f"cannot pay a fee of {body.fee}")
        posted = consumer.post_request(
            coordinator, sender, node.model, tokens, max_tokens=body.max_tokens,
            fee=int(body.fee), commit_seconds=body.commit_seconds, sampling=sampling)
    except ContractRevert as err:
        raise HTTPException(400, f"the coordinator refused the request: {err.name or err}"
                            f"{err.args_decoded if err.name else ''}") from None
    except (Web3RPCError, InsufficientFunds) as err:
        # The node refused the transaction itself: the consumer account cannot pay, say.
        raise HTTPException(503, f"the chain refused the transaction: {err}",
                            headers=RETRY_AFTER) from None
    except TxFailed as err:
        # Mined but reverted although its estimate passed: the chain moved in between.
        raise HTTPException(503, str(err), headers=RETRY_AFTER) from None
    except TimeExhausted as err:
        # Sent, not mined within the sender's receipt timeout (the request may still land:
        # GET /v1/requests lists it once it does).
        raise HTTPException(503, f"the request was sent but not mined in time: {err}",
                            headers=RETRY_AFTER) from None
    except UserError as err:
        raise unavailable(err) from None
    log.info("posted request %d for %s: %d prompt tokens, fee %d, tx %s", posted.request_id,
             posted.consumer, len(tokens), posted.fee, posted.tx_hash)
    return PostedRequestView(**{**posted.__dict__, "fee": str(posted.fee),
                                "draw": DrawView.of(posted.draw)})


# ------------------------------------------------------------------------------ games

games_router = APIRouter(prefix="/v1/games", tags=["games"])


@games_router.get("/{game_id}", response_model=GameView, responses=errors(404))
def get_game(game_id: Annotated[int, Path(ge=0, le=MAX_ID)], node: NodeDep) -> GameView:
    """A dispute game as this node plays it (as provider, challenger or both), move by move."""
    with node.store.transaction() as conn:
        records = st.game_records(conn, game_id)
        recorded = {record.player: st.game_moves(conn, game_id, record.player)
                    for record in records}
    if not records:
        raise HTTPException(404, f"game {game_id} is not known to this node")
    roles = [GameRoleView(
        role=record.player.value, phase=record.phase.value, k=record.k, rounds=record.rounds,
        status=record.status,
        moves=[MoveView(seq=m.seq, actor=m.actor.value, kind=m.kind, payload=m.payload,
                        tx_hash=m.tx_hash, block_number=m.block_number)
               for m in recorded[record.player]])
        for record in records]
    return GameView(game_id=game_id, request_id=records[0].request_id, roles=roles)


# ------------------------------------------------------------------------- operations

ops_router = APIRouter(tags=["operations"])


@ops_router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(node: NodeDep) -> JSONResponse:
    """200 when the database and the chain's RPC answer, 503 (same body) when one does not."""
    health = Health(status="ok", database="ok", rpc="ok")
    try:
        with node.store.transaction() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as err:
        health.database = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    try:
        health.chain_id = node.quick_w3.eth.chain_id
        health.block_number = node.quick_w3.eth.block_number
    except Exception as err:  # noqa: BLE001 -- whatever the node answered, it is not healthy
        health.rpc = f"{type(err).__name__}: {str(err)[:200]}" if str(err) else type(err).__name__
    if health.database != "ok" or health.rpc != "ok":
        health.status = "unavailable"
    return JSONResponse(health.model_dump(), status_code=200 if health.status == "ok" else 503)


@ops_router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
          "description": "Prometheus text format (see docs/operators.md, HTTP API)."}})
def metrics(node: NodeDep) -> Response:
    """Prometheus metrics, read from the database and the chain now."""
    node.metrics.refresh()
    return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -------------------------------------------------------------------------------- app


def create_app(settings: Settings) -> FastAPI:
    """The API of the node configured by `settings` (the store is migrated now)."""
    app = FastAPI(
        title="optinfer node API", version=API_VERSION,
        description="Verifiable LLM inference: this node's model, requests and dispute games.")
    app.state.node = ApiNode(settings)
    for router in (models_router, requests_router, games_router, ops_router):
        app.include_router(router)

    @app.exception_handler(sa.exc.OperationalError)
    def _database_down(request: Request, err: sa.exc.OperationalError) -> JSONResponse:
        first = str(err).splitlines()[0][:200]
        return JSONResponse({"detail": f"the database is unavailable: {first}"}, 503,
                            headers=RETRY_AFTER)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 body, without the offending input echoed back: an infinite or
        # NaN number, or a lone surrogate, has no JSON form and made the answer a 500.
        found = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                 for e in err.errors()]
        return JSONResponse({"detail": found}, 422)

    # Before anything parses a body (app.add_middleware wraps the whole app).
    restore_recursion_limit()
    app.add_middleware(BodyGuard)
    return app
