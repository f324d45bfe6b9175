"""Software environments (issue 15): what a student installs in the notebook is on the
workers; a lab's agent builds it once and reuses it; what cannot be built or run is refused
with the package or the versions named, before anything is billed.

The notebooks here run in an environment of their own (tests.utils.environments): the
agents' environment lacks what the notebook installs, as on a real federation.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from prometheus_client.parser import text_string_to_metric_families

from federation import errors
from federation.cluster import FederatedCluster
from federation.environment import core_versions, describe, uv_binary
from federation.ports import free_port
from tests.utils.environments import (
    fake_distribution,
    make_index,
    make_wheel,
    notebook_environment,
)
from tests.utils.federation import api_client, make_federation
from tests.utils.kernels import run
from tests.utils.procs import wait_until

PROBE = "def answer():\n    return 42\n"


@pytest.fixture
def two_labs(tmp_path):
    """alice in lab-a, which has no machine; lab-b's agent (added by each test) serves her,
    so every running second of her workers would be charged to lab-a."""
    fed = make_federation(tmp_path, provider_timeout=10, cluster_timeout=20)
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_lab("lab-b", user="bob")
        yield fed
    finally:
        fed.stop()


def _kernel(tmp: Path, python: Path) -> KernelManager:
    """The Parallex kernel started from the notebook environment's ``python``."""
    folder = tmp / "kernels" / "parallex-nb"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "parallex_kernel", "-f", "{connection_file}"],
        "display_name": "Parallex (notebook environment)", "language": "python"}))
    km = KernelManager(kernel_name="parallex-nb",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]))
    return km


def _run_kernel(tmp: Path, python: Path, fed, cells: list[str]) -> list:
    km = _kernel(tmp, python)
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("PARALLEX_") and k != "JUPYTERHUB_API_TOKEN"}
    km.start_kernel(env={**clean, "PARALLEX_BROKER_URL": fed.url,
                         "PARALLEX_TOKEN": fed.user_tokens["alice"]})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        return [run(kc, cell, timeout=240) for cell in cells]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


COMPUTE = textwrap.dedent("""\
    import dask
    from distributed import get_worker

    def probe(i):
        import parallex_probe, px_shared
        return parallex_probe.answer() + px_shared.X + i, get_worker().name

    print(dask.compute(*[dask.delayed(probe)(i) for i in range(3)]))
""")


