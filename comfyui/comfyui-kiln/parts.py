"""Which of kiln's parts run, on which devices, and the log of what kiln took or left to ComfyUI.

Parts: "attention" (Flux's RoPE + attention), "fp8_linear" (fp8 linears with per-token
activation scales), "vae_conv2d" (the VAE decoder's convolutions). Each is on by default
(KILN_COMFY_PARTS lists those on); the Kiln node turns them on or off for one model through a
ComfyUI wrapper around its diffusion model, which sets them for the duration of the call.

A call kiln takes is logged once per part ("kiln: attention on kiln (...)"), a call left to
ComfyUI once per part and reason ("kiln: attention -> ComfyUI (...)"), both on the
"kiln.comfyui" logger at INFO; counts() tells how many calls went each way.
"""

import collections
import contextlib
import contextvars
import logging
import os
import threading

from kiln.comfy_kitchen import device_problem as kiln_device_problem

PARTS = ("attention", "fp8_linear", "vae_conv2d")
DEVICE_TYPES = ("cuda", "cpu")

log = logging.getLogger("kiln.comfyui")


def _names(variable: str, default: str, allowed) -> frozenset:
    names = frozenset(n.strip() for n in os.environ.get(variable, default).split(",") if n.strip())
    unknown = names - set(allowed)
    if unknown:
        raise ValueError(f"kiln: {variable} names {sorted(unknown)}, expected some of "
                         f"{', '.join(allowed)}")
    return names


_settings = {
    "parts": _names("KILN_COMFY_PARTS", ",".join(PARTS), PARTS),
    # kiln's CPU code is its reference (exact, slow): ComfyUI keeps CPU work unless asked.
    "devices": _names("KILN_COMFY_DEVICES", "cuda", DEVICE_TYPES),
}
_override = contextvars.ContextVar("kiln_comfyui_parts", default=None)
_lock = threading.Lock()
_logged: set = set()
_counts: collections.Counter = collections.Counter()


def configure(parts=None, devices=None) -> None:
    """Sets the parts on by default and the device types kiln takes work on."""
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


def settings() -> dict:
    return {"parts": sorted(_settings["parts"]), "devices": sorted(_settings["devices"])}


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
    _counts[(part, "kiln")] += 1
    _once((part, "kiln"), "kiln: %s on kiln (%s)", part, detail)


def declined(part: str, reason: str) -> None:
    _counts[(part, "comfyui")] += 1
    _once((part, reason), "kiln: %s -> ComfyUI (%s)", part, reason)


def counts() -> dict:
    """{(part, "kiln" | "comfyui"): calls} since the last reset_counts()."""
    return dict(_counts)


def reset_counts() -> None:
    _counts.clear()
