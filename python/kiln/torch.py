"""Routes torch's fp8 matmuls to kiln, and registers kiln as comfy-kitchen's backend.

    import kiln.torch
    kiln.torch.patch()    # idempotent; kiln.torch.unpatch() restores the originals

patch() replaces `torch._scaled_mm` and `torch.nn.functional.scaled_mm` (where torch has it)
with wrappers that send calls with fp8 operands to kiln.matmul when

  - the device has no fp8 tensor cores: CUDA sm < 8.9 (where torch refuses the call), or CPU;
  - torch cannot take the call (K or N not a multiple of 16, a scale pairing torch lacks, such as
    a per-tensor activation scale with per-row weight scales, bias with an f32 output);
  - kiln is faster for the shape: M <= KILN_FASTER_MAX_M, measured with `kiln bench matmul`
    (0 on this session's H200 numbers: see KILN_FASTER_MAX_M);

and hand everything else to the original function, unchanged (a DEBUG line on the "kiln.torch"
logger says which way each call went and why). mode="always" sends every call kiln can take to
kiln.

Scales are honored exactly as torch defines them (dequantized = q * scale): per-tensor (one
element), per-row (scale_a [M, 1], scale_b [1, N]), 128 x 128 blocks for the weight (scale_b
indexed [k_block, n_block], as torch's blockwise recipes lay it out) and, where torch cannot run
the call, 1 x 128 activation blocks (scale_a [M, ceil(K/128)]; the activation is dequantized to
f32 first, since kiln's activation scale is per tensor or per row). Lists of scales (scaled_mm's
multi-level recipes) are multiplied together as tensors, never reduced to their first element,
and no scale is read back to the host. `mat2` of `_scaled_mm` is [K, N] column-major, that is
w.t() of a row-major [N, K] weight: kiln reads w = mat2.t() in place (a copy only when mat2 is
not column-major). Recipes kiln does not read (1 x 128 weight blocks, MX / NV block formats,
swizzled scales), fp8 outputs and non-fp8 operands fall through to torch.

When comfy_kitchen is installed, patch() also registers kiln as its first-priority backend
(kiln.comfy_kitchen.register(): RoPE, RMSNorm + RoPE, per-tensor fp8 quantize / dequantize, the
entry points its FP8 layout and torch.ops.comfy_kitchen.* dispatch through) unless kiln was
registered already; unpatch() takes out what patch() registered. comfy_kitchen's fp8 linear
reaches torch._scaled_mm / scaled_mm, which the patch covers.

Callers that bound the functions before patch() (`from torch import _scaled_mm`) keep the
originals.
"""

import importlib.util
import inspect
import logging
import threading

import torch

from . import _matmul
from ._C import UnsupportedError

__all__ = ["KILN_FASTER_MAX_M", "is_patched", "patch", "unpatch"]

_log = logging.getLogger("kiln.torch")

# Largest M that kiln takes from torch on GPUs with native fp8 (sm_89+) on speed alone. Measured
# with `kiln bench matmul` on an H200 (07:26 UTC run, case "fp8 x fp8": e4m3 activations and
# weights with per-tensor scales, as torch._scaled_mm gets them; kiln's auto path is its GEMV),
# kiln ms against torch._scaled_mm ms at M padded to 16:
#   1x4096x4096 0.0181 vs 0.0094, 1x4096x14336 0.0363 vs 0.0193, 1x14336x4096 0.0486 vs 0.0208,
#   4x4096x4096 0.0412 vs 0.0098, 4x4096x14336 0.1171 vs 0.0188;
# and M >= 512 (kiln's fp8_native is cuBLASLt too): 0.97x-1.02x. So on fp8 GPUs kiln takes only
# the calls torch refuses; 0 keeps it so until kiln's fp8-activation GEMV wins somewhere.
# (With bf16 activations kiln's GEMV does beat _scaled_mm at M = 1, 1.2-1.5x, but a
# _scaled_mm call always brings fp8 activations.)
KILN_FASTER_MAX_M = 0

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SCALE_BLOCK = _matmul.SCALE_BLOCK

