"""a notice when a viewer's question leaves ``received`` (PostgreSQL): the processes waiting
to answer that viewer's next question are woken instead of polling

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# memory.store.wakeups.CHANNEL (a migration never imports the code it migrates for).
CHANNEL = "vtuber_viewer_final"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has one process: nothing to notify
    op.execute(f"""
        CREATE FUNCTION notify_viewer_final() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', NEW.user_id::text);
            RETURN NULL;
        END $$ LANGUAGE plpgsql""")
    op.execute("""
        CREATE TRIGGER messages_viewer_final AFTER UPDATE OF status ON messages
        FOR EACH ROW WHEN (OLD.status = 'received' AND NEW.status <> 'received'
                           AND NEW.role = 'user')
        EXECUTE FUNCTION notify_viewer_final()""")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER messages_viewer_final ON messages")
    op.execute("DROP FUNCTION notify_viewer_final()")
