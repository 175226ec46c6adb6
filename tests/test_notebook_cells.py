"""Kaggle/Colab readiness, tested here: each notebook's setup cell is the canonical one from helpers/series/colab.py and
runs offline without installing anything; its parameters cell parses, has Colab forms, and holds every value the
profiles override with a compatible type; its title carries the Open in Colab / Kaggle badges.

`series.colab.update_notebooks("notebooks")` writes the setup cell and badge line into every notebook; the last test
checks on a copy of the folder that after it every check here passes.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
import torch

from helpers.series import colab
from helpers.series.profiles import COMMON, NOTEBOOK_OVERRIDES, notebook_number, parameters_for
from helpers.series.run import find_notebooks

NOTEBOOKS = find_notebooks()
PROFILES = tuple(COMMON)  # smoke, cpu, gpu ("auto" becomes one of them)


def ids(path: Path) -> str:
    return path.stem


# ---------------------------------------------------------------------------------------------------
# Checks, shared by the tests on the real notebooks and on an updated copy


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def parameters_cell(notebook, name: str):
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters', need exactly one"
    return tagged[0]


def check_setup_cell(notebook, name: str) -> None:
    cells = code_cells(notebook)
    assert cells, f"{name} has no code cell"
    assert cells[0].source == colab.setup_cell_source(), (
        f"{name}: the first code cell is not the canonical setup cell; run "
        "helpers.series.colab.update_notebooks('notebooks')")
    assert cells[0] is not parameters_cell(notebook, name)


def check_badge(notebook, name: str) -> None:
    title = notebook.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# "), f"{name}: the first cell is the H1 title"
    badge = colab.badge_markdown(f"{colab.NOTEBOOKS_FOLDER}/{name}")
    assert badge in title.source.splitlines(), f"{name}: no badge line {badge!r} in the title cell"


def assignments(source: str, name: str) -> dict[str, tuple[object, str]]:
    """name -> (literal value, its source lines) for each statement of a parameters cell."""
    tree = ast.parse(source)  # a SyntaxError fails the test with the line
    lines = source.splitlines()
    found = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), (
            f"{name}: line {node.lineno} of the parameters cell is not `NAME = value`: {lines[node.lineno - 1]!r}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            pytest.fail(f"{name}: {node.targets[0].id} is not a literal (papermill and Colab forms need one)")
        found[node.targets[0].id] = (value, "\n".join(lines[node.lineno - 1 : node.end_lineno]))
    return found


def compatible(default, value) -> bool:
    """Can papermill's `value` stand in for the notebook's `default`?"""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return type(value) is type(default)


FORM = re.compile(r"#\s*@param\s*(?P<spec>.*)$")


def check_form(name: str, key: str, value, lines: str) -> None:
    """The `#@param` annotation exists and agrees with the value (Colab draws the form from it)."""
    match = next((FORM.search(line) for line in lines.splitlines() if FORM.search(line)), None)
    assert match, f"{name}: {key} has no `#@param` form annotation"
    spec = match["spec"].strip()
    if spec.startswith("["):
        options = ast.literal_eval(spec[: spec.index("]") + 1])
        assert value in options or "allow-input: true" in spec, f"{name}: {key}={value!r} is not one of {options}"
        return
    kind = re.search(r'type:\s*"(\w+)"', spec)
    assert kind, f"{name}: {key}'s `#@param {spec}` names no type"
    expected = {"integer": int, "number": (int, float), "slider": (int, float), "string": str, "boolean": bool,
                "date": str, "raw": object}[kind[1]]
    assert isinstance(value, expected) and (kind[1] == "boolean" or not isinstance(value, bool)), (
        f"{name}: {key}={value!r} is not of its form's type {kind[1]!r}")
    if kind[1] == "slider":
        low, high = (float(re.search(rf"{end}:\s*(-?[\d.]+)", spec)[1]) for end in ("min", "max"))
        assert low <= value <= high, f"{name}: {key}={value} is outside its slider's {low}..{high}"


def check_parameters(notebook, name: str) -> None:
    found = assignments(parameters_cell(notebook, name).source, name)
    assert list(found)[:2] == ["PROFILE", "MODEL"], f"{name}: the parameters cell starts with PROFILE, MODEL"
    for key, (value, lines) in found.items():
        if key != "PROFILE" and "\n" not in lines:  # a value over several lines cannot be a form field
            check_form(name, key, value, lines)
    for profile in PROFILES:
        for key, value in parameters_for(notebook_number(name), profile).items():
            assert key in found, f"{name}: profile {profile!r} sets {key}, which its parameters cell does not have"
            default = found[key][0]
            assert compatible(default, value), (
                f"{name}: profile {profile!r} sets {key}={value!r}, but the notebook's default is {default!r}")


def run_cells(sources: list[str], cwd: Path, env: dict, hide_helpers: bool = False, returncode: int = 0):
    """Run cell sources in a fresh Python where `subprocess.run` only records (returning `returncode`) and
    sockets can reach nothing but this machine; (completed process, the commands the cells ran)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(sources, file)
    script = Path(file.name)
    preamble = f"""
import json, socket, subprocess, sys
calls = []
class Done:
    returncode = {returncode}
git_prompts = []  # GIT_TERMINAL_PROMPT in the environment each command ran with
def record(command, *args, env=None, **kwargs):
    git_prompts.append((env or {{}}).get("GIT_TERMINAL_PROMPT"))
    return calls.append(list(command)) or Done()
subprocess.run = record
connect = socket.socket.connect
def local_only(self, address):
    if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
        raise OSError(f"network access to {{address}} in an offline test")
    return connect(self, address)
socket.socket.connect = local_only
if {hide_helpers}:
    sys.modules["helpers"] = None  # as on a fresh Colab/Kaggle machine: the project is not installed
namespace = {{"__name__": "__main__"}}
try:
    for source in json.load(open({str(script)!r})):
        exec(compile(source, "cell", "exec"), namespace)
finally:
    print("PROMPTS=" + json.dumps(git_prompts))
    print("CALLS=" + json.dumps(calls))
"""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    for key in ("COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE", colab.DRY_RUN_ENV, "HF_TOKEN"):
        if key not in env:
            full_env.pop(key, None)
    try:
        done = subprocess.run([sys.executable, "-c", preamble], cwd=cwd, env=full_env, capture_output=True,
                              text=True, timeout=300)
    finally:
        script.unlink()
    calls = json.loads(done.stdout.rsplit("CALLS=", 1)[1]) if "CALLS=" in done.stdout else None
    return done, calls


