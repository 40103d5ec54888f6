"""Alembic's entry point for this service's schema (see services/common/db.py)."""

from tunewire.services.common.db import run_migrations

run_migrations()
