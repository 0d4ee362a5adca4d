"""A VM's last request id: the request of the last action on it, so batched
work (a scheduler pass, deploy_many, driver results applied together) logs
and messages each VM under its own request (cirrus/tracing.py)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 12:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    op.add_column('vms', sa.Column('last_request_id', sa.String(length=64), nullable=True))


def downgrade():
    op.drop_column('vms', 'last_request_id')
