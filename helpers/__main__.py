"""Command line: `python -m helpers run|bench|list`.

  python -m helpers run [--profile smoke|cpu|full|gpu|auto] [--only 02 03] [--outputs DIR]
  python -m helpers bench NAME [args...]      (NAME: a module in helpers/bench/, e.g. load, toy)
  python -m helpers list                      the notebooks and benchmarks there are
  python -m helpers app [--port 7860]         the web page: text in, image out (helpers/serving/app.py)
  python -m helpers batch PROMPTS --out DIR   a prompt file, also under accelerate launch (helpers/serving/batch.py)
  python -m helpers hub build [--cache DIR]   the local hub: random weights at SD 1.5's shapes under the real repo ids
  python -m helpers rehearse [--only 03]      the series as a T4 user meets it, offline (helpers/series/rehearse.py)
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import helpers.bench
from helpers.checkpoints import hub as local_hub  # light: torch and diffusers are imported when it builds
from helpers.series import rehearse as rehearsal_run
from helpers.series.profiles import PROFILE_NAMES
from helpers.series.run import find_notebooks, run_series, summary_table
from helpers.serving import app as web_app  # light: gradio and torch are imported when the page is built
from helpers.serving import batch as batch_job  # light: torch is imported when a batch runs


def benchmarks() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(helpers.bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks with papermill into outputs/")
    run.add_argument("--profile", default="auto", choices=PROFILE_NAMES,
                     help="auto (default): gpu for SD 1.5 on a GPU with the hub, else cpu (~10 min on 2 cores); "
                          "full: every measurement on the toy (~40 min)")
    run.add_argument("--only", nargs="+", help="notebook numbers or names, e.g. 02")
    run.add_argument("--outputs", help="where executed notebooks and results go (default: outputs/)")
    bench = commands.add_parser("bench", help="run a benchmark: prints a table, writes outputs/bench_NAME.json")
    bench.add_argument("name", help=f"one of {benchmarks()}")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    web_app.add_arguments(commands.add_parser("app", help="serve the web page (text in, image out) on 127.0.0.1"))
    commands.add_parser("list", help="list notebooks and benchmarks")
    batch_job.add_arguments(commands.add_parser("batch", help="generate a prompt file (also under accelerate launch)"))
    rehearsal = commands.add_parser("rehearse", help="run the series as a badge user on a T4 would, offline, "
                                    "against a local hub of SD 1.5-shaped random weights")
    rehearsal_run.add_arguments(rehearsal)
    local_hub.add_arguments(commands.add_parser("hub", help="build the local hub (an HF_HUB_CACHE) for offline runs"))
    args = parser.parse_args(argv)

    if args.command == "run":
        runs = run_series(args.profile, args.only, args.outputs)
        print(summary_table(runs))
        return 0 if all(r.status == "ok" for r in runs) else 1
    if args.command == "app":
        return web_app.run_from_args(args)
    if args.command == "bench":
        if args.name not in benchmarks():
            parser.error(f"no benchmark {args.name!r}; there are {benchmarks()}")
        return importlib.import_module(f"helpers.bench.{args.name}").main(args.args)
    if args.command == "batch":
        return batch_job.run_from_args(args)
    if args.command == "hub":
        return local_hub.run_from_args(args)
    if args.command == "rehearse":
        return rehearsal_run.run_from_args(args)
    print("notebooks:", *[nb.stem for nb in find_notebooks()], sep="\n  ")
    print("benchmarks:", *benchmarks(), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
