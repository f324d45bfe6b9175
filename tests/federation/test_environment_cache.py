"""The agent's environment cache on its own (real uv, shipped wheels, no broker, no index):
what it adds to the agent's environment, the cap on its disk, eviction, damaged wheels and
the refusals of a fixed agent."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from federation.environment import EnvironmentProblem, EnvironmentSpec, Package, core_versions
from federation.environment_cache import EnvironmentCache
from tests.utils.environments import make_wheel


def _spec_with(tmp: Path, *wheels: tuple[str, str]) -> tuple[EnvironmentSpec, dict[str, bytes]]:
    """The agent's own packages plus ``wheels`` (name, module source) shipped as wheels."""
    from federation.environment import describe

    spec, _ = describe(build_editable=False)
    data = {}
    for name, source in wheels:
        path = make_wheel(tmp / "dist", name, "1.0", source)
        blob = path.read_bytes()
        sha = hashlib.sha256(blob).hexdigest()
        data[sha] = blob
        spec.packages.append(Package(name, "1.0", "local", sha, path.name))
    return spec, data


def _prepare(cache: EnvironmentCache, spec: EnvironmentSpec, data: dict[str, bytes],
             steps: list | None = None) -> str:
    async def fetch(package: Package) -> bytes:
        return data[package.sha256]

    async def progress(done: int, total: int) -> None:
        if steps is not None:
            steps.append((done, total))

    return asyncio.run(cache.prepare(spec, fetch, progress))


def test_a_build_adds_only_what_differs_and_is_reused(tmp_path):
    cache = EnvironmentCache(tmp_path / "envs", where="m1 (lab a)")
    own, _ = _spec_with(tmp_path)
    assert cache.missing(own) == [] and _prepare(cache, own, {}) == sys.executable
    spec, data = _spec_with(tmp_path, ("px-one", "X = 1\n"), ("px-two", "X = 2\n"))
    assert [p.name for p in cache.missing(spec)] == ["px-one", "px-two"]
    steps: list = []
    python = _prepare(cache, spec, data, steps)
    assert steps[0] == (0, 2) and steps[-1] == (2, 2)
    out = subprocess.run([python, "-c", "import px_one, px_two, dask, federation; "
                          "print(px_one.X + px_two.X)"], capture_output=True, text=True)
    assert out.stdout.strip() == "3", out.stderr
    assert cache.warm() == [spec.hash]
    again: list = []
    assert _prepare(cache, spec, data, again) == python and again == []  # no second build
    assert len((tmp_path / "envs" / "builds.log").read_text().splitlines()) == 1


def test_the_cache_cap_refuses_what_never_fits_and_evicts_the_least_recently_used(tmp_path):
    spec_a, data_a = _spec_with(tmp_path, ("px-aaa", "A = 1\n"))
    spec_b, data_b = _spec_with(tmp_path, ("px-bbb", "B = 1\n"))
    tiny = EnvironmentCache(tmp_path / "tiny", max_bytes=1024, where="m1 (lab a)")
    with pytest.raises(EnvironmentProblem, match=r"needs .* on m1 \(lab a\), more than the "
                                                 r"lab's cap .* \(0 MiB\)"):
        _prepare(tiny, spec_a, data_a)
    assert tiny.warm() == [] and not (tmp_path / "tiny" / spec_a.hash).exists()

    probe = EnvironmentCache(tmp_path / "probe")
    _prepare(probe, spec_a, data_a)
    one = int((tmp_path / "probe" / spec_a.hash / ".ready").read_text())
    cache = EnvironmentCache(tmp_path / "envs", max_bytes=int(one * 1.5))  # room for one
    _prepare(cache, spec_a, data_a)
    cache.in_use[spec_a.hash] = {"ls-lease-a"}  # a running lease keeps it
    _prepare(cache, spec_b, data_b)
    assert set(cache.warm()) == {spec_a.hash, spec_b.hash}
    cache.in_use.clear()
    spec_c, data_c = _spec_with(tmp_path, ("px-ccc", "C = 1\n"))
    _prepare(cache, spec_c, data_c)
    assert cache.warm()[0] == spec_c.hash and len(cache.warm()) == 1


def test_a_damaged_wheel_or_a_missing_package_fails_the_build_with_the_reason(tmp_path):
    spec, data = _spec_with(tmp_path, ("px-one", "X = 1\n"))
    damaged = {sha: blob + b"x" for sha, blob in data.items()}
    cache = EnvironmentCache(tmp_path / "envs", where="m1 (lab a)")
    with pytest.raises(EnvironmentProblem, match="px-one 1.0 arrived damaged"):
        _prepare(cache, spec, damaged)
    empty = tmp_path / "index"
    empty.mkdir()
    offline = EnvironmentCache(tmp_path / "envs2", indexes=(empty.as_uri(),),
                               where="m1 (lab a)")
    spec.packages.append(Package("px-not-anywhere", "9.9"))
    with pytest.raises(EnvironmentProblem) as refused:
        _prepare(offline, spec, data)
    assert "px-not-anywhere" in str(refused.value) and "m1 (lab a)" in str(refused.value)
    assert offline.warm() == []


def test_a_fixed_agent_serves_only_its_own_versions(tmp_path):
    fixed = EnvironmentCache(tmp_path / "envs", mode="fixed", where="m1 (lab a)")
    own, _ = _spec_with(tmp_path)
    assert fixed.refusal(own) is None and _prepare(fixed, own, {}) == sys.executable
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
