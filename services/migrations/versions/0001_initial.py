"""Initial schema: requests, claims, games, moves, chain cursors.

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _bigint_id() -> sa.types.TypeEngine:
    # SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                     nullable=False)


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("request_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("consumer", sa.String(42), nullable=False),
        sa.Column("model_id", sa.String(66), nullable=False),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("max_tokens", sa.Integer, nullable=False),
        sa.Column("fee", sa.String(78), nullable=False),
        sa.Column("callback", sa.String(42), nullable=False),
        sa.Column("callback_gas_limit", sa.Integer, nullable=False),
        sa.Column("named_provider", sa.String(42), nullable=False),
        sa.Column("commit_deadline", sa.BigInteger, nullable=False),
        sa.Column("block_number", sa.BigInteger, nullable=False),
        sa.Column("tx_hash", sa.String(66), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("note", sa.Text, nullable=True),
        _created_at(),
    )
    op.create_index("ix_requests_status", "requests", ["status"])

    op.create_table(
        "claims",
        sa.Column("request_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("provider", sa.String(42), nullable=False),
        sa.Column("output", sa.JSON, nullable=False),
        sa.Column("challenge_deadline", sa.BigInteger, nullable=False),
        sa.Column("block_number", sa.BigInteger, nullable=False),
        sa.Column("tx_hash", sa.String(66), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        _created_at(),
    )
    op.create_index("ix_claims_status", "claims", ["status"])

    op.create_table(
        "games",
        sa.Column("game_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("player", sa.String(16), primary_key=True),
        sa.Column("request_id", sa.BigInteger, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("k", sa.Integer, nullable=True),
        sa.Column("rounds", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires", sa.Float, nullable=True),
        _created_at(),
    )
    op.create_index("ix_games_request", "games", ["request_id"])
    op.create_index("ix_games_status", "games", ["status"])

    op.create_table(
        "moves",
        sa.Column("id", _bigint_id(), primary_key=True, autoincrement=True),
        sa.Column("game_id", sa.BigInteger, nullable=False),
        sa.Column("player", sa.String(16), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("actor", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("tx_hash", sa.String(66), nullable=True),
        sa.Column("block_number", sa.BigInteger, nullable=True),
        _created_at(),
        sa.UniqueConstraint("game_id", "player", "seq", name="uq_moves_game_player_seq"),
    )

    op.create_table(
        "chain_cursors",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("block_number", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
    )


def downgrade() -> None:
    for table in ("chain_cursors", "moves", "games", "claims", "requests"):
        op.drop_table(table)
