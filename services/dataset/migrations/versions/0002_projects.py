"""Datasets belong to a project (tenant); existing ones to "default".

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
    op.add_column("datasets", sa.Column("project", sa.String(63), nullable=False, server_default="default"))
    op.create_index("ix_datasets_project", "datasets", ["project"])
