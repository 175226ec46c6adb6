"""`python -m helpers rehearse` at its smallest settings: all eight notebooks as a badge user on a T4 runs them
(working directory outside the repository, no parameter passed, SD 1.5 from the local hub, fp16 decided, a 15 GiB
budget), on this CPU. The local hub is built by the test itself (once, into outputs/cache/hub) from the project's
own code."""

import json
from pathlib import Path

import pytest

from helpers.core.models import SD15_HUB_ID
from helpers.series.profiles import notebook_number
from helpers.series.rehearse import NOT_COVERED, rehearse
from helpers.series.run import find_notebooks

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = [notebook_number(notebook) for notebook in find_notebooks()]
MEMORY_GIB = 15.0


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, local_hub_cache):
    out = tmp_path_factory.mktemp("rehearsal")
    workdir = tmp_path_factory.mktemp("content")  # like Colab's /content: not the clone, not notebooks/
    plan = rehearse(memory_gib=MEMORY_GIB, size=64, steps=1, cache=local_hub_cache, out_dir=out / "rehearsal",
                    workdir=workdir)
    return plan, out


def entry(plan: dict, number: str) -> dict:
    return next(n for n in plan["notebooks"] if n["notebook"].startswith(number))


@pytest.mark.parametrize("number", NUMBERS)
def test_notebook_passes_as_a_t4_user_on_sd15_runs_it(rehearsal, number):
    plan, _ = rehearsal
    notebook = entry(plan, number)
    assert notebook["status"] == "ok", notebook["error"]
    assert notebook["model"] == SD15_HUB_ID, "MODEL='auto' must pick SD 1.5 on a T4 with the hub"
    assert notebook["profile"] == "gpu" and notebook["dtype"] == "float16"
    assert notebook["accelerator"].startswith("Tesla T4") and notebook["compute_device"] == "cpu"
    assert 0 < notebook["peak_memory_gib"] < MEMORY_GIB
    assert notebook["parameters"]["MODEL"] == SD15_HUB_ID
    for knob, value in notebook["shrunk"].items():  # what was shrunk is in force and said so
        assert notebook["parameters"][knob] == value


def test_the_rehearsal_ran_outside_the_repo_and_says_what_it_does_not_cover(rehearsal):
    plan, out = rehearsal
    workdir = Path(plan["workdir"])
    assert ROOT not in workdir.parents and workdir != ROOT
    written = json.loads((out / "rehearsal.json").read_text())
    assert [notebook_number(n["notebook"]) for n in written["notebooks"]] == NUMBERS
    assert written["not_covered"] == NOT_COVERED and written["memory_gib"] == MEMORY_GIB
    assert all((out / "rehearsal" / f"{n['notebook']}.ipynb").exists() for n in written["notebooks"])
