"""Run a site's compose file (deploy/site/compose.yaml) as processes on one host: the
documented equivalent of ``docker compose up`` where there is no container runtime.

The compose file stays the one configuration. Its services with a ``command`` become
processes, started in ``depends_on`` order with the file's environment; a service with
``restart: "no"`` (the migration) runs to completion first. The top-level ``x-processes``
table maps container paths onto the host (``paths``) and names the services that are not
processes but given by an environment variable (``external``: the database). Named volumes
become folders under ``--data-dir``. A service's ``x-ready`` URLs (one or a list) are
polled until each answers 200 (``tcp://HOST:PORT``: until a connection is accepted).

Variables are read as compose reads them: the environment wins over ``--env-file``, and
``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}`` and ``$$`` work.

Run: python -m federation.site --env-file deploy/site/site.env --data-dir /var/lib/parallex
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from .process_tree import end_process_tree

DEFAULT_COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "site" / "compose.yaml"
#: Seconds a service may take to answer its x-ready URL (JupyterHub starts its proxy, the
#: broker and the dashboards first).
READY_TIMEOUT = 120.0
#: Seconds a one-shot service (the migration) may run.
ONE_SHOT_TIMEOUT = 300.0
#: Seconds a stopping service gets after SIGTERM before SIGKILL.
SITE_STOP_TIMEOUT = 30.0

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                       r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


class SiteError(RuntimeError):
    """The compose file or its environment is wrong, or a service failed to start."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """``text`` with compose's variable syntax replaced from ``env``."""
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op[0] == ":")
        if op in ("-", ":-"):
            return interpolate(arg, env) if (value is None if op == "-" else unset_or_empty) \
                else value
        if op in ("?", ":?") and (value is None if op == "?" else unset_or_empty):
            raise SiteError(f"{name} is not set: {arg or 'set it in the environment file'}")
        return value or ""

    return _VARIABLE.sub(one, text)


def read_env_file(path: Path, environ: dict[str, str]) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped; values may use earlier keys);
    ``environ`` wins over the file, as with compose."""
    merged = dict(environ)
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SiteError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key not in environ:
            values[key] = interpolate(value, merged)
            merged[key] = values[key]
    return {**values, **environ}


@dataclass
class Service:
    """One compose service as a process."""

    name: str
    command: list[str]
    environment: dict[str, str]
    one_shot: bool
    ready_urls: list[str]
    depends_on: list[str] = field(default_factory=list)


@dataclass
class SitePlan:
    """The processes a compose file becomes, in start order."""

    services: list[Service]
    external: dict[str, str]  # service -> the variable that stands for it


def _interpolated(value: object, env: dict[str, str]) -> object:
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [_interpolated(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolated(v, env) for k, v in value.items()}
    return value


def plan(compose_file: Path, env: dict[str, str], data_dir: Path) -> SitePlan:
    """Read ``compose_file`` with ``env`` into the processes to start."""
    try:
        raw = yaml.safe_load(compose_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SiteError(f"cannot read {compose_file}: {exc}") from exc
    base = compose_file.resolve().parent
    extension = _interpolated(raw.get("x-processes") or {}, env)
    paths = {target: str((base / source).resolve())
             for target, source in (extension.get("paths") or {}).items()}
    external = dict(extension.get("external") or {})
    for service, variable in external.items():
        if not env.get(variable):
            raise SiteError(f"service {service!r} runs outside this host: set {variable}")
    services: dict[str, Service] = {}
    for name, spec in (raw.get("services") or {}).items():
        if name in external:
            continue
        if "command" not in spec:
            raise SiteError(f"service {name!r} has no command and is not listed under "
                            "x-processes.external; it cannot run as a process")
        spec = _interpolated({k: v for k, v in spec.items() if k != "build"}, env)
        mounts = dict(paths)
        for volume in spec.get("volumes") or []:
            source, _sep, rest = volume.partition(":")
            target = rest.split(":")[0]
            if source.startswith((".", "/")):
                mounts[target] = str((base / source).resolve())
            else:  # a named volume: a folder of the site's data
                folder = data_dir / source
                folder.mkdir(parents=True, exist_ok=True)
                mounts[target] = str(folder)
        command = spec["command"]
        if isinstance(command, str):
            command = command.split()
        environment = spec.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        services[name] = Service(
            name=name,
            command=[_program(command[0])] + [_mapped(a, mounts) for a in command[1:]],
            environment={k: _mapped(str(v if v is not None else ""), mounts)
                         for k, v in environment.items()},
            one_shot=str(spec.get("restart", "")) == "no",
            ready_urls=_as_list(spec.get("x-ready")),
            depends_on=[d for d in (spec.get("depends_on") or []) if d not in external])
    return SitePlan(_in_start_order(services), external)


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _mapped(value: str, mounts: dict[str, str]) -> str:
    """A container path (or one below it, or an SQLite URL of one) as its host path; other
    values unchanged."""
    scheme = "sqlite:///" if value.startswith("sqlite:///") else ""
    path = value[len(scheme):]
    for target in sorted(mounts, key=len, reverse=True):
        if path == target or path.startswith(target + "/"):
            return scheme + mounts[target] + path[len(target):]
    return value


def _program(name: str) -> str:
    """The program a container runs, from this interpreter's environment first."""
    if name in ("python", "python3"):
        return sys.executable
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SiteError(f"{name!r} is not installed on this host (pip install -e . installs "
                        "parallex and jupyterhub)")
    return found


