"""The Parallex kernel, started through jupyter_client against a local federation: plain dask
code runs on pool workers, %parallex reports, %%remote round-trips variables and streams
output, and without a usable broker the kernel says why and keeps working locally."""

from __future__ import annotations

import pytest

from federation import FederatedCluster
from tests.utils.federation import make_federation
from tests.utils.kernels import parallex_kernel, run
from tests.utils.procs import wait_until


@pytest.fixture
def lab_with_agent(tmp_path):
    """lab-a (alice) with one 2-CPU agent; workers of the default size (1 CPU, 2 GiB)."""
    fed = make_federation(tmp_path, provider_timeout=5, cluster_timeout=10)
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB")
        yield fed
    finally:
        fed.stop()


def test_dask_on_the_pool_status_and_remote_cells(lab_with_agent, tmp_path):
    fed = lab_with_agent
    env = {"PARALLEX_BROKER_URL": fed.url, "PARALLEX_TOKEN": fed.user_tokens["alice"]}
    with parallex_kernel(tmp_path / "k", env) as (_km, kc):
        assert run(kc, "1 + 1").status == "ok"  # answers while the pool is still starting

        out = run(kc, "import dask.array as da\n"
                      "total = int(da.arange(100_000, chunks=10_000).sum().compute())\n"
                      "print(total)\n"
                      "print(sorted(parallex_pool.cluster.workers_by_lab().items()))")
        assert out.status == "ok", out.error
        assert "4999950000" in out.stdout
        assert "('lab-a', " in out.stdout  # computed on a pool worker of lab-a

        status = run(kc, "%parallex")
        assert "alice (lab-a)" in status.stdout and "adaptive 0–8" in status.stdout
        assert "lab balance" in status.stdout, status.stdout + status.stderr
        assert "round trip to workers: median " in status.stdout, status.stdout
        # A third worker does not fit the lab's one 2-CPU machine: %parallex says why it waits.
        run(kc, "%parallex scale 3\nparallex_pool.cluster.wait_for_workers(2, timeout=60)")
        waiting = run(kc, "%parallex")
        assert "1 pending: waiting for 1 CPU and 2.00 GiB to come free: the one online " \
               "provider is busy" in waiting.stdout, waiting.stdout
        run(kc, "%parallex adapt 0 8")

        # %%remote: reads go there, assignments come back, output streams while it runs.
        run(kc, "a = 21")
        remote = run(kc, "%%remote\n"
                         "import os, time\n"
                         "b = a * 2\n"
                         "remote_pid = os.getpid()\n"
                         "for i in range(3):\n"
                         "    print('tick', i, flush=True)\n"
                         "    time.sleep(0.4)\n")
        assert remote.status == "ok", remote.error + remote.stderr
        assert [c for c in remote.chunks if "tick" in c] and "tick 2" in remote.stdout
        assert len([c for c in remote.chunks if "tick" in c]) >= 2  # streamed, not at the end
        back = run(kc, "print(b, remote_pid != os.getpid() if 'os' in dir() else remote_pid)")
        assert back.stdout.split()[0] == "42"
        # The remote namespace persists: a name deleted here is still there.
        run(kc, "del b")
        again = run(kc, "%%remote\nprint('b is still', b)")
        assert "b is still 42" in again.stdout, again.stderr
        failed = run(kc, "%%remote\n1 / 0")
        assert "ZeroDivisionError" in failed.stderr and "failed on the worker" in failed.stderr
        assert run(kc, "print(a)").stdout.strip() == "21"  # the kernel carries on

        stopped = run(kc, "%parallex stop")
        assert "every worker was given back" in stopped.stdout
        local = run(kc, "print(int(da.ones(10, chunks=5).sum().compute()))")
        assert local.stdout.strip() == "10"

    # The kernel's cluster ended its leases when it stopped.
    admin = fed.admin()
    try:
        wait_until(lambda: not [c for c in admin.request("GET", "/clusters")], 30,
                   "the kernel's cluster to close")
    finally:
        admin.close()


@pytest.mark.parametrize(("case", "expected"), [
    ("unreachable", "cannot reach the Parallex broker"),
    ("bad-token", "not known to the broker"),
])
def test_kernel_explains_and_keeps_working_locally(lab_with_agent, tmp_path, case, expected):
    fed = lab_with_agent
    env = {"PARALLEX_BROKER_URL": fed.url, "PARALLEX_TOKEN": fed.user_tokens["alice"]}
    if case == "unreachable":
        env["PARALLEX_BROKER_URL"] = "http://127.0.0.1:9"
    else:
        env["PARALLEX_TOKEN"] = "px_not-a-real-token"
    check_local_kernel(tmp_path, env, expected)


