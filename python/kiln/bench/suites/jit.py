"""The JIT's overheads on this GPU: first compile, disk load, memory hit, against targets."""

from ... import _C

NAME = "jit"
DESCRIPTION = "JIT overheads of the flux workload's first kernel: compile, disk load, memory hit"

WORKLOAD = "flux"
# Targets: a first compile under a second (DeepGEMM's NVRTC takes 0.35-1.4 s per kernel),
# a disk load well under a frame, a memory hit small next to a kernel launch.
FIRST_COMPILE_MS = 1000
DISK_LOAD_MS = 5
MEMORY_HIT_US = 2


def run(bench) -> None:
    if not bench.cuda:
        bench.log(f"no CUDA device ({_C.cuda_unavailable_reason()}): the jit suite needs one, "
                  "skipped")
        return
    o = _C.measure_overheads(WORKLOAD, bench.device_index)
    bench.log(f"kernel {o['kernel']} for {o['arch']}")
    bench.check("first compile", o["first_compile_ms"], "ms", FIRST_COMPILE_MS)
    bench.check("disk load", o["disk_load_ms"], "ms", DISK_LOAD_MS)
    bench.check("memory hit", o["memory_hit_us"], "us", MEMORY_HIT_US)
