"""The web page: text in, image out. `python -m helpers app [--port 7860] [--model toy] [--online] [--share]`.

A Gradio page on 127.0.0.1: prompt, negative prompt, steps, guidance, seed, size and model in; the image and each
stage's time out, through the same three stages as everything else (`helpers.serving.interactive.run_generation`, which
calls `helpers.core.stages.generate`). A progress bar follows the denoising loop; requests queue and are served one at
a time (one model, one device); bad input is answered with a message, not a crash (ours name the field; values
past a slider's ends get Gradio's own "Value 300 is greater than maximum value 150").

Offline by default: no share link, no analytics, `HF_HUB_OFFLINE=1` unless `--online` (then hub models download on
first use), and the page uses system fonts instead of Google's, so neither the server nor the browser reaches out.
On Colab or Kaggle pass `--share` (or `launch(share=True)`) to get a public link to the page.
"""

from __future__ import annotations

import argparse
import os

# torch, diffusers and gradio are imported when the page is built: `python -m helpers ...` stays quick to start.
DEFAULT_PORT = 7860
# fill the image box (the toy's 64 px images too), enlarged pixel for pixel rather than blurred
CSS = "#output-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def _as_number(name: str, value, whole: bool = False) -> float:
    """A form field as a number; Gradio's numbers arrive as floats: refuse 3.5 steps rather than round them."""
    kind = "a whole number" if whole else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be {kind}") from None
    if whole and not number.is_integer():
        raise ValueError(f"{name}={value!r} must be {kind}")
    return number


def _as_int(name: str, value) -> int:
    return int(_as_number(name, value, whole=True))


def make_request(prompt, negative_prompt, steps, guidance_scale, seed, height, width):
    from helpers.serving.interactive import Request

    return Request(
        prompt=prompt or "", negative_prompt=negative_prompt or "", num_inference_steps=_as_int("steps", steps),
        guidance_scale=_as_number("guidance", guidance_scale), seed=_as_int("seed", seed),
        height=_as_int("height", height), width=_as_int("width", width),
    )


def generate_image(cache, model: str, request, progress=None):
    """(image, info) for one request; ValueError/ModelLoadError with a message for the page if it cannot run."""
    from helpers.serving.interactive import run_generation

    pipe = cache.get(model)
    report = None if progress is None else (lambda done, total: progress((done, total), desc="denoising"))
    result = run_generation(pipe, request, progress=report)
    info = {"model": model, "seed": request.seed, "height": result.images[0].height,
            "width": result.images[0].width, "timings": {k: round(v, 4) for k, v in result.timings.items()}}
    return result.images[0], info


def size_sliders_for(pipe) -> tuple[dict, dict]:
    """Slider settings (value, step, range) for height and width: multiples of the VAE factor."""
    from helpers.core.stages import default_size
    from helpers.serving.interactive import MAX_SIDE_FACTOR

    factor = pipe.vae_scale_factor
    return tuple({"value": side, "step": factor, "minimum": factor, "maximum": MAX_SIDE_FACTOR * side}
                 for side in default_size(pipe))


