"""images, datastores, virtual networks, leases

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 18:34:22.556691
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('settings',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('vnets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('template', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_index(op.f('ix_vnets_owner_id'), 'vnets', ['owner_id'], unique=False)
    op.create_table('address_ranges',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('vnet_id', sa.Integer(), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('mac', sa.String(length=17), nullable=False),
    sa.Column('ip', sa.String(length=15), nullable=True),
    sa.Column('ip6', sa.String(length=39), nullable=True),
    sa.Column('ip6_prefix', sa.String(length=39), nullable=True),
    sa.Column('prefix_length', sa.Integer(), nullable=True),
    sa.Column('next_index', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attributes', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.ForeignKeyConstraint(['vnet_id'], ['vnets.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_address_ranges_vnet_id'), 'address_ranges', ['vnet_id'], unique=False)
    op.create_table('datastores',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('host_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_index(op.f('ix_datastores_host_id'), 'datastores', ['host_id'], unique=False)
    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('datastore_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('size_mb', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('persistent', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('saved_from_vm_id', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['datastore_id'], ['datastores.id'], ),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ),
    sa.ForeignKeyConstraint(['saved_from_vm_id'], ['vms.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('owner_id', 'name')
    )
    op.create_index(op.f('ix_images_datastore_id'), 'images', ['datastore_id'], unique=False)
    op.create_index(op.f('ix_images_owner_id'), 'images', ['owner_id'], unique=False)
    op.create_table('leases',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('ar_id', sa.Integer(), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('vm_id', sa.Integer(), nullable=True),
    sa.Column('nic_id', sa.Integer(), nullable=True),
    sa.Column('hold', sa.Boolean(), server_default='false', nullable=False),
    sa.ForeignKeyConstraint(['ar_id'], ['address_ranges.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ar_id', 'idx')
    )
    op.create_index(op.f('ix_leases_vm_id'), 'leases', ['vm_id'], unique=False)
    op.create_table('vm_devices',
    sa.Column('vm_id', sa.Integer(), nullable=False),
    sa.Column('disks', postgresql.JSONB(astext_type=sa.Text()), server_default='[]', nullable=False),
    sa.Column('nics', postgresql.JSONB(astext_type=sa.Text()), server_default='[]', nullable=False),
    sa.Column('context', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('token', sa.String(length=64), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('vm_id')
    )
    op.create_table('image_users',
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('vm_id', sa.Integer(), nullable=False),
    sa.Column('exclusive', sa.Boolean(), server_default='false', nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ),
    sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], ),
    sa.PrimaryKeyConstraint('image_id', 'vm_id')
    )
    op.create_index('image_users_exclusive', 'image_users', ['image_id'], unique=True, postgresql_where=sa.text('exclusive'))
    op.create_index(op.f('ix_image_users_vm_id'), 'image_users', ['vm_id'], unique=False)


def downgrade():
    op.drop_index(op.f('ix_image_users_vm_id'), table_name='image_users')
    op.drop_index('image_users_exclusive', table_name='image_users', postgresql_where=sa.text('exclusive'))
    op.drop_table('image_users')
    op.drop_table('vm_devices')
    op.drop_index(op.f('ix_leases_vm_id'), table_name='leases')
    op.drop_table('leases')
    op.drop_index(op.f('ix_images_owner_id'), table_name='images')
    op.drop_index(op.f('ix_images_datastore_id'), table_name='images')
    op.drop_table('images')
    op.drop_index(op.f('ix_datastores_host_id'), table_name='datastores')
    op.drop_table('datastores')
    op.drop_index(op.f('ix_address_ranges_vnet_id'), table_name='address_ranges')
    op.drop_table('address_ranges')
    op.drop_index(op.f('ix_vnets_owner_id'), table_name='vnets')
    op.drop_table('vnets')
    op.drop_table('settings')
