"""kiln benchmark suites: `kiln bench [suite] [options]` or `python -m kiln.bench`.

Each suite times kiln against its peers in the same run, on the same inputs and GPU, prints a
table and writes bench_<suite>.json and bench_<suite>.png (to $OUT when set, else to ./).
A suite is one module in kiln/bench/suites/ (NAME, DESCRIPTION, run(bench)): adding a file
there adds a suite.
"""

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from . import suites
from .core import Bench, Check, Measurement
from .report import default_json_path, table, write_chart, write_json

__all__ = ["Bench", "Check", "Measurement", "add_arguments", "main", "run", "suite_names"]


def suite_names() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(suites.__path__))


def load_suite(name: str):
    return importlib.import_module(f"{suites.__name__}.{name}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = suite_names()
    parser.add_argument(
        "suite", nargs="?", choices=names, help=f"suite to run ({', '.join(names)}); default all"
    )
    parser.add_argument("--reps", type=int, default=50, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    parser.add_argument("--filter", help="run only the cases whose name contains this text")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs for suites that spread over several (flux2: sequence "
                        "parallelism on 2, 4, ... up to this many)")
    parser.add_argument(
        "--json",
        type=Path,
        help="JSON output path ({suite} is replaced by the suite name); "
        "default $OUT/bench_{suite}.json, else ./bench_{suite}.json; the chart goes beside it",
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--all", action="store_true",
        help="run every case of the suite, not only its default list (--filter picks among all)"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the suites `args` names; returns the process exit status (1 if a check failed)."""
    names = [args.suite] if args.suite else suite_names()
    if args.json is not None and len(names) > 1 and "{suite}" not in str(args.json):
        print("kiln bench: --json must contain {suite} when several suites run", file=sys.stderr)
        return 2
    bench = Bench(args.warmup, args.reps, args.device, args.filter)
    bench.gpus = args.gpus
    status = 0
    bench.all_cases = args.all
    for name in names:
        suite = load_suite(name)
        bench.start_suite(name)
        bench.log(suite.DESCRIPTION)
        suite.run(bench)
        if bench.measurements or bench.checks:
            print(f"\n== kiln bench {name} ({bench.environment()['gpu']}) ==")
            print(table(bench), flush=True)
        path = Path(str(args.json).format(suite=name)) if args.json else default_json_path(name)
        write_json(bench, path)
        if not args.no_chart:
            write_chart(bench, path.with_suffix(".png"))
        if any(not c.passed for c in bench.checks):
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiln.bench", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
