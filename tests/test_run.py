"""The papermill harness itself: profiles, notebook selection, failure reports."""

import json

import nbformat
import pytest

from helpers import run as run_module
from helpers.__main__ import main
from helpers.profiles import parameters_for, resolve_profile


def write_notebook(path, sources, parameters_cell=0):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.cells[parameters_cell].metadata["tags"] = ["parameters"]
    nbformat.write(nb, path)


@pytest.fixture
def notebooks_dir(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setattr(run_module, "NOTEBOOKS_DIR", folder)
    return folder


def test_profiles():
    assert parameters_for("02", "smoke")["MODEL"] == "toy"
    assert parameters_for("02", "smoke")["PROFILE"] == "smoke"
    assert parameters_for("02", "gpu")["MODEL"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve_profile("auto") == "cpu"  # no CUDA and no hub here
    with pytest.raises(ValueError, match="profile='fast' is unknown"):
        resolve_profile("fast")


def test_a_failing_notebook_names_the_failing_cell(notebooks_dir, tmp_path):
    write_notebook(
        notebooks_dir / "98_fails.ipynb",
        ["PROFILE = 'cpu'", "x = 1", "raise ValueError('height=100 is not a multiple of 8')"],
    )
    runs = run_module.run_series("smoke", out_dir=tmp_path / "out")
    assert runs[0].status == "failed"
    assert "raise ValueError" in runs[0].error and "height=100 is not a multiple of 8" in runs[0].error
    assert "98_fails failed at cell" in run_module.summary_table(runs)


def test_parameters_reach_the_notebook_and_results_are_collected(notebooks_dir, tmp_path):
    write_notebook(
        notebooks_dir / "97_echo.ipynb",
        [
            "PROFILE = 'cpu'\nMODEL = 'auto'",
            "from helpers.results import record_results\n"
            "record_results('97_echo', {'summary': {'model': MODEL, 'profile': PROFILE}})",
        ],
    )
    out_dir = tmp_path / "out"
    assert main(["run", "--profile", "smoke", "--only", "97", "--outputs", str(out_dir)]) == 0
    recorded = json.loads((out_dir / "97_echo.json").read_text())
    assert recorded["summary"] == {"model": "toy", "profile": "smoke"}
    assert (out_dir / "97_echo.ipynb").exists()


def test_a_notebook_that_records_nothing_fails(notebooks_dir, tmp_path):
    write_notebook(notebooks_dir / "96_silent.ipynb", ["PROFILE = 'cpu'", "pass"])
    runs = run_module.run_series("smoke", out_dir=tmp_path / "out")
    assert runs[0].status == "failed" and "recorded no outputs/96_*.json" in runs[0].error


def test_unknown_notebook_is_a_clear_error(notebooks_dir):
    with pytest.raises(ValueError, match="no such notebook"):
        run_module.find_notebooks(["42"])


def test_notebooks_are_committed_clean_with_one_parameters_cell():
    """Stored without outputs; exactly one cell tagged `parameters` (papermill injects after it)."""
    notebooks = run_module.find_notebooks()
    assert notebooks, "no notebooks found"
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} has {len(tagged)} parameters cells"
        assert "MODEL" in tagged[0].source or path.name.startswith("01"), f"{path.name}: MODEL is not a parameter"
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "starts with an H1 title"
