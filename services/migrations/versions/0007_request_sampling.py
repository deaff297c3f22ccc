"""Sampled requests: each request row keeps the draw the chain fixed at posting (temperature
and top-p in thousandths, the derived seed; all zero for a greedy request), which the provider
decodes with and the watchtower verifies with (issue 22).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        # Every request posted before this revision was greedy: zero is its draw.
        batch.add_column(sa.Column("temperature", sa.Integer, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("top_p", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("seed", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("seed")
        batch.drop_column("top_p")
        batch.drop_column("temperature")
