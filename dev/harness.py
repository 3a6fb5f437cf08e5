"""What the Python tuning harnesses under dev/<family>/ share: the common options, the no-GPU exit,
the timer, the error measure and the JSON output.

The timer is python/kiln/bench/timing.py's CudaTimer, imported (one definition of the method):
the median of CUDA-event-timed calls after warm-up, each call queued behind a sleep kernel so that
launch overhead is left out, input sets rotated (rotation_count) so that no call reads a warm L2.
A harness imports this module with `sys.path.insert(0, <dev/>)`; it runs from the repository root
with kiln installed (or `pip install .`).
"""

import argparse
import json
import os
import secrets
import sys
from pathlib import Path


def parser(doc: str) -> argparse.ArgumentParser:
    """The harness's options: its docstring (what it times, its run commands) as the help text,
    then --warmup, --reps, --device, --json and --full."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--reps", type=int, default=50, help="timed calls (the median is reported)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--json", type=Path,
                   help="JSON output path (default $OUT/<harness>.json when OUT is set)")
    p.add_argument("--full", action="store_true",
                   help="the full sweep of the NOTES figures (default: a short run)")
    return p


def cuda_torch(name: str):
    """torch, when kiln and torch both see a CUDA device; otherwise prints why and exits with
    status 0 (a machine without a GPU has nothing to time)."""
    import kiln

    try:
        import torch
    except ImportError:
        print(f"{name}: needs torch (pip install torch)", file=sys.stderr)
        sys.exit(1)
    if not kiln.cuda_available() or not torch.cuda.is_available():
        reason = kiln.cuda_unavailable_reason() or "torch sees no CUDA device"
        print(f"{name}: no CUDA device ({reason}): nothing to time")
        sys.exit(0)
    return torch


def relative_error(torch, got, want) -> float:
    """||got - want|| / ||want|| in f64; raises on NaN or an all-zero reference."""
    got64, want64 = got.detach().cpu().double(), want.detach().cpu().double()
    if got64.isnan().any():
        raise AssertionError("the output holds NaN")
    norm = want64.norm().item()
    if not norm > 0:
        raise AssertionError("the reference output is all zeros")
    return ((got64 - want64).norm() / norm).item()


def poison_next(torch, shape, dtype, device) -> None:
    """Makes the next allocation of `shape` and `dtype` on `device` land on NaN, so that an output
    element the op does not write fails the check (an op allocates its own output): after
    empty_cache() the caching allocator holds no other free block, and hands this one out next."""
    torch.cuda.empty_cache()
    block = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del block


class Run:
    """One harness run: the device, the timer, a fresh seed (printed), the result rows (printed as
    they come) and the JSON file they end in."""

    def __init__(self, name: str, args: argparse.Namespace, torch):
        from kiln.bench.timing import CudaTimer

        self.name = name
        self.args = args
        self.torch = torch
        self.device = torch.device("cuda", args.device)
        self.seed = secrets.randbits(31)
        torch.manual_seed(self.seed)
        self.timer = CudaTimer(torch, self.device, args.warmup, args.reps)
        self.rows: list[dict] = []
        gpu = torch.cuda.get_device_name(self.device)
        import kiln

        self.environment = {"gpu": gpu, "arch": kiln.cuda_arch(args.device),
                            "torch": torch.__version__, "kiln": kiln.__version__,
                            "seed": self.seed, "warmup": args.warmup, "reps": args.reps}
        print(f"{name} on {gpu} ({self.environment['arch']}), seed {self.seed}", flush=True)

    def time_ms(self, fn, sets) -> float:
        return self.timer.time(fn, sets).ms

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  ".join(f"{key} {_text(value)}" for key, value in row.items()), flush=True)

    def write(self) -> None:
        path = self.args.json
        if path is None and os.environ.get("OUT"):
            path = Path(os.environ["OUT"]) / f"{self.name}.json"
        if path is None:
            return
        document = {"harness": self.name, "command": " ".join(sys.argv),
                    "environment": self.environment, "rows": self.rows}
        Path(path).write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {path}")


def _text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
