"""message: patient and accession indexes only for the rows that have them

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 08:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# Relays, ACKs and rejected messages carry no patient or accession; leaving them out of these two indexes saves
# two index pages in each journal commit. Lookups are by equality, which implies IS NOT NULL: both databases
# still use the index for them.
PARTIAL = {"patient_id": "patient_id IS NOT NULL", "accession": "accession IS NOT NULL"}


def upgrade() -> None:
    for column, condition in PARTIAL.items():
        op.drop_index(f"ix_message_{column}", table_name="message")
        op.create_index(f"ix_message_{column}", "message", [column], unique=False,
                        sqlite_where=sa.text(condition), postgresql_where=sa.text(condition))


def downgrade() -> None:
    for column in PARTIAL:
        op.drop_index(f"ix_message_{column}", table_name="message")
        op.create_index(f"ix_message_{column}", "message", [column], unique=False)
