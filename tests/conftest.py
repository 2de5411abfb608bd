import os

import pytest
from hypothesis import settings

from peers import dcmtk_tool
from pg_peer import BACKENDS, database_url

# Property and fuzz tests (tests/test_fuzz.py) run a fixed, reproducible budget in CI; `HYPOTHESIS_PROFILE=fuzz`
# searches longer and at random on a workstation. No deadline: two cores shared by several jobs make timing noise.
settings.register_profile("ci", max_examples=400, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("fuzz", max_examples=20000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if dcmtk_tool("findscu"):
        return
    skip = pytest.mark.skip(reason="DCMTK (findscu) is not installed: run scripts/test, which installs it")
    for item in items:
        if "dcmtk" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster per test session (tests/pg_peer.py); each test makes its own database."""
    from pg_peer import PostgresCluster, pg_bin

    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed: run scripts/test, which installs Debian's postgresql")
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=BACKENDS)
def store_on_each_backend(request, tmp_path):
    """An empty store, migrated, once on SQLite and once on PostgreSQL: a module that runs on both takes it as its
    `store`."""
    from engine.store.db import Store

    store = Store(database_url(request, request.param, tmp_path))
    store.migrate()
    yield store
    store.dispose()


@pytest.fixture
def store(tmp_path):
    """An empty journal and domain store on SQLite, migrated (a test file may define its own, with data)."""
    from engine.store.db import Store

    store = Store(f"sqlite:///{tmp_path / 'swf.db'}")
    store.migrate()
    yield store
    store.dispose()