def test_a_package_installed_in_the_notebook_reaches_the_workers_and_is_built_once(
        two_labs, tmp_path):
    fed = two_labs
    # lab-b's package index (a folder here) has px-shared, which its agent lacks.
    index = tmp_path / "lab-b-index"
    make_index(index, [("px-shared", "1.0", "X = 100\n")])
    metrics_port = free_port()
    fed.add_agent("lab-b", "agent-b", cpus=2, extra=("--package-index", index.as_uri(),
                                                     "--metrics-port", str(metrics_port)))
    wheel = make_wheel(tmp_path / "dist", "parallex-probe", "0.1", PROBE)
    python = notebook_environment(tmp_path / "nb-env")

    # The journey: the kernel starts (and its pool with it), the student installs a package
    # from the index and one of their own (a local wheel) in a cell, then uses them in tasks.
    ready, install, compute = _run_kernel(tmp_path / "k1", python, fed, [
        "parallex_pool.ready.wait(60)\nprint(parallex_pool.state)",
        f"%pip install --quiet --no-deps --no-index --find-links {index / 'px-shared'} "
        f"px-shared==1.0 {wheel}",
        COMPUTE])
    assert ready.stdout.strip() == "ready", ready.stdout + ready.stderr  # described before
    assert install.status == "ok", install.error + install.stderr
    assert compute.status == "ok", compute.error + compute.stderr
    results = eval(compute.stdout.strip())  # noqa: S307 - our own cell's printed tuple
    assert [r[0] for r in results] == [142, 143, 144]
    assert all(r[1].startswith("ls-") for r in results), results  # ran on pool workers
    assert "your packages changed" in compute.stderr, compute.stderr

    # Built once on lab-b's machine with only what the agent lacks from the index; the
    # student's own package is in no shared environment (it goes to each lease's folder).
    cache = fed.workdirs["agent-b"] / "environments"
    builds = (cache / "builds.log").read_text().splitlines()
    assert len(builds) == 1 and " 1 packages " in builds[0], builds
    assert (cache / builds[0].split()[1] / ".ready").exists()
    assert not [p for p in cache.rglob("parallex_probe*") if ".private" not in p.parts]
    (kept,) = (cache / ".private").glob("*/parallex_probe-0.1-*.whl")  # fetched once, kept
    fetched = kept.stat().st_mtime_ns
    # What the lab's administrators scrape from the agent.
    metrics = {(m.name, tuple(sorted(m.labels.items()))): m.value
               for family in text_string_to_metric_families(httpx.get(
                   f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)
               for m in family.samples}
    assert metrics[("parallex_agent_environment_builds_total", (("outcome", "built"),))] == 1
    assert metrics[("parallex_agent_environments_ready", ())] == 1
    assert metrics[("parallex_agent_environments_bytes", ())] > 0
    digest = fed.db_value("SELECT environment FROM cluster ORDER BY created_at DESC LIMIT 1")
    # The agent tells the broker which environments it holds (placement prefers them).
    wait_until(lambda: digest in json.loads(fed.db_value(
        "SELECT environments_json FROM provider WHERE name = 'agent-b'")), 30,
        "agent-b to report its built environment")
    # The package is not in the agent's environment: only the built one has it.
    agent_python = subprocess.run([sys.executable, "-c", "import parallex_probe"],
                                  capture_output=True, cwd=tmp_path)
    assert agent_python.returncode != 0

    # Next day: a new kernel with the same packages starts its workers with no build.
    (compute_again,) = _run_kernel(tmp_path / "k2", python, fed, [
        "import parallex_probe, px_shared\n" + COMPUTE])
    assert compute_again.status == "ok", compute_again.error + compute_again.stderr
    assert [r[0] for r in eval(compute_again.stdout.strip())] == [142, 143, 144]  # noqa: S307
    assert len((cache / "builds.log").read_text().splitlines()) == 1
    assert kept.stat().st_mtime_ns == fetched  # the student's wheel was not fetched again


def _cluster_script(fed, code: str) -> str:
    """A program that starts a FederatedCluster of alice, runs ``code`` and closes it."""
    return ("from federation import errors\n"
            "from federation.cluster import FederatedCluster\n"
            f"cluster = FederatedCluster({fed.url!r}, {fed.user_tokens['alice']!r}, "
            "lease_start_timeout=90)\n"
            "try:\n" + textwrap.indent(code, "    ") + "finally:\n    cluster.close()\n")


def test_an_impossible_environment_is_refused_naming_the_package_and_nothing_is_charged(
        two_labs, tmp_path):
    fed = two_labs
    index = tmp_path / "lab-b-index"  # the only index lab-b allows: it has no packages
    index.mkdir()
    fed.add_agent("lab-b", "agent-b", cpus=2,
                  extra=("--package-index", index.as_uri()))
    python = notebook_environment(tmp_path / "nb-env")
    fake_distribution(python, "parallex-probe-missing", "9.9.9")
    before = fed.balance("lab-a")

    done = subprocess.run([str(python), "-c", _cluster_script(fed, textwrap.dedent("""\
        cluster.scale(1)
        try:
            cluster.wait_for_workers(1)
        except errors.EnvironmentRefused as exc:
            print("REFUSED:", exc)
        try:
            cluster.scale(2)
        except errors.EnvironmentRefused as exc:
            print("SCALE REFUSED:", exc)
    """))], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    refused = next(line for line in done.stdout.splitlines() if line.startswith("REFUSED:"))
    assert "parallex-probe-missing" in refused and "agent-b (lab lab-b)" in refused, refused
    # Once every provider refused it, asking again is refused at once with the reason.
    again = next(line for line in done.stdout.splitlines() if line.startswith("SCALE"))
    assert "parallex-probe-missing" in again, again

    leases = fed.db_dicts("SELECT state, end_reason, started_at, message FROM lease")
    assert leases and all(lease["state"] == "ended" and lease["end_reason"] == "failed"
                          and lease["started_at"] is None for lease in leases), leases
    assert fed.db_value("SELECT count(*) FROM usagerecord") == 0
    assert fed.balance("lab-a") == before
    assert fed.db_value("SELECT count(*) FROM environment_failure") == 1
    # Its agent registering again (the lab changed its index, say) makes it try again.
    with api_client(fed, fed.provider_tokens["lab-b"]) as agent:
        again = agent.post("/agent/register", json={
            "name": "agent-b", "cpus": 2, "memory": 4 * 2**30,
            "environment": {"mode": "build", **core_versions()}})
        assert again.status_code == 201, again.text
    assert fed.db_value("SELECT count(*) FROM environment_failure") == 0


def test_a_fixed_agent_refuses_a_cluster_with_another_dask_naming_the_versions(
        two_labs, tmp_path):
    fed = two_labs
    fed.add_agent("lab-b", "agent-b", cpus=2, extra=("--environment", "fixed"))
    python = notebook_environment(tmp_path / "nb-env")
    fake_distribution(python, "dask", "2023.1.0")
    done = subprocess.run([str(python), "-c", _cluster_script(fed, textwrap.dedent("""\
        try:
            cluster.scale(1)
            cluster.wait_for_workers(1, timeout=30)
        except errors.EnvironmentRefused as exc:
            print("REFUSED:", exc)
    """))], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    refused = next(line for line in done.stdout.splitlines() if line.startswith("REFUSED:"))
    ours = core_versions()["dask"]
    assert f"dask {ours}" in refused and "dask 2023.1.0" in refused, refused
    assert "agent-b (lab lab-b)" in refused and "fixed" in refused, refused
    assert fed.db_value("SELECT count(*) FROM lease") == 0  # refused before any lease
    # The lab's PI sees how each machine provides environments.
    done = subprocess.run([sys.executable, "-m", "federation.cli", "lab", "machines",
                           "--broker", fed.url, "--token", fed.admin_token, "--lab", "lab-b"],
                          capture_output=True, text=True, timeout=60)
    assert f"fixed: Python {core_versions()['python']}, dask {ours}" in done.stdout, (
        done.stdout + done.stderr)

    # The same agent serves a cluster whose versions match (this interpreter's).
    with FederatedCluster(fed.url, fed.user_tokens["alice"], lease_start_timeout=90) as c:
        c.scale(1)
        c.wait_for_workers(1)


def test_a_starting_workers_progress_is_shown_by_wait_for_workers(two_labs, capsys):
    """The words an agent reports while it builds reach the user: cluster.progress() (what
    %parallex and the widget show) and wait_for_workers' lines. The agent's side is spoken
    here over its real API, so the build's timing does not decide what the test sees."""
    fed = two_labs
    agent = api_client(fed, fed.provider_tokens["lab-b"])
    provider = agent.post("/agent/register", json={
        "name": "slow-builder", "cpus": 2, "memory": 4 * 2**30,
        "environment": {"mode": "build", **core_versions()}}).json()["provider_id"]
    try:
        with FederatedCluster(fed.url, fed.user_tokens["alice"]) as cluster:
            cluster.scale(1)
            wait_until(lambda: agent.get(f"/agent/{provider}/leases").json()["leases"], 30,
                       "the lease to be placed on slow-builder")
            lease = agent.get(f"/agent/{provider}/leases").json()["leases"][0]
            assert len(lease["environment"]) == 32  # the cluster described its packages
            spec = agent.get(f"/agent/{provider}/environments/{lease['environment']}").json()
            assert spec["python"] == core_versions()["python"]
            assert {p["name"] for p in spec["packages"]} >= {"dask", "distributed"}
            words = "building the environment on slow-builder (37 of 112 packages)"
            answer = agent.post(f"/agent/{provider}/leases/{lease['id']}/state",
                                json={"state": "starting", "message": words})
            assert answer.status_code == 200, answer.text
            with pytest.raises(errors.LeaseStartTimeout):
                cluster.wait_for_workers(1, timeout=3)
            assert cluster.progress() == [words]
            assert f"Parallex: {words}" in capsys.readouterr().err
            assert words in cluster._repr_html_() or words in cluster._scaling_status()
    finally:
        agent.post(f"/agent/{provider}/offline")
        agent.close()


def test_local_packages_ship_as_reproducible_wheels(tmp_path):
    """A locally installed package is described by the SHA-256 of a wheel packed from its
    installed files; packing again gives the same bytes, and the wheel installs and works."""
    wheel = make_wheel(tmp_path / "dist", "parallex-probe", "0.1", PROBE)
    python = notebook_environment(tmp_path / "nb-env")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    code = ("import json, hashlib\n"
            "from federation.environment import describe\n"
            "a, wheels = describe(build_editable=False)\n"
            "b, _ = describe(build_editable=False)\n"
            "p = [p for p in a.packages if p.name == 'parallex-probe'][0]\n"
            "open('shipped.whl', 'wb').write(wheels[p.sha256][1])\n"
            "print(json.dumps([p.source, p.filename, a.hash == b.hash,\n"
            "                  hashlib.sha256(wheels[p.sha256][1]).hexdigest() == p.sha256]))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert json.loads(out.stdout) == ["local", "parallex_probe-0.1-py3-none-any.whl", True, True]
    other = notebook_environment(tmp_path / "other-env")
    shipped = tmp_path / "parallex_probe-0.1-py3-none-any.whl"
    (tmp_path / "shipped.whl").rename(shipped)
    subprocess.run([str(other), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(shipped)], check=True)
    works = subprocess.run([str(other), "-c", "import parallex_probe; "
                            "print(parallex_probe.answer())"], capture_output=True, text=True)
    assert works.stdout.strip() == "42", works.stderr
    # What the operating system installed (no INSTALLER record) comes from the labs' own
    # systems, not from an index: it is not described.
    fake_distribution(python, "python-apt", "2.6.0", installer=None)
    # A package installed from git is shipped like a local one (the lab may not reach it).
    fake_distribution(python, "from-git", "0.3", direct_url={
        "url": "https://git.example.edu/lab/from-git.git",
        "vcs_info": {"vcs": "git", "commit_id": "0" * 40}})
    listed = subprocess.run([str(python), "-c", "from federation.environment import describe; "
                             "print({p.name: p.source for p in describe(False)[0].packages})"],
                            capture_output=True, text=True, check=True).stdout
    assert "'parallex-probe': 'local'" in listed and "'from-git': 'git'" in listed, listed
    assert "python-apt" not in listed
    # This interpreter (the agents') does not have it: its description lists no such package.
    spec, _ = describe(build_editable=False)
    assert "parallex-probe" not in spec.versions()


def test_environment_requests_are_checked(two_labs):
    """Bad descriptions, damaged or oversized wheels and other users' environments get a 4xx
    with a message, and a provider reads only what its leases need."""
    fed = two_labs
    alice = api_client(fed, fed.user_tokens["alice"])
    agent = api_client(fed, fed.provider_tokens["lab-b"])
    try:
        bad = alice.post("/environments", json={"python": "3.11", "packages": [
            {"name": "x", "version": "1", "source": "local"}]})
        assert bad.status_code == 422 and "sha256" in bad.text
        twice = alice.post("/environments", json={"python": "3.11", "packages": [
            {"name": "x", "version": "1"}, {"name": "x", "version": "2"}]})
        assert twice.status_code == 422 and "once" in twice.text
        assert alice.post("/environments", json={"python": "2.7", "packages": []}
                          ).status_code == 422
        data = b"PK not really a wheel"
        sha = hashlib.sha256(data).hexdigest()
        spec = {"python": "3.11", "packages": [{"name": "mine", "version": "1",
                                                "source": "local", "sha256": sha,
                                                "filename": "mine-1-py3-none-any.whl"}]}
        described = alice.post("/environments", json=spec).json()
        assert described["missing_wheels"] == [sha]
        # A cluster cannot name it until its wheel is there.
        cluster = alice.post("/clusters", json={
            "scheduler_address": "tls://127.0.0.1:1", "ca_cert": "x",
            "environment": described["hash"]})
        assert cluster.status_code in (409, 422), cluster.text
        damaged = alice.put(f"/environments/wheels/{sha}",
                            params={"filename": "mine-1-py3-none-any.whl"}, content=b"other")
        assert damaged.status_code == 422 and "SHA-256" in damaged.text
        assert alice.put(f"/environments/wheels/{sha}", params={"filename": "../../x.whl"},
                         content=data).status_code == 422
        assert alice.put(f"/environments/wheels/{sha}",
                         params={"filename": "mine-1-py3-none-any.whl"},
                         content=data).status_code == 201
        assert alice.post("/environments", json=spec).json() == {
            "hash": described["hash"], "missing_wheels": []}
        # Nobody without a token; a provider with no lease of it reads nothing of it.
        assert api_client(fed, "px_wrong").post("/environments", json=spec).status_code == 401
        provider = agent.post("/agent/register", json={
            "name": "m", "cpus": 1, "memory": 2**30}).json()["provider_id"]
        assert agent.get(f"/agent/{provider}/environments/{described['hash']}"
                         ).status_code == 404
        assert agent.get(f"/agent/{provider}/environments/{described['hash']}/wheels/{sha}"
                         ).status_code == 404
        agent.post(f"/agent/{provider}/offline")
    finally:
        alice.close()
        agent.close()


def test_a_cluster_can_run_in_the_agents_own_environment(two_labs):
    """environment='agent' describes nothing: the workers run what the lab's agent has."""
    fed = two_labs
    fed.add_agent("lab-b", "agent-b", cpus=2)
    with FederatedCluster(fed.url, fed.user_tokens["alice"], environment="agent") as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1)
    assert fed.db_value("SELECT count(*) FROM environment") == 0
    with pytest.raises(ValueError, match="'notebook'"):
        FederatedCluster(fed.url, fed.user_tokens["alice"], environment="conda")


def test_an_editable_package_ships_as_a_wheel_built_from_its_project(tmp_path):
    """`pip install -e` leaves the files in the project: the cluster builds a wheel of it
    (uv build; its build backend comes from the package index), the same bytes each time
    while nothing changes, and a new wheel (a new environment) once the code is edited."""
    project = tmp_path / "proj"
    (project / "src" / "pxedit").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = '
        '"setuptools.build_meta"\n[project]\nname = "pxedit"\nversion = "0.2"\n')
    module = project / "src" / "pxedit" / "__init__.py"
    module.write_text("VALUE = 7\n")
    python = notebook_environment(tmp_path / "nb-env")
    subprocess.run([uv_binary(), "pip", "install", "--quiet", "--python", str(python), "-e",
                    str(project)], check=True)
    code = ("import json\n"
            "from federation.environment import describe\n"
            "a, wheels = describe()\n"
            "b, _ = describe()\n"
            "p = [p for p in a.packages if p.name == 'pxedit'][0]\n"
            "open('pxedit-0.2-py3-none-any.whl', 'wb').write(wheels[p.sha256][1])\n"
            "print(json.dumps([p.source, p.sha256, a.hash == b.hash]))")

    def described() -> list:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    source, sha, stable = described()
    assert source == "editable" and stable
    other = notebook_environment(tmp_path / "other-env")
    subprocess.run([str(other), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(tmp_path / "pxedit-0.2-py3-none-any.whl")], check=True)
    works = subprocess.run([str(other), "-c", "import pxedit; print(pxedit.VALUE)"],
                           capture_output=True, text=True)
    assert works.stdout.strip() == "7", works.stderr
    module.write_text("VALUE = 8\n")
    assert described()[1] != sha


def test_a_federated_cluster_follows_a_package_installed_after_it_started(two_labs, tmp_path):
    """Outside the Parallex kernel too: a script's cluster notices the install within a
    second, new workers get the package, and a task that imports it runs."""
    fed = two_labs
    fed.add_agent("lab-b", "agent-b", cpus=2)
    wheel = make_wheel(tmp_path / "dist", "parallex-probe", "0.1", PROBE)
    python = notebook_environment(tmp_path / "nb-env")
    done = subprocess.run([str(python), "-c", _cluster_script(fed, textwrap.dedent(f"""\
        import subprocess, sys, time
        cluster.scale(1)
        cluster.wait_for_workers(1)
        before = cluster.environment
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-index", {str(wheel)!r}], check=True)
        deadline = time.monotonic() + 30
        while cluster.environment == before and time.monotonic() < deadline:
            cluster.sync(cluster._refresh_state)
        assert cluster.environment != before, "the install was not noticed"
        cluster.wait_for_workers(1)
        client = cluster.get_client()
        print("RESULT", client.submit(lambda: __import__("parallex_probe").answer()).result())
    """))], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RESULT 42" in done.stdout, done.stdout
    assert "your packages changed" in done.stderr
