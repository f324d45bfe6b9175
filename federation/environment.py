"""A cluster's software environment: what the user's Python has installed, as a list the
broker stores and a provider agent rebuilds (federation.environment_cache).

The description is the Python version (major.minor: wheels are built per minor version) and
every installed distribution with its version and source:

``index``
    installed from a package index; the agent installs the same version from the index its
    lab allows.
``local``, ``git``
    installed from a local wheel or folder, or from a git repository: the lab's index does not
    have it (nor, maybe, the lab's network the repository), so the user's side ships it as a
    wheel packed from the installed files (their RECORD).
``editable``
    ``pip install -e``: the files live in the user's project, so a wheel is built from the
    project on the fly.

Distributions the operating system installed (no INSTALLER record, e.g. Debian's python3-*
packages) are left out: they come from the labs' own systems.

Shipped wheels are identified by their SHA-256 and the environment's hash covers them, so an
edited local package is a new environment. The Parallex package itself is left out: workers
speak the agent's Parallex, as the broker's protocol requires.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Distributions every agent provides itself (the federation's own code).
PROVIDED_BY_AGENT = frozenset({"parallex"})
#: Distributions whose versions must match between a cluster and a `fixed` agent.
CORE = ("dask", "distributed")
#: Largest wheel a cluster may ship, in bytes (64 MiB).
MAX_WHEEL_BYTES = 64 * 1024 * 1024

SOURCES = ("index", "local", "git", "editable")


class EnvironmentProblem(Exception):
    """The environment cannot be described, shipped or built; the message says why."""


def normalize(name: str) -> str:
    """A distribution name as indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def python_version(info: tuple[int, ...] | None = None) -> str:
    """``"3.11"`` for this interpreter (or ``info``)."""
    major, minor = (info or sys.version_info)[:2]
    return f"{major}.{minor}"


@dataclass(frozen=True, order=True)
class Package:
    """One installed distribution."""

    name: str
    version: str
    source: str = "index"
    #: For shipped (local, editable) packages: the wheel's SHA-256 (hex) and file name.
    sha256: str = ""
    filename: str = ""

    @property
    def shipped(self) -> bool:
        return self.source != "index"

    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass
class EnvironmentSpec:
    """Python version plus packages; ``hash`` names it in the broker and in agents' caches."""

    python: str
    packages: list[Package] = field(default_factory=list)

    @property
    def hash(self) -> str:
        return environment_hash(self.python, self.packages)

    def versions(self) -> dict[str, str]:
        return {p.name: p.version for p in self.packages}

    def to_json(self) -> dict:
        return {"python": self.python, "hash": self.hash,
                "packages": [asdict(p) for p in self.packages]}

    @classmethod
    def from_json(cls, data: dict) -> EnvironmentSpec:
        return cls(str(data["python"]), sorted(Package(**p) for p in data["packages"]))


