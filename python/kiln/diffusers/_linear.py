"""Linear layers on kiln: the GEMM with its epilogue (bias, AdaLN gate, residual add), weights
quantized once to fp8 or kept in bf16, and the bookkeeping that gives the model its own weights
back on remove().

A Linear computes  out = residual + gate * (x . W^T + bias)  (gate and residual optional):

  weights="bf16"                 F.linear (cuBLAS), then one torch.addcmul for gate and residual.
  weights="fp8", activations fp8 x arrives quantized per token (a Quantized pair from the fused
                                 norm / activation op before it, or quantized here), fp8 x fp8
                                 kiln.matmul with per-channel weight scales; gate, residual and
                                 bias in the GEMM's epilogue.
  weights="fp8", activations bf16
                                 bf16 x with fp8 weights decoded in registers (kiln.matmul path
                                 "gemm"), what GPUs without fp8 tensor cores (sm_80/86) run.

Linears fed by the timestep embedding (AdaLN modulation, time and guidance embedders) have one
row per batch element: they take bf16 x whatever the activation mode, which kiln.matmul runs as
its fused GEMV (reading the fp8 weight is the whole cost; quantizing one row saves nothing).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import kiln

from .._C import InvalidArgumentError, UnsupportedError

FP8_FORMAT = "e4m3fn"
_FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Mode:
    """How the linears run: weights "fp8" or "bf16"; activations "fp8" (fp8 x fp8 GEMMs) or
    "bf16" (bf16 x fp8 weights decoded in registers; with weights="bf16", plain bf16 GEMMs)."""

    weights: str
    activations: str

    @property
    def quantize(self):
        """The quantize= argument of the fused ops that feed a GEMM: fp8 per token, or None."""
        return FP8_FORMAT if self.weights == "fp8" and self.activations == "fp8" else None


class Quantized(NamedTuple):
    """An activation quantized per token: q fp8 [..., K], scale f32 [rows] (rows of q as [R, K]),
    what kiln's fused norm / activation ops return with quantize="e4m3fn"."""

    q: torch.Tensor
    scale: torch.Tensor


def quantize_rows(x: torch.Tensor) -> Quantized:
    """x [..., K] quantized per token to fp8 (scale = amax / 448)."""
    q, scale = kiln.quantize_fp8(x, FP8_FORMAT, "row")
    return Quantized(q, scale)


def token_rows(x, start: int, stop: int):
    """Rows [start, stop) of every batch element of a [B, L, K] tensor or Quantized pair (its
    scale sliced alike): how a joint text + image attention output is split per stream."""
    if isinstance(x, Quantized):
        b, length = x.q.shape[0], x.q.shape[1]
        scale = x.scale.view(b, length)[:, start:stop].reshape(-1)
        return Quantized(x.q[:, start:stop], scale)
    return x[:, start:stop]


