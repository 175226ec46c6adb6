"""OpenVINO as a peer engine: every network of a pipeline (text encoder, UNet, ControlNet, VAE decoder, as
optimum-intel's `OVStableDiffusionPipeline` runs them) converted offline from the loaded PyTorch modules
(`openvino.convert_model`) and run by OpenVINO's CPU plugin, behind modules that `core.stages` calls exactly like
the originals.

Shapes are static, as OpenVINO runs fastest: one compiled model per set of input shapes (a guidance cut-off halves
the UNet batch, so that run compiles twice); each network is traced once and its graph reshaped for new shapes.
`precision` is OpenVINO's inference precision hint ("f32" or "bf16").
"""

from __future__ import annotations

import io
import time
import warnings
from contextlib import contextmanager

import numpy as np
import openvino
import torch

from helpers.core.measure import measure


def compile_config(precision: str) -> dict:
    """OpenVINO's CPU plugin settings: the precision hint, and torch's thread count (OpenVINO's own default is every
    core, which would race a PyTorch rung held to fewer threads, and fight other jobs on a shared machine)."""
    return {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads()}


def layer_rate(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], flops: float, precision: str = "f32",
               int8: bool = False, repeats: int = 5) -> float:
    """FLOP/s (or int8 operations a second) of `module` on `inputs` run by OpenVINO's CPU plugin in `precision`
    ("f32" or "bf16"), with torch's threads, median of repeats; `int8`: quantized first by NNCF (weights and
    activations, VNNI or AMX-INT8 where the CPU has them), calibrated on random inputs of the same shapes. Its
    oneDNN kernels can beat torch's own (fp32 matmul on one AMD EPYC thread: 193 against 92 GFLOP/s), so a roofline
    that ignored them would put OpenVINO above 100% of it."""
    with torch.no_grad():
        model = openvino.convert_model(module.eval(), example_input=inputs)
    if int8:
        import nncf  # heavy (scikit-learn, pandas): only the int8 rungs need it

        calibration = nncf.Dataset([[torch.randn_like(x).numpy() for x in inputs] for _ in range(4)])
        with quiet_nncf_progress():
            model = nncf.quantize(model, calibration, subset_size=4)
    compiled = openvino.compile_model(model, "CPU", compile_config(precision))
    arrays = [x.numpy() for x in inputs]
    return flops / measure("openvino layer", lambda: compiled(arrays), repeats=repeats).median


@contextmanager
def quiet_nncf_progress():
    """NNCF draws rich progress bars ("Statistics collection", "Applying Smooth Quant", ...) for every network it
    quantizes: a dozen bars a rung, in a notebook or a log, that no user can act on. Its bars draw on rich's global
    console, which is pointed at a buffer for the duration (NNCF's warnings go through `logging`, untouched)."""
    import rich

    saved = rich.get_console()
    rich._console = rich.console.Console(file=io.StringIO(), force_jupyter=False, force_terminal=False)
    try:
        yield
    finally:
        rich._console = saved


class _OpenVINOModule(torch.nn.Module):
    """Shared part: converts on first use per input shapes, runs, and exposes what the loop reads (config, dtype,
    device) like a diffusers model."""

    def __init__(self, module: torch.nn.Module, precision: str, int8: bool = False):
        super().__init__()
        if precision not in ("f32", "bf16"):
            raise ValueError(f"precision={precision!r} must be 'f32' or 'bf16'")
        self.config = module.config
        self.precision = precision
        # int8: NNCF's post-training quantization (weights and activations), calibrated on the inputs of the calls
        # made until `finish_calibration()`: until then the PyTorch module answers and its inputs are kept
        self.calibration: list[tuple[torch.Tensor, ...]] | None = [] if int8 else None
        self._source = [module.float().eval()]  # a list: not registered as a submodule, not moved or copied twice
        self._model = None  # the converted graph (openvino.Model), reshaped for each new set of input shapes
        self._compiled: dict = {}
        self.convert_seconds = 0.0
        self.traces = 0  # how often the PyTorch module was traced (once: new shapes reshape the graph)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # inputs and outputs; the precision inside is OpenVINO's hint

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def inference_precision(self) -> str | None:
        """The precision OpenVINO actually runs in (a bf16 hint falls back to f32 on CPUs without bf16 units)."""
        for compiled in self._compiled.values():
            return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32" or "bf16"
        return None

    @property
    def quantized(self) -> bool:
        """Whether the graph holds NNCF's int8 quantize/dequantize pairs (FakeQuantize operations)."""
        return self._model is not None and any(op.get_type_name() == "FakeQuantize" for op in self._model.get_ops())

    def flat_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def run(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if self.calibration is not None and self._model is None:  # int8, still calibrating: PyTorch answers
            self.calibration.append(tuple(x.detach().clone() for x in inputs))
            with torch.no_grad():
                outputs = self.flat_module()(*inputs)
            return list(outputs) if isinstance(outputs, tuple) else [outputs]
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self._compiled:
            start = time.perf_counter()
            if self._model is None:  # traced once (seconds); new input shapes only reshape it (a fraction of that)
                self._model = self._convert(inputs)
            else:
                self._model.reshape({index: list(x.shape) for index, x in enumerate(inputs)})
            self._compiled[key] = openvino.compile_model(self._model, "CPU", compile_config(self.precision))
            self.convert_seconds += time.perf_counter() - start
        compiled = self._compiled[key]
        outputs = compiled([x.detach().numpy() for x in inputs])
        return [torch.from_numpy(np.asarray(outputs[out])) for out in compiled.outputs]


    def _convert(self, inputs: tuple[torch.Tensor, ...]):
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's notes on Python branches over shapes: each branch it records is the one these networks
            # take at every shape the loop gives them
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            model = openvino.convert_model(self.flat_module(), example_input=inputs)
        self.traces += 1
        return model

    def finish_calibration(self) -> None:
        """Quantize to int8 with NNCF on the inputs the calls so far were given (one at least), at the shapes of the
        first; later calls run the quantized graph (reshaped for new shapes). A no-op for a network that is not int8
        or is already quantized."""
        if self.calibration is None or self._model is not None:
            return
        if not self.calibration:
            raise RuntimeError(f"{type(self).__name__}: no call to calibrate int8 on; run one request first")
        import nncf  # heavy (scikit-learn, pandas): only the int8 rungs need it

        start = time.perf_counter()
        shapes = [tuple(x.shape) for x in self.calibration[0]]
        # the traced graph takes the first call's shapes (a guidance cut-off halves the batch of the later ones)
        samples = [[x.numpy() for x in sample] for sample in self.calibration
                   if [tuple(x.shape) for x in sample] == shapes]
        model = self._convert(self.calibration[0])
        with quiet_nncf_progress():
            self._model = nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                                        subset_size=len(samples), preset=nncf.QuantizationPreset.MIXED)
        self.calibration = []  # kept empty: quantized
        self.convert_seconds += time.perf_counter() - start


