"""The store on SQLite and on the real Postgres: migrations, cursors, requests and claims,
move uniqueness, and game leases that two connections can never both hold."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from optinfer.errors import UserError
from optinfer.prover.game import Phase, Role
from optinfer.services import store as st
from optinfer.services.statuses import ClaimStatus, GameStatus, RequestStatus
from optinfer.services.store import (
    ClaimRecord,
    GameRecord,
    MoveRecord,
    RequestRecord,
    Store,
)

ZERO = "0x" + "0" * 40
CONSUMER = "0x" + "1" * 40
PROVIDER = "0x" + "2" * 40


def a_request(request_id: int, **changes) -> RequestRecord:
    values = dict(
        request_id=request_id, consumer=CONSUMER, model_id="0x" + "ab" * 32, prompt=[1, 6, 7],
        max_tokens=16, fee=3 * 10**19, callback=ZERO, callback_gas_limit=0,
        named_provider=ZERO, commit_deadline=1_900_000_000, block_number=10,
        tx_hash="0x" + "cd" * 32,
    )
    values.update(changes)
    return RequestRecord(**values)


def a_game(game_id: int, player: Role = Role.PROVIDER, **changes) -> GameRecord:
    values = dict(game_id=game_id, player=player, request_id=1, phase=Phase.AWAIT_ROOT, k=None,
                  rounds=0, status=GameStatus.OPEN,
                  state={"lo": 0, "hi": 42, "roots": ["0x00"]})
    values.update(changes)
    return GameRecord(**values)


# ---------------------------------------------------------------------------- migrations


def test_migrations_create_exactly_the_declared_schema(store: Store):
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(st.MIGRATIONS_DIR))
    assert store.current_revision() == ScriptDirectory.from_config(config).get_current_head()
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, st.metadata) == []
        assert set(sa.inspect(conn).get_table_names()) >= {
            "requests", "claims", "games", "moves", "chain_cursors", "alembic_version"}


def test_a_store_not_yet_upgraded_is_refused_until_migrated(database_url: str):
    """What a process that uses the database without owning it checks (a Celery child's
    watchtower): an empty schema is refused with the command that creates it."""
    store = Store(database_url)
    try:
        with pytest.raises(UserError, match=r"revision none \(empty\), this optinfer needs "
                           + Store.head_revision() + r": run `optinfer db upgrade`"):
            store.require_current()
        store.migrate()
        store.require_current()
        assert store.current_revision() == Store.head_revision()
    finally:
        store.dispose()


def test_an_unreachable_database_is_one_clear_error():
    store = Store("postgresql+psycopg://nobody:secret@127.0.0.1:9/none?connect_timeout=2")
    for check in (store.migrate, store.require_current):
        with pytest.raises(UserError, match=r"the database .*127\.0\.0\.1:9/none.* is "
                           r"unreachable") as caught:
            check()
        assert "secret" not in str(caught.value)


def test_migrate_twice_is_a_no_op(store: Store):
    with store.transaction() as conn:
        st.set_cursor(conn, "c", 7)
    store.migrate()
    with store.transaction() as conn:
        assert st.get_cursor(conn, "c") == 7


def test_workers_migrating_a_fresh_postgres_database_at_once_all_succeed(postgres_admin):
    from tests.services.conftest import drop_schema, postgres_schema_url

    schema, url = postgres_schema_url(postgres_admin)
    stores = [Store(url) for _ in range(3)]
    failures: list[BaseException] = []

    def migrate(store: Store) -> None:
        try:
            store.migrate()
        except BaseException as err:  # noqa: BLE001 (reported below)
            failures.append(err)

    try:
        threads = [threading.Thread(target=migrate, args=(store,)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert len({store.current_revision() for store in stores}) == 1
    finally:
        for store in stores:
            store.dispose()
        drop_schema(postgres_admin, schema)


def test_migrations_ship_with_the_package():
    # env.py, the script template and the versions are package data (pyproject.toml).
    assert (st.MIGRATIONS_DIR / "env.py").is_file()
    assert (st.MIGRATIONS_DIR / "script.py.mako").is_file()
    assert list((st.MIGRATIONS_DIR / "versions").glob("0001_*.py"))


def test_unsupported_database_is_a_user_error():
    from optinfer.errors import UserError

    with pytest.raises(UserError, match="unsupported database 'mysql'"):
        Store("mysql://localhost/x")


# ------------------------------------------------------------------------------- cursors


def test_cursor_round_trip_and_no_rewind(store: Store):
    with store.transaction() as conn:
        assert st.get_cursor(conn, "coordinator") is None
        st.set_cursor(conn, "coordinator", 100)
        st.set_cursor(conn, "coordinator", 100)
        st.set_cursor(conn, "coordinator", 250)
    with store.transaction() as conn:
        assert st.get_cursor(conn, "coordinator") == 250
        assert st.get_cursor(conn, "game") is None
        with pytest.raises(ValueError, match="move back"):
            st.set_cursor(conn, "coordinator", 249)


def test_cursor_rolls_back_with_the_rows_it_covers(store: Store):
    with pytest.raises(RuntimeError), store.transaction() as conn:
        st.upsert_request(conn, a_request(1))
        st.set_cursor(conn, "coordinator", 10)
        raise RuntimeError("handler crashed before the commit")
    with store.transaction() as conn:
        assert st.get_cursor(conn, "coordinator") is None
        assert st.get_request(conn, 1) is None


def test_lock_cursor_creates_it_at_the_initial_block(store: Store):
    with store.transaction() as conn:
        assert st.lock_cursor(conn, "c", -1) == -1
        st.set_cursor(conn, "c", 5)
        assert st.lock_cursor(conn, "c", -1) == 5


# ---------------------------------------------------------------------- requests, claims


def test_request_upsert_keeps_local_status(store: Store):
    with store.transaction() as conn:
        assert st.upsert_request(conn, a_request(1)) is True
        assert st.set_request_status(conn, 1, RequestStatus.SKIPPED, note="prompt too long")
        assert st.upsert_request(conn, a_request(1, block_number=11)) is False
        stored = st.get_request(conn, 1)
    assert stored.status == "skipped" and stored.note == "prompt too long"
    assert stored.block_number == 11
    assert stored.fee == 3 * 10**19  # beyond int64: kept exact
    assert stored.prompt == [1, 6, 7]


def test_guarded_status_moves_once(store: Store):
    with store.transaction() as conn:
        st.upsert_request(conn, a_request(1))
        st.upsert_request(conn, a_request(2))
        assert st.set_request_status(conn, 1, RequestStatus.COMMITTED, expected=RequestStatus.OPEN)
        assert not st.set_request_status(conn, 1, RequestStatus.COMMITTED,
                                         expected=RequestStatus.OPEN)
        assert [r.request_id for r in st.requests_with_status(conn, RequestStatus.OPEN)] == [2]


def test_no_status_write_moves_a_record_backwards(store: Store):
    """Every write is guarded by services/statuses.py: a finalized request or a slashed claim
    stays so whoever writes late (a restart, a second worker, an old event), a guard wider
    than the table is a caller's bug, and records read back carry their enums."""
    claim = ClaimRecord(request_id=1, provider=PROVIDER, output=[5], challenge_deadline=9,
                        block_number=12, tx_hash="0x" + "ef" * 32)
    with store.transaction() as conn:
        st.upsert_request(conn, a_request(1))
        st.record_claim(conn, claim)
        assert not st.set_request_status(conn, 1, RequestStatus.FINALIZED)  # open: not yet
        assert st.set_request_status(conn, 1, RequestStatus.COMMITTING, output=[5])
        assert st.set_request_status(conn, 1, RequestStatus.COMMITTED)
        assert st.set_request_status(conn, 1, RequestStatus.FINALIZED)
        for late in (RequestStatus.COMMITTING, RequestStatus.COMMITTED, RequestStatus.SKIPPED,
                     RequestStatus.REJECTED):
            assert not st.set_request_status(conn, 1, late, note="late")
        assert st.set_claim_status(conn, 1, ClaimStatus.SLASHED)
        assert not st.set_claim_status(conn, 1, ClaimStatus.FINALIZED)
        assert not st.set_claim_status(conn, 1, ClaimStatus.DISPUTED)
        with pytest.raises(ValueError, match="finalized may not become committed"):
            st.set_request_status(conn, 1, RequestStatus.COMMITTED,
                                  expected=(RequestStatus.OPEN, RequestStatus.FINALIZED))
        request, stored = st.get_request(conn, 1), st.get_claim(conn, 1)
    assert request.status is RequestStatus.FINALIZED and request.note is None
    assert stored.status is ClaimStatus.SLASHED


