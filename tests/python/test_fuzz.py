"""Property-based fuzzing of every public op: hypothesis draws shapes (zero sizes included),
layouts (permuted memory, strided views whose gaps hold NaN), dtypes, devices and keyword values,
and every call must either match torch's own result within the op's bound, or raise kiln's error
naming the op and the argument: never another exception, never uninitialized output.

Oracles, all computed in f64 from the inputs as given: BFL's RoPE formula (apply_rope and its
RMSNorm; with out=, into a row range of a larger buffer whose other rows stay untouched),
F.scaled_dot_product_attention (SDPA's math written out where SDPA has no such argument: kv_len,
softcap, the bottom-right causal diagonal when Lq != Lk, non-finite scores), F.conv2d, the
dequantize-then-matmul chain (then residual + gate * (...) for the epilogue), torch's fp8 casts,
gguf's Q8_0 (ggml's reference in numpy), F.rms_norm, F.layer_norm with the AdaLN modulation
y * (1 + scale) + shift, F.group_norm (+ F.silu), the GLU formula act(x[..., :F]) * x[..., F:]
with F.silu or F.gelu(approximate="tanh"), F.gelu(approximate="tanh"), and the LLM RoPE formulas
(normal: adjacent pairs, neox: halves; angles position * theta^(-2i/D)) with the KV-cache write
(rows at the positions, every other row untouched). A fused fp8 output (quantize=) must be, bit
for bit, kiln.quantize_fp8(y, fmt, "row") of the op's own f32 output y, which is held to the
oracle. kiln's documented rules apply where it differs from torch on purpose (README, "Where kiln
differs from torch on purpose").

A drawn case is valid by construction (kiln must compute it), deliberately broken in one argument
(kiln must refuse it, naming that argument: a foreign dtype, a meta tensor, a tensor that requires
grad, a list, a bad value), or "either" where the rule is the kernels' (a layout kiln may refuse).

Budget: KILN_FUZZ_SECONDS (default 40) for the whole file, shared by the ops; each op runs
batches of examples until its share is spent. The seed is in pytest's header (KILN_FUZZ_SEED
replays it). The CUDA tests run on a GPU (scripts/gpu_check.sh's python stage), skipped elsewhere.
"""

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import kiln

from conftest import CUDA_REASON, FUZZ_SECONDS, FUZZ_SEED, HAS_CUDA

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
FOREIGN = [torch.float64, torch.int16, torch.bool, torch.complex64]  # no kiln op takes these
# One unit in the last place, relative, of each output dtype.
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
OPS = ["rope_flux", "attention", "conv2d", "matmul", "quantize_fp8", "quantize_q8_0",
       "dequantize", "prepare_weight", "select_path", "rms_norm", "layer_norm", "group_norm",
       "glu", "gelu_tanh", "rope"]


@dataclass
class Case:
    """One drawn call. expect: "ok" (valid: kiln computes it), "error" (broken in `bad`: kiln
    refuses naming it) or "either" (kiln may refuse, naming one of the op's arguments)."""

    op: str
    call: Callable
    check: Callable  # check(result) asserts it matches the oracle
    expect: str = "ok"
    bad: str | None = None
    notes: list = field(default_factory=list)


ARGUMENTS = {
    "rope_flux": ["x", "pe", "norm_weight", "eps", "out_dtype", "out"],
    "attention": ["q", "k", "v", "mask", "kv_len", "scale", "softcap", "head dim"],
    "conv2d": ["x", "w", "bias", "stride", "padding", "dilation", "groups", "out_dtype"],
    "matmul": ["a", "w", "w_scale", "a_scale", "bias", "out_dtype", "path", "w.data", "w_fmt",
               "a_fmt", "K", "weight", "gate", "residual"],
    "quantize_fp8": ["x", "scale", "fmt", "granularity"],
    "quantize_q8_0": ["x"],
    "dequantize": ["q", "scale", "out_dtype", "fmt"],
    "prepare_weight": ["w", "w_scale", "path", "layout", "fmt"],
    "select_path": ["m", "w", "a_dtype", "device"],
    "rms_norm": ["x", "weight", "eps", "out_dtype", "quantize"],
    "layer_norm": ["x", "weight", "bias", "shift", "scale", "eps", "out_dtype", "quantize"],
    "group_norm": ["x", "num_groups", "weight", "bias", "eps", "out_dtype"],
    "glu": ["x", "activation", "out_dtype", "quantize"],
    "gelu_tanh": ["x", "out_dtype", "quantize"],
    "rope": ["x", "positions", "theta", "style", "norm_weight", "eps", "out_dtype"],
    "rope_cache": ["x", "positions", "theta", "style", "norm_weight", "eps", "out_dtype", "cache"],
}


def run_case(case: Case, device: str) -> None:
    try:
        result = case.call()
    except kiln.KilnError as error:
        message = str(error)
        assert message.startswith(f"kiln::{case.op}: "), message
        assert case.expect != "ok", f"a valid call was refused ({case.notes}): {message}"
        names = [case.bad] if case.bad else ARGUMENTS[case.op]
        assert any(re.search(rf"(?<![\w.]){re.escape(n)}\b", message) for n in names), (
            f"the error names none of {names}: {message}")
        return
    assert case.expect != "error", f"kiln accepted a call broken in {case.bad}: {case.notes}"
    case.check(result)


def fuzz(op: str, device: str, strategy) -> None:
    """Runs `strategy`'s cases for op's share of the budget, in batches of hypothesis runs, each
    seeded from the run's seed (no example database: nothing is written to the checkout)."""
    deadline = time.monotonic() + FUZZ_SECONDS / len(OPS)
    batch = 0
    while batch == 0 or time.monotonic() < deadline:
        print(f"kiln fuzz {op} on {device}: seed {FUZZ_SEED}, batch {batch}")

        @hypothesis_seed(FUZZ_SEED + 1000 * OPS.index(op) + batch)
        @settings(max_examples=25, deadline=None, database=None,
                  phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(case):
            run_case(case, device)

        one()
        batch += 1


# ---- tensors: values from a drawn seed (so that hypothesis can replay and shrink) ---------------


def values(gen, shape, dtype, device, scale=1.0):
    if dtype in FLOATS or dtype == torch.float64:
        return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)
    if dtype == torch.bool:
        return (torch.rand(shape, generator=gen) > 0.5).to(device)
    if dtype.is_complex:
        return torch.randn(shape, generator=gen).to(dtype).to(device)
    return torch.randint(-3, 4, shape, generator=gen).to(dtype).to(device)


@st.composite
def layout(draw, t, allowed=("contiguous", "reversed", "strided")):
    """t's values in another memory layout: dims reversed in memory, or every other element of a
    wider buffer whose gaps hold NaN (a kernel that reads them shows it)."""
    kind = draw(st.sampled_from(allowed))
    if kind == "contiguous" or t.dim() < 2 or t.numel() == 0:
        return t
    if kind == "reversed":
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    dim = draw(st.integers(0, t.dim() - 1))
    shape = list(t.shape)
    shape[dim] *= 2
    floating = t.dtype.is_floating_point and t.element_size() > 1
    big = torch.full(shape, math.nan if floating else 0, dtype=t.dtype, device=t.device)
    index = [slice(None)] * t.dim()
    index[dim] = slice(None, None, 2)
    big[tuple(index)] = t
    return big[tuple(index)]


def inject_specials(draw, gen, t, rate):
    """Sets a few elements of a float tensor to inf, -inf or NaN."""
    if t.numel() == 0 or not draw(st.booleans()) or not t.dtype.is_floating_point:
        return t
    t = t.clone()
    flat = t.view(-1)
    count = max(1, int(t.numel() * rate))
    picks = torch.randint(0, t.numel(), (count,), generator=gen)
    flat[picks.to(t.device)] = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
    return t


@dataclass
class Breakage:
    """One argument deliberately broken: how, and its name."""

    kind: str
    arg: str


@st.composite
def breakage(draw, tensor_args, device):
    """None (a valid call) most of the time, else one tensor argument broken."""
    if not draw(st.integers(0, 3)) == 0:
        return None
    kinds = ["dtype", "meta", "grad", "list"] + (["cpu"] if device != "cpu" else [])
    return Breakage(draw(st.sampled_from(kinds)), draw(st.sampled_from(tensor_args)))


def refuse(case: Case, b: Breakage, first: str, other: bool = False) -> None:
    """The case must be refused, naming b's argument; any argument where b moved the first one to
    the CPU (the others are then on the wrong device) or where the case breaks another argument
    too (`other`: which one the op checks first is its business)."""
    case.expect = "error"
    case.bad = None if other or (b.kind == "cpu" and b.arg == first) else b.arg


def present(b: Breakage | None, args: dict) -> Breakage | None:
    """b, or None where the argument it names was left out (an optional one)."""
    return None if b is None or args.get(b.arg) is None else b


