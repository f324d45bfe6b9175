"""Real broker and agent processes for tests: started on free ports, read for their readiness
line, and stopped (with every worker they started) when the test ends, pass or fail."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from federation.worker_process import WorkerProcess

READY_TIMEOUT = 60.0


class Proc:
    """A child process in its own process group whose stdout lines are queued."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None,
                 user: int | None = None):
        self.args = args
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 (closed in stop())
        # ``user``: run as that uid (and its gid, no other groups); the tests run as root.
        account = {} if user is None else {"user": user, "group": user, "extra_groups": []}
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log_file, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True, text=True, **account,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for_line(self, prefix: str, timeout: float = READY_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.popen.poll() is not None and self.lines.empty():
                raise AssertionError(f"{self.args[2:4]} printed no line starting {prefix!r} "
                                     f"within {timeout:g} s; log:\n{self.log_text()[-3000:]}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line[len(prefix):]

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        """SIGKILL this process only (its children, e.g. workers, survive as orphans)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, then SIGKILL it after ``timeout``."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log_file.close()
        return self.popen.returncode


def ready(proc: Proc, prefix: str) -> str:
    """Wait for the readiness line; a process that never gets there is stopped, not leaked."""
    try:
        return proc.wait_for_line(prefix)
    except BaseException:
        proc.stop()
        raise


def wait_warm(agent: Proc, n: int, timeout: float = READY_TIMEOUT) -> None:
    """Wait until the agent says ``n`` warm worker interpreters are ready (its stdout line
    PARALLEX_WARM_READY=<n>, printed at each change)."""
    deadline = time.monotonic() + timeout
    while int(agent.wait_for_line("PARALLEX_WARM_READY=",
                                  max(0.1, deadline - time.monotonic()))) != n:
        pass


def parallex(*args: str) -> list[str]:
    return [sys.executable, "-m", "federation.cli", *args]


def start_broker(tmp: Path, admin_token: str, *, db_url: str | None = None, port: int = 0,
                 provider_timeout: float = 30, cluster_timeout: float = 60,
                 name: str = "broker", extra: tuple[str, ...] = ()) -> tuple[Proc, str]:
    db_url = db_url or f"sqlite:///{tmp / 'broker.db'}"
    proc = Proc(parallex("--log-level", "INFO", "broker", "--db-url", db_url, "--host",
                         "127.0.0.1", "--port", str(port), "--provider-timeout",
                         str(provider_timeout), "--cluster-timeout", str(cluster_timeout),
                         *extra),
                tmp / f"{name}.log", env={"PARALLEX_ADMIN_TOKEN": admin_token})
    return proc, ready(proc, "PARALLEX_BROKER_URL=")


_next_uid_block = itertools.count()
UID_BLOCK = 8


def worker_uid_args() -> tuple[str, ...]:
    """--worker-uids with a block of uids no other agent of this test run uses when the tests
    run as root (as CI does), else --insecure-shared-account (a developer's own machine)."""
    if os.geteuid() != 0:
        return ("--insecure-shared-account",)
    # Distinct per test process too, so two test runs on one machine never share a uid.
    low = 100_000 + 1000 * (os.getpid() % 100_000) + UID_BLOCK * (next(_next_uid_block) % 124)
    return ("--worker-uids", f"{low}-{low + UID_BLOCK - 1}")


def unprivileged_uid() -> int:
    """An unused uid (no passwd entry needed) for running a program as a normal account; it
    lies outside every block worker_uid_args hands out in this test process."""
    return 100_000 + 1000 * (os.getpid() % 100_000) + 999


def agents_folder() -> Path:
    """A folder for agents' work folders that worker accounts may pass through (pytest's own
    temporary folders are 0700 to everyone but root); the caller removes it."""
    folder = Path(tempfile.mkdtemp(prefix="parallex-agents-"))
    folder.chmod(0o711)
    return folder


def start_agent(url: str, token: str, workdir: Path, *, name: str, cpus: float,
                memory: str = "2 GiB", extra: tuple[str, ...] = (), gpus: str = "none",
                env: dict | None = None, token_on_command_line: bool = False,
                accounts: tuple[str, ...] | None = None, prefix: tuple[str, ...] = ()) -> Proc:
    """A provider agent; its workers run under uids of their own when the tests run as root
    (``accounts`` overrides the account options). Its workers start cold unless ``extra``
    sets --warm-workers: warm interpreters being started would compete for this machine's two
    cores in every test; tests/federation/test_warm_pool.py and the Dask workload tests run
    with them."""
    if "--warm-workers" not in extra:
        extra = (*extra, "--warm-workers", "0")
    workdir.mkdir(parents=True, exist_ok=True)
    token_file = workdir.parent / f"{name}.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    token_args = ["--token", token] if token_on_command_line else ["--token-file",
                                                                    str(token_file)]
    command = parallex("provide", "--broker", url, *token_args, "--cpus", str(cpus),
                       "--memory", memory, "--gpus", gpus, "--workdir", str(workdir),
                       "--name", name, *(worker_uid_args() if accounts is None else accounts),
                       *extra)
    proc = Proc([*prefix, *command], workdir.parent / f"{name}.log", env=env)
    ready(proc, "PARALLEX_PROVIDER_ID=")
    return proc


def recorded_workers(workdir: Path) -> dict[str, dict]:
    """The worker processes an agent recorded in its state file."""
    try:
        return json.loads((workdir / "workers.json").read_text())
    except (OSError, ValueError):
        return {}


def live_worker_pids(workdir: Path) -> set[int]:
    """Pids of recorded workers whose process still runs, judged as the agent judges it."""
    workers = (WorkerProcess.adopt(lid, state)
               for lid, state in recorded_workers(workdir).items())
    return {w.pid for w in workers if w is not None}


def worker_processes_of(workdirs: list[Path]) -> list[psutil.Process]:
    """Every live worker process (cold or warm-started) running in a lease folder under one of
    ``workdirs``: its working directory is the lease's scratch folder (its command line is
    "dask worker [address]" once distributed sets the process title)."""
    found = []
    roots = [str(w) for w in workdirs]
    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd") or ""
        if any(cwd.startswith(root) for root in roots):
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
    return found


def process_ended(process: psutil.Process) -> bool:
    """True once ``process`` has exited (a zombie not yet reaped by its parent, or gone)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_workers_under(workdirs: list[Path]) -> None:
    """Clean-up: SIGKILL the process groups of workers the test's agents started."""
    for proc in worker_processes_of(workdirs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.1) -> object:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def in_thread(call: Callable[[], object], name: str | None = None
              ) -> tuple[threading.Thread, dict]:
    """Run ``call`` on a thread of its own (called ``name``, if given); the dict gets its
    result as "recorded", or the exception it raised as "failed", once the thread ends."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["recorded"] = call()
        except BaseException as exc:  # reported by the caller's assertion
            out["failed"] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, out
