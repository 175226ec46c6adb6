"""Batch generation from a prompt file, in one process or many under `accelerate launch`.

    python -m helpers batch PROMPTS --out DIR [--model auto] [--steps 20] [--guidance-scale 7.5] [--batch-size 4]
    accelerate launch --num_processes 4 -m helpers batch PROMPTS --out DIR              (one process per GPU)
    accelerate launch --multi_gpu --num_processes 2 -m helpers batch PROMPTS --out DIR  (two CPU processes, gloo)
    torchrun --nproc_per_node 2 -m helpers batch PROMPTS --out DIR                      (the same with torchrun)

PROMPTS is a text file (one prompt a line, blank lines skipped) or a `.jsonl` file, one object a line with
`prompt` and optionally `negative_prompt`, `seed`, `height`, `width`. Entry i (counting non-blank lines from 0)
gets the seed `--seed + i` unless its line names one. Every entry is generated with `helpers.core.stages.generate`
(encode_text → denoise → decode) in batches of up to `--batch-size` entries of one size, by index. The batches are
planned before the work is split (and again on resume, from what is left, which gives the same batches), so a batch
is the same whichever process makes it: one process, N processes and a killed-and-resumed run give the same
images, bit for bit on one kind of device with the same threads per process. (Other batch sizes can move a pixel
by one level of 255: float sums in another order.)

What lands in DIR:
- `images/NNNNNN.png`, NNNNNN the entry's index: written to a temporary name, then renamed, so a file is whole;
- `manifest.rankR.jsonl`, one per process while it runs: one JSON line per entry (prompt, negative prompt, seed,
  height, width, settings, file, status "ok" or "error" + error, per-image stage timings, batch size, rank),
  appended once the batch's images are on disk, the batch's lines in one write, then fsync. A killed process
  loses only the batch it was making; a torn last line (killed mid-write) is skipped with a warning and its
  entry made again;
- `manifest.jsonl`: at the end, rank 0 merges every manifest (the old merged one and all rank files) into this
  one, one line per entry sorted by index (its "ok" line, else its last), written atomically; the rank files go;
- `batch.json`: the summary (record_results): images made, errors, per-rank throughput, total time.

Resume: every process reads all manifests before any process writes (a barrier), skips the entries already there
and splits the batches of the rest with `PartialState().split_between_processes` (contiguous runs of batches), so
nothing is made twice and nothing lost, with any number of processes. Entries that failed stay failed unless
`--retry-errors`. A manifest made from another prompt file or with other settings is refused (use another DIR).
A crash in one entry (e.g. a height that is not a multiple of the VAE's scale factor) is recorded as an "error"
line and the rest go on (a failing batch is redone entry by entry); the exit status is then 1.

Threads per process: `--threads`, else `$OMP_NUM_THREADS` (accelerate launch and torchrun set it per process),
else the cores divided by the processes on this machine, so processes do not oversubscribe the cores.
On SD 1.5 note that the hand-written `decode` does not run the safety checker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Kept light (no torch at import): `python -m helpers` builds its parser from add_arguments.

ENTRY_KEYS = ("prompt", "negative_prompt", "seed", "height", "width")
MANIFEST = "manifest.jsonl"
RANK_MANIFEST = "manifest.rank{rank}.jsonl"
IMAGES = "images"


@dataclass(frozen=True)
class Entry:
    """One line of the prompt file. `height`/`width` None mean the model's default size."""

    index: int
    prompt: str
    seed: int
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None

    @property
    def file(self) -> str:
        return f"{IMAGES}/{self.index:06d}.png"


# ---------------------------------------------------------------------------------------------------
# The prompt file