def test_kernel_over_credit_limit_explains_and_keeps_working_locally(tmp_path):
    """lab-a has no grant and spends on lab-b's machine at 1 PCU per CPU-second."""
    fed = make_federation(tmp_path, provider_timeout=5, cluster_timeout=10,
                          broker_args=("--initial-grant", "0", "--metering-interval", "1"))
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_lab("lab-b", user="bob")
        fed.add_agent("lab-b", "agent-b", cpus=2, memory="4 GiB")
        admin = fed.admin()
        try:
            admin.request("POST", "/prices", json={"w_cpu": 3600, "w_mem_gib": 0})
        finally:
            admin.close()
        with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                              heartbeat_interval=0.5) as cluster:
            cluster.scale(1)
            cluster.wait_for_workers(1, timeout=60)
            wait_until(lambda: fed.balance("lab-a") < 0, 30, "lab-a to go below zero")
        env = {"PARALLEX_BROKER_URL": fed.url, "PARALLEX_TOKEN": fed.user_tokens["alice"]}
        check_local_kernel(tmp_path, env, "lab lab-a is over its credit limit")
    finally:
        fed.stop()


def check_local_kernel(tmp_path, env: dict, expected: str) -> None:
    with parallex_kernel(tmp_path / "k", env) as (_km, kc):
        first = run(kc, "import dask.array as da\n"
                        "print(int(da.arange(1000, chunks=100).sum().compute()))")
        assert first.status == "ok", first.error
        assert first.stdout.strip() == "499500"
        status = run(kc, "%parallex").stdout
        assert status.startswith("Parallex: local"), status
        assert expected in status
        # The reason is also told once, before a cell, without being asked.
        told = run(kc, "x = 1")
        assert expected in first.stderr + told.stderr


def test_a_merge_on_the_pool_prints_only_what_the_user_printed(lab_with_agent, tmp_path):
    """The student's first dask cell: a P2P merge on the pool; the cell shows the answer and
    nothing else, and Dask's own logging is one `%parallex log` away."""
    fed = lab_with_agent
    env = {"PARALLEX_BROKER_URL": fed.url, "PARALLEX_TOKEN": fed.user_tokens["alice"],
           "PARALLEX_LOG_DIR": str(tmp_path / "logs"), "DASK_PARALLEX__LABS": '["lab-a"]'}
    with parallex_kernel(tmp_path / "k", env) as (_km, kc):
        out = run(kc, "import pandas as pd, dask.dataframe as dd\n"
                      "left = dd.from_pandas(pd.DataFrame({'k': range(2000), 'a': 1}),"
                      " npartitions=4)\n"
                      "right = dd.from_pandas(pd.DataFrame({'k': range(0, 2000, 2), 'b': 2}),"
                      " npartitions=2)\n"
                      "print(len(left.merge(right, on='k').compute()))")
        assert out.status == "ok", out.error + out.stderr
        assert out.stdout.strip() == "1000"
        # At most the progress line of the first dask cell; no Dask log records.
        assert set(out.stderr.splitlines()) <= {"Parallex: waiting for the pool connection…"}, \
            out.stderr
        log = run(kc, "%parallex log 500")
        assert "Register worker" in log.stdout, log.stdout
        assert "shuffle" in log.stdout.lower()  # the merge ran as a P2P shuffle on the pool
        assert list((tmp_path / "logs").glob("kernel-*.log"))
        status = run(kc, "%parallex")
        assert "restricted to labs lab-a" in status.stdout, status.stdout


GIL_HOLD_SECONDS = 60


