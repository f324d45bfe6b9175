"""`parallex up`: a whole federation on this machine, for trying Parallex and for development.

Starts two demo institutions' identity providers, JupyterHub (behind configurable-http-proxy,
running the broker as its service) and one provider agent per demo lab as child processes;
creates the labs, a demo user per lab and their tokens through the admin API, writes
DIR/demo.env, and stops every child (agents first, so their workers end cleanly) on Ctrl-C or
SIGTERM. With --no-hub it starts the broker itself and no hub.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from .client import BrokerClient
from .errors import RequestRejected
from .worker_accounts import WorkerAccountError, WorkerAccounts, parse_uid_range

STOP_TIMEOUT = 20.0


class Child:
    """A child process in its own process group, its output appended to a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str]):
        self.name = name
        self.log = log
        self._log = open(log, "ab")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log,
                                      stdin=subprocess.DEVNULL, env=env, text=True,
                                      start_new_session=True)

    def read_value(self, prefix: str, timeout: float = 60.0) -> str:
        """The rest of the first stdout line starting with ``prefix``; the child's readiness."""
        result: list[str] = []

        def reader() -> None:
            for line in self.popen.stdout:
                if line.startswith(prefix):
                    result.append(line.strip()[len(prefix):])
                    return

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        thread.join(timeout)
        if not result:
            raise RuntimeError(f"{self.name} did not start within {timeout:g} s; see {self.log}")
        return result[0]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "federation.cli", *args]


def _ensure(client: BrokerClient, method: str, path: str, body: dict) -> None:
    """Create something that may exist from an earlier run in the same data dir."""
    try:
        client.request(method, path, json=body)
    except RequestRejected as exc:
        if exc.status_code != 409:
            raise