def broken(b: Breakage | None, name: str, t, draw, gen):
    """t, or t broken as `b` says when b names it."""
    if b is None or b.arg != name or t is None:
        return t
    if b.kind == "dtype":
        # A mask may be bool (SDPA's kind); a scale may be any real type (cast to f32).
        foreign = {"mask": FOREIGN[:2] + FOREIGN[3:], "w_scale": FOREIGN[2:], "scale": FOREIGN[2:],
                   "a_scale": FOREIGN[2:]}.get(name, FOREIGN)
        return values(gen, t.shape, draw(st.sampled_from(foreign)), t.device)
    if b.kind == "meta":
        return t.to("meta")
    if b.kind == "cpu":
        return t.cpu()
    if b.kind == "grad":
        return t.float().detach().requires_grad_() if not t.dtype.is_floating_point or \
            t.element_size() == 1 else t.detach().requires_grad_()
    return t.tolist()


def close(got, want, tol, notes):
    """got equals want (f64) rounded to got's dtype, within tol (per element); NaN where want is
    NaN, and nowhere else."""
    assert got.shape == want.shape, (got.shape, want.shape, notes)
    got64 = got.detach().cpu().double()
    want64 = want.to(got.dtype).double() if got.dtype in FLOATS else want.double()
    nan = torch.isnan(want64)
    assert torch.equal(torch.isnan(got64), nan), f"NaN where the oracle has none, or not: {notes}"
    bad = ~nan & ~((got64 - want64).abs() <= tol) & ~(got64 == want64)
    assert not bad.any(), (
        f"{int(bad.sum())} of {got.numel()} elements off: got {got64[bad][:4].tolist()}, want "
        f"{want64[bad][:4].tolist()} (tol {tol if isinstance(tol, float) else tol[bad][:4]}); "
        f"{notes}")


def rounding(dtype, want, floor):
    """The bound of a result computed in f64 and rounded once to dtype: an ulp of it, plus a
    floor for f32 arithmetic on the way."""
    return ULP[dtype] * want.abs().nan_to_num(0, 0, 0) + floor


# ---- rope_flux ----------------------------------------------------------------------------------


def rope_oracle(x, pe, norm_weight, eps):
    """BFL's RMSNorm and apply_rope in f64, then the permute to [N, H, L, D]."""
    xf = x.detach().cpu().double()
    if xf.numel() == 0:
        return xf.permute(0, 2, 1, 3)
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + float(np.float32(eps)))
        xf = xf * norm_weight.cpu().double()
    if pe is not None:
        xq = xf.reshape(*xf.shape[:-1], -1, 1, 2)
        pe_h = pe.cpu().double().unsqueeze(-4)
        xf = (pe_h[..., 0] * xq[..., 0] + pe_h[..., 1] * xq[..., 1]).reshape(x.shape)
    return xf.permute(0, 2, 1, 3)


@st.composite
def rope_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n, l, h = (draw(st.integers(0, 3)) for _ in range(3))
    d = draw(st.sampled_from([0, 2, 6, 8, 64, 3]))
    x_dtype = draw(st.sampled_from(FLOATS))
    x = draw(layout(values(gen, (n, l, h, d), x_dtype, device)))
    pe = None
    if draw(st.booleans()):
        pe_shape = (n, l, d // 2, 2, 2) if draw(st.booleans()) else (l, d // 2, 2, 2)
        pe = draw(layout(values(gen, pe_shape, torch.float32, device)))
    norm_weight = values(gen, (d,), draw(st.sampled_from(FLOATS)), device) if draw(
        st.booleans()) else None
    eps = draw(st.sampled_from([1e-6, 0.0, 1e-3]))
    out_dtype = draw(st.sampled_from([None, *FLOATS, "bf16", "f16"]))
    out_type = {None: x_dtype, "bf16": torch.bfloat16, "f16": torch.float16}.get(out_dtype,
                                                                                out_dtype)
    # out=: a row range [a, a + L) of a NaN-poisoned [N, H, L', D] buffer (its rows in [N, L', H,
    # D] memory, or D strided: refused), of out_dtype's type or another (refused when out_dtype
    # is given).
    out, buf, out_bad = None, None, None
    out_kind = draw(st.sampled_from(["none", "none", "range", "permuted", "d_strided"]))
    if out_kind != "none":
        buf_type = out_type if out_dtype is None or draw(st.integers(0, 3)) else draw(
            st.sampled_from(FLOATS))
        first, extra = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        wide = 2 if out_kind == "d_strided" else 1
        if out_kind == "permuted":
            buf = torch.full((n, l + first + extra, h, d), math.nan, dtype=buf_type,
                             device=device).permute(0, 2, 1, 3)
        else:
            buf = torch.full((n, h, l + first + extra, d * wide), math.nan, dtype=buf_type,
                             device=device)
        out = buf[:, :, first:first + l, ::wide]
        issues = ([] if out_dtype is None or buf_type == out_type else ["out_dtype"]) + (
            ["out"] if out_kind == "d_strided" and d > 1 and out.numel() else [])
        out_bad = None if not issues else issues[0] if len(issues) == 1 else "several"
        out_type = buf_type
    b = present(draw(breakage(["x", "pe", "norm_weight", "out"], device)),
                {"x": x, "pe": pe, "norm_weight": norm_weight, "out": out})
    x, pe, norm_weight, out = (broken(b, name, t, draw, gen) for name, t in
                               (("x", x), ("pe", pe), ("norm_weight", norm_weight), ("out", out)))
    case = Case("rope_flux", lambda: kiln.rope_flux(x, pe, norm_weight=norm_weight, eps=eps,
                                                    out_dtype=out_dtype, out=out), None)
    case.notes = [f"x {tuple(x.shape) if hasattr(x, 'shape') else x!r:.40}", out_kind, b]
    if b is not None:
        refuse(case, b, "x", other=bool(d % 2) or out_bad is not None)
    elif d % 2 and out_bad or out_bad == "several":
        case.expect, case.bad = "error", None
    elif d % 2 or out_bad:
        case.expect, case.bad = "error", "x" if d % 2 else out_bad

    def check(got):
        want = rope_oracle(x, pe, norm_weight, eps)
        row = want.abs().nan_to_num(0, 0, 0).amax(-1, keepdim=True) if want.numel() else want
        if out is None:
            assert got.dtype == out_type and got.is_contiguous()
        else:  # out written and returned; the buffer's other rows untouched (still NaN)
            assert got is out
            rest = torch.ones(buf.shape[2], dtype=torch.bool)
            rest[first:first + l] = False
            assert torch.isnan(buf[:, :, rest].float()).all(), case.notes
        close(got, want, rounding(out_type, want, 4e-6 * (row + 1)), case.notes)

    case.check = check
    return case


# ---- attention ----------------------------------------------------------------------------------


def attention_oracle(q, k, v, causal, scale, mask, kv_len, softcap):
    """out and lse in f64: SDPA where it takes the call, else SDPA's math written out with
    kiln's documented rules (bottom-right causal, kv_len, softcap, all -inf rows -> zeros)."""
    n, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv if hkv else 1
    qd = q.detach().cpu().double()
    kd = k.detach().cpu().double().repeat_interleave(g, 1)
    vd = v.detach().cpu().double().repeat_interleave(g, 1)
    sc = float(np.float32(scale if scale is not None else 1 / math.sqrt(d)))
    s = sc * (qd @ kd.transpose(-1, -2))
    if softcap is not None:
        cap = float(np.float32(softcap))
        s = cap * torch.tanh(s / cap)
    if mask is not None:
        m = mask.cpu()
        s = s + (torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, -math.inf)
                 if m.dtype == torch.bool else m.double())
    # Lengths outside [0, Lk] are refused on CPU and clamped on CUDA (device memory).
    keys = kv_len.cpu().long().clamp(0, lk) if kv_len is not None else torch.full((n,), lk)
    j = torch.arange(lk)
    i = torch.arange(lq)
    visible = j[None, None, :] < keys[:, None, None]
    if causal:
        visible = visible & (j[None, None, :] <= i[None, :, None] + (keys - lq)[:, None, None])
    s = s.masked_fill(~visible[:, None], -math.inf)
    if lk:  # the max ignores NaN, as fmaxf does
        row_max = s.nan_to_num(-math.inf, math.inf, -math.inf).amax(-1, keepdim=True)
    else:
        row_max = torch.full((n, hq, lq, 1), -math.inf, dtype=torch.float64)
    shift = torch.where(row_max == -math.inf, torch.zeros_like(row_max), row_max)
    p = torch.exp(s - shift)
    total = p.sum(-1, keepdim=True)
    out = torch.where(total == 0, torch.zeros(()), (p @ vd) / total)
    lse = torch.where(total == 0, torch.full_like(total, -math.inf), shift + torch.log(total))
    sdpa_takes = (kv_len is None and softcap is None and (not causal or lq == lk)
                  and not (causal and mask is not None)
                  and all(torch.isfinite(t.detach().cpu().double()).all() for t in (q, k, v))
                  and lk > 0 and d > 0 and (mask is None or mask.dtype == torch.bool
                                            or not torch.isnan(mask.double()).any()))
    if sdpa_takes and n * hq * lq * dv:
        add = None
        if mask is not None:
            add = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask.cpu(), -math.inf) \
                if mask.dtype == torch.bool else mask.cpu().double()
        rows_hidden = total == 0
        sdpa = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=add, is_causal=causal,
                                              scale=sc)
        out = torch.where(rows_hidden, torch.zeros(()), sdpa)  # torch 2.15: zeros too
    return out, lse[..., 0]


