"""Instances: every running process (service instance, gateway, gate process,
driver worker) as last heard from its heartbeat, for `cirrus status`

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 10:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

JSONB = postgresql.JSONB(astext_type=sa.Text())


def upgrade():
    op.create_table('instances',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('service', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('beat', sa.BigInteger(), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('metrics_url', sa.String(length=255), nullable=True),
    sa.Column('queues', JSONB, server_default='[]', nullable=False),
    sa.Column('queue_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('hosts', JSONB, server_default='[]', nullable=False),
    sa.Column('host_count', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_index(op.f('ix_instances_last_seen'), 'instances', ['last_seen'], unique=False)


def downgrade():
    op.drop_index(op.f('ix_instances_last_seen'), table_name='instances')
    op.drop_table('instances')
