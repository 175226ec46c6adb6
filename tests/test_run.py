"""The papermill harness itself: profiles, notebook selection, failure reports."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from helpers.__main__ import main
from helpers.series import run as run_module
from helpers.series.profiles import notebook_number, parameters_for, resolve_profile


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


def test_the_full_profile_keeps_every_measurement_the_cpu_default_trims():
    """`cpu` (the parameters cells) trims 03 and 07 to fit ten minutes; `full` puts back every rung, step count and
    repeat, and prices every rung on every prompt."""
    from helpers.series.settings import notebook_defaults

    cpu, full = notebook_defaults("07"), {**notebook_defaults("07"), **parameters_for("07", "full")}
    for knob in ("SCHEDULER_RUNGS", "STEP_RUNGS", "OPTIMISATION_RUNGS", "COMBINED_RUNGS"):
        assert set(cpu[knob]) < set(full[knob]), f"full must hold every {knob} of cpu, and more"
    assert {"compile", "fp16", "half", "tome", "openvino + bf16"} <= set(full["OPTIMISATION_RUNGS"])
    assert full["EQUALITY_IMAGES"] == 0 < cpu["EQUALITY_IMAGES"], "full prices every rung on every prompt"
    assert full["HEAD_TO_HEAD_ROUNDS"] > cpu["HEAD_TO_HEAD_ROUNDS"] and full["FINALISTS"] > cpu["FINALISTS"]
    cpu, full = notebook_defaults("03"), {**notebook_defaults("03"), **parameters_for("03", "full")}
    assert cpu["N"] == full["N"] == 128, "N = 128 in both: the mission's size"
    for knob in ("STEPS", "REPEATS", "MIN_RUN_S", "LOAD_REPEATS"):
        assert full[knob] > cpu[knob], knob
    assert full["SWEEP_MAX"] == 0 and 0 < cpu["SWEEP_MAX"] < cpu["N"], "full sweeps to N"


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
            "from helpers.core.results import record_results\n"
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


def test_progress_report_and_run_record(notebooks_dir, tmp_path, capsys):
    """A log (not a terminal) gets one line per section with i of n and an estimate from the last run's
    duration; run.json holds each notebook's seconds and the total; index.html links each notebook's HTML, shows
    its main figure and key numbers, and a failed one's failing cell and error."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("PROFILE = 'cpu'"), nbformat.v4.new_markdown_cell("## Drawing a square"),
                nbformat.v4.new_code_cell(
                    "import matplotlib.pyplot as plt\nfrom helpers.core.results import record_results\n"
                    "plt.plot([0, 1], [0, 1]); plt.show()\nrecord_results('95_draws', {'summary': {'side': 2}})")]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, notebooks_dir / "95_draws.ipynb")
    write_notebook(notebooks_dir / "96_fails.ipynb", ["PROFILE = 'cpu'", "raise KeyError('no such prompt')"])
    out = tmp_path / "out"
    run_module.run_series("smoke", out_dir=out)
    first = capsys.readouterr().out
    assert "[1/2] 95_draws · Drawing a square" in first and "no earlier run to estimate from" in first
    record = json.loads((out / "run.json").read_text())
    assert record["profile"] == "smoke" and record["notebooks"]["96_fails"]["status"] == "failed"
    assert record["total_seconds"] >= record["notebooks"]["95_draws"]["seconds"] > 0
    assert json.loads((out / "95_draws.json").read_text())["run_seconds"] > 0
    page = (out / "index.html").read_text()
    assert 'href="html/95_draws.html"' in page and (out / "html" / "95_draws.html").exists()
    assert 'src="html/95_draws_figure.png"' in page and (out / "html" / "95_draws_figure.png").stat().st_size > 1000
    assert "side=2" in page and "KeyError: &#x27;no such prompt&#x27;" in page
    assert "raise KeyError(&#x27;no such prompt&#x27;)" in page  # the failing cell's source
    run_module.run_series("smoke", only=["95"], out_dir=out)
    assert "left" in capsys.readouterr().out.split("no earlier run")[0]  # estimated from run.json now


def test_the_summary_wraps_key_numbers_to_the_width():
    runs = [run_module.NotebookRun("03_batching", "ok", 12.0,
                                   results={"r": {"summary": {f"number_{i}": i / 3 for i in range(12)}}})]
    text = run_module.summary_table(runs, width=60)
    assert all(len(line) <= 60 for line in text.splitlines()[3:]) and "number_11=3.667" in text


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


def test_every_notebook_has_its_smoke_run_tested_in_its_own_file():
    """The layout of the notebook tests: tests/test_nbNN.py runs notebook NN in the smoke profile (and checks what it
    recorded); unit tests of a module live in the module's test file. A new notebook without one fails here."""
    tests_dir = Path(__file__).parent
    for path in run_module.find_notebooks():
        number = notebook_number(path.name)
        test_file = tests_dir / f"test_nb{number}.py"
        assert test_file.exists(), f"{path.name}: no {test_file.name}"
        runs = re.search(rf'notebook_results\("{number}"\)|def test_\w+\(r\b', test_file.read_text())
        assert runs, f"{test_file.name} does not run {path.name} (the `r` fixture or notebook_results)"
