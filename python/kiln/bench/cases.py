"""One op case of a suite: kiln against its peers on the same inputs, checked, then timed.

check_peers runs kiln and every peer once on the first input set and compares each peer's output
with kiln's (relative Frobenius error in f64; fp8 (q, scale) pairs dequantized) before anything
is timed; measure times every contender over the rotated input sets (time_contenders), with a
device-to-device copy of the same bytes, and records the Measurement with the bytes floor
(record); run_case does both.
"""

from typing import Callable

from .core import Measurement, relative_error
from .timing import time_copy

# Peers that round intermediates to bf16 (eager PyTorch chains), against kiln's one rounding of an
# f32 result: a few bf16 ulps (2^-8 relative each) apart.
BF16_BOUND = 2.0**-6
# fp8 outputs, dequantized: kiln quantizes its f32 result, a peer its bf16 (eager) or f32
# (compiled) one, so codes differ by one e4m3 step (2^-3 relative) where the two values straddle
# a rounding boundary, a few percent of elements: far below half an e4m3 step in the norm.
FP8_BOUND = 2.0**-4


def compiled(bench, fn):
    """torch.compile of a peer as the suites time it (static shapes, one graph; it compiles on
    its first call, the check's, so compile time is left out), or None without a GPU. Dynamo's
    caches are reset first: the same function compiled for many shapes would otherwise reach
    its recompile limit and run eagerly."""
    if not bench.cuda:
        return None
    torch = bench.torch
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False, fullgraph=True)


def eager_and_compiled(bench, fn) -> dict:
    """The two PyTorch peers of a fused op: {"eager": fn, "torch.compile": compiled fn} (the
    latter only on a GPU)."""
    peers = {"eager": fn}
    if bench.cuda:
        peers["torch.compile"] = compiled(bench, fn)
    return peers


def values(torch, result):
    """An op's result as one flat f64 tensor for comparison: a tensor as it is, an fp8 (q, scale)
    pair dequantized (q read as [R, C] with scale [R]), a tuple of those concatenated."""
    if isinstance(result, torch.Tensor):
        return result.double().reshape(-1)
    if (len(result) == 2 and isinstance(result[0], torch.Tensor)
            and result[0].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
        q, scale = result
        rows = scale.numel()
        return (q.double().reshape(rows, -1) * scale.double().reshape(rows, 1)).reshape(-1)
    return torch.cat([values(torch, part) for part in result])


def check_peers(bench, contenders: dict, args: tuple, bound: float, what: str,
                output: Callable | None = None) -> None:
    """Each peer's output on `args` against kiln's (the "kiln" contender): relative error at most
    `bound`, else AssertionError naming the peer. `output(fn, args)` runs a contender and returns
    what is compared (default fn(*args)); a NaN anywhere fails. A peer that cannot run the case
    (torch.compile of an fp8 cast where Triton has none, say) is left out of `contenders`, with a
    line."""
    torch = bench.torch

    def run(fn):
        return output(fn, args) if output is not None else fn(*args)

    reference = values(torch, run(contenders["kiln"]))
    if not torch.isfinite(reference).all():
        raise AssertionError(f"{what}: kiln's output is not finite")
    for name, fn in list(contenders.items()):
        if name == "kiln":
            continue
        try:
            result = run(fn)  # compiles a torch.compile peer
        except Exception as error:  # a peer that cannot take this case is skipped, not fatal
            first = (str(error).splitlines() or [""])[0]
            bench.log(f"{what}: {name} failed ({type(error).__name__}: {first}): peer skipped")
            del contenders[name]
            continue
        got = values(torch, result)
        if got.shape != reference.shape:
            raise AssertionError(f"{what}: {name} gave {got.numel()} values, kiln "
                                 f"{reference.numel()}")
        err = relative_error(torch, got, reference, what)
        if not err <= bound:
            raise AssertionError(f"{what}: {name} disagrees with kiln: relative error {err:.2e}, "
                                 f"expected at most {bound:.2e}")


def time_contenders(bench, contenders: dict, sets: list, copy_bytes: int = 0) -> dict:
    """Each contender's Timing over the rotated `sets`, and on a GPU with copy_bytes that of a
    device-to-device copy of that many bytes ("copy")."""
    timings = {name: bench.timer.time(fn, sets) for name, fn in contenders.items()}
    if copy_bytes and bench.cuda:
        timings["copy"] = time_copy(bench.torch, bench.timer, bench.device, copy_bytes,
                                    len(sets))
    return timings


def record(bench, case: str, shape: str, timings: dict, moved: int, floor_bytes: int | None,
           notes: dict) -> Measurement:
    """Adds kiln's time against the others' (and the bytes floor: floor_bytes at this GPU's copy
    bandwidth) as the suite's Measurement of `moved` bytes."""
    peers = {name: t.ms for name, t in timings.items() if name != "kiln"}
    if floor_bytes is not None:
        peers["bytes floor"] = floor_bytes / bench.copy_gbps() / 1e6
    measurement = Measurement(
        case=case,
        shape=shape,
        kiln_ms=timings["kiln"].ms,
        bytes=moved,
        peers=peers,
        host_us={name: t.host_us for name, t in timings.items()},
        notes=notes,
    )
    bench.add(measurement)
    return measurement


def measure(bench, case: str, shape: str, contenders: dict, sets: list, moved: int,
            notes: dict | None = None) -> None:
    """Times every contender over `sets` with a copy of the `moved` bytes beside them, and records
    kiln's time against theirs and the bytes floor."""
    timings = time_contenders(bench, contenders, sets, moved)
    record(bench, case, shape, timings, moved, moved, {"rotation_sets": len(sets), **(notes or {})})


def run_case(bench, case: str, shape: str, make_sets: Callable[[], list], contenders: dict,
             moved: int, bound: float, notes: dict | None = None,
             output: Callable | None = None) -> None:
    """check_peers on the first set, then measure; the sets are freed before returning."""
    sets = make_sets()
    check_peers(bench, contenders, sets[0], bound, f"kiln bench {bench.suite}: {case} {shape}",
                output)
    measure(bench, case, shape, contenders, sets, moved, notes)
    del sets
    if bench.cuda:
        bench.torch.cuda.empty_cache()