@st.composite
def attention_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n, hkv = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    hq = hkv * draw(st.integers(1, 3))
    lq, lk = draw(st.integers(0, 5)), draw(st.integers(0, 6))
    d = draw(st.sampled_from([8, 16, 24, 0, 12]))
    dv = draw(st.sampled_from([d, 8, 16, 0]))
    kv_dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    q_dtype = draw(st.sampled_from([kv_dtype, torch.float32]))
    q = values(gen, (n, hq, lq, d), q_dtype, device)
    k = values(gen, (n, hkv, lk, d), kv_dtype, device)
    v = values(gen, (n, hkv, lk, dv), kv_dtype, device)
    q = draw(layout(inject_specials(draw, gen, q, 0.02)))
    k = draw(layout(inject_specials(draw, gen, k, 0.02)))
    v = draw(layout(v))
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, None, 0.3, 2.0]))
    softcap = draw(st.sampled_from([None, None, 5.0]))
    mask = None
    if draw(st.booleans()):
        dims = draw(st.integers(2, 4))
        full = (n, hq, lq, lk)[4 - dims:]
        shape = tuple(s if draw(st.booleans()) else 1 for s in full)
        mdtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.bool]))
        if mdtype == torch.bool:
            mask = torch.rand(shape, generator=gen).to(device) > 0.3
        else:
            mask = values(gen, shape, mdtype, device)
            mask = mask.masked_fill(torch.rand(shape, generator=gen).to(device) < 0.3, -math.inf)
            mask = inject_specials(draw, gen, mask, 0.05)
    kv_len = None
    kv_valid = True
    if draw(st.booleans()):
        lengths = [draw(st.integers(0, lk)) for _ in range(n)]
        if n and draw(st.integers(0, 4)) == 0:
            lengths[0] = draw(st.sampled_from([-1, lk + 1]))
            kv_valid = False
        kv_len = torch.tensor(lengths, dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                              device=device)
    return_lse = draw(st.booleans())
    bad_value = draw(st.sampled_from([None] * 6 + ["scale", "softcap"]))
    if bad_value == "scale":
        scale = draw(st.sampled_from([0.0, -1.0, math.nan, math.inf]))
    elif bad_value == "softcap":
        softcap = draw(st.sampled_from([0.0, -2.0, math.nan]))
    b = present(draw(breakage(["q", "k", "v", "mask", "kv_len"], device)),
                {"q": q, "k": k, "v": v, "mask": mask, "kv_len": kv_len})
    q, k, v, mask, kv_len = (broken(b, name, t, draw, gen) for name, t in
                             (("q", q), ("k", k), ("v", v), ("mask", mask), ("kv_len", kv_len)))

    case = Case("attention", lambda: kiln.attention(q, k, v, causal=causal, scale=scale,
                                                    mask=mask, kv_len=kv_len, softcap=softcap,
                                                    return_lse=return_lse), None)
    case.notes = [(n, hq, hkv, lq, lk, d, dv), q_dtype, kv_dtype, causal, scale, softcap,
                  None if mask is None else (getattr(mask, "shape", mask),
                                             getattr(mask, "dtype", None)), kv_len,
                  return_lse, b]
    writes = n * hq * lq * (dv + (1 if return_lse else 0))
    head_ok = all(x % 8 == 0 and 8 <= x <= 256 for x in (d, dv))
    issues = [bad_value] if bad_value else []
    if not kv_valid and device == "cpu":
        issues.append("kv_len")
    if writes and not head_ok:
        issues.append("q or v")
    if b is not None:
        refuse(case, b, "q", other=bool(issues))
    elif issues:
        case.expect, case.bad = "error", issues[0] if len(issues) == 1 else None
        if case.bad == "q or v":
            case.bad = None
    elif device != "cpu":
        case.expect = "either"  # the CUDA kernels' layout rules (16-byte rows)

    def check(result):
        out, lse = result if return_lse else (result, None)
        assert out.shape == (n, hq, lq, dv) and out.dtype == q.dtype and out.is_contiguous()
        if lse is not None:
            assert lse.shape == (n, hq, lq) and lse.dtype == torch.float32
        if writes == 0:
            return
        want, want_lse = attention_oracle(q, k, v, causal, scale, mask, kv_len, softcap)
        vmax = float(v.detach().abs().max()) if v.numel() else 0.0
        if device == "cpu":
            tol = rounding(q.dtype, want, 1e-6 * vmax)
        else:  # q, P rounded to k's dtype, f32 sums: a few units of k's dtype
            tol = 4 * ULP[kv_dtype] * (vmax + 1) + rounding(q.dtype, want, 0)
        close(out, want, tol, case.notes)
        if lse is not None:
            close(lse, want_lse, 1e-5 * (want_lse.abs().nan_to_num(0, 0, 0) + 1), case.notes)

    case.check = check
    return case


# ---- conv2d -------------------------------------------------------------------------------------


@st.composite
def conv2d_cases(draw, device, numpy=False):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n, c, hh, ww = (draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 7)),
                    draw(st.integers(0, 7)))
    oc, kh, kw = draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    dtypes = [torch.float32, torch.float16] if numpy else FLOATS
    x_dtype = draw(st.sampled_from(dtypes))
    x = values(gen, (n, c, hh, ww), x_dtype, device)
    channels_last = draw(st.booleans())
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = draw(layout(x))
    w = draw(layout(values(gen, (oc, c, kh, kw), draw(st.sampled_from(dtypes)), device)))
    bias = values(gen, (oc,), draw(st.sampled_from(dtypes)), device) if draw(
        st.booleans()) else None
    pair = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))
    stride, dilation = draw(pair), draw(pair)
    padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2))))
    groups = 1
    out_dtype = draw(st.sampled_from([None, *dtypes]))
    bad_value = draw(st.sampled_from([None] * 6 + ["stride", "padding", "dilation", "groups"]))
    if bad_value in ("stride", "dilation"):
        value = draw(st.sampled_from([0, -1, 1.5, (1, 0), (1, 2, 3), "1"]))
        stride, dilation = (value, dilation) if bad_value == "stride" else (stride, value)
    elif bad_value == "padding":
        padding = draw(st.sampled_from([-1, 1.5, (0, 1.0), "same", (1,)]))
    elif bad_value == "groups":
        groups = draw(st.sampled_from([2, 0, 1.0]))
    b = present(draw(breakage(["x", "w", "bias"], device)), {"x": x, "w": w, "bias": bias})
    x, w, bias = (broken(b, name, t, draw, gen) for name, t in (("x", x), ("w", w), ("bias", bias)))
    if numpy:
        x, w = (t.numpy() if isinstance(t, torch.Tensor) and t.device.type == "cpu" and
                t.dtype in dtypes and not t.requires_grad else t for t in (x, w))
        bias = bias.numpy() if isinstance(bias, torch.Tensor) and bias.dtype in dtypes and \
            not bias.requires_grad and bias.device.type == "cpu" else bias
        out_dtype = None if out_dtype is None else np.dtype(str(out_dtype).removeprefix("torch."))

    case = Case("conv2d", lambda: kiln.conv2d(x, w, bias, stride=stride, padding=padding,
                                              dilation=dilation, groups=groups,
                                              out_dtype=out_dtype), None)
    case.notes = [(n, c, hh, ww), (oc, kh, kw), stride, padding, dilation, groups, b, numpy]

    def oracle():
        tx, tw = (torch.as_tensor(t).cpu().double() for t in (x, w))
        tb = None if bias is None else torch.as_tensor(bias).cpu().double()
        if oc == 0:
            span = lambda size, k, s, p, dl: (size + 2 * p - dl * (k - 1) - 1) // s + 1  # noqa
            pr = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
            return torch.zeros(n, 0, span(hh, kh, pr(stride)[0], pr(padding)[0], pr(dilation)[0]),
                               span(ww, kw, pr(stride)[1], pr(padding)[1], pr(dilation)[1]))
        return F.conv2d(tx, tw, tb, stride, padding, dilation)

    valid = True
    try:
        with torch.no_grad():
            want = oracle() if b is None and bad_value is None and c and hh and ww else None
        valid = want is not None and kh > 0 and kw > 0 and want.shape[2] > 0 and want.shape[3] > 0
    except (RuntimeError, IndexError, ValueError):  # torch refuses it
        valid = False
    if b is not None:
        refuse(case, b, "x", other=bad_value is not None or not valid)
    elif bad_value is not None:
        case.expect, case.bad = "error", bad_value
    elif not valid:
        case.expect, case.bad = "error", None
    elif device != "cpu" and max(kh, kw) > 7:
        case.expect = "either"

    def check(got):
        got = torch.as_tensor(got)
        out_type = got.dtype
        if numpy or out_dtype is not None:
            assert out_type in FLOATS
        scale = F.conv2d(torch.as_tensor(x).cpu().double().abs(),
                         torch.as_tensor(w).cpu().double().abs(), None, stride, padding,
                         dilation) if oc else want
        floor = (1e-9 if device == "cpu" else 2 * ULP[torch.bfloat16]) * scale
        close(got, want, rounding(out_type, want, floor), case.notes)

    case.check = check
    return case