# Recipe numbers of torch.nn.functional.ScalingType (the same in every torch that has it).
_TENSORWISE, _ROWWISE, _BLOCK_1X128, _BLOCK_128X128 = 0, 1, 4, 5

_lock = threading.Lock()
# originals: what patch() replaced, kept after unpatch() so that a wrapper someone still holds
# calls through to torch.
_state = {"patched": False, "mode": "auto", "originals": {}, "signature": None,
          "registered_comfy_kitchen": False}
_capability: dict[int, tuple[int, int]] = {}


class _FallThrough(Exception):
    """A call kiln does not take; the message says why."""


def is_patched() -> bool:
    return _state["patched"]


def patch(*, mode: str = "auto") -> None:
    """Routes torch._scaled_mm, torch.nn.functional.scaled_mm (where present) to kiln and
    registers kiln as comfy_kitchen's first backend (when installed). Idempotent;
    a second call only updates `mode`.

    mode: "auto" (kiln where the device has no fp8 tensor cores, where torch cannot take the
    call, or for M <= KILN_FASTER_MAX_M) or "always" (kiln for every call it can take).
    """
    if mode not in ("auto", "always"):
        raise _matmul.InvalidArgumentError(
            f"kiln.torch.patch: mode is {mode!r}, expected 'auto' or 'always'"
        )
    with _lock:
        _state["mode"] = mode
        if _state["patched"]:
            return
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                _capability[index] = torch.cuda.get_device_capability(index)
        originals = _state["originals"]
        originals["_scaled_mm"] = torch._scaled_mm
        torch._scaled_mm = _scaled_mm
        if hasattr(torch.nn.functional, "scaled_mm"):
            originals["scaled_mm"] = torch.nn.functional.scaled_mm
            _state["signature"] = inspect.signature(originals["scaled_mm"])
            torch.nn.functional.scaled_mm = _scaled_mm_v2
        _register_comfy_kitchen()
        _state["patched"] = True
    _log.debug("kiln.torch: patched (mode %s)", mode)


def unpatch() -> None:
    """Restores what patch() replaced. Idempotent."""
    with _lock:
        if not _state["patched"]:
            return
        originals = _state["originals"]
        torch._scaled_mm = originals["_scaled_mm"]
        if "scaled_mm" in originals:
            torch.nn.functional.scaled_mm = originals["scaled_mm"]
        if _state["registered_comfy_kitchen"]:
            from . import comfy_kitchen

            comfy_kitchen.unregister()
            _state["registered_comfy_kitchen"] = False
        _state["patched"] = False
    _log.debug("kiln.torch: unpatched")


# ---- routing ---------------------------------------------------------------------------------


def _debug(message: str, *args) -> None:
    if not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG):
        _log.debug(message, *args)


def _kiln_is_better(device: torch.device, m: int, torch_refuses: str | None):
    """(why kiln takes the call, whether torch could run it at all); why None: torch keeps it."""
    if _state["mode"] == "always":
        return "mode 'always'", False
    if device.type != "cuda":
        return f"{device.type} has no fp8 tensor cores", False
    major, minor = _capability.get(device.index or 0, (0, 0))
    if (major, minor) < (8, 9):
        return f"sm_{major}{minor} has no fp8 tensor cores", False
    if torch_refuses:
        return f"torch refuses it ({torch_refuses})", False
    if m <= KILN_FASTER_MAX_M:
        return f"M = {m} <= {KILN_FASTER_MAX_M}: kiln is faster", True
    return None, True


