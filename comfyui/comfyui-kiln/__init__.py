"""kiln for ComfyUI: on load, routes torch's fp8 matmuls (torch._scaled_mm,
torch.nn.functional.scaled_mm) and comfy_kitchen's fp8 quantize / dequantize to kiln's kernels
(kiln.torch.patch()). It adds no nodes.

ComfyUI runs fp8 checkpoints with fp8 matmuls only where comfy.model_management's
supports_fp8_compute() says the GPU can (sm_89 and up); elsewhere it dequantizes every weight on
every call. With kiln patched in, any CUDA GPU from sm_80 (Ampere) on can, so this node also
makes supports_fp8_compute() answer yes for them.

Install: put (or symlink) this folder into ComfyUI/custom_nodes/ and install kiln into the
Python environment ComfyUI runs in (kiln's README, "ComfyUI"). Environment:
  KILN_PATCH=0                load without patching anything
  KILN_PATCH_MODE=always      send every fp8 matmul kiln can take to kiln (default: auto)
  KILN_COMFY_FP8_COMPUTE=0    leave ComfyUI's supports_fp8_compute() as it is
"""

import logging
import os
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

_log = logging.getLogger("kiln.comfyui")
KILN_MIN_CAPABILITY = (8, 0)  # kiln's CUDA kernels run on sm_80 and up


def _kiln_fp8_compute(original):
    """ComfyUI's supports_fp8_compute, also true on CUDA devices kiln runs fp8 matmuls on."""

    def supports_fp8_compute(device=None):
        if original(device):
            return True
        import torch

        if not torch.cuda.is_available() or getattr(device, "type", "cuda") != "cuda":
            return False
        return torch.cuda.get_device_capability(device) >= KILN_MIN_CAPABILITY

    supports_fp8_compute.kiln_original = original
    return supports_fp8_compute


def _apply() -> None:
    import kiln
    import kiln.torch

    mode = os.environ.get("KILN_PATCH_MODE", "auto")
    kiln.torch.patch(mode=mode)
    _log.info("kiln %s: fp8 matmuls routed to kiln (mode %s)", kiln.__version__, mode)
    management = sys.modules.get("comfy.model_management")
    if management is None or os.environ.get("KILN_COMFY_FP8_COMPUTE", "1") == "0":
        return
    current = management.supports_fp8_compute
    if not hasattr(current, "kiln_original"):
        management.supports_fp8_compute = _kiln_fp8_compute(current)
        _log.info("kiln: ComfyUI's fp8 compute enabled on CUDA GPUs from sm_80")


if os.environ.get("KILN_PATCH", "1") != "0":
    _apply()
