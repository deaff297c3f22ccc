"""`optinfer dataset build`: post every prompt of a file as a request, follow each to
finality, and write the finalized answers as a verified dataset (`services/dataset.py`).

The build's state lives in a journal beside the dataset (`DIR/.build-journal.sqlite`), every
change committed before the next step, so a build killed at any point and started again with
the same options neither posts a prompt twice nor loses a finalized answer:

* A post is written to the journal, with its transaction's hash and nonce, before the
  transaction is sent (`TxSender.submit`'s `on_signed`). On restart a post whose request id is
  not known is settled first (`TxSender.outcome`): mined, it is followed; never to be mined
  (the node lacks it, and its nonce is spent, by a no-op transfer if need be), its prompt is
  posted again.
* A prompt is posted again only when its request can no longer give an answer: rejected
  after a lost dispute (the provider lied: the fee and a share of its stake were credited
  back), refunded unanswered, or its post never landed; at most `max_attempts` times.
* A finalized request's record is written to the journal in the same transaction that marks
  its prompt done; the dataset files are rewritten from the journal when the build ends (or
  stops), so they hold every answer finalized so far.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import RequestSpec, Status
from optinfer.contracts.sender import TxFailed, TxSender
from optinfer.errors import UserError
from optinfer.models.sampling import Sampling
from optinfer.services import consumer
from optinfer.services.dataset import (
    FORMATS,
    ChainView,
    Record,
    make_record,
    provenance,
    write_dataset,
)

JOURNAL_FILE = ".build-journal.sqlite"
DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_ATTEMPTS = 3


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """One prompt of the file: its id (the given one, else its position), its text or chat
    messages, and the token ids posted."""

    id: str
    text: str
    messages: list[dict[str, str]] | None
    tokens: list[int]


def read_prompts(path: Path, model, chat: bool | None = None) -> list[Prompt]:
    """The prompts of `path`: one per non-empty line of a text file, or one JSON object per
    line of a ``.jsonl`` file, ``{"prompt": TEXT}`` or ``{"messages": [{role, content}, ...]}``
    with an optional ``"id"``. Text goes through the model's chat template as a user message
    when the model has one (`chat` None), or as `chat` says. UserError naming the line of the
    first prompt the model cannot take."""
    from optinfer.models.chat import CHAT_TEMPLATE_FILE, chat_tokens, check_messages

    if not path.is_file():
        raise UserError(f"the prompts file {path} does not exist")
    has_template = (Path(model.dir) / CHAT_TEMPLATE_FILE).is_file()
    if chat and not has_template:
        raise UserError(f"model {model.dir} has no chat template: drop --chat")
    use_chat = has_template if chat is None else chat
    prompts, seen = [], set()
    jsonl = path.suffix == ".jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        messages, text, given_id = None, line, None
        if jsonl:
            try:
                item = json.loads(line)
            except ValueError as err:
                raise UserError(f"{where} is not JSON: {err}") from None
            if not isinstance(item, dict) or len({"prompt", "messages"} & set(item)) != 1:
                raise UserError(f"{where}: give an object with \"prompt\" or \"messages\"")
            given_id = item.get("id")
            if "messages" in item:
                messages = check_messages(item["messages"])
                text = messages[-1]["content"]
            else:
                text = item["prompt"]
                if not isinstance(text, str) or not text:
                    raise UserError(f"{where}: \"prompt\" must be non-empty text")
        record_id = str(len(prompts) if given_id is None else given_id)
        if record_id in seen:
            raise UserError(f"{where}: the id {record_id!r} is used twice")
        seen.add(record_id)
        try:
            if messages is None and use_chat:
                messages = [{"role": "user", "content": text}]
            tokens = chat_tokens(model, messages) if messages else model.encode(text)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        prompts.append(Prompt(record_id, text, messages, tokens))
    if not prompts:
        raise UserError(f"{path} holds no prompt")
    return prompts


# ----------------------------------------------------------------------------- journal


@dataclass(frozen=True)
class BuildOptions:
    """What a build asks of every request; a resumed build must ask the same."""

    max_tokens: int
    fee: int
    commit_seconds: int = consumer.DEFAULT_COMMIT_SECONDS
    sampling: Sampling = consumer.GREEDY
    concurrency: int = DEFAULT_CONCURRENCY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    formats: tuple[str, ...] = ("parquet",)

    def check(self) -> None:
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise UserError(f"--max-attempts must be >= 1, got {self.max_attempts}")
        unknown = set(self.formats) - set(FORMATS)
        if unknown or not self.formats:
            raise UserError(f"--format must be among {', '.join(FORMATS)}, got "
                            f"{', '.join(sorted(unknown)) or 'none'}")

    def identity(self) -> dict[str, Any]:
        """The options a resumed build must repeat (concurrency and files may change)."""
        return {"max_tokens": self.max_tokens, "fee": str(self.fee),
                "commit_seconds": self.commit_seconds, "sampling": asdict(self.sampling)}


class Journal:
    """The build's state in SQLite (`JOURNAL_FILE`), each change committed at once."""

    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a kill -9 loses no committed row
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS prompts (
                position INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, text TEXT NOT NULL,
                messages TEXT, tokens TEXT NOT NULL,
                state TEXT NOT NULL, note TEXT);       -- pending, requested, done, failed
            CREATE TABLE IF NOT EXISTS posts (
                tx_hash TEXT PRIMARY KEY, position INTEGER NOT NULL, nonce INTEGER NOT NULL,
                fee TEXT NOT NULL, request_id INTEGER,
                state TEXT NOT NULL);  -- signed, open, finalized, rejected, refunded, void, failed
            CREATE TABLE IF NOT EXISTS records (position INTEGER PRIMARY KEY, row TEXT NOT NULL);
        """)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def start(self, identity: dict[str, Any], prompts: list[Prompt]) -> bool:
        """Record a new build, or check that this one is the journal's; True when resumed."""
        wanted = json.dumps(identity, sort_keys=True)
        digest = hashlib.sha256(json.dumps([asdict(p) for p in prompts]).encode()).hexdigest()
        found = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        if found:
            if found.get("identity") != wanted:
                raise UserError(f"{self.path.parent} holds a build with other options "
                                f"({found.get('identity')}): build into another --out, or "
                                "repeat that build's options")
            if found.get("prompts") != digest:
                raise UserError(f"{self.path.parent} holds a build of other prompts: build "
                                "into another --out, or give the same prompts file")
            return True
        with self.transaction() as db:
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [("identity", wanted), ("prompts", digest),
                            ("started", datetime.now(UTC).isoformat())])
            db.executemany(
                "INSERT INTO prompts VALUES (?, ?, ?, ?, ?, 'pending', NULL)",
                [(i, p.id, p.text, json.dumps(p.messages) if p.messages else None,
                  json.dumps(p.tokens)) for i, p in enumerate(prompts)])
        return False

    def prompt(self, position: int) -> Prompt:
        record_id, text, messages, tokens = self.db.execute(
            "SELECT id, text, messages, tokens FROM prompts WHERE position = ?",
            (position,)).fetchone()
        return Prompt(record_id, text, json.loads(messages) if messages else None,
                      json.loads(tokens))

    def positions(self, state: str) -> list[int]:
        return [row[0] for row in self.db.execute(
            "SELECT position FROM prompts WHERE state = ? ORDER BY position", (state,))]

    def posts(self, state: str) -> list[tuple[str, int, int, int | None]]:
        """(tx_hash, position, nonce, request_id) of the posts in `state`."""
        return self.db.execute("SELECT tx_hash, position, nonce, request_id FROM posts "
                               "WHERE state = ? ORDER BY rowid", (state,)).fetchall()

    def prompt_states(self) -> dict[str, int]:
        """How many prompts are in each state."""
        return dict(self.db.execute("SELECT state, COUNT(*) FROM prompts GROUP BY state"))

    def attempts(self, position: int) -> int:
        return self.db.execute("SELECT COUNT(*) FROM posts WHERE position = ? AND state NOT "
                               "IN ('void', 'failed')", (position,)).fetchone()[0]

    def count_posts(self, state: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM posts WHERE state = ?",
                               (state,)).fetchone()[0]

    def fees(self, states: tuple[str, ...]) -> int:
        marks = ", ".join("?" * len(states))
        return sum(int(fee) for (fee,) in self.db.execute(
            f"SELECT fee FROM posts WHERE state IN ({marks})", states))

    def record_post(self, position: int, tx_hash: str, nonce: int, fee: int) -> None:
        """Before the post's transaction is sent: its hash and nonce."""
        with self.transaction() as db:
            db.execute("INSERT INTO posts VALUES (?, ?, ?, ?, NULL, 'signed')",
                       (tx_hash, position, nonce, str(fee)))
            db.execute("UPDATE prompts SET state = 'requested' WHERE position = ?",
                       (position,))

    def opened(self, tx_hash: str, request_id: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE posts SET state = 'open', request_id = ? WHERE tx_hash = ?",
                       (request_id, tx_hash))

    def ended(self, tx_hash: str, state: str, prompt_state: str = "pending",
              note: str | None = None) -> None:
        """The post can give no answer (`state`); its prompt is `prompt_state` again."""
        with self.transaction() as db:
            (position,) = db.execute("SELECT position FROM posts WHERE tx_hash = ?",
                                     (tx_hash,)).fetchone()
            db.execute("UPDATE posts SET state = ? WHERE tx_hash = ?", (state, tx_hash))
            db.execute("UPDATE prompts SET state = ?, note = ? WHERE position = ?",
                       (prompt_state, note, position))

    def give_up(self, position: int, note: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE prompts SET state = 'failed', note = ? WHERE position = ?",
                       (note, position))

    def finalized(self, tx_hash: str, record: Record) -> None:
        with self.transaction() as db:
            (position,) = db.execute("SELECT position FROM posts WHERE tx_hash = ?",
                                     (tx_hash,)).fetchone()
            db.execute("UPDATE posts SET state = 'finalized' WHERE tx_hash = ?", (tx_hash,))
            db.execute("UPDATE prompts SET state = 'done', note = NULL WHERE position = ?",
                       (position,))
            db.execute("INSERT OR REPLACE INTO records VALUES (?, ?)",
                       (position, json.dumps(record.row())))

    def records(self) -> list[Record]:
        return [Record(**json.loads(row)) for (row,) in
                self.db.execute("SELECT row FROM records ORDER BY position")]

    def failures(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT id, note FROM prompts WHERE state = 'failed'"))

    def close(self) -> None:
        self.db.close()


# ----------------------------------------------------------------------------- builder


@dataclass
class Counts:
    """Where the build stands, for the progress bar."""

    prompts: int
    open: int = 0  # requests posted, no answer committed yet
    committed: int = 0  # answers committed, in their challenge window
    disputed: int = 0  # of those, with a dispute open
    finalized: int = 0
    slashed: int = 0  # answers rejected after a lost dispute (their prompts posted again)
    refunded: int = 0  # requests refunded unanswered (posted again)
    failed: int = 0  # prompts given up

    @property
    def done(self) -> bool:
        return self.finalized + self.failed == self.prompts

    def line(self) -> str:
        return (f"posted {self.open} · committed {self.committed} · finalized "
                f"{self.finalized}/{self.prompts} · disputed {self.disputed} · slashed "
                f"{self.slashed}" + (f" · failed {self.failed}" if self.failed else ""))


class DatasetBuilder:
    """Builds a dataset in `out_dir` from `prompts`, posting from `sender`'s account to the
    coordinator of `view` for `model` (the model whose id the requests name). Drive it with
    :meth:`step` (tests, in-process) or :meth:`run`."""

    def __init__(self, view: ChainView, sender: TxSender, model, prompts: list[Prompt],
                 out_dir: Path, options: BuildOptions, say: Callable[[str], None] = print):
        options.check()
        for prompt in prompts:
            consumer.check_request(model, prompt.tokens, options.max_tokens, options.fee,
                                   options.commit_seconds, options.sampling)
        self.view, self.sender, self.model, self.options = view, sender, model, options
        self.out_dir, self.say = out_dir, say
        self.model_id = consumer.model_id(model)
        consumer.check_registered(view.registry, model)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(out_dir / JOURNAL_FILE)
        identity = {**options.identity(), "model_id": "0x" + self.model_id.hex(),
                    "chain_id": view.chain_id, "coordinator": view.coordinator.address,
                    "consumer": sender.address}
        self.resumed = self.journal.start(identity, prompts)
        self.started = time.monotonic()
        self._recover()

    # -- steps ---------------------------------------------------------------------------

    def _recover(self) -> None:
        """Settle the posts a stopped build signed but did not see land."""
        for tx_hash, _position, nonce, _ in self.journal.posts("signed"):
            self._settle(tx_hash, nonce)

    def _settle(self, tx_hash: str, nonce: int) -> None:
        """Wait for the post `tx_hash` (signed at `nonce`) to land, or make sure it never
        will (`TxSender.outcome`): followed, or its prompt free to be posted again."""
        try:
            receipt = self.sender.outcome(bytes.fromhex(tx_hash[2:]), nonce)
        except TxFailed:  # mined, and reverted: no request
            self.journal.ended(tx_hash, "failed")
            return
        if receipt is None:
            self.journal.ended(tx_hash, "void")
        else:
            self._opened(tx_hash, receipt)

    def step(self) -> Counts:
        """Post what the concurrency allows, follow every open request once; the counts."""
        self._post()
        return self.counts(self._follow())

    def _post(self) -> None:
        room = self.options.concurrency - len(self.journal.posts("open"))
        for position in self.journal.positions("pending")[:max(room, 0)]:
            if self.journal.attempts(position) >= self.options.max_attempts:
                self.journal.give_up(position, f"no answer after {self.options.max_attempts} "
                                     "requests")
                continue
            prompt, signed = self.journal.prompt(position), {}
            spec = RequestSpec(
                model_id=self.model_id, prompt=prompt.tokens, max_tokens=self.options.max_tokens,
                commit_deadline=consumer.next_block_time(self.view.w3)
                + self.options.commit_seconds, sampling=self.options.sampling)
            tx = self.view.coordinator.post_request_tx(spec, self.options.fee)
            try:
                self.sender.submit(tx, self.view.coordinator.artifact,
                                   on_signed=lambda tx_hash, nonce, at=position, into=signed:
                                   self._signed(into, at, tx_hash.to_0x_hex(), nonce))
            except ContractRevert as err:  # refused before anything was signed
                self.journal.give_up(position, f"the coordinator refuses it: {err.name or err}")
                continue
            self._settle(signed["tx_hash"], signed["nonce"])

    def _signed(self, signed: dict, position: int, tx_hash: str, nonce: int) -> None:
        """Before the post's transaction is sent: into the journal (a retried signing, for a
        stale nonce, replaces the post it never sent)."""
        if signed:
            self.journal.ended(signed["tx_hash"], "void", prompt_state="requested")
        self.journal.record_post(position, tx_hash, nonce, self.options.fee)
        signed.update(tx_hash=tx_hash, nonce=nonce)

    def _opened(self, tx_hash: str, receipt) -> None:
        (event,) = self.view.coordinator.events(receipt, "RequestPosted")
        self.journal.opened(tx_hash, event["requestId"])

    def _follow(self) -> list:
        """Read every open request once and act on what became of it; the requests still
        waiting for their answer's finality (open or committed), as read."""
        coordinator = self.view.coordinator
        waiting = []
        now = None
        for tx_hash, position, _, request_id in self.journal.posts("open"):
            request = coordinator.get_request(request_id)
            if request.status is Status.FINALIZED:
                prompt = self.journal.prompt(position)
                record = make_record(prompt.id, provenance(self.view, request_id), self.model,
                                     prompt.tokens, prompt.text, prompt.messages)
                self.journal.finalized(tx_hash, record)
            elif request.status is Status.REJECTED:
                self.say(f"request {request_id} (prompt {self.journal.prompt(position).id}): "
                         "its answer lost a dispute and was slashed; posting the prompt again")
                self.journal.ended(tx_hash, "rejected")
            elif request.status is Status.REFUNDED:
                self.journal.ended(tx_hash, "refunded")
            else:
                waiting.append(request)
                if request.status is Status.OPEN:
                    now = now or consumer.next_block_time(self.view.w3)
                    if now > request.commit_deadline:  # nobody answered: take the fee back
                        with contextlib.suppress(ContractRevert):
                            self.sender.send(coordinator.tx("refund", request_id),
                                             coordinator.artifact)
        return waiting

    def counts(self, waiting: list | None = None) -> Counts:
        """Where the build stands: `waiting` the open requests as just read (`_follow`), else
        read from the chain now."""
        if waiting is None:
            waiting = [self.view.coordinator.get_request(request_id)
                       for _, _, _, request_id in self.journal.posts("open")]
        states = self.journal.prompt_states()
        counts = Counts(prompts=sum(states.values()), finalized=states.get("done", 0),
                        failed=states.get("failed", 0))
        for request in waiting:
            if request.status is Status.OPEN:
                counts.open += 1
            elif request.status is Status.COMMITTED:
                counts.committed += 1
                counts.disputed += request.open_disputes > 0
        counts.slashed = self.journal.count_posts("rejected")
        counts.refunded = self.journal.count_posts("refunded")
        return counts

    # -- the whole build -----------------------------------------------------------------

    def run(self, poll_interval: float = 1.0, timeout: float | None = None,
            progress: Callable[[Counts], None] = lambda counts: None,
            stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Step until every prompt is finalized or given up (or `timeout` seconds pass, or
        `stop()`), then write the dataset files; the summary."""
        while True:
            counts = self.step()
            progress(counts)
            if counts.done or stop() or (timeout is not None
                                         and time.monotonic() - self.started > timeout):
                break
            time.sleep(poll_interval)
        return self.finish(counts)

    def finish(self, counts: Counts | None = None) -> dict[str, Any]:
        """Write the dataset files from the journal; the build's summary."""
        counts = counts or self.counts()
        records = self.journal.records()
        card = {"model_id": "0x" + self.model_id.hex(),
                "model_root": self.model.manifest["model_root"],
                "chain_id": self.view.chain_id, "coordinator": self.view.coordinator.address,
                "prompts": counts.prompts,
                "fees_paid_wei": self.journal.fees(("finalized", "open")),
                "slashed_and_reposted": counts.slashed,
                "refunded_and_reposted": counts.refunded}
        files = write_dataset(self.out_dir, records, self.options.formats, card)
        return {**card, "records": len(records), "complete": counts.done and not counts.failed,
                "open": counts.open + counts.committed, "failed": self.journal.failures(),
                "refunds_credited_wei": self.view.coordinator.balance_of(self.sender.address),
                "files": [str(path) for path in files], "resumed": self.resumed,
                "seconds": round(time.monotonic() - self.started, 1)}

    def close(self) -> None:
        self.journal.close()