class _FlatUNet(torch.nn.Module):
    """The UNet with positional inputs only (what convert_model traces): residuals last, mid block's at the end."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        extra = {}
        if residuals:
            extra = {"down_block_additional_residuals": list(residuals[:-1]),
                     "mid_block_additional_residual": residuals[-1]}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **extra)[0]


class OpenVINOUNet(_OpenVINOModule):
    def flat_module(self) -> torch.nn.Module:
        return _FlatUNet(self._source[0])

    def forward(self, sample, timestep, encoder_hidden_states=None, down_block_additional_residuals=None,
                mid_block_additional_residual=None, return_dict=False, **kwargs):
        if kwargs:
            raise ValueError(f"the OpenVINO UNet does not take {sorted(kwargs)}")
        residuals = ()
        if down_block_additional_residuals is not None:
            residuals = (*down_block_additional_residuals, mid_block_additional_residual)
        timestep = torch.as_tensor(timestep)
        (noise_pred,) = self.run((sample.float(), timestep, encoder_hidden_states.float(),
                                  *(r.float() for r in residuals)))
        return (noise_pred,)


class _FlatControlNet(torch.nn.Module):
    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                                    return_dict=False)
        return (*down, mid)


class OpenVINOControlNet(_OpenVINOModule):
    def flat_module(self) -> torch.nn.Module:
        return _FlatControlNet(self._source[0])

    def forward(self, sample, timestep, encoder_hidden_states=None, controlnet_cond=None, conditioning_scale=1.0,
                guess_mode=False, return_dict=False, **kwargs):
        if guess_mode or kwargs:
            raise ValueError("the OpenVINO ControlNet runs without guess_mode and extra arguments")
        scale = torch.tensor(float(conditioning_scale))
        outputs = self.run((sample.float(), torch.as_tensor(timestep), encoder_hidden_states.float(),
                            controlnet_cond.float(), scale))
        return outputs[:-1], outputs[-1]


class _FlatTextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class OpenVINOTextEncoder(_OpenVINOModule):
    """CLIP's last hidden state from token ids, as `core.stages.encode_text` reads it (`text_encoder(ids)[0]`)."""

    def flat_module(self) -> torch.nn.Module:
        return _FlatTextEncoder(self._source[0])

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is not None or kwargs:
            raise ValueError("the OpenVINO text encoder takes token ids only (as the pipelines call it)")
        (last_hidden_state,) = self.run((input_ids,))
        return (last_hidden_state,)


class _FlatDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class OpenVINOVAE(_OpenVINOModule):
    """The VAE's decoder run by OpenVINO (an AutoencoderKL's or a tiny one's); `encode` (img2img, once per image)
    stays the PyTorch VAE's."""

    def flat_module(self) -> torch.nn.Module:
        return _FlatDecoder(self._source[0])

    def decode(self, latents, return_dict=False):
        if return_dict:
            raise ValueError("the OpenVINO VAE returns a tuple: call decode(latents, return_dict=False)")
        (image,) = self.run((latents.float(),))
        return (image,)

    def encode(self, *args, **kwargs):
        return self._source[0].encode(*args, **kwargs)