def test_a_claim_is_its_commit_transaction(store: Store):
    """The same commit seen again, mined in another block after a reorganisation, keeps its
    verdict and takes the block; another commit under the request id (the chain lost the
    first) replaces the row without a verdict and drops the lost claim's challenge."""
    first = ClaimRecord(request_id=1, provider=PROVIDER, output=[5], challenge_deadline=9,
                        block_number=12, tx_hash="0x" + "ef" * 32, block_hash="0x" + "01" * 32)
    with store.transaction() as conn:
        assert st.record_claim(conn, first)
        st.set_claim_verdict(conn, 1, "invalid", "token 0 is 5, the model gives 6")
        st.take_challenge(conn, 1, PROVIDER, "w", lease_seconds=60)
        again = ClaimRecord(**{**first.__dict__, "block_number": 13,
                               "block_hash": "0x" + "02" * 32})
        assert not st.record_claim(conn, again)
        kept = st.get_claim(conn, 1)
        assert (kept.verdict, kept.block_number, kept.block_hash) == (
            "invalid", 13, "0x" + "02" * 32)
        assert st.get_challenge(conn, 1, PROVIDER) is not None
        other = ClaimRecord(**{**first.__dict__, "output": [6], "tx_hash": "0x" + "aa" * 32})
        assert st.record_claim(conn, other)
        replaced = st.get_claim(conn, 1)
        assert (replaced.output, replaced.verdict, replaced.tx_hash) == (
            [6], None, "0x" + "aa" * 32)
        assert st.get_challenge(conn, 1, PROVIDER) is None
        assert st.claims_awaiting_verdict(conn, queued_before=0, confirmed_through=11) == []
        assert st.claims_awaiting_verdict(conn, queued_before=0, confirmed_through=12) == [1]
        assert st.drop_claims_after(conn, 11) == [1] and st.get_claim(conn, 1) is None


