"""Jobs release their dataset's pin once they end: dataset_released says the
dataset service has been told.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("dataset_released", sa.Boolean(), nullable=False, server_default=sa.false()))
