"""Python environments for the software-environment tests: a notebook's own interpreter that
has what the agents' has plus packages installed in it alone, and small wheels made here
(no package index needed)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from federation.environment import uv_binary


def make_wheel(folder: Path, name: str, version: str, module_source: str) -> Path:
    """A pure-Python wheel of distribution ``name`` holding module ``name`` (underscored)."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": module_source.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: parallex-tests\nRoot-Is-Purelib: "
                         b"true\nTag: py3-none-any\n",
    }
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    record += f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def notebook_environment(folder: Path) -> Path:
    """A virtual environment that sees this interpreter's packages after its own (as the
    agents' environments do); returns its python. Packages installed into it are the
    notebook's alone."""
    subprocess.run([uv_binary(), "venv", "--quiet", "--python", sys.executable, str(folder)],
                   check=True)
    site = next(folder.glob("lib/python*/site-packages"))
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zzz_parallex_tests.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    return folder / "bin" / "python"


def fake_distribution(python: Path, name: str, version: str,
                      installer: str | None = "pip", direct_url: dict | None = None) -> None:
    """Metadata saying ``name`` ``version`` is installed in ``python``'s environment (found
    before the real one), without code: how a notebook with other versions looks to
    Parallex."""
    site = next(python.parent.parent.glob("lib/python*/site-packages"))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if installer is not None:  # None: as the operating system's packages are (no record)
        (info / "INSTALLER").write_text(f"{installer}\n")
    record = f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n"
    if direct_url is not None:  # installed from somewhere else than an index
        (info / "direct_url.json").write_text(json.dumps(direct_url))
        (info / "WHEEL").write_text("Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        record += f"{info.name}/direct_url.json,,\n{info.name}/WHEEL,,\n"
    (info / "RECORD").write_text(record)


def make_index(folder: Path, packages: list[tuple[str, str, str]]) -> str:
    """A package index in ``folder`` (PEP 503 layout, file:// URL returned) serving each
    (name, version, module source) as a wheel."""
    for name, version, source in packages:
        project = folder / name
        wheel = make_wheel(project, name, version, source)
        (project / "index.html").write_text(
            f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>')
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()
