"""Library log lines a user of this series cannot act on, filtered precisely: by logger and by message.

Never blanket-silenced: each filter names the one logger and the one message it drops, and why.
- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." on every import
  of diffusers' SD pipeline. torchvision is left out on purpose (PyPI's breaks beside the CPU torch: DESIGN.md) and
  the PIL fallback is what we use.
- diffusers: "There are modules in UNet2DConditionModel that should be kept in float32: []" on every `.to(dtype)`.
  With an empty list nothing is kept in float32, so there is nothing inconsistent to warn about; a non-empty list
  still warns.
- diffusers: "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'" on every
  `pipe.load_lora_weights` of a LoRA that adapts the UNet only, as LCM-LoRA does (notebook 07's lcm rungs): a text
  encoder left alone is what such a LoRA means. A UNet without keys still warns (another logger, peft's loader).
- transformers: "`loss_type=None` was set in the config but it is unrecognized. Using the default loss" when
  OpenVINO traces the text encoder (notebook 07): the tracer reads every property, a loss among them, and no loss is
  ever computed here.
- torchao: "Failed to load .../torchao/_C_mxfp8...so: Could not load this library" (and `_C_cutlass_90a`) on import,
  with a CPU build of torch (notebook 07's torch int8 rung): those are its CUDA kernels (MX fp8, Hopper CUTLASS),
  which a CPU never runs; its CPU kernels load. Any other library that fails to load still warns. torch's
  "<enum 'KernelPreference'> is an Enum subclass ... Calling register_constant() on Enum subclasses is deprecated",
  logged as torchao registers its enums the way older torches needed: a note to torchao's authors. And diffusers'
  "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`", on
  every import of diffusers beside torchao 0.16 or later (diffusers 0.42 looks for a module torchao has since
  moved): this project never loads a torchao-serialized checkpoint, it quantizes in memory.
- PyTorch's profiler (kineto) prints "USDT: ... profiler_start" / "profiler_stop" to stderr around every profile
  (notebook 07 profiles its requests): its log level, `KINETO_LOG_LEVEL`, defaults to 6 here (the lines are
  trace markers for system tracers). It is read when torch is first imported, so `helpers` sets it on import
  (the notebooks import `helpers` first) and kernels started by `python -m helpers run` inherit it; a value you set
  is kept.
"""

from __future__ import annotations

import logging
import os
import re

FILTERS = {
    "transformers.utils.import_utils": re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\)"),
    "diffusers.models.modeling_utils": re.compile(r"that should be kept in float32: \[\]\."),
    "diffusers.loaders.lora_base": re.compile(r"No LoRA keys associated to CLIPTextModel found with the "
                                              r"prefix='text_encoder'"),
    "transformers.modeling_utils": re.compile(r"`loss_type=None` was set in the config but it is unrecognized"),
    "torch.utils._pytree": re.compile(r"<enum '\w+'> is an Enum subclass .* register_constant\(\) on Enum "
                                      r"subclasses is deprecated"),
    "diffusers.quantizers.torchao.torchao_quantizer": re.compile(r"Unable to import `torchao` Tensor objects\. This "
                                                                 r"may affect loading checkpoints serialized"),
    "torchao": re.compile(r"Failed to load \S*/torchao/_C_(mxfp8|cutlass_90a)\S*\.so: Could not load this library"),
}


class DropMessage(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


KINETO_QUIET_LEVEL = "6"  # below it kineto prints its USDT trace markers


def install() -> None:
    """Add the filters (once) to the loggers that emit those lines; quiet kineto unless told otherwise."""
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET_LEVEL)
    for name, pattern in FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(DropMessage(pattern))
