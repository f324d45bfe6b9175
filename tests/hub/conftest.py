"""One JupyterHub (two institutions' providers, the broker as its service) for the hub tests."""

from __future__ import annotations

import pytest

from tests.utils.hub import start_hub


@pytest.fixture(scope="package")
def hub(tmp_path_factory):
    running = start_hub(tmp_path_factory.mktemp("hub"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(autouse=True)
def honest_relays(hub):
    """Every test starts with relays that pass the providers' answers through unchanged."""
    for inst in hub.institutions.values():
        inst.relay.mode = None
    yield
    for inst in hub.institutions.values():
        inst.relay.mode = None
