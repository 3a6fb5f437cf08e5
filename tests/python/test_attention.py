"""kiln.attention against an f64 reference, on every backend, for torch and numpy inputs.

The bound follows FlashAttention's tests: kiln's error against the f64 reference may be at most
3x the error of the same math done the way a low-precision kernel must (q rounded to k's dtype,
f32 scores, probabilities rounded to k's dtype before P V, the output rounded to q's dtype),
plus a small floor.
"""

import math

import numpy as np
import pytest
import torch

import kiln

from conftest import CUDA_REASON, HAS_CUDA

FACTOR = 3.0


def visible(lq, lk, causal, kv_len, n, device):
    """bool [N, 1, Lq, Lk]: key j visible to query i (kv_len and the bottom-right diagonal)."""
    j = torch.arange(lk, device=device)
    i = torch.arange(lq, device=device)
    keys = kv_len.to(device).long().clamp(0, lk) if kv_len is not None else torch.full(
        (n,), lk, device=device)
    vis = j[None, None, :] < keys[:, None, None]  # [N, 1, Lk]
    vis = vis.expand(n, lq, lk)
    if causal:
        vis = vis & (j[None, None, :] <= i[None, :, None] + (keys - lq)[:, None, None])
    return vis[:, None]


def reference(q, k, v, *, causal=False, scale=None, mask=None, kv_len=None, softcap=None,
              low_precision=False):
    """out [N, Hq, Lq, Dv] and lse, in f64 (or with the low-precision kernel's roundings)."""
    n, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    work = torch.float32 if low_precision else torch.float64
    qq = q.to(k.dtype) if low_precision else q
    qq, kk, vv = (t.cpu().to(work) for t in (qq, k, v))
    kk = kk.repeat_interleave(hq // hkv, dim=1)
    vv = vv.repeat_interleave(hq // hkv, dim=1)
    s = scale * qq @ kk.transpose(-1, -2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        m = mask.cpu()
        s = s + (torch.zeros(m.shape).masked_fill(~m, -math.inf) if m.dtype == torch.bool else
                 m.to(work))
    s = s.masked_fill(~visible(lq, lk, causal, kv_len, n, "cpu"), -math.inf)
    row_max = s.amax(-1, keepdim=True)
    safe_max = torch.where(row_max == -math.inf, torch.zeros_like(row_max), row_max)
    p = torch.exp(s - safe_max)
    total = p.sum(-1, keepdim=True)
    if low_precision:
        p = p.to(k.dtype).to(work)
    out = torch.where(total > 0, (p @ vv) / total, torch.zeros((), dtype=work))
    lse = torch.where(total > 0, safe_max + total.log(), torch.full((), -math.inf, dtype=work))
    if low_precision:
        out = out.to(q.dtype if q.dtype != torch.float32 else torch.float32).to(work)
    return out.double(), lse[..., 0].double()


def check(got, q, k, v, **kw):
    want, _ = reference(q, k, v, **kw)
    low, _ = reference(q, k, v, low_precision=True, **kw)
    got64 = got.detach().cpu().double()
    assert not got64.isnan().any(), "output holds NaN"
    assert want.abs().sum() > 0, "reference is all zeros: the test would pass vacuously"
    err = (got64 - want).abs()
    low_err = (low - want).abs()
    floor = 1e-5 * want.pow(2).mean().sqrt().item()
    assert err.max() <= FACTOR * low_err.max() + floor, (err.max(), low_err.max())
    assert err.mean() <= FACTOR * low_err.mean() + floor, (err.mean(), low_err.mean())


def randn(*shape, dtype, device):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk,hq,hkv", [(7, 33, 4, 2), (1, 100, 8, 1), (65, 65, 2, 2),
                                          (70, 20, 4, 4)])
def test_shapes_causal_gqa(device, dtype, causal, lq, lk, hq, hkv):
    q = randn(2, hq, lq, 64, dtype=dtype, device=device)
    k = randn(2, hkv, lk, 64, dtype=dtype, device=device)
    v = randn(2, hkv, lk, 64, dtype=dtype, device=device)
    out = kiln.attention(q, k, v, causal=causal)
    assert out.shape == (2, hq, lq, 64) and out.dtype == dtype and out.is_contiguous()
    check(out, q, k, v, causal=causal)


@pytest.mark.parametrize("d,dv", [(40, 40), (72, 72), (96, 96), (128, 64), (256, 256)])
def test_head_dims(device, d, dv):
    q = randn(1, 2, 17, d, dtype=torch.bfloat16, device=device)
    k = randn(1, 2, 40, d, dtype=torch.bfloat16, device=device)
    v = randn(1, 2, 40, dv, dtype=torch.bfloat16, device=device)
    check(kiln.attention(q, k, v), q, k, v)


def test_masks_kv_len_softcap_lse(device):
    n, hq, hkv, lq, lk, d = 3, 4, 2, 9, 50, 64
    q = randn(n, hq, lq, d, dtype=torch.float16, device=device) * 3
    k = randn(n, hkv, lk, d, dtype=torch.float16, device=device)
    v = randn(n, hkv, lk, d, dtype=torch.float16, device=device)
    bool_mask = torch.rand(lq, lk, device=device) > 0.3
    bool_mask[2] = False  # a fully masked row
    kv_len = torch.tensor([0, 17, 50], dtype=torch.int32, device=device)
    for mask in (bool_mask, torch.randn(n, 1, lq, lk, device=device)):
        out, lse = kiln.attention(q, k, v, mask=mask, kv_len=kv_len, softcap=20.0,
                                  return_lse=True)
        check(out, q, k, v, mask=mask, kv_len=kv_len, softcap=20.0)
        _, want_lse = reference(q, k, v, mask=mask, kv_len=kv_len, softcap=20.0)
        got = lse.cpu().double()
        assert torch.equal(got.isinf(), want_lse.isinf())
        finite = ~want_lse.isinf()
        assert (got[finite] - want_lse[finite]).abs().max() < 2e-3
        assert (out[0] == 0).all(), "kv_len 0: zeros, never NaN"


def test_strided_views_and_f32_q(device):
    qkv = randn(2, 33, 3, 4, 64, dtype=torch.bfloat16, device=device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [N, H, L, D] views
    check(kiln.attention(q, k, v, causal=True), q, k, v, causal=True)
    cache_k = randn(2, 4, 80, 64, dtype=torch.bfloat16, device=device)
    cache_v = randn(2, 4, 80, 64, dtype=torch.bfloat16, device=device)
    q32 = torch.randn(2, 4, 1, 64, device=device)
    out = kiln.attention(q32, cache_k[:, :, :50], cache_v[:, :, :50])
    assert out.dtype == torch.float32
    check(out, q32, cache_k[:, :, :50], cache_v[:, :, :50])


@pytest.mark.parametrize("lq,lk,d", [(1, 300, 128), (70, 70, 64), (129, 200, 128), (33, 50, 96)])
def test_out_token_major_and_row_range(device, lq, lk, d):
    """out written as a [N, Lq, Hq, Dv] buffer seen transposed (what the output projection
    reads) and as a row range of a longer poisoned buffer: the values of the contiguous call,
    bit for bit, nothing written outside the view, the given out returned; decode (split-KV),
    the Hopper prefill (D 64 and 128) and the mma.sync prefill (D 96) on CUDA."""
    n, hq, hkv = 2, 4, 2
    q = randn(n, hq, lq, d, dtype=torch.bfloat16, device=device)
    k = randn(n, hkv, lk, d, dtype=torch.bfloat16, device=device)
    v = randn(n, hkv, lk, d, dtype=torch.bfloat16, device=device)
    want, want_lse = kiln.attention(q, k, v, causal=lq > 1, return_lse=True)
    check(want, q, k, v, causal=lq > 1)
    flat = torch.full((n, lq, hq * d), float("nan"), dtype=torch.bfloat16, device=device)
    out = flat.view(n, lq, hq, d).transpose(1, 2)
    got, lse = kiln.attention(q, k, v, causal=lq > 1, return_lse=True, out=out)
    assert got is out
    assert torch.equal(flat, want.transpose(1, 2).reshape(n, lq, hq * d))
    assert torch.equal(lse, want_lse)
    pad = 3
    buf = torch.full((n, hq, lq + 2 * pad, d), -7.0, dtype=torch.bfloat16, device=device)
    kiln.attention(q, k, v, causal=lq > 1, out=buf[:, :, pad:pad + lq])
    assert torch.equal(buf[:, :, pad:pad + lq], want)
    assert (buf[:, :, :pad] == -7).all() and (buf[:, :, pad + lq:] == -7).all()


def test_out_f32_numpy_and_compile(device):
    """out's dtype is the output's (f32 here for bf16 inputs); numpy takes out too; the out
    variant traces under torch.compile."""
    q = randn(1, 2, 9, 64, dtype=torch.bfloat16, device=device)
    k = randn(1, 2, 12, 64, dtype=torch.bfloat16, device=device)
    v = randn(1, 2, 12, 64, dtype=torch.bfloat16, device=device)
    out = torch.full((1, 9, 2, 64), float("nan"), device=device).transpose(1, 2)
    check(kiln.attention(q, k, v, out=out), q, k, v)

    def f(q, k, v):
        flat = q.new_empty(1, 9, 2 * 64)
        kiln.attention(q, k, v, out=flat.view(1, 9, 2, 64).transpose(1, 2))
        return flat * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    if device == "cpu":
        qn, kn, vn = (t.float().numpy().astype(np.float16) for t in (q, k, v))
        outn = np.full((1, 9, 2, 64), np.nan, dtype=np.float16).transpose(0, 2, 1, 3)
        assert kiln.attention(qn, kn, vn, out=outn) is outn
        np.testing.assert_array_equal(outn, kiln.attention(qn, kn, vn))


def test_out_errors():
    q = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(kiln.InvalidArgumentError, match=r"out has shape \[1, 2, 4, 32\], expected "
                                                        r"\[1, 2, 4, 64\]"):
        kiln.attention(q, q, q, out=torch.empty(1, 2, 4, 32, dtype=torch.bfloat16))
    with pytest.raises(kiln.InvalidArgumentError, match="last dim contiguous"):
        kiln.attention(q, q, q, out=torch.empty(1, 2, 4, 128, dtype=torch.bfloat16)[..., ::2])
    with pytest.raises(kiln.InvalidArgumentError, match="rows that do not overlap"):
        kiln.attention(q, q, q, out=torch.empty(1, 2, 1, 64, dtype=torch.bfloat16).expand(
            1, 2, 4, 64))
    with pytest.raises(kiln.InvalidArgumentError, match="out overlaps q"):
        kiln.attention(q, torch.zeros_like(q), torch.zeros_like(q), out=q)
    with pytest.raises(kiln.InvalidArgumentError, match="out is a numpy"):
        kiln.attention(q, q, q, out=np.empty((1, 2, 4, 64), dtype=np.float32))


def test_large_logits(device):
    q = randn(1, 2, 40, 64, dtype=torch.bfloat16, device=device) * 4
    k = randn(1, 2, 40, 64, dtype=torch.bfloat16, device=device) * 4
    v = randn(1, 2, 40, 64, dtype=torch.bfloat16, device=device)
    check(kiln.attention(q, k, v, scale=1.0), q, k, v, scale=1.0)  # |s| up to ~500


def test_numpy_f16():
    rng = np.random.default_rng()
    q = rng.standard_normal((1, 2, 5, 32)).astype(np.float16)
    k = rng.standard_normal((1, 2, 9, 32)).astype(np.float16)
    v = rng.standard_normal((1, 2, 9, 32)).astype(np.float16)
    out = kiln.attention(q, k, v)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16
    check(torch.from_numpy(out), torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v))


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_matches_sdpa_cuda():
    q = randn(2, 8, 100, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(2, 8, 100, 128, dtype=torch.bfloat16, device="cuda")
    v = randn(2, 8, 100, 128, dtype=torch.bfloat16, device="cuda")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = kiln.attention(q, k, v, causal=True)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_torch_compile_fake(device):
    q = randn(1, 2, 8, 64, dtype=torch.bfloat16, device=device)
    k = randn(1, 2, 8, 64, dtype=torch.bfloat16, device=device)
    v = randn(1, 2, 8, 64, dtype=torch.bfloat16, device=device)

    def f(q, k, v):
        return kiln.attention(q, k, v, causal=True) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_errors():
    q = torch.zeros(1, 3, 4, 64, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(kiln.InvalidArgumentError, match="divisor"):
        kiln.attention(q, k, k)
    with pytest.raises(kiln.InvalidArgumentError, match="head dim 12"):
        kiln.attention(q[..., :12], q[..., :12], q[..., :12])
    with pytest.raises(kiln.InvalidArgumentError, match="4 dims"):
        kiln.attention(q[0], k, k)
    with pytest.raises(kiln.InvalidArgumentError, match="scale = 0"):
        kiln.attention(q, q, q, scale=0.0)
    with pytest.raises(kiln.InvalidArgumentError, match="softcap"):
        kiln.attention(q, q, q, softcap=float("inf"))
