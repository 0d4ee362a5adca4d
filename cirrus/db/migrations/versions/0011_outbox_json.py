"""The outbox keeps its messages as JSON text (json) instead of jsonb. A
row lives from its transaction's commit until the relay has published it,
and is only ever read back whole, as text: jsonb cost PostgreSQL a parse
into its binary form on the way in and a rendering back to text on the way
out, for nothing. A batch of 500 placements writes a few hundred rows, one of
them its 500 state changes.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25 14:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade():
    for column in ("payload", "headers"):
        op.alter_column("outbox", column, type_=sa.JSON(), postgresql_using=f"{column}::json")


def downgrade():
    for column in ("payload", "headers"):
        op.alter_column("outbox", column, type_=postgresql.JSONB(),
                        postgresql_using=f"{column}::jsonb")
