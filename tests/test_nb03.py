"""Notebook 03 (batching), run in the smoke profile: what it recorded in outputs/03_batching.json."""

import math

import pytest

from helpers.series.profiles import parameters_for
from helpers.studies.batching import STAGE_COMPONENTS, sweep_sizes

pytestmark = pytest.mark.notebook

SMOKE = parameters_for("03", "smoke")
TOLERANCE = 1e-4  # fp32 on the CPU: a batch may sum in another order than a single call


@pytest.fixture(scope="module")
def params():
    """The parameters the smoke run really used: the notebook's defaults, overridden by the smoke profile."""
    import nbformat

    from helpers.series.run import find_notebooks

    nb = nbformat.read(find_notebooks(["03"])[0], 4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    values: dict = {}
    exec(cell.source, {}, values)
    return {**values, **SMOKE}


def test_one_row_per_stage_single_against_batched(r, params):
    n = params["N"]
    rows = r["compare"]
    assert [row["stage"] for row in rows] == params["STAGES"], "one row per stage, in order"
    for row in rows:
        assert row["N"] == n and row["single_calls"] == n, row
        assert row["batched_calls"] == math.ceil(n / params["MAX_BATCH"]), row
        assert max(row["chunk_sizes"]) <= params["MAX_BATCH"] and sum(row["chunk_sizes"]) == n
        assert row["speedup"] == pytest.approx(row["single_s"] / row["batched_s"])
        assert row["single_s_per_inference"] == pytest.approx(row["single_s"] / n)
        assert row["batched_s_per_inference"] == pytest.approx(row["batched_s"] / n)
        assert row["single_s"] > 0 and row["batched_s"] > 0
        assert row["max_abs_diff"] <= TOLERANCE, f"batched must equal single calls for the same seeds: {row}"
        assert row["single_peak_MiB"] > 0 and row["batched_peak_MiB"] > 0
    assert r["grid_max_abs_diff"] <= TOLERANCE


def test_method_is_recorded(r):
    assert r["environment"]["cpu"], "the CPU model"
    assert r["threads"]["torch_threads"] >= 1 and not r["threads"]["oversubscribed"]
    assert r["compare"][0]["memory_method"].startswith("peak RSS")


def test_sweep_per_stage_with_best_marked(r, params):
    n, largest = params["N"], params["SWEEP_MAX"]
    sizes = sweep_sizes(n, min(largest, n) if largest else n)  # SWEEP_MAX above N sweeps to N
    assert set(r["sweep"]) == set(params["SWEEP_STAGES"])
    for stage, rows in r["sweep"].items():
        assert [row["batch_size"] for row in rows] == sizes
        for row in rows:
            assert row["throughput"] == pytest.approx(row["batch_size"] / row["call_s"])
            assert row["peak_MiB"] > 0
        best = max(rows, key=lambda row: row["throughput"])
        assert r["best_batch_size"][stage] == best["batch_size"] and best["vs_best"] == 1.0


def test_auto_batch_size_is_within_tolerance_of_the_best(r, params):
    for stage, auto in r["auto"].items():
        rows = {row["batch_size"]: row for row in r["sweep"][stage]}
        assert auto["batch_size"] in rows
        assert auto["sweep_throughput"] >= (1 - params["AUTO_TOLERANCE"]) * auto["best_throughput"], auto
        smaller = [b for b in rows if b < auto["batch_size"]]
        assert all(rows[b]["throughput"] < (1 - params["AUTO_TOLERANCE"]) * auto["best_throughput"] for b in smaller), \
            "auto is the smallest batch size within tolerance"
        assert auto["measured_throughput"] > 0 and max(auto["chunk_sizes"]) <= auto["batch_size"]
        # measured back to back with the best size over all N (a ratio of two runs, not a timing bar)
        assert auto["measured_vs_best"] == pytest.approx(auto["measured_throughput"] / auto["measured_best_throughput"])


def test_call_overhead_is_read_at_the_end_of_the_plateau(r):
    """Where the fit is read, and that its two parts add up to a call of the smallest batch. Its sign is a
    measurement: on a smoke run's few-millisecond calls on a busy machine a larger batch can come out faster than a
    smaller one, so the sign is checked on a measured sweep in tests/test_batching.py, not here."""
    for stage, fit in r["call_overhead"].items():
        rows = {row["batch_size"]: row for row in r["sweep"][stage] if "call_s" in row}
        assert fit["full_batch_size"] in rows
        assert rows[fit["full_batch_size"]]["throughput"] >= 0.99 * max(row["throughput"] for row in rows.values())
        smallest = rows[min(rows)]
        assert fit["fixed_s"] + smallest["batch_size"] * fit["per_inference_s"] == pytest.approx(smallest["call_s"])


def test_chunking_honours_a_small_max_batch(r, params):
    n, max_batch = params["N"], params["CHUNK_DEMO_MAX_BATCH"]
    demo = r["chunk_demo"]
    assert demo["chunk_sizes"] == [max_batch] * (n // max_batch) + ([n % max_batch] if n % max_batch else [])
    assert demo["max_abs_diff"] <= TOLERANCE


def test_fake_oom_halves_and_keeps_finished_results(r, params):
    n, limit = params["N"], params["OOM_DEMO_LIMIT"]
    demo = r["oom_demo"]
    assert demo["oom_halvings"], "the simulated out-of-memory must have happened"
    assert all(size > limit for size in demo["oom_halvings"])
    assert all(size <= limit for size in demo["chunk_sizes"]) and sum(demo["chunk_sizes"]) == n
    failed = len(demo["oom_halvings"])
    assert len(demo["attempts"]) == failed + len(demo["chunk_sizes"]), "no finished chunk was run twice"
    assert demo["max_abs_diff"] <= TOLERANCE


def test_each_stage_runs_with_only_its_part(r):
    rows = {row["stage"]: row for row in r["stage_only"]["rows"]}
    whole = rows.pop("(whole pipeline)")
    assert set(rows) == set(STAGE_COMPONENTS) and r["stage_only"]["single_file"]
    for stage, row in rows.items():
        assert row["max_abs_diff"] <= 1e-6, row
        assert set(STAGE_COMPONENTS[stage]) <= set(row["loads"].split("+"))
        assert row["weights_MiB"] < whole["weights_MiB"]
    assert sum(row["weights_MiB"] for row in rows.values()) == pytest.approx(whole["weights_MiB"], rel=0.01), \
        "the three parts together are the whole model"


def test_partial_loading_table_moved_here_from_01(r):
    components = {row["component"] for row in r["partial_loading"]["rows"]}
    assert {"full file", "unet", "vae", "text_encoder"} <= components
    text = next(row for row in r["partial_loading"]["rows"] if row["component"] == "text_encoder")
    assert text["tensor_share"] < 0.2, "the text encoder is a small share of the toy file"
    assert "te_read_share" in r["summary"]


def test_under_a_small_memory_budget_sizes_that_do_not_fit_are_halved_or_skipped(toy_pipe, tmp_path, monkeypatch):
    """SD_MEMORY_BUDGET_GIB between the toy's estimated decode of 2 and of 4 (as SD 1.5's decode of 32 at 512² on a
    T4): the notebook finishes; the batched calls (and their warm-ups, and the grid's) halve to 2, the sweep skips 4
    with the reason, and "auto" picks a size that ran."""
    from helpers.core import limits
    from helpers.core.stages import default_size
    from helpers.series.run import find_notebooks, run_notebook

    pipe = toy_pipe
    height, width = default_size(pipe)
    two, four = (limits.estimate_bytes(pipe.vae, b, height, width, "decode") for b in (2, 4))
    monkeypatch.setenv("SD_MEMORY_BUDGET_GIB", repr((two + four) / 2 / 2**30))
    run = run_notebook(find_notebooks(["03"])[0], "smoke", tmp_path)
    assert run.status == "ok", run.error
    r = next(iter(run.results.values()))
    for row in r["compare"][1:]:  # denoise, decode, generate
        assert row["chunk_sizes"] == [2, 2] and row["oom_halvings"] == [4], row
    for stage in ("denoise", "decode"):
        rows = {row["batch_size"]: row for row in r["sweep"][stage]}
        assert rows[4]["skipped"] == "out of memory" and "GiB" in rows[4]["skipped_reason"]
        assert rows[4]["throughput"] is None and rows[2]["throughput"] > 0
        assert r["auto"][stage]["batch_size"] in (1, 2) and r["best_batch_size"][stage] in (1, 2)