class Linear:
    """One linear layer on kiln: `weight` [N, K] (several nn.Linear weights concatenated along N
    for a fused projection, or a column range of one), `bias` [N] or None.

    per_batch: the layer has one row per batch element (fed by the timestep embedding); it takes
    bf16 x in every mode (kiln.matmul's GEMV for fp8 weights).
    """

    def __init__(self, weight: torch.Tensor, bias, mode: Mode, *, per_batch: bool = False):
        self.mode = mode
        self.per_batch = per_batch
        self.n, self.k = weight.shape
        self.dtype = weight.dtype  # the model's: what a fp8 product is rounded to by default
        self.bias = bias
        self.weight = None  # bf16: the weight F.linear reads
        self.w = None  # fp8: what kiln.matmul reads (the weight or a kiln.PreparedWeight)
        self.w_scale = None
        self.path = "auto"
        if mode.weights == "bf16":
            self.weight = weight
            return
        q, scale = kiln.quantize_fp8(weight.detach(), FP8_FORMAT, "row")
        self.w, self.w_scale = q, scale
        if mode.activations == "bf16" and not per_batch and weight.device.type == "cuda":
            # The decode-in-registers GEMM, forced (CPU tensors run the reference whatever the
            # path), on rows padded once for its 16-byte tile loads.
            self.path = "gemm"
            self.w, self.w_scale = kiln.prepare_weight(q, scale, path="gemm"), None

    @property
    def nbytes(self) -> int:
        """Device memory of the weight as kiln holds it (a bf16 weight: the model's own)."""
        if self.weight is not None:
            return self.weight.nbytes
        data = self.w.nbytes
        return data + (self.w_scale.nbytes if self.w_scale is not None else 0)

    def __call__(self, x, *, gate=None, residual=None, out_dtype=None):
        """out = residual + gate * (x . W^T + bias).

        x: [B, L, K] (or [B, K] for a per-batch layer), or a Quantized pair with fp8
           activations. gate: [B, N] (one vector per batch element, broadcast over L) or None.
        residual: out's shape, or None. out_dtype: default the residual's dtype, else the
           weight's (the model's).
        """
        if self.weight is not None:
            return self._bf16(x, gate, residual, out_dtype)
        if isinstance(x, Quantized):
            a, a_scale = x.q, x.scale
        elif self.mode.quantize is not None and not self.per_batch:
            a, a_scale = quantize_rows(x)
        else:
            a, a_scale = x, None
        if out_dtype is None:
            out_dtype = residual.dtype if residual is not None else self.dtype
        return kiln.matmul(a, self.w, w_scale=self.w_scale, a_scale=a_scale, bias=self.bias,
                              gate=gate, residual=residual, out_dtype=out_dtype, path=self.path)

    def _bf16(self, x, gate, residual, out_dtype):
        if isinstance(x, Quantized):
            raise InvalidArgumentError(
                "kiln.diffusers: a bf16 linear got fp8 activations (a fused op quantized for a "
                "GEMM that reads bf16)")
        y = F.linear(x, self.weight, self.bias)
        y = _epilogue(y, gate, residual)
        return y if out_dtype is None else y.to(out_dtype)


def _epilogue(y, gate, residual):
    """residual + gate * y in one elementwise pass (gate [B, N] broadcast over y's rows)."""
    if gate is not None and y.dim() == 3:
        gate = gate.unsqueeze(1)
    if residual is None:
        return y if gate is None else y * gate
    if gate is None:
        return residual + y
    return torch.addcmul(residual, gate, y)


class SplitLinear:
    """A linear whose input is the concatenation [a, m] of two activations along K (the
    single-stream block's output projection over [attention output, MLP output]), run as two
    GEMMs over the two column ranges of its weight, so that the concatenation is never written:
        out = residual + gate * (W_a a + W_m m + bias)
    fp8: two kiln.matmul calls, the first into a partial (residual + gate * W_a a), the second
    adding gate * W_m m to it. The partial has the residual's dtype where the layer has no bias
    (Flux.2), so that each GEMM's gate and residual fold into cuBLASLt's epilogue (its C has the
    output's dtype), at the cost of one more bf16 rounding of the sum, far below the fp8
    operands' error; with a bias (FLUX.1), which per-row scales never fuse, the partial is f32
    and the sum is rounded once. bf16: F.linear then addmm_ into the same output, then one
    addcmul."""

    def __init__(self, weight: torch.Tensor, bias, split: int, mode: Mode):
        self.mode = mode
        self.first = Linear(weight[:, :split], bias, mode)
        self.second = Linear(weight[:, split:], None, mode)

    @property
    def nbytes(self) -> int:
        return self.first.nbytes + self.second.nbytes

    def __call__(self, a, m, *, gate, residual):
        if self.first.weight is None:
            partial_dtype = residual.dtype if self.first.bias is None else torch.float32
            partial = self.first(a, gate=gate, residual=residual, out_dtype=partial_dtype)
            return self.second(m, gate=gate, residual=partial, out_dtype=residual.dtype)
        y = F.linear(a, self.first.weight, self.first.bias)
        y.view(-1, y.shape[-1]).addmm_(m.reshape(-1, m.shape[-1]), self.second.weight.t())
        return _epilogue(y, gate, residual)


