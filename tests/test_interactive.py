"""What the panel and the web page share (helpers/interactive.py): request checks, load errors, the model cache."""

import re

import pytest
from diffusers import DDIMScheduler

from helpers.core.stages import default_size, generate
from helpers.serving.interactive import (
    MAX_BATCH_SIZE,
    MAX_SIDE_FACTOR,
    ModelLoadError,
    PipelineCache,
    Request,
    check_request,
    count_timesteps,
    explain_load_error,
    memory_settings,
    run_generation,
)


@pytest.mark.parametrize(("change", "message"), [
    ({"prompt": ""}, "prompt is empty"),
    ({"num_inference_steps": 0}, "steps=0 is out of range: choose 1 to 150"),
    ({"guidance_scale": float("nan")}, "guidance=nan is out of range"),
    ({"seed": -1}, "seed=-1 is out of range"),
    ({"seed": 2**31 - 1, "batch_size": 2}, "seed=2147483647 is out of range"),  # the second image's seed overflows
    ({"batch_size": MAX_BATCH_SIZE + 1}, f"batch size={MAX_BATCH_SIZE + 1} is out of range"),
    ({"height": 10_000}, "height=10000 is out of range"),
    ({"scheduler": "lms"}, "LMSDiscreteScheduler cannot run this model"),
])
def test_requests_are_checked_with_the_field_named(tiny_pipe, change, message):
    # a zero-terminal-SNR schedule, as the toy model's, which LMS does not implement
    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config, rescale_betas_zero_snr=True)
    request = Request(prompt="a red circle")
    for key, value in change.items():
        setattr(request, key, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_request(request, tiny_pipe)


def test_size_zero_means_the_trained_size_and_the_largest_is_accepted(tiny_pipe):
    height, width = default_size(tiny_pipe)
    assert check_request(Request(prompt="a red circle"), tiny_pipe) == (height, width)
    biggest = Request(prompt="a", height=MAX_SIDE_FACTOR * height, width=tiny_pipe.vae_scale_factor)
    assert check_request(biggest, tiny_pipe) == (MAX_SIDE_FACTOR * height, tiny_pipe.vae_scale_factor)


def test_run_generation_is_generate_with_one_seed_per_image(tiny_pipe):
    request = Request(prompt="a red circle", negative_prompt="blue", num_inference_steps=3, seed=5, batch_size=2)
    done = []
    result = run_generation(tiny_pipe, request, progress=lambda step, total: done.append((step, total)))
    expected = generate(tiny_pipe, ["a red circle"] * 2, ["blue"] * 2, seeds=[5, 6], num_inference_steps=3)
    assert (result.latents == expected.latents).all()
    # every step reported, out of the steps the loop really runs: PNDM (the tiny model's) runs one more than asked
    total = count_timesteps(tiny_pipe, "default", 3)
    assert total == 4 and done == [(step, total) for step in range(1, total + 1)]


def test_load_errors_say_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE=1" in explain_load_error("a/b", OSError("no cached snapshot"))
    assert "token" in explain_load_error("a/b", OSError("401 Client Error: Unauthorized"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert "no internet" in explain_load_error("a/b", OSError("Failed to resolve 'huggingface.co'"))
    assert "check the model name" in explain_load_error("a/b", ValueError("odd"))


def test_the_cache_loads_once_and_wraps_load_errors():
    calls = []

    def loader(model, **kwargs):
        calls.append(model)
        if model == "broken":
            raise OSError("no such folder")
        return object()

    cache = PipelineCache(loader)
    assert cache.get("x") is cache.get("x") and calls == ["x"]
    assert cache.get("x", controlnet="depth") is not cache.get("x")  # a ControlNet pipeline is another pipeline
    with pytest.raises(ModelLoadError, match="Cannot load MODEL='broken'.*no such folder"):
        cache.get("broken")
    assert memory_settings("toy") == {}
