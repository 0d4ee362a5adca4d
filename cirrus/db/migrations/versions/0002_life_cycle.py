"""life cycle: migration, resume, monitoring, host HA

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 17:31:25.799745
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    op.add_column('hosts', sa.Column('ha', sa.String(length=16), server_default='none', nullable=False))
    op.add_column('vms', sa.Column('target_host_id', sa.Integer(), nullable=True))
    op.add_column('vms', sa.Column('resume_from', sa.String(length=16), nullable=True))
    op.add_column('vms', sa.Column('resched', sa.Boolean(), server_default='false', nullable=False))
    op.add_column('vms', sa.Column('runtime', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False))
    op.add_column('vms', sa.Column('monitoring', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False))
    op.add_column('vms', sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), server_default='[]', nullable=False))
    op.add_column('vms', sa.Column('monitored_at', sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key('vms_target_host_id_fkey', 'vms', 'hosts', ['target_host_id'], ['id'])


def downgrade():
    op.drop_constraint('vms_target_host_id_fkey', 'vms', type_='foreignkey')
    op.drop_column('vms', 'monitored_at')
    op.drop_column('vms', 'metrics')
    op.drop_column('vms', 'monitoring')
    op.drop_column('vms', 'runtime')
    op.drop_column('vms', 'resched')
    op.drop_column('vms', 'resume_from')
    op.drop_column('vms', 'target_host_id')
    op.drop_column('hosts', 'ha')
