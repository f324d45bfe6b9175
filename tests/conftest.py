"""Shared fixtures: a real broker process, two labs with real provider agents, user tokens."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.utils.federation import make_federation
from tests.utils.postgres import fresh_database, postgres_server

_database_numbers = itertools.count()

#: Test files that take a minute or more in all (measured with --durations), longest first.
#: ./dev test hands whole files to two processes in collection order, so these start first
#: and the run does not end with one process alone in a long file.
LONGEST_FILES_FIRST = (
    "tests/federation/test_fuzz_api.py",
    "tests/kernel/test_kernel.py",
    "tests/federation/test_up_and_admin.py",
    "tests/networks/",
    "tests/federation/test_environments.py",
    "tests/federation/test_failures.py",
    "tests/federation/test_dask_workloads.py",
    "tests/hub/",
    "tests/federation/test_owner.py",
    "tests/federation/test_replicas.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the longest files to the front, keeping every other order as collected."""
    def rank(item: pytest.Item) -> int:
        return next((n for n, start in enumerate(LONGEST_FILES_FIRST)
                     if item.nodeid.startswith(start)), len(LONGEST_FILES_FIRST))

    items.sort(key=rank)


#: Folders whose tests share one package-scoped fixture (the hub tests' JupyterHub): their
#: files go to one test process, so the fixture starts once.
ONE_PROCESS_FOLDERS = ("tests/hub/",)


@pytest.hookimpl(optionalhook=True)  # pytest -p no:xdist still runs
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """With --dist loadfile, hand out ONE_PROCESS_FOLDERS whole and other tests by file."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileOrFolderScheduling(LoadFileScheduling):
        # _split_scope is xdist's own (private) hook for the unit of work: should a release
        # rename it, the hub folder is split by file again, which only starts a second hub.
        def _split_scope(self, nodeid: str) -> str:
            folder = next((f for f in ONE_PROCESS_FOLDERS if nodeid.startswith(f)), None)
            return folder or super()._split_scope(nodeid)

    return FileOrFolderScheduling(config, log)


@pytest.fixture(scope="session")
def postgres_server_url():
    """One real PostgreSQL server for the session (tests take a database each)."""
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server_url: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return fresh_database(postgres_server_url, f"test_{next(_database_numbers)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:
    """The URL of a fresh broker database, SQLite or PostgreSQL, for a broker app in the
    test's own process (``tests.utils.in_process``)."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request, tmp_path: Path):
    """A broker with no labs yet, on SQLite or on PostgreSQL (where locks are also row or
    advisory locks other broker processes respect, and the agents' batches run each
    statement as a transaction of its own)."""
    db_url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    fed = make_federation(tmp_path, db_url=db_url)
    try:
        yield fed
    finally:
        fed.stop()


@pytest.fixture
def federation(tmp_path: Path):
    """A broker with no labs yet (tests add what they need)."""
    fed = make_federation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop()


@pytest.fixture
def two_labs(tmp_path: Path):
    """Broker + lab-a and lab-b, one agent each offering 2 CPUs and 4 GiB; users alice (a) and
    bob (b). With the default worker size (1 CPU, 2 GiB) each lab fits two workers.

    Short heartbeat timeouts so failure tests end within seconds.
    """
    fed = make_federation(tmp_path, provider_timeout=3, cluster_timeout=6)
    try:
        yield fed.with_two_labs()
    finally:
        fed.stop()
