import os

import pytest

from helpers.run import find_notebooks, run_notebook

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def tiny_pipe():
    """A fresh tiny random SD per test (pipelines hold state such as the scheduler's)."""
    from helpers.testing import tiny_random_pipeline

    return tiny_random_pipeline(seed=0)


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
        merged = {}
        for result in run.results.values():
            merged.update(result)
        return merged

    return results_of
