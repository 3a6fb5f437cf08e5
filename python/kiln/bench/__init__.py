"""kiln benchmark suites: `kiln bench [suite] [options]` or `python -m kiln.bench`.

Each suite times kiln against its peers in the same run, on the same inputs and GPU, prints a
table and writes bench_<suite>.json and bench_<suite>.png to $OUT when it is set, else to ./out/
(git-ignored in a kiln checkout). A suite is one module in kiln/bench/suites/ (NAME,
DESCRIPTION, run(bench)): adding a file there adds a suite.

Without a GPU there is nothing to measure: the run says so and what the GPU run measures, then
runs each suite at toy sizes on the CPU backends as a smoke test (with torch), or checks each
op once on numpy arrays (without torch: kiln.bench.smoke).
"""

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from .. import _C
from . import smoke, suites
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
    parser.add_argument("--reps", type=_count(1), default=50,
                        help="timed repeats, >= 1 (median reported)")
    parser.add_argument("--warmup", type=_count(0), default=5,
                        help="untimed calls before timing, >= 0")
    parser.add_argument("--device", type=_count(0),
                        help="CUDA device index (default 0); refused without a GPU")
    parser.add_argument("--filter", help="run only the cases whose name contains this text")
    parser.add_argument("--gpus", type=_count(1), default=1,
                        help="GPUs for suites that spread over several (flux2: sequence "
                        "parallelism on 2, 4, ... up to this many)")
    parser.add_argument(
        "--json",
        type=Path,
        help="JSON output path ({suite} is replaced by the suite name); "
        "default $OUT/bench_{suite}.json, else ./out/bench_{suite}.json; the chart goes beside it",
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--all", action="store_true",
        help="run every case of the suite, not only its default list (--filter picks among all)"
    )


def _count(least: int):
    """argparse type: an int >= least."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value

    return parse


def _device_problem(device: int | None) -> str | None:
    """Why --device cannot be honoured, or None."""
    if device is None:
        return None
    count = _C.cuda_device_count()
    if count == 0:
        return f"--device {device}, but there is no CUDA device ({_C.cuda_unavailable_reason()})"
    if device >= count:
        return f"--device {device}, but this machine has {count} CUDA device(s): 0 to {count - 1}"
    return None


def _no_gpu_banner(names: list[str], has_torch: bool) -> str:
    lines = [
        f"kiln bench: no GPU here ({_C.cuda_unavailable_reason()}), so nothing of kiln's speed "
        "is measured: kiln's kernels are CUDA kernels.",
        "On a GPU, each suite times kiln against its peers on the same inputs:",
    ]
    lines += [f"  {name}: {load_suite(name).DESCRIPTION}" for name in names]
    if has_torch:
        lines.append("Here each suite runs once at toy sizes on the CPU backends, as a smoke test: "
                     "its times say nothing about kiln on a GPU.")
    else:
        lines.append("Here, without torch, each suite's ops are checked once on numpy arrays "
                     "against numpy, as a smoke test (kiln.bench.smoke).")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Runs the suites `args` names; returns the process exit status (1 if a check failed)."""
    names = [args.suite] if args.suite else suite_names()
    if args.json is not None and len(names) > 1 and "{suite}" not in str(args.json):
        print("kiln bench: --json must contain {suite} when several suites run", file=sys.stderr)
        return 2
    if problem := _device_problem(args.device):
        print(f"kiln bench: {problem}", file=sys.stderr)
        return 2
    bench = Bench(args.warmup, args.reps, args.device or 0, args.filter)
    if not bench.cuda:
        print(_no_gpu_banner(names, bench.torch is not None), file=sys.stderr, flush=True)
    bench.gpus = args.gpus
    status = 0
    bench.all_cases = args.all
    for name in names:
        suite = load_suite(name)
        bench.start_suite(name)
        bench.log(suite.DESCRIPTION)
        if bench.torch is None:
            smoke.run(bench, name)
        else:
            suite.run(bench)
        if bench.measurements or bench.checks:
            where = (bench.environment()["gpu"] if bench.cuda
                     else "no GPU: a smoke test, not a measurement")
            print(f"\n== kiln bench {name} ({where}) ==")
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
