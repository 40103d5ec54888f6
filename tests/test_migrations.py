"""Schema migrations: the Alembic chain builds exactly the schema the stores
use, and a database of the first release is upgraded with its rows kept."""

import datetime as dt

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tunewire.services.common.db import make_engine, migrate
from tunewire.services.dataset import store as dataset_store
from tunewire.services.training import store as training_store

from conftest import DATABASES

SERVICES = {
    "dataset": (dataset_store.DatasetStore, dataset_store.Base, "datasets"),
    "training": (training_store.JobStore, training_store.Base, "jobs"),
}


@pytest.mark.parametrize("database", DATABASES)
@pytest.mark.parametrize("service", SERVICES)
def test_migrations_build_the_schema_the_store_uses(request, tmp_path, service, database):
    store_class, base, _ = SERVICES[service]
    if database == "postgresql":
        url = request.getfixturevalue("postgres").create_database(f"schema_{service}")
    else:
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = store_class(url)
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": f"tunewire_{service}_schema"})
        assert compare_metadata(context, base.metadata) == []
    store.close()


def test_a_first_release_database_is_upgraded_with_its_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'training.db'}"
    engine = make_engine(url)
    # The first release made its tables without a version table.
    migrate(engine, "training", first_table="jobs", target="0001")
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE tunewire_training_schema"))
        connection.execute(
            sa.text(
                "INSERT INTO jobs (id, state, spec, config, dataset, error, adapter_id, latest_step, evaluation, created_at) "
                "VALUES ('job-old', 'SUCCEEDED', '{}', '{}', '{}', '', 'ad-old', '{}', '{}', :now)"
            ),
            {"now": now},
        )
        connection.execute(
            sa.text("INSERT INTO adapters (id, job_id, base_model, uri, created_at) VALUES ('ad-old', 'job-old', 'm', 'u', :now)"),
            {"now": now},
        )
    engine.dispose()
    store = training_store.JobStore(url)
    assert store.get("job-old").project == "default"
    assert [(a.id, a.project) for a in store.adapters_after(0)] == [("ad-old", "default")]
    job, created = store.create("job-new", {}, {}, {}, project="alpha")
    assert created and store.list(project="alpha") == [job] and [j.id for j in store.list(project="default")] == ["job-old"]
    store.close()