def check_first_cells_run_offline(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    sources = [code_cells(notebook)[0].source, parameters_cell(notebook, path.name).source]
    done, calls = run_cells(sources, path.parent, env={})
    assert done.returncode == 0, f"{path.name}: the first cells failed offline:\n{done.stderr[-2000:]}"
    assert calls == [], f"{path.name}: the setup cell ran {calls} on a machine where the project is installed"
    assert "$ " not in done.stdout


# ---------------------------------------------------------------------------------------------------
# The real notebooks (these pass once helpers.series.colab.update_notebooks("notebooks") has been run)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_setup_cell_is_the_canonical_one(path):
    check_setup_cell(nbformat.read(path, as_version=4), path.name)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_title_has_colab_and_kaggle_badges(path):
    check_badge(nbformat.read(path, as_version=4), path.name)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_parameters_cell_parses_and_holds_every_profile_value(path):
    check_parameters(nbformat.read(path, as_version=4), path.name)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_first_cells_run_offline_without_installing(path):
    check_first_cells_run_offline(path)


def test_every_profile_override_belongs_to_a_notebook():
    numbers = {notebook_number(path) for path in NOTEBOOKS}
    assert set(NOTEBOOK_OVERRIDES) <= numbers, f"overrides for missing notebooks: {set(NOTEBOOK_OVERRIDES) - numbers}"


# ---------------------------------------------------------------------------------------------------
# The setup cell on a simulated Colab/Kaggle (dry run: it prints the commands instead of running them)


SETUP = colab.setup_cell_source()
CLONE = f"git clone -q --depth 1 {colab.REPO_URL} {colab.CLONE_DIR}"
INSTALL = f"{sys.executable} -m pip install -q -e {colab.CLONE_DIR}"


def printed_commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("$ ")]


def test_setup_on_fresh_colab_clones_and_installs_keeping_their_torch(tmp_path):
    done, calls = run_cells([SETUP], tmp_path, {"COLAB_RELEASE_TAG": "test", colab.DRY_RUN_ENV: "1"},
                            hide_helpers=True)
    assert done.returncode == 0, done.stderr
    assert printed_commands(done.stdout) == [CLONE, INSTALL]
    assert calls == [], "a dry run runs nothing"
    assert "torch" not in done.stdout, "Colab's CUDA torch stays: nothing installs or pins torch"


def test_setup_on_kaggle_with_the_clone_there_only_installs(tmp_path):
    (tmp_path / colab.CLONE_DIR).mkdir()
    done, calls = run_cells([SETUP], tmp_path, {"KAGGLE_KERNEL_RUN_TYPE": "Interactive", colab.DRY_RUN_ENV: "1"},
                            hide_helpers=True)
    assert done.returncode == 0, done.stderr
    assert printed_commands(done.stdout) == [INSTALL] and calls == []


