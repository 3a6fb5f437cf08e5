"""kiln.conv2d against torch's F.conv2d in f64, on every backend, for torch and numpy inputs.

CPU accumulates in f64: within the output's rounding of the exact result. CUDA rounds x and w
to its compute type (bf16, or f16 when neither is bf16 and one is f16) and accumulates in f32:
its distance to the exact result must stay within 1.25 times that of the same convolution
computed in f64 from the rounded inputs, plus the output's rounding.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kiln

from conftest import CUDA_REASON, HAS_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def compute_dtype(x_dtype, w_dtype):
    if torch.bfloat16 in (x_dtype, w_dtype):
        return torch.bfloat16
    if torch.float16 in (x_dtype, w_dtype):
        return torch.float16
    return torch.bfloat16


def check_close(got, x, w, bias, out_dtype, **conv):
    """got against F.conv2d in f64 (see the module docstring for the bounds); no NaN."""
    assert got.dtype == out_dtype
    b64 = bias.double().cpu() if bias is not None else None
    exact = F.conv2d(x.double().cpu(), w.double().cpu(), b64, **conv)
    assert got.shape == exact.shape
    got64 = got.double().cpu()
    assert not got64.isnan().any(), "output holds NaN"
    norm = exact.norm().item()
    assert norm > 0, "reference is all zeros: the test would pass vacuously"
    err = (got64 - exact).norm().item()
    bound = 2 * ROUNDOFF[out_dtype] * norm + 1e-9 * norm
    if got.device.type == "cuda":
        t = compute_dtype(x.dtype, w.dtype)
        low = F.conv2d(x.to(t).double().cpu(), w.to(t).double().cpu(), b64, **conv)
        bound += 1.25 * (low - exact).norm().item() + 2.0**-20 * norm
    assert err <= bound, f"||got - exact|| = {err:.3e} > {bound:.3e} (||exact|| = {norm:.3e})"


def make(shape, dtype, device, nhwc):
    t = torch.randn(shape, device=device).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if nhwc else t


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("out_dtype", [None, *DTYPES], ids=lambda d: f"out={d}")
@pytest.mark.parametrize("w_dtype", DTYPES, ids=lambda d: f"w={d}")
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_dtypes(device, x_dtype, w_dtype, out_dtype, nhwc):
    x = make((2, 16, 9, 7), x_dtype, device, nhwc)
    w = make((24, 16, 3, 3), w_dtype, device, nhwc)
    bias = torch.randn(24, device=device).to(w_dtype)
    got = kiln.conv2d(x, w, bias, padding=1, out_dtype=out_dtype)
    assert got.device == x.device
    assert got.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    check_close(got, x, w, bias, out_dtype or x_dtype, padding=1)


# (N, C, H, W, OC, K, stride, padding, dilation)
SHAPES = [
    (1, 10, 8, 6, 10, 3, 1, 1, 1),
    (1, 3, 32, 32, 16, 3, 1, 1, 1),
    (1, 16, 16, 16, 3, 1, 1, 0, 1),
    (1, 32, 8, 8, 32, 1, 2, 1, 1),
    (1, 64, 16, 16, 48, 3, 2, 1, 1),
    (2, 24, 13, 11, 40, 5, 1, 2, 1),
    (1, 16, 20, 20, 24, 3, 1, 2, 2),
    (1, 3, 37, 29, 64, 7, 2, 3, 1),
    (1, 64, 48, 32, 64, 3, 1, 0, 1),
]


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(device, shape, nhwc):
    n, c, h, w_, oc, k, stride, padding, dilation = shape
    x = make((n, c, h, w_), torch.bfloat16, device, nhwc)
    w = make((oc, c, k, k), torch.bfloat16, device, nhwc)
    bias = torch.randn(oc, device=device, dtype=torch.bfloat16)
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    check_close(kiln.conv2d(x, w, bias, **conv), x, w, bias, torch.bfloat16, **conv)


def test_views_and_pairs(device):
    """A channel slice of x, a transposed w, no bias, and (h, w) pairs for every option."""
    parent = torch.randn(2, 20, 15, 12, device=device, dtype=torch.float16)
    x = parent[:, 2:18]
    w = torch.randn(24, 16, 5, 3, device=device, dtype=torch.float16).transpose(2, 3)
    w = w.contiguous().transpose(2, 3)  # [24, 16, 5, 3] with permuted strides
    conv = dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2))
    check_close(kiln.conv2d(x, w, **conv), x, w, None, torch.float16, **conv)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_cuda_side_stream():
    x = make((1, 64, 64, 64), torch.bfloat16, "cuda", True)
    w = make((64, 64, 3, 3), torch.bfloat16, "cuda", True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = kiln.conv2d(x, w, padding=1)
    stream.synchronize()
    check_close(got, x, w, None, torch.bfloat16, padding=1)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_workspace_peak_counts_the_channels_last_copy():
    # On Hopper an NCHW x reaches the sm_90a kernel through a channels-last copy in kiln's own
    # workspace (torch does not see it); a channels-last x needs none.
    if kiln.cuda_arch(0) != "sm_90a":
        pytest.skip("the channels-last copy is the sm_90a path's")
    w = make((128, 64, 3, 3), torch.bfloat16, "cuda", True)
    peaks = {}
    for nhwc in (False, True):
        x = make((1, 64, 96, 96), torch.bfloat16, "cuda", nhwc)
        kiln.reset_workspace_peak(0)
        got = kiln.conv2d(x, w, padding=1)
        torch.cuda.synchronize()
        peaks[nhwc] = kiln.workspace_peak_bytes(0)
        check_close(got, x, w, None, torch.bfloat16, padding=1)
    assert peaks[False] >= x.numel() * x.element_size()
    assert peaks[True] == 0


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_numpy(nhwc):
    x = np.random.randn(1, 8, 7, 6).astype(np.float32)
    if nhwc:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w = np.random.randn(5, 8, 3, 3).astype(np.float32)
    b = np.random.randn(5).astype(np.float32)
    got = kiln.conv2d(x, w, b, padding=1)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.strides[1] == (4 if nhwc else 7 * 6 * 4)
    check_close(torch.from_numpy(got), torch.from_numpy(x), torch.from_numpy(w),
                torch.from_numpy(b), torch.float32, padding=1)


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_torch_compile_fullgraph(nhwc):
    """The custom op sits in a torch.compile graph; the fake kernel gives x's memory format."""

    def block(x, w, b):
        return kiln.conv2d(x, w, b, padding=1) * 2

    x = make((1, 8, 6, 5), torch.bfloat16, "cpu", nhwc)
    w = make((4, 8, 3, 3), torch.bfloat16, "cpu", nhwc)
    b = torch.randn(4, dtype=torch.bfloat16)
    got = torch.compile(block, fullgraph=True, dynamic=False)(x, w, b)
    check_close(got / 2, x, w, b, torch.bfloat16, padding=1)


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(nhwc):
    x = make((1, 8, 6, 5), torch.float32, "cpu", nhwc)
    w = make((4, 8, 3, 3), torch.float32, "cpu", nhwc)
    b = torch.randn(4)
    torch.library.opcheck(torch.ops.kiln.conv2d.default,
                          (x, w, b, [1, 1], [1, 1], [1, 1], 1, torch.bfloat16))


def test_groups_unsupported():
    x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 4, 3, 3)
    with pytest.raises(kiln.UnsupportedError, match=r"conv2d.*groups = 2"):
        kiln.conv2d(x, w, groups=2)
    with pytest.raises(kiln.UnsupportedError, match=r"conv2d.*\bw\b.*grouped"):
        kiln.conv2d(x, w)


def test_bad_arguments_name_op_and_argument():
    x, w = torch.randn(1, 8, 5, 5), torch.randn(4, 8, 3, 3)
    with pytest.raises(kiln.InvalidArgumentError, match=r"conv2d.*padding.*'same'"):
        kiln.conv2d(x, w, padding="same")
    with pytest.raises(kiln.InvalidArgumentError, match=r"conv2d.*bias.*\[3\].*\[4\]"):
        kiln.conv2d(x, w, torch.randn(3))
    with pytest.raises(kiln.InvalidArgumentError, match=r"conv2d.*does not fit"):
        kiln.conv2d(x, torch.randn(4, 8, 7, 7))
