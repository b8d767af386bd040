"""messages: the client address and the context size, for budgets and usage reports

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("context_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("client_address", sa.String(length=64), nullable=True))
        batch_op.create_index(
            "ix_messages_address_created", ["client_address", "created_at"], unique=False
        )
        batch_op.create_index("ix_messages_role_created", ["role", "created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_role_created")
        batch_op.drop_index("ix_messages_address_created")
        batch_op.drop_column("client_address")
        batch_op.drop_column("context_tokens")
