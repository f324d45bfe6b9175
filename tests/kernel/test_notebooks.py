"""The notebooks in notebooks/ run end to end with nbclient on the Parallex kernel against a
local federation."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

from tests.utils.federation import make_federation
from tests.utils.kernels import kernel_specs

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture(scope="module")
def federation_for_notebooks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nbfed")
    fed = make_federation(tmp)
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB")
        yield fed
    finally:
        fed.stop()


def outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "remote.ipynb"])
def test_notebook_runs_end_to_end(federation_for_notebooks, tmp_path, monkeypatch, name):
    fed = federation_for_notebooks
    monkeypatch.setenv("PARALLEX_BROKER_URL", fed.url)
    monkeypatch.setenv("PARALLEX_TOKEN", fed.user_tokens["alice"])
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = KernelManager(kernel_name="parallex", kernel_spec_manager=kernel_specs(tmp_path))
    try:
        NotebookClient(nb, km=km, timeout=180,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    except Exception as exc:
        raise AssertionError(f"{name} failed:\n{outputs(nb)}") from exc
    text = outputs(nb)
    assert "Traceback" not in text
    if name == "quickstart.ipynb":
        assert "(5,) True" in text
        assert "{'north': 24995000, 'south': 25000000}" in text
        assert "workers by lab: {'lab-a':" in text and "4 workers:" in text
        assert "alice (lab-a)" in text
    else:
        assert "working on sample 3" in text
        assert "{'mean': 38.5} 100" in text
        assert "remote model now {'mean': 38.5, 'runs': 1}" in text
        assert text.rstrip().endswith("1")
