"""Jobs release their dataset's pin once they end (dataset_released: the
dataset service has been told), and take event sequence numbers from a
counter on the job (last_event_sequence), filled here from the events
already written.

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
    op.add_column("jobs", sa.Column("last_event_sequence", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE jobs SET last_event_sequence = (SELECT COALESCE(MAX(sequence), 0) FROM job_events WHERE job_events.job_id = jobs.id)"
    )
