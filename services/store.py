"""The node's database: SQLAlchemy Core tables, Alembic migrations and small typed functions.

One database serves one deployment (one coordinator): request and game ids are the chain's.
SQLite (a file, the embedded default) and Postgres (``postgresql+psycopg://``) run the same
code; the two differ only where noted (how a game row is claimed, how SQLite transactions
start).

Every function takes the open ``Connection`` of the caller's transaction, so a handler can
write its rows and move the chain cursor past the events it handled in one commit::

    with store.transaction() as conn:
        upsert_request(conn, request)
        set_cursor(conn, "coordinator", block)

Statuses are the enums of ``services/statuses.py``; every status write is an update guarded by
that module's transitions (``UPDATE ... WHERE status IN`` the new status's predecessors) that
reports whether a row changed, so two workers never both act on one transition and nothing
moves a record backwards.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.url import make_url

from optinfer.errors import UserError
from optinfer.models.sampling import Sampling
from optinfer.prover.game import Phase, Role
from optinfer.services.statuses import (
    ChallengeStatus,
    ClaimStatus,
    GameStatus,
    RequestStatus,
    check_transition_guard,
)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATION_LOCK_KEY = 0x6F7074696E666572  # "optinfer": the Postgres advisory lock of migrate


class Uint256(sa.types.TypeDecorator):
    """A uint256 (wei amounts) as decimal text: SQLite's integers stop at 2**63 and its
    NUMERIC silently turns larger values into floats."""

    impl = sa.String(78)
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect) -> str | None:
        if value is None:
            return None
        if not 0 <= int(value) < 2**256:
            raise ValueError(f"{value} is not a uint256")
        return str(int(value))

    def process_result_value(self, value: str | None, dialect) -> int | None:
        return None if value is None else int(value)


def _id_column(name: str, **kwargs: Any) -> sa.Column:
    # SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
    return sa.Column(name, sa.BigInteger().with_variant(sa.Integer(), "sqlite"), **kwargs)


metadata = sa.MetaData()

requests = sa.Table(
    "requests",
    metadata,
    sa.Column("request_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("consumer", sa.String(42), nullable=False),
    sa.Column("model_id", sa.String(66), nullable=False),
    sa.Column("prompt", sa.JSON, nullable=False),
    sa.Column("max_tokens", sa.Integer, nullable=False),
    sa.Column("fee", Uint256, nullable=False),
    sa.Column("callback", sa.String(42), nullable=False),
    sa.Column("callback_gas_limit", sa.Integer, nullable=False),
    sa.Column("named_provider", sa.String(42), nullable=False),
    sa.Column("commit_deadline", sa.BigInteger, nullable=False),
    sa.Column("block_number", sa.BigInteger, nullable=False),
    sa.Column("tx_hash", sa.String(66), nullable=False),
    # The hash of the block the event was read from (revision 0005; null on older rows).
    sa.Column("block_hash", sa.String(66), nullable=True),
    # The node's view, a RequestStatus (services/statuses.py has the transitions).
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("output", sa.JSON, nullable=True),  # the answer this node commits (revision 0002)
    # Its commit transaction, recorded before the transaction is sent (revision 0004).
    sa.Column("commit_tx", sa.String(66), nullable=True),
    # The block of the chain event or receipt that last set `status` (revision 0006; null
    # when the node set it itself): a reorganisation that takes it takes the status too.
    sa.Column("status_block", sa.BigInteger, nullable=True),
    # The draw fixed at posting: temperature and top-p in thousandths and the derived seed,
    # zero for a greedy request (revision 0007).
    sa.Column("temperature", sa.Integer, nullable=False, server_default="0"),
    sa.Column("top_p", sa.Integer, nullable=False, server_default="0"),
    sa.Column("seed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
              nullable=False),
)
sa.Index("ix_requests_status", requests.c.status)

claims = sa.Table(
    "claims",
    metadata,
    sa.Column("request_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("provider", sa.String(42), nullable=False),
    sa.Column("output", sa.JSON, nullable=False),
    sa.Column("challenge_deadline", sa.BigInteger, nullable=False),
    sa.Column("block_number", sa.BigInteger, nullable=False),
    sa.Column("tx_hash", sa.String(66), nullable=False),
    sa.Column("block_hash", sa.String(66), nullable=True),  # as on requests (revision 0005)
    # A ClaimStatus; the watchtower adds its verdict.
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=True),
    # Why the watchtower judged so, and when it last queued the verification (revision 0003).
    sa.Column("verdict_note", sa.Text, nullable=True),
    sa.Column("verify_queued_at", sa.Float, nullable=True),  # unix seconds
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
              nullable=False),
)
sa.Index("ix_claims_status", claims.c.status)

games = sa.Table(
    "games",
    metadata,
    sa.Column("game_id", sa.BigInteger, primary_key=True, autoincrement=False),
    # The role this node plays: one database may hold a provider's and a watchtower's view
    # of the same game (the embedded demo runs both).
    sa.Column("player", sa.String(16), primary_key=True),
    sa.Column("request_id", sa.BigInteger, nullable=False),
    sa.Column("phase", sa.String(16), nullable=False),
    sa.Column("k", sa.Integer, nullable=True),
    sa.Column("rounds", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # a GameStatus
    # The local decision state (prover.game.GameState, serialized by its user) as JSON.
    sa.Column("state", sa.JSON, nullable=False),
    # A worker's lease on the row: only the holder acts on the game until it expires, so a
    # crashed worker's games are picked up again.
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires", sa.Float, nullable=True),  # unix seconds
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
              nullable=False),
)
sa.Index("ix_games_request", games.c.request_id)
sa.Index("ix_games_status", games.c.status)

moves = sa.Table(
    "moves",
    metadata,
    _id_column("id", primary_key=True, autoincrement=True),
    sa.Column("game_id", sa.BigInteger, nullable=False),
    sa.Column("player", sa.String(16), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),  # its position: prover.game.move_position
    sa.Column("actor", sa.String(16), nullable=False),  # provider | challenger
    sa.Column("kind", sa.String(32), nullable=False),  # prover.game action name: "PostMid"
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("tx_hash", sa.String(66), nullable=True),
    sa.Column("block_number", sa.BigInteger, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
              nullable=False),
    sa.UniqueConstraint("game_id", "player", "seq", name="uq_moves_game_player_seq"),
)

challenges = sa.Table(
    "challenges",
    metadata,
    # One per claim and challenger key: written before the challenge is sent, so a restart
    # finds what was about to happen instead of sending a second bond (revision 0003).
    sa.Column("request_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("challenger", sa.String(42), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # a ChallengeStatus
    sa.Column("tx_hash", sa.String(66), nullable=True),
    sa.Column("game_id", sa.BigInteger, nullable=True),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires", sa.Float, nullable=True),  # unix seconds
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
              nullable=False),
)
sa.Index("ix_challenges_status", challenges.c.status)

chain_cursors = sa.Table(
    "chain_cursors",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("block_number", sa.BigInteger, nullable=False),  # last block fully processed
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
              onupdate=sa.func.now(), nullable=False),
)

cursor_checkpoints = sa.Table(
    "cursor_checkpoints",
    metadata,
    # The last blocks each cursor handled, with their hashes (revision 0005): a cursor whose
    # newest checkpoint is no longer canonical goes back to the newest one that still is.
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("block_number", sa.BigInteger, primary_key=True),
    sa.Column("block_hash", sa.String(66), nullable=False),
)


# ------------------------------------------------------------------------------- the store


log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 5
"""Connection attempts before a node's start gives up on its database server (about 8 s)."""


