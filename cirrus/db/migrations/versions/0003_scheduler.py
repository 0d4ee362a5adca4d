"""scheduler: clusters, host templates, VM groups

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 18:06:54.138432
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('clusters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('template', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('vm_groups',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('roles', postgresql.JSONB(astext_type=sa.Text()), server_default='[]', nullable=False),
    sa.Column('rules', postgresql.JSONB(astext_type=sa.Text()), server_default='[]', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('owner_id', 'name')
    )
    op.create_index(op.f('ix_vm_groups_owner_id'), 'vm_groups', ['owner_id'], unique=False)
    op.add_column('hosts', sa.Column('cluster_id', sa.Integer(), nullable=True))
    op.add_column('hosts', sa.Column('template', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False))
    op.add_column('hosts', sa.Column('reserved_cpu', sa.Integer(), server_default='0', nullable=False))
    op.add_column('hosts', sa.Column('reserved_mem', sa.Integer(), server_default='0', nullable=False))
    op.create_index(op.f('ix_hosts_cluster_id'), 'hosts', ['cluster_id'], unique=False)
    op.create_foreign_key('hosts_cluster_id_fkey', 'hosts', 'clusters', ['cluster_id'], ['id'])
    op.add_column('vms', sa.Column('vmgroup_id', sa.Integer(), nullable=True))
    op.add_column('vms', sa.Column('vmgroup_role', sa.String(length=128), nullable=True))
    op.create_index(op.f('ix_vms_vmgroup_id'), 'vms', ['vmgroup_id'], unique=False)
    op.create_foreign_key('vms_vmgroup_id_fkey', 'vms', 'vm_groups', ['vmgroup_id'], ['id'])


def downgrade():
    op.drop_constraint('vms_vmgroup_id_fkey', 'vms', type_='foreignkey')
    op.drop_index(op.f('ix_vms_vmgroup_id'), table_name='vms')
    op.drop_column('vms', 'vmgroup_role')
    op.drop_column('vms', 'vmgroup_id')
    op.drop_constraint('hosts_cluster_id_fkey', 'hosts', type_='foreignkey')
    op.drop_index(op.f('ix_hosts_cluster_id'), table_name='hosts')
    op.drop_column('hosts', 'reserved_mem')
    op.drop_column('hosts', 'reserved_cpu')
    op.drop_column('hosts', 'template')
    op.drop_column('hosts', 'cluster_id')
    op.drop_index(op.f('ix_vm_groups_owner_id'), table_name='vm_groups')
    op.drop_table('vm_groups')
    op.drop_table('clusters')
