"""SQLAlchemy engine set-up and schema migrations shared by the services'
stores. SQLite by default, PostgreSQL with a URL: the stores use nothing
dialect-specific but `exclusive`'s advisory lock.

Each service's schema is a chain of Alembic revisions in
services/<service>/migrations/versions, applied at start-up (`migrate`).
Each service keeps its own version table, so the services may share one
PostgreSQL database.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text

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


# Striped: any number of keys, a fixed number of locks.
_LOCAL_LOCKS = [threading.Lock() for _ in range(64)]


@contextlib.contextmanager
def exclusive(engine: Engine, key: str) -> Iterator[None]:
    """Runs the block while no other holder of `key` runs one: in this
    process (threads), and on PostgreSQL in every process sharing the
    database (a transaction-scoped advisory lock, released however the block
    ends). SQLite is one process's database, so the first suffices there."""
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)
    with _LOCAL_LOCKS[digest % len(_LOCAL_LOCKS)]:
        if engine.dialect.name != "postgresql":
            yield
            return
        with engine.connect() as connection, connection.begin():
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": digest})
            yield


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
