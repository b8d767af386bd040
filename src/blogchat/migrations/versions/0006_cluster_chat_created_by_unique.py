"""chats: one chat per visitor and creating clientMessageId, even from two instances at once

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 09:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("uq_chats_owner_created_by", "chats", ["owner_id", "created_by"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_chats_owner_created_by", table_name="chats")
