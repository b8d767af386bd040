"""chats: one chat per visitor and creating clientMessageId, even from two instances at
once; and the fencing token of the instance that last wrote the chat

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lease_fence", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.create_index("uq_chats_owner_created_by", ["owner_id", "created_by"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.drop_index("uq_chats_owner_created_by")
        batch_op.drop_column("lease_fence")