class Originals:
    """The model's weights that kiln took over, so that remove() gives them back exactly.

    With fp8 weights the bf16 originals are not needed while applied: offload() moves each to
    host memory and leaves a stand-in of the same shape, dtype and device in the module (one
    element broadcast, so the model's device and dtype still read as before, at no memory cost).
    With bf16 weights fused projections get one new weight and the originals become views of it
    (share()), so nothing is held twice. restore() undoes both.
    """

    def __init__(self):
        self._saved = []  # (parameter, original data)

    def offload(self, param: torch.nn.Parameter) -> None:
        data = param.data
        host = data if data.device.type == "cpu" else data.to("cpu")
        self._saved.append((param, host))
        param.data = torch.empty(1, dtype=data.dtype, device=data.device).expand(data.shape)

    def share(self, params, fused: torch.Tensor) -> None:
        """Each of `params` (stacked along dim 0 in `fused`) becomes a view of its rows."""
        start = 0
        for param in params:
            rows = param.shape[0]
            self._saved.append((param, None))
            param.data = fused[start:start + rows]
            start += rows

    def restore(self) -> None:
        for param, data in reversed(self._saved):
            if data is None:  # a view of a fused weight: a storage of its own again
                param.data = param.data.clone()
            else:
                param.data = data.to(param.device)
        self._saved.clear()


def fused(layers, mode: Mode, originals: Originals, *, offload: bool, per_batch: bool = False,
          extra=()) -> Linear:
    """One Linear over several nn.Linear modules that read the same input (their outputs
    concatenated along N: Q, K, V and, for the single-stream block, the MLP's input projection),
    and the weights they replace handed to `originals`. `extra` lists more nn.Linear modules
    that share the input and come after `layers` in the output."""
    mods = [*layers, *extra]
    weights = [m.weight for m in mods]
    biases = [m.bias for m in mods]
    if len({b is None for b in biases}) > 1:
        raise UnsupportedError(
            "kiln.diffusers: projections fused into one GEMM must all have a bias or none")
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if len(weights) == 1:
        weight = weights[0].detach()
    else:
        weight = torch.cat([w.detach() for w in weights])
    linear = Linear(weight, bias, mode, per_batch=per_batch)
    if mode.weights == "bf16":
        if len(weights) > 1:
            originals.share(weights, weight)
    elif offload:
        for w in weights:
            originals.offload(w)
    return linear


def single(layer, mode: Mode, originals: Originals, *, offload: bool,
           per_batch: bool = False) -> Linear:
    """A Linear over one nn.Linear (bf16: its own weight, no copy)."""
    return fused([layer], mode, originals, offload=offload, per_batch=per_batch)


def split(layer, at: int, mode: Mode, originals: Originals, *, offload: bool) -> SplitLinear:
    """A SplitLinear over one nn.Linear whose input is [a (at columns), m]."""
    linear = SplitLinear(layer.weight.detach(), None if layer.bias is None else
                         layer.bias.detach(), at, mode)
    if mode.weights == "fp8" and offload:
        originals.offload(layer.weight)
    return linear


def check_plain_linear(name: str, module) -> None:
    """A module kiln takes over must be a plain nn.Linear with plain float weights: a LoRA layer
    (peft), a quantized weight (torchao, bitsandbytes) or a subclass would be silently ignored."""
    if type(module) is not torch.nn.Linear:
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        raise UnsupportedError(
            f"kiln.diffusers.apply: {name} is a {kind}, expected a torch.nn.Linear (a LoRA "
            "adapter or a quantized layer kiln would ignore)")
    w = module.weight
    if type(w.data) is not torch.Tensor or w.dtype not in (torch.float32, torch.float16,
                                                             torch.bfloat16):
        raise UnsupportedError(
            f"kiln.diffusers.apply: {name}.weight is a {type(w.data).__qualname__} of "
            f"{w.dtype}, expected a plain f32/f16/bf16 tensor (a quantized weight kiln would "
            "read wrong)")
