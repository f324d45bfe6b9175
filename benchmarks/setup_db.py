"""A benchmark's PostgreSQL database made ready through the broker's own API."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.utils.procs import parallex, start_broker


@contextlib.contextmanager
def setting_up(tmp: Path, url: str, admin: str, labs: tuple[str, ...]) -> Iterator[httpx.Client]:
    """The database at ``url`` upgraded, ``labs`` made, and an administrator's client of a
    broker on it for the rest of the set-up; the broker stops afterwards, so the benchmark's
    own brokers start on a quiet database. Requests as someone else pass their own
    Authorization header."""
    subprocess.run(parallex("db", "upgrade", "--db-url", url), check=True, capture_output=True)
    setup, setup_url = start_broker(tmp, admin, db_url=url, name="setup")
    try:
        with httpx.Client(base_url=f"{setup_url}/api/v1", timeout=60,
                          headers={"Authorization": f"Bearer {admin}"}) as client:
            for lab in labs:
                client.post("/labs", json={"name": lab}).raise_for_status()
            yield client
    finally:
        setup.stop()
