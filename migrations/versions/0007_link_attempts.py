"""link-code attempts in the database: the guessing limits hold across processes

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "link_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("viewer", sa.String(length=200), nullable=False),
        sa.Column("wrong", sa.Boolean(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_link_attempts")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_link_attempts_viewer_at", "link_attempts", ["viewer", "at"])
    op.create_index("ix_link_attempts_at", "link_attempts", ["at"])


def downgrade() -> None:
    op.drop_index("ix_link_attempts_at", table_name="link_attempts")
    op.drop_index("ix_link_attempts_viewer_at", table_name="link_attempts")
    op.drop_table("link_attempts")
