"""A host's revision: bumped by the database whenever anything the
scheduler derives a host's attributes from changes (name, cluster, template,
capacity, reservations, monitoring), so a scheduler keeps hosts' attributes
between passes and re-reads only the hosts that changed. A trigger rather
than the writers: every UPDATE counts, whichever code makes it. It fires
only for UPDATEs that set one of those columns, so the reservations' usage
UPDATEs never run it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25 12:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

WATCHED = "name, cluster_id, template, max_cpu, max_mem, reserved_cpu, reserved_mem, monitoring"


def upgrade():
    op.add_column('hosts', sa.Column('revision', sa.Integer(), nullable=False,
                                     server_default='0'))
    old = ", ".join(f"OLD.{column.strip()}" for column in WATCHED.split(","))
    new = ", ".join(f"NEW.{column.strip()}" for column in WATCHED.split(","))
    op.execute(f"""
        CREATE FUNCTION hosts_bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF ROW({new}) IS DISTINCT FROM ROW({old}) THEN
                NEW.revision := OLD.revision + 1;
            END IF;
            RETURN NEW;
        END $$""")
    op.execute(f"CREATE TRIGGER hosts_revision BEFORE UPDATE OF {WATCHED} ON hosts "
               "FOR EACH ROW EXECUTE FUNCTION hosts_bump_revision()")


def downgrade():
    op.execute("DROP TRIGGER hosts_revision ON hosts")
    op.execute("DROP FUNCTION hosts_bump_revision()")
    op.drop_column('hosts', 'revision')