def environment_hash(python: str, packages: list[Package]) -> str:
    """32 hex digits over the Python version and the sorted package list."""
    canonical = json.dumps([python, sorted((p.name, p.version, p.source, p.sha256)
                                           for p in packages)], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _source_of(dist: importlib.metadata.Distribution) -> str:
    text = dist.read_text("direct_url.json")
    if not text:
        return "index"
    try:
        info = json.loads(text)
    except ValueError:
        return "local"
    if (info.get("dir_info") or {}).get("editable"):
        return "editable"
    if info.get("vcs_info"):
        return "git" if info["vcs_info"].get("vcs") == "git" else "local"
    return "local"


def installed() -> dict[str, importlib.metadata.Distribution]:
    """Each distribution importable here by its normalised name (the first on sys.path, the
    one imports use)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in found:
            found[normalize(name)] = dist
    return found


def site_fingerprint() -> tuple[tuple[str, int], ...]:
    """The modification times of this interpreter's package folders: an install or removal
    adds or deletes entries there, which changes them. Cheap enough to take every second or
    before every cell (a few stat calls, not a scan of the installed distributions)."""
    marks = []
    for path in sys.path:
        if path.endswith(("site-packages", "dist-packages")):
            try:
                marks.append((path, os.stat(path).st_mtime_ns))
            except OSError:
                continue
    return tuple(marks)


def core_versions() -> dict[str, str]:
    """Python, dask and distributed versions here (what a `fixed` agent serves)."""
    found = installed()
    return {"python": python_version(),
            **{n: found[n].version for n in CORE if n in found}}


def describe(build_editable: bool = True) -> tuple[EnvironmentSpec, dict[str, tuple[str, bytes]]]:
    """This interpreter's environment, and the wheels to ship (SHA-256 -> (file name,
    bytes)). Raises EnvironmentProblem for a local package that cannot be shipped."""
    packages: list[Package] = []
    wheels: dict[str, tuple[str, bytes]] = {}
    for name, dist in sorted(installed().items()):
        if name in PROVIDED_BY_AGENT:
            continue
        source = _source_of(dist)
        if source == "index" and dist.read_text("INSTALLER") is None:
            # Installed by the operating system (Debian's python3-* packages record no
            # installer): the labs' machines get such packages from their own systems, and
            # an index may not have them at all (python-apt).
            continue
        if source == "index":
            packages.append(Package(name, dist.version))
            continue
        if source == "editable" and not build_editable:
            continue
        filename, data = (build_editable_wheel(dist) if source == "editable"
                          else repack_wheel(dist))
        if len(data) > MAX_WHEEL_BYTES:
            raise EnvironmentProblem(
                f"{name} {dist.version} is installed from a local source and would ship as a "
                f"{len(data) / 2**20:.0f} MiB wheel; the most a cluster ships is "
                f"{MAX_WHEEL_BYTES // 2**20} MiB. Publish it on your lab's package index.")
        sha = hashlib.sha256(data).hexdigest()
        wheels[sha] = (filename, data)
        packages.append(Package(name, dist.version, source, sha, filename))
    return EnvironmentSpec(python_version(), packages), wheels


# ---- wheels -------------------------------------------------------------------------------

_SKIPPED_METADATA = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
#: Zip timestamps are fixed so the same installed files always make the same wheel (and hash).
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _wheel_name(name: str, version: str, tag: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}-{tag}.whl"


def repack_wheel(dist: importlib.metadata.Distribution) -> tuple[str, bytes]:
    """A wheel of an installed distribution made from the files its RECORD lists (what a
    local wheel, folder or git checkout installed): its file name and bytes."""
    name = dist.metadata["Name"]
    files = dist.files or []
    info_dirs = {f.parts[0] for f in files if f.parts and f.parts[0].endswith(".dist-info")}
    if len(info_dirs) != 1:
        raise EnvironmentProblem(
            f"{name} {dist.version} was installed without a wheel record, so it cannot be "
            "shipped to the workers; reinstall it with pip or uv from a wheel or a folder")
    info_dir = info_dirs.pop()
    members: dict[str, bytes] = {}
    for f in files:
        if f.parts[0] == ".." or "__pycache__" in f.parts or f.suffix == ".pyc":
            continue  # scripts (rebuilt from entry_points.txt) and compiled caches
        if f.parts[0] == info_dir and f.name in _SKIPPED_METADATA:
            continue
        path = Path(dist.locate_file(f))
        try:
            members[f.as_posix()] = path.read_bytes()
        except OSError as exc:
            raise EnvironmentProblem(f"cannot read {path} of {name} to ship it: {exc}") from exc
    wheel_meta = members.get(f"{info_dir}/WHEEL", b"").decode(errors="replace")
    tags = re.findall(r"^Tag:\s*(\S+)", wheel_meta, flags=re.M)
    if not tags:
        raise EnvironmentProblem(f"{name} {dist.version} has no WHEEL tag; it cannot be "
                                 "shipped as a wheel")
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path in sorted(members):
        writer.writerow([path, _record_hash(members[path]), len(members[path])])
    writer.writerow([f"{info_dir}/RECORD", "", ""])
    members[f"{info_dir}/RECORD"] = record.getvalue().encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        # dist-info last, as the wheel format recommends.
        for path in sorted(members, key=lambda p: (p.startswith(info_dir), p)):
            zf.writestr(zipfile.ZipInfo(path, _EPOCH), members[path])
    return _wheel_name(name, dist.version, tags[0]), buffer.getvalue()


def build_editable_wheel(dist: importlib.metadata.Distribution) -> tuple[str, bytes]:
    """A wheel built now from the project folder of an editable install."""
    name = dist.metadata["Name"]
    info = json.loads(dist.read_text("direct_url.json") or "{}")
    url = str(info.get("url", ""))
    project = Path(url.removeprefix("file://"))
    if not url.startswith("file://") or not project.is_dir():
        raise EnvironmentProblem(f"the project of the editable install of {name} ({url}) is "
                                 "not a folder here; it cannot be built for the workers")
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}  # reproducible zip times
        done = subprocess.run([uv_binary(), "build", "--wheel", "--quiet", "--out-dir", out,
                               str(project)], capture_output=True, text=True, env=env,
                              timeout=600)
        built = sorted(Path(out).glob("*.whl"))
        if done.returncode != 0 or len(built) != 1:
            raise EnvironmentProblem(f"building a wheel of the editable {name} from {project} "
                                     f"failed: {done.stderr.strip()[-800:]}")
        return built[0].name, built[0].read_bytes()


def uv_binary() -> str:
    """The uv program (from the ``uv`` package Parallex depends on)."""
    try:
        import uv
    except ImportError as exc:
        raise EnvironmentProblem("uv is not installed: pip install uv") from exc
    return uv.find_uv_bin()


def fixed_mismatch(spec: EnvironmentSpec, served: dict[str, str], where: str) -> str | None:
    """Why a `fixed` environment (``served``: python, dask, distributed versions) cannot run
    a cluster of ``spec``, naming both sides' versions; None when it can."""
    wanted = {"python": spec.python, **{n: v for n, v in spec.versions().items() if n in CORE}}
    differ = [k for k in ("python", *CORE) if k in wanted and served.get(k) != wanted[k]]
    if not differ:
        return None
    mine = ", ".join(f"{k} {wanted[k]}" for k in differ)
    theirs = ", ".join(f"{k} {served.get(k) or 'none'}" for k in differ)
    return (f"{where} runs a fixed environment with {theirs}; this cluster needs {mine}. "
            "Use a notebook environment with those versions, or labs whose agents build "
            "environments")
