"""studies.batching: chunked calls, the out-of-memory fallback, the sweep and "auto", stage-only loading, bad input."""

import json
import time
from pathlib import Path

import pytest
import torch

from helpers.checkpoints.single_file import single_file_for
from helpers.core import measure
from helpers.studies import batching
from helpers.studies.batching import StageJob, auto_batch_size, run_in_chunks

STEPS = 2


def recording_stage(fail_at: dict | None = None, error=torch.cuda.OutOfMemoryError):
    """A stub stage: returns its inputs' indices; raises `error` (CUDA OOM) for the (start, stop) chunks in
    `fail_at` (each entry counts how many more times that chunk fails)."""
    calls = []
    fail_at = dict(fail_at or {})

    def call(start, stop):
        calls.append((start, stop))
        if fail_at.get((start, stop), 0) > 0:
            fail_at[(start, stop)] -= 1
            raise error(f"out of memory (fake) at chunk {start}:{stop}")
        return torch.arange(start, stop)

    return call, calls


def test_chunks_never_exceed_max_batch_and_keep_order():
    call, calls = recording_stage()
    chunked = run_in_chunks(call, 7, 3)
    assert calls == [(0, 3), (3, 6), (6, 7)]
    assert chunked.chunk_sizes == [3, 3, 1] and chunked.calls == 3 and chunked.oom_halvings == []
    assert chunked.output.tolist() == list(range(7))


def test_max_batch_above_n_is_one_call():
    call, calls = recording_stage()
    assert run_in_chunks(call, 5, 64).chunk_sizes == [5] and calls == [(0, 5)]


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, MemoryError])
def test_oom_halves_the_chunk_and_keeps_finished_results(error):
    # memory runs out on the second chunk: the first one, already finished, must not run again
    call, calls = recording_stage(fail_at={(4, 8): 1}, error=error)
    chunked = run_in_chunks(call, 10, 4)
    assert calls == [(0, 4), (4, 8), (4, 6), (6, 8), (8, 10)], "finished chunk (0, 4) is kept, not recomputed"
    assert chunked.oom_halvings == [4]
    assert chunked.chunk_sizes == [4, 2, 2, 2], "after an OOM the smaller chunk size is kept"
    assert chunked.output.tolist() == list(range(10))


def test_oom_halves_repeatedly_down_to_what_fits():
    calls = []

    def room_for_three(start, stop):
        calls.append(stop - start)
        if stop - start > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return [f"x{i}" for i in range(start, stop)]

    chunked = run_in_chunks(room_for_three, 16, 16)
    assert chunked.oom_halvings == [16, 8, 4] and set(chunked.chunk_sizes) == {2}
    assert chunked.output == [f"x{i}" for i in range(16)]
    assert calls[:4] == [16, 8, 4, 2]


def test_oom_with_a_batch_of_one_is_raised_with_what_was_done():
    def never_fits(start, stop):
        if start >= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return torch.zeros(stop - start)

    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"batch of 1 \(after 2 of 4 inputs"):
        run_in_chunks(never_fits, 4, 2)


def test_other_errors_are_not_mistaken_for_oom():
    def broken(start, stop):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_in_chunks(broken, 4, 2)


