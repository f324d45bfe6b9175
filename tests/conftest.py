"""Shared fixtures: a real broker process, two labs with real provider agents, user tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.utils.federation import make_federation


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
