"""Quantized matmul for torch tensors, numpy arrays and CuPy arrays: fp8 (e4m3fn, e5m2) and ggml
Q8_0 weights, quantize / dequantize, and prepared weights.

Outputs are allocated with the input's framework on the input's device; CUDA work goes on that
framework's current stream. torch tensors go through the torch custom ops of _torch_matmul
(torch.ops.kiln.*), so torch.compile graphs can hold them. numpy and CuPy have no fp8 dtype:
there fp8 data is held as uint8 (its bytes) and its format is named with `fmt`.

torch is never imported here: a torch tensor can only come from a process that has imported it.
"""

import math
import numbers
import sys

import numpy as np

from . import _C, _args
from ._C import InvalidArgumentError, UnsupportedError

# fp8 format spellings -> the binding's format name.
_FP8_ALIASES = {
    "e4m3fn": "f8_e4m3fn",
    "e4m3": "f8_e4m3fn",
    "f8_e4m3fn": "f8_e4m3fn",
    "float8_e4m3fn": "f8_e4m3fn",
    "e5m2": "f8_e5m2",
    "f8_e5m2": "f8_e5m2",
    "float8_e5m2": "f8_e5m2",
}
# Weight format spellings (fp8 ones above, plus these) -> the binding's format name.
_WEIGHT_ALIASES = {**_FP8_ALIASES, "q8_0": "q8_0", "f16": "f16", "float16": "f16", "half": "f16",
                   "bf16": "bf16", "bfloat16": "bf16"}
_GRANULARITIES = {"tensor": "tensor", "row": "row", "block": "block128", "block128": "block128"}
_PATHS = ("auto", "gemv", "gemm", "fp8_native", "reference")
Q8_0_BLOCK = 32  # values per Q8_0 block
Q8_0_BYTES = 34  # bytes per Q8_0 block: f16 d + 32 int8
SCALE_BLOCK = 128  # block128 scales cover 128 x 128 values


def fp8_format(op: str, arg: str, fmt) -> str:
    """The binding name ("f8_e4m3fn", "f8_e5m2") of an fp8 format given as a string or dtype."""
    name = _FP8_ALIASES.get(str(fmt).removeprefix("torch.").lower())
    if name is None:
        raise InvalidArgumentError(
            f"kiln::{op}: {arg} is {fmt!r}, expected an fp8 format: 'e4m3fn' or 'e5m2' "
            "(or torch.float8_e4m3fn / torch.float8_e5m2)"
        )
    return name


def weight_format(op: str, fmt) -> str:
    name = _WEIGHT_ALIASES.get(str(fmt).removeprefix("torch.").lower())
    if name is None:
        raise InvalidArgumentError(
            f"kiln::{op}: w_fmt is {fmt!r}, expected one of 'e4m3fn', 'e5m2', 'q8_0', 'f16', 'bf16'"
        )
    return name


def granularity_name(op: str, granularity) -> str:
    name = _GRANULARITIES.get(str(granularity))
    if name is None:
        raise InvalidArgumentError(
            f"kiln::{op}: granularity is {granularity!r}, expected 'tensor', 'row' or 'block'"
        )
    return name


def path_name(op: str, path) -> str:
    if not isinstance(path, str) or path not in _PATHS:
        raise InvalidArgumentError(
            f"kiln::{op}: path is {path!r}, expected one of {', '.join(map(repr, _PATHS))}"
        )
    return path


def array_dtype_name(x) -> str:
    """kiln's name of an array's dtype: "f32", "bf16", "f8_e4m3fn", "u8", ..."""
    text = str(x.dtype).removeprefix("torch.")
    return {
        "float32": "f32",
        "float16": "f16",
        "bfloat16": "bf16",
        "float8_e4m3fn": "f8_e4m3fn",
        "float8_e5m2": "f8_e5m2",
        "uint8": "u8",
    }.get(text, text)