def test_tuples_of_tensors_and_none_are_joined():
    call = lambda a, b: (torch.arange(a, b), None)
    output, negative = run_in_chunks(call, 5, 2).output
    assert output.tolist() == [0, 1, 2, 3, 4] and negative is None


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda: run_in_chunks(lambda a, b: None, 0, 2), r"N=0 must be a whole number of at least 1"),
        (lambda: run_in_chunks(lambda a, b: None, 4, 0), r"max_batch=0 must be"),
        (lambda: batching.load_prompts(0), r"N=0 must be"),
        (lambda: batching.load_prompts(129), r"N=129 but prompts_128.txt holds 128 prompts"),
        (lambda: batching.sweep_sizes(4, 8), r"largest=8 is more than N=4"),
        (lambda: batching.sweep_sizes(4, 0), r"largest=0 must be"),
        (lambda: batching.check_seeds([1, 2, 3], ["a", "b"]), r"seeds has 3 entries but there are only 2 prompts"),
        (lambda: auto_batch_size([{"batch_size": 1, "throughput": 1.0, "peak_MiB": 9.0}], 0.1, 1.0),
         r"memory_limit_MiB=1.0"),
        (lambda: auto_batch_size([], 1.5), r"tolerance=1.5"),
    ],
)
def test_bad_input_names_the_argument(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_job_refuses_more_seeds_than_prompts(tiny_pipe):
    with pytest.raises(ValueError, match="seeds has 4 entries but there are only 3 prompts"):
        StageJob(tiny_pipe, ["a", "b", "c"], range(4))
    with pytest.raises(ValueError, match="N=0"):
        StageJob(tiny_pipe, [], [])


def test_sweep_refuses_batch_sizes_beyond_n_or_below_one(tiny_pipe):
    job = StageJob(tiny_pipe, ["a red circle"] * 2, [0, 1], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="batch size 4 is more than N=2"):
        batching.sweep(job, "encode_text", [1, 4])
    with pytest.raises(ValueError, match="batch size=0 must be"):
        batching.sweep(job, "encode_text", [0, 1])


def test_shipped_prompts_are_make_prompts_and_varied():
    shipped = batching.load_prompts(128)
    assert shipped == batching.make_prompts(128), "helpers/data/prompts_128.txt must be regenerated by make_prompts"
    assert len(set(shipped)) == 128
    assert sum(" and a " in p or " next to a " in p or " beside a " in p for p in shipped) >= 20, "two-object prompts"
    assert len({p.split()[-2] for p in shipped if p.endswith("background")}) == 4, "every background is asked for"


def test_sweep_sizes_are_powers_of_two_then_n():
    assert batching.sweep_sizes(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert batching.sweep_sizes(6) == [1, 2, 4, 6]
    assert batching.sweep_sizes(100, 10) == [1, 2, 4, 8, 10]


def test_auto_picks_the_smallest_batch_within_tolerance_of_the_best():
    rows = [{"batch_size": b, "throughput": t, "peak_MiB": 100.0 * b}
            for b, t in [(1, 10.0), (2, 18.0), (4, 19.5), (8, 20.0), (16, 19.0)]]
    assert auto_batch_size(rows, 0.10) == 2  # 18 >= 0.9 * 20
    assert auto_batch_size(rows, 0.05) == 4
    assert auto_batch_size(rows, 0.0) == 8
    assert auto_batch_size(rows, 0.10, memory_limit_MiB=150) == 1, "the memory limit rules out 2 and up"
    best = max(r["throughput"] for r in rows)
    for tolerance in (0.0, 0.05, 0.1, 0.5):
        picked = next(r for r in rows if r["batch_size"] == auto_batch_size(rows, tolerance))
        assert picked["throughput"] >= (1 - tolerance) * best


def test_call_overhead_recovers_a_straight_line():
    rows = [{"batch_size": b, "call_s": 0.5 + 0.25 * b} for b in (1, 2, 4, 8)]
    fit = batching.call_overhead(rows)
    assert fit["fixed_s"] == pytest.approx(0.5) and fit["per_inference_s"] == pytest.approx(0.25)
    assert fit["fixed_share_at_batch_1"] == pytest.approx(0.5 / 0.75)


def test_call_overhead_of_a_gpu_like_sweep_uses_the_full_machine_slope():
    # flat until the chip is full, then linear: a call of one is mostly fixed cost
    rows = [{"batch_size": b, "call_s": t} for b, t in [(1, 1.0), (2, 1.0), (4, 1.2), (8, 2.4)]]
    fit = batching.call_overhead(rows)
    assert fit["per_inference_s"] == pytest.approx(0.3) and fit["fixed_share_at_batch_1"] == pytest.approx(0.7)
    assert batching.call_overhead(rows[:1])["fixed_s"] == 0.0


def test_call_overhead_of_a_cpu_sweep_stops_where_throughput_falls():
    # the toy's denoise on one CPU thread: throughput peaks at 16, then falls as the activations outgrow the caches;
    # the slope between the two largest batches (0.19 s an inference) exceeds the whole call of one before it
    rows = [{"batch_size": b, "call_s": t} for b, t in [(1, 0.349), (2, 0.379), (4, 0.560), (8, 1.055), (16, 1.927),
                                                        (32, 5.676), (64, 12.13), (128, 24.08)]]
    fit = batching.call_overhead(rows)
    assert fit["full_batch_size"] == 16
    assert fit["per_inference_s"] == pytest.approx((1.927 - 1.055) / 8)
    assert 0 < fit["fixed_s"] < 0.349 and fit["fixed_share_at_batch_1"] == pytest.approx(fit["fixed_s"] / 0.349)
    falling = [{"batch_size": b, "call_s": t} for b, t in [(1, 1.0), (2, 2.5), (4, 5.0)]]  # batch 1 is the best
    assert batching.call_overhead(falling) == {"fixed_s": 0.0, "per_inference_s": 1.0, "fixed_share_at_batch_1": 0.0,
                                                "full_batch_size": 1}


def test_short_runs_are_repeated_until_the_minimum_time_is_spent():
    calls = []
    run = batching.time_chunked(lambda a, b: calls.append((a, b)), 2, 2, device="cpu", repeats=3, min_time_s=0.05,
                                warmup=False)
    assert len(run.seconds) >= 3 and (sum(run.seconds) >= 0.05 or len(run.seconds) == measure.MAX_RUNS)
    assert len(calls) == len(run.seconds)
    slow = batching.time_chunked(lambda a, b: time.sleep(0.06), 2, 2, device="cpu", repeats=3, min_time_s=0.05)
    assert len(slow.seconds) == 1, "a run longer than min_time_s is timed once"
    assert isinstance(slow, measure.Measurement) and slow.memory["peak_MiB"] > 0, "the one record, its peak in MiB"


@pytest.mark.parametrize("stage", batching.STAGES)
def test_batched_equals_single_calls_on_the_tiny_model(tiny_pipe, stage):
    job = StageJob(tiny_pipe, ["a red circle", "a blue square", "a green triangle"], [7, 8, 9],
                   num_inference_steps=STEPS)
    row = batching.compare(job, stage, max_batch=2, repeats=1, min_time_s=0)
    assert row["stage"] == stage and row["N"] == 3
    assert row["single_calls"] == 3 and row["batched_calls"] == 2 and row["chunk_sizes"] == [2, 1]
    assert row["max_abs_diff"] <= 1e-5, "the same seeds must give the same outputs, batched or not"
    assert row["speedup"] == pytest.approx(row["single_s"] / row["batched_s"])
    assert row["single_s_per_inference"] == pytest.approx(row["single_s"] / 3)
    assert row["single_peak_MiB"] > 0 and row["batched_peak_MiB"] > 0


def test_compare_hands_each_stage_output_to_the_next(tiny_pipe):
    job = StageJob(tiny_pipe, ["a red circle", "a blue square"], [1, 2], num_inference_steps=STEPS)
    batching.compare(job, "encode_text", 2, repeats=1, min_time_s=0)
    batching.compare(job, "denoise", 2, repeats=1, min_time_s=0)
    latents = job.latents.clone()
    decoded = batching.compare(job, "decode", 2, repeats=1, min_time_s=0)
    chain = job.call("generate", 0, 2)
    assert torch.equal(latents, job.latents) and decoded["max_abs_diff"] <= 1e-5
    assert batching.max_abs_diff(chain, job.call("decode", 0, 2)) <= 1e-5, "decode(denoise(encode)) == generate"


def test_sweep_rows_are_consistent(tiny_pipe):
    job = StageJob(tiny_pipe, ["a red circle"] * 4, range(4), num_inference_steps=STEPS)
    rows = batching.sweep(job, "decode", [1, 2, 4], repeats=1, min_time_s=0)
    assert [r["batch_size"] for r in rows] == [1, 2, 4]
    for row in rows:
        assert row["throughput"] == pytest.approx(row["batch_size"] / row["call_s"])
        assert row["peak_MiB"] > 0
    assert max(r["vs_best"] for r in rows) == 1.0


@pytest.mark.parametrize("source", ["folder", "single_file"])
def test_each_stage_runs_with_only_its_part_loaded(source, toy_pipe):
    from helpers.toy import TOY_LDM_FILE

    pipe = toy_pipe
    model = str(TOY_LDM_FILE) if source == "single_file" else "toy"
    job = StageJob(pipe, ["a red circle", "a blue square on the left"], [3, 4], num_inference_steps=STEPS)
    job.ensure_inputs("decode", 2)
    whole = batching.weights_MiB(pipe.text_encoder, pipe.unet, pipe.vae)
    for stage, components in batching.STAGE_COMPONENTS.items():
        part = batching.load_stage(model, stage)
        assert set(components) <= set(vars(part))
        assert not {"unet", "vae", "text_encoder"} - set(components) & set(vars(part)), "only the stage's networks"
        assert batching.weights_MiB(*vars(part).values()) < whole
        assert batching.max_abs_diff(job.call(stage, 0, 2, pipe=part), job.call(stage, 0, 2)) <= 1e-6


def test_load_stage_refuses_the_chain():
    with pytest.raises(ValueError, match="stage='generate'"):
        batching.load_stage("toy", "generate")


def test_bench_prints_and_records_the_table(tmp_path, monkeypatch, capsys):
    from helpers.bench import batching as bench

    monkeypatch.setenv("SD_OUTPUTS", str(tmp_path))
    assert bench.main(["--model", "tiny-random", "--n", "3", "--steps", "1", "--max-batch", "2", "--repeats", "1",
                       "--min-time", "0", "--stages", "encode_text", "denoise", "decode"]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "max_abs_diff" in printed
    recorded = json.loads((tmp_path / "bench_batching.json").read_text())
    assert [r["stage"] for r in recorded["rows"]] == ["encode_text", "denoise", "decode"]
    assert all(r["N"] == 3 and r["batched_calls"] == 2 and r["max_abs_diff"] <= 1e-5 for r in recorded["rows"])
    assert recorded["environment"]["cpu"] and recorded["threads"]["torch_threads"] >= 1


def test_bench_refuses_bad_counts():
    from helpers.bench import batching as bench

    with pytest.raises(ValueError, match="--max-batch=0"):
        bench.main(["--model", "tiny-random", "--n", "2", "--max-batch", "0"])
    with pytest.raises(ValueError, match="--n=0"):
        bench.main(["--model", "tiny-random", "--n", "0"])


# --- memory: the warm-up, the sweep and "auto" follow the same fit rule (helpers.core.limits under a budget) ----------


@pytest.fixture
def budget_for_two_decodes(tiny_pipe, monkeypatch):
    """SD_MEMORY_BUDGET_GIB between the estimated decode of 2 and of 4 tiny-random latents: 4 is refused."""
    from helpers.core import limits
    from helpers.core.stages import default_size

    height, width = default_size(tiny_pipe)
    two, four = (limits.estimate_bytes(tiny_pipe.vae, b, height, width, "decode") for b in (2, 4))
    monkeypatch.setenv("SD_MEMORY_BUDGET_GIB", repr((two + four) / 2 / 2**30))
    return StageJob(tiny_pipe, ["a red circle", "a blue square", "a green triangle", "a yellow diamond"], range(4),
                    num_inference_steps=STEPS)


def test_warmup_is_chunked_like_the_run(budget_for_two_decodes):
    # the warm-up was one call at the chunk size, outside run_in_chunks: the MemoryError escaped
    job = budget_for_two_decodes
    row = batching.compare(job, "decode", max_batch=4, repeats=1, min_time_s=0)
    assert row["oom_halvings"] == [4] and row["chunk_sizes"] == [2, 2] and row["batch_size"] == 2
    assert row["max_abs_diff"] <= 1e-5


def test_sweep_skips_sizes_that_do_not_fit_and_auto_never_picks_them(budget_for_two_decodes):
    job = budget_for_two_decodes
    rows = batching.sweep(job, "decode", [1, 2, 4], repeats=1, min_time_s=0)
    assert [r["batch_size"] for r in rows] == [1, 2, 4]
    skipped = rows[2]
    assert skipped["skipped"] == "out of memory" and skipped["throughput"] is None and skipped["vs_best"] is None
    assert "at batch 4 needs about" in skipped["skipped_reason"] and "GiB" in skipped["skipped_reason"]
    assert all(r["skipped"] is None and r["throughput"] > 0 for r in rows[:2])
    assert max(r["vs_best"] for r in rows[:2]) == 1.0
    assert batching.auto_batch_size(rows, 0.5) in (1, 2) and batching.best_batch_size(rows) in (1, 2)
    assert batching.call_overhead(rows)["full_batch_size"] in (1, 2)
    assert [r["batch_size"] for r in batching.measured(rows)] == [1, 2]


def test_auto_and_best_ignore_skipped_sizes():
    rows = [{"batch_size": 1, "throughput": 10.0, "peak_MiB": 1.0, "skipped": None},
            {"batch_size": 2, "throughput": 12.0, "peak_MiB": 2.0, "skipped": None},
            {"batch_size": 4, "throughput": None, "peak_MiB": None, "skipped": "out of memory",
             "skipped_reason": "needs about 9 GiB"}]
    assert batching.auto_batch_size(rows, 0.0) == 2 and batching.best_batch_size(rows) == 2
    with pytest.raises(ValueError, match="no swept batch size fits.*batch 4: needs about 9 GiB"):
        batching.auto_batch_size(rows[2:])


def test_accelerator_decisions_go_through_helpers_accelerator():
    import inspect

    assert "torch.cuda.is_available" not in inspect.getsource(batching), \
        "ask helpers.core.accelerator (the rehearsal pretends a T4), not torch.cuda"


def test_prompts_follow_the_model():
    assert batching.load_prompts(2, batching.default_prompts_file("toy")) == batching.load_prompts(2)
    sd = batching.load_prompts(64, batching.default_prompts_file("stable-diffusion-v1-5/stable-diffusion-v1-5"))
    assert len(set(sd)) == 64 and "an astronaut riding a horse" in sd[0]
    assert not any("background" in p for p in sd), "ordinary SD prompts, not the toy world's"


# --- the single file a stage's part is read from: SD 1.5's from the hub, or a reason -----------------------------

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """An empty local hub cache (HF_HUB_CACHE), offline; `add(repo, files)` puts a snapshot of files in it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    def add(repo: str, files: dict[str, str | bytes]):
        root = tmp_path / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text("0" * 40)
        for name, content in files.items():
            path = root / "snapshots" / ("0" * 40) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return add


def test_sd15_takes_apart_its_own_single_file_with_the_hub_configs(local_hub):
    configs = {f"{c}/config.json": "{}" for c in ("unet", "vae", "text_encoder")}
    local_hub(SD15, {"v1-5-pruned-emaonly.safetensors": b"weights", "model_index.json": "{}",
                     "scheduler/scheduler_config.json": "{}", "tokenizer/vocab.json": "{}",
                     "tokenizer/merges.txt": "", **configs})
    found = single_file_for(SD15)
    assert found.reason is None and found.path.name == "v1-5-pruned-emaonly.safetensors"
    assert found.path.read_bytes() == b"weights"
    config_dir = Path(found.config_dir)
    for name in [*configs, "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"]:
        assert (config_dir / name).is_file(), name


def test_sd15_without_its_single_file_says_so_and_skips(local_hub):
    local_hub(SD15, {"model_index.json": "{}"})  # the diffusers folder is there, the single file is not
    found = single_file_for(SD15)
    assert found.path is None and "v1-5-pruned-emaonly.safetensors" in found.reason
    assert "HF_HUB_OFFLINE" in found.reason and "SINGLE_FILE" in found.reason


def test_single_file_for_the_toy_a_given_file_and_other_models(tmp_path):
    from helpers.toy import TOY_LDM_FILE, TOY_SD_DIR

    toy = single_file_for("toy")
    assert toy.path == Path(TOY_LDM_FILE) and Path(toy.config_dir) == Path(TOY_SD_DIR) and toy.reason is None
    missing = single_file_for("toy", single_file=str(tmp_path / "nope.safetensors"))
    assert missing.path is None and "nope.safetensors does not exist" in missing.reason
    given = single_file_for("toy", single_file=str(TOY_LDM_FILE), config_dir=str(tmp_path))
    assert given.path == Path(TOY_LDM_FILE) and given.config_dir == str(tmp_path)
    other = single_file_for("tiny-random")
    assert other.path is None and "SINGLE_FILE" in other.reason


def test_each_stage_runs_with_only_its_part_of_sd15s_single_file_from_the_hub(local_hub, tmp_path, tiny_pipe):
    """The SD 1.5 path end to end on a local hub holding tiny-random under SD 1.5's id: the single file from
    hf_hub_download, the configs (tokenizer and scheduler included) from the hub folder, every part alone."""
    from helpers.core.ldm import export_ldm_checkpoint

    folder = tmp_path / "export"
    tiny_pipe.save_pretrained(folder)
    export_ldm_checkpoint(tiny_pipe, folder / "v1-5-pruned-emaonly.safetensors")
    local_hub(SD15, {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    found = single_file_for(SD15)
    assert found.reason is None, found.reason
    job = StageJob(tiny_pipe, ["a red circle", "a blue square"], [3, 4], num_inference_steps=STEPS)
    job.ensure_inputs("decode", 2)
    for stage in batching.STAGE_COMPONENTS:
        part = batching.load_stage(str(found.path), stage, config_dir=found.config_dir, dtype=torch.float32)
        assert batching.max_abs_diff(job.call(stage, 0, 2, pipe=part), job.call(stage, 0, 2)) <= 1e-5, stage
