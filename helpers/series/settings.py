"""The settings in force in a notebook: its `parameters` cell, the profile that fits the model and the device, and
what you changed. One call, right after the parameters cell:

    settings = use_settings("03", globals())

- The profile: `PROFILE` when papermill (or you) set it, else the one that fits: `gpu` (SD 1.5 sized for a 16 GB T4,
  each notebook in about 15 minutes) when `MODEL` resolves to a real Stable Diffusion, `cpu` (the toy at full size)
  when it resolves to the toy. The profiles' values live in `helpers.series.profiles`, and only there.
- A knob still at its parameters-cell value takes the profile's value; a knob you changed (a Colab form field, an edit,
  `papermill -p`) is kept. Every knob that differs from the cell is printed with where its value came from.
- Under `python -m helpers rehearse` the knobs a CPU cannot afford (image size, steps, counts) are shrunk on top,
  and said so (`REHEARSAL_ENV`, a JSON object of knob values per notebook); the rehearsal's record is written too.
"""

from __future__ import annotations

import ast
import atexit
import json
from dataclasses import dataclass, field
from pathlib import Path

from helpers import SOURCE_NOTEBOOKS_DIR
from helpers.core import accelerator
from helpers.core.accelerator import rehearsal
from helpers.core.measure import peak_memory_MiB
from helpers.core.models import TOY_MODELS, default_dtype, resolve_model
from helpers.core.results import format_table
from helpers.series.profiles import parameters_for


@dataclass
class Settings:
    notebook: str
    profile: str
    why: str  # why this profile
    model: str  # MODEL resolved ("auto" → a hub id or "toy")
    accelerator: accelerator.Accelerator
    origins: dict[str, str] = field(default_factory=dict)  # knob → where its value came from (changed knobs only)
    values: dict = field(default_factory=dict)  # every knob in force

    def table(self) -> str:
        rows = [{"knob": k, "value": _short(self.values[k]), "from": v} for k, v in self.origins.items()]
        head = (f"notebook {self.notebook}: profile {self.profile!r} ({self.why}); model {self.model}; "
                f"accelerator {self.accelerator.describe()}")
        return head + ("\n" + format_table(rows) if rows else "\nevery knob as in the parameters cell")


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def notebook_defaults(number: str, folder: str | Path | None = None) -> dict:
    """The knobs of notebook `number`'s parameters cell, as written (literal values only)."""
    folder = Path(folder or SOURCE_NOTEBOOKS_DIR)
    matches = sorted(folder.glob(f"{number}_*.ipynb"))
    if not matches:
        raise FileNotFoundError(f"no notebook {number}_*.ipynb in {folder}: is the project installed from its clone?")
    cells = json.loads(matches[0].read_text())["cells"]
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ValueError(f"{matches[0].name} has no cell tagged 'parameters'")
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    defaults = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return defaults


def pick_profile(profile: str, model: str) -> tuple[str, str]:
    """(profile, why): the one asked for, else the one that fits the resolved model."""
    if profile != "auto":
        return profile, "asked for"
    if model in TOY_MODELS:
        return "cpu", f"the {model} model"
    if not accelerator.on_gpu():
        return "gpu", f"a real Stable Diffusion, sized for a GPU: slow on this {accelerator.accelerator().kind}"
    return "gpu", "a real Stable Diffusion on a GPU"


def use_settings(number: str, namespace: dict, *, folder: str | Path | None = None, show: bool = True) -> Settings:
    """Put the settings in force into `namespace` (a notebook's `globals()`) and say where each came from."""

    acc = accelerator.check_usable()  # a P100 fails here, with what to pick instead
    if acc.pretended:
        accelerator.compute_fp16_in_fp32_on_cpu()  # the rehearsal: the CPU's fp16 convolution is ~100x slower
    defaults = notebook_defaults(number, folder)
    model = resolve_model(namespace.get("MODEL", "auto"))
    profile, why = pick_profile(namespace.get("PROFILE", "auto"), model)
    origins = {}
    for knob, value in parameters_for(number, profile).items():
        if knob == "PROFILE":
            continue
        if knob not in defaults:
            raise KeyError(f"profile {profile!r} sets {knob}, which notebook {number}'s parameters cell lacks")
        if namespace[knob] == defaults[knob]:
            if value != namespace[knob]:
                namespace[knob] = value
                origins[knob] = f"{profile} profile" + (f" ({why})" if knob == "MODEL" else "")
        elif namespace[knob] != value:
            origins[knob] = "yours (kept)"
    plan = rehearsal()
    for knob, value in plan.get("shrink", {}).get(number, {}).items():
        if knob in namespace and namespace[knob] != value:
            namespace[knob], origins[knob] = value, "rehearsal: a CPU cannot afford more"
    namespace["PROFILE"] = profile
    if namespace.get("MODEL") == "auto":
        namespace["MODEL"] = model
    model = resolve_model(namespace.get("MODEL", model))
    values = {k: namespace[k] for k in defaults if k in namespace}
    settings = Settings(number, profile, why, model, acc, origins, values)
    if plan.get("record"):
        _record_at_exit(plan["record"], settings)
    if show:
        print(settings.table())
    return settings


def _record_at_exit(path: str, settings: Settings) -> None:
    """The rehearsal's record of this kernel: the settings now, the peak memory when the kernel ends."""
    record = {"notebook": settings.notebook, "profile": settings.profile, "model": settings.model,
              "accelerator": settings.accelerator.describe(), "compute_device": str(accelerator.compute_device()),
              "dtype": str(default_dtype(accelerator.compute_device())).removeprefix("torch."),
              "parameters": settings.values, "shrunk": {k: settings.values[k] for k, v in settings.origins.items()
                                                         if v.startswith("rehearsal")}}

    def write():
        record["peak_memory_gib"] = round(peak_memory_MiB() / 1024, 2)
        Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")

    write()
    atexit.register(write)
