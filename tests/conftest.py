import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def tiny_pipe():
    """A fresh tiny random SD per test (pipelines hold state such as the scheduler's)."""
    from helpers.testing import tiny_random_pipeline

    return tiny_random_pipeline(seed=0)
