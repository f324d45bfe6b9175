"""The agent's warm interpreters: a CPU lease's worker is handed to an interpreter started
ahead (same account rules, same folder, log and environment as a cold start), the pool never
holds more than the free CPUs, GPU leases start cold, and nothing of the pool outlives the
agent."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from federation import FederatedCluster
from tests.utils.procs import (
    parallex,
    process_ended,
    recorded_workers,
    wait_until,
    wait_warm,
)

FAKE_GPUS = json.dumps([{"index": 0, "model": "NVIDIA A100-SXM4-40GB", "memory": 40 * 2**30}])


def warm_interpreters(agent_pid: int) -> dict[int, psutil.Process]:
    """The agent's waiting warm interpreters, by pid."""
    found = {}
    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if "federation.warm_worker" in child.cmdline():
                found[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    return found


def where_am_i_probe():
    """A function the workers run, made here so it is pickled by value (the workers cannot
    import this test module)."""
    def where_am_i() -> dict:
        import os
        import tempfile

        return {"cwd": os.getcwd(), "home": os.environ.get("HOME"),
                "tmp": tempfile.gettempdir(), "uid": os.getuid(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")}
    return where_am_i


def test_a_lease_starts_in_a_warm_interpreter_and_the_pool_refills(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    agent = fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB",
                          extra=("--warm-workers", "2"))
    wait_warm(agent, 2)
    waiting = warm_interpreters(agent.pid)
    assert len(waiting) == 2
    started_before = {pid: p.create_time() for pid, p in waiting.items()}
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=60)
        workers = recorded_workers(fed.workdirs["agent-a"])
        assert len(workers) == 2
        # Each lease's worker is one of the interpreters that waited: same pid, same start.
        assert {w["pid"]: w["create_time"] for w in workers.values()} == started_before
        # `ps` shows a warm-started worker as a cold one: "dask worker [its address]".
        for w in workers.values():
            assert " ".join(psutil.Process(w["pid"]).cmdline()).startswith("dask worker [tls")
        # Both CPUs are held: the pool keeps none while they are.
        wait_until(lambda: not [p for p, proc in warm_interpreters(agent.pid).items()
                                if p not in started_before], 30, "no spare interpreter")
        with cluster.get_client() as client:
            seen = client.run(where_am_i_probe())
            names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
            assert client.submit(sum, range(10)).result() == 45
        for lease_id, facts in ((names[a], f) for a, f in seen.items()):
            folder = os.path.join(fed.workdirs["agent-a"], "leases", lease_id)
            assert facts["home"] == folder
            assert facts["cwd"] == os.path.join(folder, "scratch")
            assert facts["tmp"] == os.path.join(folder, "scratch")
            assert facts["gpus"] == ""
            if os.geteuid() == 0:  # the tests' agents give each lease a uid of its own
                assert facts["uid"] == workers[lease_id]["uid"] != 0
        uids = [w["uid"] for w in workers.values()]
        assert len(set(uids)) == len(uids)
        log = (fed.workdirs["agent-a"] / "leases" / lease_id / "worker.log").read_text()
        assert "Start worker at" in log  # the worker's own output goes to the lease's log
    # Leases ended: the pool refills with new interpreters.
    wait_warm(agent, 2)
    refilled = warm_interpreters(agent.pid)
    assert len(refilled) == 2 and not set(refilled) & set(started_before)
    agent.stop()
    assert agent.popen.returncode == 0
    for proc in refilled.values():
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


def test_a_gpu_lease_starts_cold_beside_warm_cpu_leases(federation):
    fed = federation
    fed.add_lab("lab-gpu", user="alice")
    agent = fed.add_agent("lab-gpu", "gpu-box", cpus=2, memory="4 GiB", gpus="0",
                          env={"PARALLEX_FAKE_GPUS": FAKE_GPUS},
                          extra=("--warm-workers", "1"))
    wait_warm(agent, 1)
    (warm_pid,) = warm_interpreters(agent.pid)
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        cluster.scale(1, gpus=1)
        cluster.wait_for_workers(1, timeout=60)
        (gpu_lease,) = recorded_workers(fed.workdirs["gpu-box"]).values()
        assert gpu_lease["pid"] != warm_pid
        assert warm_pid in warm_interpreters(agent.pid)  # still waiting for a CPU lease
        cluster.scale(1)  # the CPU group (the GPU group keeps its one)
        cluster.wait_for_workers(2, timeout=60)
        pids = {w["pid"] for w in recorded_workers(fed.workdirs["gpu-box"]).values()}
        assert warm_pid in pids
        with cluster.get_client() as client:
            devices = sorted(f["gpus"] for f in client.run(where_am_i_probe()).values())
        assert devices == ["", "0"]


@pytest.mark.parametrize("value", ["-1", "65", "many"])
def test_a_bad_warm_pool_size_is_refused(value, tmp_path):
    import subprocess

    done = subprocess.run(
        parallex("provide", "--broker", "http://127.0.0.1:9", "--token", "x",
                 "--insecure-shared-account", "--workdir", str(tmp_path), "--warm-workers",
                 value), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--warm-workers" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_worker_environment_of_a_warm_start_has_no_agent_secret(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    agent = fed.add_agent("lab-a", "agent-a", cpus=1, memory="2 GiB",
                          extra=("--warm-workers", "1"),
                          env={"PARALLEX_PROVIDER_TOKEN_HINT": "agent-only"})
    wait_warm(agent, 1)

    def environment() -> dict:
        import os
        return dict(os.environ)

    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        with cluster.get_client() as client:
            (env,) = client.run(environment).values()
    assert not [k for k in env if k.startswith("PARALLEX_") or "TOKEN" in k.upper()]
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"


@pytest.mark.skipif(os.geteuid() != 0, reason="worker uids need root (CI runs as root)")
def test_a_cold_lease_gets_a_uid_that_waiting_interpreters_held(federation):
    """Two uids, both held by waiting interpreters: a GPU lease (which starts cold) still
    starts, by retiring one of them."""
    from tests.utils.procs import worker_uid_args

    low = int(worker_uid_args()[1].split("-")[0])
    fed = federation
    fed.add_lab("lab-gpu", user="alice")
    agent = fed.add_agent("lab-gpu", "gpu-box", cpus=2, memory="4 GiB", gpus="0",
                          env={"PARALLEX_FAKE_GPUS": FAKE_GPUS},
                          accounts=("--worker-uids", f"{low}-{low + 1}"),
                          extra=("--warm-workers", "2"))
    wait_warm(agent, 2)
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        cluster.scale(1, gpus=1)
        cluster.wait_for_workers(1, timeout=60)
        (lease,) = recorded_workers(fed.workdirs["gpu-box"]).values()
        assert lease["uid"] in (low, low + 1)
    assert "cannot start worker" not in agent.log_text()


def hand_at_once(order: dict) -> tuple[int, str]:
    """Start a warm interpreter and at once do what launchers.ProcessLauncher.start does:
    write its order, close its input and stop reading its readiness pipe (importing
    distributed takes far longer, so it is not ready yet). Its exit code and stderr."""
    import subprocess
    import sys

    interpreter = subprocess.Popen([sys.executable, "-m", "federation.warm_worker"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    try:
        interpreter.stdin.write(json.dumps(order).encode() + b"\n")
        interpreter.stdin.close()
        interpreter.stdout.close()
        code = interpreter.wait(60)
        return code, interpreter.stderr.read().decode()
    finally:
        if interpreter.poll() is None:
            interpreter.kill()
            interpreter.wait()
        interpreter.stderr.close()


def test_an_interpreter_given_its_lease_while_still_importing_runs_it(tmp_path):
    """The agent hands a lease to an interpreter still importing when none is ready yet: it
    must still run the lease's worker. (It exited with code 1, BrokenPipeError on its "warm"
    line, so after Client.restart every replacement worker failed until a refilled
    interpreter happened to be ready first.)"""
    (tmp_path / "scratch").mkdir()
    log = tmp_path / "worker.log"
    log.touch()
    code, errors = hand_at_once({"cwd": str(tmp_path / "scratch"), "log": str(log), "env": {},
                                 "args": ["--version"]})  # a worker that ends by itself
    assert code == 0, errors
    assert "BrokenPipeError" not in errors
    assert "version" in log.read_text()  # the worker ran, its output in the lease's log


def test_an_order_the_interpreter_cannot_follow_says_why_in_the_lease_log(tmp_path):
    """Before it takes its lease a warm interpreter's stderr is its warm file, which the
    agent removes once it handed the order: why it could not follow it (here, a folder that
    is gone) goes to the lease's log, which the agent sends with the lease's end ("last log
    lines"), instead of nowhere."""
    log = tmp_path / "worker.log"
    log.touch()
    code, _ = hand_at_once({"cwd": str(tmp_path / "gone"), "log": str(log), "env": {},
                            "args": ["--version"]})
    assert code == 1
    said = log.read_text()
    assert "FileNotFoundError" in said and str(tmp_path / "gone") in said, said


def test_a_warm_interpreter_that_dies_before_it_is_ready_says_why_and_the_pool_pauses(
        tmp_path, caplog):
    """An interpreter that cannot start (here one whose Python cannot import Dask) exits
    before it is ready: the agent's log says what it wrote on standard error (it was thrown
    away), and after three such exits in a row the pool stops starting them for a while
    instead of starting a failing one every second; leases start cold meanwhile."""
    import logging
    import stat

    from federation.launchers import WARM_EXITS_TO_PAUSE, ProcessLauncher
    from federation.worker_accounts import WorkerAccounts

    broken = tmp_path / "bin" / "python"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'distributed'\" >&2"
                      "\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    launcher = ProcessLauncher(tmp_path / "agent", warm=1)
    accounts = WorkerAccounts(None)
    # A lease in that environment: the pool keeps its interpreter warm from now on.
    launcher.account_for({"id": "ls-broken", "python": str(broken), "gpus": 0}, accounts)
    accounts.release("ls-broken")
    me = psutil.Process()

    def keep_ready() -> list[psutil.Process]:
        """A tick of the agent's pool; the processes it started (the interpreters)."""
        before = {c.pid for c in me.children()}
        launcher.keep_ready(accounts, free_cpus=4)
        return [c for c in me.children() if c.pid not in before]

    caplog.set_level(logging.WARNING, logger="parallex.agent")
    try:
        for _ in range(WARM_EXITS_TO_PAUSE):
            [started] = keep_ready()
            # Exited (not reaped here: the launcher reads its exit code).
            wait_until(lambda p=started: process_ended(p), 30, "the broken interpreter to exit")
        assert not keep_ready()  # the third exit paused the pool
        said = [r.getMessage() for r in caplog.records]
        early = [m for m in said if "before it was ready" in m]
        assert len(early) == WARM_EXITS_TO_PAUSE, said
        assert all("No module named 'distributed'" in m and "code 3" in m for m in early), said
        assert any("leases start cold" in m and str(broken) in m for m in said), said
        # Still paused at the next tick, and no file of the dead ones is left behind.
        assert not keep_ready()
        assert launcher.ready_count() == 0
        assert not list((tmp_path / "agent" / "warm").iterdir())
    finally:
        launcher.close(accounts)
