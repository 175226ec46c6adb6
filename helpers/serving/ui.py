"""An ipywidgets panel to generate images interactively: `GenerationPanel(pipe).show()` in a notebook.

Prompt, negative prompt, model (loaded once, then cached), scheduler, steps, guidance, seed (with a "random" button),
height/width in steps of the VAE's scale factor, batch size; Generate shows the images, each stage's time, a progress
bar while denoising and a preview every k steps. Errors are shown in the panel, which stays usable.

Notebooks add their own knobs: `controls={"eta": widgets.FloatSlider(...)}` passes each widget's value to `generate`
under that name; `extra_kwargs=lambda panel, pipe: {...}` adds computed arguments (start latents, control images).
`GenerationPanel.with_control(pipe, control_image)` is the ControlNet panel: a control-scale slider (notebook 06).

Under papermill or nbconvert (no frontend to click in) `show()` draws one static result made with the panel's
current settings and says so, instead of waiting for a click that never comes.
"""

from __future__ import annotations

import html
import io
import os
import sys
from collections.abc import Callable, Sequence

import ipywidgets as widgets
from IPython.display import display

from helpers.core.models import DEFAULT_SCHEDULER, SCHEDULERS
from helpers.core.pictures import upscale
from helpers.core.stages import Generation, default_size
from helpers.serving.interactive import (
    MAX_BATCH_SIZE,
    MAX_SIDE_FACTOR,
    MAX_STEPS,
    MODEL_CHOICES,
    PIPELINES,
    PipelineCache,
    Request,
    random_seed,
    run_generation,
)

NOTEBOOK_PIPE = "pipe"  # the model value under which a panel's given pipeline is cached
DISPLAY_PX = 256  # images smaller than this (the toy's 64 px) are enlarged, pixel for pixel, to look at


