"""kiln for ComfyUI: a FLUX.1-architecture model's blocks (QK RMSNorm + RoPE, attention, AdaLN
norms, GEMM epilogues), fp8 linears and VAE decoder convolutions on kiln's kernels, through
ComfyUI's own hooks. Loading the node is enough; the "Kiln" node (advanced/kiln) turns the parts
on or off for one model and VAE.

When ComfyUI loads it, the node
  - gives every Flux model's patcher kiln's replacement for each double and single block
    (ComfyUI's block replacements, patches_replace "dit", set on each new ModelPatcher):
    LayerNorm + AdaLN (+ fp8 per token) in kiln.layer_norm, QK RMSNorm + RoPE + layout in
    kiln.rope_flux, kiln.attention, GELU in kiln.gelu_tanh, gate and residual in the GEMMs'
    epilogue (blocks.py);
  - rebinds the attention that ComfyUI's Flux blocks call (comfy.ldm.flux.layers.attention),
    for blocks that run on ComfyUI: RoPE fused with the layout change, then kiln.attention
    (attention.py); registers kiln's attention as ComfyUI attention function "kiln";
  - rebinds comfy.ops.pick_operations, ComfyUI's choice of a model's operations, to return a
    subclass of the class it chose whose Linear runs fp8 weights on kiln as stored: fp8 x fp8
    with per-token activation scales on GPUs with fp8 tensor cores, bf16 activations x fp8
    weights decoded in registers on sm_80/86; and comfy.ops.fp8_linear, ComfyUI's fp8 x fp8
    matmul, for operations other nodes chose (linear.py);
  - adds object patches to every VAE's patcher that run the decoder's convolutions on
    kiln.conv2d (vae.py);
  - registers kiln as comfy-kitchen's first backend (RoPE, RMSNorm + RoPE, per-tensor fp8
    quantize / dequantize; kiln.comfy_kitchen) for the ComfyUI versions that call comfy-kitchen,
    on the device types of KILN_COMFY_DEVICES, and applies kiln.torch.patch():
    torch._scaled_mm / scaled_mm with fp8 operands on kiln where that pays;
  - makes comfy.model_management.supports_fp8_compute() answer yes on CUDA GPUs from sm_80
    (ComfyUI says yes from sm_89), so fp8 checkpoints keep their fp8 weights there too.
Each hook runs ComfyUI's own code for what kiln does not take, logged once per reason on the
"kiln.comfyui" logger; what kiln takes is logged once per part and way. The load line names
the hooks in place; one this ComfyUI does not have is skipped.

Install: put (or symlink) this folder into ComfyUI/custom_nodes/ and install kiln into the
Python environment ComfyUI runs in (kiln's README, "ComfyUI and comfy-kitchen"). Environment:
  KILN_PATCH=0                load without changing anything
  KILN_COMFY_PARTS=...        the parts on by default, of attention,fp8_linear,vae_conv2d (all)
  KILN_COMFY_DEVICES=cuda     device types kiln takes ComfyUI's work on; "cuda,cpu" also runs
                              kiln's CPU code (its reference: exact and slow) on CPU work
  KILN_COMFY_FP8_ACTIVATIONS=auto  fp8 linears' activations: fp8 (per token), bf16 (as they
                              come, fp8 weights decoded in registers) or auto (fp8 from sm_89)
  KILN_COMFY_KITCHEN_PRIORITY=0  kiln's place in comfy-kitchen's backend priority (0: first)
  KILN_PATCH_MODE=always      send every fp8 torch._scaled_mm kiln can take to kiln (default
                              auto, see kiln.torch)
  KILN_COMFY_FP8_COMPUTE=0    leave ComfyUI's supports_fp8_compute() as it is
"""

import importlib.util
import logging
import os
import sys

from . import parts
from .node import Kiln

NODE_CLASS_MAPPINGS = {"Kiln": Kiln}
NODE_DISPLAY_NAME_MAPPINGS = {"Kiln": "Kiln (kiln's kernels on or off)"}
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
        if torch.version.hip is not None:
            return False
        return torch.cuda.get_device_capability(device) >= KILN_MIN_CAPABILITY

    supports_fp8_compute.kiln_original = original
    return supports_fp8_compute


def _comfy_module(name: str):
    """ComfyUI's module `name`, or None where this ComfyUI has none."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _install_comfy_hooks() -> list[str]:
    """Rebinds the ComfyUI functions this ComfyUI has; returns the hooks in place ([] outside
    ComfyUI)."""
    if "comfy" not in sys.modules and importlib.util.find_spec("comfy") is None:
        return []
    from . import attention, blocks, linear, vae

    (layers, math, flux_model, modules_attention, management, patcher, ops,
     sd) = map(_comfy_module, (
        "comfy.ldm.flux.layers", "comfy.ldm.flux.math", "comfy.ldm.flux.model",
        "comfy.ldm.modules.attention", "comfy.model_management", "comfy.model_patcher",
        "comfy.ops", "comfy.sd"))
    return [
        *blocks.install(patcher, flux_model, layers, math, management),
        *attention.install(layers, math, modules_attention),
        *linear.install(ops),
        *vae.install(sd, ops),
    ]


def _register_comfy_kitchen() -> list[str]:
    """kiln as comfy-kitchen's backend on the node's device types, at the priority
    KILN_COMFY_KITCHEN_PRIORITY (0: first); [] where comfy-kitchen is not installed."""
    if importlib.util.find_spec("comfy_kitchen") is None:
        return []
    import kiln.comfy_kitchen

    priority = int(os.environ.get("KILN_COMFY_KITCHEN_PRIORITY", "0"))
    devices = parts.settings()["devices"]
    kiln.comfy_kitchen.register(priority=priority, devices=devices)
    return [f"comfy-kitchen backend 'kiln' ({','.join(devices)}, priority {priority})"]


def _apply() -> None:
    import kiln
    import kiln.torch

    mode = os.environ.get("KILN_PATCH_MODE", "auto")
    hooks = _register_comfy_kitchen()  # before patch(), which then leaves the registration be
    kiln.torch.patch(mode=mode)
    hooks += _install_comfy_hooks()
    settings = parts.settings()
    _log.info("kiln %s: parts %s on %s (fp8 activations %s); hooks: %s; fp8 matmuls routed to "
              "kiln (mode %s)", kiln.__version__, ",".join(settings["parts"]) or "none",
              ",".join(settings["devices"]), settings["fp8_activations"],
              "; ".join(hooks) or "none (no ComfyUI)", mode)
    management = sys.modules.get("comfy.model_management")
    if management is None or os.environ.get("KILN_COMFY_FP8_COMPUTE", "1") == "0":
        return
    current = management.supports_fp8_compute
    if not hasattr(current, "kiln_original"):
        management.supports_fp8_compute = _kiln_fp8_compute(current)
        _log.info("kiln: ComfyUI's fp8 compute enabled on CUDA GPUs from sm_80")


if os.environ.get("KILN_PATCH", "1") != "0":
    _apply()
