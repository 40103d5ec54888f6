"""Jobs and adapters belong to a project (tenant); existing ones to "default".

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "adapters"):
        op.add_column(table, sa.Column("project", sa.String(63), nullable=False, server_default="default"))
        op.create_index(f"ix_{table}_project", table, ["project"])