def test_setup_runs_the_commands_and_explains_a_failure(tmp_path):
    """Not a dry run: the commands go to subprocess.run (recorded here); a failing clone asks about the internet
    and names the URL, and git never waits for a username (a wrong URL on GitHub asks for one)."""
    done, calls = run_cells([SETUP], tmp_path, {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, hide_helpers=True,
                            returncode=128)
    assert calls == [CLONE.split()]
    assert done.returncode != 0 and "is the internet on (Kaggle: Settings > Internet)" in done.stderr
    assert f"REPO_URL = {colab.REPO_URL!r}" in done.stderr
    assert json.loads(done.stdout.split("PROMPTS=", 1)[1].splitlines()[0]) == ["0"], "git may prompt"


def test_setup_installs_only_what_the_notebooks_need():
    """The setup cell installs requirements.txt into a running Colab kernel: the harness, the web page and the
    test tools (which upgrade packages Colab pins, such as ipykernel) stay in extras."""
    import tomllib

    root = Path(__file__).resolve().parents[1]

    def name(requirement: str) -> str:
        return re.split(r"[=<>\[ ]", requirement.strip(), maxsplit=1)[0].lower()

    required = {name(line) for line in (root / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    tools = {name(r) for r in extras["harness"] + extras["app"] + extras["test"]} - {"sd-dissected"}
    assert {"papermill", "nbclient", "ipykernel", "gradio", "pytest"} <= tools
    assert not required & tools, f"the setup cell would install {required & tools} into a running kernel"


def test_setup_when_installed_installs_nothing_and_reports_gpu_hub_and_token(tmp_path):
    done, calls = run_cells([SETUP], tmp_path, {"COLAB_RELEASE_TAG": "test", "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 0, done.stderr
    assert calls == [] and printed_commands(done.stdout) == []
    if not torch.cuda.is_available():
        assert "GPU: none" in done.stdout and "Runtime > Change runtime type > GPU" in done.stdout
    assert "hub: not reachable" in done.stdout and "hub token: none" in done.stdout


def test_setup_outside_colab_and_kaggle_says_how_to_install(tmp_path):
    done, calls = run_cells([SETUP], tmp_path, {}, hide_helpers=True)
    assert done.returncode != 0 and calls == []
    assert "The project is not installed: run `pip install -e .`" in done.stderr


def test_setup_cell_is_ruff_clean(tmp_path):
    cell = tmp_path / "setup_cell.py"
    cell.write_text(SETUP + "\n")
    config = Path(__file__).resolve().parents[1] / "pyproject.toml"
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(config), str(cell)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# ---------------------------------------------------------------------------------------------------
# Badges and update_notebooks


def test_badges_link_colab_and_kaggle_to_the_notebook_on_github():
    badge = colab.badge_markdown("notebooks/02_three_stages.ipynb")
    repo = colab.REPO_URL.removeprefix("https://github.com/")
    assert f"(https://colab.research.google.com/github/{repo}/blob/main/notebooks/02_three_stages.ipynb)" in badge
    assert (f"(https://kaggle.com/kernels/welcome?src=https://github.com/{repo}/blob/main/"
            "notebooks/02_three_stages.ipynb)") in badge
    with pytest.raises(ValueError, match="must be a .ipynb path"):
        colab.badge_markdown("notebooks/02_three_stages")
    with pytest.raises(ValueError, match="https://github.com/OWNER/NAME"):
        colab.badge_markdown("a.ipynb", repo_url="https://example.org/x")


def test_update_notebooks_makes_every_check_pass_and_changes_nothing_else(tmp_path):
    for path in NOTEBOOKS:
        shutil.copy(path, tmp_path / path.name)
    bare = nbformat.v4.new_notebook()  # a notebook that has no setup cell yet gets one after its title
    bare.cells = [nbformat.v4.new_markdown_cell("# 99 · New\n\nWhat you will learn."),
                  nbformat.v4.new_code_cell('PROFILE = "cpu"\nMODEL = "auto"  #@param ["auto", "toy"]',
                                            metadata={"tags": ["parameters"]})]
    nbformat.write(bare, tmp_path / "99_new.ipynb")
    before = {path.name: nbformat.read(path, as_version=4) for path in sorted(tmp_path.glob("*.ipynb"))}

    changed = colab.update_notebooks(tmp_path)

    assert "99_new.ipynb" in {path.name for path in changed}
    for path in sorted(tmp_path.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        check_setup_cell(notebook, path.name)
        check_badge(notebook, path.name)
        check_first_cells_run_offline(path)
        old = [cell.source for cell in before[path.name].cells[1:] if not colab.is_setup_cell(cell)]
        new = [cell.source for cell in notebook.cells[1:] if not colab.is_setup_cell(cell)]
        assert old == new, f"{path.name}: update_notebooks changed cells besides the title and the setup cell"
        assert before[path.name].cells[0].source.splitlines()[0] == notebook.cells[0].source.splitlines()[0]
    assert nbformat.read(tmp_path / "99_new.ipynb", as_version=4).cells[1].source == SETUP

    snapshot = {path.name: path.read_bytes() for path in tmp_path.glob("*.ipynb")}
    assert colab.update_notebooks(tmp_path) == []  # idempotent: a second run changes no byte
    assert snapshot == {path.name: path.read_bytes() for path in tmp_path.glob("*.ipynb")}
