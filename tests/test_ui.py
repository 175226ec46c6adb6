"""The widget panel, driven headless: set widget values, click, check the images and timings it produced.

(ipywidgets fire observers on `.value =` and handlers on `.click()` without a frontend; see DESIGN.md.)
"""

import io

import ipywidgets as widgets
import nbformat
import numpy as np
import PIL.Image
import pytest
from reference import assert_different_pictures, assert_same_pictures

from helpers.core.models import load_pipeline
from helpers.core.stages import default_size, generate
from helpers.serving.interactive import PipelineCache, count_timesteps
from helpers.serving.ui import GenerationPanel, frontend_status

PROMPT = "a large red circle on the left on a white background"


@pytest.fixture
def cache(toy_pipe):
    """A fresh cache holding the toy model, so no test reloads it and none sees another's models."""
    cache = PipelineCache()
    cache.put("toy", toy_pipe)
    return cache


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def png_pixels(data: bytes) -> np.ndarray:
    return pixels(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def test_click_makes_what_generate_makes_with_progress_and_previews(toy_pipe, cache):
    panel = GenerationPanel(model="toy", cache=cache, steps=20, preview_every=5)
    panel.prompt.value, panel.seed.value, panel.steps.value = PROMPT, 11, 6
    panel.batch_size.value, panel.preview_every.value = 2, 2
    panel.button.click()

    assert panel.error is None, panel.error
    expected = generate(toy_pipe, [PROMPT] * 2, seeds=[11, 12], num_inference_steps=6)
    assert_same_pictures(panel.last_result.images, expected.images, atol=0)
    # the images on show are those images (enlarged pixel for pixel for the toy's 64 px)
    shown = [box.children[1].value for box in panel.image_box.children]
    assert len(shown) == 2
    for data, image in zip(shown, expected.images):
        big = png_pixels(data)
        zoom = big.shape[1] // image.width
        assert zoom >= 2 and np.array_equal(big[::zoom, ::zoom], pixels(image))
    # progress followed every step; previews came every 2 steps (not at the end, where the image is)
    total = count_timesteps(toy_pipe, "default", 6)
    assert (panel.progress.value, panel.progress.max, panel.progress.description) == (total, total, f"{total}/{total}")
    assert [step for step, _ in panel.previews] == [2, 4]
    assert all(len(images) == 2 for _, images in panel.previews)
    assert len(panel.preview_box.children) == 2
    # each stage's time, and the preview decoding kept out of the denoising time
    timings = panel.last_result.timings
    assert {"encode_text", "denoise", "decode", "previews", "total"} <= set(timings)
    assert timings["encode_text"] + timings["denoise"] + timings["decode"] + timings["previews"] <= timings["total"]
    for stage in ("encode_text", "denoise", "decode"):
        assert stage in panel.timings.value
    assert not panel.button.disabled


def test_sizes_are_multiples_of_the_vae_factor_and_bad_values_are_reported(toy_pipe, cache):
    panel = GenerationPanel(model="toy", cache=cache, steps=2, preview_every=0)
    factor = toy_pipe.vae_scale_factor
    assert (panel.height.value, panel.width.value) == default_size(toy_pipe)
    assert panel.height.step == panel.width.step == panel.height.min == factor
    panel.width.value = 2 * factor * 5
    panel.button.click()
    assert panel.error is None and panel.last_result.images[0].size == (10 * factor, default_size(toy_pipe)[0])

    kept = panel.last_result
    panel.height.value = 10 * factor + 1  # off the slider's steps (only code can do that): said, not fixed
    panel.button.click()
    assert panel.last_result is kept
    assert f"height={10 * factor + 1} must be a multiple of {factor}" in panel.error
    assert "height" in panel.status.value and not panel.button.disabled


def test_errors_are_shown_in_the_panel_and_it_keeps_working(cache):
    panel = GenerationPanel(model="toy", cache=cache, steps=2, preview_every=0)
    panel.prompt.value = "   "
    panel.button.click()
    assert "prompt is empty" in panel.error and "prompt is empty" in panel.status.value
    assert panel.last_result is None

    # any failure inside generation (here an argument generate does not take) is a message, not a dead cell
    broken = GenerationPanel(model="toy", cache=cache, steps=2, preview_every=0,
                             controls={"no_such_argument": widgets.IntText(value=1)})
    broken.button.click()
    assert "no_such_argument" in broken.error

    panel.prompt.value = PROMPT
    panel.button.click()
    assert panel.error is None and panel.last_result is not None


def test_random_seed_button_draws_new_seeds(cache):
    panel = GenerationPanel(model="toy", cache=cache, seed=42)
    seeds = set()
    for _ in range(3):
        panel.random_seed.click()
        seeds.add(panel.seed.value)
    assert len(seeds) == 3 and all(0 <= seed < 2**31 for seed in seeds) and 42 not in seeds


def test_model_dropdown_loads_each_model_once(toy_pipe, cache, monkeypatch):
    loads = []

    def loader(model, **kwargs):
        loads.append(model)
        return load_pipeline(model, device="cpu", **kwargs)

    cache.loader = loader
    models = [("toy", "toy"), ("tiny random", "tiny-random"), ("missing", "nobody/no-such-model")]
    panel = GenerationPanel(model="toy", models=models, cache=cache, steps=2, preview_every=0)
    assert panel.pipe is toy_pipe and loads == []

    panel.model.value = "tiny-random"
    tiny = panel.pipe
    assert loads == ["tiny-random"] and tiny is not toy_pipe
    assert (panel.height.value, panel.width.value) == default_size(tiny)
    assert panel.height.step == tiny.vae_scale_factor
    panel.button.click()
    assert panel.error is None and panel.last_result.images[0].size == default_size(tiny)[::-1]

    panel.model.value = "toy"
    panel.model.value = "tiny-random"
    assert loads == ["tiny-random"] and panel.pipe is tiny  # cached: loaded once

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    panel.model.value = "nobody/no-such-model"  # cannot load offline: the panel says why and keeps its model
    assert "nobody/no-such-model" in panel.error and "HF_HUB_OFFLINE" in panel.error
    assert panel.model.value == "tiny-random" and panel.pipe is tiny


def test_controls_and_extra_kwargs_reach_generate(toy_pipe, cache):
    """Notebooks add knobs (06: the control scale, 05: an alpha slider) without subclassing the panel."""
    eta = widgets.FloatSlider(value=1.0, min=0.0, max=1.0, description="eta")
    panel = GenerationPanel(model="toy", cache=cache, steps=4, preview_every=0, scheduler="ddim",
                            controls={"eta": eta})
    panel.prompt.value = PROMPT
    panel.button.click()
    with_eta = generate(toy_pipe, [PROMPT], seeds=[42], num_inference_steps=4, scheduler="ddim", eta=1.0)
    without = generate(toy_pipe, [PROMPT], seeds=[42], num_inference_steps=4, scheduler="ddim", eta=0.0)
    assert_same_pictures(panel.last_result.images, with_eta.images, atol=0)
    assert_different_pictures(with_eta.images, without.images, at_least=0)
    assert eta in panel.widget().children

    computed = GenerationPanel(model="toy", cache=cache, steps=4, preview_every=0, scheduler="ddim",
                               extra_kwargs=lambda panel, pipe: {"eta": 1.0 if pipe is toy_pipe else 0.0})
    computed.prompt.value = PROMPT
    computed.button.click()
    assert_same_pictures(computed.last_result.images, with_eta.images, atol=0)


def test_controlnet_panel_has_a_control_scale_slider(toy_depth_pipe):
    """Notebook 06's panel: a depth map stays, the slider sets controlnet_conditioning_scale."""
    from helpers.toy import sample_scenes

    pipe = toy_depth_pipe
    scenes = sample_scenes(1, seed=3)
    control_image = scenes.control_images()[0]
    panel = GenerationPanel.with_control(pipe, control_image, prompt=scenes.prompts[0], steps=6, preview_every=0,
                                         cache=PipelineCache())
    made = {}
    for scale in (1.0, 0.0):
        panel.controls["controlnet_conditioning_scale"].value = scale
        panel.button.click()
        assert panel.error is None, panel.error
        made[scale] = pixels(panel.last_result.images[0])
        expected = generate(pipe, scenes.prompts[:1], seeds=[42], num_inference_steps=6, image=control_image,
                            controlnet_conditioning_scale=scale)
        assert_same_pictures([made[scale]], expected.images, atol=0)
    assert np.abs(made[1.0] - made[0.0]).mean() > 5, "the control scale changes the picture"
    assert panel.controlnet == "depth"


def test_a_given_pipeline_is_used_as_it_is(toy_pipe):
    panel = GenerationPanel(toy_pipe, steps=2, cache=PipelineCache())
    assert panel.pipe is toy_pipe and panel.model.value == "pipe"
    assert [value for _, value in panel.model.options][:2] == ["pipe", "toy"]


def test_frontend_detection(monkeypatch):
    monkeypatch.delenv("SD_HEADLESS", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert frontend_status() == (False, "not in a notebook kernel")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert frontend_status()[0] is False and "Kaggle" in frontend_status()[1]
    monkeypatch.setenv("SD_HEADLESS", "0")
    assert frontend_status() == (True, "SD_HEADLESS=0")


def test_show_under_papermill_draws_a_static_result(tmp_path):
    """In a papermill run nobody can click: show() says so and draws one result made with the panel's settings."""
    import papermill as pm

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "from helpers.serving.ui import GenerationPanel, frontend_status\nprint(frontend_status())"),
        nbformat.v4.new_code_cell(f"GenerationPanel(model='toy', prompt={PROMPT!r}, steps=3, batch_size=2).show()"),
    ]
    nbformat.write(notebook, tmp_path / "panel.ipynb")
    pm.execute_notebook(str(tmp_path / "panel.ipynb"), str(tmp_path / "ran.ipynb"), cwd=str(tmp_path),
                        kernel_name="python3", progress_bar=False)
    ran = nbformat.read(tmp_path / "ran.ipynb", as_version=4)
    status_text = "".join(out.get("text", "") for out in ran.cells[0].outputs)
    assert "(False, 'run by papermill/nbclient')" in status_text
    outputs = ran.cells[1].outputs
    text = "".join(out.get("text", "") for out in outputs)
    assert "No frontend to click in (run by papermill/nbclient)" in text
    assert "denoise" in text and "(2 images)" in text and "previews" not in text  # no previews nobody sees
    pictures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(pictures) == 1, "one static grid of the two images"
    widget_views = [out["data"]["text/plain"] for out in outputs
                    if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    assert not any("VBox" in view or "Button" in view for view in widget_views), widget_views  # (loading bars only)


def test_alpha_slider_swaps_the_frame():
    from helpers.serving.ui import AlphaSlider

    frames = [np.full((8, 8, 3), value, np.uint8) for value in (0, 120, 250)]
    slider = AlphaSlider(frames, [0.0, 0.5, 1.0])
    assert slider.image.value == slider.frames[0] and slider.alpha == 0.0
    slider.slider.value = 2  # what dragging does: the observer swaps the picture
    assert slider.image.value == slider.frames[2] and slider.alpha == 1.0
    assert len(set(slider.frames)) == 3
    assert slider.static_strip().size == (24, 8)
    with pytest.raises(ValueError, match="one image per alpha"):
        AlphaSlider(frames, [0.0, 1.0])
