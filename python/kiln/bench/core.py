"""What a benchmark suite sees: the device, the timer, the copy bandwidth, and where results go.

A suite is a module in kiln/bench/suites/ with NAME, DESCRIPTION and run(bench: Bench). It adds
Measurements (an op's time against peers on the same inputs) and Checks (a figure against a
target) and logs progress with bench.log().
"""

import sys
from dataclasses import dataclass, field

from .. import _C
from .timing import CpuTimer, CudaTimer, copy_bandwidth


@dataclass
class Measurement:
    case: str  # "rope+norm bf16->bf16"
    shape: str  # "1024² L4608 H24 D128"
    kiln_ms: float
    bytes: int  # bytes the op must move: inputs read + output written
    peers: dict[str, float] = field(default_factory=dict)  # peer name -> ms
    host_us: dict[str, float] = field(default_factory=dict)  # contender -> host µs per call
    notes: dict = field(default_factory=dict)

    def kiln_gbps(self) -> float:
        return self.bytes / self.kiln_ms / 1e6


@dataclass
class Check:
    name: str
    value: float
    unit: str
    target: float  # value must stay below

    @property
    def passed(self) -> bool:
        return self.value < self.target


class Bench:
    """Shared state of one `kiln bench` run; suites receive it."""

    def __init__(self, warmup: int, reps: int, device_index: int, case_filter: str | None):
        self.warmup = warmup
        self.reps = reps
        self.case_filter = case_filter
        self.all_cases = False  # every case, not only the suite's default list (kiln bench --all)
        self.torch = _import_torch()
        self.cuda = _C.cuda_device_count() > 0 and (
            self.torch is None or self.torch.cuda.is_available()
        )
        self.device_index = device_index
        self.gpus = 1  # GPUs a suite may spread over (kiln bench --gpus)
        if self.cuda and self.torch is not None:
            self.device = self.torch.device("cuda", device_index)
            self.timer = CudaTimer(self.torch, self.device, warmup, reps)
        else:
            self.device = self.torch.device("cpu") if self.torch is not None else None
            self.timer = CpuTimer(warmup, reps)
        self.suite = ""
        self.measurements: list[Measurement] = []
        self.checks: list[Check] = []
        self.log_lines: list[str] = []
        self.measured_copy_gbps: float | None = None

    def start_suite(self, name: str) -> None:
        self.suite = name
        self.measurements = []
        self.checks = []
        self.log_lines = []

    def log(self, message: str) -> None:
        self.log_lines.append(message)
        print(f"[{self.suite}] {message}", file=sys.stderr, flush=True)

    def wants(self, case: str, default: bool = True) -> bool:
        """Whether to run `case`: with --filter, every case whose name contains the text;
        otherwise the suite's default list (`default`), or every case with --all."""
        if self.case_filter is not None:
            return self.case_filter in case
        return default or self.all_cases

    def sizes(self, gpu, cpu):
        """A suite's sizes: `gpu` on a GPU; else says so and gives `cpu`, the small sizes its
        CPU path (kiln's CPU reference against torch, no GPU figure) runs."""
        if self.cuda:
            return gpu
        self.log("no CUDA device: CPU backends at small sizes")
        return cpu

    def require_torch(self):
        if self.torch is None:
            raise RuntimeError(
                f"kiln bench {self.suite}: this suite needs torch (pip install torch)"
            )
        return self.torch

    def copy_gbps(self) -> float:
        """Copy bandwidth (read + write) on this run's device, measured once per run."""
        if self.measured_copy_gbps is None:
            gbps = copy_bandwidth(self.require_torch(), self.timer, self.device)
            self.measured_copy_gbps = gbps
            self.log(f"copy bandwidth {gbps:.0f} GB/s (read + write)")
        return self.measured_copy_gbps

    def add(self, measurement: Measurement) -> None:
        self.measurements.append(measurement)
        m = measurement
        peers = ", ".join(f"{name} {ms:.4f} ms" for name, ms in m.peers.items())
        self.log(f"{m.case} {m.shape}: kiln {m.kiln_ms:.4f} ms; {peers}")

    def check(self, name: str, value: float, unit: str, target: float) -> None:
        c = Check(name, value, unit, target)
        self.checks.append(c)
        self.log(f"{name}: {value:.3f} {unit} (target < {target} {unit}): "
                 f"{'pass' if c.passed else 'FAIL'}")

    def environment(self) -> dict:
        torch = self.torch
        gpu = "none"
        if self.cuda and torch is not None:
            gpu = torch.cuda.get_device_name(self.device)
        return {
            "gpu": gpu,
            "device": str(self.device) if self.device is not None else "cpu",
            "torch": torch.__version__ if torch is not None else None,
            "torch_cuda": torch.version.cuda if torch is not None else None,
            "kiln": _C.version(),
            "cuda_unavailable_reason": _C.cuda_unavailable_reason(),
            "timer": self.timer.kind,
            "warmup": self.warmup,
            "reps": self.reps,
        }


def relative_error(torch, got, want, what: str) -> float:
    """||got - want|| / ||want|| in f64; fails loudly on a zero reference (`what` names it)."""
    want64 = want.double()
    norm = want64.norm().item()
    if not norm > 0:
        raise AssertionError(f"{what}: the reference output is all zeros")
    return ((got.double() - want64).norm() / norm).item()


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch
