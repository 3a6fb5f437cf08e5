"""kiln.rms_norm / layer_norm / group_norm against torch's own functions in f64, on every backend,
for torch and numpy inputs; the fp8 outputs against kiln.quantize_fp8 of the f32 result.

Errors are ||got - ref|| / ||ref|| against torch.nn.functional computed in f64 from the same
(already rounded) inputs, so the only error kiln may add is its f32 math and the final rounding
to the output dtype: the bound is twice that dtype's unit roundoff plus an f32 allowance.
The quantized outputs must be bit for bit kiln.quantize_fp8(y, fmt, "row") of the f32 y that the
same op returns with out_dtype=f32 on the same device.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kiln
from conftest import CUDA_REASON, HAS_CUDA
from row_ops import DTYPES, FP8_ROUNDOFF, check_quantized
from row_ops import check_close as check_rows

F32_MATH = 1e-5  # rsqrt, mean and variance in f32 over up to a few thousand elements


def check_close(got, want, out_dtype, extra=0.0):
    """Within the roundoff of out_dtype plus this family's f32 math (row_ops.check_close)."""
    check_rows(got, want, out_dtype, F32_MATH, extra)


def rms_reference(x, weight, eps):
    w = None if weight is None else weight.double().cpu()
    return F.rms_norm(x.double().cpu(), (x.shape[-1],), w, eps)


def layer_reference(x, weight, bias, shift, scale, eps):
    x64 = x.double().cpu()
    w = None if weight is None else weight.double().cpu()
    b = None if bias is None else bias.double().cpu()
    y = F.layer_norm(x64, (x.shape[-1],), w, b, eps)

    def per_row(v):  # [B, D] -> broadcast over the dims between; [D] as is
        v = v.double().cpu()
        return v.reshape(v.shape[0], *([1] * (x.dim() - 2)), v.shape[1]) if v.dim() == 2 else v

    if scale is not None:
        y = y * (1 + per_row(scale))
    if shift is not None:
        y = y + per_row(shift)
    return y


# ---- rms_norm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("with_weight", [False, True], ids=["plain", "weight"])
@pytest.mark.parametrize("out_dtype", [None, *DTYPES], ids=lambda d: f"out={d}")
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_rms_norm_dtypes(device, x_dtype, out_dtype, with_weight):
    x = torch.randn(3, 5, 96, device=device).to(x_dtype)
    w = (1 + 0.5 * torch.randn(96, device=device)).to(torch.bfloat16) if with_weight else None
    got = kiln.rms_norm(x, w, eps=1e-6, out_dtype=out_dtype)
    assert got.device == x.device and got.is_contiguous()
    check_close(got, rms_reference(x, w, 1e-6), out_dtype or x_dtype)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2, 9, 100), (5, 129), (2, 3, 4, 64),
                                   (4, 4096), (3, 1536)])
def test_rms_norm_shapes(device, shape):
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    w = torch.randn(shape[-1], device=device)
    check_close(kiln.rms_norm(x, w), rms_reference(x, w, 1e-6), torch.bfloat16)


def test_rms_norm_strided_rows(device):
    """Rows sliced out of a wider tensor, a step along L, and swapped leading dims."""
    d = 64
    big = torch.randn(3, 10, d + 32, device=device)
    w = torch.randn(d, device=device)
    views = [big[:, :, 16:16 + d], big[:, ::3, :d], big[:, :, :d].transpose(0, 1)]
    for x in views:
        assert x.stride(-1) == 1 and not x.is_contiguous()
        got = kiln.rms_norm(x, w, out_dtype=torch.float32)
        check_close(got, rms_reference(x, w, 1e-6), torch.float32)
        assert torch.equal(got, kiln.rms_norm(x.contiguous(), w, out_dtype=torch.float32))