def read_prompt_file(path: str | Path, seed: int = 0) -> list[Entry]:
    """The entries of a text file (one prompt a line) or a `.jsonl` file; a malformed line is an error naming
    the file and line (nothing has run yet, so fixing the file is cheap)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PROMPTS={str(path)!r} is not a file: give a text or .jsonl file of prompts")
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"PROMPTS={str(path)!r} has no prompts: write one prompt (or JSON object) a line")
    if path.suffix == ".jsonl":
        return [_entry_from_json(index, seed, f"{path}:{number}", line) for index, (number, line) in enumerate(lines)]
    return [Entry(index, line.strip(), seed + index) for index, (_, line) in enumerate(lines)]


def _entry_from_json(index: int, seed: int, where: str, line: str) -> Entry:
    from helpers.core.results import json_object  # here: this module stays light (torch loads when a batch runs)

    fields = json_object(line, where)
    unknown = sorted(set(fields) - set(ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; the keys are {list(ENTRY_KEYS)}")
    if not isinstance(fields.get("prompt"), str) or not fields["prompt"].strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {fields.get('prompt')!r}")
    if not isinstance(fields.get("negative_prompt", ""), str):
        raise ValueError(f"{where}: 'negative_prompt' must be a string, got {fields['negative_prompt']!r}")
    for key in ("seed", "height", "width"):
        value = fields.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where}: {key!r} must be an integer, got {value!r}")
    fields.setdefault("seed", seed + index)
    return Entry(index=index, **{key: value for key, value in fields.items() if value is not None})


# ---------------------------------------------------------------------------------------------------
# Manifests: one JSON line per entry, appended atomically


class ManifestWriter:
    """Appends JSON lines to this rank's manifest, a batch's lines in one write, flushed to disk (fsync) before
    the next batch starts: a line on disk is an entry whose image is whole, and a kill loses whole batches."""

    def __init__(self, out_dir: Path, rank: int):
        self.path = out_dir / RANK_MANIFEST.format(rank=rank)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            os.write(self.fd, b"\n")  # a torn line from a killed run: start on a fresh line

    def append(self, records: Sequence[dict]) -> None:
        os.write(self.fd, "".join(json.dumps(record) + "\n" for record in records).encode())  # one syscall
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def manifest_paths(out_dir: Path) -> list[Path]:
    """The merged manifest first, then the rank files (newer than the merged one)."""
    return [p for p in [out_dir / MANIFEST] if p.exists()] + sorted(out_dir.glob(RANK_MANIFEST.format(rank="*")))


def read_manifests(out_dir: str | Path) -> dict[int, dict]:
    """One record per entry from DIR's manifests: its "ok" line if there is one, else its last line (an error
    retried with --retry-errors may have gone to another rank's file). Torn lines are skipped with a warning."""
    records: dict[int, dict] = {}
    for path in manifest_paths(Path(out_dir)):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number} is torn (a killed write?); its entry will be made again", stacklevel=2)
                continue
            earlier = records.get(record["index"])
            if earlier is None or earlier["status"] != "ok" or record["status"] == "ok":
                records[record["index"]] = record  # an "ok" line is final; an error may be retried
    return records


def merge_manifests(out_dir: str | Path) -> Path:
    """Write `manifest.jsonl` (one line per entry, by index) from all manifests atomically, then drop the
    rank files. Killed in between, the next merge reads the same records again."""
    out_dir = Path(out_dir)
    records = read_manifests(out_dir)
    rank_files = [p for p in manifest_paths(out_dir) if p.name != MANIFEST]
    merged = out_dir / MANIFEST
    temporary = merged.with_suffix(".jsonl.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(records[index]) + "\n" for index in sorted(records))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, merged)
    for path in rank_files:
        path.unlink()
    return merged


def pending_entries(entries: Sequence[Entry], done: dict[int, dict], settings: dict, retry_errors: bool) -> list[Entry]:
    """The entries still to make. A manifest record that does not match its entry or the settings is refused:
    mixing two prompt files or two settings in one DIR would make a manifest that lies."""
    pending = []
    for entry in entries:
        record = done.get(entry.index)
        if record is None:
            pending.append(entry)
            continue
        was = (record["prompt"], record["negative_prompt"], record["seed"])
        if was != (entry.prompt, entry.negative_prompt, entry.seed):
            raise ValueError(
                f"the manifest's entry {entry.index} is {was}, but the prompt file now says "
                f"{(entry.prompt, entry.negative_prompt, entry.seed)}: the file changed; use another --out"
            )
        if record["settings"] != settings:
            raise ValueError(
                f"the manifest's entry {entry.index} was made with {record['settings']}, this run asks for "
                f"{settings}: use the same settings to resume, or another --out"
            )
        if retry_errors and record["status"] == "error":
            pending.append(entry)
    return pending


def plan_batches(entries: Iterable[Entry], batch_size: int) -> list[list[Entry]]:
    """Batches of up to `batch_size` entries of one size (the UNet takes one latent shape per call), by index
    within each size."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    by_size: dict[tuple, list[Entry]] = {}
    for entry in sorted(entries, key=lambda e: e.index):
        by_size.setdefault((entry.height, entry.width), []).append(entry)
    return [group[i : i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]


# ---------------------------------------------------------------------------------------------------
# Generating


def threads_per_process(requested: int | None, local_processes: int) -> int:
    """`--threads`, else $OMP_NUM_THREADS, else this machine's cores shared out between its processes."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads={requested} must be at least 1")
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_processes))


