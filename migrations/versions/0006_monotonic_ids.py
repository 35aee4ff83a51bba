"""ids are never reused on SQLite: AUTOINCREMENT on every table with an integer id

Without it SQLite hands out the largest id + 1, so deleting the newest viewer (a /forget, a
link) gave their id to the next new viewer, and anything still addressed to the old id (a
reply being generated, a memory about to be stored) landed with the new one. PostgreSQL's
sequences never go back; nothing changes there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("users", "identities", "relationship_states", "state_events", "messages",
          "memories")


def _with_autoincrement(create: str, table: str, new_name: str) -> str:
    """The table's own CREATE statement with its id as ``INTEGER PRIMARY KEY AUTOINCREMENT``
    (SQLite takes AUTOINCREMENT only on the column) under ``new_name``."""
    sql, found = re.subn(r"\bid INTEGER NOT NULL", "id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT",
                         create, count=1)
    sql, dropped = re.subn(r",\s*CONSTRAINT \w+ PRIMARY KEY \(id\)", "", sql, count=1)
    if not (found and dropped):
        raise RuntimeError(f"unexpected schema for {table}: {create!r}")
    return re.sub(rf"^CREATE TABLE \"?{table}\"?", f"CREATE TABLE {new_name}", sql, count=1)


def _rebuild(connection: sa.Connection, table: str) -> None:
    """SQLite's own recipe (foreign keys are off while migrations run): a new table, the rows
    with their ids, the old one dropped, the new one renamed, its indexes and triggers made
    again from their own SQL."""
    create = connection.execute(sa.text(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :name"),
        {"name": table}).scalar_one()
    if "AUTOINCREMENT" in create:
        return
    attached = [row[0] for row in connection.execute(sa.text(
        "SELECT sql FROM sqlite_master WHERE tbl_name = :name AND type IN ('index', 'trigger')"
        " AND sql IS NOT NULL"), {"name": table})]
    new_name = f"_{table}_monotonic"
    op.execute(_with_autoincrement(create, table, new_name))
    op.execute(f"INSERT INTO {new_name} SELECT * FROM {table}")
    op.execute(f"DROP TABLE {table}")
    op.execute(f"ALTER TABLE {new_name} RENAME TO {table}")
    for statement in attached:
        op.execute(statement)


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name != "sqlite":
        return
    for table in TABLES:
        _rebuild(connection, table)


def downgrade() -> None:
    # Ids that are never reused harm nothing an earlier version does: left as they are.
    return None
