"""core.accelerator: the one place that asks which accelerator this is, and series.settings, which picks the
settings that follow the model and the device."""

import json
from types import SimpleNamespace

import pytest
import torch

from helpers.core import accelerator, limits, models
from helpers.core.accelerator import REHEARSAL_ENV
from helpers.series.profiles import notebook_number
from helpers.series.settings import notebook_defaults, use_settings

GIB = 2**30


@pytest.fixture
def fresh(monkeypatch):
    """No pretending, no budget, and the cached answer cleared before and after."""
    for key in (accelerator.PRETEND_ENV, accelerator.MEMORY_BUDGET_ENV, REHEARSAL_ENV):
        monkeypatch.delenv(key, raising=False)
    accelerator.accelerator.cache_clear()
    yield monkeypatch
    accelerator.accelerator.cache_clear()
    accelerator.restore_fp16_kernels()  # use_settings under a pretended T4 installs them


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], arch_list: list[str], total_gib: float = 16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: SimpleNamespace(
        name=name, major=capability[0], minor=capability[1], total_memory=int(total_gib * GIB)))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    accelerator.accelerator.cache_clear()


CUDA_12_WHEEL_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


def test_a_p100_without_kernels_is_named_with_what_to_pick(fresh):
    fake_gpu(fresh, "Tesla P100-PCIE-16GB", (6, 0), CUDA_12_WHEEL_ARCHS)
    assert torch.cuda.is_available(), "torch says yes: that is the trap"
    with pytest.raises(accelerator.UnsupportedGPUError, match=r"sm_60.*GPU T4 x2"):
        accelerator.on_gpu()
    with pytest.raises(accelerator.UnsupportedGPUError):
        models.resolve_model("auto")  # before: picked CUDA, and the first kernel failed


def test_a_t4_is_a_usable_gpu_deciding_fp16_without_bf16(fresh):
    fake_gpu(fresh, "Tesla T4", (7, 5), CUDA_12_WHEEL_ARCHS)
    # a T4 emulates bf16: torch says True unless asked without emulation
    fresh.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert accelerator.on_gpu() and accelerator.default_dtype() == torch.float16
    assert accelerator.compute_device() == torch.device("cuda")
    assert not accelerator.bf16_supported()
    assert accelerator.fast_half_dtype() == torch.float16


def test_cuda_free_memory_counts_pytorchs_cached_blocks_as_free(fresh):
    """After a `del`, PyTorch keeps the blocks reserved: mem_get_info calls them used, we may reuse them."""
    fake_gpu(fresh, "Tesla T4", (7, 5), CUDA_12_WHEEL_ARCHS)
    fresh.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * GIB, 15 * GIB))
    fresh.setattr(torch.cuda, "memory_reserved", lambda device=None: 9 * GIB)
    fresh.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * GIB)
    assert limits.available_bytes(torch.device("cuda")) == 7 * GIB  # 1 free + (9 reserved - 3 allocated)
    fresh.setenv(accelerator.MEMORY_BUDGET_ENV, "5")  # playing a smaller card: only our allocations count
    assert limits.available_bytes(torch.device("cuda")) == 2 * GIB


def test_the_rehearsal_decides_as_on_a_t4_and_computes_on_the_cpu(fresh, tmp_path):
    fresh.setenv(accelerator.PRETEND_ENV, "t4")
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    acc = accelerator.accelerator()
    assert acc.pretended and acc.kind == "cuda" and acc.memory_gib == 15
    assert accelerator.on_gpu() and accelerator.compute_device() == torch.device("cpu")
    assert models.default_dtype(torch.device("cpu")) == torch.float16
    assert not accelerator.bf16_supported()
    # model "auto" takes SD 1.5 when the (local) hub has it, else the toy
    fresh.setenv("HF_HUB_OFFLINE", "1")
    fresh.setenv("HF_HUB_CACHE", str(tmp_path))
    assert models.resolve_model("auto") == "toy"
    snapshot = tmp_path / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    assert models.resolve_model("auto") == models.SD15_HUB_ID


