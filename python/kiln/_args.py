"""Argument checks every op's Python wrapper runs before it allocates anything, and the small
helpers the wrappers share (shape text, streams, output dtypes).

An op's arrays must be torch tensors, numpy arrays or CuPy arrays, all of one framework (the first
array's), on a device kiln computes on: the CPU, or one CUDA device shared by every array (torch's
meta tensors, and arrays on two devices, are refused). numpy arrays must be in native byte order.
A torch tensor that autograd would need a gradient for (requires_grad under grad mode) is refused:
kiln ops are inference-only and have no backward. Each failure is a kiln error naming the op and
the argument.

torch and CuPy are never imported here: their arrays can only come from a process that has
imported them already.
"""

import math
import numbers
import sys

import numpy as np

from ._C import InvalidArgumentError, UnsupportedError

# Output dtype spellings, by kiln name.
DTYPE_ALIASES = {
    "f32": "f32",
    "float32": "f32",
    "float": "f32",
    "f16": "f16",
    "float16": "f16",
    "half": "f16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}
# numpy (and CuPy) types of kiln's output dtypes: neither has bf16.
NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16}


def shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def type_str(x) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def framework(op: str, arg: str, x) -> str:
    """"torch", "numpy" or "cupy": the framework of array `x`."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    raise InvalidArgumentError(
        f"kiln::{op}: {arg} is a {type_str(x)}, expected a torch tensor, a numpy array or a "
        "CuPy array"
    )


def check_arrays(op: str, **arrays) -> str:
    """Checks an op's arrays, the first one first (None: an optional one left out), as the module
    says, and returns their framework."""
    items = iter(arrays.items())
    first_name, first = next(items)
    kind = framework(op, first_name, first)
    _check_one(op, first_name, first, kind)
    for name, array in items:
        if array is None:
            continue
        if framework(op, name, array) != kind:
            raise InvalidArgumentError(
                f"kiln::{op}: {name} is a {type_str(array)}, expected the framework of "
                f"{first_name} ({type_str(first)})"
            )
        _check_one(op, name, array, kind)
        if device_of(array, kind) != device_of(first, kind):
            raise InvalidArgumentError(
                f"kiln::{op}: {name} is on {device_of(array, kind)}, expected {first_name}'s "
                f"device {device_of(first, kind)}"
            )
    return kind


def device_of(x, kind: str) -> str:
    """"cpu", "cuda:0", ...: where array `x` of framework `kind` lives."""
    if kind == "torch":
        return str(x.device)
    if kind == "numpy":
        return "cpu"
    return f"cuda:{x.device.id}"


def _check_one(op: str, name: str, x, kind: str) -> None:
    if kind == "numpy":
        if not x.dtype.isnative:
            raise InvalidArgumentError(
                f"kiln::{op}: {name} is a numpy array of non-native byte order ({x.dtype.str}), "
                f"expected native order: pass {name}.astype({name}.dtype.newbyteorder('='))"
            )
    elif kind == "torch":
        if x.device.type not in ("cpu", "cuda"):
            raise InvalidArgumentError(
                f"kiln::{op}: {name} is on {x.device}, expected a cpu or cuda tensor (kiln "
                "computes on real memory)"
            )
        no_grad_needed(op, name, x)


def writable(op: str, name: str, x) -> None:
    """Refuses a read-only numpy array given as an output (out=, cache=): kiln writes it."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        raise InvalidArgumentError(
            f"kiln::{op}: {name} is a read-only numpy array, expected a writable one (kiln "
            f"writes it; a broadcast view, say, is read-only: pass {name}.copy())"
        )


def no_grad_needed(op: str, name: str, t) -> None:
    """Refuses a torch tensor that autograd would need a gradient for: kiln ops have no
    backward, and a graph through them would silently drop the gradient."""
    if t.requires_grad and sys.modules["torch"].is_grad_enabled():
        raise UnsupportedError(
            f"kiln::{op}: {name} requires grad, but kiln ops are inference-only (no backward); "
            f"call under torch.no_grad() or torch.inference_mode(), or pass {name}.detach()"
        )


def same_device(op: str, **tensors) -> None:
    """For torch's fake (meta) kernels: every tensor on the first one's device. A call on meta
    tensors alone gives meta results, as meta kernels do; one that mixes meta and real tensors
    would give an uninitialized real result, and is refused."""
    items = iter(tensors.items())
    first_name, first = next(items)
    for name, t in items:
        if t is not None and t.device != first.device:
            raise InvalidArgumentError(
                f"kiln::{op}: {name} is on {t.device}, expected {first_name}'s device "
                f"{first.device}"
            )


def empty(kind: str, like, shape, dtype):
    """An uninitialized numpy or CuPy array on `like`'s device (the op writes every element)."""
    if kind == "numpy":
        return np.empty(shape, dtype=dtype)
    with like.device:
        return sys.modules["cupy"].empty(shape, dtype=dtype)


def stream(x, kind: str) -> int:
    """The current stream of `x`'s framework on `x`'s device; 0 for the CPU."""
    if kind == "torch":
        if x.device.type != "cuda":
            return 0
        return sys.modules["torch"].cuda.current_stream(x.device).cuda_stream
    if kind == "cupy":
        return sys.modules["cupy"].cuda.get_current_stream().ptr
    return 0


def dtype_name(op: str, dtype, arg: str = "out_dtype") -> str:
    """The kiln name ("f32", "f16", "bf16") of a torch/numpy/CuPy dtype or a string."""
    text = str(dtype).removeprefix("torch.")
    if isinstance(dtype, type) and issubclass(dtype, np.generic):  # np.float32, the type
        text = np.dtype(dtype).name
    name = DTYPE_ALIASES.get(text)
    if name is None:
        expected = ", ".join(sorted(set(DTYPE_ALIASES.values())))
        raise InvalidArgumentError(f"kiln::{op}: {arg} is {dtype}, expected one of {expected}")
    return name


def numpy_out_dtype(op: str, kind: str, out_dtype, like, like_arg: str):
    """The numpy/CuPy dtype of an output: out_dtype, else `like`'s dtype; f32 or f16 (neither
    framework has bf16)."""
    if out_dtype is None:
        name = DTYPE_ALIASES.get(str(like.dtype))
        if name not in NUMPY_DTYPES:
            raise InvalidArgumentError(
                f"kiln::{op}: {like_arg} has dtype {like.dtype}, expected float32 or float16 "
                f"(or name the output type with out_dtype)"
            )
    else:
        name = dtype_name(op, out_dtype)
        if name not in NUMPY_DTYPES:
            raise InvalidArgumentError(
                f"kiln::{op}: out_dtype is {name}, which {kind} has no type for; expected f32 or "
                "f16 (use torch for bf16)"
            )
    return NUMPY_DTYPES[name]


def integer(op: str, arg: str, value, minimum: int | None = None) -> int:
    """`value` as an int (Python or numpy integers; not bool, not float), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"kiln::{op}: {arg} is {value!r}, expected an int")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"kiln::{op}: {arg} = {value}, expected an int >= {minimum}")
    return value


def real(op: str, arg: str, value, *, positive: bool = False, finite: bool = True) -> float:
    """`value` as a float (Python or numpy reals, not bool), finite, and > 0 when `positive`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"kiln::{op}: {arg} is {value!r}, expected a number")
    value = float(value)
    if (finite and not math.isfinite(value)) or (positive and not value > 0):
        wanted = "a finite value > 0" if positive else "a finite value"
        raise InvalidArgumentError(f"kiln::{op}: {arg} = {value}, expected {wanted}")
    return value
