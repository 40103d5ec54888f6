"""Adapters can be deleted, and jobs' files are removed once they end:
adapters take a change number (`changed`, publication then deletion; filled
here from the publication order), a `deleted` mark and their size in bytes
(for the project's quota); jobs record that their files were removed.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("files_removed", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column(
        "adapters", sa.Column("changed", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False, server_default="0")
    )
    op.add_column("adapters", sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("adapters", sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    op.execute("UPDATE adapters SET changed = sequence")
    op.create_index("ix_adapters_changed", "adapters", ["changed"])
