"""CUDA availability as kiln sees it (through its own runtime, without torch)."""

from . import _C


def cuda_device_count() -> int:
    """Number of usable CUDA devices; 0 with no driver or no device."""
    return _C.cuda_device_count()


def cuda_available() -> bool:
    """True when kiln can run CUDA ops."""
    return _C.cuda_device_count() > 0


def cuda_unavailable_reason() -> str:
    """Why no CUDA device is usable ("no NVIDIA driver ...", ...), or ""."""
    return _C.cuda_unavailable_reason()


def cuda_arch(device: int = 0) -> str:
    """The NVRTC target kiln compiles for on `device`: "sm_90a", "sm_80", ..."""
    return _C.cuda_arch(device)
