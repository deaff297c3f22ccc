"""Alembic environment: migrations run on the connection `Store.migrate` hands over.

There is no alembic.ini: ``Store.migrate()`` (and ``store._alembic_config`` for the alembic
command line in development) builds the configuration in code, so the migrations run the same
from a checkout and from an installed package.
"""

from __future__ import annotations

from alembic import context

from optinfer.services.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through optinfer.services.store.Store.migrate()")

context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