def database_error(err: sa.exc.DBAPIError) -> str:
    """The first line of what the database driver said: enough for a log line."""
    return str(err.orig or err).strip().splitlines()[0]


class Store:
    """The database at `url`: an engine, its migrations and its transactions."""

    def __init__(self, url: str, *, echo: bool = False):
        try:
            parsed = make_url(url)
        except sa.exc.ArgumentError as err:
            raise UserError(f"bad database URL {url!r}: {err}") from None
        self.url = parsed
        if parsed.get_backend_name() == "sqlite":
            self.engine = _sqlite_engine(parsed, echo)
        elif parsed.get_backend_name() == "postgresql":
            self.engine = sa.create_engine(parsed, echo=echo, pool_pre_ping=True)
        else:
            raise UserError(f"unsupported database {parsed.get_backend_name()!r}: "
                            "use sqlite:///PATH or postgresql+psycopg://...")

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """A database that cannot be reached is the operator's to fix: one clear line."""
        try:
            yield
        except sa.exc.OperationalError as err:
            raise UserError(f"the database {self.url.render_as_string()} is unreachable: "
                            f"{database_error(err)}") from None

    def wait_reachable(self, attempts: int = CONNECT_ATTEMPTS) -> None:
        """Connect, trying `attempts` times over about 8 s, each failure logged (a database
        restarting, or still recovering, refuses connections for a moment); then the one
        line of :meth:`_reachable`. A SQLite file is tried once: nothing restarts there."""
        if self.url.get_backend_name() == "sqlite":
            attempts = 1
        for attempt in range(1, attempts + 1):
            try:
                with self.engine.connect():
                    return
            except sa.exc.OperationalError as err:
                if attempt == attempts:
                    with self._reachable():
                        raise
                delay = 0.5 * 2 ** (attempt - 1)
                log.warning("the database %s: %s; trying again in %.1f s",
                            self.url.render_as_string(), database_error(err), delay)
                time.sleep(delay)

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to `revision` (``alembic upgrade``) through this store's engine,
        once it answers (:meth:`wait_reachable`)."""
        from alembic import command

        self.wait_reachable()
        with self._reachable(), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Workers starting together on a fresh database would both create the tables
                # (and one fail): the lock lasts until this transaction commits.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": MIGRATION_LOCK_KEY})
            command.upgrade(_alembic_config(conn), revision)

    def current_revision(self) -> str | None:
        """The schema's Alembic revision (None before the first migration)."""
        from alembic.runtime.migration import MigrationContext

        with self._reachable(), self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @staticmethod
    def head_revision() -> str:
        """The newest revision this optinfer's migrations define."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(_alembic_config()).get_current_head()

    def require_current(self) -> None:
        """Refuse a schema other than this optinfer's: a process that did not migrate (a Celery
        child, say) must not write to tables that `optinfer db upgrade` has not yet made."""
        current = self.current_revision()
        head = self.head_revision()
        if current != head:
            raise UserError(f"the database {self.url.render_as_string()} is at schema "
                            f"revision {current or 'none (empty)'}, this optinfer needs {head}: "
                            "run `optinfer db upgrade`")

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection inside one transaction: committed on exit, rolled back on error."""
        with self.engine.begin() as conn:
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


