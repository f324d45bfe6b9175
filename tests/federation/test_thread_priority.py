"""A broker replica's threads other than its event loop run niced behind it (issue 14: on a
saturated machine a heartbeat that needs only the loop waited behind the request pool)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.utils.procs import start_broker, wait_until

ADMIN = "thread-priority-admin-token-0123"

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"),
                                reason="per-thread niceness is Linux's")


def niceness_by_thread(pid: int) -> dict[int, int]:
    """Each thread's niceness (field 19 of its stat line, after the parenthesised name)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


@pytest.mark.parametrize("niceness", [5, 0])
def test_the_broker_threads_but_its_event_loop_run_niced(tmp_path, niceness):
    proc, url = start_broker(tmp_path, ADMIN, extra=("--thread-niceness", str(niceness)))
    try:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        # Sync routes run on the request pool, started on demand.
        for _ in range(3):
            assert httpx.get(f"{url}/api/v1/labs", headers=admin,
                             timeout=30).status_code == 200

        def settled() -> dict[int, int] | None:
            seen = niceness_by_thread(proc.pid)
            others = {tid: nice for tid, nice in seen.items() if tid != proc.pid}
            # The loop (the main thread), the batches' threads and the request pool's.
            if len(others) >= 4 and set(others.values()) == {niceness}:
                return seen
            return None

        seen = wait_until(settled, 30, f"the broker's threads at niceness {niceness}")
        assert seen[proc.pid] == 0  # the event loop
    finally:
        proc.stop()
