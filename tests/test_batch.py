"""`python -m helpers batch`: prompt files, manifests, resume, a bad entry, a killed run, two processes.

The toy at 4 steps on 8 entries (one with a height the VAE cannot take). One single-process run in this process is
the reference; a killed-and-restarted run and a 2-process `accelerate launch` run must give the same images, bit
for bit (one thread per process in all of them), each entry exactly once.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from loopback import free_port

from helpers.__main__ import main
from helpers.serving import batch

REPO = Path(__file__).resolve().parents[1]
ENTRIES = [
    {"prompt": "a red circle on a white background"},
    {"prompt": "a blue square on a black background", "height": 90},  # not a multiple of the scale factor 4
    {"prompt": "a green triangle on a white background", "seed": 7},
    {"prompt": "a small yellow rhombus on a black background", "negative_prompt": "blue"},
    {"prompt": "a large red square on a white background"},
    {"prompt": "a blue circle on the left on a black background"},
    {"prompt": "a green square on the right on a white background"},
    {"prompt": "a yellow triangle on a black background"},
]
BAD = 1
SETTINGS = ["--model", "toy", "--steps", "4", "--batch-size", "2", "--threads", "1"]


# ---------------------------------------------------------------------------------------------------
# The prompt file, manifests and planning, without a model


def test_reads_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n\n  a blue square  \n")
    assert batch.read_prompt_file(text, seed=10) == [batch.Entry(0, "a red circle", 10),
                                                     batch.Entry(1, "a blue square", 11)]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 3}\n\n{"prompt": "b", "negative_prompt": "c", "height": 32, '
                     '"width": 48}\n')
    assert batch.read_prompt_file(jsonl) == [batch.Entry(0, "a", 3), batch.Entry(1, "b", 1, "c", 32, 48)]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "b"', "not valid JSON"),
        ('["b"]', "must be a JSON object"),
        ('{"prompt": "b", "size": 64}', r"unknown keys \['size'\]"),
        ('{"seed": 1}', "'prompt' must be a non-empty string"),
        ('{"prompt": "b", "seed": "1"}', "'seed' must be an integer"),
        ('{"prompt": "b", "height": true}', "'height' must be an integer"),
    ],
)
def test_a_malformed_line_is_refused_naming_it(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"prompts.jsonl:2: .*{message}"):
        batch.read_prompt_file(path)


def test_missing_or_empty_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="PROMPTS=.* is not a file"):
        batch.read_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="has no prompts"):
        batch.read_prompt_file(tmp_path / "empty.txt")


def record(index, status="ok", prompt="p", rank=0):
    return {"index": index, "prompt": prompt, "negative_prompt": "", "seed": index, "settings": {"steps": 4},
            "status": status, "rank": rank}


def test_torn_lines_are_skipped_and_merging_keeps_one_line_per_entry(tmp_path):
    writer = batch.ManifestWriter(tmp_path, rank=1)
    writer.append([record(3), record(1, status="error")])
    writer.close()
    with open(tmp_path / "manifest.rank1.jsonl", "a") as file:
        file.write('{"index": 5, "prom')  # killed mid-write
    writer = batch.ManifestWriter(tmp_path, rank=1)  # the next run starts on a fresh line
    writer.append([record(1)])  # a retried error: the later line wins
    writer.close()
    batch.ManifestWriter(tmp_path, rank=0).append([record(0, rank=0), record(4, rank=0)])
    batch.ManifestWriter(tmp_path, rank=2).append([record(4, status="error", rank=2)])  # read after rank 0's
    with pytest.warns(UserWarning, match=r"manifest.rank1.jsonl:3 is torn"):
        records = batch.read_manifests(tmp_path)
    assert sorted(records) == [0, 1, 3, 4] and records[1]["status"] == "ok"
    assert records[4]["status"] == "ok"  # an "ok" line wins over an error line in any file

    with pytest.warns(UserWarning, match="torn"):
        merged = batch.merge_manifests(tmp_path)
    lines = [json.loads(line) for line in merged.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 3, 4] and lines[1]["status"] == lines[3]["status"] == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]  # rank files merged away
    assert batch.read_manifests(tmp_path) == records


def test_resume_skips_done_entries_and_refuses_another_file_or_settings():
    entries = [batch.Entry(i, "p", i) for i in range(4)]
    done = {0: record(0), 2: record(2, status="error")}
    settings = {"steps": 4}
    assert [e.index for e in batch.pending_entries(entries, done, settings, retry_errors=False)] == [1, 3]
    assert [e.index for e in batch.pending_entries(entries, done, settings, retry_errors=True)] == [1, 2, 3]
    with pytest.raises(ValueError, match="the file changed; use another --out"):
        batch.pending_entries(entries, {0: record(0, prompt="q")}, settings, retry_errors=False)
    with pytest.raises(ValueError, match="use the same settings to resume"):
        batch.pending_entries(entries, done, {"steps": 20}, retry_errors=False)


def test_batches_hold_one_size_and_survive_a_resume():
    sizes = [(64, 64), (32, 64), (64, 64), (64, 64), (64, 64), (64, 64), (32, 64)]
    entries = [batch.Entry(i, "p", i, height=h, width=w) for i, (h, w) in enumerate(sizes)]
    batches = batch.plan_batches(entries, 2)
    assert [[e.index for e in b] for b in batches] == [[0, 2], [3, 4], [5], [1, 6]]
    # what is left after whole batches were made is planned into the same batches: images stay bit-identical
    left = [e for b in (batches[1], batches[2]) for e in b]
    assert batch.plan_batches(left, 2) == [batches[1], batches[2]]
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        batch.plan_batches(entries, 0)


def test_threads_per_process(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert batch.threads_per_process(None, 1) == cores
    assert batch.threads_per_process(None, cores) == 1
    assert batch.threads_per_process(3, 2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert batch.threads_per_process(None, 1) == 1
    with pytest.raises(ValueError, match="--threads=0 must be at least 1"):
        batch.threads_per_process(0, 1)


# ---------------------------------------------------------------------------------------------------
# Runs on the toy


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch") / "prompts.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in ENTRIES))
    return path


def run_here(prompt_file, out_dir, *extra: str) -> int:
    """`python -m helpers batch` in this process (`extra` arguments win), the torch threads put back afterwards."""
    threads = torch.get_num_threads()
    try:
        return main(["batch", str(prompt_file), "--out", str(out_dir), *SETTINGS, *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(prompt_file, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("reference")
    return run_here(prompt_file, out_dir), out_dir


def manifest(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "manifest.jsonl").read_text().splitlines()]


def images(out_dir) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(PIL.Image.open(p)) for p in sorted((Path(out_dir) / "images").glob("*.png"))}


def summary(out_dir) -> dict:
    return json.loads((Path(out_dir) / "batch.json").read_text())["summary"]


def assert_same_run(out_dir, reference_dir):
    """Every entry exactly once, the bad one an error, the images equal to the reference's bit for bit."""
    lines = manifest(out_dir)
    assert [r["index"] for r in lines] == list(range(len(ENTRIES)))
    assert [r["status"] for r in lines] == ["error" if i == BAD else "ok" for i in range(len(ENTRIES))]
    ours, theirs = images(out_dir), images(reference_dir)
    assert sorted(ours) == sorted(theirs) == sorted(Path(r["file"]).name for r in lines if r["file"])
    for name, image in ours.items():
        assert np.array_equal(image, theirs[name]), f"{name} differs from the single-process run"


