"""Shared fixtures: a real broker process, two labs with real provider agents, user tokens."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.utils.federation import make_federation
from tests.utils.postgres import fresh_database, postgres_server

_database_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres_server_url():
    """One real PostgreSQL server for the session (tests take a database each)."""
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server_url: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return fresh_database(postgres_server_url, f"test_{next(_database_numbers)}")


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