def test_a_cell_holding_the_gil_for_a_minute_loses_no_worker(tmp_path):
    """A cell that never lets go of the GIL (a long C call; here a busy loop with the switch
    interval raised past its length) while the pool computes. The scheduler and its heartbeat
    to the broker live in another process, so the broker — whose cluster timeout is a sixth of
    the hold — keeps the cluster, the workers keep their data and the computation finishes."""
    fed = make_federation(tmp_path, provider_timeout=5, cluster_timeout=10)
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB")
        env = {"PARALLEX_BROKER_URL": fed.url, "PARALLEX_TOKEN": fed.user_tokens["alice"],
               "PARALLEX_LOG_DIR": str(tmp_path / "logs")}
        with parallex_kernel(tmp_path / "k", env) as (_km, kc):
            start = run(kc, "%parallex scale 2\n"
                            "import time, dask.array as da\n"
                            "cluster, client = parallex_pool.cluster, parallex_pool.client\n"
                            "cluster.wait_for_workers(2, timeout=60)\n"
                            "kept = da.arange(1_000_000, chunks=100_000).persist()\n"
                            "def slow(i):\n"
                            "    import time\n"
                            "    time.sleep(1)\n"
                            "    return i * i\n"
                            "futures = client.map(slow, range(40), pure=False)\n"
                            "before = sorted(cluster.live)\n"
                            "print(len(before))")
            assert start.status == "ok", start.error + start.stderr
            assert start.stdout.splitlines()[-1] == "2", start.stdout
            held = run(kc, "import sys\n"
                           "sys.setswitchinterval(10 * 60)\n"
                           "t0 = time.monotonic()\n"
                           f"while time.monotonic() - t0 < {GIL_HOLD_SECONDS}:\n"
                           "    pass\n"
                           "sys.setswitchinterval(0.005)\n"
                           "print(round(time.monotonic() - t0))",
                       timeout=GIL_HOLD_SECONDS + 60)
            assert held.status == "ok", held.error
            assert int(held.stdout.strip()) >= GIL_HOLD_SECONDS
            after = run(kc, "print(sum(client.gather(futures)) == sum(i * i for i in range(40)))\n"
                            "print(int(kept.sum().compute()) == 499999500000)\n"
                            "print(sorted(cluster.live) == before,"
                            " sorted(le['state'] for le in cluster.leases))")
            assert after.status == "ok", after.error + after.stderr
            assert after.stdout.split("\n")[:3] == ["True", "True",
                                                    "True ['running', 'running']"], after.stdout
            admin = fed.admin()
            try:
                clusters = admin.request("GET", "/clusters")
            finally:
                admin.close()
            assert [c["active"] for c in clusters] == [True], clusters
    finally:
        fed.stop()


def test_the_notebook_reads_why_its_workers_were_preempted(tmp_path):
    """A notebook's worker runs on a lab server whose owner comes back and stays: the worker
    is preempted, and before the next cell the notebook says so, with the machine's name."""
    import os

    if os.geteuid() != 0:
        pytest.skip("the synthetic owner runs under an account of its own (needs root)")
    from tests.federation.test_owner import owner_load
    from tests.utils.procs import unprivileged_uid

    fed = make_federation(tmp_path, provider_timeout=5, cluster_timeout=10)
    try:
        fed.add_lab("lab-a", user="alice")
        agent = fed.add_agent("lab-a", "physics-server-3", cpus=2, memory="4 GiB", extra=(
            "--offer", "idle", "--idle-for", "0", "--suspend-after", "0",
            "--preempt-after", "1", "--vacate-time", "5",
            "--owner-accounts", str(unprivileged_uid())))
        agent.wait_for_line("PARALLEX_OWNER=offer")
        env = {"PARALLEX_BROKER_URL": fed.url, "PARALLEX_TOKEN": fed.user_tokens["alice"]}
        with parallex_kernel(tmp_path / "k", env) as (_km, kc):
            held = run(kc, "%parallex scale 1\n"
                           "parallex_pool.cluster.wait_for_workers(1, timeout=60)")
            assert held.status == "ok", held.error
            with owner_load(tmp_path):
                agent.wait_for_line("PARALLEX_OWNER=preempt", timeout=30)
                waited = run(kc, "import time\n"
                                 "deadline = time.monotonic() + 60\n"
                                 "while not any(le.get('end_reason') == 'preempted' for le in "
                                 "parallex_pool.cluster.leases):\n"
                                 "    assert time.monotonic() < deadline, 'not preempted'\n"
                                 "    time.sleep(0.1)\n")
                assert waited.status == "ok", waited.error
                told = run(kc, "print('next cell')")
            assert "next cell" in told.stdout
            assert ("Parallex: 1 worker preempted: owner activity on physics-server-3"
                    in told.stderr), told.stderr
            # Said once, not before every cell.
            assert "preempted" not in run(kc, "print('again')").stderr
    finally:
        fed.stop()
