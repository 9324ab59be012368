"""outbox NOTIFY names its writer and how many rows it inserted

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 02:00:00

Every consumer process runs a relay. With an empty payload, every commit woke every relay, and
all but one claimed nothing: with seven consumer processes, six wasted claim transactions per
window. The payload `<application_name> <rows>` lets a relay leave a small insert to the relay
of the process that wrote it (see publishers/relay.py, `wakes`).
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS outbox_notify ON outbox")
    op.execute(
        """
        CREATE OR REPLACE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify(
                'outbox',
                current_setting('application_name') || ' ' || (SELECT count(*) FROM inserted)::text
            );
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER outbox_notify AFTER INSERT ON outbox REFERENCING NEW TABLE AS inserted "
        "FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS outbox_notify ON outbox")
    op.execute(
        """
        CREATE OR REPLACE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('outbox', '');
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER outbox_notify AFTER INSERT ON outbox "
        "FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox()"
    )