def build_app(model: str = "toy", models=None, cache=None):
    """The Gradio Blocks page (not launched); `model` is the one selected and loaded first. `models`: (label, value)
    choices (default `helpers.serving.interactive.MODEL_CHOICES`); `cache`: a PipelineCache (default: the process's)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from helpers.serving.interactive import (
        GUIDANCE_RANGE,
        MAX_STEPS,
        MODEL_CHOICES,
        PIPELINES,
        ModelLoadError,
        random_seed,
    )

    models, cache = models or MODEL_CHOICES, cache or PIPELINES

    pipe = cache.get(model)
    height_slider, width_slider = size_sliders_for(pipe)
    choices = list(models) if any(value == model for _, value in models) else [(model, model), *models]

    def on_generate(prompt, negative_prompt, steps, guidance_scale, seed, height, width, model,
                    progress=gr.Progress()):  # noqa: B008 (gradio's way to ask for a progress bar)
        try:
            request = make_request(prompt, negative_prompt, steps, guidance_scale, seed, height, width)
            return generate_image(cache, model, request, progress)
        except (ValueError, ModelLoadError) as error:  # the user's to fix: say what, keep serving
            raise gr.Error(str(error)) from None
        except Exception as error:  # anything else: a message too, never a dead page
            raise gr.Error(f"generation failed: {type(error).__name__}: {error}") from error

    def on_model_change(model):
        try:
            height, width = size_sliders_for(cache.get(model))
        except ModelLoadError as error:
            gr.Warning(str(error))
            return gr.update(), gr.update(), f"**{error}**"
        return gr.update(**height), gr.update(**width), f"model: `{model}` loaded"

    with gr.Blocks(title="Stable Diffusion, dissected") as demo:
        gr.Markdown("# Text in, image out\nThe three stages (CLIP text encoder, UNet + scheduler, VAE), timed.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value="a large orange circle on the left on a white background",
                                    elem_id="prompt")
                negative_prompt = gr.Textbox(label="Negative prompt", value="", elem_id="negative-prompt")
                model_box = gr.Dropdown(choices=choices, value=model, label="Model (or type a hub id or path)",
                                        allow_custom_value=True, elem_id="model")
                steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="steps")
                guidance_scale = gr.Slider(*GUIDANCE_RANGE, value=7.5, step=0.5, label="Guidance", elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(value=42, precision=0, label="Seed", elem_id="seed")
                    dice = gr.Button("random seed", size="sm")
                height = gr.Slider(label="Height", elem_id="height", **height_slider)
                width = gr.Slider(label="Width", elem_id="width", **width_slider)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image = gr.Image(label="Image", type="pil", format="png", height=320, elem_id="output-image")
                info = gr.JSON(label="Timings (seconds) and settings", elem_id="info")
                status = gr.Markdown(f"model: `{model}` loaded", elem_id="status")
        inputs = [prompt, negative_prompt, steps, guidance_scale, seed, height, width, model_box]
        button.click(on_generate, inputs, [image, info], api_name="generate")
        prompt.submit(on_generate, inputs, [image, info], api_name=False)
        dice.click(random_seed, None, seed, api_name=False, queue=False)
        model_box.change(on_model_change, model_box, [height, width, status], api_name=False)
    # one request at a time: a second one waits its turn instead of competing for the same model and cores. It must:
    # the fast CLIP tokenizer keeps its padding setting between calls, so two requests tokenizing at once get
    # mismatched lengths (tried with 3 at once: "negative_prompt_embeds has shape (1, 77, 64) but ... (1, 13, 64)")
    return demo.queue(default_concurrency_limit=1, max_size=64)


def page_theme():
    """Gradio's default look with the system's fonts: the default loads fonts from Google, a network look-up."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def launch(model: str = "toy", *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, share: bool = False,
           block: bool = True, models=None):
    """Build and serve the page; `share=True` on Colab/Kaggle for a public link (Gradio's default there)."""
    demo = build_app(model, models)
    demo.launch(server_name=host, server_port=port, share=share, theme=page_theme(), css=CSS, ssr_mode=False,
                prevent_thread_lock=not block, quiet=not block, show_error=True)
    return demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--model", default="toy", help="the model selected at start: 'toy', a hub id, a path")
    parser.add_argument("--online", action="store_true", help="allow hub downloads (default: HF_HUB_OFFLINE=1)")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link (needs the internet)")


def run_from_args(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise SystemExit(f"--port {args.port} is not a port: choose 1 to 65535 (e.g. {DEFAULT_PORT})")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if not args.online:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from helpers.core.models import resolve_model
    from helpers.serving.interactive import ModelLoadError

    model = resolve_model(args.model)
    print(f"Serving {model!r} on http://{args.host}:{args.port} (hub {'allowed' if args.online else 'offline'})",
          flush=True)
    try:
        launch(model, host=args.host, port=args.port, share=args.share)
    except ModelLoadError as error:
        raise SystemExit(str(error)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers app", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
