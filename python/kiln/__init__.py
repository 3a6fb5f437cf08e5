"""kiln: shape-specialized CUDA kernels compiled at run time with NVRTC.

Ops take torch tensors (CPU or CUDA; registered as torch custom ops, so torch.compile graphs can
hold them), numpy arrays (CPU) and CuPy arrays (CUDA), and return an array of the same kind::

    import torch, kiln

    qkv = torch.randn(1, 4608, 3, 24, 128, device="cuda", dtype=torch.bfloat16)
    pe = ...  # f32 [L, D/2, 2, 2] rotations [[cos, -sin], [sin, cos]] (BFL/ComfyUI layout)
    q = kiln.rope_flux(qkv[:, :, 0], pe, norm_weight=q_norm_scale)  # [N, H, L, D], contiguous
    v = kiln.rope_flux(qkv[:, :, 2])                                 # permute only

Norms of whole models: kiln.rms_norm, kiln.layer_norm (with AdaLN shift / scale) and
kiln.group_norm (+ SiLU); rms_norm and layer_norm can also write fp8 with per-token scales for
the next fp8 x fp8 matmul (quantize="e4m3fn"). MLP activations: kiln.glu (SwiGLU / GEGLU) and
kiln.gelu_tanh, with the same fp8 option.

LLM RoPE: kiln.rope (llama.cpp's "normal" and "neox" rotations at device-side positions, with
the per-head QK-norm and the write into a KV cache fused in). Whole GGUF LLMs (llama, qwen3):
kiln.llm.load(path).generate(ids, n).
Whole models: kiln.diffusers.apply(pipe) runs diffusers' Flux.2 and FLUX.1 transformers and their
VAE decoders on kiln's fused ops (see kiln.diffusers).

Quantized matmul: kiln.quantize_fp8, kiln.dequantize, kiln.quantize_q8_0, kiln.matmul (fp8,
Q8_0, f16 or bf16 weights) and kiln.prepare_weight; kiln.torch.patch() routes torch._scaled_mm
and torch.nn.functional.scaled_mm to kiln where that pays (see kiln.torch).

CUDA work goes on the current stream of the input's framework. Kernels are compiled on first
use and cached on disk (see kiln.jit and the `kiln cache` command); `kiln bench` measures them
against PyTorch.

Errors are kiln.KilnError (a RuntimeError) with a `code`; the subclasses are
InvalidArgumentError (also ValueError), UnsupportedError (also NotImplementedError),
OutOfMemoryError (also MemoryError), CudaError and CompileError.
"""

import sys

from . import jit
from ._C import (
    CompileError,
    CudaError,
    InvalidArgumentError,
    KilnError,
    OutOfMemoryError,
    UnsupportedError,
)
from ._activation import gelu_tanh, glu
from ._attention import attention
from ._conv2d import conv2d
from ._matmul import (
    PreparedWeight,
    dequantize,
    matmul,
    prepare_weight,
    quantize_fp8,
    quantize_q8_0,
    select_path,
)
from ._norm import group_norm, layer_norm, rms_norm
from ._rope import rope
from .device import (
    cuda_arch,
    cuda_available,
    cuda_device_count,
    cuda_unavailable_reason,
    reset_workspace_peak,
    workspace_peak_bytes,
)
from .ops import rope_flux

__version__ = jit.version()

if sys.modules.get("torch") is not None:
    # Register torch.ops.kiln.* now, so a first call under torch.compile finds them.
    from . import _torch  # noqa: F401
    from . import _torch_activation  # noqa: F401
    from . import _torch_attention  # noqa: F401
    from . import _torch_conv2d  # noqa: F401
    from . import _torch_matmul  # noqa: F401
    from . import _torch_norm  # noqa: F401
    from . import _torch_rope  # noqa: F401


def __getattr__(name: str):
    # kiln.torch (patch() / unpatch() for torch._scaled_mm) and kiln.diffusers load on first
    # use, so that `import kiln` imports neither torch nor diffusers.
    if name in ("torch", "diffusers"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


__all__ = [
    "CompileError",
    "CudaError",
    "InvalidArgumentError",
    "KilnError",
    "OutOfMemoryError",
    "PreparedWeight",
    "UnsupportedError",
    "attention",
    "conv2d",
    "cuda_arch",
    "cuda_available",
    "cuda_device_count",
    "cuda_unavailable_reason",
    "dequantize",
    "gelu_tanh",
    "glu",
    "group_norm",
    "jit",
    "layer_norm",
    "matmul",
    "prepare_weight",
    "quantize_fp8",
    "quantize_q8_0",
    "reset_workspace_peak",
    "rms_norm",
    "rope",
    "rope_flux",
    "select_path",
    "workspace_peak_bytes",
]
