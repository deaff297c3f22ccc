"""``optinfer db upgrade``: the node database's schema, migrated once before the nodes start.

Registered on the app of ``services/cli.py`` when that module imports this one. The commands
that own a database (``provider run``, ``challenger run``, ``api``, the demo) also upgrade it
when they start, under a lock on Postgres; a process that only uses it (a Celery worker's
child) checks the revision and refuses a stale schema (``Store.require_current``).
"""

from __future__ import annotations

import typer

from optinfer.services.cli_app import AsJson, ConfigFile, app, emit, out
from optinfer.services.settings import load_settings

db_app = typer.Typer(no_args_is_help=True, help="The node database's schema.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(config: ConfigFile = None, as_json: AsJson = False) -> None:
    """Create or migrate the database of the settings (database_url, else SQLite in state_dir)
    to this optinfer's schema; a database already there is left as it is."""
    from optinfer.services.store import Store

    settings = load_settings(config=config)
    store = Store(settings.database)
    try:
        before = store.current_revision()
        store.migrate()
    finally:
        store.dispose()
    result = {"database": store.url.render_as_string(), "from_revision": before,
              "revision": Store.head_revision()}
    emit(result, as_json, lambda r: out.print(
        f"database {r['database']} at schema revision {r['revision']}"
        + ("" if r["from_revision"] == r["revision"]
           else f" (was {r['from_revision'] or 'empty'})"), highlight=False))
