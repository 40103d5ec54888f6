"""SQLAlchemy engine set-up and schema migrations shared by the services'
stores. SQLite by default, PostgreSQL with a URL: the stores use nothing
dialect-specific.

Each service's schema is a chain of Alembic revisions in
services/<service>/migrations/versions, applied at start-up (`migrate`).
Each service keeps its own version table, so the services may share one
PostgreSQL database.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect

SERVICES_DIR = Path(__file__).resolve().parents[1]


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            # WAL lets readers (event streams) run beside the writer.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine, service: str, first_table: str, target: str = "head") -> None:
    """Brings the service's tables to the `target` revision (the newest by
    default). A database made before migrations existed (its `first_table`
    there, no version table) is taken to be at the first release's schema, 0001."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SERVICES_DIR / service / "migrations"))
    version_table = f"tunewire_{service}_schema"
    with engine.begin() as connection:
        config.attributes.update(connection=connection, version_table=version_table)
        tables = set(inspect(connection).get_table_names())
        if first_table in tables and version_table not in tables:
            command.stamp(config, "0001")
        command.upgrade(config, target)


def run_migrations() -> None:
    """The body of each service's migrations/env.py: runs on the connection
    `migrate` passes in."""
    from alembic import context

    attributes = context.config.attributes
    context.configure(connection=attributes["connection"], version_table=attributes["version_table"])
    with context.begin_transaction():
        context.run_migrations()
