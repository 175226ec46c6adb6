"""Kaggle and Colab: the repository's URL (written here and nowhere else), every notebook's setup cell, the
"Open in Colab" / "Open in Kaggle" badges, and `update_notebooks(folder)`, which writes both into the notebooks.

The setup cell installs the project only when `import helpers.series.colab` fails, i.e. on a fresh Colab/Kaggle machine:
it clones REPO_URL and `pip install -e`s it, which keeps their CUDA torch (requirements.txt asks for torch>=2.1
and pins no build). Anywhere else the project must already be installed (README), and the cell says so.
`SD_SETUP_DRY_RUN=1` makes it print the commands instead of running them (tests/test_notebook_cells.py).

This module is imported by the setup cell before anything heavy: it imports no torch at import time.
"""

from __future__ import annotations

from pathlib import Path

from helpers.series.profiles import NOTEBOOK_GLOB

REPO_URL = "https://github.com/sd-dissected/sd-dissected"  # the one place: setup cells and badges are made from it
BRANCH = "main"
CLONE_DIR = "sd-dissected"  # where the setup cell clones the project on Colab/Kaggle (in the working directory)
NOTEBOOKS_FOLDER = "notebooks"  # the notebooks' folder inside the repository, for the badges' links
DRY_RUN_ENV = "SD_SETUP_DRY_RUN"
SETUP_MARKER = "# Setup: on Colab or Kaggle"  # how update_notebooks recognises a setup cell it wrote
OLD_SETUP_MARKERS = ("# Setup:",)  # earlier setup cells, replaced too
BADGE_MARKER = "[![Open In Colab]"
COLAB_BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"
KAGGLE_BADGE_SVG = "https://kaggle.com/static/images/open-in-kaggle.svg"

SETUP_CELL_TEMPLATE = '''\
{marker}, install this project unless it is importable (their CUDA torch is kept); elsewhere
# install it first (`pip install -e .`, see the README). Written by helpers/series/colab.py: edit it there.
import os
import subprocess
import sys

REPO_URL = "{repo_url}"  # your fork's URL, if you forked it
ON_COLAB_OR_KAGGLE = any(key in os.environ for key in ("COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE"))
DRY_RUN = os.environ.get("{dry_run_env}") == "1"  # print the commands, run nothing (the tests)
try:
    import helpers.series.colab
except ImportError:
    if not ON_COLAB_OR_KAGGLE:
        raise ImportError("The project is not installed: run `pip install -e .` in its folder (see the README), "
                          "then restart the kernel.") from None
    clone = [] if os.path.isdir("{clone_dir}") else [["git", "clone", "-q", "--depth", "1", REPO_URL, "{clone_dir}"]]
    for command in [*clone, [sys.executable, "-m", "pip", "install", "-q", "-e", "{clone_dir}"]]:
        print("$", " ".join(command))  # GIT_TERMINAL_PROMPT=0: a wrong URL fails at once, never asks for a login
        if not DRY_RUN and subprocess.run(command, env={{**os.environ, "GIT_TERMINAL_PROMPT": "0"}}).returncode:
            raise RuntimeError(f"`{{' '.join(command)}}` failed: is the internet on (Kaggle: Settings > Internet), "
                               f"and is REPO_URL = {{REPO_URL!r}} a public repository?") from None
    sys.path.insert(0, os.path.abspath("{clone_dir}"))  # this kernel started before the install
    if not DRY_RUN:
        import helpers.series.colab
if ON_COLAB_OR_KAGGLE and "helpers.series.colab" in sys.modules:
    helpers.series.colab.print_environment()
'''


def setup_cell_source(repo_url: str = REPO_URL) -> str:
    """The canonical first code cell of every notebook."""
    return SETUP_CELL_TEMPLATE.format(marker=SETUP_MARKER, repo_url=repo_url, dry_run_env=DRY_RUN_ENV,
                                      clone_dir=CLONE_DIR).rstrip("\n")


def repo_path(repo_url: str = REPO_URL) -> str:
    """'owner/name' of a GitHub URL."""
    prefix = "https://github.com/"
    if not repo_url.startswith(prefix) or repo_url.rstrip("/").count("/") != 4:
        raise ValueError(f"repo_url={repo_url!r} must look like https://github.com/OWNER/NAME")
    return repo_url[len(prefix):].rstrip("/").removesuffix(".git")


def colab_url(notebook_path: str, repo_url: str = REPO_URL) -> str:
    return f"https://colab.research.google.com/github/{repo_path(repo_url)}/blob/{BRANCH}/{notebook_path}"


def kaggle_url(notebook_path: str, repo_url: str = REPO_URL) -> str:
    github = f"https://github.com/{repo_path(repo_url)}/blob/{BRANCH}/{notebook_path}"
    return f"https://kaggle.com/kernels/welcome?src={github}"