def frontend_status() -> tuple[bool, str]:
    """(is there a frontend that can click the panel's button, why we think so)."""
    forced = os.environ.get("SD_HEADLESS")
    if forced in ("0", "1"):
        return forced == "0", f"SD_HEADLESS={forced}"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") == "Batch":
        return False, "a Kaggle batch run (Save & Run All)"
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False, "not in a notebook kernel"
    if "google.colab" in sys.modules:  # Colab's own kernel (papermill's kernels do not import it)
        return True, "Colab"
    # nbclient (papermill, nbconvert --execute) starts its kernels with an in-memory history; a Jupyter server,
    # VS Code and Kaggle's editor do not.
    if str(getattr(shell.history_manager, "hist_file", "")) == ":memory:":
        return False, "run by papermill/nbclient"
    return True, "a notebook frontend"


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _enlarged(image):
    return upscale(image, max(1, DISPLAY_PX // image.width))


class GenerationPanel:
    """Widgets in, images out; each click runs `helpers.serving.interactive.run_generation` (hence `generate`)."""

    def __init__(
        self,
        pipe=None,
        *,
        model: str | None = None,
        models: Sequence[tuple[str, str]] = MODEL_CHOICES,
        controlnet: str | None = None,
        prompt: str = "a large orange circle on the left on a white background",
        negative_prompt: str = "",
        seed: int = 42,
        steps: int = 20,
        guidance_scale: float = 7.5,
        scheduler: str = DEFAULT_SCHEDULER,
        batch_size: int = 1,
        preview_every: int = 5,
        controls: dict[str, widgets.ValueWidget] | None = None,
        extra_kwargs: Callable[[GenerationPanel, object], dict] | None = None,
        cache: PipelineCache = PIPELINES,
    ):
        self.cache, self.controlnet = cache, controlnet
        self.controls, self.extra_kwargs = dict(controls or {}), extra_kwargs
        self.last_result: Generation | None = None
        self.previews: list[tuple[int, list]] = []  # (step, images) of the last run
        self.error: str | None = None  # the last click's error message, None after a success
        model = model or (NOTEBOOK_PIPE if pipe is not None else "toy")
        if pipe is not None:
            cache.put(model, pipe, controlnet)
        options = list(models) if any(value == model for _, value in models) else [("this notebook's pipe", model),
                                                                                   *models]
        self._build_widgets(options, model, prompt, negative_prompt, seed, steps, guidance_scale, scheduler,
                            batch_size, preview_every)
        self.pipe = None
        self._load(model)

    @classmethod
    def with_control(cls, pipe, control_image, *, scale: float = 1.0, controlnet: str = "depth", **kwargs):
        """A panel for a ControlNet pipeline (notebook 06): the control image stays, a slider sets
        `controlnet_conditioning_scale`; other models chosen in the dropdown load with the same `controlnet`."""
        slider = widgets.FloatSlider(value=scale, min=0.0, max=2.0, step=0.05, description="control scale")
        controls = {"controlnet_conditioning_scale": slider, **kwargs.pop("controls", {})}
        return cls(pipe, controlnet=controlnet, controls=controls,
                   extra_kwargs=lambda panel, pipe: {"image": control_image}, **kwargs)

    # -- layout --------------------------------------------------------------------------------------

    def _build_widgets(self, options, model, prompt, negative_prompt, seed, steps, guidance_scale, scheduler,
                       batch_size, preview_every) -> None:
        wide = widgets.Layout(width="95%")
        self.model = widgets.Dropdown(options=options, value=model, description="model")
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=wide)
        self.negative_prompt = widgets.Text(value=negative_prompt, description="negative", layout=wide)
        self.scheduler = widgets.Dropdown(options=[DEFAULT_SCHEDULER, *sorted(SCHEDULERS)], value=scheduler,
                                          description="scheduler")
        self.steps = widgets.IntSlider(value=steps, min=1, max=MAX_STEPS, description="steps")
        self.guidance_scale = widgets.FloatSlider(value=guidance_scale, min=1.0, max=20.0, step=0.5,
                                                  description="guidance")
        self.seed = widgets.IntText(value=seed, description="seed")
        self.random_seed = widgets.Button(description="random", icon="random", tooltip="draw a new seed")
        self.height = widgets.IntSlider(description="height")  # range and step: set by the model (_fit_sizes)
        self.width = widgets.IntSlider(description="width")
        self.batch_size = widgets.IntSlider(value=batch_size, min=1, max=MAX_BATCH_SIZE, description="batch")
        self.preview_every = widgets.IntSlider(value=preview_every, min=0, max=50, description="preview every",
                                               tooltip="show the image every k steps while denoising (0: off)")
        self.button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=steps, description="denoise")
        self.status = widgets.HTML()
        self.preview_box = widgets.HBox()
        self.image_box = widgets.HBox()
        self.timings = widgets.HTML()
        self.model.observe(self._on_model_change, names="value")
        self.random_seed.on_click(self._on_random_seed)
        self.button.on_click(self._on_click)

    def widget(self) -> widgets.Widget:
        rows = [
            widgets.HBox([self.model, self.scheduler]), self.prompt, self.negative_prompt,
            widgets.HBox([self.steps, self.guidance_scale]), widgets.HBox([self.seed, self.random_seed]),
            widgets.HBox([self.height, self.width]), widgets.HBox([self.batch_size, self.preview_every]),
            *self.controls.values(),
            widgets.HBox([self.button, self.progress]), self.status, self.preview_box, self.image_box, self.timings,
        ]
        return widgets.VBox(rows)

    def show(self) -> None:
        """The panel in a live notebook; under papermill/nbconvert one static result with the current settings."""
        interactive, reason = frontend_status()
        if interactive:
            display(self.widget())
            return
        print(f"No frontend to click in ({reason}): the panel is not drawn; here is one result with its settings. "
              "(SD_HEADLESS=0 draws it anyway.)")
        self.preview_every.value = 0  # nobody would see the previews: do not spend time decoding them
        self.button.click()
        if self.error:
            print(self.error)
            return
        from diffusers.utils import make_image_grid

        images = [_enlarged(image) for image in self.last_result.images]
        display(make_image_grid(images, rows=1, cols=len(images)))
        print(self.last_result.timing_report())

    # -- handlers ------------------------------------------------------------------------------------

    def _load(self, model: str) -> bool:
        """Make `model` the panel's pipeline (loaded once per process); False, with the error shown, if it fails."""
        self._set_status(f"loading {model} ...")
        try:
            self.pipe = self.cache.get(model, self.controlnet)
        except Exception as error:  # keep the panel alive whatever the loader raised
            self._show_error(str(error))
            return False
        self._fit_sizes()
        self._set_status(f"model: {model}")
        return True

    def _fit_sizes(self) -> None:
        """Sliders in steps of the VAE factor, from one latent pixel up to MAX_SIDE_FACTOR x the trained size."""
        factor = self.pipe.vae_scale_factor
        for slider, default in zip((self.height, self.width), default_size(self.pipe)):
            slider.max = max(slider.max, MAX_SIDE_FACTOR * default)  # widen first, so value and min always fit
            slider.min, slider.step = factor, factor
            slider.value, slider.max = default, MAX_SIDE_FACTOR * default

    def _on_model_change(self, change) -> None:
        if not self._load(change["new"]) and self.pipe is not None:
            self.model.unobserve(self._on_model_change, names="value")
            self.model.value = change["old"]  # the dropdown shows the model that will really run
            self.model.observe(self._on_model_change, names="value")

    def _on_random_seed(self, _button=None) -> None:
        self.seed.value = random_seed()

    def _on_click(self, _button=None) -> None:
        self.button.disabled = True
        self.previews, self.error = [], None
        self._set_status("generating ...")
        try:
            self.last_result = self.generate()
        except Exception as error:  # bad input or a failing model: say so in the panel, never a dead cell
            self._show_error(f"Cannot generate: {error}")
        else:
            self._show_result(self.last_result)
        finally:
            self.button.disabled = False

    # -- generation ----------------------------------------------------------------------------------

    def request(self) -> Request:
        extra = {name: control.value for name, control in self.controls.items()}
        if self.extra_kwargs is not None:
            extra.update(self.extra_kwargs(self, self.pipe))
        return Request(
            prompt=self.prompt.value, negative_prompt=self.negative_prompt.value,
            num_inference_steps=self.steps.value, guidance_scale=self.guidance_scale.value, seed=self.seed.value,
            height=self.height.value, width=self.width.value, batch_size=self.batch_size.value,
            scheduler=self.scheduler.value, extra=extra,
        )

    def generate(self) -> Generation:
        """One generation with the widgets' values; raises on bad values (the click handler shows the error)."""
        if self.pipe is None:
            raise RuntimeError(f"no model is loaded: choose one in the model dropdown ({self.error})")
        self.progress.value = 0
        return run_generation(self.pipe, self.request(), progress=self._on_progress, preview=self._on_preview,
                              preview_every=self.preview_every.value)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max, self.progress.value = total, done
        self.progress.description = f"{done}/{total}"

    def _on_preview(self, step: int, images: list) -> None:
        self.previews.append((step, images))
        self.preview_box.children = [self._image_widget(image, f"step {step}") for image in images]

    # -- showing -------------------------------------------------------------------------------------

    def _image_widget(self, image, title: str) -> widgets.Widget:
        picture = widgets.Image(value=png_bytes(_enlarged(image)), format="png")
        return widgets.VBox([widgets.HTML(f"<small>{title}</small>"), picture])

    def _show_result(self, result: Generation) -> None:
        seeds = [self.seed.value + i for i in range(len(result.images))]
        self.image_box.children = [self._image_widget(image, f"seed {seed}")
                                   for image, seed in zip(result.images, seeds)]
        rows = "".join(f"<tr><td>{name}</td><td>{seconds:.3f} s</td></tr>" for name, seconds in result.timings.items())
        self.timings.value = f"<table>{rows}</table>"
        height, width = result.images[0].height, result.images[0].width
        self._set_status(f"{len(result.images)} image(s), {height}×{width}, {result.timing_report()}")

    def _set_status(self, text: str) -> None:
        self.status.value = f"<span>{html.escape(text)}</span>"

    def _show_error(self, message: str) -> None:
        self.error = message
        self.status.value = f"<b style='color:#b00020'>{html.escape(message)}</b>"


