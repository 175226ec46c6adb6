import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers.series.run import find_notebooks, run_notebook

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def tiny_pipe():
    """A fresh tiny random SD per test (pipelines hold state such as the scheduler's)."""
    from helpers.core.random_models import tiny_random_pipeline

    return tiny_random_pipeline(seed=0)


SHARED_PIPELINES = ("toy_pipe", "toy_depth_pipe")


@pytest.fixture(scope="session")
def toy_pipe():
    """The toy on the CPU in float32, loaded once per session and shared by every test file. A test that changes a
    pipeline (scheduler, adapters, dtype, hooks, weights) works on its own load or copy: `shared_pipelines_unchanged`
    fails the test that does not."""
    from helpers.core.models import load_pipeline

    return load_pipeline("toy", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def toy_depth_pipe():
    """The toy with its depth ControlNet (a StableDiffusionControlNetPipeline), shared like `toy_pipe`."""
    from helpers.core.models import load_pipeline

    return load_pipeline("toy", controlnet="depth", device="cpu", dtype=torch.float32)


def pipeline_state(pipe) -> dict:
    """What a test may not leave changed on a shared pipeline: the scheduler and its config, each component's module
    types (adapters, fused attention, swapped parts), attention processors, hooks, and every weight's dtype, device,
    layout and sum."""
    modules = {name: part for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    return {
        "scheduler": (type(pipe.scheduler).__name__, dict(pipe.scheduler.config)),
        "modules": {name: [type(m).__name__ for m in part.modules()] for name, part in modules.items()},
        "attention": {name: type(p).__name__ for name, p in pipe.unet.attn_processors.items()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for part in modules.values()
                     for m in part.modules()),
        "weights": {name: [(p.dtype, p.device, p.stride(), float(p.detach().double().sum()))
                           for p in part.parameters()] for name, part in modules.items()},
    }


_pipeline_states: dict = {}


@pytest.fixture(autouse=True)
def shared_pipelines_unchanged(request):
    """After each test that used a shared pipeline: it is as it was loaded."""
    used = [name for name in SHARED_PIPELINES if name in request.fixturenames]
    for name in used:
        _pipeline_states.setdefault(name, pipeline_state(request.getfixturevalue(name)))
    yield
    for name in used:
        assert pipeline_state(request.getfixturevalue(name)) == _pipeline_states[name], (
            f"{request.node.nodeid} changed the shared `{name}`: work on a copy or a load of your own")


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """`smoke_runs("02")`: notebook 02 executed once per session in the smoke profile (a `NotebookRun`), so a test
    file about one notebook runs only that one. Executed copies and results go to one temporary outputs folder."""
    out_dir = tmp_path_factory.mktemp("outputs")
    runs: dict = {}

    def run(number: str):
        if number not in runs:
            notebooks = find_notebooks([number])
            runs[number] = run_notebook(notebooks[0], "smoke", out_dir)
        return runs[number]

    run.out_dir = out_dir
    return run


@pytest.fixture(scope="session")
def notebook_results(smoke_runs):
    """`notebook_results("02")`: everything notebook 02 recorded in its smoke run (its outputs/02_*.json merged)."""

    def results_of(number: str) -> dict:
        run = smoke_runs(number)
        assert run.status == "ok", run.error
        assert run.results, f"notebook {number} wrote no outputs/{number}_*.json"
        assert (smoke_runs.out_dir / f"{run.notebook}.ipynb").exists(), "the executed copy goes to outputs/"
        merged = {}
        for result in run.results.values():
            merged.update(result)
        return merged

    return results_of


@pytest.fixture(scope="module")
def r(request, notebook_results):
    """In tests/test_nbNN.py: what notebook NN recorded in its smoke run (NN read from the file's name)."""
    module = request.module.__name__
    if not module.startswith("test_nb"):
        raise ValueError(f"`r` is notebook NN's results, for tests/test_nbNN.py only; {module} is not one")
    return notebook_results(module.removeprefix("test_nb"))


BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    """A Chromium-family browser wherever one is: Playwright's own (`python -m playwright install chromium`), then
    Debian's `chromium` or Google Chrome on the PATH. None when there is none."""
    candidates = []
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            candidates.append(playwright.chromium.executable_path)
    except Exception:  # playwright not installed, or its driver cannot start: look on the PATH
        pass
    candidates += [shutil.which(name) for name in BROWSER_NAMES]
    return next((path for path in candidates if path and Path(path).is_file()), None)


@pytest.fixture(scope="session")
def browser_path() -> str:
    """The browser for the tests that drive a real page. Without one the test is skipped, saying how to get one;
    under CI (`CI` set, as .ci/run does, which installs Debian's chromium) a missing browser fails instead."""
    path = find_browser()
    if path is None:
        how = ("`python -m playwright install chromium` (needs the internet) or, as root on Debian, "
               "`apt-get install chromium`")
        if os.environ.get("CI"):
            pytest.fail(f"no browser found under CI ({BROWSER_NAMES} or Playwright's own): {how}")
        pytest.skip(f"no browser found (Playwright's own, or {', '.join(BROWSER_NAMES)} on the PATH): install one "
                    f"with {how}")
    return path


@pytest.fixture(scope="session")
def local_hub_cache() -> Path:
    """The local hub (random weights at SD 1.5's real shapes under the real repo ids), built once into
    outputs/cache/hub as `python -m helpers hub build` does, and reused by later sessions (a marker per repo)."""
    from helpers.checkpoints.hub import build_local_hub

    return build_local_hub()
