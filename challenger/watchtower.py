"""The watchtower's steps, driven one at a time: scan the chain for claims, verify a claim
(and challenge it when it is false), play one turn of a game.

:class:`Watchtower` holds the edges (chain client, contracts, database, model, transaction
sender) and asks ``challenger.policy`` and ``prover.game.decide`` what to do. Celery tasks
(``tasks.py``) and the eager loop of the demo call these steps; tests call them directly.

Every step is safe to run twice, on any worker, after any crash:

* a claim's verdict is written once (``verdict IS NULL`` guard);
* a challenge is a row (`sending`, leased to one worker) before its transaction, and the
  worker that takes over a stale row looks for the game on chain (``GameOpened`` for this
  request and this challenger) and for the transaction it recorded before sending another;
* a game is leased to one worker at a time, and its turns are the provider's too
  (``services.responder``): each move journaled at its position before it is sent, a
  journaled move whose transaction the node knows waited for, never sent again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from eth_utils import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound

from optinfer.challenger import metrics, policy
from optinfer.challenger.policy import Verdict
from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import InferenceCoordinator
from optinfer.contracts.dispute_game import DisputeGame
from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.contracts.sender import TxFailed, TxSender
from optinfer.errors import UserError
from optinfer.models.batching import predict_many
from optinfer.models.sampling import Sampling
from optinfer.prover import claims
from optinfer.prover import game as spec
from optinfer.prover.game import ModelTrace, Role
from optinfer.services import store as st
from optinfer.services.deployments import Deployments
from optinfer.services.events import (
    OUTCOMES,
    EventCursor,
    confirm_outcomes,
    follow_outcome,
    logs_since,
    request_record,
)
from optinfer.services.responder import GameGone, GameResponder, Turn, describe
from optinfer.services.statuses import ChallengeStatus, GameStatus
from optinfer.services.store import GameRecord, Store

log = logging.getLogger("optinfer.watchtower")

CURSOR_NAME = "watchtower"
MOVES_PER_TURN = 4
"""Most moves one play step sends before handing the game back (NameElement then OneStep is
the longest run of consecutive challenger moves)."""
VERIFY_REQUEUE_LEASES = 5
"""A claim whose verification was queued this many game leases ago without a verdict is
queued again: its task was lost with a worker."""


class LocalModel:
    """The integer model this watchtower runs, its commitments computed from its files."""

    def __init__(self, model_dir: Path, threads: int = 1):
        from optinfer.models.runtime import IntegerModel
        from optinfer.prover.one_step_prover import CommittedModel

        self.model = IntegerModel(model_dir, threads=threads)
        try:
            self.committed = CommittedModel(self.model)
        except ValueError as err:
            raise UserError(f"model {model_dir}: {err}") from None
        manifest = self.model.manifest
        # The id of what runs here: the files' roots and node count, the manifest's other fields.
        model_id = ModelSpec(
            nodes_root=self.committed.nodes_root,
            constants_root=self.committed.constants_root,
            opset_version=int(manifest["opset_version"]),
            manifest_hash=hashlib.sha256((self.model.dir / "manifest.json").read_bytes()).digest(),
            manifest_uri="",
            max_context=self.model.max_context,
            node_count=self.committed.node_count,
            eos_token_ids=tuple(self.model.eos_ids),
            sampling=self.model.samples,
        ).model_id
        self.held = policy.HeldModel(
            model_id=model_id,
            nodes_root=self.committed.nodes_root,
            constants_root=self.committed.constants_root,
            opset_version=int(manifest["opset_version"]),
            node_count=self.committed.node_count,
            max_context=self.model.max_context,
            eos_token_ids=tuple(self.model.eos_ids),
        )
        # The two sessions a watchtower runs (predictions and traces), made at start-up
        # rather than on its first claim.
        self.model.session("decode_batch")
        self.model.session("trace")

    def trace(self, prompt: list[int], output: list[int], draw: Sampling) -> ModelTrace:
        """The honest trace of the claimed tokens drawn by the request's `draw` (S_0 is built
        from the claim itself), for any claim: up to the node the op set refuses where the
        model cannot run the claim's sequence, an id outside the vocabulary
        (`prover.claims`)."""
        return ModelTrace.from_claim(self.model, prompt, output, self.committed, draw)


@dataclass(frozen=True)
class ScanResult:
    """What a scan found to do: claims to verify, games to play (with their new token)."""

    new_claims: int
    verify: list[int]
    play: list[tuple[int, str | None]]


@dataclass(frozen=True)
class VerifyResult:
    request_id: int
    verdict: Verdict | None
    game: tuple[int, str] | None = None  # (game id, token) of a game this step opened


@dataclass(frozen=True)
class PlayResult:
    """`again`: look at the game again after `countdown` seconds (False once it is resolved,
    or when this task's token is no longer the game's)."""

    again: bool
    countdown: float = 0.0
    outcome: str | None = None


class Watchtower:
    """One watchtower process's view of the deployment in `settings`."""

    def __init__(self, settings, *, w3: Web3 | None = None, store: Store | None = None,
                 model: LocalModel | None = None, worker: str | None = None):
        """A watchtower on a database already at this optinfer's schema (each Celery child
        builds one; `start` migrates first, once, for the process that owns the database)."""
        self.settings = settings
        self.w3, self.deployments = Deployments.on_chain(settings, w3)
        self.store = store or Store(settings.database)
        self.store.require_current()
        self.coordinator = InferenceCoordinator(
            self.w3, self.deployments.address("InferenceCoordinator"))
        self.registry = ModelRegistry(self.w3, self.deployments.address("ModelRegistry"))
        self.game = DisputeGame(self.w3, self.deployments.address("DisputeGame"))
        self.account = settings.signer("challenger", self.deployments.chain_id)
        self.address = self.account.address
        self.sender = TxSender(self.w3, self.account)
        self.model = model or LocalModel(settings.model_path)
        self._worker = worker or f"{socket.gethostname()[:40]}:{os.getpid()}"
        self.lease = settings.game_lease
        self.bond = self.game.parameter("challengerBond")
        # Secret to the operator: a provider cannot tell which claims sampling leaves out.
        self._sampling_salt = keccak(bytes(self.account.key) + b"optinfer sampling")
        self.cursor = EventCursor(
            self.w3, self.store, CURSOR_NAME, [self.coordinator.contract],
            events=["RequestPosted", *OUTCOMES],
            start_block=self.deployments.block_number,
            confirmations=settings.confirmations, max_block_range=settings.max_block_range,
            on_rewind=self._claims_lost, on_read=confirm_outcomes,
        )
        self._registered: set[bytes] = set()
        self.responder = GameResponder(
            w3=self.w3, store=self.store, game=self.game, sender=self.sender,
            role=Role.CHALLENGER, trace_of=self._trace_of, log=log)

    @classmethod
    def start(cls, settings, *, store: Store | None = None, **kwargs) -> Watchtower:
        """Migrate the database to this optinfer's schema (``optinfer db upgrade``; under a
        lock on Postgres), then the watchtower: what ``challenger run`` and the demo do."""
        store = store or Store(settings.database)
        store.migrate()
        return cls(settings, store=store, **kwargs)

    @property
    def worker(self) -> str:
        """Who holds a lease: this process and thread (threads of one worker process must not
        share leases, or two of them could both act)."""
        return f"{self._worker}:{threading.get_native_id()}"

    # -- scan ------------------------------------------------------------------------------

    def scan(self, *, every_open_game: bool = False) -> ScanResult:
        """Record the new requests and claims up to the confirmed head, then list the work
        due: claims without a verdict (new, or whose task was lost), false claims whose
        challenge was left half-sent, and games whose chain of play tasks stopped (with a new
        token). `every_open_game`: list every open game, token None (the eager loop)."""
        new_claims: list[int] = []

        def handle(conn, event) -> None:
            if event.name == "RequestPosted":
                st.upsert_request(conn, request_record(event))
            elif follow_outcome(conn, event) and event.name == "OutputCommitted":
                new_claims.append(event.args["requestId"])

        self.cursor.poll(handle)
        if new_claims:
            metrics.CLAIMS_SEEN.inc(len(new_claims))
            log.info("seen %d new claim(s): %s", len(new_claims), _ids(new_claims))
        now = time.time()
        with self.store.transaction() as conn:
            # Confirmed claims only, whoever wrote the row (a provider sharing this database
            # records its own claims at once).
            verify = st.claims_awaiting_verdict(
                conn, queued_before=now - VERIFY_REQUEUE_LEASES * self.lease,
                confirmed_through=self.cursor.safe_head())
            st.mark_verify_queued(conn, verify, now)
            verify += [r for r in st.claims_to_challenge(conn, self.address, now)
                       if r not in verify]
        play = self._games_to_resume(now, every_open_game)
        with self.store.transaction() as conn:
            metrics.set_disputes(st.game_status_counts(conn, Role.CHALLENGER), self.bond)
        return ScanResult(len(new_claims), verify, play)

    def _games_to_resume(self, now: float, every_open_game: bool) -> list[tuple[int, str | None]]:
        with self.store.transaction() as conn:
            games = st.games_with_status(conn, Role.CHALLENGER, GameStatus.OPEN)
        if every_open_game:
            return [(game.game_id, None) for game in games]
        resumed = []
        for game in games:
            overdue = game.state.get("next_play", 0) + self.lease < now
            if not overdue:
                continue
            # A new token ends any chain of play tasks still around: only the new one goes on.
            token = uuid.uuid4().hex
            with self.store.transaction() as conn:
                held = st.claim_game(conn, game.game_id, Role.CHALLENGER, self.worker,
                                     lease_seconds=self.lease, now=now)
                if held is None:
                    continue
                st.update_game(conn, held.game_id, Role.CHALLENGER, self.worker,
                               phase=held.phase, k=held.k, rounds=held.rounds,
                               status=held.status,
                               state={**held.state, "token": token, "next_play": now})
                st.release_game(conn, held.game_id, Role.CHALLENGER, self.worker)
            log.info("game %d: resuming play (its task stopped)", game.game_id)
            resumed.append((game.game_id, token))
        return resumed

    # -- verify ----------------------------------------------------------------------------

    def verify(self, request_id: int) -> VerifyResult:
        """Judge the claim on `request_id` (once) and challenge it if it is false."""
        return self.verify_many([request_id])[0]

    def verify_many(self, request_ids: Sequence[int]) -> list[VerifyResult]:
        """:meth:`verify` for each of `request_ids`, the claims the model must run sharing
        its passes (``batching.predict_many``: a few short claims in one teacher-forced pass
        instead of one each)."""
        judged: list[tuple[st.RequestRecord, st.ClaimRecord]] = []
        found: dict[int, tuple[st.RequestRecord, st.ClaimRecord]] = {}
        results: dict[int, VerifyResult] = {}
        with self.store.transaction() as conn:
            for request_id in request_ids:
                claim = st.get_claim(conn, request_id)
                request = st.get_request(conn, request_id)
                if claim is None or request is None:
                    log.warning("claim %d: not in the database, nothing to verify", request_id)
                    results[request_id] = VerifyResult(request_id, None)
                    continue
                found[request_id] = (request, claim)
                if claim.verdict is None:
                    judged.append((request, claim))
        judgements = self._judge_many(judged)
        firsts = []
        with self.store.transaction() as conn:  # the chunk's verdicts, one commit
            for (request, claim), judgement in zip(judged, judgements, strict=True):
                request_id = request.request_id
                first = st.set_claim_verdict(conn, request_id, judgement.verdict.value,
                                             judgement.note)
                firsts.append(first)
                # Another worker's verdict came first: the row holds it, read it back.
                found[request_id] = (request, replace(
                    claim, verdict=judgement.verdict.value, verdict_note=judgement.note) if first
                    else st.get_claim(conn, request_id))
        for (request, claim), judgement, first in zip(judged, judgements, firsts, strict=True):
            if first:
                metrics.CLAIMS_VERIFIED.labels(verdict=judgement.verdict.value).inc()
                self._report(request.request_id, claim, judgement)
        for request_id, (request, claim) in found.items():
            verdict = Verdict(claim.verdict)
            results[request_id] = VerifyResult(
                request_id, verdict,
                self._challenge(request, claim) if verdict is Verdict.INVALID else None)
        return [results[request_id] for request_id in request_ids]

    def _judge_many(self, pairs: list[tuple[st.RequestRecord, st.ClaimRecord]]
                    ) -> list[policy.Judgement]:
        """Each claim's judgement: by the policy alone (left out by sampling, a model this
        watchtower cannot verify), else by the model, in shared passes where it can run the
        claim's sequence."""
        model = self.model.model
        judgements: list[policy.Judgement | None] = []
        shared: list[tuple[int, np.ndarray]] = []  # (index in pairs, verify-graph input)
        for index, (request, claim) in enumerate(pairs):
            judgement = self._judge_by_policy(request)
            prompt, output = list(request.prompt), list(claim.output)
            if judgement is None and claims.outside_domain(
                    prompt, output, model.vocab_size, model.max_context) is None:
                shared.append((index, claims.claim_sequence(
                    prompt, output, model.leaf_draw(request.draw))))
            elif judgement is None:
                started = time.perf_counter()
                judgement = self._verify_outside_domain(prompt, output, request)
                metrics.VERIFICATION_SECONDS.observe(time.perf_counter() - started)
            judgements.append(judgement)
        if shared:
            started = time.perf_counter()
            predicted = predict_many(model, [sequence for _, sequence in shared])
            each = (time.perf_counter() - started) / len(shared)
            for (index, _), tokens in zip(shared, predicted, strict=True):
                request, claim = pairs[index]
                judgements[index] = _judge_prediction(model, list(claim.output), tokens,
                                                      request.max_tokens)
                metrics.VERIFICATION_SECONDS.observe(each)
        return judgements

    def _judge_by_policy(self, request: st.RequestRecord) -> policy.Judgement | None:
        """The judgement of a claim the model need not run, or None."""
        if not policy.sampled(request.request_id, self.settings.sampling_rate,
                              self._sampling_salt):
            return policy.Judgement(Verdict.UNSAMPLED,
                                    f"left out at sampling rate {self.settings.sampling_rate}",
                                    False)
        model_id = bytes.fromhex(request.model_id.removeprefix("0x"))
        problem = policy.model_problem(model_id, self.model.held, self._is_registered(model_id))
        if problem is not None:
            return policy.Judgement(Verdict.UNVERIFIABLE, problem, False)
        return None

    def _verify_outside_domain(self, prompt: list[int], output: list[int],
                               request: st.RequestRecord) -> policy.Judgement:
        """A claim the model cannot run (an id outside the vocabulary in the prompt or before
        the last output token, or past the context): the reference up to the node the op set
        refuses, which no provider's value can pass: the game convicts the claim there, so it
        is challenged like a wrong token."""
        model = self.model.model
        problem = claims.outside_domain(prompt, output, model.vocab_size, model.max_context)
        trace = self.model.trace(prompt, output, request.draw)
        if trace.refusal is not None:
            return policy.judge(False, f"{problem}; {trace.refusal.reason}", True)
        return _judge_prediction(model, output, trace.tensor(trace.node_count),
                                 request.max_tokens)

    def _is_registered(self, model_id: bytes) -> bool:
        # A registration never changes once made; an absent one is asked for again.
        if model_id not in self._registered and self.registry.is_registered(model_id):
            self._registered.add(model_id)
        return model_id in self._registered

    def _report(self, request_id: int, claim: st.ClaimRecord,
                judgement: policy.Judgement) -> None:
        if judgement.verdict is Verdict.VALID:
            log.info("claim %d by %s: valid (%d tokens)", request_id, claim.provider,
                     len(claim.output))
        elif judgement.verdict is Verdict.INVALID:
            log.warning("claim %d by %s: FALSE, %s", request_id, claim.provider, judgement.note)
        elif judgement.verdict is Verdict.UNSAMPLED:
            log.info("claim %d: %s", request_id, judgement.note)
        else:
            log.warning("claim %d by %s: not challenged, %s: %s", request_id, claim.provider,
                        judgement.verdict.value, judgement.note)

    # -- challenge -------------------------------------------------------------------------

    def _challenge(self, request: st.RequestRecord, claim: st.ClaimRecord
                   ) -> tuple[int, str] | None:
        """Open a game against the false claim, exactly once; its (id, token), or None when
        another worker is at it or it cannot be opened."""
        request_id = request.request_id
        with self.store.transaction() as conn:
            fresh = st.get_challenge(conn, request_id, self.address) is None
            row = st.take_challenge(conn, request_id, self.address, self.worker,
                                    lease_seconds=self.lease)
        if row is None or row.status is ChallengeStatus.FAILED:
            return None
        if row.status is ChallengeStatus.OPENED:
            return None  # its game has its own chain of play tasks
        # Cheap, and also right when the database is not the only record (restored, say).
        opened = self._opened_on_chain(request_id, claim.block_number, row.tx_hash)
        if opened is None:
            # Pending transactions of ours matter only when another worker held this row: it
            # may have sent the challenge and died before noting it. A fresh row never waits
            # for the game moves a busy watchtower always has in flight.
            if not fresh and self._has_pending_transactions():
                # Possibly our challenge, sent by a worker that died before noting it.
                log.info("claim %d: transactions of %s still pending, challenge deferred",
                         request_id, self.address)
                return None
            opened = self._send_challenge(request, claim)
            if opened is None:
                return None
        game_id, block = opened
        token = uuid.uuid4().hex
        now = time.time()
        with self.store.transaction() as conn:
            if st.finish_challenge(conn, request_id, self.address, ChallengeStatus.OPENED,
                                    game_id=game_id):
                st.create_game(conn, GameRecord(
                    game_id=game_id, player=Role.CHALLENGER, request_id=request_id,
                    phase=spec.Phase.AWAIT_ROOT, k=None, rounds=0, status=GameStatus.OPEN,
                    state={"token": token, "opened_block": block, "next_play": now}))
            else:
                return None
        log.info("game %d opened against claim %d with a bond of %d wei", game_id, request_id,
                 self.bond)
        return game_id, token

    def _send_challenge(self, request: st.RequestRecord, claim: st.ClaimRecord
                        ) -> tuple[int, int] | None:
        request_id = request.request_id
        now = self.responder.chain_time()
        if not policy.window_open(claim.challenge_deadline, now):
            self._fail_challenge(request_id, "the challenge window closed before the challenge")
            return None
        try:
            onchain_output = self.coordinator.get_output(request_id)
        except ContractRevert as err:  # ClaimNotCommitted: a reorganisation took the claim
            onchain_output = err.name
        if onchain_output != list(claim.output):
            # The claim judged is no longer the chain's (a reorganisation replaced it): the
            # bond must not go against a claim this trace was not computed for. The cursor
            # reads the new one, which is judged afresh.
            log.warning("claim %d: the chain's output differs from the one judged; not "
                        "challenged", request_id)
            return None
        tx = self.game.challenge_tx(request_id, list(request.prompt), bond=self.bond)
        try:
            tx_hash = self.sender.submit(tx, self.game.artifact)
        except ContractRevert as err:
            self._fail_challenge(request_id, f"challenge reverted: {err.name}{err.args_decoded}")
            return None
        with self.store.transaction() as conn:
            st.set_challenge_tx(conn, request_id, self.address, self.worker,
                                "0x" + bytes(tx_hash).hex())
        metrics.CHALLENGES_SENT.inc()
        try:
            receipt = self.sender.wait(tx_hash)
        except TxFailed as err:  # dropped (a lost block, a nonce gap) or reverted on chain
            log.warning("claim %d: challenge %s: %s; the next scan sends it again", request_id,
                        "0x" + bytes(tx_hash).hex(), err)
            return None
        event = self.game.events(receipt, "GameOpened")[0]
        return event["gameId"], receipt["blockNumber"]

    def _claims_lost(self, conn, block: int) -> None:
        """The event cursor's rewind: what blocks after `block` said is undone
        (``store.outcomes_after``: the claims read there are gone with their verdicts and
        challenges; re-read, they are judged afresh), and so are the games this watchtower
        opened there: their claims, if they stand, are judged and challenged again."""
        lost = st.outcomes_after(conn, block)
        if lost:
            log.warning("requests %s: what blocks after %d said of them left the chain; "
                        "reading again", _ids(lost), block)
        for game in st.drop_games_after(conn, Role.CHALLENGER, block):
            self._game_lost(conn, game, f"game {game.game_id}: its block left the chain")

    @staticmethod
    def _game_lost(conn, game: GameRecord, why: str) -> None:
        """The chain no longer has `game` (its row and moves are gone, or go here): its
        challenge left with it, so the claim is judged, and challenged, again."""
        st.drop_game(conn, game.game_id, Role.CHALLENGER)
        st.judge_again(conn, [game.request_id])
        log.warning("%s; judging claim %d again", why, game.request_id)

    def _fail_challenge(self, request_id: int, note: str) -> None:
        with self.store.transaction() as conn:
            st.finish_challenge(conn, request_id, self.address, ChallengeStatus.FAILED,
                                note=note)
        log.error("claim %d: no challenge: %s", request_id, note)

    def _opened_on_chain(self, request_id: int, from_block: int, tx_hash: str | None
                         ) -> tuple[int, int] | None:
        """(game id, block) of a game this watchtower already opened on the request: from
        its recorded transaction (waited for when still pending) or the GameOpened events."""
        if tx_hash is not None:
            try:
                receipt = self.sender.wait(HexBytes(tx_hash))
                events = self.game.events(receipt, "GameOpened")
                if events:
                    return events[0]["gameId"], receipt["blockNumber"]
            except (TransactionNotFound, TxFailed):
                pass  # dropped or reverted: look at the events, then send again
            except Exception as err:  # web3's TimeExhausted: unknown to the node
                log.warning("challenge transaction %s: %s", tx_hash, err)
        logs = logs_since(self.w3, self.game.contract.events.GameOpened, from_block,
                          requestId=request_id, challenger=self.address)
        if logs:
            return logs[0]["args"]["gameId"], logs[0]["blockNumber"]
        return None

    def _has_pending_transactions(self) -> bool:
        eth = self.w3.eth
        return eth.get_transaction_count(self.address, "pending") > eth.get_transaction_count(
            self.address, "latest")

    # -- play ------------------------------------------------------------------------------

    def play(self, game_id: int, token: str | None = None) -> PlayResult:
        """One turn of game `game_id`: read it from the chain, make the moves
        ``prover.game.decide`` gives (recorded before they are sent), and say when to look
        again. `token`: the play chain this call belongs to (None: a one-off call, e.g. the
        eager loop's); a call whose token is no longer the game's stops its chain."""
        with self.store.transaction() as conn:
            current = st.get_game(conn, game_id, Role.CHALLENGER)
        if current is not None and current.status is GameStatus.OPEN:
            # Before the lease: a large model's trace may take longer than the lease lasts.
            self.responder.trace(current)
        with self.store.transaction() as conn:
            record = st.claim_game(conn, game_id, Role.CHALLENGER, self.worker,
                                   lease_seconds=self.lease)
            if record is None:
                current = st.get_game(conn, game_id, Role.CHALLENGER)
        if record is None:
            # Held by another worker, or over: keep this chain only if it is still the game's.
            alive = (current is not None and current.status is GameStatus.OPEN
                     and (token is None or current.state.get("token") == token))
            return PlayResult(again=alive and token is not None,
                              countdown=self.settings.poll_interval)
        if token is not None and record.state.get("token") != token:
            with self.store.transaction() as conn:
                st.release_game(conn, game_id, Role.CHALLENGER, self.worker)
            return PlayResult(again=False)
        try:
            return self._play_turn(record)
        finally:
            with self.store.transaction() as conn:
                st.release_game(conn, game_id, Role.CHALLENGER, self.worker)

    def _play_turn(self, record: GameRecord) -> PlayResult:
        """Up to `MOVES_PER_TURN` turns of the responder, each move waited for, then the
        time of the next look."""
        for _ in range(MOVES_PER_TURN):
            try:
                turn = self.responder.turn(record, self.worker)
            except GameGone as gone:
                with self.store.transaction() as conn:
                    self._game_lost(conn, record, str(gone))
                return PlayResult(again=False)
            if turn.outcome is not None:
                self._resolved(record, turn)
                return PlayResult(again=False, outcome=turn.outcome)
            if turn.sent is None:
                break
            try:
                self.responder.confirm(turn.sent)
            except TxFailed as err:
                log.warning("game %d: %s failed on chain: %s", record.game_id,
                            describe(turn.sent.action), err)
                break
            metrics.MOVES_SENT.labels(kind=type(turn.sent.action).__name__).inc()
        countdown = policy.next_check(turn.state, turn.now, self.settings.poll_interval)
        self.responder.save(record, turn.state, self.worker, turn.now,
                            next_play=time.time() + countdown)
        metrics.set_clocks(record.game_id, policy.clocks(turn.state, turn.now))
        return PlayResult(again=True, countdown=countdown)

    def _trace_of(self, record: GameRecord) -> ModelTrace:
        """The honest trace of the claim the game disputes."""
        with self.store.transaction() as conn:
            request = st.get_request(conn, record.request_id)
            claim = st.get_claim(conn, record.request_id)
        return self.model.trace(list(request.prompt), list(claim.output), request.draw)

    def _resolved(self, record: GameRecord, turn: Turn) -> None:
        metrics.set_clocks(record.game_id, None)
        if turn.outcome is GameStatus.WON:
            log.info("game %d: bond back and slash share credited to %s", record.game_id,
                     self.address)
        else:
            log.error("game %d: the bond of %d wei is gone", record.game_id, self.bond)

    def close(self) -> None:
        self.store.dispose()


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def _judge_prediction(model, output: list[int], predicted: np.ndarray, max_tokens: int
                      ) -> policy.Judgement:
    """The judgement of `output` from the model's teacher-forced tokens `predicted`."""
    verdict = model.check_output(output, predicted, max_tokens)
    convictable = bool(np.any(predicted != np.asarray(output, np.int64)))
    return policy.judge(verdict.valid, verdict.reason, convictable)