def _alembic_config(conn: Connection | None = None):
    """Alembic's configuration for the shipped migrations; with `conn`, env.py runs on that
    connection (SQLite pragmas and Postgres search_path included)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if conn is not None:
        config.attributes["connection"] = conn
    return config


def _sqlite_engine(url: sa.URL, echo: bool) -> Engine:
    if url.database and url.database != ":memory:":
        folder = Path(url.database).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the SQLite database's folder {folder}: "
                            f"{err.strerror}; set OPTINFER_DATABASE_URL or OPTINFER_STATE_DIR "
                            "to a writable place") from None
    engine = sa.create_engine(url, echo=echo)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Take transaction control from the sqlite3 module, so `begin` below decides.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets the API read while the node writes; the busy timeout makes writers wait
        # for each other instead of failing at once.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that reads and then
        # writes can fail with SQLITE_BUSY when another writer got in between, busy timeout
        # or not. Transactions are short, so serialising them costs little.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _insert(conn: Connection | str, table: sa.Table):
    """The dialect's INSERT (of `conn`, or the dialect named), which has
    ``on_conflict_do_*``."""
    dialect = conn if isinstance(conn, str) else conn.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


# ---------------------------------------------------------------------------- chain cursors


def get_cursor(conn: Connection, name: str) -> int | None:
    """The last block fully processed by cursor `name`, or None if it never ran."""
    return conn.execute(
        sa.select(chain_cursors.c.block_number).where(chain_cursors.c.name == name)
    ).scalar_one_or_none()


def lock_cursor(conn: Connection, name: str, initial: int) -> int:
    """Cursor `name`'s block, created at `initial` if new, locked until the transaction ends
    (Postgres ``FOR UPDATE``; SQLite transactions here hold the write lock anyway)."""
    conn.execute(_insert(conn, chain_cursors).values(name=name, block_number=initial)
                 .on_conflict_do_nothing(index_elements=[chain_cursors.c.name]))
    query = sa.select(chain_cursors.c.block_number).where(chain_cursors.c.name == name)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return conn.execute(query).scalar_one()


CHECKPOINTS_KEPT = 64
"""Checkpoints kept per cursor: a reorganisation deeper than the last 64 polls sends the cursor
back to its start (everything read again)."""


def set_cursor(conn: Connection, name: str, block_number: int,
               block_hash: str | None = None) -> None:
    """Move cursor `name` to `block_number` (with that block's hash, a checkpoint). Moving it
    back here is a bug (events would be handled twice) and raises ValueError: a reorganised
    chain goes through :func:`rewind_cursor`."""
    current = get_cursor(conn, name)
    if current is not None and block_number < current:
        raise ValueError(f"cursor {name!r} would move back from {current} to {block_number}")
    _put_cursor(conn, name, block_number)
    if block_hash is None:
        return
    conn.execute(_insert(conn, cursor_checkpoints)
                 .values(name=name, block_number=block_number, block_hash=block_hash)
                 .on_conflict_do_update(index_elements=[cursor_checkpoints.c.name,
                                                        cursor_checkpoints.c.block_number],
                                        set_={"block_hash": block_hash}))
    kept = sa.select(cursor_checkpoints.c.block_number).where(
        cursor_checkpoints.c.name == name).order_by(
        cursor_checkpoints.c.block_number.desc()).limit(CHECKPOINTS_KEPT)
    conn.execute(sa.delete(cursor_checkpoints).where(
        cursor_checkpoints.c.name == name, cursor_checkpoints.c.block_number.not_in(kept)))


def rewind_cursor(conn: Connection, name: str, block_number: int) -> None:
    """Move cursor `name` back to `block_number` (the chain lost the blocks after it), with
    the checkpoints above it."""
    _put_cursor(conn, name, block_number)
    conn.execute(sa.delete(cursor_checkpoints).where(
        cursor_checkpoints.c.name == name, cursor_checkpoints.c.block_number > block_number))


def checkpoints(conn: Connection, name: str) -> list[tuple[int, str]]:
    """Cursor `name`'s checkpoints, (block number, block hash), newest first."""
    return [(number, block_hash) for number, block_hash in conn.execute(
        sa.select(cursor_checkpoints.c.block_number, cursor_checkpoints.c.block_hash)
        .where(cursor_checkpoints.c.name == name)
        .order_by(cursor_checkpoints.c.block_number.desc()))]


def _put_cursor(conn: Connection, name: str, block_number: int) -> None:
    statement = _insert(conn, chain_cursors).values(name=name, block_number=block_number)
    conn.execute(statement.on_conflict_do_update(
        index_elements=[chain_cursors.c.name],
        set_={"block_number": block_number, "updated_at": sa.func.now()},
    ))


# ---------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestRecord:
    """A posted request as the ``RequestPosted`` event tells it (hex strings for bytes)."""

    request_id: int
    consumer: str
    model_id: str
    prompt: list[int]
    max_tokens: int
    fee: int
    callback: str
    callback_gas_limit: int
    named_provider: str
    commit_deadline: int
    block_number: int
    tx_hash: str
    status: RequestStatus = RequestStatus.OPEN
    note: str | None = None
    output: list[int] | None = None
    commit_tx: str | None = None  # 0x-prefixed
    block_hash: str | None = None  # 0x-prefixed; None on rows read before revision 0005
    temperature: int = 0  # the draw fixed at posting: thousandths, 0 greedy (revision 0007)
    top_p: int = 0
    seed: int = 0

    @property
    def draw(self) -> Sampling:
        """How the answer is decoded (greedy is ``Sampling()``)."""
        return Sampling.from_chain(self.temperature, self.top_p, self.seed)


def upsert_request(conn: Connection, record: RequestRecord) -> bool:
    """Store `record`; True when it is new. Seeing the same request again (its transaction)
    refreshes what the chain says about it, its block included, and keeps the node's own
    status, note, output and commit transaction. Another request under the same id (a
    reorganised chain reused it) replaces the row whole: the node starts on it afresh."""
    values = _fields(record)
    same = conn.execute(sa.select(requests.c.tx_hash).where(
        requests.c.request_id == record.request_id)).scalar() == record.tx_hash
    conn.execute(_request_upsert(conn.dialect.name, keep_node_fields=same), values)
    return not same


#: What a node writes of a request itself: a sighting of the same request keeps them.
_NODE_FIELDS = ("request_id", "status", "note", "output", "commit_tx")


@functools.cache
def _request_upsert(dialect: str, keep_node_fields: bool):
    """`upsert_request`'s statement, built once per dialect and choice (its values are bound
    at execution: building a statement per event was most of a scan's database time)."""
    statement = _insert(dialect, requests)
    fields = [name for name in RequestRecord.__dataclass_fields__
              if not (keep_node_fields and name in _NODE_FIELDS)]
    return statement.on_conflict_do_update(
        index_elements=[requests.c.request_id],
        set_={name: statement.excluded[name] for name in fields})


def get_request(conn: Connection, request_id: int) -> RequestRecord | None:
    row = conn.execute(
        sa.select(requests).where(requests.c.request_id == request_id)
    ).mappings().one_or_none()
    return None if row is None else _record(RequestRecord, row)


def requests_with_status(conn: Connection, status: RequestStatus, limit: int = 100,
                         after: int = -1) -> list[RequestRecord]:
    """Requests in `status` with an id above `after`, oldest first."""
    rows = conn.execute(_page(sa.select(requests), status, after, limit)).mappings()
    return [_record(RequestRecord, row) for row in rows]


def _page(query: sa.Select, status: RequestStatus | None, after: int, limit: int) -> sa.Select:
    """`query` over the requests narrowed to a page: ids above `after`, in `status` when
    given, oldest first, `limit` of them."""
    query = query.where(requests.c.request_id > after)
    if status is not None:
        query = query.where(requests.c.status == status)
    return query.order_by(requests.c.request_id).limit(limit)


def set_request_status(
    conn: Connection, request_id: int, status: RequestStatus, *,
    expected: RequestStatus | Sequence[RequestStatus] | None = None, note: str | None = None,
    output: list[int] | None = None, commit_tx: str | None = None,
    status_block: int | None = None,
) -> bool:
    """Move request `request_id` to `status` if it is in one of the statuses that may become
    it (or in `expected`, a narrower choice), setting `note`, `output` and `commit_tx` when
    given; True when a row changed. `status_block`: the block of the chain event or receipt
    that says so (kept also when the row already had `status`: a later sighting of the same
    outcome, in the block that replaced a lost one)."""
    changed = _guarded_update(conn, requests, requests.c.request_id == request_id, status,
                              expected, note=note, output=output, commit_tx=commit_tx,
                              status_block=status_block)
    if not changed and status_block is not None:
        conn.execute(sa.update(requests).where(requests.c.request_id == request_id,
                                               requests.c.status == status)
                     .values(status_block=status_block))
    return changed


def outcomes_after(conn: Connection, block_number: int) -> list[int]:
    """Undo what the chain's blocks after `block_number` said (a reorganisation took them):
    requests posted there are deleted with their claims and challenges, claims committed there
    too, and a request whose status an event there set goes back to what the older blocks say
    (``_status_before``). Reading those blocks again sets what replaced them. The request ids
    whose rows changed."""
    posted = [request_id for (request_id,) in conn.execute(
        sa.select(requests.c.request_id).where(requests.c.block_number > block_number))]
    forget_claims(conn, posted)
    conn.execute(sa.delete(requests).where(requests.c.request_id.in_(posted)))
    lost_claims = drop_claims_after(conn, block_number)
    undone = [request_id for (request_id,) in conn.execute(
        sa.select(requests.c.request_id).where(requests.c.status_block > block_number))]
    _status_before(conn, undone)
    return sorted({*posted, *lost_claims, *undone})


def undo_unconfirmed(conn: Connection, first: int, last: int, seen: set[tuple[int, int]]
                     ) -> list[int]:
    """Claims and statuses a node wrote from its own receipts in blocks [first, last] with no
    outcome event of their request in their block (`seen`: (request id, block) of the events
    an event cursor found there): the chain lost them (a reorganisation before the cursor got
    there). The claims are deleted, the statuses go back (``_status_before``); the request ids
    undone."""
    claims_lost = [request_id for request_id, block in conn.execute(
        sa.select(claims.c.request_id, claims.c.block_number)
        .where(claims.c.block_number.between(first, last)))
        if (request_id, block) not in seen]
    forget_claims(conn, claims_lost)
    undone = [request_id for request_id, block in conn.execute(
        sa.select(requests.c.request_id, requests.c.status_block)
        .where(requests.c.status_block.between(first, last)))
        if (request_id, block) not in seen]
    _status_before(conn, undone)
    return sorted({*claims_lost, *undone})


def _status_before(conn: Connection, request_ids: Sequence[int]) -> None:
    """Set `request_ids` back to what the chain says without their lost outcome: committed
    while their claim stands, else committing when this node has an answer to commit again,
    else open. (Outside the transition table on purpose: the chain no longer says what the
    status said, finalized and rejected included.)"""
    for request_id in request_ids:
        output = conn.execute(sa.select(requests.c.output)
                              .where(requests.c.request_id == request_id)).scalar()
        standing = get_claim(conn, request_id) is not None
        status = (RequestStatus.COMMITTED if standing else
                  RequestStatus.COMMITTING if output else RequestStatus.OPEN)
        conn.execute(sa.update(requests).where(requests.c.request_id == request_id)
                     .values(status=status, status_block=None))
        if standing:
            conn.execute(sa.update(claims).where(claims.c.request_id == request_id)
                         .values(status=ClaimStatus.COMMITTED))


def requests_page(conn: Connection, *, status: RequestStatus | None = None, after: int = -1,
                  limit: int = 100) -> list[tuple[RequestRecord, ClaimRecord | None]]:
    """Requests with an id above `after` (in `status`, when given), oldest first, each with
    its claim if it has one: what the HTTP API lists."""
    with_claims = sa.select(requests, *[c.label(f"claim_{c.name}") for c in claims.c]) \
        .outerjoin(claims, claims.c.request_id == requests.c.request_id)
    rows = conn.execute(_page(with_claims, status, after, limit)).mappings().all()
    page = []
    for row in rows:
        claim = None
        if row["claim_request_id"] is not None:
            claim = _record(ClaimRecord, {name: row[f"claim_{name}"]
                                          for name in ClaimRecord.__dataclass_fields__})
        page.append((_record(RequestRecord, row), claim))
    return page


def forget_commit_tx(conn: Connection, request_id: int) -> None:
    """Drop the commit transaction recorded for `request_id` (one that failed on chain, so
    that a restart does not wait for it again)."""
    conn.execute(sa.update(requests).where(requests.c.request_id == request_id)
                 .values(commit_tx=None))


# ------------------------------------------------------------------------------------ claims


@dataclass(frozen=True)
class ClaimRecord:
    """A committed output (``OutputCommitted``)."""

    request_id: int
    provider: str
    output: list[int]
    challenge_deadline: int
    block_number: int
    tx_hash: str
    status: ClaimStatus = ClaimStatus.COMMITTED
    verdict: str | None = None
    verdict_note: str | None = None
    block_hash: str | None = None  # as on RequestRecord


def record_claim(conn: Connection, record: ClaimRecord) -> bool:
    """Store `record`; True when it is a new claim. The coordinator allows one claim a request,
    so a claim is its commit transaction: seen again (re-read, or mined again in another
    block after a reorganisation), its row keeps its status and verdict and takes the block;
    another commit under the same request id (the chain lost the first) replaces the row
    whole, without a verdict, to be judged afresh."""
    existing = conn.execute(sa.select(claims.c.tx_hash).where(
        claims.c.request_id == record.request_id)).one_or_none()
    if existing is None:
        return _inserted(conn, _claim_insert(conn.dialect.name), _fields(record))
    if existing.tx_hash == record.tx_hash:
        conn.execute(sa.update(claims).where(claims.c.request_id == record.request_id)
                     .values(block_number=record.block_number, block_hash=record.block_hash))
        return False
    conn.execute(sa.update(claims).where(claims.c.request_id == record.request_id)
                 .values(**_fields(record), verify_queued_at=None))
    # A challenge of the lost claim was lost with it (it came later): the new claim gets
    # its own, and a copy of the old one the node mined again is found by its event.
    conn.execute(sa.delete(challenges).where(challenges.c.request_id == record.request_id))
    return True


@functools.cache
def _claim_insert(dialect: str):
    """`record_claim`'s INSERT, built once per dialect (values bound at execution)."""
    return _insert(dialect, claims).on_conflict_do_nothing(
        index_elements=[claims.c.request_id]).returning(claims.c.request_id)


def forget_claims(conn: Connection, request_ids: Sequence[int]) -> None:
    """Delete the claims on `request_ids`, which the chain lost, with their challenges (sent
    after them, lost with them)."""
    if request_ids:
        conn.execute(sa.delete(claims).where(claims.c.request_id.in_(list(request_ids))))
        conn.execute(sa.delete(challenges).where(challenges.c.request_id.in_(list(request_ids))))


def drop_claims_after(conn: Connection, block_number: int) -> list[int]:
    """Delete the claims read from blocks after `block_number` (the chain lost them); the
    request ids."""
    gone = [request_id for (request_id,) in conn.execute(
        sa.select(claims.c.request_id).where(claims.c.block_number > block_number))]
    forget_claims(conn, gone)
    return gone


def get_claim(conn: Connection, request_id: int) -> ClaimRecord | None:
    row = conn.execute(
        sa.select(claims).where(claims.c.request_id == request_id)
    ).mappings().one_or_none()
    return None if row is None else _record(ClaimRecord, row)


def set_claim_status(
    conn: Connection, request_id: int, status: ClaimStatus, *,
    expected: ClaimStatus | Sequence[ClaimStatus] | None = None, verdict: str | None = None,
) -> bool:
    """Move the claim on `request_id` to `status` from a status that may become it (or from
    `expected`, a narrower choice); True on change."""
    return _guarded_update(conn, claims, claims.c.request_id == request_id, status, expected,
                           verdict=verdict)


def set_claim_verdict(conn: Connection, request_id: int, verdict: str, note: str) -> bool:
    """Record the watchtower's verdict on the claim and why, unless it has one already (the
    first verdict stands: a re-delivered verification changes nothing); True when it did."""
    return conn.execute(
        sa.update(claims)
        .where(claims.c.request_id == request_id, claims.c.verdict.is_(None))
        .values(verdict=verdict, verdict_note=note)
    ).rowcount == 1


def claims_awaiting_verdict(conn: Connection, queued_before: float,
                            confirmed_through: int | None = None, limit: int = 1000
                            ) -> list[int]:
    """Claims without a verdict whose verification was never queued, or queued before
    `queued_before` (its task was lost), oldest first; only those in blocks up to
    `confirmed_through` when given (the confirmation depth holds whoever wrote the row)."""
    where = [claims.c.verdict.is_(None),
             claims.c.verify_queued_at.is_(None) | (claims.c.verify_queued_at < queued_before)]
    if confirmed_through is not None:
        where.append(claims.c.block_number <= confirmed_through)
    rows = conn.execute(
        sa.select(claims.c.request_id).where(*where)
        .order_by(claims.c.request_id).limit(limit)
    )
    return [request_id for (request_id,) in rows]


def mark_verify_queued(conn: Connection, request_ids: Sequence[int], now: float) -> None:
    """Note that the verification of these claims was queued at `now`."""
    if request_ids:
        conn.execute(sa.update(claims).where(claims.c.request_id.in_(list(request_ids)))
                     .values(verify_queued_at=now))


# -------------------------------------------------------------------------------- challenges


@dataclass(frozen=True)
class ChallengeRecord:
    """A challenge `challenger` sends (or sent) against the claim on `request_id`: `sending`
    until its game is known (`opened`, with `game_id`) or it cannot be sent (`failed`, `note`
    says why). `tx_hash` is the challenge transaction once it was handed to the node."""

    request_id: int
    challenger: str
    status: ChallengeStatus
    tx_hash: str | None = None
    game_id: int | None = None
    note: str | None = None
    lease_owner: str | None = None
    lease_expires: float | None = None


def take_challenge(
    conn: Connection, request_id: int, challenger: str, worker: str, *, lease_seconds: float,
    now: float | None = None,
) -> ChallengeRecord | None:
    """The challenge row of (`request_id`, `challenger`), created in `sending` if new and
    leased to `worker` while it is `sending`; None when another worker holds the lease.

    An `opened` or `failed` row is returned as it is (there is nothing left to send). The
    lease is a compare-and-set like :func:`claim_game`'s, so two workers never both send.
    """
    now = time.time() if now is None else now
    conn.execute(_insert(conn, challenges).values(
        request_id=request_id, challenger=challenger, status=ChallengeStatus.SENDING,
    ).on_conflict_do_nothing(index_elements=[challenges.c.request_id, challenges.c.challenger]))
    key = (challenges.c.request_id == request_id) & (challenges.c.challenger == challenger)
    free = (
        (challenges.c.status == ChallengeStatus.SENDING)
        & (challenges.c.lease_owner.is_(None) | (challenges.c.lease_expires <= now)
           | (challenges.c.lease_owner == worker))
    )
    changed = conn.execute(
        sa.update(challenges).where(key & free)
        .values(lease_owner=worker, lease_expires=now + lease_seconds)
    ).rowcount
    record = get_challenge(conn, request_id, challenger)
    if changed == 1 or (record is not None and record.status != ChallengeStatus.SENDING):
        return record
    return None


def get_challenge(conn: Connection, request_id: int, challenger: str) -> ChallengeRecord | None:
    row = conn.execute(
        sa.select(challenges).where(challenges.c.request_id == request_id,
                                    challenges.c.challenger == challenger)
    ).mappings().one_or_none()
    return None if row is None else _record(ChallengeRecord, row)


def set_challenge_tx(conn: Connection, request_id: int, challenger: str, worker: str,
                     tx_hash: str) -> bool:
    """Note the challenge transaction `worker` handed to the node (it holds the lease)."""
    return conn.execute(
        sa.update(challenges)
        .where(challenges.c.request_id == request_id, challenges.c.challenger == challenger,
               challenges.c.lease_owner == worker,
               challenges.c.status == ChallengeStatus.SENDING)
        .values(tx_hash=tx_hash)
    ).rowcount == 1


def finish_challenge(
    conn: Connection, request_id: int, challenger: str, status: ChallengeStatus, *,
    game_id: int | None = None, note: str | None = None,
) -> bool:
    """Move a `sending` challenge to `opened` (with its game) or `failed` (with why) and drop
    its lease; True when it was still sending."""
    allowed = check_transition_guard(status, None)
    return conn.execute(
        sa.update(challenges)
        .where(challenges.c.request_id == request_id, challenges.c.challenger == challenger,
               challenges.c.status.in_(allowed))
        .values(status=status, game_id=game_id, note=note, lease_owner=None,
                lease_expires=None)
    ).rowcount == 1


def claims_to_challenge(conn: Connection, challenger: str, now: float) -> list[int]:
    """False claims (verdict ``invalid``) whose challenge by `challenger` is unfinished: no
    row yet (the worker died after the verdict) or `sending` with no live lease (it died
    while sending), oldest first."""
    mine = (challenges.c.request_id == claims.c.request_id) & (
        challenges.c.challenger == challenger)
    live = (challenges.c.status != ChallengeStatus.SENDING) | (
        challenges.c.lease_owner.is_not(None) & (challenges.c.lease_expires > now))
    rows = conn.execute(
        sa.select(claims.c.request_id)
        .where(claims.c.verdict == "invalid", ~sa.exists().where(mine & live))
        .order_by(claims.c.request_id)
    )
    return [request_id for (request_id,) in rows]


# ------------------------------------------------------------------------------------- games


@dataclass(frozen=True)
class GameRecord:
    """This node's view of one dispute game (see prover.game): `player` is the role it plays,
    `state` its serialized decision state."""

    game_id: int
    player: Role
    request_id: int
    phase: Phase
    k: int | None
    rounds: int
    status: GameStatus
    state: dict[str, Any]
    lease_owner: str | None = None
    lease_expires: float | None = None


def create_game(conn: Connection, record: GameRecord) -> bool:
    """Store a game this node takes part in; True when it is new (a second call is a no-op)."""
    values = _fields(record)
    values.update(player=record.player.value, phase=record.phase.value)
    statement = _insert(conn, games).values(**values)
    return _inserted(conn, statement.on_conflict_do_nothing(
        index_elements=[games.c.game_id, games.c.player]
    ).returning(games.c.game_id))


def drop_games_after(conn: Connection, player: Role, block_number: int) -> list[GameRecord]:
    """Delete `player`'s games opened in blocks after `block_number` (the chain lost them, and
    may give their ids to other games), with their journaled moves; the records deleted."""
    rows = conn.execute(sa.select(games).where(games.c.player == player.value)).mappings()
    lost = [_game(row) for row in rows
            if (row["state"] or {}).get("opened_block", 0) > block_number]
    for record in lost:
        drop_game(conn, record.game_id, player)
    return lost


def drop_game(conn: Connection, game_id: int, player: Role) -> None:
    """Delete `player`'s game `game_id` and its journaled moves: the chain does not have it."""
    conn.execute(sa.delete(moves).where(moves.c.game_id == game_id,
                                        moves.c.player == player.value))
    conn.execute(sa.delete(games).where(games.c.game_id == game_id,
                                        games.c.player == player.value))


def judge_again(conn: Connection, request_ids: Sequence[int]) -> None:
    """Forget the verdicts on `request_ids` and their challenges, whose games the chain lost:
    the claims (still on chain) are judged, and challenged, afresh."""
    if request_ids:
        conn.execute(sa.update(claims).where(claims.c.request_id.in_(list(request_ids)))
                     .values(verdict=None, verdict_note=None, verify_queued_at=None))
        conn.execute(sa.delete(challenges).where(challenges.c.request_id.in_(list(request_ids))))


def get_game(conn: Connection, game_id: int, player: Role) -> GameRecord | None:
    row = conn.execute(
        sa.select(games).where(games.c.game_id == game_id, games.c.player == player.value)
    ).mappings().one_or_none()
    return None if row is None else _game(row)


def claim_game(
    conn: Connection, game_id: int, player: Role, worker: str, *, lease_seconds: float,
    now: float | None = None,
) -> GameRecord | None:
    """Lease open game (`game_id`, `player`) to `worker` for `lease_seconds`; the game, or None
    when another worker holds it (or it is not open).

    Postgres: ``SELECT ... FOR UPDATE SKIP LOCKED`` skips a row another transaction is
    claiming right now, then the lease keeps it after that transaction commits. SQLite: a
    compare-and-set ``UPDATE ... WHERE`` the lease is free, which its write lock makes atomic.
    Either way two workers never both get the game. `worker` may renew its own lease.
    """
    now = time.time() if now is None else now
    key = (games.c.game_id == game_id) & (games.c.player == player.value)
    free = (
        (games.c.status == GameStatus.OPEN)
        & (games.c.lease_owner.is_(None) | (games.c.lease_expires <= now)
           | (games.c.lease_owner == worker))
    )
    if conn.dialect.name == "postgresql":
        locked = conn.execute(
            sa.select(games.c.game_id).where(key & free).with_for_update(skip_locked=True)
        ).one_or_none()
        if locked is None:
            return None
    changed = conn.execute(
        sa.update(games).where(key & free)
        .values(lease_owner=worker, lease_expires=now + lease_seconds)
    ).rowcount
    return get_game(conn, game_id, player) if changed == 1 else None


def claim_next_game(
    conn: Connection, player: Role, worker: str, *, lease_seconds: float,
    now: float | None = None,
) -> GameRecord | None:
    """Lease the oldest open game of `player` that nobody holds; None when there is none."""
    now = time.time() if now is None else now
    free = (
        (games.c.player == player.value) & (games.c.status == GameStatus.OPEN)
        & (games.c.lease_owner.is_(None) | (games.c.lease_expires <= now))
    )
    query = sa.select(games.c.game_id).where(free).order_by(games.c.game_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True).limit(1)
    for (game_id,) in conn.execute(query).all():
        claimed = claim_game(conn, game_id, player, worker, lease_seconds=lease_seconds, now=now)
        if claimed is not None:
            return claimed
    return None


def release_game(conn: Connection, game_id: int, player: Role, worker: str) -> bool:
    """Give up `worker`'s lease on the game; True when it held it."""
    return conn.execute(
        sa.update(games)
        .where(games.c.game_id == game_id, games.c.player == player.value,
               games.c.lease_owner == worker)
        .values(lease_owner=None, lease_expires=None)
    ).rowcount == 1


def update_game(
    conn: Connection, game_id: int, player: Role, worker: str, *, phase: Phase, k: int | None,
    rounds: int, status: GameStatus, state: dict[str, Any],
) -> bool:
    """Save the game's progress; only the lease holder `worker` may, and only while the game
    is open (True when it did)."""
    return conn.execute(
        sa.update(games)
        .where(games.c.game_id == game_id, games.c.player == player.value,
               games.c.lease_owner == worker,
               games.c.status.in_(check_transition_guard(status, None)))
        .values(phase=phase.value, k=k, rounds=rounds, status=status, state=state)
    ).rowcount == 1


def games_with_status(conn: Connection, player: Role, status: GameStatus) -> list[GameRecord]:
    """The games `player` plays that are in `status`, oldest first."""
    rows = conn.execute(
        sa.select(games).where(games.c.player == player.value, games.c.status == status)
        .order_by(games.c.game_id)
    ).mappings()
    return [_game(row) for row in rows]


def game_status_counts(conn: Connection, player: Role) -> dict[str, int]:
    """How many of `player`'s games are in each status (``{"open": 2, "won": 5}``)."""
    rows = conn.execute(
        sa.select(games.c.status, sa.func.count()).where(games.c.player == player.value)
        .group_by(games.c.status)
    )
    return {GameStatus(status): count for status, count in rows}


def game_records(conn: Connection, game_id: int) -> list[GameRecord]:
    """The game as each role this node plays in it sees it, by role name (challenger first)."""
    rows = conn.execute(
        sa.select(games).where(games.c.game_id == game_id).order_by(games.c.player)
    ).mappings()
    return [_game(row) for row in rows]


def game_ids_by_request(conn: Connection, request_ids: Sequence[int]) -> dict[int, list[int]]:
    """The ids of the games on each of `request_ids` (only those with games), ascending."""
    found: dict[int, list[int]] = {}
    if request_ids:
        for request_id, game_id in conn.execute(
                sa.select(games.c.request_id, games.c.game_id).distinct()
                .where(games.c.request_id.in_(list(request_ids))).order_by(games.c.game_id)):
            found.setdefault(request_id, []).append(game_id)
    return found


def _game(row) -> GameRecord:
    values = dict(row)
    values.pop("created_at")
    values["player"] = Role(values["player"])
    values["phase"] = Phase(values["phase"])
    values["status"] = GameStatus(values["status"])
    return GameRecord(**values)


# ------------------------------------------------------------------------------------- moves


@dataclass(frozen=True)
class MoveRecord:
    """One move of a game, the node's own or its opponent's. (`game_id`, `player`, `seq`)
    is unique: a move is recorded once, however often it is seen or retried."""

    game_id: int
    player: Role
    seq: int
    actor: Role
    kind: str
    payload: dict[str, Any]
    tx_hash: str | None = None
    block_number: int | None = None


def record_move(conn: Connection, record: MoveRecord) -> bool:
    """Store `record`; True when it is new, False when that move was already recorded."""
    values = _fields(record)
    values.update(player=record.player.value, actor=record.actor.value)
    statement = _insert(conn, moves).values(**values)
    return _inserted(conn, statement.on_conflict_do_nothing(
        index_elements=[moves.c.game_id, moves.c.player, moves.c.seq]
    ).returning(moves.c.id))


def journal_move(conn: Connection, record: MoveRecord) -> MoveRecord:
    """Journal `record` at its position before it is sent; the row as it stands now. A row
    there for another move (one that never landed: the chain asks for this one at its
    position) is rewritten, without a transaction; the same move keeps its row and its
    transaction, for the caller to wait for or send again."""
    record_move(conn, record)
    (recorded,) = [m for m in game_moves(conn, record.game_id, record.player)
                   if m.seq == record.seq]
    if (recorded.kind, recorded.payload) == (record.kind, record.payload):
        return recorded
    conn.execute(
        sa.update(moves)
        .where(moves.c.game_id == record.game_id, moves.c.player == record.player.value,
               moves.c.seq == record.seq)
        .values(actor=record.actor.value, kind=record.kind, payload=record.payload,
                tx_hash=None, block_number=None))
    return record


def set_move_transaction(
    conn: Connection, game_id: int, player: Role, seq: int, tx_hash: str,
    block_number: int | None = None,
) -> bool:
    """Attach the transaction that carries a move (and its block once mined)."""
    return conn.execute(
        sa.update(moves)
        .where(moves.c.game_id == game_id, moves.c.player == player.value, moves.c.seq == seq)
        .values(tx_hash=tx_hash, block_number=block_number)
    ).rowcount == 1


def forget_unsent_move(conn: Connection, game_id: int, player: Role, seq: int) -> bool:
    """Delete move `seq` if no transaction carries it (the contract refused it before it was
    sent, or the chain now asks for another move): the table keeps the moves made. True when
    it did."""
    return conn.execute(
        sa.delete(moves)
        .where(moves.c.game_id == game_id, moves.c.player == player.value, moves.c.seq == seq,
               moves.c.tx_hash.is_(None))
    ).rowcount == 1


def game_moves(conn: Connection, game_id: int, player: Role) -> list[MoveRecord]:
    """The recorded moves of the game, in order."""
    rows = conn.execute(
        sa.select(moves).where(moves.c.game_id == game_id, moves.c.player == player.value)
        .order_by(moves.c.seq)
    ).mappings()
    result = []
    for row in rows:
        values = {field: row[field] for field in MoveRecord.__dataclass_fields__}
        values["player"] = Role(values["player"])
        values["actor"] = Role(values["actor"])
        result.append(MoveRecord(**values))
    return result


# ----------------------------------------------------------------------------------- helpers


def _fields(record) -> dict[str, Any]:
    return {field: getattr(record, field) for field in record.__dataclass_fields__}


#: Each record's status enum, for reading rows back (`_game` reads games).
_STATUS_OF = {RequestRecord: RequestStatus, ClaimRecord: ClaimStatus,
              ChallengeRecord: ChallengeStatus}


def _record(cls, row):
    values = {field: row[field] for field in cls.__dataclass_fields__}
    if "status" in values:
        values["status"] = _STATUS_OF[cls](values["status"])
    return cls(**values)


def _inserted(conn: Connection, statement, values: dict[str, Any] | None = None) -> bool:
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT DO NOTHING.
    return conn.execute(statement, values).first() is not None


def _guarded_update(conn: Connection, table: sa.Table, key, status, expected, **changes: Any
                    ) -> bool:
    """Set `status` (and the other `changes` not None) on the row at `key` if its status is
    one that may become `status` (`statuses.TRANSITIONS`), or one of `expected`."""
    condition = key & table.c.status.in_(check_transition_guard(status, expected))
    changes = {name: value for name, value in changes.items() if value is not None}
    return conn.execute(sa.update(table).where(condition).values(status=status, **changes)
                        ).rowcount == 1
