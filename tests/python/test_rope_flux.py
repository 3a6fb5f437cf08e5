"""kiln.rope_flux against an f64 reference, on every backend, for torch and numpy inputs.

Errors are measured as ||got - ref|| / ||ref|| against the f64 reference computed from the same
(already rounded) inputs, so the only error kiln may add is its f32 math and the final rounding
to the output dtype: the bound is twice that dtype's unit roundoff, plus f32 slack.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln

from conftest import CUDA_REASON, HAS_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Unit roundoff: half an ulp at 1, relative.
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
F32_MATH = 1e-6


def random_pe(length, half_dim, batch=None, device="cpu"):
    """f32 [(N,) L, D/2, 2, 2] rotations [[cos, -sin], [sin, cos]] at random angles."""
    shape = (length, half_dim) if batch is None else (batch, length, half_dim)
    angle = torch.rand(shape, device=device, dtype=torch.float64) * (2 * math.pi)
    cos, sin = angle.cos(), angle.sin()
    rows = [torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)]
    return torch.stack(rows, -2).float()


def reference(x, pe, norm_weight, eps):
    """f64 [N, H, L, D]: RMSNorm over D, then each pair (x[2p], x[2p+1]) times pe's 2x2 matrix."""
    n, length, heads, dim = x.shape
    x64 = x.double().cpu()
    if norm_weight is not None:
        rms = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        x64 = x64 * rms * norm_weight.double().cpu()
    if pe is not None:
        pairs = x64.reshape(n, length, heads, dim // 2, 2, 1)  # [N, L, H, D/2, 2, 1]
        pe64 = pe.double().cpu()
        pe64 = pe64 if pe64.dim() == 5 else pe64.unsqueeze(0)  # [N|1, L, D/2, 2, 2]
        x64 = (pe64.unsqueeze(2) @ pairs).reshape(n, length, heads, dim)
    return x64.permute(0, 2, 1, 3)


def check_close(got, want, out_dtype):
    """||got - want|| / ||want|| within twice out_dtype's roundoff (+ f32 math); no NaN."""
    assert got.dtype == out_dtype
    assert got.is_contiguous()
    assert got.shape == want.shape
    got64 = got.double().cpu()
    assert not got64.isnan().any(), "output holds NaN"
    norm = want.norm().item()
    assert norm > 0, "reference is all zeros: the test would pass vacuously"
    err = ((got64 - want).norm() / norm).item()
    bound = 2 * ROUNDOFF[out_dtype] + F32_MATH
    assert err <= bound, f"relative error {err:.3e} > {bound:.3e}"


def packed_q(n, length, heads, dim, dtype, device):
    """x as Flux produces it: the Q slice of a packed [N, L, 3, H, D] QKV (a strided view)."""
    qkv = torch.randn(n, length, 3, heads, dim, dtype=dtype, device=device)
    return qkv[:, :, 0]


@pytest.mark.parametrize("pe_kind", ["shared", "batched", "none"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("out_dtype", [None, *DTYPES], ids=lambda d: f"out={d}")
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x={d}")
def test_dtypes_norm_pe(device, x_dtype, out_dtype, norm, pe_kind):
    n, length, heads, dim = 3, 7, 2, 64
    x = packed_q(n, length, heads, dim, x_dtype, device)
    pe = {
        "shared": random_pe(length, dim // 2, device=device),
        "batched": random_pe(length, dim // 2, batch=n, device=device),
        "none": None,
    }[pe_kind]
    w = (1 + 0.25 * torch.randn(dim, device=device)).to(torch.bfloat16) if norm else None
    got = kiln.rope_flux(x, pe, norm_weight=w, eps=1e-6, out_dtype=out_dtype)
    assert got.device == x.device
    check_close(got, reference(x, pe, w, 1e-6), out_dtype or x_dtype)


@pytest.mark.parametrize(
    "n, length, heads, dim",
    [(1, 1, 1, 64), (1, 7, 3, 128), (3, 7, 2, 256), (3, 1, 5, 128), (2, 33, 4, 64)],
)
def test_shapes(device, n, length, heads, dim):
    x = packed_q(n, length, heads, dim, torch.bfloat16, device)
    pe = random_pe(length, dim // 2, device=device)
    w = torch.randn(dim, device=device)
    got = kiln.rope_flux(x, pe, norm_weight=w, out_dtype="bf16")
    check_close(got, reference(x, pe, w, 1e-6), torch.bfloat16)


def test_contiguous_and_transposed_inputs(device):
    """Contiguous x, and x and pe with permuted strides, give the same answer."""
    n, length, heads, dim = 2, 9, 3, 64
    x = torch.randn(n, heads, length, dim, device=device).transpose(1, 2)  # [N, L, H, D]
    pe = random_pe(dim // 2, length, device=device).transpose(0, 1)  # [L, D/2, 2, 2] view
    want = reference(x, pe, None, 1e-6)
    check_close(kiln.rope_flux(x, pe), want, torch.float32)
    check_close(kiln.rope_flux(x.contiguous(), pe.contiguous()), want, torch.float32)


def test_eps_is_used(device):
    """A large eps changes the norm: the argument reaches the kernel."""
    x = torch.randn(1, 4, 2, 64, device=device) * 1e-2
    w = torch.ones(64, device=device)
    got = kiln.rope_flux(x, None, norm_weight=w, eps=1.0)
    check_close(got, reference(x, None, w, 1.0), torch.float32)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_cuda_side_stream():
    """CUDA work goes on torch's current stream."""
    x = packed_q(2, 4608, 24, 128, torch.bfloat16, "cuda")
    pe = random_pe(4608, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = kiln.rope_flux(x, pe, out_dtype=torch.bfloat16)
    stream.synchronize()
    check_close(got, reference(x, pe, None, 1e-6), torch.bfloat16)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy(dtype):
    n, length, heads, dim = 2, 7, 3, 64
    qkv = np.random.randn(n, length, 3, heads, dim).astype(dtype)
    x = qkv[:, :, 0]
    pe = random_pe(length, dim // 2).numpy()
    w = np.random.randn(dim).astype(np.float32)
    got = kiln.rope_flux(x, pe, norm_weight=w)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.flags.c_contiguous
    want = reference(torch.from_numpy(x), torch.from_numpy(pe), torch.from_numpy(w), 1e-6)
    check_close(torch.from_numpy(got), want, torch.from_numpy(got).dtype)
    got32 = kiln.rope_flux(x, pe, norm_weight=w, out_dtype="f32")
    check_close(torch.from_numpy(got32), want, torch.float32)


def test_numpy_without_torch():
    """import kiln and numpy calls work where torch cannot be imported."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, kiln\n"
        "x = np.random.randn(1, 5, 2, 64).astype(np.float32)\n"
        "out = kiln.rope_flux(x)\n"
        "assert out.shape == (1, 2, 5, 64) and np.array_equal(out, x.transpose(0, 2, 1, 3))\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_compile_fullgraph():
    """The custom op sits in a torch.compile graph with no graph break (CPU, inductor)."""

    def attention_inputs(qkv, pe, w):
        q = kiln.rope_flux(qkv[:, :, 0], pe, norm_weight=w, out_dtype=torch.bfloat16)
        v = kiln.rope_flux(qkv[:, :, 2], out_dtype=torch.bfloat16)
        return q * 2, v

    qkv = torch.randn(1, 16, 3, 2, 64, dtype=torch.bfloat16)
    pe = random_pe(16, 32)
    w = torch.randn(64, dtype=torch.bfloat16)
    compiled = torch.compile(attention_inputs, fullgraph=True, dynamic=False)
    q, v = compiled(qkv, pe, w)
    want = reference(qkv[:, :, 0], pe, w, 1e-6)
    check_close(q / 2, want, torch.bfloat16)
    assert torch.equal(v, qkv[:, :, 2].permute(0, 2, 1, 3))


@pytest.mark.parametrize("pe_kind", ["shared", "none"])
def test_opcheck(pe_kind):
    x = packed_q(2, 5, 3, 64, torch.bfloat16, "cpu")
    pe = random_pe(5, 32) if pe_kind == "shared" else None
    w = torch.randn(64)
    torch.library.opcheck(torch.ops.kiln.rope_flux.default, (x, pe, w, 1e-6, torch.float32))


def test_odd_head_dim_names_op_and_argument():
    x = torch.randn(1, 4, 2, 63)
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope_flux.*\bx\b.*63") as info:
        kiln.rope_flux(x)
    assert info.value.code == "invalid_argument"
    assert isinstance(info.value, ValueError) and isinstance(info.value, kiln.KilnError)


def test_pe_shape_mismatch_names_op_and_argument():
    x = torch.randn(1, 8, 2, 64)
    pe = random_pe(7, 32)
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope_flux.*pe.*\[7, 32, 2, 2\]"):
        kiln.rope_flux(x, pe)


def test_x_must_be_4d():
    with pytest.raises(kiln.InvalidArgumentError, match=r"rope_flux: x has shape \[4, 64\]"):
        kiln.rope_flux(torch.randn(4, 64))


def test_out_dtype_unknown():
    with pytest.raises(kiln.InvalidArgumentError, match="rope_flux: out_dtype is fp7"):
        kiln.rope_flux(torch.randn(1, 2, 2, 64), out_dtype="fp7")


# ---- out=: writing into a row range of a joint [N, H, L_txt + L_img, D] attention input -------

SENTINEL = 1234.5  # what rows outside the written ranges must still hold


def check_rows(got, want, out_dtype):
    """check_close for a strided [N, H, L, D] view (contiguity is not asked of it)."""
    check_close(got.contiguous(), want, out_dtype)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: f"out={d}")
@pytest.mark.parametrize("n", [1, 2])
def test_out_row_ranges(device, n, out_dtype, norm):
    """Text and image tokens from different projections land in one buffer, each in its own row
    range, as the joint attention of a Flux double block takes them; rows outside both ranges (a
    guard band) are left alone, and out is returned."""
    heads, dim, l_txt, l_img, guard = 3, 64, 5, 11, 2
    total = guard + l_txt + l_img + guard
    buf = torch.full((n, heads, total, dim), SENTINEL, dtype=out_dtype, device=device)
    pe = random_pe(l_txt + l_img, dim // 2, device=device)
    w = (1 + 0.25 * torch.randn(dim, device=device)) if norm else None
    txt = packed_q(n, l_txt, heads, dim, torch.bfloat16, device)
    img = packed_q(n, l_img, heads, dim, torch.bfloat16, device)
    rows_txt = slice(guard, guard + l_txt)
    rows_img = slice(guard + l_txt, guard + l_txt + l_img)
    got = kiln.rope_flux(txt, pe[:l_txt], norm_weight=w, out=buf[:, :, rows_txt])
    assert got.data_ptr() == buf[:, :, rows_txt].data_ptr()
    kiln.rope_flux(img, pe[l_txt:], norm_weight=w, out=buf[:, :, rows_img])
    check_rows(buf[:, :, rows_txt], reference(txt, pe[:l_txt], w, 1e-6), out_dtype)
    check_rows(buf[:, :, rows_img], reference(img, pe[l_txt:], w, 1e-6), out_dtype)
    for rows in (slice(0, guard), slice(total - guard, total)):
        assert bool((buf[:, :, rows] == SENTINEL).all()), "rows outside the ranges were written"


def test_out_v_path_odd_sizes(device):
    """The V path (no pe, no norm) into a row range, odd sizes (scalar path: D = 10)."""
    n, heads, dim, length = 2, 5, 10, 7
    buf = torch.full((n, heads, length + 3, dim), SENTINEL, device=device)
    x = packed_q(n, length, heads, dim, torch.float32, device)
    kiln.rope_flux(x, out=buf[:, :, 1:1 + length])
    assert torch.equal(buf[:, :, 1:1 + length], x.permute(0, 2, 1, 3))
    assert bool((buf[:, :, 0] == SENTINEL).all())
    assert bool((buf[:, :, 1 + length:] == SENTINEL).all())


def test_out_numpy():
    heads, dim, length = 2, 64, 6
    x = np.random.randn(1, length, heads, dim).astype(np.float32)
    pe = random_pe(length, dim // 2).numpy()
    buf = np.full((1, heads, length + 4, dim), SENTINEL, dtype=np.float32)
    got = kiln.rope_flux(x, pe, out=buf[:, :, 4:])
    assert got is not None and np.shares_memory(got, buf)
    want = reference(torch.from_numpy(x), torch.from_numpy(pe), None, 1e-6)
    check_rows(torch.from_numpy(buf[:, :, 4:]), want, torch.float32)
    assert (buf[:, :, :4] == SENTINEL).all()


def test_out_under_torch_compile():
    """The mutating op (rope_flux_out) in a torch.compile graph, no graph break."""

    def joint(txt, img, pe):
        l_txt = txt.shape[1]
        buf = txt.new_empty(txt.shape[0], txt.shape[2], l_txt + img.shape[1], txt.shape[3])
        kiln.rope_flux(txt, pe[:l_txt], out=buf[:, :, :l_txt])
        kiln.rope_flux(img, pe[l_txt:], out=buf[:, :, l_txt:])
        return buf * 2

    txt = packed_q(1, 4, 2, 64, torch.float32, "cpu")
    img = packed_q(1, 9, 2, 64, torch.float32, "cpu")
    pe = random_pe(13, 32)
    got = torch.compile(joint, fullgraph=True, dynamic=False)(txt, img, pe) / 2
    check_close(got[:, :, :4].contiguous(), reference(txt, pe[:4], None, 1e-6), torch.float32)
    check_close(got[:, :, 4:].contiguous(), reference(img, pe[4:], None, 1e-6), torch.float32)


def test_opcheck_out():
    x = packed_q(2, 5, 3, 64, torch.bfloat16, "cpu")
    out = torch.empty(2, 3, 8, 64, dtype=torch.bfloat16)[:, :, 1:6]
    torch.library.opcheck(torch.ops.kiln.rope_flux_out.default,
                          (x, random_pe(5, 32), None, 1e-6, out))


@pytest.mark.parametrize(
    "make_out, match",
    [
        (lambda: torch.empty(1, 2, 4, 64),
         r"out has shape \[1, 2, 4, 64\], expected \[1, 2, 5, 64\]"),
        (lambda: torch.empty(1, 2, 5, 128)[..., ::2],
         r"strides \[1280, 640, 128, 2\].*last dim contiguous"),
        (lambda: torch.empty(1, 2, 1, 64).expand(1, 2, 5, 64),
         r"rows that do not overlap"),
    ],
    ids=["shape", "d_stride", "overlapping_rows"],
)
def test_out_errors(make_out, match):
    with pytest.raises(kiln.InvalidArgumentError, match=match):
        kiln.rope_flux(torch.randn(1, 5, 2, 64), out=make_out())


def test_out_dtype_conflicts_with_out():
    with pytest.raises(kiln.InvalidArgumentError,
                       match="out_dtype is bf16 but out is torch.float32"):
        kiln.rope_flux(torch.randn(1, 5, 2, 64), out_dtype="bf16", out=torch.empty(1, 2, 5, 64))
