"""imaging_order: the visit's admission id (PV1-19), the worklist's Admission ID

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 15:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # orders scheduled before this revision had no admission id: empty, as for a HIS that sends none
    with op.batch_alter_table("imaging_order") as batch:
        batch.add_column(sa.Column("admission_id", sa.String(length=64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("imaging_order") as batch:
        batch.drop_column("admission_id")
