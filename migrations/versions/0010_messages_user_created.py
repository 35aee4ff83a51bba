"""messages by viewer and time: the shared per-viewer rate limit counts the last minute's
messages without reading the viewer's whole history

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_messages_user_created", "messages", ["user_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_messages_user_created", table_name="messages")