def test_rms_norm_eps_is_used(device):
    x = torch.randn(4, 32, device=device) * 1e-2
    got = kiln.rms_norm(x, eps=1.0)
    check_close(got, rms_reference(x, None, 1.0), torch.float32)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_rms_norm_quantized(device, fmt, x_dtype):
    x = (torch.randn(2, 7, 192, device=device) * 3).to(x_dtype)
    x[0, 3] = 0  # an all-zero row gets scale 1
    w = torch.randn(192, device=device).to(torch.bfloat16)
    q, scale, _ = check_quantized(kiln.rms_norm, fmt, x, w)
    assert scale[3].item() == 1.0
    # The codes dequantize to the reference within fp8's rounding.
    deq = q.float() * scale.reshape(2, 7, 1)
    check_close(deq, rms_reference(x, w, 1e-6), torch.float32, extra=FP8_ROUNDOFF[fmt])


# ---- layer_norm -------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("mod", ["none", "shift", "scale", "both", "vector"])
def test_layer_norm_affine_and_modulation(device, affine, mod):
    b_, l_, d = 2, 9, 80
    x = torch.randn(b_, l_, d, device=device, dtype=torch.bfloat16)
    weight = torch.randn(d, device=device) if affine in ("weight", "both") else None
    bias = torch.randn(d, device=device) if affine in ("bias", "both") else None
    # Modulation as Flux makes it: chunks of one [B, 6 D] linear output (strided rows).
    emb = torch.randn(b_, 6 * d, device=device, dtype=torch.bfloat16) * 0.5
    shift_b, scale_b = emb[:, :d], emb[:, d:2 * d]
    shift = {"shift": shift_b, "both": shift_b, "vector": shift_b[0].contiguous()}.get(mod)
    scale = {"scale": scale_b, "both": scale_b, "vector": scale_b[1].contiguous()}.get(mod)
    got = kiln.layer_norm(x, weight, bias, shift=shift, scale=scale, eps=1e-6)
    check_close(got, layer_reference(x, weight, bias, shift, scale, 1e-6), torch.bfloat16)


@pytest.mark.parametrize("out_dtype", [None, *DTYPES], ids=lambda d: f"out={d}")
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_layer_norm_dtypes(device, x_dtype, out_dtype):
    x = torch.randn(3, 4, 48, device=device).to(x_dtype)
    shift = torch.randn(3, 48, device=device).to(x_dtype)
    scale = torch.randn(3, 48, device=device).to(x_dtype)
    got = kiln.layer_norm(x, shift=shift, scale=scale, out_dtype=out_dtype)
    check_close(got, layer_reference(x, None, None, shift, scale, 1e-6), out_dtype or x_dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 5), (3, 7, 3072), (2, 5, 4096), (4, 33),
                                   (2, 2, 3, 129)])
def test_layer_norm_shapes(device, shape):
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    shift = torch.randn(shape[0], shape[-1], device=device, dtype=torch.bfloat16)
    scale = torch.randn(shape[-1], device=device, dtype=torch.bfloat16)
    got = kiln.layer_norm(x, shift=shift, scale=scale)
    check_close(got, layer_reference(x, None, None, shift, scale, 1e-6), torch.bfloat16)


def test_layer_norm_large_mean(device):
    """Variance taken around the mean: an offset of 100 costs only f32 rounding of x - mean."""
    x = torch.randn(4, 256, device=device) + 100
    check_close(kiln.layer_norm(x), layer_reference(x, None, None, None, None, 1e-6),
                torch.float32)


def test_layer_norm_strided_rows(device):
    big = torch.randn(2, 12, 200, device=device, dtype=torch.bfloat16)
    x = big[:, 1::2, 8:136]  # [2, 6, 128], rows 2 * 200 apart, L step 400
    shift = torch.randn(2, 128, device=device, dtype=torch.bfloat16)
    got = kiln.layer_norm(x, shift=shift)
    check_close(got, layer_reference(x, None, None, shift, None, 1e-6), torch.bfloat16)
    assert torch.equal(got, kiln.layer_norm(x.contiguous(), shift=shift))


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_layer_norm_quantized(device, fmt):
    b_, l_, d = 2, 17, 3072
    x = torch.randn(b_, l_, d, device=device, dtype=torch.bfloat16)
    emb = torch.randn(b_, 3 * d, device=device, dtype=torch.bfloat16)
    shift, scale = emb[:, :d], emb[:, d:2 * d]
    q, q_scale, _ = check_quantized(kiln.layer_norm, fmt, x, shift=shift, scale=scale)
    deq = q.float() * q_scale.reshape(b_, l_, 1)
    check_close(deq, layer_reference(x, None, None, shift, scale, 1e-6), torch.float32,
                extra=FP8_ROUNDOFF[fmt])