def _as_rows(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-row scale ([rows, 1], [1, rows] or [rows]) as [rows]."""
    return scale.reshape(rows)


def _activation_scale(kind: int, scale: torch.Tensor, m: int, k: int):
    """(kiln a_scale or None, 1x128 block scale or None) of one activation scale factor."""
    if kind == _TENSORWISE:
        return scale.reshape(1), None
    if kind == _ROWWISE:
        return _as_rows(scale, m), None
    if kind == _BLOCK_1X128:
        return None, scale
    raise _FallThrough(f"activation scale recipe {kind} is not one kiln reads")


def _weight_scale(kind: int, scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """One weight scale factor as kiln's w_scale: [1], [N] or [ceil(N/128), ceil(K/128)].
    torch lays out 128x128 weight scales for mat2 [K, N] as [k_block, n_block] (rows padded to a
    multiple of 4 by scaled_mm's recipe): kiln's [n_block, k_block] is its transpose."""
    if kind == _TENSORWISE:
        return scale.reshape(1)
    if kind == _ROWWISE:
        return _as_rows(scale, n)
    if kind == _BLOCK_128X128:
        k_blocks, n_blocks = -(-k // _SCALE_BLOCK), -(-n // _SCALE_BLOCK)
        if scale.dim() != 2 or scale.shape[1] != n_blocks or scale.shape[0] < k_blocks:
            raise _FallThrough(
                f"128x128 weight scale of shape {list(scale.shape)}, expected [{k_blocks}, "
                f"{n_blocks}]"
            )
        return scale[:k_blocks].t().contiguous()
    raise _FallThrough(f"weight scale recipe {kind} is not one kiln reads")


def _product(factors):
    """Elementwise product of scale tensors (broadcast [1] against [R] or blocks)."""
    out = factors[0]
    for factor in factors[1:]:
        out = out * factor
    return out.to(torch.float32)


def _dequantize_block_1x128(a: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """a [M, K] fp8 with scales [M, ceil(K/128)] -> f32 [M, K] = a * scale."""
    k = a.shape[1]
    per_column = block.to(torch.float32).repeat_interleave(_SCALE_BLOCK, dim=1)[:, :k]
    return a.to(torch.float32) * per_column


def _run_kiln(a, mat2, a_factors, w_factors, bias, out_dtype, torch_refuses):
    """out [M, N] = (a . mat2) * scales + bias through kiln, or _FallThrough.

    a_factors / w_factors: lists of (recipe, scale tensor) whose product is the scale."""
    if a.dim() != 2 or mat2.dim() != 2:
        raise _FallThrough("operands are not matrices")
    if a.dtype not in _FP8 or mat2.dtype not in _FP8:
        raise _FallThrough(f"operands are {a.dtype} and {mat2.dtype}, not fp8")
    if out_dtype not in _OUT_DTYPES:
        raise _FallThrough(f"output dtype {out_dtype} (kiln writes f32/f16/bf16)")
    if bias is not None and (bias.dim() != 1 or bias.dtype not in _OUT_DTYPES):
        raise _FallThrough("bias is not a 1-D float vector")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, mat2, bias)):
        raise _FallThrough("an operand requires grad, and kiln has no backward")
    m, k = a.shape
    n = mat2.shape[1]
    if mat2.shape[0] != k:
        raise _FallThrough(f"shapes [{m}, {k}] and {list(mat2.shape)} do not multiply")
    why, torch_runs_it = _kiln_is_better(a.device, m, torch_refuses)
    if why is None:
        raise _FallThrough(f"torch's native fp8 is faster for M = {m}")

    a_scales, blocks = [], []
    for kind, scale in a_factors:
        row_or_tensor, block = _activation_scale(kind, scale, m, k)
        if block is None:
            a_scales.append(row_or_tensor)
        else:
            blocks.append(block)
    if len(blocks) > 1 or (blocks and torch_runs_it):
        raise _FallThrough("1x128 activation scales that torch runs natively")
    w_scale = _product([_weight_scale(kind, scale, n, k) for kind, scale in w_factors])
    a_scale = _product(a_scales) if a_scales else None
    if blocks:
        # kiln's activation scale is per tensor or per row: dequantize a to f32 (exact products).
        a = _dequantize_block_1x128(a, blocks[0])
        if a_scale is not None:
            a = a * a_scale.reshape(-1, 1)
        a_scale = None
    elif a.stride(1) != 1:
        a = a.contiguous()
    w = mat2.t()  # [N, K]: contiguous when mat2 is column-major, as torch wants it
    if not w.is_contiguous():
        _debug("kiln.torch: mat2 of shape %s is not column-major: copied", list(mat2.shape))
        w = w.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    try:
        out = _matmul.matmul(a, w, w_scale=w_scale, a_scale=a_scale, bias=bias,
                             out_dtype=out_dtype)
    except UnsupportedError as error:  # e.g. an operand pairing kiln has no kernel for
        raise _FallThrough(f"kiln: {error}") from None
    _debug("kiln.torch: fp8 matmul [%d, %d] x [%d, %d] -> kiln (%s)", m, k, k, n, why)
    return out


def _fall_through(name: str, reason: str) -> None:
    _debug("kiln.torch: %s -> torch (%s)", name, reason)


# ---- torch._scaled_mm ------------------------------------------------------------------------


def _v1_torch_refuses(a, mat2, bias, out_dtype) -> str | None:
    """Why torch._scaled_mm itself would refuse the call on an fp8 GPU, or None."""
    k, n = a.shape[1], mat2.shape[1]
    if k % 16 or n % 16:
        return f"K = {k} and N = {n} must be multiples of 16"
    if bias is not None and out_dtype == torch.float32:
        return "bias with an f32 output"
    return None


def _v1_scale_kinds(a, mat2, scale_a, scale_b):
    """(recipe of scale_a, recipe of scale_b) by shape, in torch's order of preference."""
    m, k = a.shape
    n = mat2.shape[1]
    k_blocks = -(-k // _SCALE_BLOCK)
    if scale_a.numel() == 1:
        kind_a = _TENSORWISE
    elif scale_a.numel() == m and (scale_a.dim() == 1 or tuple(scale_a.shape) == (m, 1)):
        kind_a = _ROWWISE
    elif tuple(scale_a.shape) == (m, k_blocks):
        kind_a = _BLOCK_1X128
    else:
        raise _FallThrough(f"scale_a of shape {list(scale_a.shape)}")
    if scale_b.numel() == 1:
        kind_b = _TENSORWISE
    elif scale_b.numel() == n and (scale_b.dim() == 1 or tuple(scale_b.shape) == (1, n)):
        kind_b = _ROWWISE
    elif scale_b.dim() == 2 and scale_b.shape[1] == -(-n // _SCALE_BLOCK):
        kind_b = _BLOCK_128X128
    else:
        raise _FallThrough(f"scale_b of shape {list(scale_b.shape)}")
    return kind_a, kind_b


def _v1_pair_refused(kind_a: int, kind_b: int, device: torch.device) -> str | None:
    pairs = {(_TENSORWISE, _TENSORWISE), (_ROWWISE, _ROWWISE)}
    major = _capability.get(device.index or 0, (0, 0))[0] if device.type == "cuda" else 0
    if major == 9:
        pairs.add((_BLOCK_1X128, _BLOCK_128X128))
    if (kind_a, kind_b) not in pairs:
        return f"scale recipes {kind_a} x {kind_b}"
    return None


def _scaled_mm(self, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
               use_fast_accum=False):
    original = _state["originals"]["_scaled_mm"]
    try:
        if not _state["patched"]:
            raise _FallThrough("unpatched")
        if not all(isinstance(t, torch.Tensor) for t in (self, mat2, scale_a, scale_b)):
            raise _FallThrough("non-tensor arguments")
        if self.dim() != 2 or mat2.dim() != 2:
            raise _FallThrough("operands are not matrices")
        kind_a, kind_b = _v1_scale_kinds(self, mat2, scale_a, scale_b)
        refuses = (_v1_torch_refuses(self, mat2, bias, out_dtype)
                   or _v1_pair_refused(kind_a, kind_b, self.device))
        return _run_kiln(self, mat2, [(kind_a, scale_a)], [(kind_b, scale_b)], bias, out_dtype,
                         refuses)
    except _FallThrough as reason:
        _fall_through("torch._scaled_mm", str(reason))
    return original(self, mat2, scale_a, scale_b, bias=bias, scale_result=scale_result,
                    out_dtype=out_dtype, use_fast_accum=use_fast_accum)


# ---- torch.nn.functional.scaled_mm -----------------------------------------------------------


def _recipe_list(values) -> list:
    return list(values) if isinstance(values, (list, tuple)) else [values]


def _recipe_number(recipe) -> int:
    value = getattr(recipe, "value", recipe)
    return int(value)


def _no_swizzle(swizzle) -> bool:
    if swizzle is None:
        return True
    return all(s is None or _recipe_number(s) == 0 for s in _recipe_list(swizzle))


def _scaled_mm_v2(*args, **kwargs):
    original = _state["originals"]["scaled_mm"]
    try:
        if not _state["patched"]:
            raise _FallThrough("unpatched")
        try:
            bound = _state["signature"].bind(*args, **kwargs)
        except TypeError as error:
            raise _FallThrough(f"arguments: {error}") from None
        bound.apply_defaults()
        p = bound.arguments
        a, mat2 = p["mat_a"], p["mat_b"]
        if not (isinstance(a, torch.Tensor) and isinstance(mat2, torch.Tensor)):
            raise _FallThrough("non-tensor operands")
        if not (_no_swizzle(p.get("swizzle_a")) and _no_swizzle(p.get("swizzle_b"))):
            raise _FallThrough("swizzled scales")
        contraction = tuple(p.get("contraction_dim") or ())
        if contraction and tuple(d % 2 for d in contraction) != (1, 0):
            raise _FallThrough(f"contraction_dim {contraction}")
        if p.get("use_fast_accum"):
            _debug("kiln.torch: use_fast_accum ignored (kiln accumulates in f32)")
        factors = []
        for side in ("a", "b"):
            scales = _recipe_list(p[f"scale_{side}"])
            recipes = _recipe_list(p[f"scale_recipe_{side}"])
            if len(scales) != len(recipes) or not all(isinstance(s, torch.Tensor)
                                                      for s in scales):
                raise _FallThrough(f"scale_{side} and scale_recipe_{side} do not pair up")
            factors.append([(_recipe_number(r), s) for r, s in zip(recipes, scales)])
        if a.dim() != 2 or mat2.dim() != 2:
            raise _FallThrough("operands are not matrices")
        if len(factors[0]) != 1 or len(factors[1]) != 1:
            refuses = "multi-level fp8 scales"
        else:
            refuses = (_v1_torch_refuses(a, mat2, p.get("bias"), p.get("output_dtype"))
                       or _v1_pair_refused(factors[0][0][0], factors[1][0][0], a.device))
        return _run_kiln(a, mat2, factors[0], factors[1], p.get("bias"), p.get("output_dtype"),
                         refuses)
    except _FallThrough as reason:
        _fall_through("torch.nn.functional.scaled_mm", str(reason))
    return original(*args, **kwargs)


# ---- comfy_kitchen ---------------------------------------------------------------------------


def _register_comfy_kitchen() -> None:
    """kiln.comfy_kitchen.register() where comfy_kitchen is installed and kiln is not yet its
    backend; unpatch() undoes only what this did."""
    if importlib.util.find_spec("comfy_kitchen") is None:
        return
    from . import comfy_kitchen

    if comfy_kitchen.is_registered():
        return
    comfy_kitchen.register()
    _state["registered_comfy_kitchen"] = True
    _log.debug("kiln.torch: kiln is comfy_kitchen's first backend")