def _wait_http(urls: list[str], children: list[Child], timeout: float) -> None:
    """Until every URL answers 200; fails early when a child exits."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        dead = [c for c in children if c.popen.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited with code {dead[0].popen.returncode}; "
                               f"see {dead[0].log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(pending[0], timeout=2).status_code == 200:
                pending.pop(0)
                continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"{pending[0]} did not answer within {timeout:g} s; see the logs "
                               f"in {children[-1].log.parent}")
        time.sleep(0.2)


def _worker_account_args(args: argparse.Namespace,
                         data: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """(folder for the agent's work folder, account options) per demo lab.

    As root, each lab's workers get uids of their own from --worker-uids, and the agents' work
    folders sit beside the data folder (which stays 0700 with the tokens, demo.env and the
    database), so workers reach their lease folder and nothing else. Where worker accounts
    cannot work (Python under /root, say), development mode says so and shares the account.
    """
    shared = [(data, ("--insecure-shared-account",))] * args.providers
    if os.geteuid() != 0:
        return shared
    uids = parse_uid_range(args.worker_uids)
    per_lab = len(uids) // args.providers
    if per_lab < 1:
        raise WorkerAccountError(f"--worker-uids {args.worker_uids} has fewer uids than the "
                                 f"{args.providers} demo labs")
    folder = data.parent / f"{data.name}-workers"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o711)
    try:
        WorkerAccounts(uids).check(folders=(folder,))
    except WorkerAccountError as exc:
        print(f"warning: workers will run as root, not isolated (development only): {exc}",
              file=sys.stderr, flush=True)
        return shared
    return [(folder, ("--worker-uids", f"{uids[i * per_lab]}-{uids[(i + 1) * per_lab - 1]}"))
            for i in range(args.providers)]


def run(args: argparse.Namespace) -> int:
    """Run the local federation until SIGINT or SIGTERM."""
    if args.providers < 1:
        print("error: --providers must be at least 1", file=sys.stderr)
        return 2
    data = Path(args.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    try:
        worker_accounts = _worker_account_args(args, data)
    except WorkerAccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cpus = args.cpus or float(psutil.cpu_count() or 1)
    memory = args.memory or str(int(psutil.virtual_memory().total // args.providers))
    admin_token = secrets.token_hex(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEX_")}

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    children: list[Child] = []
    try:
        hub = None
        db_url = f"sqlite:///{data / 'broker.db'}"
        if args.no_hub:
            broker = Child("broker", _cli("broker", "--db-url", db_url, "--port", str(args.port)),
                           data / "broker.log", {**env, "PARALLEX_ADMIN_TOKEN": admin_token})
            children.append(broker)
            url = broker.read_value("PARALLEX_BROKER_URL=")
        else:
            from hub_config import local

            hub = local.plan(data, labs=args.providers,
                             hub_port=args.hub_port or local.free_port(),
                             broker_port=args.port or local.free_port(),
                             admin_token=admin_token, broker_db_url=db_url)
            for name, command in hub.provider_commands.items():
                provider = Child(f"identity provider {name}", command,
                                 data / f"oidc-{name}.log", env)
                children.append(provider)
                provider.read_value("OIDC_READY ")
            children.append(Child("JupyterHub", hub.hub_command, data / "jupyterhub.log",
                                  {**env, **hub.hub_env}))
            url = hub.broker_url
            _wait_http([f"{hub.hub_url}/hub/api/", f"{url}/api/v1/openapi.json"], children,
                       timeout=120)

        admin = BrokerClient(url, admin_token)
        user_tokens = []
        try:
            for i in range(1, args.providers + 1):
                lab = f"demo-lab-{i}"
                _ensure(admin, "POST", "/labs", {"name": lab})
                user_tokens.append(admin.request("POST", "/tokens", json={
                    "kind": "user", "lab": lab, "user": f"student-{i}"})["token"])
                provider_token = admin.request("POST", "/tokens",
                                               json={"kind": "provider", "lab": lab})["token"]
                agent_dir = worker_accounts[i - 1][0] / f"agent-{i}"
                agent_dir.mkdir(exist_ok=True)
                token_file = data / f"agent-{i}.token"
                token_file.write_text(provider_token)
                token_file.chmod(0o600)
                agent = Child(lab, _cli("provide", "--broker", url, "--token-file",
                                        str(token_file), "--cpus", f"{cpus:g}", "--memory",
                                        memory, "--workdir", str(agent_dir), "--name",
                                        f"{lab}-server", *worker_accounts[i - 1][1]),
                              data / f"agent-{i}.log", env)
                children.append(agent)
                agent.read_value("PARALLEX_PROVIDER_ID=")
        finally:
            admin.close()

        env_file = data / "demo.env"
        env_file.write_text(f"PARALLEX_BROKER_URL={url}\nPARALLEX_TOKEN={user_tokens[0]}\n"
                            f"PARALLEX_ADMIN_TOKEN={admin_token}\n"
                            + (f"PARALLEX_HUB_URL={hub.hub_url}\n" if hub else ""))
        env_file.chmod(0o600)
        if hub:
            people = "\n".join(f"    {a.institution:6} {a.username:5} / {a.password:10} "
                                f"{a.role} of {a.lab}" for a in hub.accounts)
            print(f"JupyterHub: {hub.hub_url} — sign in through a demo institution "
                  f"(user / password):\n{people}\n"
                  f"Dashboards: {hub.hub_url}/services/parallex-dashboard/", flush=True)
        print(f"Parallex is up: broker {url}, {args.providers} demo labs "
              f"({cpus:g} CPUs each).\n"
              f"In another shell:\n"
              f"  set -a; . {env_file}; set +a\n"
              f"  python -c \"from federation import FederatedCluster; import dask.array as da;"
              f" c = FederatedCluster(); c.scale(2); cl = c.get_client();"
              f" print(da.ones(1000, chunks=100).sum().compute()); c.close()\"\n"
              f"Logs in {data}. Press Ctrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            dead = [c for c in children if c.popen.poll() is not None]
            if dead:
                print(f"error: {dead[0].name} exited with code {dead[0].popen.returncode}; "
                      f"see {dead[0].log}. Stopping.", file=sys.stderr)
                return 1
        return 0
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        # Agents first, so they stop their workers and report while the broker still runs.
        for child in reversed(children):
            child.stop()
        print("Parallex stopped.", flush=True)