def test_quantized_matmul_pair(device):
    """(q, q_scale) feeds kiln.matmul as fp8 a with a_scale."""
    x = torch.randn(5, 128, device=device, dtype=torch.bfloat16)
    w_q, w_scale = kiln.quantize_fp8(torch.randn(64, 128, device=device), "e4m3fn", "row")
    q, q_scale = kiln.layer_norm(x, quantize="e4m3fn")
    out = kiln.matmul(q, w_q, a_scale=q_scale, w_scale=w_scale, out_dtype=torch.float32)
    want = (q.double() * q_scale.double()[:, None]) @ (w_q.double() * w_scale.double()[:, None]).T
    err = ((out.double() - want).norm() / want.norm()).item()
    assert err < 3e-3


# ---- group_norm -------------------------------------------------------------------------------


def group_reference(x, groups, weight, bias, eps, silu):
    w = None if weight is None else weight.double().cpu()
    b = None if bias is None else bias.double().cpu()
    y = F.group_norm(x.double().cpu(), groups, w, b, eps)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_group_norm(device, x_dtype, layout, silu):
    x = torch.randn(2, 64, 9, 11, device=device).to(x_dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, device=device).to(x_dtype)
    b = torch.randn(64, device=device).to(x_dtype)
    got = kiln.group_norm(x, 32, w, b, eps=1e-6, silu=silu)
    assert got.stride() == x.stride(), "output in x's memory format"
    check_close(got, group_reference(x, 32, w, b, 1e-6, silu), x_dtype)


@pytest.mark.parametrize("shape, groups", [((1, 3, 1, 1), 1), ((3, 6, 5, 7), 3),
                                           ((1, 512, 16, 16), 32), ((2, 128, 33, 17), 32),
                                           ((1, 256, 64, 64), 32), ((2, 4, 3, 2), 4)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_shapes(device, shape, groups, layout):
    x = torch.randn(shape, device=device, dtype=torch.bfloat16) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    got = kiln.group_norm(x, groups, silu=True, out_dtype=torch.float32)
    check_close(got, group_reference(x, groups, None, None, 1e-6, True), torch.float32)


def test_group_norm_large_mean(device):
    """The shifted sums keep an offset of 100 from costing accuracy."""
    x = torch.randn(1, 32, 40, 40, device=device) + 100
    check_close(kiln.group_norm(x, 8), group_reference(x, 8, None, None, 1e-6, False),
                torch.float32)


def test_group_norm_eps_and_weight_only(device):
    x = torch.randn(1, 8, 4, 4, device=device) * 1e-2
    w = torch.randn(8, device=device)
    check_close(kiln.group_norm(x, 2, w, eps=1.0),
                group_reference(x, 2, w, None, 1.0, False), torch.float32)


# ---- zero sizes, numpy, torch integration -----------------------------------------------------


def test_zero_sizes(device):
    for shape in [(0, 64), (3, 0), (2, 0, 5)]:
        x = torch.randn(shape, device=device, dtype=torch.bfloat16)
        w = torch.randn(shape[-1], device=device)
        assert kiln.rms_norm(x, w).shape == shape
        assert kiln.layer_norm(x).shape == shape
        q, scale = kiln.rms_norm(x, quantize="e4m3fn")
        assert q.shape == shape and scale.shape == (math.prod(shape[:-1]),)
        assert torch.equal(scale, torch.ones_like(scale))  # no uninitialized scale
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3)]:
        x = torch.randn(shape, device=device)
        assert kiln.group_norm(x, 2).shape == shape


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy(dtype):
    x = np.random.standard_normal((3, 5, 64)).astype(dtype)
    w = np.random.standard_normal(64).astype(np.float32)
    got = kiln.rms_norm(x, w)
    assert isinstance(got, np.ndarray) and got.dtype == dtype
    assert np.array_equal(got, kiln.rms_norm(torch.from_numpy(x), torch.from_numpy(w)).numpy())
    q, scale = kiln.layer_norm(x, quantize="e4m3fn")
    assert q.dtype == np.uint8 and scale.shape == (15,)
    want_q, want_scale = kiln.layer_norm(torch.from_numpy(x), quantize="e4m3fn")
    assert np.array_equal(q, want_q.view(torch.uint8).numpy())
    assert np.array_equal(scale, want_scale.numpy())
    img = np.random.standard_normal((1, 8, 5, 6)).astype(dtype)
    nhwc = np.ascontiguousarray(img.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for x4 in (img, nhwc):
        got = kiln.group_norm(x4, 4, silu=True)
        assert got.strides == x4.strides
        want = kiln.group_norm(torch.from_numpy(np.ascontiguousarray(x4)), 4, silu=True).numpy()
        assert np.array_equal(got, want)


def test_torch_compile_fullgraph():
    def block(x, shift, scale, w):
        h, h_scale = kiln.layer_norm(x, shift=shift, scale=scale, quantize="e4m3fn")
        r = kiln.rms_norm(x, w, out_dtype=torch.float32)
        g = kiln.group_norm(x.reshape(2, 8, 4, 4), 4, silu=True)
        return h.float() * h_scale[:, None], r, g

    x = torch.randn(2, 128, dtype=torch.bfloat16)
    shift, scale = torch.randn(2, 128), torch.randn(2, 128)
    w = torch.randn(128)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, shift, scale, w), block(x, shift, scale, w)):
        assert torch.equal(got, want)