class AlphaSlider:
    """A slider that scrubs through precomputed interpolation frames: `AlphaSlider(images, alphas).show()`.

    The frames are computed once (decoding on every move would lag); moving the slider swaps the picture. Without a
    frontend (papermill, nbconvert: see `frontend_status`) `show()` draws the frames as one static strip instead."""

    def __init__(self, images, alphas, zoom: int = 1, description: str = "alpha"):
        if len(images) != len(alphas) or len(images) < 2:
            raise ValueError(f"AlphaSlider needs one image per alpha (at least 2): {len(images)} images, "
                             f"{len(alphas)} alphas")
        self.alphas = [float(a) for a in alphas]
        self.frames = []  # PNG bytes, as widgets.Image wants them
        for image in images:
            buffer = io.BytesIO()
            upscale(image, zoom).save(buffer, format="PNG")
            self.frames.append(buffer.getvalue())
        self.slider = widgets.SelectionSlider(options=[(f"{a:.2f}", i) for i, a in enumerate(self.alphas)],
                                              value=0, description=description, continuous_update=True)
        self.image = widgets.Image(value=self.frames[0], format="png")
        self.slider.observe(self._on_change, names="value")

    @property
    def alpha(self) -> float:
        return self.alphas[self.slider.value]

    def _on_change(self, change) -> None:
        self.image.value = self.frames[change["new"]]

    def widget(self) -> widgets.Widget:
        return widgets.VBox([self.slider, self.image])

    def static_strip(self):
        """All frames side by side, as one PIL image: what a run without a frontend shows."""
        from diffusers.utils import make_image_grid
        from PIL import Image

        frames = [Image.open(io.BytesIO(frame)).convert("RGB") for frame in self.frames]
        return make_image_grid(frames, rows=1, cols=len(frames))

    def show(self) -> None:
        live, why = frontend_status()
        if live:
            display(self.widget())
            return
        print(f"No frontend to drag a slider in ({why}): the frames at alpha {[round(a, 2) for a in self.alphas]}")
        display(self.static_strip())
