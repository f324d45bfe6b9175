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
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil

if TYPE_CHECKING:
    from hub_config.local import LocalHubPlan

from .client import BrokerClient
from .errors import RequestRejected
from .ports import free_port, port_in_use
from .process_tree import end_process_tree, end_processes
from .worker_accounts import WorkerAccountError, WorkerAccounts, parse_uid_range

STOP_TIMEOUT = 20.0
# Starts of the identity providers and the hub, each on newly picked ports, before giving up
# on ports other programs keep taking.
PORT_ATTEMPTS = 3
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


class PortTaken(RuntimeError):
    """A child could not listen: the port it was given was already in use."""


#: What a child's log says when its port was taken (Python's OSError, Node's error code).
PORT_TAKEN_MARKS = (b"address already in use", b"eaddrinuse")


class Child:
    """A child process in its own process group, its output appended to a log file.

    With ``reads_stdout`` its stdout is a pipe `read_value` reads the child's readiness from;
    otherwise stdout goes to the log too (JupyterHub's children, such as the proxy, inherit it,
    and a pipe nobody reads would block them once full).
    """

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str],
                 reads_stdout: bool = True):
        self.name = name
        self.log = log
        self._log = open(log, "ab")  # noqa: SIM115 (closed in stop())
        # The data folder's logs are appended to across runs; this run's part starts here,
        # and `port_taken` reads on from where it stopped.
        self._scanned = self._log.tell()
        self._port_taken = False
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE if reads_stdout else self._log,
                                      stderr=self._log, stdin=subprocess.DEVNULL, env=env,
                                      text=True, start_new_session=True)

    def port_taken(self) -> bool:
        """Whether this run of the child logged that its port was in use (reading only what
        the log gained since the last call, plus enough before it for a mark cut in two)."""
        if not self._port_taken:
            overlap = max(len(mark) for mark in PORT_TAKEN_MARKS)
            with open(self.log, "rb") as log:
                log.seek(self._scanned)
                gained = log.read().lower()
            self._port_taken = any(mark in gained for mark in PORT_TAKEN_MARKS)
            self._scanned += max(len(gained) - overlap, 0)
        return self._port_taken

    def check_running(self) -> None:
        """Raise when the child has exited (PortTaken when its port was in use)."""
        if self.port_taken():
            raise PortTaken(f"{self.name} could not listen: its port was already in use; "
                            f"see {self.log}")
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; "
                               f"see {self.log}")

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
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(1)  # the reader saw the end of its output: it is exiting
            self.check_running()
            raise RuntimeError(f"{self.name} did not start within {timeout:g} s; see {self.log}")
        return result[0]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """End the child and everything it started (`end_process_tree`)."""
        end_process_tree(self.popen, timeout)
        self._log.close()


def _adopt_orphans() -> None:
    """Make this process the reaper of its descendants' orphans (Linux), so that
    `_end_orphans` finds what a child that exited left running."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _end_orphans(children: list[Child], timeout: float = STOP_TIMEOUT) -> None:
    """End this process's children that are none of ``children``: orphans adopted from a
    child that exited."""
    ours = {child.popen.pid for child in children}
    with contextlib.suppress(psutil.Error):
        end_processes([proc for proc in psutil.Process().children()
                       if proc.pid not in ours], timeout)


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
        for child in children:
            child.check_running()
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


def _start_hub(args: argparse.Namespace, data: Path, env: dict[str, str], admin_token: str,
               db_url: str, children: list[Child]) -> LocalHubPlan:
    """Start the demo identity providers and JupyterHub (running the broker); return the plan.

    The ports are picked free, but another program can take one before the child binds it;
    then everything started is stopped and started again on other ports, up to
    PORT_ATTEMPTS times. A port given on the command line is never changed.
    """
    from hub_config import local

    for attempt in range(1, PORT_ATTEMPTS + 1):
        started = len(children)
        hub = local.plan(data, labs=args.providers, hub_port=args.hub_port or free_port(),
                         broker_port=args.port or free_port(), admin_token=admin_token,
                         broker_db_url=db_url)
        try:
            for name, command in hub.provider_commands.items():
                provider = Child(f"identity provider {name}", command,
                                 data / f"oidc-{name}.log", env)
                children.append(provider)
                provider.read_value("OIDC_READY ")
            children.append(Child("JupyterHub", hub.hub_command, data / "jupyterhub.log",
                                  {**env, **hub.hub_env}, reads_stdout=False))
            _wait_http([f"{hub.hub_url}/hub/api/", f"{hub.broker_url}/api/v1/openapi.json"],
                       children, timeout=120)
            return hub
        except PortTaken as exc:
            if attempt == PORT_ATTEMPTS:
                raise PortTaken(f"{exc} ({PORT_ATTEMPTS} tries with other ports)") from exc
            print(f"warning: {exc}; starting again on other ports "
                  f"(try {attempt + 1} of {PORT_ATTEMPTS})", file=sys.stderr, flush=True)
            for child in reversed(children[started:]):
                child.stop()
            del children[started:]
            _end_orphans(children)
    raise AssertionError("unreachable")


def _ports_given_in_use(args: argparse.Namespace) -> str | None:
    """The error for a port given on the command line that something already listens on."""
    given = [("--port", args.port)] + ([] if args.no_hub else [("--hub-port", args.hub_port)])
    for option, port in given:
        if port and port_in_use(port):
            return (f"port {port} ({option}) is already in use on 127.0.0.1; stop what listens "
                    f"there or choose another {option} (0 picks a free port)")
    return None


def run(args: argparse.Namespace) -> int:
    """Run the local federation until SIGINT or SIGTERM."""
    if args.providers < 1:
        print("error: --providers must be at least 1", file=sys.stderr)
        return 2
    taken = _ports_given_in_use(args)
    if taken:
        print(f"error: {taken}", file=sys.stderr)
        return 1
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
    _adopt_orphans()
    try:
        hub = None
        db_url = f"sqlite:///{data / 'broker.db'}"
        if args.no_hub:
            broker = Child("broker", _cli("broker", "--db-url", db_url, "--port", str(args.port)),
                           data / "broker.log", {**env, "PARALLEX_ADMIN_TOKEN": admin_token})
            children.append(broker)
            url = broker.read_value("PARALLEX_BROKER_URL=")
        else:
            hub = _start_hub(args, data, env, admin_token, db_url, children)
            url = hub.broker_url

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
        _end_orphans([])
        print("Parallex stopped.", flush=True)
