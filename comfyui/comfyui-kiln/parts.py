"""Which of kiln's parts run, on which devices, the log of what kiln took or left to ComfyUI,
and the class hook the parts share (call_after_init).

Parts: "attention" (Flux's blocks: QK RMSNorm + RoPE + attention, and the AdaLN norms and
GEMM epilogues around them; Flux's attention function where a block runs on ComfyUI),
"fp8_linear" (linears with fp8 weights), "vae_conv2d" (the VAE decoder's convolutions). Each is
on by default (KILN_COMFY_PARTS lists those on); the Kiln node turns them on or off for one model
through a ComfyUI wrapper around its diffusion model, which sets them for the duration of the
call.

fp8 linears take their activations in fp8 (per-token scales, fp8 x fp8 on tensor cores) or as
they come (bf16 x fp8 weights decoded in registers): fp8_activations(device) says which,
KILN_COMFY_FP8_ACTIVATIONS=auto|fp8|bf16 sets it (auto: fp8 where the GPU has fp8 tensor cores,
sm_89 and up, and on CPU; bf16 on sm_80 to sm_87).

A call kiln takes is logged once per part and way ("kiln: attention on kiln (...)"), a call
left to ComfyUI once per part and reason ("kiln: attention -> ComfyUI (...)"), both on the
"kiln.comfyui" logger at INFO; counts() tells how many calls went each way.
"""

import collections
import contextlib
import contextvars
import functools
import logging
import os
import threading

import torch

from kiln.comfy_kitchen import device_problem as kiln_device_problem

PARTS = ("attention", "fp8_linear", "vae_conv2d")
DEVICE_TYPES = ("cuda", "cpu")
FP8_ACTIVATIONS = ("auto", "fp8", "bf16")
FP8_TENSOR_CORES = (8, 9)  # sm_89 (Ada) and newer multiply fp8 x fp8 on tensor cores

log = logging.getLogger("kiln.comfyui")


def _names(variable: str, default: str, allowed) -> frozenset:
    names = frozenset(n.strip() for n in os.environ.get(variable, default).split(",") if n.strip())
    unknown = names - set(allowed)
    if unknown:
        raise ValueError(f"kiln: {variable} names {sorted(unknown)}, expected some of "
                         f"{', '.join(allowed)}")
    return names


def _choice(variable: str, allowed) -> str:
    value = os.environ.get(variable, allowed[0]).strip()
    if value not in allowed:
        raise ValueError(f"kiln: {variable} is {value!r}, expected one of {', '.join(allowed)}")
    return value


_settings = {
    "parts": _names("KILN_COMFY_PARTS", ",".join(PARTS), PARTS),
    # kiln's CPU code is its reference (exact, slow): ComfyUI keeps CPU work unless asked.
    "devices": _names("KILN_COMFY_DEVICES", "cuda", DEVICE_TYPES),
    "fp8_activations": _choice("KILN_COMFY_FP8_ACTIVATIONS", FP8_ACTIVATIONS),
}
_override = contextvars.ContextVar("kiln_comfyui_parts", default=None)
_lock = threading.Lock()
_logged: set = set()
_counts: collections.Counter = collections.Counter()


def configure(parts=None, devices=None, fp8_activations=None) -> None:
    """Sets the parts on by default, the device types kiln takes work on and how fp8 linears
    take their activations ("auto", "fp8", "bf16")."""
    if parts is not None:
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"kiln: unknown parts {sorted(unknown)}, expected some of {PARTS}")
        _settings["parts"] = frozenset(parts)
    if devices is not None:
        unknown = set(devices) - set(DEVICE_TYPES)
        if unknown:
            raise ValueError(f"kiln: unknown device types {sorted(unknown)}, expected some of "
                             f"{DEVICE_TYPES}")
        _settings["devices"] = frozenset(devices)
    if fp8_activations is not None:
        if fp8_activations not in FP8_ACTIVATIONS:
            raise ValueError(f"kiln: fp8_activations is {fp8_activations!r}, expected one of "
                             f"{FP8_ACTIVATIONS}")
        _settings["fp8_activations"] = fp8_activations


def settings() -> dict:
    return {"parts": sorted(_settings["parts"]), "devices": sorted(_settings["devices"]),
            "fp8_activations": _settings["fp8_activations"]}


@functools.cache
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def fp8_activations(device: torch.device) -> bool:
    """Whether fp8 linears on `device` quantize their activations to fp8 (per token) for an fp8
    x fp8 matmul, or read them as they are against the fp8 weights."""
    mode = _settings["fp8_activations"]
    if mode != "auto":
        return mode == "fp8"
    if device.type != "cuda":
        return True  # kiln's CPU reference: the fp8 x fp8 math of sm_89 and up
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= FP8_TENSOR_CORES


def enabled(part: str) -> bool:
    override = _override.get()
    if override is not None and part in override:
        return override[part]
    return part in _settings["parts"]


@contextlib.contextmanager
def using(parts: dict):
    """Parts on (True) or off (False) for the calls made inside; parts not named keep theirs."""
    token = _override.set({**(_override.get() or {}), **parts})
    try:
        yield
    finally:
        _override.reset(token)


def diffusion_model_wrapper(parts: dict):
    """A ComfyUI DIFFUSION_MODEL wrapper running the model with `parts` set."""

    def kiln_parts(executor, *args, **kwargs):
        with using(parts):
            return executor(*args, **kwargs)

    kiln_parts.kiln_parts = dict(parts)
    return kiln_parts


def device_problem(*tensors) -> str | None:
    """Why kiln does not take work on these tensors' device, or None."""
    for t in tensors:
        if t.device.type not in _settings["devices"]:
            return (f"{t.device.type} device (kiln takes {', '.join(sorted(_settings['devices']))}"
                    " work: KILN_COMFY_DEVICES)")
    return kiln_device_problem(tensors)


def _once(key, message: str, *args) -> None:
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    log.info(message, *args)


def took(part: str, detail: str) -> None:
    """A call of `part` run on kiln, the way `detail` says (logged once per part and detail)."""
    _counts[(part, "kiln")] += 1
    _once((part, "kiln", detail), "kiln: %s on kiln (%s)", part, detail)


def declined(part: str, reason: str) -> None:
    _counts[(part, "comfyui")] += 1
    _once((part, reason), "kiln: %s -> ComfyUI (%s)", part, reason)


def counts() -> dict:
    """{(part, "kiln" | "comfyui"): calls} since the last reset_counts()."""
    return dict(_counts)


def reset_counts() -> None:
    _counts.clear()


def call_after_init(cls, add) -> None:
    """Wraps cls.__init__ (a ComfyUI class) so that add(instance) runs after it; once."""
    original = cls.__init__
    if hasattr(original, "kiln_original"):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        add(self)

    __init__.kiln_original = original
    cls.__init__ = __init__
