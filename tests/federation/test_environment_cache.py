"""The agent's environment cache on its own (real uv, a package index in a folder, shipped
wheels; no broker): what it adds to the agent's environment, that the user's own code stays
out of the shared environments, the cap on its disk, eviction, damaged wheels and the
refusals of a fixed agent."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from federation.environment import (
    EnvironmentProblem,
    EnvironmentSpec,
    Package,
    core_versions,
    describe,
)
from federation.environment_cache import EnvironmentCache, Prepared, install_private
from tests.utils.environments import make_index, make_wheel


def _spec(tmp: Path, index: list[str] = (), shipped: list[tuple[str, str]] = ()
          ) -> tuple[EnvironmentSpec, dict[str, bytes]]:
    """The agent's own packages plus ``index`` packages (version 1.0, on the test's index)
    and ``shipped`` ones (name, module source) as the user's wheels."""
    spec, _ = describe(build_editable=False)
    spec.packages += [Package(name, "1.0") for name in index]
    data = {}
    for name, source in shipped:
        path = make_wheel(tmp / "dist", name, "1.0", source)
        blob = path.read_bytes()
        sha = hashlib.sha256(blob).hexdigest()
        data[sha] = blob
        spec.packages.append(Package(name, "1.0", "local", sha, path.name))
    return spec, data


def _prepare(cache: EnvironmentCache, spec: EnvironmentSpec, data: dict[str, bytes],
             steps: list | None = None) -> Prepared:
    async def fetch(package: Package) -> bytes:
        return data[package.sha256]

    async def progress(done: int, total: int) -> None:
        if steps is not None:
            steps.append((done, total))

    return asyncio.run(cache.prepare(spec, fetch, progress))


@pytest.fixture
def index(tmp_path) -> str:
    return make_index(tmp_path / "index", [(f"px-{n}", "1.0", f"X = {i}\n") for i, n in
                                           enumerate(["one", "two", "aaa", "bbb", "ccc"])])


def test_a_build_adds_only_what_differs_and_keeps_the_users_code_out_of_it(tmp_path, index):
    cache = EnvironmentCache(tmp_path / "envs", indexes=(index,), where="m1 (lab a)")
    own, _ = _spec(tmp_path)
    assert cache.missing(own) == [] and _prepare(cache, own, {}) == Prepared(sys.executable)
    spec, data = _spec(tmp_path, ["px-one", "px-two"], [("px-mine", "SECRET = 3\n")])
    assert [p.name for p in cache.missing(spec)] == ["px-one", "px-two", "px-mine"]
    steps: list = []
    prepared = _prepare(cache, spec, data, steps)
    assert steps[0] == (0, 2) and steps[-1] == (2, 2)  # the index packages, in steps
    shared = tmp_path / "envs" / prepared.key
    assert prepared.python == str(shared / "bin" / "python")
    # The user's wheel is kept where only the agent reads it, never in the shared one.
    (wheel,) = prepared.private_wheels
    assert stat.S_IMODE(os.stat(Path(wheel).parent.parent).st_mode) == 0o700
    assert not list(shared.rglob("px_mine*"))
    lease_packages = tmp_path / "lease" / "packages"
    install_private(prepared.python, list(prepared.private_wheels), lease_packages)
    out = subprocess.run([prepared.python, "-c", "import px_one, px_two, px_mine, dask, "
                          "federation; print(px_one.X + px_two.X + px_mine.SECRET)"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(lease_packages)})
    assert out.stdout.strip() == "4", out.stderr
    assert cache.warm() == [spec.hash, own.hash]  # most recently served first
    again: list = []
    assert _prepare(cache, spec, data, again) == prepared and again == []  # no second build
    assert len((tmp_path / "envs" / "builds.log").read_text().splitlines()) == 1
    # Another user with the same index packages but other code shares the built environment.
    other, other_data = _spec(tmp_path, ["px-one", "px-two"], [("px-theirs", "Y = 1\n")])
    assert _prepare(cache, other, other_data).key == prepared.key
    assert len((tmp_path / "envs" / "builds.log").read_text().splitlines()) == 1


def test_the_cache_cap_refuses_what_never_fits_and_evicts_the_least_recently_used(
        tmp_path, index):
    spec_a, _ = _spec(tmp_path, ["px-aaa"])
    spec_b, _ = _spec(tmp_path, ["px-bbb"])
    tiny = EnvironmentCache(tmp_path / "tiny", indexes=(index,), max_bytes=1024,
                            where="m1 (lab a)")
    with pytest.raises(EnvironmentProblem, match=r"needs .* on m1 \(lab a\), more than the "
                                                 r"lab's cap .* \(0 MiB\)"):
        _prepare(tiny, spec_a, {})
    assert tiny.warm() == [] and not list((tmp_path / "tiny").glob("*/.ready"))

    probe = EnvironmentCache(tmp_path / "probe", indexes=(index,))
    one = int((tmp_path / "probe" / _prepare(probe, spec_a, {}).key / ".ready").read_text())
    cache = EnvironmentCache(tmp_path / "envs", indexes=(index,), max_bytes=int(one * 1.5))
    key_a = _prepare(cache, spec_a, {}).key
    cache.in_use[key_a] = {"ls-lease-a"}  # a running lease keeps it
    _prepare(cache, spec_b, {})
    assert set(cache.warm()) == {spec_a.hash, spec_b.hash}
    cache.in_use.clear()
    spec_c, _ = _spec(tmp_path, ["px-ccc"])
    _prepare(cache, spec_c, {})
    assert cache.warm() == [spec_c.hash]


def test_a_damaged_wheel_or_a_missing_package_fails_with_the_reason(tmp_path, index):
    spec, data = _spec(tmp_path, shipped=[("px-mine", "X = 1\n")])
    damaged = {sha: blob + b"x" for sha, blob in data.items()}
    cache = EnvironmentCache(tmp_path / "envs", indexes=(index,), where="m1 (lab a)")
    with pytest.raises(EnvironmentProblem, match="px-mine 1.0 arrived damaged"):
        _prepare(cache, spec, damaged)
    spec.packages.append(Package("px-not-anywhere", "9.9"))
    with pytest.raises(EnvironmentProblem) as refused:
        _prepare(cache, spec, data)
    assert "px-not-anywhere" in str(refused.value) and "m1 (lab a)" in str(refused.value)
    assert index in str(refused.value) and cache.warm() == []


def test_a_fixed_agent_serves_only_its_own_versions(tmp_path):
    fixed = EnvironmentCache(tmp_path / "envs", mode="fixed", where="m1 (lab a)")
    own, _ = _spec(tmp_path)
    assert fixed.refusal(own) is None and _prepare(fixed, own, {}) == Prepared(sys.executable)
    other = EnvironmentSpec(own.python, [Package("dask", "2023.1.0"),
                                         Package("distributed", "2023.1.0")])
    why = fixed.refusal(other)
    mine = core_versions()
    assert why.startswith(f"m1 (lab a) runs a fixed environment with dask {mine['dask']}, "
                          f"distributed {mine['distributed']}; this cluster needs dask "
                          "2023.1.0, distributed 2023.1.0"), why
    with pytest.raises(EnvironmentProblem, match="fixed environment"):
        _prepare(fixed, other, {})
    older = EnvironmentSpec("3.9", own.packages)
    assert "needs Python 3.9" in EnvironmentCache(tmp_path / "b").refusal(older)
    with pytest.raises(ValueError, match="build"):
        EnvironmentCache(tmp_path / "c", mode="conda")
