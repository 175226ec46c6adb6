"""An ipywidgets panel to generate images interactively: prompt, seed, steps, guidance, scheduler, size."""

from __future__ import annotations

import ipywidgets as widgets
from IPython.display import display

from helpers.models import DEFAULT_SCHEDULER, SCHEDULERS
from helpers.show import upscale
from helpers.stages import default_size, generate


class GenerationPanel:
    """`GenerationPanel(pipe).show()` in a notebook; each click runs `generate` and shows image and timings."""

    def __init__(self, pipe, prompt: str = "a large orange circle on the left on a white background", seed: int = 42,
                 steps: int = 20, guidance_scale: float = 7.5, scheduler: str = DEFAULT_SCHEDULER):
        self.pipe = pipe
        height, width = default_size(pipe)
        wide = widgets.Layout(width="95%")
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=wide)
        self.negative_prompt = widgets.Text(value="", description="negative", layout=wide)
        self.seed = widgets.IntText(value=seed, description="seed")
        self.steps = widgets.IntSlider(value=steps, min=1, max=100, description="steps")
        self.guidance_scale = widgets.FloatSlider(value=guidance_scale, min=1.0, max=20.0, step=0.5,
                                                  description="guidance")
        self.scheduler = widgets.Dropdown(options=[DEFAULT_SCHEDULER, *sorted(SCHEDULERS)], value=scheduler,
                                          description="scheduler")
        factor = pipe.vae_scale_factor
        self.height = widgets.IntSlider(value=height, min=factor * 4, max=height * 2, step=factor, description="height")
        self.width = widgets.IntSlider(value=width, min=factor * 4, max=width * 2, step=factor, description="width")
        self.button = widgets.Button(description="Generate", button_style="primary")
        self.output = widgets.Output()
        self.last_result = None
        self.button.on_click(self._on_click)

    def generate(self):
        return generate(
            self.pipe,
            [self.prompt.value],
            [self.negative_prompt.value] if self.negative_prompt.value else None,
            seeds=[self.seed.value],
            num_inference_steps=self.steps.value,
            guidance_scale=self.guidance_scale.value,
            height=self.height.value,
            width=self.width.value,
            scheduler=self.scheduler.value,
            progress=False,
        )

    def _on_click(self, _button=None) -> None:
        with self.output:
            self.output.clear_output(wait=True)
            try:
                self.last_result = self.generate()
            except ValueError as error:  # bad input from the widgets: show it, keep the panel alive
                print(f"Cannot generate: {error}")
                return
            image = self.last_result.images[0]
            display(upscale(image, max(1, 256 // image.width)))
            print(self.last_result.timing_report())

    def widget(self) -> widgets.Widget:
        controls = [self.prompt, self.negative_prompt, widgets.HBox([self.seed, self.scheduler]),
                    widgets.HBox([self.steps, self.guidance_scale]), widgets.HBox([self.height, self.width])]
        return widgets.VBox([*controls, self.button, self.output])

    def show(self) -> None:
        display(self.widget())
