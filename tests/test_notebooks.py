"""The walkthrough notebooks run from top to bottom, headless (their own cells assert what they show), and are
committed without outputs. Without TOOLRL_RUN each says that it builds a planted pair; with TOOLRL_RUN written as
the README writes it (relative to the repository, while Jupyter runs the kernel in notebooks/), each reads the run."""

from pathlib import Path

import nbformat
import pytest
from conftest import TINY, tiny_chain_base
from nbclient import NotebookClient

from toolrl_analysis.errors import UserError
from toolrl_analysis.report.find_run import notebook_run

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(path: Path, cwd: Path) -> str:
    """Run the notebook with its kernel in `cwd`; every text it printed, after checking no cell failed."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots rendered inline
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def test_there_are_notebooks_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "ablation.ipynb",
        "context_probes.ipynb",
        "layerwise_diff.ipynb",
        "update_geometry.ipynb",
    ]
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert not [c for c in cells if c.get("outputs") or c.get("execution_count")], path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_without_a_run_a_notebook_says_it_builds_a_planted_pair(path, tmp_path, monkeypatch):
    monkeypatch.delenv("TOOLRL_RUN", raising=False)
    assert "TOOLRL_RUN is not set: this notebook builds a planted pair" in execute(path, tmp_path)


@pytest.fixture(scope="module")
def repository_with_a_run(tmp_path_factory):
    """A tree shaped like a clone after `make reproduce`: notebooks/ and runs/embedded/ (a TINY chain)."""
    from toolrl_analysis.reproduce import reproduce

    root = tmp_path_factory.mktemp("clone")
    (root / "notebooks").mkdir()
    base = tiny_chain_base(root)
    reproduce(root / "runs" / "embedded", quick=True, base=str(base), overrides=TINY, log=lambda _: None)
    return root


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_with_toolrl_run_as_the_readme_writes_it_a_notebook_reads_the_run(
    path, repository_with_a_run, monkeypatch
):
    monkeypatch.setenv("TOOLRL_RUN", "runs/embedded")
    text = execute(path, repository_with_a_run / "notebooks")
    assert f"reading the run in {(repository_with_a_run / 'runs' / 'embedded').resolve()}" in text
    assert "planted pair" not in text
    if path.name == "context_probes.ipynb":
        assert "verdict: " in text  # the report's verdict, as report.md states it


def test_a_run_that_is_not_there_stops_the_notebook_with_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLRL_RUN", "runs/nowhere")
    with pytest.raises(UserError, match="TOOLRL_RUN=runs/nowhere: no ablate/variants.csv in"):
        notebook_run("ablate/variants.csv", start=tmp_path / "notebooks")