def settings_of(args: argparse.Namespace, model: str) -> dict:
    """What every image of one DIR shares (recorded on each manifest line, checked on resume)."""
    return {
        "model": model,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "scheduler": args.scheduler,
    }


def check_scheduler(name: str | None, pipe) -> None:
    """Checked once before any work: a wrong name would fail every entry."""
    from helpers.core.models import make_scheduler

    if name is not None:
        make_scheduler(name, pipe.scheduler)  # raises naming the schedulers there are


def with_default_size(entries: Sequence[Entry], pipe) -> list[Entry]:
    from helpers.core.stages import default_size

    height, width = default_size(pipe)
    return [replace(e, height=e.height if e.height is not None else height,
                    width=e.width if e.width is not None else width) for e in entries]


def generate_batch(pipe, batch: Sequence[Entry], settings: dict):
    """One `generate` call for entries of one size; returns the Generation (PIL images, timings)."""
    from helpers.core.stages import generate

    return generate(
        pipe,
        [e.prompt for e in batch],
        [e.negative_prompt for e in batch],
        seeds=[e.seed for e in batch],
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        height=batch[0].height,
        width=batch[0].width,
        scheduler=settings["scheduler"],
        progress=False,
    )


def save_image(image, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)  # a file under its real name is always whole


def entry_record(entry: Entry, settings: dict, rank: int, **fields) -> dict:
    return {**asdict(entry), "settings": settings, "rank": rank, **fields}


def run_batch_of_entries(pipe, batch, settings, out_dir: Path, writer: ManifestWriter, rank: int) -> int:
    """Make one batch and record it; a failing batch is retried entry by entry so that only the bad entry
    is recorded as an error. Returns the number of errors."""
    try:
        generation = generate_batch(pipe, batch, settings)
    except Exception as error:  # recorded in the manifest; the rest go on
        if len(batch) > 1:
            return sum(run_batch_of_entries(pipe, [e], settings, out_dir, writer, rank) for e in batch)
        writer.append([entry_record(batch[0], settings, rank, status="error", file=None,
                                    error=f"{type(error).__name__}: {error}")])
        return 1
    per_image = {stage: seconds / len(batch) for stage, seconds in generation.timings.items()}
    for entry, image in zip(batch, generation.images):
        save_image(image, out_dir / entry.file)
    writer.append([entry_record(entry, settings, rank, status="ok", file=entry.file, timings=per_image,
                                batch_size=len(batch)) for entry in batch])
    return 0


def work(pipe, batches: list[list[Entry]], settings: dict, out_dir: Path, rank: int) -> dict:
    """This rank's batches, with a progress bar per process. Returns the rank's statistics."""
    from tqdm.auto import tqdm

    writer = ManifestWriter(out_dir, rank)
    errors = 0
    start = time.perf_counter()
    with tqdm(total=sum(map(len, batches)), desc=f"rank {rank}", unit="img", position=rank, file=sys.stderr) as bar:
        for batch in batches:
            errors += run_batch_of_entries(pipe, batch, settings, out_dir, writer, rank)
            bar.update(len(batch))
    writer.close()
    seconds = time.perf_counter() - start
    made = sum(map(len, batches)) - errors
    return {"rank": rank, "images": made, "errors": errors, "seconds": seconds,
            "images_per_s": made / seconds if seconds > 0 else 0.0}