def test_opcheck():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    w = torch.randn(64)
    mod = torch.randn(2, 64)
    torch.library.opcheck(torch.ops.kiln.rms_norm.default, (x, w, 1e-6, torch.float32))
    torch.library.opcheck(torch.ops.kiln.layer_norm.default,
                          (x, w, w, mod, mod, 1e-6, None))
    torch.library.opcheck(torch.ops.kiln.group_norm.default,
                          (x.reshape(2, 6, 4, 8), 3, None, None, 1e-6, True, None))
    # fp8 outputs: torch has no CPU arithmetic to compare fp8 with, as in test_matmul.
    fp8_utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.kiln.rms_norm_fp8.default, (x, w, 1e-6, torch.float8_e4m3fn),
                          test_utils=fp8_utils)
    torch.library.opcheck(torch.ops.kiln.layer_norm_fp8.default,
                          (x, None, None, mod, mod, 1e-6, torch.float8_e5m2),
                          test_utils=fp8_utils)


def test_errors_name_op_and_argument():
    x = torch.randn(2, 3, 64)
    invalid = kiln.InvalidArgumentError
    with pytest.raises(invalid, match=r"kiln::rms_norm: weight has shape \[63\].*\[64\]") as info:
        kiln.rms_norm(x, torch.randn(63))
    assert info.value.code == "invalid_argument" and isinstance(info.value, ValueError)
    with pytest.raises(invalid, match=r"kiln::rms_norm: x has stride 2 along D"):
        kiln.rms_norm(torch.randn(3, 128)[:, ::2])
    with pytest.raises(invalid, match=r"kiln::layer_norm: out_dtype is .* with quantize"):
        kiln.layer_norm(x, out_dtype="bf16", quantize="e4m3fn")
    with pytest.raises(invalid, match=r"kiln::layer_norm: quantize is 'int8'"):
        kiln.layer_norm(x, quantize="int8")
    with pytest.raises(invalid, match=r"kiln::layer_norm: shift has shape \[3, 64\].*\[2, 64\]"):
        kiln.layer_norm(x, shift=torch.randn(3, 64))
    with pytest.raises(invalid, match=r"kiln::layer_norm: scale has dtype bf16.*shift"):
        kiln.layer_norm(x, shift=torch.randn(2, 64), scale=torch.randn(2, 64).bfloat16())
    with pytest.raises(invalid, match=r"kiln::rms_norm: eps = -1"):
        kiln.rms_norm(x, eps=-1.0)
    with pytest.raises(invalid, match=r"kiln::group_norm: num_groups = 3.*C = 64"):
        kiln.group_norm(torch.randn(1, 64, 2, 2), 3)
    with pytest.raises(invalid, match=r"kiln::group_norm: x has strides .*contiguous NCHW"):
        kiln.group_norm(torch.randn(1, 8, 4, 4).transpose(2, 3), 2)
    with pytest.raises(invalid, match=r"kiln::group_norm: x has 3 dims"):
        kiln.group_norm(torch.randn(8, 4, 4), 2)
    with pytest.raises(invalid, match=r"kiln::rms_norm: x is a builtins.list"):
        kiln.rms_norm([[1.0]])


