"""OneFlow: service templates, services, roles, nodes, logs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 20:03:47.882240
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('flow_templates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('body', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_flow_templates_owner_id'), 'flow_templates', ['owner_id'], unique=False)
    op.create_table('flow_services',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('template_id', sa.Integer(), nullable=True),
    sa.Column('body', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('custom_attrs', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('networks', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('message', sa.Text(), server_default='', nullable=False),
    sa.Column('deleting', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('seq', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ),
    sa.ForeignKeyConstraint(['template_id'], ['flow_templates.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_flow_services_owner_id'), 'flow_services', ['owner_id'], unique=False)
    op.create_index(op.f('ix_flow_services_state'), 'flow_services', ['state'], unique=False)
    op.create_table('flow_logs',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('severity', sa.String(length=8), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['service_id'], ['flow_services.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_flow_logs_service_id'), 'flow_logs', ['service_id'], unique=False)
    op.create_table('flow_roles',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('body', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('cardinality', sa.Integer(), nullable=False),
    sa.Column('vm_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('released', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('message', sa.Text(), server_default='', nullable=False),
    sa.Column('step_started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cooldown_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('policy_state', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.ForeignKeyConstraint(['service_id'], ['flow_services.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('service_id', 'name')
    )
    op.create_index(op.f('ix_flow_roles_service_id'), 'flow_roles', ['service_id'], unique=False)
    op.create_table('flow_nodes',
    sa.Column('vm_id', sa.Integer(), nullable=False),
    sa.Column('role_id', sa.Integer(), nullable=False),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('ready', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('disposing', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('dispose_seq', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['role_id'], ['flow_roles.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['service_id'], ['flow_services.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('vm_id')
    )
    op.create_index(op.f('ix_flow_nodes_role_id'), 'flow_nodes', ['role_id'], unique=False)
    op.create_index(op.f('ix_flow_nodes_service_id'), 'flow_nodes', ['service_id'], unique=False)


def downgrade():
    op.drop_index(op.f('ix_flow_nodes_service_id'), table_name='flow_nodes')
    op.drop_index(op.f('ix_flow_nodes_role_id'), table_name='flow_nodes')
    op.drop_table('flow_nodes')
    op.drop_index(op.f('ix_flow_roles_service_id'), table_name='flow_roles')
    op.drop_table('flow_roles')
    op.drop_index(op.f('ix_flow_logs_service_id'), table_name='flow_logs')
    op.drop_table('flow_logs')
    op.drop_index(op.f('ix_flow_services_state'), table_name='flow_services')
    op.drop_index(op.f('ix_flow_services_owner_id'), table_name='flow_services')
    op.drop_table('flow_services')
    op.drop_index(op.f('ix_flow_templates_owner_id'), table_name='flow_templates')
    op.drop_table('flow_templates')
