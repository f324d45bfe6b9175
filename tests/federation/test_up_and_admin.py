"""`parallex up` runs a whole local federation, and the admin CLI manages labs and tokens."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import dask.array as da
import httpx
import psutil
import pytest

from federation import FederatedCluster, TokenRefused
from tests.utils.hub import browser_login
from tests.utils.procs import Proc, agents_folder, parallex, unprivileged_uid, wait_until


def read_env(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def start_up(tmp_path, providers: int, memory: str,
             hub: bool = True) -> tuple[Proc, dict[str, str]]:
    """`parallex up` with one CPU per demo lab; returns it once ready, with its demo.env."""
    data = tmp_path / "data"
    up = Proc(parallex("up", "--data-dir", str(data), "--providers", str(providers), "--cpus",
                       "1", "--memory", memory, *(["--hub-port", "0"] if hub else ["--no-hub"])),
              tmp_path / "up.log")
    try:
        up.wait_for_line("Parallex is up")
        return up, read_env(data / "demo.env")
    except BaseException:
        up.stop()
        raise


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(parallex(*args), env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM],
                         ids=["sigint", "sigterm"])
def test_up_serves_a_cluster_and_stops_everything(tmp_path, monkeypatch, stop_signal):
    up, env = start_up(tmp_path, providers=2, memory="3 GiB")
    try:
        assert set(env) == {"PARALLEX_BROKER_URL", "PARALLEX_TOKEN", "PARALLEX_ADMIN_TOKEN",
                            "PARALLEX_HUB_URL"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        # A newcomer signs in at the printed URL through a demo institution's real OIDC flow.
        landed = browser_login(env["PARALLEX_HUB_URL"], "north", "ada", "ada-demo")
        assert landed.status_code == 200 and str(landed.url).endswith("/hub/home")
        assert "ada@north" in landed.text

        cluster = FederatedCluster(dashboard=False)  # configured by demo.env alone
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=60)
        client = cluster.get_client()
        assert int(da.ones(1000, chunks=100).sum().compute()) == 1000
        # One CPU per demo lab: the two workers come from both labs.
        assert cluster.workers_by_lab() == {"demo-lab-1": 1, "demo-lab-2": 1}
        family = descendants(up.pid)
        # Cold or warm-started, a worker is titled "dask worker [address]" (setproctitle).
        workers = [p for p in family if " ".join(p.cmdline()).startswith("dask worker [")]
        assert len(workers) == 2

        os.kill(up.pid, stop_signal)
        assert up.popen.wait(60) == 0
        assert "Parallex stopped." in "\n".join(_drain(up))
        assert alive(family) == [], "processes left behind by parallex up"
        client.close()
        cluster.close()
    finally:
        up.stop()


def _drain(proc: Proc) -> list[str]:
    lines = []
    while not proc.lines.empty():
        lines.append(proc.lines.get())
    return lines


def test_admin_cli_creates_labs_and_tokens_and_revokes(tmp_path):
    up, env = start_up(tmp_path, providers=1, memory="2 GiB", hub=False)
    try:
        admin_env = {"PARALLEX_BROKER_URL": env["PARALLEX_BROKER_URL"],
                     "PARALLEX_ADMIN_TOKEN": env["PARALLEX_ADMIN_TOKEN"]}

        made = cli(admin_env, "admin", "lab", "create", "physics", "--site", "north")
        assert made.returncode == 0, made.stderr
        assert "name=physics" in made.stdout and "site=north" in made.stdout
        again = cli(admin_env, "admin", "lab", "create", "physics")
        assert again.returncode == 1
        assert "a lab named 'physics' already exists" in again.stderr
        assert "Traceback" not in again.stderr

        issued = cli(admin_env, "--log-level", "WARNING", "admin", "--json", "user-token",
                     "--lab", "physics", "--user", "dana")
        assert issued.returncode == 0, issued.stderr
        import json

        token = json.loads(issued.stdout)
        provider = cli(admin_env, "admin", "provider-token", "--lab", "physics")
        assert provider.returncode == 0 and "shown only this once" in provider.stdout

        user_env = {"PARALLEX_BROKER_URL": env["PARALLEX_BROKER_URL"],
                    "PARALLEX_ADMIN_TOKEN": token["token"]}
        refused = cli(user_env, "admin", "lab", "create", "sneaky")
        assert refused.returncode == 1
        assert "a user token cannot do this" in refused.stderr

        revoked = cli(admin_env, "admin", "revoke", token["id"])
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(TokenRefused, match="was revoked"):
            FederatedCluster(env["PARALLEX_BROKER_URL"], token["token"], dashboard=False)

        unknown_lab = cli(admin_env, "admin", "user-token", "--lab", "nope", "--user", "x")
        assert unknown_lab.returncode == 1 and "no lab named 'nope'" in unknown_lab.stderr
    finally:
        up.stop()


def test_provide_refuses_bad_flags(tmp_path):
    def provide(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "federation.cli", "provide", "--broker",
                               "http://127.0.0.1:9", "--token", "px_x", "--workdir",
                               str(tmp_path), *args], capture_output=True, text=True,
                              timeout=60)

    too_many = provide("--cpus", "100000")
    assert too_many.returncode == 2 and "more than this machine has" in too_many.stderr
    lots = provide("--memory", "lots")
    assert lots.returncode == 2 and "memory 'lots' is not a size" in lots.stderr
    gpus = provide("--gpus", "3")
    assert gpus.returncode == 2 and "names GPUs [3] that this machine lacks" in gpus.stderr


def test_agent_waiting_for_an_unreachable_broker_stops_on_sigterm(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = Proc(parallex("provide", "--broker", f"http://127.0.0.1:{port}", "--token", "px_x",
                          "--cpus", "1", "--memory", "1 GiB", "--gpus", "none", "--workdir",
                          str(tmp_path / "agent"), "--insecure-shared-account"),
                 tmp_path / "agent.log")
    try:
        # Its first retry message is the signal that it is up and waiting for the broker.
        wait_until(lambda: "retrying in" in agent.log_text(), 30, "the agent's first retry")
        os.kill(agent.pid, signal.SIGTERM)
        assert agent.popen.wait(15) == 0
    finally:
        agent.stop()


def test_up_as_a_normal_account_spawns_servers_that_are_not_root(tmp_path):
    """`./dev up` by a developer without root: `parallex up` runs the hub, the broker and the
    agents (workers in the shared account), and a student's server runs as that account, with
    no --allow-root. When the tests run as root the test takes an unprivileged uid."""
    uid = unprivileged_uid() if os.geteuid() == 0 else None
    home = agents_folder()  # outside pytest's root-only folders
    if uid is not None:
        os.chown(home, uid, uid)
        home.chmod(0o700)
    up = Proc(parallex("up", "--data-dir", str(home / "data"), "--providers", "1", "--cpus", "1",
                       "--memory", "2 GiB", "--hub-port", "0"),
              tmp_path / "up.log", env={"HOME": str(home)}, user=uid)
    try:
        up.wait_for_line("Parallex is up")
        env = read_env(home / "data" / "demo.env")
        with httpx.Client(follow_redirects=True, timeout=60) as browser:
            landed = browser_login(env["PARALLEX_HUB_URL"], "north", "ada", "ada-demo", browser)
            assert landed.status_code == 200, landed.text[:500]
            browser.get(f"{env['PARALLEX_HUB_URL']}/hub/spawn")

            def server_answers() -> bool:
                # A page, not the API: cookie-authenticated API calls need an XSRF token.
                answer = browser.get(f"{env['PARALLEX_HUB_URL']}/user/ada@north/lab")
                return answer.status_code == 200 and "JupyterLab" in answer.text

            wait_until(server_answers, 120, "ada's server to start")
        servers = [p for p in descendants(up.pid)
                   if "jupyterhub.singleuser" in " ".join(p.cmdline())]
        assert len(servers) == 1
        expected = os.geteuid() if uid is None else uid
        assert servers[0].uids().real == expected
        assert servers[0].uids().real != 0 and "--allow-root" not in servers[0].cmdline()
        os.kill(up.pid, signal.SIGTERM)
        assert up.popen.wait(60) == 0
    except BaseException:
        for log in sorted((home / "data").glob("*.log")):
            print(f"==== {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        up.stop()
        shutil.rmtree(home, ignore_errors=True)