def test_a_memory_budget_refuses_what_does_not_fit(fresh, tiny_pipe):
    limits.check_fits_in_memory(tiny_pipe.unet, 1, 8, 8, "unet")
    fresh.setenv(accelerator.MEMORY_BUDGET_ENV, "0.000001")
    with pytest.raises(MemoryError, match="GiB free"):
        limits.check_fits_in_memory(tiny_pipe.unet, 1, 8, 8, "unet")
    fresh.setenv(accelerator.MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="number of GiB"):
        accelerator.free_memory_bytes("cpu")


# ---------------------------------------------------------------------------------------------------
# helpers.series.settings


def test_every_parameters_cell_leaves_the_profile_to_the_model_and_device():
    from helpers.series.run import find_notebooks

    for notebook in find_notebooks():
        assert notebook_defaults(notebook_number(notebook))["PROFILE"] == "auto", notebook.name


def test_on_a_cpu_the_toy_keeps_the_parameters_cell(fresh):
    namespace = {**notebook_defaults("03"), "PROFILE": "auto"}
    settings = use_settings("03", namespace, show=False)
    assert settings.profile == "cpu" and namespace["MODEL"] == "toy" and namespace["PROFILE"] == "cpu"
    assert namespace["N"] == 128 and list(settings.origins) == ["MODEL"]


def test_on_a_t4_sd15_gets_the_gpu_profile_and_what_you_changed_is_kept(fresh, tmp_path):
    from helpers.series.profiles import parameters_for

    fresh.setenv(accelerator.PRETEND_ENV, "t4")
    fresh.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    gpu = parameters_for("03", "gpu")
    namespace = {**notebook_defaults("03"), "PROFILE": "auto"}
    namespace["STEPS"] = 7  # the user moved a slider
    settings = use_settings("03", namespace, show=False)
    assert settings.profile == "gpu" and namespace["MODEL"] == models.SD15_HUB_ID
    assert namespace["N"] == gpu["N"] != 128 and settings.origins["N"] == "gpu profile"
    assert namespace["STEPS"] == 7
    assert "profile 'gpu'" in settings.table()


def test_papermill_profiles_still_override(fresh):
    namespace = {**notebook_defaults("03"), "PROFILE": "smoke", "MODEL": "toy", "N": 4}
    use_settings("03", namespace, show=False)
    assert namespace["N"] == 4 and namespace["PROFILE"] == "smoke"


def test_the_rehearsal_shrinks_on_top_and_records(fresh, tmp_path):
    record = tmp_path / "record.json"
    fresh.setenv(REHEARSAL_ENV, json.dumps({"shrink": {"03": {"N": 2}}, "record": str(record)}))
    namespace = {**notebook_defaults("03"), "PROFILE": "auto"}
    settings = use_settings("03", namespace, show=False)
    assert namespace["N"] == 2 and settings.origins["N"].startswith("rehearsal")
    written = json.loads(record.read_text())
    assert written["shrunk"] == {"N": 2} and written["model"] == "toy" and written["peak_memory_gib"] > 0


def test_a_profile_knob_the_notebook_lacks_is_an_error(fresh, monkeypatch):
    from helpers.series import profiles

    monkeypatch.setitem(profiles.NOTEBOOK_OVERRIDES, "03", {"cpu": {"NO_SUCH_KNOB": 1}})
    with pytest.raises(KeyError, match="NO_SUCH_KNOB"):
        use_settings("03", notebook_defaults("03"), show=False)


def test_the_rehearsal_computes_fp16_convolutions_in_fp32_and_keeps_fp16_tensors(fresh):
    import torch.nn.functional as F

    conv = torch.nn.Conv2d(8, 8, 3, padding=1).half()
    x = torch.randn(1, 8, 6, 6).half()
    accelerator.compute_fp16_in_fp32_on_cpu()
    accelerator.compute_fp16_in_fp32_on_cpu()  # idempotent: wrapped once
    assert F.conv2d.__name__ == "in_fp32" and F.linear.__name__ == "in_fp32"
    out = conv(x)
    expected = F.conv2d.__kwdefaults__["_original"](x.float(), conv.weight.float(), conv.bias.float(), 1, 1)
    assert out.dtype == torch.float16 and torch.allclose(out.float(), expected, atol=1e-2)
    assert F.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32  # other dtypes untouched
    accelerator.restore_fp16_kernels()
    assert F.conv2d.__name__ == "conv2d"
