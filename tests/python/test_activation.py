"""kiln.glu / kiln.gelu_tanh against torch (F.silu, F.gelu(approximate="tanh")) in f64, on every
backend, for torch and numpy inputs; the fp8 outputs against kiln.quantize_fp8 of the f32 result.

Errors are ||got - ref|| / ||ref|| against torch in f64 from the same (already rounded) inputs:
twice the output dtype's unit roundoff plus an f32 allowance (exp / tanh in f32). The quantized
outputs must be bit for bit kiln.quantize_fp8(y, fmt, "row") of the f32 y the same op returns
with out_dtype=f32 on the same device.
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

F32_MATH = 2e-6  # expf / tanhf and a product in f32


def check_close(got, want, out_dtype, extra=0.0):
    """Within the roundoff of out_dtype plus this family's f32 math (row_ops.check_close)."""
    check_rows(got, want, out_dtype, F32_MATH, extra)


def act_reference(x, activation):
    x64 = x.double().cpu()
    return F.silu(x64) if activation == "silu" else F.gelu(x64, approximate="tanh")


def glu_reference(x, activation):
    f = x.shape[-1] // 2
    x64 = x.double().cpu()
    return act_reference(x64[..., :f], activation) * x64[..., f:]


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("out_dtype", [None, *DTYPES], ids=lambda d: f"out={d}")
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_glu_dtypes(device, x_dtype, out_dtype, activation):
    x = (torch.randn(3, 7, 2 * 96, device=device) * 3).to(x_dtype)
    got = kiln.glu(x, activation=activation, out_dtype=out_dtype)
    assert got.shape == (3, 7, 96) and got.is_contiguous() and got.device == x.device
    check_close(got, glu_reference(x, activation), out_dtype or x_dtype)


@pytest.mark.parametrize("out_dtype", [None, *DTYPES], ids=lambda d: f"out={d}")
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_gelu_tanh_dtypes(device, x_dtype, out_dtype):
    x = (torch.randn(4, 5, 80, device=device) * 3).to(x_dtype)
    got = kiln.gelu_tanh(x, out_dtype=out_dtype)
    check_close(got, act_reference(x, "gelu_tanh"), out_dtype or x_dtype)


@pytest.mark.parametrize("f", [1, 3, 8, 100, 129, 9216, 14336])
def test_shapes(device, f):
    x = torch.randn(5, 2 * f, device=device, dtype=torch.bfloat16) * 4
    check_close(kiln.glu(x), glu_reference(x, "silu"), torch.bfloat16)
    check_close(kiln.gelu_tanh(x[:, :f]), act_reference(x[:, :f], "gelu_tanh"), torch.bfloat16)


def test_extreme_values(device):
    """Large |x|: silu -> x or -0, gelu -> x or 0, no NaN or overflow in the f32 math."""
    x = torch.tensor([[-200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0, 1e30]],
                     device=device)
    check_close(kiln.gelu_tanh(x[:, :9]), act_reference(x[:, :9], "gelu_tanh"), torch.float32)
    gate_up = torch.cat([x, torch.ones_like(x)], -1)
    check_close(kiln.glu(gate_up), glu_reference(gate_up, "silu"), torch.float32)


def test_strided_rows(device):
    """The MLP slice of a fused projection (Flux's single blocks): rows 3 D + 2 F apart."""
    d, f = 48, 96
    fused = torch.randn(2, 7, 3 * d + 2 * f, device=device, dtype=torch.bfloat16)
    mlp = fused[..., 3 * d:]
    assert not mlp.is_contiguous()
    got = kiln.glu(mlp)
    check_close(got, glu_reference(mlp, "silu"), torch.bfloat16)
    assert torch.equal(got, kiln.glu(mlp.contiguous()))
    stepped = fused[:, ::2, :2 * f]
    assert torch.equal(kiln.gelu_tanh(stepped), kiln.gelu_tanh(stepped.contiguous()))


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_quantized(device, fmt, x_dtype):
    x = (torch.randn(2, 9, 2 * 160, device=device) * 2).to(x_dtype)
    x[1, 4, :160] = 0  # an all-zero output row gets scale 1
    q, scale, _ = check_quantized(kiln.glu, fmt, x)
    assert scale[13].item() == 1.0
    deq = q.float() * scale.reshape(2, 9, 1)
    check_close(deq, glu_reference(x, "silu"), torch.float32, extra=FP8_ROUNDOFF[fmt])
    q, scale, _ = check_quantized(kiln.gelu_tanh, fmt, x)
    deq = q.float() * scale.reshape(2, 9, 1)
    check_close(deq, act_reference(x, "gelu_tanh"), torch.float32, extra=FP8_ROUNDOFF[fmt])
    check_quantized(kiln.glu, fmt, x, activation="gelu_tanh")


