"""The watchtower's bookkeeping: why it judged a claim so, when it last queued the claim's
verification, and its challenges (one row per claim and challenger, written before the
challenge is sent).

Revision ID: 0003
Revises: 0002
Create Date: 2026-05-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("claims") as batch:
        batch.add_column(sa.Column("verdict_note", sa.Text, nullable=True))
        batch.add_column(sa.Column("verify_queued_at", sa.Float, nullable=True))

    op.create_table(
        "challenges",
        sa.Column("request_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("challenger", sa.String(42), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tx_hash", sa.String(66), nullable=True),
        sa.Column("game_id", sa.BigInteger, nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires", sa.Float, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
    )
    op.create_index("ix_challenges_status", "challenges", ["status"])


def downgrade() -> None:
    op.drop_index("ix_challenges_status", "challenges")
    op.drop_table("challenges")
    with op.batch_alter_table("claims") as batch:
        batch.drop_column("verify_queued_at")
        batch.drop_column("verdict_note")
