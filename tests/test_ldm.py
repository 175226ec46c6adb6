"""One LDM-layout single file: export is the exact inverse of diffusers' converters; components load back
offline with the same outputs; partial loads read only their own tensors."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers.core import ldm

# A few keys of the real v1-5-pruned-emaonly.safetensors, one per kind of mapping rule.
REAL_SD15_KEYS = [
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.middle_block.2.out_layers.3.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.decoder.up.3.block.0.conv1.weight",
    "first_stage_model.decoder.up.1.upsample.conv.weight",
    "first_stage_model.decoder.norm_out.weight",
    "first_stage_model.quant_conv.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.bias",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from helpers.core.random_models import tiny_random_pipeline

    pipe = tiny_random_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("tiny")
    pipe.save_pretrained(folder / "diffusers")
    path = ldm.export_ldm_checkpoint(pipe, folder / "tiny-ldm.safetensors")
    return pipe, path, folder / "diffusers"


def test_sd15_shapes_map_to_the_real_ldm_keys():
    """On SD 1.5's real configs (meta tensors, no memory): the key names of the original checkpoint, and
    diffusers' own converter turns them back into every diffusers key."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from helpers.core.random_models import sd15_configs

    configs = sd15_configs()
    with torch.device("meta"):
        pipe = types.SimpleNamespace(
            unet=UNet2DConditionModel(**configs["unet"]),
            vae=AutoencoderKL(**configs["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        )
    state = {}
    for component, prefix in ldm.LDM_PREFIXES.items():
        state.update({prefix + k: v for k, v in ldm._TO_LDM[component](getattr(pipe, component)).items()})
    missing = [k for k in REAL_SD15_KEYS if k not in state]
    assert not missing, missing
    counts = {c: sum(ldm.component_of(k) == c for k in state) for c in ldm.COMPONENTS}
    assert counts == {"unet": 686, "vae": 248, "text_encoder": 196}  # as in the real file (minus position_ids)
    assert tuple(state["first_stage_model.encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    ldm.verify_ldm_state_dict(state, pipe)  # raises if any key does not round-trip


def test_export_layout(exported):
    pipe, path, _ = exported
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert meta["layout"] == "ldm"
    assert all(ldm.component_of(k) for k in keys), [k for k in keys if not ldm.component_of(k)]
    n_params = {c: len(getattr(pipe, c).state_dict()) for c in ldm.COMPONENTS}
    assert {c: sum(ldm.component_of(k) == c for k in keys) for c in ldm.COMPONENTS} == n_params
    shares = ldm.component_byte_ranges(path)
    assert shares["other"]["tensors"] == 0
    assert 0.95 < sum(s["share"] for s in shares.values()) < 1.0  # the rest is the header


def test_export_is_checked_against_diffusers_converter(exported):
    pipe, _, _ = exported
    state = ldm.pipeline_to_ldm_state_dict(pipe)
    ldm.verify_ldm_state_dict(state, pipe)
    del state["model.diffusion_model.output_blocks.2.1.conv.weight"]  # drop one upsampler
    with pytest.raises(AssertionError, match="up_blocks.0.upsamplers.0.conv.weight"):
        ldm.verify_ldm_state_dict(state, pipe)


@pytest.mark.parametrize("partial", [False, True], ids=["from_single_file", "partial"])
def test_components_load_back_with_identical_outputs(exported, partial):
    pipe, path, config_dir = exported
    unet = ldm.load_component_from_single_file(path, "unet", config_dir, partial=partial)
    vae = ldm.load_component_from_single_file(path, "vae", config_dir, partial=partial)
    text_encoder = ldm.load_component_from_single_file(path, "text_encoder", config_dir, partial=partial)
    g = torch.Generator().manual_seed(0)
    size = pipe.unet.config.sample_size
    latents = torch.randn(2, pipe.unet.config.in_channels, size, size, generator=g)
    prompt_embeds = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    image = torch.randn(1, 3, size * pipe.vae_scale_factor, size * pipe.vae_scale_factor, generator=g)
    input_ids = pipe.tokenizer(["a red cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        pairs = {
            "unet": (unet(latents, 10, prompt_embeds).sample, pipe.unet(latents, 10, prompt_embeds).sample),
            "vae.decode": (vae.decode(latents).sample, pipe.vae.decode(latents).sample),
            "vae.encode": (vae.encode(image).latent_dist.mean, pipe.vae.encode(image).latent_dist.mean),
            "text_encoder": (text_encoder(input_ids)[0], pipe.text_encoder(input_ids)[0]),
        }
    for name, (ours, reference) in pairs.items():
        # same weights bit for bit; kernels may pick another summation order for another memory layout
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5, msg=name)


def test_fp16_export_halves_the_file(exported, tmp_path):
    pipe, path, config_dir = exported
    half = ldm.export_ldm_checkpoint(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.55 * path.stat().st_size
    unet = ldm.load_component_from_single_file(half, "unet", config_dir, partial=True, dtype=torch.float16)
    assert next(unet.parameters()).dtype == torch.float16


def test_partial_load_never_touches_other_components_bytes(exported, tmp_path):
    """Overwrite the UNet's byte range with garbage: the text encoder and VAE still load exactly."""
    pipe, path, config_dir = exported
    header, data_start = ldm.read_header(path)
    spoiled = tmp_path / "spoiled.safetensors"
    data = bytearray(path.read_bytes())
    n = 0
    for key, info in header.items():
        if ldm.component_of(key) == "unet":
            begin, end = info["data_offsets"]
            data[data_start + begin : data_start + end] = b"\xff" * (end - begin)  # NaNs in fp32
            n += 1
    spoiled.write_bytes(bytes(data))
    assert n > 0
    text_state = ldm.load_ldm_state_dict(spoiled, ldm.LDM_PREFIXES["text_encoder"])
    assert text_state and all(ldm.component_of(k) == "text_encoder" for k in text_state)
    text_encoder = ldm.load_component_from_single_file(spoiled, "text_encoder", config_dir, partial=True)
    ids = pipe.tokenizer(["a blue dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(text_encoder(ids)[0], pipe.text_encoder(ids)[0])
    unet_state = ldm.load_ldm_state_dict(spoiled, ldm.LDM_PREFIXES["unet"])
    assert all(torch.isnan(v).all() for v in unet_state.values() if v.is_floating_point())


def test_partial_measurement_reads_only_its_share(tmp_path):
    """A cold load of one component's tensors reads about its bytes, not the file (subprocess, /proc/self/io)."""
    from helpers.studies.partial import io_read_bytes, measure

    if io_read_bytes() < 0:
        pytest.skip("/proc/self/io is not available")
    mib = 1 << 20
    state = {}
    for prefix, n in [("cond_stage_model.transformer.", 4), ("first_stage_model.", 4), ("model.diffusion_model.", 24)]:
        for i in range(n):
            state[f"{prefix}w{i}"] = torch.randn(mib)  # 4 MiB each: 16 + 16 + 96 MiB
    path = tmp_path / "three.safetensors"
    save_file(state, str(path))
    full = measure(path, None)
    text = measure(path, "text_encoder")
    assert full["tensor_bytes"] == 128 * mib and text["tensor_bytes"] == 16 * mib
    assert full["read_bytes"] >= 120 * mib
    # its share is 1/8; the kernel's readahead (read_ahead_kb, 8 MiB on this VM) may add up to that much
    assert text["read_bytes"] < full["read_bytes"] / 3
    assert text["peak_rss_MiB"] > 0 and text["time_s"] > 0
    # the load alone, in MiB: all 128 MiB of tensors read and touched, against the text encoder's 16
    assert full["load_rss_MiB"] >= 100 and text["load_rss_MiB"] < full["load_rss_MiB"] / 2


def test_bad_inputs(exported, tmp_path):
    _, path, config_dir = exported
    with pytest.raises(ValueError, match="unknown component"):
        ldm.load_component_from_single_file(path, "controlnet", config_dir)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ldm.load_component_from_single_file(path, "unet", tmp_path)
    with pytest.raises(FileNotFoundError):
        ldm.load_component_from_single_file(tmp_path / "nope.safetensors", "unet", config_dir)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated by 100 bytes"):
        ldm.read_header(cut)


def test_bench_load_runs_small(tmp_path, monkeypatch, capsys):
    """`python -m helpers bench load --small`: generates the checkpoint once, prints the table, writes JSON."""
    import json

    from helpers.bench import load as bench_load

    monkeypatch.setenv("SD_OUTPUTS", str(tmp_path / "outputs"))
    argv = ["--small", "--repeats", "1", "--modes", "tensors", "--cache-dir", str(tmp_path / "cache")]
    assert bench_load.main(argv) == 0
    out = capsys.readouterr().out
    assert "text_encoder" in out and "target" in out
    result = json.loads((tmp_path / "outputs" / "bench_load.json").read_text())
    components = [row["component"] for row in result["rows"]]
    assert components == ["full file", "unet", "vae", "text_encoder"]
    assert all(row["time_s"] > 0 and row["peak_rss_MiB"] > 0 for row in result["rows"])
    assert result["shares"]["unet"]["tensors"] == 684
    mtime = (tmp_path / "cache" / "tiny-random-fp16-ldm.safetensors").stat().st_mtime
    assert bench_load.ensure_checkpoint(tmp_path / "cache", small=True)[0].stat().st_mtime == mtime  # reused


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_checkpoint_is_named_as_damaged(tmp_path, damage):
    """Truncated downloads and garbage files got diffusers' generic 'Unable to load weights'."""
    from helpers.core.ldm import DamagedCheckpointError
    from helpers.core.models import load_pipeline
    from helpers.toy import TOY_LDM_FILE

    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    data = Path(TOY_LDM_FILE).read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"<html>Access denied</html>" * 40)
    with pytest.raises(DamagedCheckpointError, match=r"is damaged \([\d,]+ bytes\).*Download it again"):
        load_pipeline(str(path), device="cpu", single_file_config=Path(TOY_LDM_FILE).parent / "sd")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a zip")
    with pytest.raises(DamagedCheckpointError, match="zip archive"):
        load_pipeline(str(ckpt), device="cpu")