def run(args: argparse.Namespace) -> dict:
    """The whole job for this process; every process returns the same summary."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from helpers.core import accelerator
    from helpers.core.measure import time_load
    from helpers.core.models import load_pipeline, resolve_model

    started = time.perf_counter()
    entries = read_prompt_file(args.prompts, args.seed)
    state = PartialState(cpu=args.cpu or accelerator.compute_device().type != "cuda")
    threads = threads_per_process(args.threads, int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)))
    torch.set_num_threads(threads)
    out_dir = Path(args.out)
    (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model)
    settings = settings_of(args, model)

    pipe, load = time_load(lambda: load_pipeline(model, device=state.device), state.device)
    load_s = load.median
    check_scheduler(args.scheduler, pipe)
    pending = pending_entries(entries, read_manifests(out_dir), settings, args.retry_errors)
    batches = plan_batches(with_default_size(pending, pipe), args.batch_size)
    state.wait_for_everyone()  # all have read the manifests before anyone appends to them
    with state.split_between_processes(batches) as mine:  # whole batches: the same whoever makes them
        stats = work(pipe, mine, settings, out_dir, state.process_index)
    stats.update(device=str(state.device), threads=threads, load_s=load_s)
    ranks = gather_object([stats])
    state.wait_for_everyone()
    if state.is_main_process:
        merge_manifests(out_dir)
    state.wait_for_everyone()  # the merged manifest is there for every rank's summary
    return summarize(entries, pending, ranks, read_manifests(out_dir), time.perf_counter() - started)


def summarize(entries, pending, ranks: list[dict], records: dict[int, dict], total_s: float) -> dict:
    made = sum(r["images"] for r in ranks)
    return {
        "summary": {
            "entries": len(entries),
            "already_done": len(entries) - len(pending),
            "images_made": made,
            "errors_this_run": sum(r["errors"] for r in ranks),
            "errors_in_manifest": sum(r["status"] == "error" for r in records.values()),
            "missing": len(entries) - len(records),
            "processes": len(ranks),
            "total_s": total_s,
            "images_per_s": made / total_s if total_s > 0 else 0.0,
        },
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
    }


# ---------------------------------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The batch command's arguments, on `parser` (`python -m helpers batch --help` shows this module's doc)."""
    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument("prompts", help="a text file (one prompt a line) or .jsonl (prompt, negative_prompt, seed, "
                                        "height, width)")
    parser.add_argument("--out", required=True, help="folder for images/, the manifests and batch.json")
    parser.add_argument("--model", default="auto", help="toy, tiny-random, sd15-random, a hub id, folder or file")
    parser.add_argument("--steps", type=positive_int, default=20, help="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default=None,
                        help="a name from helpers.core.models.SCHEDULERS (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0, help="entry i without its own seed gets seed + i")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads per process (default: $OMP_NUM_THREADS, else cores / processes)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where there is CUDA")
    parser.add_argument("--retry-errors", action="store_true", help="make entries recorded as errors again")
    return parser


def report(result: dict) -> str:
    from helpers.core.results import format_table

    columns = ["rank", "device", "threads", "images", "errors", "load_s", "seconds", "images_per_s"]
    s = result["summary"]
    return (
        format_table(result["ranks"], columns)
        + f"\n{s['images_made']} images made, {s['errors_this_run']} errors, {s['already_done']} already done, "
        f"{s['missing']} missing, by {s['processes']} processes in {s['total_s']:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m helpers batch"))
    return run_from_args(parser.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run, then print the table and record `DIR/batch.json` on rank 0. Exit status 1 (on every rank) if an
    entry failed or is missing."""
    from accelerate import PartialState

    from helpers.core.results import record_results

    result = run(args)
    summary = result["summary"]
    if PartialState().is_main_process:
        print(report(result))
        record_results("batch", result, out_dir=args.out)
        if summary["errors_in_manifest"]:
            print(f"{summary['errors_in_manifest']} entries failed: see the lines with \"status\": \"error\" in "
                  f"{Path(args.out) / MANIFEST} (--retry-errors makes them again)")
    return 1 if summary["errors_in_manifest"] or summary["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