def badge_markdown(notebook_path: str, repo_url: str = REPO_URL) -> str:
    """One markdown line: the Open in Colab and Open in Kaggle badges of a notebook ('notebooks/02_....ipynb')."""
    if not notebook_path.endswith(".ipynb"):
        raise ValueError(f"notebook_path={notebook_path!r} must be a .ipynb path inside the repository")
    return (f"[![Open In Colab]({COLAB_BADGE_SVG})]({colab_url(notebook_path, repo_url)}) "
            f"[![Open In Kaggle]({KAGGLE_BADGE_SVG})]({kaggle_url(notebook_path, repo_url)})")


def readme_badges(folder: str | Path, repo_url: str = REPO_URL) -> str:
    """Markdown for the README: one line per notebook with its badges."""
    lines = []
    for notebook in sorted(Path(folder).glob(NOTEBOOK_GLOB)):
        lines.append(f"- `{notebook.stem}` {badge_markdown(f'{NOTEBOOKS_FOLDER}/{notebook.name}', repo_url)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Writing them into the notebooks


def is_setup_cell(cell) -> bool:
    return cell.cell_type == "code" and cell.source.lstrip().startswith((SETUP_MARKER, *OLD_SETUP_MARKERS))


def with_badge(markdown: str, badge: str) -> str:
    """The title cell with `badge` on the line after the H1 title (an older badge line is replaced)."""
    lines = [line for line in markdown.splitlines() if not line.startswith(BADGE_MARKER)]
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"the first cell must start with the notebook's H1 title ('# NN · ...'), got {lines[:1]}")
    rest = lines[1:]
    while rest and not rest[0].strip():
        rest = rest[1:]
    return "\n".join([lines[0], "", badge, "", *rest]).rstrip("\n")


def update_notebook(path: str | Path, repo_url: str = REPO_URL) -> bool:
    """Rewrite one notebook's badge line and setup cell; True if the file changed (running it again changes nothing)."""
    import nbformat

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    before = nbformat.writes(notebook)
    if not notebook.cells or notebook.cells[0].cell_type != "markdown":
        raise ValueError(f"{path.name}: the first cell must be the markdown title cell")
    notebook.cells[0].source = with_badge(notebook.cells[0].source, badge_markdown(
        f"{NOTEBOOKS_FOLDER}/{path.name}", repo_url))
    setup = next((cell for cell in notebook.cells if is_setup_cell(cell)), None)
    if setup is None:  # a notebook without one: the setup cell goes right after the title
        setup = nbformat.v4.new_code_cell()
        notebook.cells.insert(1, setup)
    setup.source = setup_cell_source(repo_url)
    if nbformat.writes(notebook) == before:
        return False
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return True


def update_notebooks(folder: str | Path, repo_url: str = REPO_URL) -> list[Path]:
    """Rewrite every numbered notebook of `folder`; the ones that changed."""
    notebooks = sorted(Path(folder).glob(NOTEBOOK_GLOB))
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    return [notebook for notebook in notebooks if update_notebook(notebook, repo_url)]


# ---------------------------------------------------------------------------------------------------
# What the setup cell prints on Colab/Kaggle


def environment_lines() -> list[str]:
    """GPU, hub and token, each with what to do when it is missing."""
    from helpers.core import accelerator
    from helpers.core.models import SD15_HUB_ID, hub_reachable
    from helpers.serving.interactive import memory_settings

    acc = accelerator.accelerator()
    if acc.kind == "cuda" and not acc.supported:
        try:
            accelerator.check_usable()
        except accelerator.UnsupportedGPUError as error:
            gpu = f"GPU: {error}"
    elif acc.is_gpu:
        settings = memory_settings(SD15_HUB_ID) or "none needed"
        gpu = f"GPU: {acc.describe()} (SD 1.5 memory settings: {settings})"
    else:
        gpu = ("GPU: none, so MODEL='auto' runs the toy model. Colab: Runtime > Change runtime type > GPU; "
               "Kaggle: Settings > Accelerator > GPU")
    if hub_reachable():
        hub = "hub: reachable, MODEL='auto' can use SD 1.5"
    else:
        hub = ("hub: not reachable (no internet, or HF_HUB_OFFLINE=1), so MODEL='auto' runs the toy model. "
               "Kaggle: Settings > Internet > on")
    from huggingface_hub import get_token

    token = "hub token: found" if get_token() else (
        "hub token: none (SD 1.5 needs none; for gated models run `huggingface_hub.login()` or set HF_TOKEN "
        "in Colab's Secrets / Kaggle's Add-ons > Secrets)")
    return [gpu, hub, token]


def print_environment() -> None:
    print("\n".join(environment_lines()))



def main(argv: list[str] | None = None) -> int:
    """`python -m helpers.series.colab [FOLDER]`: update every notebook of FOLDER (default: notebooks/), then print the
    README's badge lines."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers.series.colab", description=main.__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=NOTEBOOKS_FOLDER)
    folder = parser.parse_args(argv).folder
    changed = update_notebooks(folder)
    print(f"updated {len(changed)} notebook(s): {[path.name for path in changed]}")
    print("README badge lines:", readme_badges(folder), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