def scale_shape(granularity: str, rows: int, cols: int) -> tuple:
    """Shape of the f32 scale of a quantized [rows, cols] matrix."""
    if granularity == "tensor":
        return (1,)
    if granularity == "row":
        return (rows,)
    return (-(-rows // SCALE_BLOCK), -(-cols // SCALE_BLOCK))


def q8_0_bytes_per_row(op: str, cols: int) -> int:
    if cols % Q8_0_BLOCK:
        raise InvalidArgumentError(
            f"kiln::{op}: x has {cols} columns, expected a multiple of {Q8_0_BLOCK} (the Q8_0 "
            "block)"
        )
    return cols // Q8_0_BLOCK * Q8_0_BYTES


def q8_0_cols(op: str, arg: str, row_bytes: int) -> int:
    if row_bytes % Q8_0_BYTES:
        raise InvalidArgumentError(
            f"kiln::{op}: {arg} is Q8_0 with {row_bytes} bytes per row, expected a multiple of "
            f"{Q8_0_BYTES} (one block = f16 d + 32 int8)"
        )
    return row_bytes // Q8_0_BYTES * Q8_0_BLOCK


def rows_of(op: str, arg: str, shape) -> int:
    """Rows of the [R, C] matrix that an array of `shape` [..., C] is read as."""
    if len(shape) < 1:
        raise InvalidArgumentError(f"kiln::{op}: {arg} is a scalar, expected [..., C]")
    return math.prod(shape[:-1])


def _as_scale(op: str, arg: str, scale, like, framework: str, positive: bool = False):
    """A scale as an f32 array of `like`'s framework and device: numbers become [1] (finite and
    > 0 when `positive`); 0-d arrays become [1]; other arrays of real numbers are cast to f32 and
    made contiguous (a few values); bool and complex arrays are refused."""
    if scale is None:
        return None
    if isinstance(scale, numbers.Number):
        values = [_args.real(op, arg, scale, positive=positive, finite=positive)]
        if framework == "torch":
            return sys.modules["torch"].tensor(values, dtype=sys.modules["torch"].float32,
                                               device=like.device)
        if framework == "numpy":
            return np.asarray(values, dtype=np.float32)
        with like.device:
            return sys.modules["cupy"].asarray(values, dtype=np.float32)
    if _args.framework(op, arg, scale) != framework:
        raise InvalidArgumentError(
            f"kiln::{op}: {arg} is a {_args.type_str(scale)}, expected the same framework as the "
            f"data ({framework})"
        )
    dtype = str(scale.dtype).removeprefix("torch.")
    if dtype == "bool" or dtype.startswith("complex"):
        raise InvalidArgumentError(
            f"kiln::{op}: {arg} has dtype {dtype}, expected real numbers (f32, or floats and ints "
            "that are cast to it)"
        )
    if scale.ndim == 0:
        scale = scale.reshape(1)
    if framework == "torch":
        torch = sys.modules["torch"]
        return scale.to(torch.float32).contiguous()
    if framework == "numpy":
        return np.ascontiguousarray(scale, dtype=np.float32)
    return sys.modules["cupy"].ascontiguousarray(scale, dtype=np.float32)


def as_rows(x):
    """x [..., C] as [R, C] (R the product of the leading dims; C = 0 too): a view where the
    strides allow it."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _array_or_none(x):
    """x where it is an array argument, None where it is a number (or absent)."""
    return None if x is None or isinstance(x, numbers.Number) else x


# ---- quantize / dequantize -------------------------------------------------------------------


def quantize_fp8(x, fmt="e4m3fn", granularity="tensor", scale=None):
    """Quantizes x [..., C] (f32/f16/bf16, any strides) to fp8 with one f32 scale per tensor,
    per row (of x read as [R, C], R = the product of the leading dims), or per 128 x 128 block
    (x 2-D only).

    fmt: "e4m3fn" (max 448) or "e5m2" (max 57344), or the torch float8 dtype.
    granularity: "tensor" -> scale [1]; "row" -> scale [R]; "block" -> scale
       [ceil(R/128), ceil(C/128)].
    scale: None computes scale = amax / max of the format per group (fused amax pass; an
       all-zero group gets 1); else the given f32 scale (a number for "tensor") is used.

    Returns (q, scale): q has x's shape, contiguous, fp8 for torch (the float8 dtype) and uint8
    (the fp8 bytes) for numpy/CuPy; dequantized = q * scale. Rounds to nearest even, saturates
    to +-max, keeps NaN. A given scale must be finite and > 0 (checked for numbers and CPU
    arrays; a CUDA array's values are not read on the host). An empty x gives an empty q (and,
    computed, a scale of 1 per group).
    """
    framework = _args.check_arrays("quantize_fp8", x=x, scale=_array_or_none(scale))
    fmt_name = fp8_format("quantize_fp8", "fmt", fmt)
    gran = granularity_name("quantize_fp8", granularity)
    if gran == "block128" and x.ndim != 2:
        raise InvalidArgumentError(
            f"kiln::quantize_fp8: x has shape {_args.shape_str(x.shape)}, expected 2 dims [R, C] "
            "for granularity 'block'"
        )
    rows_of("quantize_fp8", "x", x.shape)
    given = _as_scale("quantize_fp8", "scale", scale, x, framework, positive=True)
    if framework == "torch":
        from . import _torch_matmul

        return _torch_matmul.quantize_fp8(x, fmt_name, gran, given)

    x2 = as_rows(x)
    q = _args.empty(framework, x, x.shape, np.uint8)
    if given is None:
        out_scale = _args.empty(framework, x, scale_shape(gran, *x2.shape), np.float32)
        if x2.size == 0:
            out_scale[...] = 1  # no group has an element: its amax is 0
    else:
        out_scale = given
    # numpy and CuPy hold fp8 as uint8: fmt names its format.
    _C.quantize_fp8(x2, as_rows(q), out_scale, gran, given is None, _args.stream(x, framework),
                    fmt=fmt_name)
    return q, out_scale


def quantize_q8_0(x):
    """Quantizes x [..., C] (f32/f16/bf16, any strides, C % 32 == 0) to ggml Q8_0 blocks:
    uint8 [..., C / 32 * 34], byte-identical to ggml's quantize_row_q8_0_ref."""
    framework = _args.check_arrays("quantize_q8_0", x=x)
    rows_of("quantize_q8_0", "x", x.shape)
    row_bytes = q8_0_bytes_per_row("quantize_q8_0", x.shape[-1])
    if framework == "torch":
        from . import _torch_matmul

        return _torch_matmul.quantize_q8_0(x)
    q = _args.empty(framework, x, (*x.shape[:-1], row_bytes), np.uint8)
    _C.quantize_q8_0(as_rows(x), as_rows(q), _args.stream(x, framework))
    return q


def _q_format(op: str, q, scale, fmt) -> str:
    """The format of quantized data q: its fp8 dtype, else `fmt`, else Q8_0 for uint8."""
    dtype = array_dtype_name(q)
    if dtype in ("f8_e4m3fn", "f8_e5m2"):
        if fmt is not None and fp8_format(op, "fmt", fmt) != dtype:
            raise InvalidArgumentError(
                f"kiln::{op}: fmt is {fmt!r} but q is {dtype}; expected fmt None or q's format"
            )
        return dtype
    if dtype != "u8":
        raise InvalidArgumentError(
            f"kiln::{op}: q is {dtype}, expected fp8 (float8_e4m3fn / float8_e5m2), or uint8 "
            "holding Q8_0 blocks or fp8 bytes (with fmt)"
        )
    if fmt is None or str(fmt).lower() == "q8_0":
        if scale is not None:
            raise InvalidArgumentError(
                f"kiln::{op}: q is uint8 with a scale: Q8_0 blocks take no scale; for fp8 bytes "
                "held as uint8 pass fmt='e4m3fn' or 'e5m2'"
            )
        return "q8_0"
    return fp8_format(op, "fmt", fmt)


def dequantize(q, scale=None, *, out_dtype="f32", fmt=None):
    """Dequantizes fp8 data q [..., C] with its scale ([1], [R] or [ceil(R/128), ceil(C/128)]
    for q read as [R, C]; None = 1), or Q8_0 blocks (uint8 [..., C / 32 * 34], no scale), into a
    contiguous [..., C] array of out_dtype ("f32", "f16", "bf16" or a framework dtype) = q * scale,
    scale fused.

    fmt: the fp8 format of q when q is uint8 holding fp8 bytes (numpy, CuPy): "e4m3fn" or "e5m2";
    None reads uint8 as Q8_0 and fp8 dtypes as themselves.
    """
    out_dtype = "f32" if out_dtype is None else out_dtype
    framework = _args.check_arrays("dequantize", q=q, scale=_array_or_none(scale))
    q_fmt = _q_format("dequantize", q, scale, fmt)
    rows_of("dequantize", "q", q.shape)
    if framework == "torch":
        from . import _torch_matmul

        return _torch_matmul.dequantize(q, _as_scale("dequantize", "scale", scale, q, framework),
                                        out_dtype, q_fmt)
    row_bytes = q.shape[-1]
    cols = q8_0_cols("dequantize", "q", row_bytes) if q_fmt == "q8_0" else row_bytes
    out = _args.empty(framework, q, (*q.shape[:-1], cols),
                      _args.numpy_out_dtype("dequantize", framework, out_dtype, None, "q"))
    scale = _as_scale("dequantize", "scale", scale, q, framework)
    _C.dequantize(as_rows(q), scale, as_rows(out), _args.stream(q, framework),
                  fmt=None if q_fmt == "q8_0" else q_fmt)
    return out


# ---- matmul ----------------------------------------------------------------------------------


class PreparedWeight:
    """A weight repacked once by kiln.prepare_weight into the layout a matmul path reads
    fastest. Its storage is a uint8 array allocated with the weight's framework (so torch's
    allocator accounts for it); pass the PreparedWeight to kiln.matmul in place of the weight.

    Attributes: storage (uint8), data (storage as kiln.matmul reads it: typed [N, K] for the
    row_major layout, the uint8 storage otherwise), format ("f8_e4m3fn", ..., "q8_0"), layout
    ("row_major", "gemm_packed", "dequantized"), n, k (the weight is [N, K]), scale (kept when the
    layout keeps the weight's scale, else None), path (what it was prepared for), nbytes.
    """

    __slots__ = ("storage", "data", "format", "layout", "n", "k", "scale", "path")

    def __init__(self, storage, data, format: str, layout: str, n: int, k: int, scale, path: str):
        self.storage = storage
        self.data = data
        self.format = format
        self.layout = layout
        self.n = n
        self.k = k
        self.scale = scale
        self.path = path

    @property
    def nbytes(self) -> int:
        return int(self.storage.nbytes)

    @property
    def shape(self) -> tuple:
        return (self.n, self.k)

    @property
    def device(self):
        return self.storage.device

    def __repr__(self) -> str:
        return (f"kiln.PreparedWeight([{self.n}, {self.k}] {self.format}, layout {self.layout}, "
                f"for path {self.path}, {self.nbytes} bytes on {self.device})")


class WeightSpec:
    """A weight as the binding takes it: data, format, n, k, scale, layout."""

    __slots__ = ("data", "format", "n", "k", "scale", "layout")

    def __init__(self, data, format, n, k, scale, layout):
        self.data, self.format, self.n, self.k = data, format, n, k
        self.scale, self.layout = scale, layout


def weight_spec(op: str, w, w_scale, w_fmt, framework: str) -> WeightSpec:
    """Reads w (an fp8/f16/bf16 [N, K] array, uint8 Q8_0 blocks [N, K/32*34] or fp8 bytes with
    w_fmt, or a PreparedWeight) and its scale into a WeightSpec."""
    if isinstance(w, PreparedWeight):
        if w_scale is not None:
            raise InvalidArgumentError(
                f"kiln::{op}: w_scale given with a PreparedWeight, expected None (the prepared "
                "weight carries its scale)"
            )
        return WeightSpec(w.data, w.format, w.n, w.k, w.scale, w.layout)
    if _args.framework(op, "w", w) != framework:
        raise InvalidArgumentError(
            f"kiln::{op}: w is a {_args.type_str(w)}, expected the same framework as a "
            f"({framework})"
        )
    if w.ndim != 2:
        raise InvalidArgumentError(
            f"kiln::{op}: w has shape {_args.shape_str(w.shape)}, expected 2 dims [N, K] (or "
            "uint8 Q8_0 blocks [N, K / 32 * 34])"
        )
    dtype = array_dtype_name(w)
    if dtype in ("f8_e4m3fn", "f8_e5m2", "f16", "bf16"):
        fmt = dtype
        if w_fmt is not None and weight_format(op, w_fmt) != dtype:
            raise InvalidArgumentError(
                f"kiln::{op}: w_fmt is {w_fmt!r} but w is {dtype}; expected None or w's format"
            )
    elif dtype == "u8":
        fmt = "q8_0" if w_fmt is None else weight_format(op, w_fmt)
        if fmt in ("f16", "bf16"):
            raise InvalidArgumentError(
                f"kiln::{op}: w is uint8 with w_fmt {w_fmt!r}, expected w_fmt None or 'q8_0' "
                "(Q8_0 blocks), or 'e4m3fn' / 'e5m2' (fp8 bytes)"
            )
    else:
        raise InvalidArgumentError(
            f"kiln::{op}: w is {dtype}, expected float8_e4m3fn, float8_e5m2, float16, bfloat16, "
            "or uint8 (Q8_0 blocks, or fp8 bytes with w_fmt)"
        )
    n = w.shape[0]
    k = q8_0_cols(op, "w", w.shape[1]) if fmt == "q8_0" else w.shape[1]
    if fmt in ("f8_e4m3fn", "f8_e5m2"):
        scale = _weight_scale(op, w_scale, w, n, framework)
    elif w_scale is not None:
        raise InvalidArgumentError(
            f"kiln::{op}: w_scale given with a {fmt} weight, expected None (only fp8 weights "
            "carry a scale)"
        )
    else:
        scale = None
    if framework == "torch" and dtype == "u8" and fmt != "q8_0":
        w = w.view(sys.modules["torch"].float8_e4m3fn if fmt == "f8_e4m3fn"
                   else sys.modules["torch"].float8_e5m2)
    return WeightSpec(w, fmt, n, k, scale, "row_major")


def _weight_scale(op: str, w_scale, like, n: int, framework: str):
    """w_scale as f32 [1], [N] or [Nb, Kb]: numbers and 0-d become [1]; [N, 1] and [1, N]
    become [N]."""
    scale = _as_scale(op, "w_scale", w_scale, like, framework)
    if scale is not None and scale.ndim == 2 and n != 1 and scale.shape in ((n, 1), (1, n)):
        scale = scale.reshape(n)
    return scale


def _activation_scale(op: str, a_scale, like, m: int, framework: str):
    """a_scale as f32 [1] or [M]: numbers and 0-d become [1]; [M, 1] becomes [M]."""
    scale = _as_scale(op, "a_scale", a_scale, like, framework)
    if scale is not None and scale.ndim == 2 and scale.shape == (m, 1):
        scale = scale.reshape(m)
    return scale


def matmul(a, w, *, w_scale=None, a_scale=None, bias=None, out_dtype=None, path="auto",
           w_fmt=None, a_fmt=None, gate=None, residual=None):
    """out [..., N] = residual + gate * ((a [..., K] . w^T) * a_scale * w_scale + bias), scales,
    bias, gate and residual applied in f32 in the epilogue, out rounded once.

    a: f32/f16/bf16 [..., K] (leading dims are flattened into M; a 2-D a may have any row
       stride), or fp8 with an fp8 weight (a_scale [1] or [M]; numpy/CuPy: uint8 bytes with
       a_fmt).
    w: [N, K] fp8 (either format) with w_scale ([1], [N] or [ceil(N/128), ceil(K/128)]; None
       = 1), f16/bf16, uint8 Q8_0 blocks [N, K/32*34], uint8 fp8 bytes with w_fmt, or a
       PreparedWeight.
    bias: [N] f32/f16/bf16.
    gate: [N], or [B, N] where a is [B, L, K] (one gate vector per batch element: rows
       b * L .. b * L + L - 1 use gate[b]; rows may be strided, e.g. a chunk of Flux's AdaLN
       modulation), f32/f16/bf16. A 2-D a [M, K] takes [B, N] with B dividing M (rows
       b * M / B .. (b + 1) * M / B - 1 use gate[b]).
    residual: out's shape [..., N], f32/f16/bf16 (any dtype pairing with out), rows may be
       strided: the residual stream the linear adds into (the output is a fresh array).
    out_dtype: "f32"/"f16"/"bf16" or a framework dtype; default a's dtype (bf16 for an fp8 a
       in torch, f32 in numpy/CuPy).
    path: "auto" (kiln.select_path's choice), "gemv" (M <= 16), "gemm", "fp8_native" (sm_90,
       fp8 a); CPU arrays run kiln's reference backend whatever the path.

    M = 0 or N = 0 give an empty result; K = 0 gives bias (or zeros), as torch does.
    """
    data = w.storage if isinstance(w, PreparedWeight) else w
    framework = _args.check_arrays("matmul", a=a, w=data, w_scale=_array_or_none(w_scale),
                                   a_scale=_array_or_none(a_scale), bias=bias, gate=gate,
                                   residual=residual)
    path = path_name("matmul", path)
    spec = weight_spec("matmul", w, w_scale, w_fmt, framework)
    if a.ndim < 1 or a.shape[-1] != spec.k:
        raise InvalidArgumentError(
            f"kiln::matmul: a has shape {_args.shape_str(a.shape)}, expected [..., K] with K = "
            f"{spec.k} (w is [{spec.n}, {spec.k}])"
        )
    lead = tuple(a.shape[:-1])
    m = math.prod(lead)
    a_name = array_dtype_name(a)
    if residual is not None:
        if tuple(residual.shape) != (*lead, spec.n):
            raise InvalidArgumentError(
                f"kiln::matmul: residual has shape {_args.shape_str(residual.shape)}, expected "
                f"out's shape {_args.shape_str((*lead, spec.n))}"
            )
        residual = residual.reshape(m, spec.n)
    if gate is not None and gate.ndim == 2 and a.ndim > 2 and gate.shape[0] != a.shape[0]:
        raise InvalidArgumentError(
            f"kiln::matmul: gate has shape {_args.shape_str(gate.shape)}, expected [N] or "
            f"[B, N] with B = {a.shape[0]}, a's first dim (a is {_args.shape_str(a.shape)}: one "
            "gate vector per batch element)"
        )
    if framework == "torch":
        from . import _torch_matmul

        a2 = a if a.ndim == 2 else a.reshape(m, spec.k)
        if a_name == "u8" and a_fmt is not None:
            torch = sys.modules["torch"]
            fmt = fp8_format("matmul", "a_fmt", a_fmt)
            a2 = a2.view(torch.float8_e4m3fn if fmt == "f8_e4m3fn" else torch.float8_e5m2)
        out = _torch_matmul.matmul(a2, spec, _activation_scale("matmul", a_scale, a, m, framework),
                                   bias, out_dtype, path, gate, residual)
        return out.reshape(*lead, spec.n)

    a2 = a if a.ndim == 2 else a.reshape(m, spec.k)
    a_format = None
    if a_name == "u8":
        if a_fmt is None:
            raise InvalidArgumentError(
                "kiln::matmul: a is uint8, expected f32/f16 or fp8 bytes with a_fmt='e4m3fn' or "
                "'e5m2'"
            )
        a_format = fp8_format("matmul", "a_fmt", a_fmt)
    if out_dtype is None and a_format is not None:
        out_dtype = "f32"
    out = _args.empty(framework, a, (m, spec.n),
                      _args.numpy_out_dtype("matmul", framework, out_dtype, a, "a"))
    _C.matmul(a2, spec.data, spec.format, spec.n, spec.k, spec.scale, spec.layout, out,
              _activation_scale("matmul", a_scale, a, m, framework), bias, path,
              _args.stream(a, framework), a_format=a_format, gate=gate, residual=residual)
    return out.reshape(*lead, spec.n)


def _device_index(x, framework: str) -> int:
    if framework == "torch":
        return x.device.index if x.device.type == "cuda" else -1
    if framework == "numpy":
        return -1
    return x.device.id


def select_path(m: int, w, *, a_dtype="bf16", w_fmt=None, device=None) -> str:
    """The path kiln.matmul(path="auto") runs for an [m, K] activation of a_dtype ("f32", "f16",
    "bf16", "f8_e4m3fn", "f8_e5m2") against w (array or PreparedWeight) on w's device (or
    `device`: a CUDA ordinal, -1 for CPU): "gemv", "gemm", "fp8_native" or "reference"."""
    m = _args.integer("select_path", "m", m, minimum=0)
    data = w.storage if isinstance(w, PreparedWeight) else w
    framework = _args.check_arrays("select_path", w=data)
    spec = weight_spec("select_path", w, None, None if data is not w else w_fmt, framework)
    a_name = str(a_dtype).removeprefix("torch.")
    a_name = _FP8_ALIASES.get(a_name, None) or _args.dtype_name("select_path", a_name, "a_dtype")
    if device is None:
        index = _device_index(data, framework)
    else:
        index = _args.integer("select_path", "device", device, minimum=-1)
    return _C.matmul_select_path(m, spec.n, spec.k, spec.format, spec.layout, a_name, index)


def prepare_weight(w, w_scale=None, *, fmt=None, path="auto") -> PreparedWeight:
    """Repacks w [N, K] (as kiln.matmul takes it, with its scale) once into the layout `path`
    reads fastest (or a dequantized copy where that wins), into a uint8 storage array allocated
    with w's framework on w's device. Returns a kiln.PreparedWeight to pass to kiln.matmul.

    fmt: w's format when w is uint8 holding fp8 bytes ("e4m3fn"/"e5m2"); None reads uint8 as
    Q8_0.
    """
    framework = _args.check_arrays("prepare_weight", w=w, w_scale=_array_or_none(w_scale))
    path = path_name("prepare_weight", path)
    spec = weight_spec("prepare_weight", w, w_scale, fmt, framework)
    nbytes = _C.prepared_weight_bytes(spec.data, spec.format, spec.n, spec.k, spec.scale,
                                      spec.layout, path)
    if framework == "torch":
        torch = sys.modules["torch"]
        storage = torch.empty(nbytes, dtype=torch.uint8, device=w.device)
    else:
        storage = _args.empty(framework, w, (nbytes,), np.uint8)
    fmt_name, layout, keeps_scale = _C.prepare_weight(spec.data, spec.format, spec.n, spec.k,
                                                      spec.scale, spec.layout, path, storage,
                                                      _args.stream(w, framework))
    data = storage
    if layout == "row_major":  # a plain copy: read with the format's dtype and shape
        data = _typed_view(framework, storage, fmt_name, spec.n, spec.k)
    return PreparedWeight(storage, data, fmt_name, layout, spec.n, spec.k,
                          spec.scale if keeps_scale else None, path)


def _typed_view(framework: str, storage, fmt: str, n: int, k: int):
    """u8 storage holding a row-major weight, viewed as [N, K] of the format's dtype (uint8
    [N, K / 32 * 34] for Q8_0; uint8 [N, K] fp8 bytes in numpy / CuPy)."""
    cols = k // Q8_0_BLOCK * Q8_0_BYTES if fmt == "q8_0" else k
    if framework == "torch":
        torch = sys.modules["torch"]
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f8_e4m3fn": torch.float8_e4m3fn,
                 "f8_e5m2": torch.float8_e5m2, "q8_0": torch.uint8}[fmt]
        return storage.view(dtype).view(n, cols)
    if fmt == "bf16":
        raise UnsupportedError(
            f"kiln::prepare_weight: a bf16 weight in {framework}, which has no bf16 type"
        )
    return storage.view(np.float16 if fmt == "f16" else np.uint8).reshape(n, cols)
