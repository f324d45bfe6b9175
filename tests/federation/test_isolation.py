"""One account per lease, with real accounts: two users' workers on one lab machine cannot
read, signal or borrow from each other or from the agent, and nothing of a lease outlives it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from federation import FederatedCluster
from tests.utils.procs import parallex, wait_until

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="worker accounts need root (CI "
                                                          "runs as root)")


def make_probe():
    """The attack, as a function local to this one (so Dask pickles it by value)."""

    def probe(targets: dict) -> dict:
        """Runs as a task on the attacker's worker: try every access, report what worked."""
        import os
        import signal
        import subprocess

        outcome = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}

        def attempt(name, action):
            try:
                action()
                outcome[name] = "ALLOWED"
            except PermissionError:
                outcome[name] = "denied"
            except OSError as exc:
                outcome[name] = f"error {exc.errno}"

        def read(path):
            with open(path, "rb") as f:
                f.read(16)

        attempt("victim mem", lambda: read(f"/proc/{targets['victim_pid']}/mem"))
        attempt("victim environ", lambda: read(f"/proc/{targets['victim_pid']}/environ"))
        attempt("victim key", lambda: read(os.path.join(targets["victim_folder"], "key.pem")))
        attempt("victim folder", lambda: os.listdir(targets["victim_folder"]))
        attempt("victim scratch",
                lambda: os.listdir(os.path.join(targets["victim_folder"], "scratch")))
        attempt("signal victim", lambda: os.kill(targets["victim_pid"], signal.SIGKILL))
        attempt("agent token", lambda: read(targets["token_file"]))
        attempt("agent mem", lambda: read(f"/proc/{targets['agent_pid']}/mem"))
        attempt("agent environ", lambda: read(f"/proc/{targets['agent_pid']}/environ"))
        attempt("agent state", lambda: read(targets["state_file"]))
        attempt("list leases", lambda: os.listdir(targets["leases"]))
        # A daemon that leaves the worker's process group, and a file in the shared /tmp: both
        # must be gone once the lease ends.
        daemon = subprocess.Popen(["sleep", "1000"], start_new_session=True)
        outcome["daemon_pid"] = daemon.pid
        path = f"/tmp/parallex-left-behind-{os.getuid()}"
        with open(path, "w") as f:
            f.write("left behind")
        outcome["left_file"] = path
        return outcome

    return probe


@needs_root
def test_leases_on_one_machine_cannot_reach_each_other_or_the_agent(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    fed.add_lab("lab-b", user="bob")
    fed.add_lab("lab-c")
    fed.add_agent("lab-c", "shared-box", cpus=2)
    workdir = fed.workdirs["shared-box"]
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          heartbeat_interval=0.5) as attacker, \
            FederatedCluster(fed.url, fed.user_tokens["bob"], dashboard=False,
                             heartbeat_interval=0.5) as victim:
        attacker.scale(1, memory="1 GiB")
        victim.scale(1, memory="1 GiB")
        attacker.wait_for_workers(1)
        victim.wait_for_workers(1)
        (victim_worker,) = victim.connected_workers()
        victim_lease = victim_worker["name"]
        victim_folder = workdir / "leases" / victim_lease
        assert victim_folder.is_dir()
        assert victim_folder.stat().st_mode & 0o777 == 0o700
        assert (victim_folder / "key.pem").stat().st_mode & 0o777 == 0o600
        targets = {"victim_pid": victim_worker["pid"], "victim_folder": str(victim_folder),
                   "token_file": str(workdir.parent / "shared-box.token"),
                   "agent_pid": fed.agents["shared-box"].pid,
                   "state_file": str(workdir / "workers.json"),
                   "leases": str(workdir / "leases")}
        client = attacker.get_client()
        # Made here so it is sent by value, as a notebook's function is.
        seen = client.submit(make_probe(), targets, pure=False).result(timeout=60)
        assert seen["uid"] >= 1000 and seen["gid"] == seen["uid"] and seen["groups"] in (
            [], [seen["gid"]])
        assert seen["uid"] != Path(victim_folder).stat().st_uid
        refused = ["victim mem", "victim environ", "victim key", "victim folder", "victim scratch",
                   "signal victim", "agent token", "agent mem", "agent environ",
                   "agent state", "list leases"]
        assert {k: seen[k] for k in refused} == dict.fromkeys(refused, "denied")
        assert len(victim.connected_workers()) == 1  # the victim's worker survived
        attacker_lease = next(iter(attacker.live))
        attacker.scale(0, memory="1 GiB")
        wait_until(lambda: not (workdir / "leases" / attacker_lease).exists(), 30,
                   "the ended lease's folder (with its key) to be deleted")
        wait_until(lambda: not _alive(seen["daemon_pid"]), 15,
                   "the lease's leftover daemon to be killed")
        wait_until(lambda: not Path(seen["left_file"]).exists(), 15,
                   "the lease's file in /tmp to be removed")
    wait_until(lambda: not victim_folder.exists(), 30, "the victim's folder to be deleted")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_the_agent_refuses_to_run_workers_without_accounts_of_their_own(tmp_path):
    base = parallex("provide", "--broker", "http://127.0.0.1:9", "--token", "px_x",
                    "--cpus", "1", "--memory", "1 GiB", "--gpus", "none",
                    "--workdir", str(tmp_path / "agent"))
    shared = subprocess.run(base, capture_output=True, text=True, timeout=60, check=False)
    assert shared.returncode == 2
    assert "workers need accounts of their own: run the agent as root with --worker-uids" \
        in shared.stderr
    bad_range = subprocess.run([*base, "--worker-uids", "0-10"], capture_output=True, text=True,
                               timeout=60, check=False)
    assert bad_range.returncode == 2
    assert "give a range of unused uids from 1000 up" in bad_range.stderr


@needs_root
def test_worker_accounts_must_reach_the_work_folder(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    run = subprocess.run(parallex("provide", "--broker", "http://127.0.0.1:9", "--token", "px_x",
                                  "--cpus", "1", "--memory", "1 GiB", "--gpus", "none",
                                  "--workdir", str(private / "agent"),
                                  "--worker-uids", "29000-29001"),
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    assert "worker accounts cannot reach" in run.stderr
    assert "choose a --workdir whose parent folders others may traverse" in run.stderr


@needs_root
def test_a_uid_running_someone_elses_processes_is_never_used_or_touched():
    """Two agents whose --worker-uids overlap must not kill each other's workers."""
    from federation.worker_accounts import WorkerAccountError, WorkerAccounts

    uid = 29_500 + os.getpid() % 400
    other = subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[])
    try:
        accounts = WorkerAccounts(range(uid, uid + 1))
        with pytest.raises(WorkerAccountError,
                           match=f"uids {uid} run processes this agent did not start"):
            accounts.acquire("ls-overlapping01")
        assert other.poll() is None  # still running
        spare = WorkerAccounts(range(uid, uid + 2))
        assert spare.acquire("ls-overlapping01").uid == uid + 1
    finally:
        other.kill()
        other.wait(10)
