"""The provider node: serve requests, commit the answers, defend every dispute until it ends.

One node is one provider key, one model (loaded once) and one database. Each step can be
driven on its own, in-process (``poll_once``: what the embedded demo and the tests call), or
by :meth:`ProviderNode.run`, which serves on a thread of its own while the main loop watches
the chain, plays the games and finalizes claims, so a long generation never makes a game wait.

* Watching: one :class:`EventCursor` over ``RequestPosted`` records every request (status
  ``open``), one over the DisputeGame's ``GameOpened`` records the games against this
  provider.
* Serving: :func:`serve_decision` (pure) says serve, or skip with a reason; a served request
  is generated with the KV cache, greedy or drawn as the request says, and handed to a
  second thread, which writes its row (status ``committing``, the output) and sends its
  commit, while the next generation runs; a third waits for the receipts, so commits sent
  one after another share a block on a chain that mines every few seconds (the honest path's
  overhead is the last commit alone).
* Crash safety: the ``committing`` row (the output, the signed commit's hash) is written
  before the commit is sent, and finished after a restart by asking the chain first
  (``getRequest``): committed by us -> recorded; still open -> the recorded transaction
  waited for if the node has it (pending), else committed again with the same output.
* Defending: every poll takes a turn in each open game (``services.responder.GameResponder``,
  the watchtower's too: read, ``prover.game.decide``, journal, send); the moves of all games
  are sent, then waited for together. The trace is computed the first time a game needs a
  provider move, once per disputed claim, never on the honest path; after a restart it is
  recomputed.
* Finalizing: a claim past its challenge window with no open dispute is finalized by the
  node itself (the fee is credited on finalization; all finalizes due are sent, then waited
  for together); ``services/payouts.py`` collects fees and bonds.

``lie="last-token"`` is for demonstrations only: the node commits its answer with the last
token before EOS changed and defends with the matching dishonest trace, and so loses its
disputes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import ZERO_ADDRESS, InferenceCoordinator, Status
from optinfer.contracts.dispute_game import DisputeGame
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.contracts.sender import KeyInUse, TxFailed, TxSender
from optinfer.errors import UserError
from optinfer.models.generation import (
    Answer,
    GenerationProcess,
    Job,
    format_cpu_list,
    generate_in_process,
    pin_this_thread,
    split_cpus,
)
from optinfer.prover.game import ModelTrace, Phase, Role
from optinfer.services import store as st
from optinfer.services.chain import RpcUnavailable
from optinfer.services.deployments import Deployments
from optinfer.services.events import (
    OUTCOMES,
    ChainEvent,
    EventCursor,
    chain_event,
    claim_record,
    confirm_outcomes,
    follow_outcome,
    logs_since,
    request_record,
)
from optinfer.services.responder import GameGone, GameResponder, SentMove
from optinfer.services.statuses import ClaimStatus, GameStatus, RequestStatus
from optinfer.services.store import RequestRecord, Store

log = logging.getLogger("optinfer.provider")

LIE_MODES = ("off", "last-token")

CRASH_ENV = "OPTINFER_CRASH_AT"
"""Tests only: ``before-commit``, ``after-commit`` or ``before-move-N`` makes the node kill
itself with SIGKILL at that point (N counts this process's moves from 1), so a test can
restart it from exactly there."""

REQUESTS_CURSOR = "provider.requests"
GAMES_CURSOR = "provider.games"

SERVE_BATCH = 64
"""Open requests read from the store at a time by the serving loop."""

# Stake problems free themselves (claims finalize and unlock stake): the commit waits.
RETRY_LATER = {"InsufficientFreeStake", "StakeBelowMinimum", "ProviderNotRegistered"}


# What the chain's settled statuses make of a request and its claim, and the coordinator's
# event that says so.
_OUTCOMES = {Status.FINALIZED: (RequestStatus.FINALIZED, ClaimStatus.FINALIZED, "Finalized"),
             Status.REJECTED: (RequestStatus.REJECTED, ClaimStatus.SLASHED, "Slashed")}


# ------------------------------------------------------------------------ pure decisions


@dataclass(frozen=True)
class ServedModel:
    """What :func:`serve_decision` needs to know of the node's model."""

    model_id: str  # 0x + 64 hex digits: the registry's id (ModelSpec.model_id)
    max_context: int
    vocab_size: int


def serve_decision(request: RequestRecord, model: ServedModel, provider: str,
                   now: int) -> str | None:
    """None when this node should answer `request` at chain time `now`; else why not."""
    if request.model_id.lower() != model.model_id.lower():
        return f"model {request.model_id} is not the one this node serves ({model.model_id})"
    named = request.named_provider
    if named != ZERO_ADDRESS and named.lower() != provider.lower():
        return f"named to another provider, {named}"
    length = len(request.prompt) + request.max_tokens - 1
    if length > model.max_context:
        return (f"prompt ({len(request.prompt)} tokens) plus max tokens ({request.max_tokens}) "
                f"exceed the model's context of {model.max_context}")
    outside = [token for token in request.prompt if not 0 <= token < model.vocab_size]
    if outside:
        return f"prompt token {outside[0]} is outside the vocabulary (0..{model.vocab_size - 1})"
    if now > request.commit_deadline:
        return f"its commit deadline {request.commit_deadline} has passed (chain time {now})"
    return None


def claimed_output(output: list[int], lie: str, vocab_size: int,
                   eos_ids: tuple[int, ...] = ()) -> list[int]:
    """What the node commits for its generated `output`: the output itself, or with
    ``lie="last-token"`` the output with the last token before its EOS (`eos_ids`) changed to
    another token that is not EOS either (demonstrations only)."""
    if lie == "off":
        return list(output)
    if lie == "last-token":
        # The last token of the answer proper: an EOS stays where it is, so that the lie is
        # shaped as an answer (the coordinator refuses a truncated one at commit).
        position = len(output) - 2 if len(output) > 1 and output[-1] in eos_ids \
            else len(output) - 1
        token = (output[position] + 1) % vocab_size
        while token in eos_ids or token == output[position]:
            token = (token + 1) % vocab_size
        return [*output[:position], token, *output[position + 1:]]
    raise ValueError(f"lie must be one of {LIE_MODES}, got {lie!r}")


# ---------------------------------------------------------------------------- the node


class _AlreadySettled(Exception):
    """The request left `open`/`committing` before its commit was sent: nothing to send."""


@dataclass(frozen=True)
class Served:
    """One request answered: its tokens and timings (seconds)."""

    request_id: int
    tokens: int
    generate_s: float
    commit_s: float
    latency_s: float  # from the start of its generation to its commit mined
    tx_hash: str


@dataclass(frozen=True)
class Prepared:
    """An answer to commit (its row says ``committing`` once the committer has it)."""

    request_id: int
    output: list[int]
    started: float  # time.perf_counter() when its generation started
    generate_s: float = 0.0
    resumed: bool = False  # found in `committing` at start: the chain may have it already
    commit_tx: str | None = None  # the commit sent before a restart, if it got that far


def _crash_point(point: str) -> None:
    if os.environ.get(CRASH_ENV) == point:
        log.warning("%s=%s: killing this process now", CRASH_ENV, point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


class ProviderNode:
    """The provider node on chain `w3` with `deployments`, `model` and `store` (migrated),
    signing with `account`. Build it with :meth:`start` to register the model and stake."""

    def __init__(self, *, w3: Web3, store: Store, deployments: Deployments, model,
                 account: LocalAccount, lie: str = "off", poll_interval: float = 1.0,
                 confirmations: int = 0, max_block_range: int = 2000,
                 generator: GenerationProcess | None = None,
                 serving_cpus: frozenset[int] | None = None):
        if lie not in LIE_MODES:
            raise UserError(f"lie must be one of {', '.join(LIE_MODES)}, got {lie!r}")
        self.w3, self.store, self.deployments, self.model = w3, store, deployments, model
        # Where answers are generated: `model` itself, or (ProviderNode.start) a process of
        # their own, so the node's other threads never slow the token loop.
        self.generator = generator
        # Where run()'s serving thread (and the committer and confirmer it starts) may run:
        # off the generation process's CPUs. None: anywhere.
        self.serving_cpus = serving_cpus
        self.account = account
        self.address = account.address
        # The provider's key is its own: another process sending from it makes this node stop
        # (KeyInUse) rather than race it for nonces and leave answers uncommitted.
        self.sender = TxSender(w3, account, exclusive=True)
        self.lie = lie
        self.poll_interval = poll_interval
        self.coordinator = InferenceCoordinator(w3, deployments.address("InferenceCoordinator"))
        self.registry = ModelRegistry(w3, deployments.address("ModelRegistry"))
        self.game = DisputeGame(w3, deployments.address("DisputeGame"))
        self.spec = ModelSpec.from_manifest(model.dir / "manifest.json")
        self.served_model = ServedModel("0x" + self.spec.model_id.hex(), model.max_context,
                                        model.vocab_size)
        cursor_options = dict(start_block=deployments.block_number, confirmations=confirmations,
                              max_block_range=max_block_range)
        # What became of every request too, so that the node's database agrees with the chain
        # (another provider's answer, a refund), whoever acted.
        self.requests_cursor = EventCursor(w3, store, REQUESTS_CURSOR, [self.coordinator.contract],
                                           events=["RequestPosted", *OUTCOMES],
                                           on_rewind=self._outcomes_lost,
                                           on_read=self._outcomes_unconfirmed, **cursor_options)
        self.games_cursor = EventCursor(w3, store, GAMES_CURSOR, [self.game.contract],
                                        events=["GameOpened"], on_rewind=self._games_lost,
                                        **cursor_options)
        # The lease holder's name is the key: a restarted node takes its games back at once.
        self.worker = f"provider:{self.address}"
        self.lease_seconds = max(60.0, 10 * poll_interval)
        self._moves_sent = 0
        self._fee_cache: tuple[dict[str, int] | None, float] = (None, 0.0)
        self.responder = GameResponder(
            w3=w3, store=store, game=self.game, sender=self.sender, role=Role.PROVIDER,
            trace_of=self._trace, log=log, before_send=self._before_move)
        self.new_requests = threading.Event()

    # -- start-up -------------------------------------------------------------------------

    @classmethod
    def start(cls, settings, *, register: bool = False, stake: int | None = None,
              threads: int = 1, lie: str | None = None) -> ProviderNode:
        """Connect, migrate, load the model once, check (or with `register`, register) the
        model in the registry, and register and stake the provider if it is not yet."""
        from optinfer.models.runtime import IntegerModel

        cpus = split_cpus(settings.generation_cpus, threads)  # the machine's, checked first
        store = Store(settings.database)
        store.migrate()
        w3, deployments = Deployments.on_chain(settings)
        model = IntegerModel(settings.model_path, threads=threads)
        account = settings.signer("provider", deployments.chain_id)
        node = cls(w3=w3, store=store, deployments=deployments, model=model, account=account,
                   lie=lie or settings.provider_lie, poll_interval=settings.poll_interval,
                   confirmations=settings.confirmations, max_block_range=settings.max_block_range,
                   generator=GenerationProcess(
                       model.dir, threads=threads, cpus=cpus and cpus.generation,
                       max_batch=settings.max_batch,
                       kv_budget_bytes=(None if settings.kv_cache_budget_mb is None else
                                        int(settings.kv_cache_budget_mb * 2**20))),
                   serving_cpus=cpus and cpus.node)
        node.ensure_model_registered(register)
        node.ensure_provider_registered(stake)
        log.info("provider %s serving model %s (%s, %d nodes) on chain %d, coordinator %s, "
                 "%s%s", node.address, node.served_model.model_id, model.dir,
                 node.spec.node_count, deployments.chain_id, node.coordinator.address,
                 f"generating on CPU {format_cpu_list(cpus.generation)}, serving on "
                 f"{format_cpu_list(cpus.node)}" if cpus else "generation not pinned to CPUs",
                 "; LYING at the last token (demonstration mode)" if node.lie != "off" else "")
        return node

    def ensure_model_registered(self, register: bool) -> None:
        """UserError unless the model's id is registered (or `register` registers it, after
        ``ModelSpec.check_registrable``). The id binds the roots, node count, max context, EOS
        ids and manifest hash, so a registration under it is this model's, whoever made it."""
        if self.registry.is_registered(self.spec.model_id):
            return
        if not register:
            raise UserError(
                f"model {self.served_model.model_id} ({self.model.dir}) is not registered "
                f"in the ModelRegistry at {self.registry.address}: pass --register to "
                "register it, or set OPTINFER_MODEL_DIR to a registered model")
        try:
            self.spec.check_registrable()
        except UserError as err:
            raise UserError(f"model {self.model.dir} cannot be registered: {err}") from None
        receipt = self.sender.send(self.registry.register_tx(self.spec), self.registry.artifact)
        log.info("registered model %s in tx %s", self.served_model.model_id,
                 receipt["transactionHash"].to_0x_hex())

    def ensure_provider_registered(self, stake: int | None) -> None:
        """Register and stake (`stake` wei, default the coordinator's minimum) unless this
        key is a provider already."""
        functions = self.coordinator.contract.functions
        if functions.isProvider(self.address).call():
            staked, locked = self.coordinator.provider_stake(self.address)
            log.info("provider %s already registered: stake %d wei, %d locked", self.address,
                     staked, locked)
            return
        minimum = self.coordinator.parameter("minimumStake")
        amount = minimum if stake is None else stake
        if amount < minimum:
            raise UserError(f"--stake {amount} is below the coordinator's minimum stake "
                            f"{minimum} wei")
        receipt = self.sender.send(self.coordinator.register_provider_tx(amount),
                                   self.coordinator.artifact)
        log.info("registered provider %s with stake %d wei in tx %s", self.address, amount,
                 receipt["transactionHash"].to_0x_hex())

    # -- the loop -------------------------------------------------------------------------

    def poll_once(self) -> list[Served]:
        """One step of everything, in order: watch, serve, defend, finalize."""
        self.watch()
        served = self.serve_pending()
        self.defend()
        self.finalize_due()
        return served

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set: serve on a thread of its own; watch, defend and finalize every
        poll interval here. Errors are logged and the step retried on the next poll: a node
        that stops over one bad request would leave its games undefended. One error stops it:
        another process sending from its key (KeyInUse, raised here once both threads end)."""
        fatal: list[KeyInUse] = []
        serving = threading.Thread(target=self._serve_loop, args=(stop, fatal), name="serve")
        serving.start()
        try:
            while not stop.is_set():
                for step in (self.watch, self.defend, self.finalize_due):
                    self._guarded(step, stop, fatal)
                stop.wait(self.poll_interval)
        finally:
            stop.set()
            self.new_requests.set()
            serving.join()
        if fatal:
            raise fatal[0]

    def _serve_loop(self, stop: threading.Event, fatal: list[KeyInUse]) -> None:
        pin_this_thread(self.serving_cpus)
        while not stop.is_set():
            self.new_requests.clear()
            self._guarded(self.serve_pending, stop, fatal)
            self.new_requests.wait(self.poll_interval)

    @staticmethod
    def _guarded(step: Callable[[], Any], stop: threading.Event, fatal: list[KeyInUse]
                 ) -> None:
        try:
            step()
        except RpcUnavailable as err:
            log.error("%s: %s", step.__name__, err)
        except sa.exc.OperationalError as err:  # the database restarting, say
            log.error("%s: the database is unavailable (%s); retrying on the next poll",
                      step.__name__, st.database_error(err))
        except KeyInUse as err:
            log.error("%s: %s; stopping", step.__name__, err)
            fatal.append(err)
            stop.set()
        except Exception:
            log.exception("%s failed; retrying on the next poll", step.__name__)

    # -- watching -------------------------------------------------------------------------

    def watch(self) -> int:
        """Record new requests and the games opened against this provider; how many events
        were handled."""
        handled = self.requests_cursor.poll(self._on_request)
        handled += self.games_cursor.poll(self._on_game_opened)
        return handled

    def _on_request(self, conn, event: ChainEvent) -> None:
        if event.name != "RequestPosted":
            follow_outcome(conn, event)
            return
        record = request_record(event)
        if st.upsert_request(conn, record):
            log.info("request %d: %d prompt tokens, max %d, model %s", record.request_id,
                     len(record.prompt), record.max_tokens, record.model_id)
            self.new_requests.set()

    def _outcomes_lost(self, conn, block: int) -> None:
        """The requests cursor's rewind: what the lost blocks said is undone
        (``store.outcomes_after``); an answer whose commit they held is committed again, with
        nonces counted from the chain again (its transactions may have left with them)."""
        if changed := st.outcomes_after(conn, block):
            log.warning("requests %s: what blocks after %d said of them left the chain; "
                        "reading again", ", ".join(map(str, changed)), block)
            self.sender.forget_nonce()

    def _outcomes_unconfirmed(self, conn, first: int, last: int, events: list[ChainEvent]
                              ) -> None:
        """The requests cursor's check of what this node wrote from its receipts (commits,
        finalizations) once it reads their blocks (``events.confirm_outcomes``)."""
        if undone := confirm_outcomes(conn, first, last, events):
            log.warning("requests %s: the blocks %d-%d no longer hold what this node recorded "
                        "from its receipts; reading again", ", ".join(map(str, undone)),
                        first, last)
            self.sender.forget_nonce()

    @classmethod
    def _games_lost(cls, conn, block: int) -> None:
        """The games cursor's rewind: games opened after `block` are gone (their ids may be
        reused by the games that replace them)."""
        for record in st.drop_games_after(conn, Role.PROVIDER, block):
            cls._game_lost(conn, record, f"game {record.game_id}: its block left the chain")

    @staticmethod
    def _game_lost(conn, game: st.GameRecord, why: str) -> None:
        """The chain no longer has `game` (its row and moves are gone, or go here): the claim
        it disputed is undisputed."""
        st.drop_game(conn, game.game_id, Role.PROVIDER)
        st.set_claim_status(conn, game.request_id, ClaimStatus.COMMITTED,
                            expected=ClaimStatus.DISPUTED)
        log.warning("%s; request %d is no longer disputed by it", why, game.request_id)

    def _on_game_opened(self, conn, event: ChainEvent) -> None:
        args = event.args
        if args["provider"] != self.address:
            return
        game_id, request_id = args["gameId"], args["requestId"]
        record = st.GameRecord(
            game_id=game_id, player=Role.PROVIDER, request_id=request_id,
            phase=Phase.AWAIT_ROOT, k=None, rounds=0, status=GameStatus.OPEN,
            state={"opened_block": event.block_number, "challenger": args["challenger"]})
        if st.create_game(conn, record):
            st.set_claim_status(conn, request_id, ClaimStatus.DISPUTED)
            log.info("game %d: %s disputes request %d; defending", game_id, args["challenger"],
                     request_id)

    # -- serving --------------------------------------------------------------------------

    def serve_pending(self) -> list[Served]:
        """Finish every ``committing`` request, then answer every open one, until none is
        left. Answers are generated one at a time (in the generation process, when the node
        has one). Everything else runs beside the next generation, in two stages: the
        committer writes a request's ``committing`` row and sends its commit, the confirmer
        waits for the receipt and records the claim. The committer never waits for a block,
        so on a chain that mines every few seconds the commits of many answers share one."""
        with self.store.transaction() as conn:
            unfinished = st.requests_with_status(conn, RequestStatus.COMMITTING, limit=1_000_000)
        sent: list[Future] = []
        with ThreadPoolExecutor(1, thread_name_prefix="confirm") as confirmer, \
                ThreadPoolExecutor(1, thread_name_prefix="commit") as committer:
            def commit(prepared: Prepared) -> None:
                sent.append(committer.submit(self._send_commit, prepared, confirmer))

            for request in unfinished:
                commit(Prepared(request.request_id, list(request.output), time.perf_counter(),
                                resumed=True, commit_tx=request.commit_tx))
            # Requests are recorded in id order, and a request handed to the committer stays
            # `open` until its row is written there: the next batch starts after the last one.
            last_handed = -1
            while batch := self._open_requests(after=last_handed):
                last_handed = batch[-1].request_id
                for prepared in self._answers(batch):
                    commit(prepared)
            confirmed = [future.result() for future in sent]
            results = [None if waiting is None else waiting.result() for waiting in confirmed]
        return [served for served in results if served is not None]

    def _answers(self, batch: list[RequestRecord]) -> Iterator[Prepared]:
        """The answers to commit for `batch`, as they are generated; a request this node will
        not serve, or whose prompt the model refuses, is skipped with the reason."""
        # Asked once per poll interval: a request deadline judged a little early costs nothing
        # (the commit's estimate reverts); a clock in a game is not cached.
        chain_time = self.responder.chain_time(max_age=self.poll_interval)
        serving = [request for request in batch if self._will_serve(request, chain_time)]
        # As each answer is done: in the generation process the requests decode in batches,
        # and a short answer is committed before a long one that began earlier.
        jobs = [(r.prompt, r.max_tokens, r.draw) for r in serving]
        for index, answer in self._generations(jobs):
            request = serving[index]
            if answer.error is not None:
                if not isinstance(answer.error, UserError):
                    raise answer.error
                self._skip(request.request_id, f"the model refuses it: {answer.error}",
                           expected=RequestStatus.OPEN)
                continue
            output = claimed_output(answer.output, self.lie, self.model.vocab_size,
                                    self.model.eos_ids)
            yield Prepared(request.request_id, output, time.perf_counter() - answer.seconds,
                           answer.seconds)

    def _open_requests(self, after: int) -> list[RequestRecord]:
        with self.store.transaction() as conn:
            return st.requests_with_status(conn, RequestStatus.OPEN, limit=SERVE_BATCH,
                                          after=after)

    def _will_serve(self, request: RequestRecord, chain_time: int) -> bool:
        """Serve `request`? A request this node will not serve is marked skipped here. (One
        already answered, refunded or rejected is not open here: the requests cursor follows
        the coordinator's outcomes, history included.)"""
        reason = serve_decision(request, self.served_model, self.address, chain_time)
        if reason is not None:
            self._skip(request.request_id, reason, expected=RequestStatus.OPEN)
        return reason is None

    def _generations(self, jobs: list[Job]) -> Iterator[tuple[int, Answer]]:
        if self.generator is not None:
            return self.generator.stream_as_done(jobs)
        return enumerate(generate_in_process(self.model, jobs))

    def close(self) -> None:
        """End the generation process, if the node has one."""
        if self.generator is not None:
            self.generator.close()

    def _send_commit(self, prepared: Prepared, confirmer: ThreadPoolExecutor
                     ) -> Future[Served | None] | None:
        """Send the commit of `prepared` unless the chain already has an answer (idempotent);
        the confirmer's future of its outcome, or None when nothing was sent."""
        request_id = prepared.request_id
        if prepared.resumed:
            onchain = self.coordinator.get_request(request_id)
            if onchain.status is not Status.OPEN:
                self._settle(request_id, onchain)
                return None
        started = time.perf_counter()
        try:
            tx_hash = self._commit_in_flight(prepared)
            if tx_hash is None:
                # The gas estimate reverts (nothing sent) when the request is no longer open.
                tx_hash = self.sender.submit(
                    {**self.coordinator.commit_output_tx(request_id, prepared.output),
                     **self._fees()},
                    self.coordinator.artifact,
                    on_signed=lambda signed, _nonce: self._record_committing(prepared, signed))
        except _AlreadySettled:
            return None
        except ContractRevert as err:
            if err.name in RETRY_LATER:
                self._retry_later(prepared, err)
            elif err.name == "RequestNotOpen":
                self._settle(request_id, self.coordinator.get_request(request_id))
            else:
                self._skip(request_id, f"the commit reverts with {err.name or err}")
            return None
        _crash_point("after-commit")
        return confirmer.submit(self._confirm_commit, prepared, tx_hash, started)

    def _confirm_commit(self, prepared: Prepared, tx_hash: HexBytes, started: float
                        ) -> Served | None:
        """Wait for the commit `tx_hash` of `prepared` to be mined and record the claim."""
        request_id = prepared.request_id
        try:
            receipt = self.sender.wait(tx_hash)
        except TxFailed as err:
            try:
                onchain = self.coordinator.get_request(request_id)
            except ContractRevert as gone:  # RequestNotFound: a reorganisation took the post
                self._retry_later(prepared, f"{err}; the chain has no request {request_id} "
                                            f"now ({gone.name or gone})")
                return None
            if onchain.status is Status.OPEN:
                # The estimate passed against the latest block, but the commits sent ahead of
                # this one, still pending then, locked the stake it needed; or the state
                # changed otherwise. The next serving pass estimates it again.
                self._retry_later(prepared, err)
            else:
                # A copy sent before a restart got in first, or another provider did.
                self._settle(request_id, onchain)
            return None
        commit_s = time.perf_counter() - started
        (event,) = self.coordinator.receipt_events(receipt, "OutputCommitted")
        self._record_claim(chain_event(event))
        served = Served(request_id, len(prepared.output), prepared.generate_s, commit_s,
                        time.perf_counter() - prepared.started, "0x" + bytes(tx_hash).hex())
        log.info("served request %d: %d tokens in %.2f s, committed in tx %s (block %d)",
                 request_id, served.tokens, prepared.generate_s, served.tx_hash,
                 receipt["blockNumber"])
        return served

    def _retry_later(self, prepared: Prepared, why: Exception | str) -> None:
        """Keep the answer (a `committing` row) and forget any commit transaction recorded
        for it, which failed or was never sent (a restart must not wait for it): the next
        serving pass estimates the commit again, without generating the answer again."""
        with self.store.transaction() as conn:
            if not st.set_request_status(conn, prepared.request_id, RequestStatus.COMMITTING,
                                         expected=(RequestStatus.OPEN, RequestStatus.COMMITTING),
                                         output=prepared.output):
                return  # settled meanwhile: nothing to retry
            st.forget_commit_tx(conn, prepared.request_id)
        log.warning("request %d: cannot commit yet (%s); will retry", prepared.request_id, why)

    def _record_committing(self, prepared: Prepared, tx_hash: bytes) -> None:
        """The row that makes the commit survive a crash, written before the transaction is
        sent: status ``committing``, the output (a restart commits this very output) and the
        transaction's hash (a restart that finds it pending waits for it). A crash before it
        loses only a generation, redone on restart."""
        with self.store.transaction() as conn:
            if not st.set_request_status(conn, prepared.request_id, RequestStatus.COMMITTING,
                                         expected=(RequestStatus.OPEN, RequestStatus.COMMITTING),
                                         output=prepared.output,
                                         commit_tx="0x" + bytes(tx_hash).hex()):
                raise _AlreadySettled(prepared.request_id)  # settled meanwhile: send nothing
        _crash_point("before-commit")

    def _commit_in_flight(self, prepared: Prepared) -> HexBytes | None:
        """The commit this node sent before a restart, if the node still has it (pending or
        mined): waiting for it costs nothing, a second commit would revert and cost gas."""
        if not prepared.resumed or prepared.commit_tx is None:
            return None
        if not self.sender.known(HexBytes(prepared.commit_tx)):
            return None  # dropped, or never sent: send again
        log.info("request %d: its commit %s, sent before the restart, is known to the node; "
                 "waiting for it", prepared.request_id, prepared.commit_tx)
        return HexBytes(prepared.commit_tx)

    def _settle(self, request_id: int, onchain) -> None:
        """The request is no longer open on chain: record what happened to it."""
        if onchain.status is not Status.OPEN and onchain.provider == self.address \
                and onchain.status is not Status.REFUNDED:
            logs = self.coordinator.contract.events.OutputCommitted().get_logs(
                argument_filters={"requestId": request_id},
                from_block=self.deployments.block_number)
            if logs:
                event = chain_event(logs[0])
                self._record_claim(event)
                log.info("request %d: already committed by this node in tx %s; recorded",
                         request_id, event.tx_hash)
                return
        who = "another provider" if onchain.provider not in (ZERO_ADDRESS, self.address) \
            else "nobody"
        self._skip(request_id, f"it is {onchain.status.name.lower()} on chain (answered by "
                   f"{who})")

    def _record_claim(self, event: ChainEvent) -> None:
        claim = claim_record(event)
        with self.store.transaction() as conn:
            st.record_claim(conn, claim)
            st.set_request_status(conn, claim.request_id, RequestStatus.COMMITTED,
                                  output=claim.output, status_block=claim.block_number)

    def _skip(self, request_id: int, reason: str,
              expected: RequestStatus | None = None) -> None:
        with self.store.transaction() as conn:
            st.set_request_status(conn, request_id, RequestStatus.SKIPPED, expected=expected,
                                  note=reason)
        log.info("skipped request %d: %s", request_id, reason)

    def _fees(self) -> dict[str, int]:
        """TxSender's fee rule (room for the base fee to double), asked of the node once per
        poll interval rather than per commit: the base fee moves at most 12.5% a block, and
        two round trips per commit are a visible share of a small model's generation."""
        fees, asked_at = self._fee_cache
        if fees is None or time.monotonic() - asked_at > self.poll_interval:
            fees = self.sender.fees()
            self._fee_cache = (fees, time.monotonic())
        return fees

    # -- defending ------------------------------------------------------------------------

    def defend(self) -> None:
        """One turn in every open game of this provider (``GameResponder.turn``)."""
        with self.store.transaction() as conn:
            games = st.games_with_status(conn, Role.PROVIDER, GameStatus.OPEN)
        # Every game's move is sent before any is waited for: a provider in many games at
        # once (a griefer's way to run its clocks down) moves in all of them each block.
        sent: list[SentMove] = []
        for record in games:
            with self.store.transaction() as conn:
                leased = st.claim_game(conn, record.game_id, Role.PROVIDER, self.worker,
                                       lease_seconds=self.lease_seconds)
            if leased is None:
                continue
            try:
                turn = self.responder.turn(leased, self.worker)
            except GameGone as gone:
                with self.store.transaction() as conn:
                    self._game_lost(conn, leased, str(gone))
                continue
            except ContractRevert as err:
                # A read for this game refused: its claim left the chain under the read (a
                # reorganisation the next poll sees). One game never holds up the others.
                log.warning("game %d: %s; reading it again next poll", leased.game_id, err)
                continue
            if turn.outcome is GameStatus.LOST:
                try:
                    self._record_outcome(leased.request_id,
                                         self.coordinator.get_request(leased.request_id))
                except ContractRevert as err:  # the request left the chain under the read
                    log.warning("game %d: lost, its request unreadable now (%s); the requests "
                                "cursor records what the chain says", leased.game_id, err)
            if turn.sent:
                sent.append(turn.sent)
        for move in sent:
            try:
                self.responder.confirm(move)
            except TxFailed as err:
                log.warning("game %d: move failed (%s); reading the game again next poll",
                            move.game_id, err)

    def _trace(self, record: st.GameRecord) -> ModelTrace:
        """The trace this node defends `record`'s request with: its model's (drawn as the
        request says), or with ``lie`` the one that ends in the claimed tokens."""
        request = self._posted(record.request_id)
        output = self.coordinator.get_output(record.request_id)
        trace = ModelTrace.from_model(self.model, list(request.prompt), output, request.draw)
        if self.lie != "off":
            trace = trace.with_output(trace.node_count, np.asarray(output, np.int64))
        return trace

    def _posted(self, request_id: int) -> st.RequestRecord:
        """The request as posted (its prompt and draw): this node's row, else its event."""
        with self.store.transaction() as conn:
            request = st.get_request(conn, request_id)
        if request is not None:
            return request
        logs = self.coordinator.contract.events.RequestPosted().get_logs(
            argument_filters={"requestId": request_id}, from_block=self.deployments.block_number)
        if not logs:
            raise RuntimeError(f"request {request_id} has no RequestPosted event")
        return request_record(chain_event(logs[0]))

    def _before_move(self) -> None:
        self._moves_sent += 1
        _crash_point(f"before-move-{self._moves_sent}")

    # -- finalizing -----------------------------------------------------------------------

    def finalize_due(self) -> None:
        """Finalize every claim of this node whose challenge window has closed and that no
        dispute holds up; record rejected and refunded ones."""
        with self.store.transaction() as conn:
            committed = st.requests_with_status(conn, RequestStatus.COMMITTED, limit=1_000_000)
            due = [(request, st.get_claim(conn, request.request_id)) for request in committed]
        if not due:
            return
        now = self.responder.chain_time()
        sent: list[tuple[int, HexBytes]] = []
        for request, claim in due:
            if claim is None or claim.provider != self.address or now < claim.challenge_deadline:
                continue
            # One item's failure (a request the chain no longer has, after a reorganisation)
            # is logged and retried later; it never holds up the others.
            try:
                onchain = self.coordinator.get_request(request.request_id)
                if onchain.status is not Status.COMMITTED or onchain.open_disputes != 0:
                    self._record_outcome(request.request_id, onchain)
                    continue
                sent.append((request.request_id, self.sender.submit(
                    {**self.coordinator.finalize_tx(request.request_id), **self._fees()},
                    self.coordinator.artifact)))
            except ContractRevert as err:
                log.warning("request %d: not finalized (%s); retrying later",
                            request.request_id, err.name or err)
        # Every finalize is sent before any is waited for: on a chain with block times one
        # block takes them all, and this loop, which also plays the games, is back soon.
        for request_id, tx_hash in sent:
            try:
                receipt = self.sender.wait(tx_hash)
            except TxFailed as err:
                log.warning("request %d: finalize failed (%s); retrying later", request_id, err)
                continue
            self._record_outcome(request_id, self.coordinator.get_request(request_id),
                                 receipt["blockNumber"])

    def _record_outcome(self, request_id: int, onchain, block: int | None = None) -> None:
        """Record the outcome `onchain` (the request as the chain has it now) says, with the
        block that says so: the receipt's `block`, else the block of its event. The block is
        what lets a reorganisation undo the row (``store.outcomes_after``,
        ``events.confirm_outcomes``); an outcome whose event the chain does not show (a
        reorganisation between the two reads) is left for the next poll."""
        outcome = _OUTCOMES.get(onchain.status)
        if outcome is None:
            return
        request_status, claim_status, event_name = outcome
        if block is None:
            logs = logs_since(self.w3, getattr(self.coordinator.contract.events, event_name),
                              self.deployments.block_number, requestId=request_id)
            if not logs:
                return
            block = logs[-1]["blockNumber"]
        with self.store.transaction() as conn:
            changed = st.set_request_status(conn, request_id, request_status,
                                            status_block=block)
            st.set_claim_status(conn, request_id, claim_status)
        if changed and onchain.status is Status.FINALIZED:
            callback = ("no callback" if onchain.callback == ZERO_ADDRESS else
                        "callback delivered" if onchain.callback_succeeded else
                        "callback failed")
            log.info("finalized request %d: fee %d wei credited, %s", request_id, onchain.fee,
                     callback)
        elif changed:
            log.info("request %d: claim rejected on chain", request_id)
