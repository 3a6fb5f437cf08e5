"""Inputs at the edge, each with the answer kiln gives: empty tensors (as torch), inf and NaN (as
SDPA; Q8_0's documented saturation), tensors that require grad (refused under grad mode), meta,
mixed and foreign devices, and bad arguments (kiln's error naming the op and the argument).
tests/python/test_fuzz.py draws such inputs at random; these are the cases found by hand."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kiln

from conftest import CUDA_REASON, DEVICES, HAS_CUDA

BF = torch.bfloat16


def fp8_weight(n, k, device="cpu"):
    return torch.randn(n, k, device=device).to(torch.float8_e4m3fn)


def error_of(call, kind=kiln.KilnError):
    """The message of the kiln error `call` raises (any other outcome fails the test)."""
    with pytest.raises(kind) as info:
        call()
    return str(info.value)


# ---- empty tensors: empty results, as torch gives them -------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", [(3, 0, 128), (0, 5, 128), (3, 5, 0), (0, 0, 0)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_empty(device, m, n, k, with_bias):
    a = torch.randn(m, k, device=device, dtype=BF)
    w = torch.randn(n, k, device=device, dtype=BF)
    bias = torch.randn(n, device=device) if with_bias else None
    got = kiln.matmul(a, w, bias=bias)
    want = F.linear(a.float(), w.float(), bias).to(BF)  # K = 0: bias, or zeros
    assert got.shape == want.shape and got.dtype == BF
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w8 = fp8_weight(n, k, device)
    got8 = kiln.matmul(a, w8, w_scale=2.0, bias=bias)
    want8 = F.linear(a.float(), w8.float() * 2, bias).to(BF)
    torch.testing.assert_close(got8, want8, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_q,shape_k,dv", [
    ((1, 2, 0, 64), (1, 2, 5, 64), 64),   # Lq = 0
    ((0, 2, 3, 64), (0, 2, 5, 64), 64),   # N = 0
    ((1, 0, 3, 64), (1, 0, 5, 64), 64),   # Hq = Hkv = 0
    ((1, 2, 3, 64), (1, 2, 5, 64), 0),    # Dv = 0
    ((1, 2, 3, 64), (1, 1, 0, 64), 64),   # Lk = 0: every row hidden
])
def test_attention_empty(device, shape_q, shape_k, dv):
    q = torch.randn(shape_q, device=device, dtype=BF)
    k = torch.randn(shape_k, device=device, dtype=BF)
    v = torch.randn(*shape_k[:3], dv, device=device, dtype=BF)
    if dv == 0 and q.numel() > 0:
        # Nothing to write unless the lse is asked for, which the kernels compute for Dv >= 8.
        assert kiln.attention(q, k, v).shape == (*shape_q[:3], 0)
        message = error_of(lambda: kiln.attention(q, k, v, return_lse=True))
        assert message.startswith("kiln::attention: v has head dim 0")
        return
    out, lse = kiln.attention(q, k, v, return_lse=True)
    assert out.shape == (*shape_q[:3], dv) and lse.shape == shape_q[:3]
    if shape_k[2] == 0:  # no key: zeros (SDPA too) and lse -inf
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
        assert out.numel() > 0 and torch.equal(out.float(), want)
        assert torch.all(lse == -math.inf)
    else:
        assert out.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 0, 2, 64), (0, 4, 2, 64), (1, 4, 0, 64), (1, 4, 2, 0)])
def test_rope_flux_empty(device, shape):
    n, l, h, d = shape
    x = torch.randn(shape, device=device)
    pe = torch.randn(l, d // 2, 2, 2, device=device)
    got = kiln.rope_flux(x, pe, norm_weight=torch.ones(d, device=device))
    assert got.shape == (n, h, l, d) and got.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 0), (0, 64), (2, 0, 64)])
def test_quantize_empty(device, shape):
    x = torch.randn(shape, device=device)
    for granularity in ("tensor", "row"):
        q, scale = kiln.quantize_fp8(x, "e4m3fn", granularity)
        assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn
        assert torch.all(scale == 1)  # no element: amax 0, scale 1, as for an all-zero group
    blocks = kiln.quantize_q8_0(x)
    assert blocks.shape == (*shape[:-1], shape[-1] // 32 * 34) and blocks.numel() == 0
    back = kiln.dequantize(blocks)
    assert back.shape == x.shape
    assert kiln.dequantize(q, scale[:1]).shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_empty(device):
    w = torch.randn(6, 4, 3, 3, device=device)
    got = kiln.conv2d(torch.randn(0, 4, 8, 8, device=device), w)
    assert got.shape == F.conv2d(torch.randn(0, 4, 8, 8), w.cpu()).shape
    assert kiln.conv2d(torch.randn(1, 4, 8, 8, device=device), w[:0]).shape == (1, 0, 6, 6)
    # No defined convolution: errors as in torch.
    for x, w_, arg in [(torch.randn(1, 0, 8, 8), torch.randn(6, 0, 3, 3), "x"),
                       (torch.randn(1, 4, 0, 8), torch.randn(6, 4, 1, 1), "x")]:
        message = error_of(lambda: kiln.conv2d(x.to(device), w_.to(device)))
        assert message.startswith(f"kiln::conv2d: {arg} ")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 8), (0,)])
@pytest.mark.parametrize("quantize", [None, "e4m3fn"])
def test_row_ops_empty(device, shape, quantize):
    """rms_norm, layer_norm (with AdaLN), glu and gelu_tanh: empty results as torch's; a row of
    no elements has the fp8 scale 1 (as quantize_fp8 of an empty row)."""
    x = torch.randn(shape, device=device)
    d = shape[-1]
    calls = {
        "rms_norm": (lambda: kiln.rms_norm(x, torch.ones(d, device=device), quantize=quantize),
                     shape, F.rms_norm(x, (d,))),
        "layer_norm": (lambda: kiln.layer_norm(x, shift=torch.zeros(d, device=device),
                                               scale=torch.zeros(d, device=device),
                                               quantize=quantize),
                       shape, F.layer_norm(x, (d,))),
        "gelu_tanh": (lambda: kiln.gelu_tanh(x, quantize=quantize), shape,
                      F.gelu(x, approximate="tanh")),
        "glu": (lambda: kiln.glu(x, quantize=quantize), (*shape[:-1], d // 2),
                F.silu(x[..., :d // 2]) * x[..., d // 2:]),
    }
    for op, (call, out_shape, want) in calls.items():
        got = call()
        if quantize is None:
            assert got.shape == want.shape == out_shape and got.dtype == x.dtype, op
            torch.testing.assert_close(got, want)  # rows of D = 0 stay empty too
        else:
            q, scale = got
            assert q.shape == out_shape and q.dtype == torch.float8_e4m3fn, op
            assert scale.shape == (math.prod(out_shape[:-1]),) and torch.all(scale == 1), op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 4, 0, 5), (2, 4, 3, 0), (2, 0, 3, 5)])
def test_group_norm_empty(device, shape):
    """N = 0: torch's empty result. C, H or W = 0 (where torch raises, as the README's table of
    differences says): an empty result too, as no element needs the statistics."""
    x = torch.randn(shape, device=device)
    groups = 2 if shape[1] else 1
    got = kiln.group_norm(x, groups, silu=True)
    assert got.shape == x.shape and got.numel() == 0
    if shape[0] == 0:
        assert F.group_norm(x, groups).shape == x.shape
    else:
        with pytest.raises(RuntimeError):
            F.group_norm(x, groups)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5, 2, 8), (1, 0, 2, 8), (1, 5, 0, 8), (1, 5, 2, 0)])
def test_rope_empty(device, shape):
    n, t, h, d = shape
    x = torch.randn(shape, device=device)
    positions = torch.arange(n * t, device=device).reshape(n, t)
    got = kiln.rope(x, positions, theta=1e4, norm_weight=torch.ones(d, device=device))
    assert got.shape == (n, h, t, d) and got.numel() == 0
    cache = torch.zeros(n, h, 16, d, device=device)
    assert kiln.rope(x, positions, theta=1e4, cache=cache) is None
    assert torch.all(cache == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_gate_residual_empty(device):
    """An empty batch (B = 0: a [0, L, K], gate [0, N]) and K = 0 give what torch's formula
    residual + gate * (a . w^T + bias) gives."""
    w = torch.randn(5, 16, dtype=BF, device=device)
    got = kiln.matmul(torch.randn(0, 3, 16, dtype=BF, device=device), w,
                      gate=torch.randn(0, 5, device=device),
                      residual=torch.randn(0, 3, 5, device=device))
    assert got.shape == (0, 3, 5)
    bias, gate = torch.randn(5, device=device), torch.randn(2, 5, device=device)
    residual = torch.randn(2, 3, 5, device=device)
    got = kiln.matmul(torch.randn(2, 3, 0, dtype=BF, device=device), w[:, :0], bias=bias,
                      gate=gate, residual=residual, out_dtype=torch.float32)
    torch.testing.assert_close(got, residual + gate[:, None] * bias)


def test_empty_views_with_any_strides():
    """torch gives empty tensors strides that are not the contiguous ones: kiln takes them."""
    a = torch.randn(3, 128, dtype=BF)
    w = torch.randn(0, 128, dtype=BF)
    out = torch.empty(3, 0, dtype=BF)
    assert out.stride() == (1, 1)
    assert kiln.matmul(a, w).shape == (3, 0)


# ---- inf and NaN ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_attention_inf_score_gives_nan_as_sdpa(device):
    q = torch.randn(1, 1, 4, 8, dtype=BF)
    k = torch.randn(1, 1, 4, 8, dtype=BF)
    k[0, 0, 2, 0] = math.inf
    q[..., 0] = 1
    got, lse = kiln.attention(q.to(device), k.to(device), k.to(device), return_lse=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), k.float())
    assert torch.isnan(want).all() and torch.isnan(got).all() and torch.isnan(lse).all()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_nan_rows_and_masked_rows(device):
    q = torch.randn(1, 2, 5, 16, dtype=BF, device=device)
    k = torch.randn(1, 2, 7, 16, dtype=BF, device=device)
    v = torch.randn(1, 2, 7, 16, dtype=BF, device=device)
    q[0, 0, 1, 3] = math.nan  # row (0, 1): NaN
    mask = torch.zeros(5, 7, device=device)
    mask[2] = -math.inf  # row 2: every key hidden by the mask: zeros
    mask[3, 4] = math.nan  # row 3: a NaN mask value: NaN
    out, lse = kiln.attention(q, k, v, mask=mask, return_lse=True)
    assert torch.isnan(out[0, 0, 1]).all() and torch.isnan(lse[0, 0, 1])
    assert torch.isnan(out[:, :, 3]).all() and torch.isnan(lse[:, :, 3]).all()
    assert (out[:, :, 2] == 0).all() and (lse[:, :, 2] == -math.inf).all()
    finite = [(0, 0), (0, 4), (1, 0), (1, 1), (1, 4)]
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    for h, i in finite:
        torch.testing.assert_close(out[0, h, i].float(), want[0, h, i], atol=2e-2, rtol=2e-2)
    # Rows hidden by causal (Lq > Lk: bottom-right alignment) and by kv_len = 0 give zeros too.
    q_long = torch.randn(1, 1, 9, 16, dtype=BF, device=device)
    causal = kiln.attention(q_long, k[:, :1], v[:, :1], causal=True)
    assert (causal[0, 0, :2] == 0).all() and (causal[0, 0, 2:] != 0).any()
    empty = kiln.attention(q, k, v, kv_len=torch.tensor([0], dtype=torch.int32, device=device))
    assert (empty == 0).all()


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("lq,lk,d", [(1, 4096, 128), (1, 4096, 64), (200, 300, 128),
                                     (200, 300, 64), (40, 50, 40), (3, 1000, 256)])
def test_attention_nonfinite_cuda_matches_cpu(lq, lk, d):
    """Every CUDA kernel (split-KV decode with 4 warps along the keys, TMA decode, sm90 prefill,
    mma.sync prefill) gives NaN rows, zero rows and finite rows where the CPU reference does."""
    torch.manual_seed(lq * lk + d)
    q = torch.randn(2, 4, lq, d, dtype=BF)
    k = torch.randn(2, 2, lk, d, dtype=BF)
    v = torch.randn(2, 2, lk, d, dtype=BF)
    q[0, 1, 0, 5] = math.nan  # a NaN input: its row NaN
    k[1, 0, lk // 2, 0] = math.inf  # a +inf score for the rows of batch 1, kv head 0 with q > 0
    q[1, :2, :, 0] = 1.0
    kv_len = torch.tensor([lk, 0], dtype=torch.int32)  # batch 1, kv_len 0: every row zeros
    for lengths in (None, kv_len):
        cpu, cpu_lse = kiln.attention(q, k, v, kv_len=lengths, return_lse=True)
        gpu, gpu_lse = kiln.attention(q.cuda(), k.cuda(), v.cuda(), return_lse=True,
                                      kv_len=None if lengths is None else lengths.cuda())
        gpu, gpu_lse = gpu.cpu(), gpu_lse.cpu()
        assert torch.equal(torch.isnan(gpu), torch.isnan(cpu))
        assert torch.equal(torch.isnan(gpu_lse), torch.isnan(cpu_lse))
        assert torch.equal(gpu_lse == -math.inf, cpu_lse == -math.inf)
        finite = ~torch.isnan(cpu)
        torch.testing.assert_close(gpu[finite].float(), cpu[finite].float(), atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_kv_len_out_of_range_is_clamped_on_cuda():
    """CUDA lengths are device memory: not read on the host, clamped by the kernels."""
    q = torch.randn(2, 1, 1, 64, dtype=BF, device="cuda")
    k = torch.randn(2, 1, 32, 64, dtype=BF, device="cuda")
    clamped = kiln.attention(q, k, k, kv_len=torch.tensor([40, -3], device="cuda"))
    want = kiln.attention(q, k, k, kv_len=torch.tensor([32, 0], device="cuda"))
    torch.testing.assert_close(clamped, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_q8_0_overflow_saturates_and_nan_stays_nan(device):
    gguf = pytest.importorskip("gguf")
    x = torch.randn(4, 96)
    x[0, 5] = 1e7  # block 0 of row 0: d = 1e7 / 127 overflows f16
    x[1, 40] = math.inf  # block 1 of row 1
    x[2, 70] = math.nan  # block 2 of row 2
    blocks = kiln.quantize_q8_0(x.to(device)).cpu()
    back = kiln.dequantize(blocks.to(device)).cpu()
    d = blocks.view(4, 3, 34)[:, :, :2].contiguous().view(torch.float16).reshape(4, 3)
    assert d[0, 0] == 65504 and d[1, 1] == 65504 and torch.isnan(d[2, 2])
    assert back[0, 5] == 127 * 65504 and back[1, 40] == 127 * 65504
    assert torch.isnan(back[2, 64:96]).all() and not torch.isnan(back[2, :64]).any()
    # Every other block is ggml's, byte for byte.
    with np.errstate(all="ignore"):  # ggml's own overflow and NaN
        ggml = torch.from_numpy(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0))
    special = {(0, 0), (1, 1), (2, 2)}
    for r in range(4):
        for b in range(3):
            if (r, b) not in special:
                assert torch.equal(blocks.view(4, 3, 34)[r, b], ggml.view(4, 3, 34)[r, b]), (r, b)


# ---- autograd: refused, never a graph that drops the gradient ------------------------------------


def _calls(t):
    """Each public op called with `t` (f32, requires grad or not) in some float argument."""
    b = t.to(BF)
    return {
        "rope_flux": (lambda: kiln.rope_flux(t.reshape(1, 2, 2, 8)), "x"),
        "attention": (lambda: kiln.attention(b.reshape(1, 1, 4, 8), b.detach().reshape(1, 1, 4, 8),
                                             b.detach().reshape(1, 1, 4, 8)), "q"),
        "conv2d": (lambda: kiln.conv2d(torch.randn(1, 2, 4, 4), t.reshape(2, 2, 2, 4)[..., :2]),
                   "w"),
        "matmul": (lambda: kiln.matmul(torch.randn(2, 8, dtype=BF), b.reshape(4, 8)), "w"),
        "matmul bias": (lambda: kiln.matmul(torch.randn(2, 8, dtype=BF),
                                            torch.randn(4, 8, dtype=BF), bias=t[:4]), "bias"),
        "quantize_fp8": (lambda: kiln.quantize_fp8(t.reshape(4, 8)), "x"),
        "quantize_q8_0": (lambda: kiln.quantize_q8_0(t.reshape(1, 32)), "x"),
        "rope_flux out": (lambda: kiln.rope_flux(torch.randn(1, 2, 2, 8),
                                                 out=t.reshape(1, 2, 2, 8)), "out"),
        "matmul gate": (lambda: kiln.matmul(torch.randn(2, 8, dtype=BF),
                                            torch.randn(4, 8, dtype=BF), gate=t[:4]), "gate"),
        "matmul residual": (lambda: kiln.matmul(torch.randn(2, 8, dtype=BF),
                                                torch.randn(4, 8, dtype=BF),
                                                residual=t[:8].reshape(2, 4)), "residual"),
        "rms_norm": (lambda: kiln.rms_norm(t.reshape(4, 8)), "x"),
        "rms_norm weight": (lambda: kiln.rms_norm(torch.randn(4, 8), t[:8], quantize="e4m3fn"),
                            "weight"),
        "layer_norm shift": (lambda: kiln.layer_norm(torch.randn(2, 2, 8),
                                                     shift=t[:16].reshape(2, 8)), "shift"),
        "layer_norm scale": (lambda: kiln.layer_norm(torch.randn(2, 2, 8), scale=t[:8],
                                                     quantize="e4m3fn"), "scale"),
        "group_norm": (lambda: kiln.group_norm(t.reshape(1, 4, 2, 4), 2, silu=True), "x"),
        "group_norm bias": (lambda: kiln.group_norm(torch.randn(1, 4, 2, 4), 2, bias=t[:4]),
                            "bias"),
        "glu": (lambda: kiln.glu(t.reshape(4, 8), quantize="e4m3fn"), "x"),
        "gelu_tanh": (lambda: kiln.gelu_tanh(t.reshape(4, 8)), "x"),
        "rope": (lambda: kiln.rope(t.reshape(1, 2, 2, 8), torch.tensor([[3, 4]]), theta=1e4),
                 "x"),
        "rope norm_weight": (lambda: kiln.rope(torch.randn(1, 2, 2, 8), torch.tensor([[3, 4]]),
                                               theta=1e4, norm_weight=t[:8]), "norm_weight"),
        "rope_cache": (lambda: kiln.rope(torch.randn(1, 2, 2, 8), torch.tensor([[0, 1]]),
                                         theta=1e4, cache=t.reshape(1, 2, 2, 8)), "cache"),
    }


@pytest.mark.parametrize("name", list(_calls(torch.zeros(32))))
def test_requires_grad_is_refused(name):
    t = torch.randn(32, requires_grad=True)
    call, arg = _calls(t)[name]
    op = name.split()[0]
    message = error_of(call, kiln.UnsupportedError)
    assert message.startswith(f"kiln::{op}: {arg} requires grad"), message
    with torch.no_grad():
        call()
    with torch.inference_mode():
        _calls(t.detach())[name][0]()


def test_requires_grad_refused_by_the_op_itself():
    """torch.ops.kiln.* called directly (not through kiln.*) refuses too."""
    q = torch.randn(1, 1, 4, 8, dtype=BF, requires_grad=True)
    message = error_of(lambda: torch.ops.kiln.attention(q, q.detach(), q.detach(), False, None,
                                                        None, None, None, False),
                       kiln.UnsupportedError)
    assert message.startswith("kiln::attention: q requires grad")
    x = torch.randn(4, 8, requires_grad=True)
    positions = torch.zeros(1, 4, dtype=torch.int64)
    for op, arg, call in [
        ("rms_norm", "weight", lambda: torch.ops.kiln.rms_norm_fp8(x.detach(), x[0], 1e-6,
                                                                  torch.float8_e4m3fn)),
        ("layer_norm", "x", lambda: torch.ops.kiln.layer_norm(x, None, None, None, None, 1e-6,
                                                              None)),
        ("glu", "x", lambda: torch.ops.kiln.glu_fp8(x, "silu", torch.float8_e4m3fn)),
        ("rope_cache", "cache", lambda: torch.ops.kiln.rope_cache(
            x.detach().reshape(1, 4, 1, 8), positions, x.reshape(1, 1, 4, 8), 1e4, "normal",
            None, 1e-6)),
        ("rope_flux", "out", lambda: torch.ops.kiln.rope_flux_out(
            x.detach().reshape(1, 4, 1, 8), None, None, 1e-6, x.reshape(1, 1, 4, 8))),
    ]:
        message = error_of(call, kiln.UnsupportedError)
        assert message.startswith(f"kiln::{op}: {arg} requires grad"), message


def test_torch_compile_traces_the_ops_without_grad():
    def f(x, pe, q, k, v):
        return kiln.rope_flux(x, pe), kiln.attention(q, k, v)

    args = (torch.randn(1, 4, 2, 8), torch.randn(4, 4, 2, 2),
            *(torch.randn(1, 2, 4, 8, dtype=BF) for _ in range(3)))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for got, want in zip(compiled(*args), f(*args)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- devices -------------------------------------------------------------------------------------


def _meta_calls():
    """(op, argument, call with that argument on the meta device), for every tensor argument."""
    m = lambda t: t.to("meta")  # noqa: E731
    x, pe, nw = torch.randn(1, 4, 2, 8), torch.randn(4, 4, 2, 2), torch.ones(8)
    q = torch.randn(1, 2, 4, 8, dtype=BF)
    mask, kv_len = torch.zeros(4, 4), torch.tensor([3])
    cx, cw, cb = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.randn(6)
    a, w, ws, bias = torch.randn(2, 64, dtype=BF), fp8_weight(4, 64), torch.ones(4), torch.ones(4)
    fx, q8 = torch.randn(4, 64), torch.zeros(4, 68, dtype=torch.uint8)
    return [
        ("rope_flux", "x", lambda: kiln.rope_flux(m(x), pe, norm_weight=nw)),
        ("rope_flux", "pe", lambda: kiln.rope_flux(x, m(pe), norm_weight=nw)),
        ("rope_flux", "norm_weight", lambda: kiln.rope_flux(x, pe, norm_weight=m(nw))),
        ("attention", "q", lambda: kiln.attention(m(q), q, q)),
        ("attention", "k", lambda: kiln.attention(q, m(q), q)),
        ("attention", "v", lambda: kiln.attention(q, q, m(q))),
        ("attention", "mask", lambda: kiln.attention(q, q, q, mask=m(mask))),
        ("attention", "kv_len", lambda: kiln.attention(q, q, q, kv_len=m(kv_len))),
        ("conv2d", "x", lambda: kiln.conv2d(m(cx), cw, cb)),
        ("conv2d", "w", lambda: kiln.conv2d(cx, m(cw), cb)),
        ("conv2d", "bias", lambda: kiln.conv2d(cx, cw, m(cb))),
        ("matmul", "a", lambda: kiln.matmul(m(a), w, w_scale=ws, bias=bias)),
        ("matmul", "w", lambda: kiln.matmul(a, m(w), w_scale=ws, bias=bias)),
        ("matmul", "w_scale", lambda: kiln.matmul(a, w, w_scale=m(ws), bias=bias)),
        ("matmul", "bias", lambda: kiln.matmul(a, w, w_scale=ws, bias=m(bias))),
        ("quantize_fp8", "x", lambda: kiln.quantize_fp8(m(fx))),
        ("quantize_fp8", "scale", lambda: kiln.quantize_fp8(fx, scale=m(ws[:1]))),
        ("quantize_q8_0", "x", lambda: kiln.quantize_q8_0(m(fx))),
        ("dequantize", "q", lambda: kiln.dequantize(m(q8))),
        ("dequantize", "scale", lambda: kiln.dequantize(w, m(ws))),
        ("prepare_weight", "w", lambda: kiln.prepare_weight(m(w), ws)),
        ("prepare_weight", "w_scale", lambda: kiln.prepare_weight(w, m(ws))),
        ("select_path", "w", lambda: kiln.select_path(1, m(w))),
        ("rope_flux", "out", lambda: kiln.rope_flux(x, pe, out=m(torch.empty(1, 2, 4, 8)))),
        ("matmul", "gate", lambda: kiln.matmul(a, w, w_scale=ws, gate=m(bias))),
        ("matmul", "residual", lambda: kiln.matmul(a, w, w_scale=ws,
                                                   residual=m(torch.zeros(2, 4)))),
        ("rms_norm", "x", lambda: kiln.rms_norm(m(fx), quantize="e4m3fn")),
        ("rms_norm", "weight", lambda: kiln.rms_norm(fx, m(fx[0]))),
        ("layer_norm", "bias", lambda: kiln.layer_norm(fx, bias=m(fx[0]))),
        ("layer_norm", "shift", lambda: kiln.layer_norm(fx, shift=m(fx[0]))),
        ("layer_norm", "scale", lambda: kiln.layer_norm(fx, scale=m(fx[0]), quantize="e5m2")),
        ("group_norm", "x", lambda: kiln.group_norm(m(cx), 2)),
        ("group_norm", "weight", lambda: kiln.group_norm(cx, 2, m(cx[0, :, 0, 0]))),
        ("glu", "x", lambda: kiln.glu(m(fx))),
        ("gelu_tanh", "x", lambda: kiln.gelu_tanh(m(fx), quantize="e4m3fn")),
        ("rope", "x", lambda: kiln.rope(m(x), torch.zeros(1, 4, dtype=torch.int64), theta=1e4)),
        ("rope", "positions", lambda: kiln.rope(x, m(torch.zeros(1, 4, dtype=torch.int64)),
                                                theta=1e4)),
        ("rope", "norm_weight", lambda: kiln.rope(x, torch.zeros(1, 4, dtype=torch.int64),
                                                  theta=1e4, norm_weight=m(nw))),
        ("rope_cache", "cache", lambda: kiln.rope(x, torch.zeros(1, 4, dtype=torch.int64),
                                                  theta=1e4, cache=m(torch.empty(1, 2, 8, 8)))),
    ]


@pytest.mark.parametrize("op,arg,call", _meta_calls(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_meta_tensors_are_refused(op, arg, call):
    message = error_of(call, kiln.InvalidArgumentError)
    assert message.startswith(f"kiln::{op}: {arg} is on meta"), message


def test_meta_only_op_call_gives_meta_and_mixed_is_refused():
    """The fake kernel the dispatcher sends meta calls to: meta in, meta out; never a real
    tensor of uninitialized memory from a call that mixes meta and real tensors."""
    w = torch.empty(6, 4, 3, 3, device="meta")
    out = torch.ops.kiln.conv2d(torch.empty(1, 4, 8, 8, device="meta"), w, None, [1, 1], [0, 0],
                                [1, 1], 1, None)
    assert out.device.type == "meta" and out.shape == (1, 6, 6, 6)
    message = error_of(lambda: torch.ops.kiln.conv2d(torch.randn(1, 4, 8, 8), w, None, [1, 1],
                                                     [0, 0], [1, 1], 1, None))
    assert message.startswith("kiln::conv2d: w is on meta")
    x, meta = torch.randn(4, 8), torch.empty(8, device="meta")
    x4 = torch.randn(1, 4, 2, 8)
    positions = torch.zeros(1, 4, dtype=torch.int64)
    for op, arg, call in [
        ("rms_norm", "weight", lambda: torch.ops.kiln.rms_norm(x, meta, 1e-6, None)),
        ("layer_norm", "scale", lambda: torch.ops.kiln.layer_norm_fp8(
            x, None, None, None, meta, 1e-6, torch.float8_e4m3fn)),
        ("group_norm", "bias", lambda: torch.ops.kiln.group_norm(
            torch.randn(1, 8, 2, 2), 2, None, meta, 1e-6, False, None)),
        ("rope", "positions", lambda: torch.ops.kiln.rope(x4, positions.to("meta"), 1e4,
                                                          "normal", None, 1e-6, None)),
        ("rope_cache", "cache", lambda: torch.ops.kiln.rope_cache(
            x4, positions, torch.empty(1, 2, 4, 8, device="meta"), 1e4, "neox", None, 1e-6)),
        ("rope_flux", "out", lambda: torch.ops.kiln.rope_flux_out(
            x4, None, None, 1e-6, torch.empty(1, 2, 4, 8, device="meta"))),
        ("matmul", "residual", lambda: torch.ops.kiln.matmul(
            x.to(BF), x.to(BF), "bf16", 4, 8, None, "row_major", None, None, BF, "auto", None,
            torch.empty(4, 4, device="meta"))),
    ]:
        message = error_of(call, kiln.InvalidArgumentError)
        assert message.startswith(f"kiln::{op}: {arg} is on meta"), message


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_mixed_cpu_cuda_is_refused_before_allocating():
    for arg, call in [
        ("w", lambda: kiln.conv2d(torch.randn(1, 4, 8, 8, device="cuda"), torch.randn(6, 4, 3, 3))),
        ("kv_len", lambda: kiln.attention(*(torch.randn(1, 1, 4, 8, dtype=BF, device="cuda"),) * 3,
                                          kv_len=torch.tensor([2]))),
        ("bias", lambda: kiln.matmul(torch.randn(2, 64, device="cuda"),
                                     fp8_weight(4, 64, "cuda"), bias=torch.ones(4))),
    ]:
        before = torch.cuda.memory_allocated()
        message = error_of(call, kiln.InvalidArgumentError)
        assert re.match(rf"kiln::\w+: {arg} is on cpu, expected", message), message
        assert torch.cuda.memory_allocated() == before


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not HAS_CUDA, reason="needs two GPUs")
def test_two_gpus_are_refused():
    message = error_of(lambda: kiln.conv2d(torch.randn(1, 4, 8, 8, device="cuda:0"),
                                           torch.randn(6, 4, 3, 3, device="cuda:1")))
    assert message.startswith("kiln::conv2d: w is on cuda:1, expected x's device cuda:0")


# ---- clear errors for bad arguments --------------------------------------------------------------


@pytest.mark.parametrize("dtype,name", [(torch.float64, "float64"), (torch.bool, "bool"),
                                        (torch.int16, "int16"), (torch.complex64, "complex64")])
def test_foreign_dtypes_are_named(dtype, name):
    x = torch.ones(1, 4, 8, 8).to(dtype)
    message = error_of(lambda: kiln.conv2d(x, torch.randn(6, 4, 3, 3)))
    assert message.startswith(f"kiln::conv2d: x has dtype {name}, which no kiln op takes"), message
    assert "DLPack" not in message


def test_numpy_inputs():
    message = error_of(lambda: kiln.rope_flux(np.zeros((1, 2, 2, 8))))
    assert message.startswith("kiln::rope_flux: x has dtype float64, expected float32 or float16")
    assert "out_dtype is" not in message
    for call in (lambda: kiln.rope_flux(np.zeros((1, 2, 2, 8), dtype=">f4")),
                 lambda: kiln.conv2d(np.zeros((1, 1, 3, 3), dtype=np.float32),
                                     np.zeros((1, 1, 1, 1), dtype=">f4"))):
        message = error_of(call, kiln.InvalidArgumentError)
        assert "non-native byte order" in message and "incompatible function" not in message


@pytest.mark.parametrize("call,op,arg", [
    (lambda: kiln.rope_flux([[1.0]]), "rope_flux", "x"),
    (lambda: kiln.rope_flux(torch.randn(1, 2, 2, 8), pe=3), "rope_flux", "pe"),
    (lambda: kiln.attention(torch.randn(1, 1, 2, 8), [1], [1]), "attention", "k"),
    (lambda: kiln.attention(*(torch.randn(1, 1, 2, 8, dtype=BF),) * 3, kv_len=[2]), "attention",
     "kv_len"),
    (lambda: kiln.matmul(3, torch.randn(2, 2, dtype=BF)), "matmul", "a"),
    (lambda: kiln.conv2d(torch.randn(1, 1, 3, 3), np.zeros((1, 1, 1, 1), np.float32)), "conv2d",
     "w"),
    (lambda: kiln.quantize_q8_0("x"), "quantize_q8_0", "x"),
    (lambda: kiln.dequantize(None), "dequantize", "q"),
    (lambda: kiln.rms_norm([1.0, 2.0]), "rms_norm", "x"),
    (lambda: kiln.layer_norm(torch.randn(2, 8), shift=[0.0] * 8), "layer_norm", "shift"),
    (lambda: kiln.group_norm(torch.randn(1, 4, 2, 2), 2, np.ones(4, np.float32)), "group_norm",
     "weight"),
    (lambda: kiln.glu((1.0, 2.0)), "glu", "x"),
    (lambda: kiln.rope(torch.randn(1, 2, 2, 8), [[0, 1]], theta=1e4), "rope", "positions"),
    (lambda: kiln.rope(torch.randn(1, 2, 2, 8), torch.tensor([[0, 1]]), theta=1e4,
                       cache=np.zeros((1, 2, 4, 8), np.float32)), "rope_cache", "cache"),
    (lambda: kiln.rope_flux(torch.randn(1, 2, 2, 8), out=[0.0]), "rope_flux", "out"),
    (lambda: kiln.matmul(torch.randn(2, 8, dtype=BF), torch.randn(4, 8, dtype=BF), gate=1.0),
     "matmul", "gate"),
])
def test_non_arrays_are_named(call, op, arg):
    message = error_of(call, kiln.InvalidArgumentError)
    assert message.startswith(f"kiln::{op}: {arg} is a "), message


@pytest.mark.parametrize("kwargs,arg", [
    ({"stride": 0}, "stride"), ({"stride": -1}, "stride"), ({"stride": (1, 0)}, "stride"),
    ({"padding": 1.5}, "padding"), ({"padding": (1, 1.0)}, "padding"), ({"padding": -1}, "padding"),
    ({"padding": "same"}, "padding"), ({"dilation": 0}, "dilation"),
    ({"stride": (1, 1, 1)}, "stride"),
    ({"stride": True}, "stride"), ({"groups": 1.0}, "groups"),
])
def test_conv2d_bad_arguments(kwargs, arg):
    message = error_of(lambda: kiln.conv2d(torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3),
                                           **kwargs), kiln.InvalidArgumentError)
    assert message.startswith(f"kiln::conv2d: {arg} "), message


def test_conv2d_numpy_ints_are_ints():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(kiln.conv2d(x, w, stride=np.int64(2), padding=(np.int32(1), 1)),
                               F.conv2d(x, w, stride=2, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [5, -1])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_kv_len_out_of_range_is_an_error_on_cpu(value, dtype):
    q = torch.randn(2, 1, 1, 8, dtype=BF)
    k = torch.randn(2, 1, 4, 8, dtype=BF)
    kv_len = torch.tensor([2, value], dtype=dtype)
    message = error_of(lambda: kiln.attention(q, k, k, kv_len=kv_len), kiln.InvalidArgumentError)
    assert message == f"kiln::attention: kv_len[1] = {value}, expected 0 <= kv_len <= Lk = 4"


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_quantize_scale_must_be_finite_and_positive(scale, as_tensor):
    given = torch.tensor([scale]) if as_tensor else scale
    message = error_of(lambda: kiln.quantize_fp8(torch.randn(4, 8), scale=given),
                       kiln.InvalidArgumentError)
    assert message.startswith("kiln::quantize_fp8: scale ") and "finite value > 0" in message
    x = np.random.randn(4, 8).astype(np.float32)
    given = np.array([scale], np.float32) if as_tensor else scale
    message = error_of(lambda: kiln.quantize_fp8(x, scale=given), kiln.InvalidArgumentError)
    assert message.startswith("kiln::quantize_fp8: scale ")


def test_select_path_arguments():
    w = fp8_weight(4, 64)
    for m in (-1, 1.5, "1", True):
        message = error_of(lambda: kiln.select_path(m, w), kiln.InvalidArgumentError)
        assert message.startswith("kiln::select_path: m "), message
    assert kiln.select_path(0, w) == "reference"
    message = error_of(lambda: kiln.select_path(1, w, a_dtype="f64"))
    assert message.startswith("kiln::select_path: a_dtype is f64")


@pytest.mark.parametrize("path", ["gemv", "gemm", "fp8_native", "reference", "auto"])
def test_any_path_runs_the_reference_on_cpu(path):
    """As the docstring says: CPU arrays run the reference whatever the path."""
    a = torch.randn(20, 64, dtype=BF)  # M = 20: more than gemv takes on CUDA
    w = fp8_weight(8, 64)
    scale = torch.rand(8) + 0.5
    torch.testing.assert_close(kiln.matmul(a, w, w_scale=scale, path=path),
                               kiln.matmul(a, w, w_scale=scale), rtol=0, atol=0)
    message = error_of(lambda: kiln.matmul(a, w, path="fast"), kiln.InvalidArgumentError)
    assert message.startswith("kiln::matmul: path is 'fast'")


@pytest.mark.parametrize("out_dtype", ["f64", torch.float64, torch.int8])
def test_out_dtype_named(out_dtype):
    message = error_of(lambda: kiln.rope_flux(torch.randn(1, 2, 2, 8), out_dtype=out_dtype),
                       kiln.InvalidArgumentError)
    assert message.startswith("kiln::rope_flux: out_dtype is "), message


@pytest.mark.parametrize("call,op,message", [
    (lambda: kiln.group_norm(torch.randn(1, 4, 2, 2), 2.5), "group_norm",
     "num_groups is 2.5, expected an int"),
    (lambda: kiln.group_norm(torch.randn(1, 4, 2, 2), "2"), "group_norm", "num_groups is '2'"),
    (lambda: kiln.group_norm(torch.randn(1, 4, 2, 2), 3), "group_norm", "num_groups = 3"),
    (lambda: kiln.rms_norm(torch.randn(2, 8), eps="a"), "rms_norm", "eps is 'a'"),
    (lambda: kiln.layer_norm(torch.randn(2, 8), eps=math.nan), "layer_norm", "eps = nan"),
    (lambda: kiln.rms_norm(torch.randn(2, 8), quantize="e4m3fn", out_dtype="f32"), "rms_norm",
     "out_dtype is f32 with quantize='e4m3fn'"),
    (lambda: kiln.gelu_tanh(torch.tensor(1.0)), "gelu_tanh", "x is a scalar"),
    (lambda: kiln.glu(torch.randn(2, 8), activation=["silu"]), "glu", "activation is ['silu']"),
    (lambda: kiln.glu(torch.randn(2, 7)), "glu", "x has shape [2, 7], expected [..., 2F]"),
    (lambda: kiln.rope(torch.randn(1, 2, 2, 8), torch.tensor([[0, 1]]), theta="x"), "rope",
     "theta is 'x'"),
    (lambda: kiln.rope(torch.randn(1, 2, 2, 8), torch.tensor([[0, 1]]), theta=0.0), "rope",
     "theta = 0.0, expected a finite value > 0"),
    (lambda: kiln.rope(torch.randn(1, 2, 2, 8), torch.tensor([[0, 1]]), theta=1e4, style="gptj"),
     "rope", "style is 'gptj'"),
    (lambda: kiln.rope(torch.randn(1, 2, 2, 8), torch.tensor([[0, 1]]), theta=1e4,
                       cache=torch.zeros(1, 2, 4, 8), out_dtype="f32"), "rope_cache",
     "out_dtype is given with a cache"),
    (lambda: kiln.rope(np.zeros((1, 2, 2, 8)), np.zeros((1, 2), np.int64), theta=1e4), "rope",
     "x has dtype float64, expected float32 or float16"),
    (lambda: kiln.rope_flux(np.zeros((1, 2, 2, 8), np.float32), out=np.broadcast_to(
        np.zeros((1, 1, 2, 8), np.float32), (1, 2, 2, 8))), "rope_flux",
     "out is a read-only numpy array"),
    (lambda: kiln.rope(np.zeros((1, 2, 2, 8), np.float32), np.zeros((1, 2), np.int64), theta=1e4,
                       cache=np.broadcast_to(np.zeros((1, 2, 4, 8), np.float32), (1, 2, 4, 8))
                       .view()), "rope_cache", "cache is a read-only numpy array"),
    (lambda: kiln.matmul(torch.randn(2, 3, 8, dtype=BF), torch.randn(4, 8, dtype=BF),
                         gate=torch.randn(3, 4)), "matmul",
     "gate has shape [3, 4], expected [N] or [B, N] with B = 2"),
    (lambda: kiln.matmul(torch.randn(2, 8, dtype=BF), torch.randn(4, 8, dtype=BF),
                         residual=torch.randn(2, 4, dtype=torch.float64)), "matmul",
     "residual has dtype float64, which no kiln op takes"),
])
def test_new_ops_bad_arguments(call, op, message):
    got = error_of(call, kiln.InvalidArgumentError)
    assert got.startswith(f"kiln::{op}: "), got
    assert message in got, got


# ---- no driver -----------------------------------------------------------------------------------


@pytest.mark.skipif(kiln.cuda_available(), reason="needs a machine without a CUDA device")
def test_no_driver_is_not_an_old_driver():
    import ctypes.util

    reason = kiln.cuda_unavailable_reason()
    assert "insufficient" not in reason.lower(), reason
    if ctypes.util.find_library("cuda") is None:
        assert reason.startswith("no NVIDIA driver"), reason