def test_zero_sizes(device):
    for shape in [(0, 64), (3, 0), (2, 0, 8)]:
        x = torch.randn(shape, device=device)
        assert kiln.glu(x).shape == (*shape[:-1], shape[-1] // 2)
        assert kiln.gelu_tanh(x).shape == shape
        q, scale = kiln.glu(x, quantize="e4m3fn")
        assert q.shape == (*shape[:-1], shape[-1] // 2)
        assert scale.shape == (math.prod(shape[:-1]),)
        assert torch.equal(scale, torch.ones_like(scale))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy(dtype):
    x = np.random.standard_normal((3, 4, 64)).astype(dtype)
    got = kiln.glu(x)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == (3, 4, 32)
    assert np.array_equal(got, kiln.glu(torch.from_numpy(x)).numpy())
    q, scale = kiln.gelu_tanh(x, quantize="e5m2")
    assert q.dtype == np.uint8 and scale.shape == (12,)
    want_q, want_scale = kiln.gelu_tanh(torch.from_numpy(x), quantize="e5m2")
    assert np.array_equal(q, want_q.view(torch.uint8).numpy())
    assert np.array_equal(scale, want_scale.numpy())


def test_torch_compile_fullgraph():
    def mlp(x):
        h, s = kiln.glu(x, quantize="e4m3fn")
        return h.float() * s[:, None], kiln.gelu_tanh(x, out_dtype=torch.float32)

    x = torch.randn(6, 64, dtype=torch.bfloat16)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x), mlp(x)):
        assert torch.equal(got, want)


def test_opcheck():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.kiln.glu.default, (x, "silu", torch.float32))
    torch.library.opcheck(torch.ops.kiln.gelu_tanh.default, (x, None))
    fp8_utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.kiln.glu_fp8.default, (x, "gelu_tanh", torch.float8_e4m3fn),
                          test_utils=fp8_utils)
    torch.library.opcheck(torch.ops.kiln.gelu_tanh_fp8.default, (x, torch.float8_e5m2),
                          test_utils=fp8_utils)


def test_errors_name_op_and_argument():
    invalid = kiln.InvalidArgumentError
    with pytest.raises(invalid, match=r"kiln::glu: x has shape \[3, 7\], expected \[\.\.\., 2F\]"):
        kiln.glu(torch.randn(3, 7))
    with pytest.raises(invalid, match=r"kiln::glu: activation is 'relu'"):
        kiln.glu(torch.randn(3, 8), activation="relu")
    with pytest.raises(invalid, match=r"kiln::gelu_tanh: x has stride 2 along its last dim"):
        kiln.gelu_tanh(torch.randn(3, 16)[:, ::2])
    with pytest.raises(invalid, match=r"kiln::glu: out_dtype is .* with quantize"):
        kiln.glu(torch.randn(3, 8), out_dtype=torch.float16, quantize="e4m3fn")
    with pytest.raises(invalid, match=r"kiln::gelu_tanh: x has dtype i32"):
        kiln.gelu_tanh(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(invalid, match=r"kiln::glu: x is a builtins.list"):
        kiln.glu([[1.0, 2.0]])


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("f", [1, 5, 96, 1000, 9216, 12288, 14336])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_cuda_matches_cpu_reference(f, x_dtype):
    x = (torch.randn(3, 33, 2 * f) * 3).to(x_dtype)
    for op, arg, kwargs in [(kiln.glu, x, {"activation": "silu"}),
                            (kiln.glu, x, {"activation": "gelu_tanh"}),
                            (kiln.gelu_tanh, x[..., :f], {})]:
        cpu = op(arg, out_dtype=torch.float32, **kwargs)
        gpu = op(arg.cuda(), out_dtype=torch.float32, **kwargs)
        check_close(gpu, cpu.double(), torch.float32)
        check_quantized(op, "e4m3fn", arg.cuda(), **kwargs)
        q_gpu, s_gpu = op(arg.cuda(), quantize="e4m3fn", **kwargs)
        q_cpu, s_cpu = op(arg, quantize="e4m3fn", **kwargs)
        torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-5, atol=0)
        deq_gpu = q_gpu.float().cpu() * s_gpu.cpu().reshape(3, 33, 1)
        deq_cpu = q_cpu.float() * s_cpu.reshape(3, 33, 1)
        check_close(deq_gpu, deq_cpu.double(), torch.float32, extra=FP8_ROUNDOFF["e4m3fn"])


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_cuda_unaligned_rows_take_the_scalar_path():
    storage = torch.randn(4 * 258 + 1, device="cuda", dtype=torch.bfloat16)
    x = storage[1:].reshape(4, 258)[:, :256]
    check_close(kiln.glu(x, out_dtype=torch.float32), glu_reference(x, "silu"), torch.float32)
