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


def workspace_peak_bytes(device: int = 0) -> int:
    """The most device memory kiln's own workspaces held at once on `device` since the last
    reset_workspace_peak(device). torch's allocator (torch.cuda.max_memory_allocated) does not
    see them: conv2d's channels-last copy of an NCHW x, attention's split-KV partials, cuBLASLt's
    workspace."""
    return _C.workspace_peak_bytes(device)


def reset_workspace_peak(device: int = 0) -> None:
    """Starts workspace_peak_bytes(device) afresh."""
    _C.reset_workspace_peak(device)
