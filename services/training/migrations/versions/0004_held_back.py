"""Adapters held back: published, but not hot-loaded, because no checkpoint
of their job stayed within its forgetting budget.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("adapters", sa.Column("held_back", sa.Boolean(), nullable=False, server_default=sa.false()))