def test_every_status_has_its_transitions_and_terminals_end():
    from optinfer.services.statuses import TRANSITIONS, ChallengeStatus, predecessors, successors

    assert set(TRANSITIONS) == {RequestStatus, ClaimStatus, GameStatus, ChallengeStatus}
    for kind, table in TRANSITIONS.items():
        assert set(table) == set(kind)
        for status in kind:
            assert all(type(after) is kind for after in successors(status)), status
    # A skipped request still follows the chain: another provider's answer, a refund.
    assert predecessors(RequestStatus.COMMITTED) == (RequestStatus.OPEN,
                                                     RequestStatus.COMMITTING,
                                                     RequestStatus.SKIPPED)
    assert successors(RequestStatus.SKIPPED) == {RequestStatus.COMMITTED,
                                                 RequestStatus.REFUNDED}
    assert predecessors(GameStatus.WON) == (GameStatus.OPEN,)
    assert predecessors(ChallengeStatus.SENDING) == ()  # only ever inserted
    for terminal in (RequestStatus.FINALIZED, RequestStatus.REJECTED, RequestStatus.REFUNDED,
                     ClaimStatus.FINALIZED, ClaimStatus.SLASHED, GameStatus.WON,
                     GameStatus.LOST, ChallengeStatus.OPENED, ChallengeStatus.FAILED):
        assert successors(terminal) == frozenset()


def test_claim_is_recorded_once(store: Store):
    claim = ClaimRecord(request_id=1, provider=PROVIDER, output=[5, 2], challenge_deadline=9,
                        block_number=12, tx_hash="0x" + "ef" * 32)
    with store.transaction() as conn:
        assert st.record_claim(conn, claim) is True
        assert st.record_claim(conn, claim) is False
        assert st.set_claim_status(conn, 1, ClaimStatus.DISPUTED, verdict="invalid")
        assert st.get_claim(conn, 1).verdict == "invalid"


# ----------------------------------------------------------------------- games and moves


