"""Timers for the benchmark suites.

CudaTimer reports GPU time: the median over repeats of CUDA-event-timed calls, after warm-up.
Each timed call is queued behind a sleep kernel long enough for Python to enqueue the call, so
launch overhead is left out for every contender alike; host time per call is reported apart.
Repeats cycle through several input sets (rotation) so that no contender reads from a warm L2,
and each call's result is held until its set comes round again, so that outputs rotate through
as many buffers and no call writes into lines the previous one left in L2.
CpuTimer is the same with time.perf_counter, for the CPU backends.
"""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

# Rotation: at least this many input sets and this many bytes in all (H100/H200 L2: ~50 MB).
MIN_SETS = 4
MIN_ROTATION_BYTES = 200 * 2**20


def rotation_count(set_bytes: int) -> int:
    """How many copies of an input set of `set_bytes` to cycle through."""
    return max(MIN_SETS, -(-MIN_ROTATION_BYTES // max(set_bytes, 1)))


@dataclass
class Timing:
    ms: float  # median device time per call
    host_us: float  # median host time to issue one call


class CpuTimer:
    kind = "cpu"

    def __init__(self, warmup: int, reps: int):
        self.warmup = warmup
        self.reps = reps

    def time(self, fn: Callable, sets: Sequence[tuple]) -> Timing:
        held = [None] * len(sets)
        for i in range(self.warmup):
            held[i % len(sets)] = fn(*sets[i % len(sets)])
        samples = []
        for i in range(self.reps):
            args = sets[i % len(sets)]
            start = time.perf_counter()
            held[i % len(sets)] = fn(*args)
            samples.append((time.perf_counter() - start) * 1e3)
        ms = statistics.median(samples)
        return Timing(ms=ms, host_us=ms * 1e3)


class CudaTimer:
    kind = "cuda"

    def __init__(self, torch, device, warmup: int, reps: int):
        self.torch = torch
        self.device = device
        self.warmup = warmup
        self.reps = reps
        self._cycles_per_ms = self._calibrate_sleep()

    def _event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def _calibrate_sleep(self) -> float:
        cycles = 10_000_000
        with self.torch.cuda.device(self.device):
            self.torch.cuda._sleep(cycles // 10)
            start, end = self._event(), self._event()
            start.record()
            self.torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            return cycles / start.elapsed_time(end)

    def time(self, fn: Callable, sets: Sequence[tuple]) -> Timing:
        torch = self.torch
        with torch.cuda.device(self.device):
            held = [None] * len(sets)
            host = []
            for i in range(max(self.warmup, 3)):
                start = time.perf_counter()
                held[i % len(sets)] = fn(*sets[i % len(sets)])
                host.append((time.perf_counter() - start) * 1e3)
            torch.cuda.synchronize()
            host_ms = statistics.median(host)
            # Long enough for the host to queue events and call behind it, with a margin.
            sleep_cycles = int((4 * host_ms + 0.05) * self._cycles_per_ms)
            samples = []
            for i in range(self.reps):
                args = sets[i % len(sets)]
                start, end = self._event(), self._event()
                torch.cuda._sleep(sleep_cycles)
                start.record()
                held[i % len(sets)] = fn(*args)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            return Timing(ms=statistics.median(samples), host_us=host_ms * 1e3)


def copy_bandwidth(torch, timer, device) -> float:
    """Device-to-device (or host memory) copy bandwidth in GB/s, bytes read + written, from
    torch's copy_ of a buffer far larger than the last-level cache."""
    nbytes = 2**30 if timer.kind == "cuda" else 2**27
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timing = timer.time(lambda a, b: b.copy_(a), [(src, dst)])
    return 2 * nbytes / timing.ms / 1e6


def time_copy(torch, timer, device, nbytes: int, count: int) -> Timing:
    """A device-to-device copy moving `nbytes` (half read, half written), rotated over `count`
    buffer pairs like the inputs of the op it stands beside: what any kernel moving those bytes
    can reach, ramp-up and tail included."""
    half = nbytes // 2
    pairs = [
        (torch.empty(half, dtype=torch.uint8, device=device).random_(0, 255),
         torch.empty(half, dtype=torch.uint8, device=device))
        for _ in range(count)
    ]
    return timer.time(lambda src, dst: dst.copy_(src), pairs)
