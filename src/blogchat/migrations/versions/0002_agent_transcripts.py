"""agent transcripts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_transcripts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project_key", sa.String(length=255), nullable=False),
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("subpath", sa.String(length=255), nullable=False),
        sa.Column("uuid", sa.String(length=64), nullable=True),
        sa.Column("entry", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_transcripts")),
        sa.UniqueConstraint(
            "project_key", "session_id", "subpath", "uuid", name="uq_agent_transcripts_uuid"
        ),
    )
    with op.batch_alter_table("agent_transcripts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_agent_transcripts_key",
            ["project_key", "session_id", "subpath", "id"],
            unique=False,
        )
        batch_op.create_index("ix_agent_transcripts_session_id", ["session_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("agent_transcripts", schema=None) as batch_op:
        batch_op.drop_index("ix_agent_transcripts_session_id")
        batch_op.drop_index("ix_agent_transcripts_key")

    op.drop_table("agent_transcripts")
