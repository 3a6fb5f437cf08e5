"""kiln's run-time compiler: counters, the disk cache, warm-up.

Kernels are compiled by NVRTC on first use for the device and the shapes at hand, then cached in
memory and on disk under $KILN_CACHE_DIR (default $XDG_CACHE_HOME/kiln, else ~/.cache/kiln).
KILN_JIT_LOG=1 prints each compile and load with its time.
"""

from . import _C
from ._C import UnsupportedError


def stats() -> dict:
    """Counters of the process-wide cache: compiles, disk_hits, memory_hits, disk_writes,
    corrupt_entries, compile_ms, disk_load_ms."""
    return _C.jit_stats()


def reset_stats() -> None:
    _C.jit_reset_stats()


def cache_dir() -> str:
    """The disk cache folder in use; "" when the cache is memory-only (the folder cannot be read,
    or is missing and cannot be created). The folder is made by the first compile, not before."""
    return _C.cache_dir()


def cache_writable() -> bool:
    """Whether compiled kernels are stored in cache_dir(). A read-only folder (a cache warmed at
    build time and shipped) is still read; kernels missing from it are kept in memory."""
    return _C.cache_writable()


def list_cache() -> list[dict]:
    """Disk cache entries, each a dict of path, kernel, arch, bytes and valid."""
    return _C.list_cache()


def clear_cache() -> int:
    """Empties the disk and memory caches; returns the number of files removed."""
    return _C.clear_cache()


def workloads() -> list[str]:
    """Names of the workloads whose kernels `warmup` can precompile ("flux", "all", ...)."""
    return _C.workloads()


def device_archs(device: int = 0) -> list[str]:
    """[the arch of CUDA `device`]; UnsupportedError naming the reason when there is no GPU."""
    if _C.cuda_device_count() == 0:
        raise UnsupportedError(
            f"kiln.jit: no CUDA device ({_C.cuda_unavailable_reason()}), so no arch to compile "
            "for; name the archs instead, e.g. ['sm_80', 'sm_90a']"
        )
    return [_C.cuda_arch(device)]


def warmup(workload: str = "flux", archs: list[str] | None = None) -> dict:
    """Compiles and stores (without loading) every kernel `workload` needs for `archs`
    (default: the arch of CUDA device 0). Needs no GPU when archs are given; archs older than
    sm_80 are refused ("kiln needs sm_80 or newer"). Processes warming one folder at once compile
    each kernel once between them. Returns {"variants": requested, "compiled": newly compiled,
    "stored": of those, written to the disk cache (fewer: a read-only or missing cache)}."""
    known = workloads()
    if workload not in known:
        raise _C.InvalidArgumentError(
            f"kiln.jit.warmup: workload is {workload!r}, expected one of {', '.join(known)}"
        )
    return _C.warmup(workload, archs if archs is not None else device_archs())


def measure_overheads(workload: str = "flux", device: int = 0) -> dict:
    """Times the JIT's three paths for the first kernel of `workload` on CUDA `device`, in a
    scratch cache folder: first_compile_ms, disk_load_ms, memory_hit_us (with kernel, arch)."""
    return _C.measure_overheads(workload, device)


def version() -> str:
    """The kiln version that keys the disk cache."""
    return _C.version()
