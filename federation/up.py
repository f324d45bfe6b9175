"""`parallex up`: a whole federation on this machine, for trying Parallex and for development.

Starts a broker and one provider agent per demo lab as child processes, creates the labs, a
demo user per lab and their tokens through the admin API, writes DIR/demo.env, and stops every
child (agents first, so their workers end cleanly) on Ctrl-C or SIGTERM.
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
from pathlib import Path

import psutil

from .client import BrokerClient
from .errors import RequestRejected

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


def run(args: argparse.Namespace) -> int:
    """Run the local federation until SIGINT or SIGTERM."""
    if args.providers < 1:
        print("error: --providers must be at least 1", file=sys.stderr)
        return 2
    data = Path(args.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    cpus = args.cpus or float(psutil.cpu_count() or 1)
    memory = args.memory or str(int(psutil.virtual_memory().total // args.providers))
    admin_token = secrets.token_hex(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEX_")}

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    children: list[Child] = []
    try:
        broker = Child("broker", _cli("broker", "--db-url", f"sqlite:///{data / 'broker.db'}",
                                      "--port", str(args.port)),
                       data / "broker.log", {**env, "PARALLEX_ADMIN_TOKEN": admin_token})
        children.append(broker)
        url = broker.read_value("PARALLEX_BROKER_URL=")

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
                agent_dir = data / f"agent-{i}"
                agent_dir.mkdir(exist_ok=True)
                token_file = agent_dir.with_suffix(".token")
                token_file.write_text(provider_token)
                token_file.chmod(0o600)
                agent = Child(lab, _cli("provide", "--broker", url, "--token-file",
                                        str(token_file), "--cpus", f"{cpus:g}", "--memory",
                                        memory, "--workdir", str(agent_dir), "--name",
                                        f"{lab}-server"), data / f"agent-{i}.log", env)
                children.append(agent)
                agent.read_value("PARALLEX_PROVIDER_ID=")
        finally:
            admin.close()

        env_file = data / "demo.env"
        env_file.write_text(f"PARALLEX_BROKER_URL={url}\nPARALLEX_TOKEN={user_tokens[0]}\n"
                            f"PARALLEX_ADMIN_TOKEN={admin_token}\n")
        env_file.chmod(0o600)
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