# ---- matmul, prepare_weight, select_path --------------------------------------------------------


def q8_0_decode(blocks):
    """u8 [R, C/32*34] -> f64 [R, C]: d (f16) * qs (int8), as ggml's dequantize_row_q8_0."""
    r = blocks.shape[0]
    b = blocks.reshape(r, blocks.shape[1] // 34, 34)
    d = b[:, :, :2].contiguous().view(torch.float16).float()
    qs = b[:, :, 2:].contiguous().view(torch.int8).float()
    return (d * qs).reshape(r, b.shape[1] * 32).double()


def weight_values(w, fmt, w_scale, n, k):
    """The dequantized weight [N, K] in f64: what the dequantize-then-matmul chain multiplies."""
    if fmt == "q8_0":
        return q8_0_decode(w.cpu())
    wd = w.cpu().float()
    if w_scale is None:
        return wd.double()
    s = torch.as_tensor(w_scale, dtype=torch.float32).cpu()
    if s.dim() == 2 and s.shape == (n, 1) and n != 1:
        s = s.reshape(n)  # as kiln.matmul reads an [N, 1] scale
    if s.dim() == 2:
        s = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    elif s.numel() == n and n != 1:
        s = s.reshape(n, 1)
    else:
        s = s.reshape(1)
    return (wd * s).double()  # f32 products, as kiln decodes


@st.composite
def weight_draw(draw, gen, device, n, k):
    fmt = draw(st.sampled_from(["bf16", "f16", "e4m3fn", "e5m2", "q8_0"]))
    w_scale = None
    if fmt in ("bf16", "f16"):
        w = values(gen, (n, k), torch.bfloat16 if fmt == "bf16" else torch.float16, device)
    elif fmt == "q8_0":
        k = k // 32 * 32
        w = kiln.quantize_q8_0(values(gen, (n, k), torch.float32, device))
    else:
        w = (torch.randn(n, k, generator=gen) * 4).to(
            torch.float8_e4m3fn if fmt == "e4m3fn" else torch.float8_e5m2).to(device)
        kind = draw(st.sampled_from(["none", "number", "tensor", "row", "row2", "block"]))
        rand = lambda *s: (torch.rand(*s, generator=gen) + 0.25).to(device)  # noqa: E731
        w_scale = {"none": None, "number": 0.5, "tensor": rand(1), "row": rand(n),
                   "row2": rand(n, 1) if n != 1 else rand(1),
                   "block": rand(-(-n // 128), -(-k // 128))}[kind]
    return fmt, w, w_scale, k


@st.composite
def matmul_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    lead = draw(st.sampled_from([(0,), (1,), (3,), (2, 3), (17,)]))
    n = draw(st.sampled_from([0, 1, 5, 33]))
    k = draw(st.sampled_from([0, 32, 64, 40]))
    fmt, w, w_scale, k = draw(weight_draw(gen, device, n, k))
    a_dtype = draw(st.sampled_from(FLOATS))
    a = draw(layout(values(gen, (*lead, k), a_dtype, device), ("contiguous", "strided")))
    bias = values(gen, (n,), draw(st.sampled_from(FLOATS)), device) if draw(
        st.booleans()) else None
    out_dtype = draw(st.sampled_from([None, *FLOATS]))
    path = draw(st.sampled_from(["auto", "gemv", "gemm", "fp8_native", "reference", "fast"]))
    # The epilogue: out = residual + gate * (...). gate [N], or [B, N] (B = a's first dim for a
    # 3-D a, else dividing M; rows maybe a strided chunk of a modulation output); residual of
    # out's shape. A [B, N] gate whose B is not a's first dim is refused.
    m = math.prod(lead)
    gate, gate_rows, gate_bad = None, 1, False
    gate_kind = draw(st.sampled_from(["none", "none", "vector", "batch", "wrong batch"]))
    gate_dtype = draw(st.sampled_from(FLOATS))
    if gate_kind == "vector":
        gate = values(gen, (n,), gate_dtype, device)
    elif gate_kind != "none":
        batch = lead[0] if len(lead) > 1 else draw(st.sampled_from([1, m]))
        if gate_kind == "wrong batch":  # (any B >= 1 divides M = 0)
            batch, gate_bad = (3, True) if len(lead) > 1 else (m + 1, m > 0)
        gate = values(gen, (batch, 3 * n), gate_dtype, device)[:, n:2 * n] if draw(
            st.booleans()) else values(gen, (batch, n), gate_dtype, device)
        gate_rows = m // batch if batch and not gate_bad else 1
    residual = None
    if draw(st.booleans()):  # rows maybe strided (a column range of a wider array)
        pad = draw(st.sampled_from([0, 0, 3]))
        residual = values(gen, (*lead, n + pad), draw(st.sampled_from(FLOATS)), device)[..., :n]
    b = present(draw(breakage(["a", "w", "w_scale", "bias", "gate", "residual"], device)),
                {"a": a, "w": w, "w_scale": w_scale if isinstance(w_scale, torch.Tensor) else None,
                 "bias": bias, "gate": gate, "residual": residual})
    a, w, bias, gate, residual = (broken(b, name, t, draw, gen) for name, t in
                                  (("a", a), ("w", w), ("bias", bias), ("gate", gate),
                                   ("residual", residual)))
    w_scale = broken(b, "w_scale", w_scale, draw, gen)
    case = Case("matmul", lambda: kiln.matmul(a, w, w_scale=w_scale, bias=bias,
                                              out_dtype=out_dtype, path=path, gate=gate,
                                              residual=residual), None)
    case.notes = [lead, n, k, fmt, getattr(w_scale, "shape", w_scale), a_dtype, out_dtype, path,
                  gate_kind, None if residual is None else getattr(residual, "shape", "?"), b]
    if b is not None:
        refuse(case, b, "a", other=path == "fast" or gate_bad)
    elif path == "fast" and gate_bad:
        case.expect, case.bad = "error", None
    elif path == "fast" or gate_bad:
        case.expect, case.bad = "error", "path" if path == "fast" else "gate"
    elif device != "cpu":
        case.expect = "either"  # paths that cannot run a shape on CUDA refuse it

    def check(got):
        want_dtype = out_dtype or a_dtype
        assert got.dtype == want_dtype and got.shape == (*lead, n)
        wd = weight_values(w, fmt, w_scale, n, k)
        ad = a.cpu().double().reshape(m, k)
        want = ad @ wd.T
        scale = ad.abs() @ wd.abs().T
        if bias is not None:
            want = want + bias.cpu().double()
            scale = scale + bias.cpu().double().abs()
        if gate is not None:
            g = gate.cpu().double().reshape(gate.shape[0] if gate.dim() == 2 else 1, n)
            g = g.repeat_interleave(gate_rows, 0)
            want, scale = want * g, scale * g.abs()
        if residual is not None:
            r = residual.cpu().double().reshape(m, n)
            want, scale = want + r, scale + r.abs()
        want = want.reshape(*lead, n)
        floor = (1e-6 if device == "cpu" else 8 * ULP[torch.bfloat16]) * scale.reshape(*lead, n)
        close(got, want, rounding(want_dtype, want, floor), case.notes)

    case.check = check
    return case


@st.composite
def prepare_weight_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n, k = draw(st.sampled_from([1, 5, 33])), draw(st.sampled_from([32, 64]))
    fmt, w, w_scale, k = draw(weight_draw(gen, device, n, k))
    path = draw(st.sampled_from(["auto", "gemv", "gemm", "reference", "fast"]))
    a = values(gen, (3, k), torch.bfloat16, device)
    b = draw(breakage(["w"], device))
    w = broken(b, "w", w, draw, gen)
    case = Case("prepare_weight", lambda: kiln.prepare_weight(w, w_scale, path=path), None)
    case.notes = [n, k, fmt, getattr(w_scale, "shape", w_scale), path, b]
    if b is not None:
        refuse(case, b, "w", other=path == "fast" or (device == "cpu" and path == "gemm"))
    elif path == "fast":
        case.expect, case.bad = "error", "path"
    elif device == "cpu" and path == "gemm":
        case.expect, case.bad = "error", None  # prepared layouts are CUDA-only
    elif device != "cpu":
        case.expect = "either"

    def check(prepared):
        assert prepared.n == n and prepared.k == k
        torch.testing.assert_close(kiln.matmul(a, prepared), kiln.matmul(a, w, w_scale=w_scale),
                                   rtol=0 if device == "cpu" else 1e-2,
                                   atol=0 if device == "cpu" else 1e-2)

    case.check = check
    return case


@st.composite
def select_path_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    fmt, w, _, _ = draw(weight_draw(gen, device, draw(st.sampled_from([8, 64])), 64))
    m = draw(st.one_of(st.integers(-3, 40), st.sampled_from([1.5, "1", None, True])))
    a_dtype = draw(st.sampled_from(["bf16", "f16", "f32", "e4m3fn", torch.bfloat16, "f64", 3]))
    case = Case("select_path", lambda: kiln.select_path(m, w, a_dtype=a_dtype), None)
    case.notes = [fmt, m, a_dtype]
    if not isinstance(m, int) or isinstance(m, bool) or m < 0:
        case.expect, case.bad = "error", "m"
    elif a_dtype in ("f64", 3):
        case.expect, case.bad = "error", "a_dtype"
    elif device != "cpu":
        case.expect = "either"

    def check(path):
        assert path in ("gemv", "gemm", "fp8_native", "reference")
        assert (path == "reference") == (device == "cpu")

    case.check = check
    return case


# ---- quantize / dequantize ----------------------------------------------------------------------


def group_amax(x, granularity):
    """amax over each scale group of x [R, C] (NaN ignored, as fmaxf), as the scale's shape."""
    ax = torch.where(torch.isnan(x), torch.zeros((), dtype=x.dtype), x.abs())
    r, c = x.shape
    if granularity == "tensor":
        return ax.amax().reshape(1) if ax.numel() else torch.zeros(1)
    if granularity == "row":
        return ax.amax(1) if c else torch.zeros(r)
    pad = F.pad(ax, (0, -c % 128, 0, -r % 128))
    return pad.reshape(pad.shape[0] // 128, 128, pad.shape[1] // 128, 128).amax((1, 3))


def expand_scale(scale, granularity, r, c):
    if granularity == "tensor":
        return scale.reshape(1, 1)
    if granularity == "row":
        return scale.reshape(r, 1)
    return scale.repeat_interleave(128, 0)[:r].repeat_interleave(128, 1)[:, :c]


@st.composite
def quantize_fp8_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    shape = draw(st.sampled_from([(0, 4), (3, 0), (5, 7), (2, 3, 16), (130, 131), (1, 300)]))
    x = values(gen, shape, draw(st.sampled_from(FLOATS)), device, scale=draw(
        st.sampled_from([1.0, 100.0, 1e-3])))
    x = draw(layout(inject_specials(draw, gen, x, 0.01)))
    fmt = draw(st.sampled_from(["e4m3fn", "e5m2", torch.float8_e4m3fn, "e4m3", "fp4"]))
    granularity = draw(st.sampled_from(["tensor", "row", "block", "column"]))
    rows = math.prod(shape[:-1])
    scale = None
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["number", "tensor", "bad"]))
        if kind == "number":
            scale = draw(st.sampled_from([0.5, 3.0]))
        elif kind == "tensor":
            scale = (torch.rand(1 if granularity != "row" else rows, generator=gen) + 0.1).to(
                device)
        else:
            scale = draw(st.sampled_from([0.0, -1.0, math.nan, math.inf]))
            if draw(st.booleans()):
                scale = torch.tensor([scale], device=device)
    b = draw(breakage(["x"], device))
    x = broken(b, "x", x, draw, gen)
    case = Case("quantize_fp8", lambda: kiln.quantize_fp8(x, fmt, granularity, scale), None)
    case.notes = [shape, getattr(x, "dtype", None), fmt, granularity, scale, b]
    bad_scale = (isinstance(scale, float) and not (math.isfinite(scale) and scale > 0)) or (
        isinstance(scale, torch.Tensor) and not bool(torch.all(torch.isfinite(scale)) and
                                                     torch.all(scale > 0)))
    wanted_shape = {"tensor": (1,), "row": (rows,), "block": (-(-rows // 128),
                                                             -(-shape[-1] // 128))}
    given_shape = tuple(scale.shape) if isinstance(scale, torch.Tensor) else (1,)
    if b is not None:
        refuse(case, b, "x", other=True)  # fmt, granularity and scale are checked in between
    elif fmt == "fp4":
        case.expect, case.bad = "error", "fmt"
    elif granularity == "column":
        case.expect, case.bad = "error", "granularity"
    elif granularity == "block" and len(shape) != 2:
        case.expect, case.bad = "error", "x"
    elif bad_scale and (device == "cpu" or not isinstance(scale, torch.Tensor)):
        case.expect, case.bad = "error", "scale"
    elif scale is not None and given_shape != wanted_shape[granularity]:
        case.expect, case.bad = "error", "scale"
    elif bad_scale:
        case.expect = "either"  # a CUDA scale's values are not read on the host

    def check(result):
        q, s = result
        fp8 = torch.float8_e5m2 if fmt == "e5m2" else torch.float8_e4m3fn
        top = 57344.0 if fp8 == torch.float8_e5m2 else 448.0
        assert q.dtype == fp8 and q.shape == x.shape
        x2 = x.detach().cpu().float().reshape(rows, shape[-1])
        gran = granularity
        if x2.numel() == 0:
            assert q.numel() == 0 and (scale is not None or bool(torch.all(s == 1))), case.notes
            return
        if scale is None:
            want_s = group_amax(x2, gran) / top
            want_s = torch.where(want_s == 0, torch.ones(()), want_s)
            assert torch.equal(s.cpu(), want_s), (s, want_s, case.notes)
        want_q = (x2 / expand_scale(s.cpu().float(), gran, *x2.shape)).clamp(-top, top).to(fp8)
        got = q.cpu().reshape(rows, shape[-1])
        nan = torch.isnan(want_q.float())
        assert torch.equal(torch.isnan(got.float()), nan), case.notes
        assert torch.equal(got.view(torch.uint8)[~nan], want_q.view(torch.uint8)[~nan]), (
            case.notes)

    case.check = check
    return case


def q8_0_oracle(x):
    """ggml's Q8_0 blocks (gguf's numpy reference) with kiln's rules for blocks ggml has no
    usable d for: d past f16 saturates (d = 65504, codes clamped), a NaN block is d = NaN."""
    import gguf

    r, c = x.shape
    if r * c == 0:
        return np.zeros((r, c // 32 * 34), np.uint8)
    with np.errstate(all="ignore"):
        blocks = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(r, c // 32, 34)
        v = x.reshape(r, c // 32, 32)
        has_nan = np.isnan(v).any(-1)
        d = (np.abs(np.where(np.isnan(v), 0, v)).max(-1) / np.float32(127)).astype(np.float32)
        overflow = ~has_nan & np.isinf(d.astype(np.float16))
        codes = v * (np.float32(1) / np.float32(65504))
        codes = np.clip(np.sign(codes) * np.floor(np.abs(codes.astype(np.float64)) + 0.5), -127,
                        127)
    blocks = blocks.copy()
    blocks[overflow, :2] = np.frombuffer(np.float16(65504).tobytes(), np.uint8)
    blocks[overflow, 2:] = codes[overflow].astype(np.int8).view(np.uint8)
    blocks[has_nan, :2] = np.frombuffer(np.uint16(0x7E00).tobytes(), np.uint8)
    blocks[has_nan, 2:] = 0
    return blocks.reshape(r, c // 32 * 34)


@st.composite
def quantize_q8_0_cases(draw, device, numpy=False):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    shape = draw(st.sampled_from([(0, 32), (3, 0), (4, 64), (2, 3, 96), (1, 40), (7, 32)]))
    dtypes = [torch.float32, torch.float16] if numpy else FLOATS
    x = values(gen, shape, draw(st.sampled_from(dtypes)), device)
    if draw(st.booleans()) and x.numel():
        x = x.clone()
        x.view(-1)[0] = draw(st.sampled_from([1e7, -3e9, math.inf, math.nan]))
    x = draw(layout(inject_specials(draw, gen, x, 0.01)))
    b = draw(breakage(["x"], device))
    x = broken(b, "x", x, draw, gen)
    if numpy and isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.requires_grad \
            and x.dtype in dtypes:
        x = x.numpy()
    case = Case("quantize_q8_0", lambda: kiln.quantize_q8_0(x), None)
    case.notes = [shape, b, numpy]
    if b is not None:
        refuse(case, b, "x", other=bool(shape[-1] % 32))
    elif shape[-1] % 32:
        case.expect, case.bad = "error", "x"

    def check(got):
        got = torch.as_tensor(got).cpu()
        rows = math.prod(shape[:-1])
        want = q8_0_oracle(torch.as_tensor(x).cpu().float().reshape(rows, shape[-1]).numpy())
        assert got.dtype == torch.uint8 and got.shape == (*shape[:-1], shape[-1] // 32 * 34)
        assert np.array_equal(got.reshape(want.shape).numpy(), want), case.notes

    case.check = check
    return case


@st.composite
def dequantize_cases(draw, device, numpy=False):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["e4m3fn", "e5m2", "q8_0"]))
    shape = draw(st.sampled_from([(0, 4), (3, 0), (5, 7), (2, 3, 16), (130, 131)]))
    rows = math.prod(shape[:-1])
    scale, fmt = None, None
    if kind == "q8_0":
        shape = (*shape[:-1], shape[-1] // 4 * 34)
    q = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    if kind != "q8_0":
        q = q.view(torch.float8_e4m3fn if kind == "e4m3fn" else torch.float8_e5m2)
        scale = draw(st.sampled_from(["none", "number", "tensor", "row"]))
        scale = {"none": None, "number": 0.25, "tensor": torch.rand(1, generator=gen).to(device),
                 "row": torch.rand(rows, generator=gen).to(device)}[scale]
    out_dtype = draw(st.sampled_from(["f32", "f16", "bf16", torch.bfloat16, "f8"]))
    b = draw(breakage(["q"], device))
    q = broken(b, "q", q, draw, gen)
    if numpy and isinstance(q, torch.Tensor) and not q.requires_grad and q.device.type == "cpu" \
            and q.dtype in (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2):
        fmt = None if kind == "q8_0" else kind
        q = q.view(torch.uint8).numpy()
        scale = scale.numpy() if isinstance(scale, torch.Tensor) else scale
        out_dtype = draw(st.sampled_from(["f32", "f16", np.float32]))
    case = Case("dequantize", lambda: kiln.dequantize(q, scale, out_dtype=out_dtype, fmt=fmt),
                None)
    case.notes = [kind, shape, getattr(scale, "shape", scale), out_dtype, b, numpy]
    if b is not None:
        refuse(case, b, "q", other=out_dtype == "f8")
    elif out_dtype == "f8":
        case.expect, case.bad = "error", "out_dtype"

    def check(got):
        got = torch.as_tensor(got).cpu()
        qt = torch.as_tensor(q).cpu()
        if kind == "q8_0":
            want = q8_0_decode(qt.reshape(rows, shape[-1])).float()
        else:
            qf = qt.view(torch.float8_e4m3fn if kind == "e4m3fn" else torch.float8_e5m2)
            qf = qf.reshape(rows, shape[-1]).float()
            s = torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float32).cpu()
            want = qf * (s.reshape(rows, 1) if s.numel() == rows and rows != 1 else s.reshape(1))
        want = want.reshape(got.shape).to(got.dtype)
        assert torch.equal(torch.isnan(got.float()), torch.isnan(want.float())), case.notes
        ok = torch.isnan(want.float()) | (got == want)
        assert ok.all(), case.notes

    case.check = check
    return case


# ---- the row ops: rms_norm, layer_norm, glu, gelu_tanh (fused fp8 outputs), group_norm -------

QUANTIZE = [None, None, "e4m3fn", "e5m2", torch.float8_e4m3fn, "int8"]
FP8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2,
       torch.float8_e4m3fn: torch.float8_e4m3fn}


def rows_layout_ok(t) -> bool:
    """Whether a row op takes t's layout: rows any strides, the last dim contiguous."""
    return t.numel() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1


@st.composite
def row_input(draw, gen, device, last=None):
    """x [..., C] (leading dims and C drawn, zero sizes included; C = `last` when given) in a
    drawn layout, a few elements inf or NaN."""
    lead = draw(st.sampled_from([(0,), (1,), (3,), (2, 3), (2, 0), (5,)]))
    c = last if last is not None else draw(st.sampled_from([0, 1, 7, 8, 64, 33]))
    x = values(gen, (*lead, c), draw(st.sampled_from(FLOATS)), device)
    return draw(layout(inject_specials(draw, gen, x, 0.02)))


def row_issues(x, out_dtype, quantize) -> list:
    """The arguments a row-op call breaks by construction: quantize and out_dtype together, an
    unknown quantize format, x with a strided last dim."""
    issues = []
    if quantize is not None and out_dtype is not None:
        issues.append("out_dtype")
    elif quantize == "int8":
        issues.append("quantize")
    if isinstance(x, torch.Tensor) and not rows_layout_ok(x):
        issues.append("x")
    return issues


def expect_row_case(case, b, issues):
    if b is not None:
        refuse(case, b, "x", other=bool(issues))
    elif issues:
        case.expect, case.bad = "error", issues[0] if len(issues) == 1 else None


def check_rows(case, got, want, floor, out_type, quantize, unfused):
    """got against want (f64): the plain output rounded once to out_type, within floor for the
    f32 math; a fused fp8 output (q, q_scale) bit for bit kiln.quantize_fp8 of the op's own f32
    output (held to want), with one scale per row."""
    if quantize is None:
        assert got.dtype == out_type and got.is_contiguous(), case.notes
        close(got, want, rounding(out_type, want, floor), case.notes)
        return
    q, scale = got
    y = unfused()
    assert y.dtype == torch.float32
    close(y, want, rounding(torch.float32, want, floor), case.notes)
    rows = math.prod(want.shape[:-1])
    assert q.dtype == FP8[quantize] and q.shape == want.shape and q.is_contiguous(), case.notes
    assert scale.dtype == torch.float32 and scale.shape == (rows,), case.notes
    q_want, scale_want = kiln.quantize_fp8(y, quantize, "row")
    assert torch.equal(q.view(torch.uint8), q_want.view(torch.uint8)), case.notes
    assert torch.equal(scale.view(torch.int32), scale_want.view(torch.int32)), case.notes


def row_floor(magnitude, eps=1e-5):
    """An f32-math floor per element: eps times the largest magnitude of the element's row."""
    if magnitude.numel() == 0:
        return magnitude
    return eps * magnitude.nan_to_num(0, 0, 0).amax(-1, keepdim=True)


def centered_size(g, eps):
    """(|x| + |mean|) * rsqrt(var + eps) over the last dim of g: the size of the terms that
    (x - mean) * rstd cancels, which f32 math rounds (a one-element group normalizes to 0 from
    two equal terms)."""
    mean = g.mean(-1, keepdim=True)
    var = (g - mean).pow(2).mean(-1, keepdim=True)
    return (g.abs() + mean.abs()) * torch.rsqrt(var + f32(eps))


def eps_draw(draw):
    """eps: usual values, or (1 in 8) a bad one kiln refuses."""
    bad = draw(st.integers(0, 7)) == 0
    return draw(st.sampled_from([math.nan, -1.0, "1e-6"] if bad else [1e-6, 0.0, 1e-3])), bad


def f32(value: float) -> float:
    return float(np.float32(value))


@st.composite
def rms_norm_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = draw(row_input(gen, device))
    c = x.shape[-1]
    weight = values(gen, (c,), draw(st.sampled_from(FLOATS)), device) if draw(
        st.booleans()) else None
    eps, eps_bad = eps_draw(draw)
    out_dtype = draw(st.sampled_from([None, None, *FLOATS, "f16"]))
    quantize = draw(st.sampled_from(QUANTIZE))
    b = present(draw(breakage(["x", "weight"], device)), {"x": x, "weight": weight})
    x, weight = (broken(b, name, t, draw, gen) for name, t in (("x", x), ("weight", weight)))
    case = Case("rms_norm", lambda: kiln.rms_norm(x, weight, eps=eps, out_dtype=out_dtype,
                                                  quantize=quantize), None)
    case.notes = [getattr(x, "shape", "?"), getattr(x, "dtype", "?"), eps, out_dtype, quantize, b]
    expect_row_case(case, b, ["eps"] * eps_bad + row_issues(x, out_dtype, quantize))
    out_type = getattr(x, "dtype", None) if out_dtype is None else {"f16": torch.float16}.get(
        out_dtype, out_dtype)

    def check(got):
        xd = x.detach().cpu().double()
        wd = None if weight is None else weight.cpu().double()
        want = F.rms_norm(xd, (c,), wd, f32(eps)) if xd.numel() else xd
        magnitude = xd.abs() * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + f32(eps)) * (
            1 if wd is None else wd.abs()) if xd.numel() else xd
        check_rows(case, got, want, row_floor(magnitude), out_type, quantize,
                   lambda: kiln.rms_norm(x, weight, eps=eps, out_dtype="f32"))

    case.check = check
    return case


@st.composite
def layer_norm_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = draw(row_input(gen, device))
    c = x.shape[-1]
    vector_dtype = draw(st.sampled_from(FLOATS))
    weight, bias = (values(gen, (c,), vector_dtype, device) if draw(st.booleans()) else None
                    for _ in range(2))
    if weight is not None and bias is not None and draw(st.integers(0, 5)) == 0:
        bias = bias.to(next(t for t in FLOATS if t != vector_dtype))  # refused: one dtype
    # shift, scale: [B, D] (B = x's first dim; rows maybe strided), [D], or None.
    mod_dtype = draw(st.sampled_from(FLOATS))
    batch = x.shape[0] if x.dim() > 1 else None
    mods = []
    for _ in range(2):
        kind = draw(st.sampled_from(["none", "vector", "batch"] if batch is not None else
                                    ["none", "vector"]))
        if kind == "vector":
            mods.append(values(gen, (c,), mod_dtype, device) * 0.5)
        elif kind == "batch":
            mods.append(values(gen, (batch, 2 * c), mod_dtype, device)[:, c:] * 0.5)
        else:
            mods.append(None)
    shift, scale = mods
    eps, eps_bad = eps_draw(draw)
    out_dtype = draw(st.sampled_from([None, None, *FLOATS]))
    quantize = draw(st.sampled_from(QUANTIZE))
    b = present(draw(breakage(["x", "weight", "bias", "shift", "scale"], device)),
                {"x": x, "weight": weight, "bias": bias, "shift": shift, "scale": scale})
    x, weight, bias, shift, scale = (broken(b, name, t, draw, gen) for name, t in
                                     (("x", x), ("weight", weight), ("bias", bias),
                                      ("shift", shift), ("scale", scale)))
    case = Case("layer_norm", lambda: kiln.layer_norm(x, weight, bias, shift=shift, scale=scale,
                                                      eps=eps, out_dtype=out_dtype,
                                                      quantize=quantize), None)
    case.notes = [getattr(x, "shape", "?"), getattr(x, "dtype", "?"),
                  [None if t is None else getattr(t, "shape", "?") for t in
                   (weight, bias, shift, scale)], eps, out_dtype, quantize, b]
    issues = ["eps"] * eps_bad + row_issues(x, out_dtype, quantize)
    if (weight is not None and bias is not None and hasattr(bias, "dtype")
            and bias.dtype != getattr(weight, "dtype", None)):
        issues.append("bias")
    if (shift is not None and scale is not None and hasattr(scale, "dtype")
            and scale.dtype != getattr(shift, "dtype", None)):
        issues.append("scale")
    expect_row_case(case, b, issues)
    out_type = getattr(x, "dtype", None) if out_dtype is None else out_dtype

    def check(got):
        xd = x.detach().cpu().double()
        if xd.numel() == 0:
            check_rows(case, got, xd, xd, out_type, quantize,
                       lambda: kiln.layer_norm(x, weight, bias, shift=shift, scale=scale,
                                               eps=eps, out_dtype="f32"))
            return
        wd, bd = (None if t is None else t.cpu().double() for t in (weight, bias))
        want = F.layer_norm(xd, (c,), wd, bd, f32(eps))
        magnitude = centered_size(xd, eps) * (1 if wd is None else wd.abs()) + (
            0 if bd is None else bd.abs())
        view = (x.shape[0], *[1] * (x.dim() - 2), c)  # one vector per index of x's first dim

        def mod(t):
            return t.cpu().double().reshape(view if t.dim() == 2 else (c,))
        if scale is not None:
            want, magnitude = want * (1 + mod(scale)), magnitude * (1 + mod(scale)).abs()
        if shift is not None:
            want, magnitude = want + mod(shift), magnitude + mod(shift).abs()
        check_rows(case, got, want, row_floor(magnitude), out_type, quantize,
                   lambda: kiln.layer_norm(x, weight, bias, shift=shift, scale=scale, eps=eps,
                                           out_dtype="f32"))

    case.check = check
    return case


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


@st.composite
def glu_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = draw(row_input(gen, device, last=draw(st.sampled_from([0, 2, 8, 14, 128, 7]))))
    activation = draw(st.sampled_from(["silu", "silu", "gelu_tanh", "relu"]))
    out_dtype = draw(st.sampled_from([None, None, *FLOATS]))
    quantize = draw(st.sampled_from(QUANTIZE))
    b = draw(breakage(["x"], device))
    x = broken(b, "x", x, draw, gen)
    case = Case("glu", lambda: kiln.glu(x, activation=activation, out_dtype=out_dtype,
                                        quantize=quantize), None)
    case.notes = [getattr(x, "shape", "?"), getattr(x, "dtype", "?"), activation, out_dtype,
                  quantize, b]
    issues = ["activation"] * (activation == "relu") + row_issues(x, out_dtype, quantize)
    if hasattr(x, "shape") and x.shape[-1] % 2:
        issues.append("x")
    expect_row_case(case, b, issues)
    out_type = getattr(x, "dtype", None) if out_dtype is None else out_dtype

    def check(got):
        xd = x.detach().cpu().double()
        f = xd.shape[-1] // 2
        gate, linear = xd[..., :f], xd[..., f:]
        want = ACTIVATIONS[activation](gate) * linear
        # f32 math: a few f32 ulps of act(gate) * linear, and of |gate * linear| where GELU's
        # 1 + tanh cancels.
        floor = 2.0**-21 * (want.abs() + (gate * linear).abs()).nan_to_num(0, 0, 0)
        check_rows(case, got, want, floor, out_type, quantize,
                   lambda: kiln.glu(x, activation=activation, out_dtype="f32"))

    case.check = check
    return case


@st.composite
def gelu_tanh_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = draw(row_input(gen, device))
    out_dtype = draw(st.sampled_from([None, None, *FLOATS]))
    quantize = draw(st.sampled_from(QUANTIZE))
    b = draw(breakage(["x"], device))
    x = broken(b, "x", x, draw, gen)
    case = Case("gelu_tanh", lambda: kiln.gelu_tanh(x, out_dtype=out_dtype, quantize=quantize),
                None)
    case.notes = [getattr(x, "shape", "?"), getattr(x, "dtype", "?"), out_dtype, quantize, b]
    expect_row_case(case, b, row_issues(x, out_dtype, quantize))
    out_type = getattr(x, "dtype", None) if out_dtype is None else out_dtype

    def check(got):
        xd = x.detach().cpu().double()
        want = F.gelu(xd, approximate="tanh")
        floor = 2.0**-21 * xd.abs().nan_to_num(0, 0, 0)
        check_rows(case, got, want, floor, out_type, quantize,
                   lambda: kiln.gelu_tanh(x, out_dtype="f32"))

    case.check = check
    return case


@st.composite
def group_norm_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n, c = draw(st.integers(0, 2)), draw(st.sampled_from([0, 1, 4, 6, 32]))
    hh, ww = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    x = values(gen, (n, c, hh, ww), draw(st.sampled_from(FLOATS)), device)
    x = inject_specials(draw, gen, x, 0.01)
    memory = draw(st.sampled_from(["nchw", "channels_last", "other"]))
    if memory == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif memory == "other":
        x = draw(layout(x, ("reversed", "strided")))
    groups = draw(st.sampled_from([1, 2, 3, 4, "all", 0, 2.0]))
    groups = c if groups == "all" else groups
    vector_dtype = draw(st.sampled_from(FLOATS))
    weight, bias = (values(gen, (c,), vector_dtype, device) if draw(st.booleans()) else None
                    for _ in range(2))
    eps, eps_bad = eps_draw(draw)
    silu = draw(st.booleans())
    out_dtype = draw(st.sampled_from([None, None, *FLOATS]))
    b = present(draw(breakage(["x", "weight", "bias"], device)),
                {"x": x, "weight": weight, "bias": bias})
    x, weight, bias = (broken(b, name, t, draw, gen) for name, t in
                       (("x", x), ("weight", weight), ("bias", bias)))
    case = Case("group_norm", lambda: kiln.group_norm(x, groups, weight, bias, eps=eps, silu=silu,
                                                      out_dtype=out_dtype), None)
    case.notes = [(n, c, hh, ww), memory, groups, eps, silu, out_dtype, b]
    issues = ["eps"] * eps_bad
    if isinstance(groups, float) or groups < 1 or (isinstance(groups, int) and c % groups):
        issues.append("num_groups")
    dense = isinstance(x, torch.Tensor) and (x.is_contiguous() or x.is_contiguous(
        memory_format=torch.channels_last))
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not dense:
        issues.append("x")
    if b is not None:
        refuse(case, b, "x", other=bool(issues))
    elif issues:
        case.expect, case.bad = "error", issues[0] if len(issues) == 1 else None
    out_type = getattr(x, "dtype", None) if out_dtype is None else out_dtype

    def check(got):
        assert got.dtype == out_type and got.shape == x.shape, case.notes
        channels_last = c > 1 and x.stride(1) == 1  # conv2d's rule, kept by the output
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else
                                 torch.contiguous_format), (got.stride(), case.notes)
        if got.numel() == 0:  # C, H or W = 0 too, where F.group_norm raises (README)
            return
        xd = x.cpu().double()
        wd, bd = (None if t is None else t.cpu().double() for t in (weight, bias))
        # The aten op: F.group_norm also refuses groups of one value (a training-mode check).
        want = torch.group_norm(xd, groups, wd, bd, f32(eps), False)
        size = centered_size(xd.reshape(n, groups, -1), eps).reshape(xd.shape)
        magnitude = size * (1 if wd is None else wd.abs()[:, None, None]) + (
            0 if bd is None else bd.abs()[:, None, None])
        if silu:
            want = F.silu(want)
        floor = 2e-5 * magnitude.nan_to_num(0, 0, 0).amax((1, 2, 3), keepdim=True)
        close(got, want, rounding(out_type, want, floor), case.notes)

    case.check = check
    return case


# ---- rope (LLM): normal and neox, per-head norm, the KV-cache write ---------------------------


def llm_rope_oracle(x, positions, theta, style, norm_weight, eps):
    """y [N, T, H, D] in f64: the per-head RMSNorm, then pair i, (y[2i], y[2i+1]) (normal) or
    (y[i], y[i + D/2]) (neox), turned by positions[n, t] * theta^(-2i/D)."""
    y = x.detach().cpu().double()
    if y.numel() == 0:
        return y
    if norm_weight is not None:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + f32(eps))
        y = y * norm_weight.cpu().double()
    if theta is None:
        return y
    d = y.shape[-1]
    half = d // 2
    freq = torch.tensor(float(theta), dtype=torch.float64) ** (
        -2 * torch.arange(half, dtype=torch.float64) / d)
    angle = positions.cpu().double()[:, :, None, None] * freq  # [N, T, 1, D/2]
    cos, sin = angle.cos(), angle.sin()
    a, b = (y[..., 0::2], y[..., 1::2]) if style == "normal" else (y[..., :half], y[..., half:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if style == "normal":
        return torch.stack([ra, rb], -1).reshape(y.shape)
    return torch.cat([ra, rb], -1)


@st.composite
def llm_rope_cases(draw, device):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n, t, h = draw(st.integers(0, 2)), draw(st.integers(0, 5)), draw(st.integers(0, 3))
    d = draw(st.sampled_from([0, 2, 6, 8, 64, 128, 3]))
    x_dtype = draw(st.sampled_from(FLOATS))
    x = draw(layout(values(gen, (n, t, h, d), x_dtype, device)))
    use_cache = draw(st.booleans())
    # Positions: distinct within a sequence (two tokens at one cache row write it in an
    # unspecified order); without a cache, from far positions (exact f64 angles) or negative.
    s = t + draw(st.integers(0, 4))
    base = 0 if use_cache else draw(st.sampled_from([0, 0, 32768, 1_000_003, -7]))
    positions = torch.stack([torch.randperm(s, generator=gen)[:t] for _ in range(n)]) if n else \
        torch.zeros(0, t, dtype=torch.int64)
    positions = positions + base
    # Outside [0, S): refused on CPU (where a row is written: H and D > 0), skipped on CUDA.
    position_bad = use_cache and n * t * h * d > 0 and draw(st.integers(0, 5)) == 0
    if position_bad:
        positions[0, 0] = draw(st.sampled_from([s, -1, s + 100]))
    positions = draw(layout(positions.to(draw(st.sampled_from([torch.int32, torch.int64])))
                            .to(device)))
    theta = draw(st.sampled_from([10000.0, 1e6, 10.0, None, 0.0, -1.0, math.nan, "x"]))
    theta_bad = theta is not None and not (isinstance(theta, float) and math.isfinite(theta)
                                           and theta > 0)
    style = draw(st.sampled_from(["normal", "neox", "normal", "neox", "gptj"]))
    norm_weight = values(gen, (d,), draw(st.sampled_from(FLOATS)), device) if draw(
        st.booleans()) else None
    eps, eps_bad = eps_draw(draw)
    out_dtype = draw(st.sampled_from([None, None, *FLOATS]))
    cache = cache_before = None
    if use_cache:
        out_dtype = out_dtype if draw(st.integers(0, 5)) == 0 else None  # refused with a cache
        cache_dtype = draw(st.sampled_from(FLOATS))
        kind = draw(st.sampled_from(["contiguous", "rows", "heads_major"]))
        if kind == "heads_major":  # [N, S, H, D] memory
            cache = values(gen, (n, s, h, d), cache_dtype, device).permute(0, 2, 1, 3)
        else:
            cache = values(gen, (n, h, s + 3, d), cache_dtype, device)
            cache = cache[:, :, 2:s + 2] if kind == "rows" else cache[:, :, :s].contiguous()
        cache_before = cache.clone()
    b = present(draw(breakage(["x", "positions", "norm_weight", "cache"], device)),
                {"x": x, "positions": positions, "norm_weight": norm_weight, "cache": cache})
    x, positions, norm_weight, cache = (broken(b, name, t_, draw, gen) for name, t_ in
                                        (("x", x), ("positions", positions),
                                         ("norm_weight", norm_weight), ("cache", cache)))
    op = "rope_cache" if use_cache else "rope"
    case = Case(op, lambda: kiln.rope(x, positions, theta=theta, style=style,
                                      norm_weight=norm_weight, eps=eps, cache=cache,
                                      out_dtype=out_dtype), None)
    case.notes = [(n, t, h, d), x_dtype, theta, style, norm_weight is not None, eps, out_dtype,
                  None if cache is None else getattr(cache, "shape", "?"), b]
    # eps is read with a norm weight only (a negative one is then refused; NaN and text always).
    eps_bad = eps_bad and (norm_weight is not None or not isinstance(eps, float) or
                           math.isnan(eps))
    issues = ["theta"] * theta_bad + ["style"] * (style == "gptj") + ["eps"] * eps_bad
    if use_cache and out_dtype is not None:
        issues.append("out_dtype")
    if d % 2:
        issues.append("x")
    if position_bad and device == "cpu":
        issues.append("positions")
    if b is not None:
        refuse(case, b, "x", other=bool(issues))
    elif issues:
        case.expect, case.bad = "error", issues[0] if len(issues) == 1 else None
    out_type = x_dtype if out_dtype is None else out_dtype

    def check(got):
        y = llm_rope_oracle(x, positions, theta, style, norm_weight, eps)  # [N, T, H, D]
        if not use_cache:
            want = y.permute(0, 2, 1, 3)
            assert got.dtype == out_type and got.is_contiguous(), case.notes
            row = want.abs().amax(-1, keepdim=True) if want.numel() else want
            close(got, want, rounding(out_type, want, 4e-6 * (row + 1)), case.notes)
            return
        assert got is None
        # Rows at the tokens' positions hold y; every other row keeps its bits.
        want = cache_before.cpu().double()
        written = torch.zeros(want.shape[:3], dtype=torch.bool)
        pos = positions.cpu().long()
        for i in range(n):
            for j in range(t):
                if 0 <= pos[i, j] < s:
                    want[i, :, pos[i, j]] = y[i, j]
                    written[i, :, pos[i, j]] = True
        after = cache.cpu()
        assert torch.equal(after[~written].view(torch.int16 if after.element_size() == 2 else
                                                torch.int32),
                           cache_before.cpu()[~written].view(torch.int16 if after.element_size()
                                                             == 2 else torch.int32)), case.notes
        row = want.abs().amax(-1, keepdim=True) if want.numel() else want
        close(after, want, rounding(cache.dtype, want, 4e-6 * (row + 1)), case.notes)

    case.check = check
    return case


# ---- the tests ----------------------------------------------------------------------------------

STRATEGIES = {
    "rope_flux": rope_cases,
    "attention": attention_cases,
    "conv2d": conv2d_cases,
    "matmul": matmul_cases,
    "quantize_fp8": quantize_fp8_cases,
    "quantize_q8_0": quantize_q8_0_cases,
    "dequantize": dequantize_cases,
    "prepare_weight": prepare_weight_cases,
    "select_path": select_path_cases,
    "rms_norm": rms_norm_cases,
    "layer_norm": layer_norm_cases,
    "group_norm": group_norm_cases,
    "glu": glu_cases,
    "gelu_tanh": gelu_tanh_cases,
    "rope": llm_rope_cases,
}
NUMPY = {"conv2d", "quantize_q8_0", "dequantize"}


@pytest.mark.parametrize("op", OPS)
def test_fuzz_cpu(op):
    pytest.importorskip("gguf")
    strategy = STRATEGIES[op]("cpu")
    if op in NUMPY:
        strategy = st.one_of(strategy, STRATEGIES[op]("cpu", numpy=True))
    fuzz(op, "cpu", strategy)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("op", OPS)
def test_fuzz_cuda(op):
    pytest.importorskip("gguf")
    fuzz(op, "cuda", STRATEGIES[op]("cuda"))
