"""`optinfer db upgrade`, run as an operator runs it before the nodes start: on an empty SQLite
file and on a fresh Postgres schema, again on the upgraded database, and against a database
that is not there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from optinfer.services.store import Store

OPTINFER = str(Path(sys.executable).parent / "optinfer")


def db_upgrade(database_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([OPTINFER, "db", "upgrade", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OPTINFER_DATABASE_URL": database_url})


def test_db_upgrade_creates_the_schema_once(database_url: str):
    first = db_upgrade(database_url, "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["from_revision"] is None and report["revision"] == Store.head_revision()
    store = Store(database_url)
    try:
        store.require_current()
        with store.engine.connect() as conn:
            assert {"requests", "claims", "games", "moves", "challenges"} <= set(
                sa.inspect(conn).get_table_names())
    finally:
        store.dispose()
    again = db_upgrade(database_url)
    assert again.returncode == 0, again.stderr
    assert f"at schema revision {Store.head_revision()}" in again.stdout
    assert "was" not in again.stdout  # nothing to do the second time


def test_db_upgrade_of_an_unreachable_database_is_one_line_and_exit_2():
    proc = db_upgrade("postgresql+psycopg://nobody:secret@127.0.0.1:9/none?connect_timeout=2")
    assert proc.returncode == 2
    assert "is unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert "secret" not in proc.stderr
