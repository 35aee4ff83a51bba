"""message lifecycle: a reason for every final status, idempotent intake

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INTAKE_WHERE = "role = 'user' AND platform_message_id IS NOT NULL"
RECEIVED_WHERE = "status = 'received'"


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("status_reason", sa.String(length=40), nullable=True))
    # Earlier versions stored a redelivered platform message twice; keep the first copy's id
    # so the unique intake key can be created.
    op.execute(
        "UPDATE messages SET platform_message_id = NULL "
        f"WHERE {INTAKE_WHERE} AND id NOT IN (SELECT MIN(id) FROM messages "
        f"WHERE {INTAKE_WHERE} GROUP BY platform, channel_id, platform_message_id)"
    )
    op.create_index(
        "uq_messages_intake", "messages", ["platform", "channel_id", "platform_message_id"],
        unique=True, sqlite_where=sa.text(INTAKE_WHERE), postgresql_where=sa.text(INTAKE_WHERE),
    )
    # Crash recovery looks for rows still "received"; there are few, so a partial index.
    op.create_index(
        "ix_messages_received", "messages", ["id"],
        sqlite_where=sa.text(RECEIVED_WHERE), postgresql_where=sa.text(RECEIVED_WHERE),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_received", table_name="messages")
    op.drop_index("uq_messages_intake", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("status_reason")