def _in_start_order(services: dict[str, Service]) -> list[Service]:
    ordered: list[Service] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if any(s.name == name for s in ordered):
            return
        if name in visiting:
            raise SiteError(f"depends_on makes a cycle through {name!r}")
        if name not in services:
            raise SiteError(f"a service depends on {name!r}, which the file does not define")
        visiting.add(name)
        for dep in services[name].depends_on:
            visit(dep)
        visiting.discard(name)
        ordered.append(services[name])

    for name in services:
        visit(name)
    return ordered


class RunningSite:
    """The site's processes; ``stop()`` ends them in reverse start order."""

    def __init__(self, site: SitePlan, env: dict[str, str], log_dir: Path):
        self.plan = site
        self.env = env
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, progress=print) -> None:
        try:
            for service in self.plan.services:
                self._start(service, progress)
        except BaseException:
            self.stop()
            raise

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _start(self, service: Service, progress) -> None:
        env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
               **service.environment}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with open(self.log(service.name), "ab") as log:
            popen = subprocess.Popen(service.command, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        if service.one_shot:
            progress(f"{service.name}: running to completion")
            try:
                code = popen.wait(ONE_SHOT_TIMEOUT)
            except subprocess.TimeoutExpired:
                end_process_tree(popen, SITE_STOP_TIMEOUT)
                raise SiteError(f"{service.name} ran past {ONE_SHOT_TIMEOUT:.0f} s; see "
                                f"{self.log(service.name)}") from None
            if code != 0:
                raise SiteError(f"{service.name} exited with code {code}; see "
                                f"{self.log(service.name)}")
            return
        self.processes[service.name] = popen
        for url in service.ready_urls:
            progress(f"{service.name}: waiting for {url}")
            self._wait_ready(service, popen, url)
        progress(f"{service.name}: up (pid {popen.pid})")

    def _wait_ready(self, service: Service, popen: subprocess.Popen, url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise SiteError(f"{service.name} exited with code {popen.returncode} before "
                                f"it was ready; see {self.log(service.name)}")
            try:
                if url.startswith("tcp://"):
                    host, _, port = url.removeprefix("tcp://").rpartition(":")
                    with socket.create_connection((host, int(port)), timeout=2):
                        return
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.25)  # polling a readiness URL, bounded by the deadline above
        raise SiteError(f"{service.name} did not answer {url} within "
                        f"{READY_TIMEOUT:.0f} s; see {self.log(service.name)}")

    def dead(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            end_process_tree(self.processes.pop(name), SITE_STOP_TIMEOUT)


def start_site(compose_file: Path, env: dict[str, str], data_dir: Path,
               progress=print) -> RunningSite:
    """Start every service of ``compose_file`` as processes; returns the running site."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    site = RunningSite(plan(compose_file, env, data_dir), env, data_dir / "logs")
    site.log_dir.mkdir(exist_ok=True)
    site.start(progress)
    return site


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compose", type=Path, default=DEFAULT_COMPOSE,
                        help="The compose file (default deploy/site/compose.yaml).")
    parser.add_argument("--env-file", type=Path, required=True,
                        help="The site's environment file (deploy/site/site.env.example).")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="Folder for named volumes and logs (made 0700 if missing).")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        env = read_env_file(args.env_file, dict(os.environ))
        site = start_site(args.compose, env, args.data_dir)
    except (SiteError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Parallex site is up; logs in {site.log_dir}. Ctrl-C stops it.", flush=True)
    try:
        while not stop.wait(1):
            dead = site.dead()
            if dead:
                print(f"error: {dead[0]} exited; see {site.log(dead[0])}. Stopping.",
                      file=sys.stderr)
                return 1
        return 0
    finally:
        site.stop()


if __name__ == "__main__":
    sys.exit(main())
