"""Library log lines a user cannot act on are dropped, precisely: the same loggers' other lines still show."""

import logging
import os
import subprocess
import sys

from helpers.core import quiet


def test_importing_the_pipeline_and_casting_prints_nothing_a_user_cannot_act_on():
    code = ("import torch, helpers.core.random_models as t; t.tiny_random_pipeline(dtype=torch.float16); "
            "from transformers import CLIPImageProcessor")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "requires torchvision" not in done.stderr
    assert "should be kept in float32" not in done.stderr


def test_profiling_prints_no_trace_markers():
    code = ("import helpers, torch\nfrom torch.profiler import profile, ProfilerActivity\n"
            "with profile(activities=[ProfilerActivity.CPU]):\n    torch.ones(3) + 1")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_only_the_named_messages_are_dropped():
    quiet.install()
    quiet.install()  # idempotent: one filter per logger
    logger = logging.getLogger("diffusers.models.modeling_utils")
    assert sum(isinstance(f, quiet.DropMessage) for f in logger.filters) == 1
    collect = Collect()  # on the logger itself: diffusers' loggers do not propagate to the root (pytest's caplog)
    logger.addHandler(collect)
    try:
        logger.warning("There are modules in UNet that should be kept in float32: []. Casting ...")
        logger.warning("There are modules in UNet that should be kept in float32: ['norm']. Casting ...")
        logger.warning("Something else entirely")
    finally:
        logger.removeHandler(collect)
    assert [r.getMessage() for r in collect.records] == [
        "There are modules in UNet that should be kept in float32: ['norm']. Casting ...", "Something else entirely"]