# ---- GPU: CUDA kernels against the CPU reference ----------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("d", [1, 7, 96, 1000, 3072, 4096, 12288])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_cuda_matches_cpu_reference(d, x_dtype):
    x = torch.randn(3, 37, d).to(x_dtype)
    w = torch.randn(d).to(torch.bfloat16)
    shift, scale = torch.randn(3, d), torch.randn(3, d)
    for op, args, kwargs in [(kiln.rms_norm, (x, w), {}),
                             (kiln.layer_norm, (x, None, w), {"shift": shift, "scale": scale})]:
        cpu = op(*args, out_dtype=torch.float32, **kwargs)
        cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        cuda_kwargs = {k: v.cuda() for k, v in kwargs.items()}
        gpu = op(*cuda_args, out_dtype=torch.float32, **cuda_kwargs)
        check_close(gpu, cpu.double(), torch.float32)
        check_quantized(op, "e4m3fn", *cuda_args, **cuda_kwargs)
        q_gpu, s_gpu = op(*cuda_args, quantize="e4m3fn", **cuda_kwargs)
        q_cpu, s_cpu = op(*args, quantize="e4m3fn", **kwargs)
        torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-5, atol=0)
        deq = lambda q, s: q.float().cpu() * s.cpu().reshape(*q.shape[:-1], 1)  # noqa: E731
        check_close(deq(q_gpu, s_gpu), deq(q_cpu, s_cpu).double(), torch.float32,
                    extra=FP8_ROUNDOFF["e4m3fn"])


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("shape", [(1, 512, 128, 128), (1, 256, 64, 96), (2, 128, 33, 17),
                                   (1, 96, 7, 5)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_cuda_group_norm_matches_cpu_reference(shape, layout, x_dtype):
    x = (torch.randn(shape) * 3 + 1).to(x_dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1]).to(x_dtype), torch.randn(shape[1]).to(x_dtype)
    cpu = kiln.group_norm(x, 32 if shape[1] % 32 == 0 else 4, w, b, silu=True,
                          out_dtype=torch.float32)
    gpu = kiln.group_norm(x.cuda(), 32 if shape[1] % 32 == 0 else 4, w.cuda(), b.cuda(),
                          silu=True, out_dtype=torch.float32)
    assert gpu.stride() == x.stride()
    check_close(gpu, cpu.double(), torch.float32)
    again = kiln.group_norm(x.cuda(), 32 if shape[1] % 32 == 0 else 4, w.cuda(), b.cuda(),
                            silu=True, out_dtype=torch.float32)
    assert torch.equal(gpu, again), "group_norm is deterministic"


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_cuda_unaligned_rows_take_the_scalar_path():
    storage = torch.randn(5 * 130 + 1, device="cuda", dtype=torch.bfloat16)
    x = storage[1:].reshape(5, 130)[:, :128]  # rows not 16-byte aligned
    got = kiln.rms_norm(x, out_dtype=torch.float32)
    check_close(got, rms_reference(x, None, 1e-6), torch.float32)