def test_game_round_trip(store: Store):
    with store.transaction() as conn:
        assert st.create_game(conn, a_game(7)) is True
        assert st.create_game(conn, a_game(7)) is False
        # The watchtower's view of the same game is a separate row.
        assert st.create_game(conn, a_game(7, Role.CHALLENGER)) is True
        assert st.get_game(conn, 7, Role.PROVIDER) == a_game(7)


def test_move_is_never_recorded_twice(store: Store):
    move = MoveRecord(game_id=7, player=Role.PROVIDER, seq=0, actor=Role.PROVIDER,
                      kind="PostRoot", payload={"state_root": "0x" + "11" * 32})
    with store.transaction() as conn:
        assert st.record_move(conn, move) is True
        assert st.record_move(conn, move) is False
        # Same slot, different content (a retried send seen again): still the first one.
        assert st.record_move(conn, MoveRecord(7, Role.PROVIDER, 0, Role.PROVIDER, "PostMid",
                                               {})) is False
        assert st.record_move(conn, MoveRecord(7, Role.PROVIDER, 1, Role.CHALLENGER,
                                               "Agree", {"mid": 21})) is True
        assert st.set_move_transaction(conn, 7, Role.PROVIDER, 0, "0x" + "aa" * 32, 30)
    with store.transaction() as conn:
        recorded = st.game_moves(conn, 7, Role.PROVIDER)
    assert [(m.seq, m.kind, m.actor) for m in recorded] == [
        (0, "PostRoot", Role.PROVIDER), (1, "Agree", Role.CHALLENGER)]
    assert recorded[0].tx_hash == "0x" + "aa" * 32 and recorded[0].block_number == 30


def test_only_a_move_without_a_transaction_can_be_forgotten(store: Store):
    with store.transaction() as conn:
        st.record_move(conn, MoveRecord(7, Role.PROVIDER, 0, Role.PROVIDER, "PostRoot", {}))
        st.set_move_transaction(conn, 7, Role.PROVIDER, 0, "0x" + "aa" * 32)
        st.record_move(conn, MoveRecord(7, Role.PROVIDER, 1, Role.PROVIDER, "PostMid", {}))
        assert st.forget_unsent_move(conn, 7, Role.PROVIDER, 0) is False
        assert st.forget_unsent_move(conn, 7, Role.PROVIDER, 1) is True
        # Its slot is free again, for the move the chain asks for instead.
        assert st.record_move(conn, MoveRecord(7, Role.PROVIDER, 1, Role.PROVIDER, "Timeout",
                                               {})) is True
        assert [m.kind for m in st.game_moves(conn, 7, Role.PROVIDER)] == ["PostRoot", "Timeout"]


def test_the_journal_keeps_a_retried_move_and_rewrites_one_the_chain_no_longer_asks_for(
        store: Store):
    """``journal_move``: the same move at its position keeps its row and transaction (to be
    waited for, or sent again); another move there (the recorded one never landed) replaces
    it, without a transaction."""
    root = MoveRecord(7, Role.PROVIDER, 0, Role.PROVIDER, "PostRoot", {"path": 3})
    with store.transaction() as conn:
        assert st.journal_move(conn, root) == root
        st.set_move_transaction(conn, 7, Role.PROVIDER, 0, "0x" + "aa" * 32)
        again = st.journal_move(conn, root)
        assert (again.kind, again.tx_hash) == ("PostRoot", "0x" + "aa" * 32)
        timeout = MoveRecord(7, Role.PROVIDER, 0, Role.PROVIDER, "Timeout", {})
        assert st.journal_move(conn, timeout) == timeout
        (row,) = st.game_moves(conn, 7, Role.PROVIDER)
    assert (row.kind, row.payload, row.tx_hash, row.block_number) == ("Timeout", {}, None, None)


def test_move_uniqueness_is_the_database_constraint(store: Store):
    # Even a plain INSERT that skips record_move's ON CONFLICT is refused.
    values = dict(game_id=7, player="provider", seq=0, actor="provider", kind="PostRoot",
                  payload={})
    with store.transaction() as conn:
        conn.execute(sa.insert(st.moves).values(**values))
    with pytest.raises(sa.exc.IntegrityError), store.transaction() as conn:
        conn.execute(sa.insert(st.moves).values(**values))


