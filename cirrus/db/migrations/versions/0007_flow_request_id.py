"""A service's request id: an instantiate repeated after a crash finds the
service the first one made (unique per owner, like vms.request_id)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 10:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    op.add_column('flow_services', sa.Column('request_id', sa.String(length=64), nullable=True))
    op.create_unique_constraint('flow_services_owner_id_request_id_key', 'flow_services',
                                ['owner_id', 'request_id'])


def downgrade():
    op.drop_constraint('flow_services_owner_id_request_id_key', 'flow_services', type_='unique')
    op.drop_column('flow_services', 'request_id')