def test_one_process_makes_every_entry_and_records_the_bad_one(reference):
    rc, out_dir = reference
    assert rc == 1  # an entry failed
    lines = manifest(out_dir)
    assert [r["index"] for r in lines] == list(range(len(ENTRIES)))
    bad = lines[BAD]
    assert bad["status"] == "error" and bad["file"] is None and "height=90" in bad["error"]
    assert not list((out_dir / "images").glob(".*"))  # no temporary files left
    for entry, line in zip(ENTRIES, lines):
        assert line["prompt"] == entry["prompt"] and line["seed"] == entry.get("seed", line["index"])
        assert line["settings"] == {"model": "toy", "num_inference_steps": 4, "guidance_scale": 7.5, "scheduler": None}
    good = [r for r in lines if r["status"] == "ok"]
    assert all(r["rank"] == 0 and r["timings"]["denoise"] > 0 and r["batch_size"] in (1, 2) for r in good)
    pictures = images(out_dir)
    assert len(pictures) == len(ENTRIES) - 1
    assert all(p.shape == (64, 64, 3) and p.std() > 10 for p in pictures.values())  # pictures, not flat fields
    assert summary(out_dir)["images_made"] == len(ENTRIES) - 1 and summary(out_dir)["errors_this_run"] == 1


def test_a_rerun_skips_what_is_done(prompt_file, reference, tmp_path):
    _, reference_dir = reference
    out_dir = tmp_path / "again"
    shutil.copytree(reference_dir, out_dir)
    assert run_here(prompt_file, out_dir) == 1  # the bad entry stays failed
    assert summary(out_dir)["images_made"] == 0 and summary(out_dir)["already_done"] == len(ENTRIES)
    assert manifest(out_dir) == manifest(reference_dir)


def test_bad_arguments_are_refused_before_any_work(prompt_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_here(prompt_file, tmp_path, "--batch-size", "0")
    assert "argument --batch-size: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scheduler='foo' is unknown; choose one of"):
        run_here(prompt_file, tmp_path, "--model", "tiny-random", "--scheduler", "foo")
    assert not list(tmp_path.glob("manifest*"))


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def wait_for_lines(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert process.poll() is None, f"the batch process ended (rc {process.returncode}) before writing a line"
        assert time.monotonic() < deadline, f"no manifest line in {timeout} s"
        time.sleep(0.02)


def test_a_killed_run_restarts_with_no_duplicates_or_gaps(prompt_file, reference, tmp_path):
    """The single-process command (no launcher) killed after its first batch; the rerun makes exactly the rest."""
    out_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "helpers", "batch", str(prompt_file), "--out", str(out_dir), *SETTINGS]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_lines(out_dir / "manifest.rank0.jsonl", process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out_dir / "manifest.jsonl").exists(), "the run finished before it was killed"
    done = [json.loads(line) for line in (out_dir / "manifest.rank0.jsonl").read_text().splitlines()]
    assert 1 <= len(done) < len(ENTRIES)
    assert all((out_dir / r["file"]).exists() for r in done)  # what the manifest names is on disk

    assert run_here(prompt_file, out_dir) == 1
    assert summary(out_dir)["already_done"] == len(done)
    assert summary(out_dir)["images_made"] + summary(out_dir)["errors_this_run"] == len(ENTRIES) - len(done)
    assert_same_run(out_dir, reference[1])


def test_two_processes_under_accelerate_make_each_image_once_and_the_same(prompt_file, reference, tmp_path):
    out_dir = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               "-m", "helpers", "batch", str(prompt_file), "--out", str(out_dir), *SETTINGS]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert (out_dir / "manifest.jsonl").exists(), done.stderr[-3000:]
    assert done.returncode != 0  # the bad entry is reported in the exit status
    assert_same_run(out_dir, reference[1])
    assert {r["rank"] for r in manifest(out_dir)} == {0, 1}
    assert summary(out_dir)["processes"] == 2 and summary(out_dir)["images_made"] == len(ENTRIES) - 1
    assert "7 images made, 1 errors" in done.stdout