def test_lease_holder_alone_updates_the_game(store: Store):
    with store.transaction() as conn:
        st.create_game(conn, a_game(3))
        assert st.claim_game(conn, 3, Role.PROVIDER, "w1", lease_seconds=60, now=1000) is not None
        assert st.claim_game(conn, 3, Role.PROVIDER, "w2", lease_seconds=60, now=1030) is None
        # w1 renews; an expired lease goes to whoever asks next.
        assert st.claim_game(conn, 3, Role.PROVIDER, "w1", lease_seconds=60, now=1030)
        assert st.claim_game(conn, 3, Role.PROVIDER, "w2", lease_seconds=60, now=1091)
        assert not st.update_game(conn, 3, Role.PROVIDER, "w1", phase=Phase.BISECTION, k=None,
                                  rounds=1, status=GameStatus.OPEN, state={})
        assert st.update_game(conn, 3, Role.PROVIDER, "w2", phase=Phase.BISECTION, k=None,
                              rounds=1, status=GameStatus.OPEN, state={"lo": 0})
        assert st.release_game(conn, 3, Role.PROVIDER, "w2")
        game = st.get_game(conn, 3, Role.PROVIDER)
    assert (game.phase, game.rounds, game.state, game.lease_owner) == (
        Phase.BISECTION, 1, {"lo": 0}, None)


def test_finished_game_cannot_be_claimed(store: Store):
    with store.transaction() as conn:
        st.create_game(conn, a_game(4, status=GameStatus.WON))
        assert st.claim_game(conn, 4, Role.PROVIDER, "w1", lease_seconds=60) is None


def test_concurrent_claims_give_the_game_to_one(database_url: str):
    """Eight connections (eight engines, as eight processes would have) claim one game at the
    same moment: exactly one gets it."""
    stores = [Store(database_url) for _ in range(8)]
    try:
        stores[0].migrate()
        with stores[0].transaction() as conn:
            st.create_game(conn, a_game(9))
        start = threading.Barrier(len(stores))
        winners: list[str] = []

        def claim(index: int) -> None:
            worker = f"worker-{index}"
            start.wait()
            with stores[index].transaction() as conn:
                if st.claim_game(conn, 9, Role.PROVIDER, worker, lease_seconds=60):
                    winners.append(worker)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(winners) == 1
        with stores[0].transaction() as conn:
            assert st.get_game(conn, 9, Role.PROVIDER).lease_owner == winners[0]
    finally:
        for store in stores:
            store.dispose()


def test_postgres_skips_a_row_another_transaction_is_claiming(request):
    """SKIP LOCKED: while one transaction holds the row, another's claim returns None at once
    instead of waiting, and claim_next_game moves on to the next free game."""
    from tests.services.conftest import drop_schema, postgres_schema_url

    admin = request.getfixturevalue("postgres_admin")
    schema, url = postgres_schema_url(admin)
    first, second = Store(url), Store(url)
    try:
        first.migrate()
        with first.transaction() as conn:
            st.create_game(conn, a_game(1))
            st.create_game(conn, a_game(2))
        with first.transaction() as holding:
            assert st.claim_next_game(holding, Role.PROVIDER, "a", lease_seconds=60).game_id == 1
            with second.transaction() as other:
                other.execute(sa.text("SET LOCAL lock_timeout = '2s'"))  # fail, never hang
                assert st.claim_game(other, 1, Role.PROVIDER, "b", lease_seconds=60) is None
                taken = st.claim_next_game(other, Role.PROVIDER, "b", lease_seconds=60)
                assert taken is not None and taken.game_id == 2
        with second.transaction() as conn:
            assert st.claim_next_game(conn, Role.PROVIDER, "c", lease_seconds=60) is None
    finally:
        first.dispose()
        second.dispose()
        drop_schema(admin, schema)


def test_claim_next_game_hands_out_each_game_once(store: Store):
    with store.transaction() as conn:
        for game_id in (5, 6):
            st.create_game(conn, a_game(game_id))
        st.create_game(conn, a_game(8, Role.CHALLENGER))
    with store.transaction() as conn:
        got = [st.claim_next_game(conn, Role.PROVIDER, w, lease_seconds=60) for w in "abc"]
    assert [g.game_id if g else None for g in got] == [5, 6, None]
