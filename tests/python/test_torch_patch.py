"""kiln.torch.patch(): torch._scaled_mm, torch.nn.functional.scaled_mm and comfy_kitchen's fp8
quantize / dequantize routed to kiln, scales honored exactly, the rest left to torch.

The reference for every matmul is the f64 product of the dequantized operands, with each scale
applied as torch defines it (dequantized = q * scale). The comfy_kitchen tests run the real
package from PyPI (scripts/requirements.txt installs it) on CPU.
"""

import logging

import pytest
import torch

import kiln
import kiln.torch as kiln_torch
from conftest import HAS_CUDA

F = torch.nn.functional
HAS_SCALED_MM_V2 = hasattr(F, "scaled_mm")
ORIGINAL_SCALED_MM = torch._scaled_mm
ORIGINAL_SCALED_MM_V2 = getattr(F, "scaled_mm", None)


@pytest.fixture
def patched():
    kiln_torch.patch()
    yield
    kiln_torch.unpatch()


@pytest.fixture
def routes(caplog):
    """The kiln.torch DEBUG lines of the test, joined."""
    caplog.set_level(logging.DEBUG, logger="kiln.torch")
    return lambda: "\n".join(r.getMessage() for r in caplog.records if r.name == "kiln.torch")


def fp8(shape, dtype=torch.float8_e4m3fn, device="cpu"):
    return (torch.randn(shape, device=device) * 4).to(dtype)


def reference(a, mat2, a_scale_full, b_scale_full, bias=None):
    """f64 (a * a_scale) @ (mat2 * b_scale) + bias, scales given at full [M, K] / [K, N] size."""
    a64 = a.double().cpu() * a_scale_full.double().cpu()
    b64 = mat2.double().cpu() * b_scale_full.double().cpu()
    out = a64 @ b64
    if bias is not None:
        out = out + bias.double().cpu()
    return out


def assert_close(out, want, out_dtype):
    assert out.dtype == out_dtype
    want_rounded = want.to(out_dtype).double()
    err = ((out.double().cpu() - want_rounded).norm() / want_rounded.norm()).item()
    assert err <= 1e-3, f"relative error {err:.3e}"


def torch_cpu(fn):
    """torch's own result where its CPU kernel takes the call, else None: torch 2.11's CPU
    _scaled_mm is per-tensor only and it has no CPU scaled_mm_v2 (torch 2.15 has both). The f64
    reference is the oracle either way; this is a second opinion where there is one."""
    try:
        return fn()
    except (NotImplementedError, RuntimeError):
        return None


def column_major(n, k, dtype=torch.float8_e4m3fn, device="cpu"):
    """mat2 [K, N] as torch._scaled_mm wants it: the transpose of a row-major [N, K] weight."""
    return fp8((n, k), dtype, device).t()


# ---- patch / unpatch -------------------------------------------------------------------------


def test_patch_unpatch_idempotent():
    assert not kiln_torch.is_patched()
    kiln_torch.patch()
    wrapper = torch._scaled_mm
    assert wrapper is not ORIGINAL_SCALED_MM
    kiln_torch.patch()
    assert torch._scaled_mm is wrapper and kiln_torch.is_patched()
    if HAS_SCALED_MM_V2:
        assert F.scaled_mm is not ORIGINAL_SCALED_MM_V2
    kiln_torch.unpatch()
    assert torch._scaled_mm is ORIGINAL_SCALED_MM and not kiln_torch.is_patched()
    kiln_torch.unpatch()
    assert torch._scaled_mm is ORIGINAL_SCALED_MM
    if HAS_SCALED_MM_V2:
        assert F.scaled_mm is ORIGINAL_SCALED_MM_V2
    with pytest.raises(kiln.InvalidArgumentError, match="mode is 'fast'"):
        kiln_torch.patch(mode="fast")
    assert kiln.torch is kiln_torch


# ---- torch._scaled_mm ------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_mm_tensorwise_matches_reference_and_torch(patched, routes, out_dtype):
    m, k, n = 7, 64, 48
    a, mat2 = fp8((m, k)), column_major(n, k)
    sa, sb = torch.rand(()) + 0.1, torch.rand(()) + 0.1
    out = torch._scaled_mm(a, mat2, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    assert "-> kiln" in routes()
    assert_close(out, reference(a, mat2, sa, sb), out_dtype)
    torch_out = ORIGINAL_SCALED_MM(a, mat2, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    assert_close(out, torch_out.double(), out_dtype)


def test_scaled_mm_rowwise_exact_and_never_item(patched, routes, monkeypatch):
    m, k, n = 5, 96, 32
    a, mat2 = fp8((m, k)), column_major(n, k)
    bias = torch.randn(n, dtype=torch.bfloat16)
    sa = torch.rand(m, 1) + 0.1  # one scale per row of a (token)
    sb = torch.rand(1, n) + 0.1  # one scale per column of mat2 (output channel)

    def no_item(self):
        raise AssertionError("a scale was read back with .item()")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    out = torch._scaled_mm(a, mat2, scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16)
    monkeypatch.undo()
    assert "-> kiln" in routes()
    want = reference(a, mat2, sa, sb, bias)
    assert_close(out, want, torch.bfloat16)
    collapsed = reference(a, mat2, sa[0], sb[0, 0], bias)  # what "first element" would give
    assert ((want - collapsed).norm() / want.norm()).item() > 0.05
    torch_out = torch_cpu(lambda: ORIGINAL_SCALED_MM(a, mat2, scale_a=sa, scale_b=sb, bias=bias,
                                                     out_dtype=torch.bfloat16))
    if torch_out is not None:
        assert_close(out, torch_out.double(), torch.bfloat16)


def test_scaled_mm_tensor_activation_rowwise_weight(patched, routes):
    """A pairing torch itself refuses (per-tensor a, per-channel weight): kiln takes it."""
    m, k, n = 3, 64, 40
    a, mat2 = fp8((m, k)), column_major(n, k)
    sa, sb = torch.tensor(0.37), torch.rand(1, n) + 0.1
    out = torch._scaled_mm(a, mat2, scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    assert "-> kiln" in routes()
    assert_close(out, reference(a, mat2, sa, sb), torch.float32)


def test_scaled_mm_block_scales(patched, routes):
    """DeepSeek-style: a 1x128 (scale_a [M, K/128], column-major) and the weight 128x128
    (scale_b [K/128, N/128] for mat2 [K, N]); K and N not multiples of 128."""
    m, k, n = 9, 300, 200
    kb, nb = 3, 2
    a, mat2 = fp8((m, k)), column_major(n, k)
    sa = (torch.rand(kb, m) + 0.1).t()  # [M, Kb], strides (1, M)
    sb = (torch.rand(nb, kb) + 0.1).t()  # [Kb, Nb], strides (1, Kb)
    out = torch._scaled_mm(a, mat2, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    assert "-> kiln" in routes()
    sa_full = sa.repeat_interleave(128, dim=1)[:, :k]
    sb_full = sb.repeat_interleave(128, dim=0)[:k].repeat_interleave(128, dim=1)[:, :n]
    assert_close(out, reference(a, mat2, sa_full, sb_full), torch.bfloat16)


def test_scaled_mm_mat2_layout(patched, routes):
    m, k, n = 4, 64, 32
    a = fp8((m, k))
    w = fp8((n, k))
    sa, sb = torch.tensor(0.5), torch.tensor(0.25)
    out = torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    assert "copied" not in routes()  # w.t() is read in place
    row_major = w.t().contiguous()
    out2 = torch._scaled_mm(a, row_major, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    assert "copied" in routes()
    assert torch.equal(out, out2)
    assert_close(out, reference(a, w.t(), sa, sb), torch.bfloat16)


def test_scaled_mm_falls_through(patched, routes):
    m, k, n = 4, 64, 32
    a, mat2 = fp8((m, k)), column_major(n, k)
    one = torch.tensor(1.0)
    # fp8 output: kiln writes f32/f16/bf16 only, torch keeps it.
    out = torch._scaled_mm(a, mat2, scale_a=one, scale_b=one, out_dtype=torch.float8_e4m3fn)
    assert out.dtype == torch.float8_e4m3fn
    assert "-> torch (output dtype torch.float8_e4m3fn" in routes()
    want = ORIGINAL_SCALED_MM(a, mat2, scale_a=one, scale_b=one, out_dtype=torch.float8_e4m3fn)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
    # A scale_b of no shape kiln (or torch) knows: torch's own error.
    with pytest.raises((RuntimeError, ValueError)):
        torch._scaled_mm(a, mat2, scale_a=torch.ones(m, 1), scale_b=torch.ones(1, n - 1),
                         out_dtype=torch.bfloat16)
    assert "-> torch (scale_b of shape [1, 31])" in routes()
    # Operands that are not fp8.
    with pytest.raises((RuntimeError, ValueError)):
        torch._scaled_mm(a.bfloat16(), mat2.bfloat16(), scale_a=one, scale_b=one,
                         out_dtype=torch.bfloat16)
    assert "not fp8" in routes()


# ---- torch.nn.functional.scaled_mm -----------------------------------------------------------


@pytest.mark.skipif(not HAS_SCALED_MM_V2, reason="this torch has no torch.nn.functional.scaled_mm")
def test_scaled_mm_v2_rowwise_and_lists(patched, routes, monkeypatch):
    m, k, n = 6, 128, 48
    a, mat2 = fp8((m, k)), column_major(n, k)
    sa, sb = torch.rand(m, 1) + 0.1, torch.rand(1, n) + 0.1
    rec = F.ScalingType
    out = F.scaled_mm(a, mat2, sa, rec.RowWise, sb, rec.RowWise, output_dtype=torch.bfloat16)
    assert "-> kiln" in routes()
    assert_close(out, reference(a, mat2, sa, sb), torch.bfloat16)
    want = torch_cpu(lambda: ORIGINAL_SCALED_MM_V2(a, mat2, sa, rec.RowWise, sb, rec.RowWise,
                                                   output_dtype=torch.bfloat16))
    if want is not None:
        assert_close(out, want.double(), torch.bfloat16)

    # Two-level scales: every factor applies, none is dropped, none is read to the host.
    ta, tb = torch.tensor([0.5]), torch.tensor([3.0])
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail(".item() on a scale"))
    out = F.scaled_mm(a, mat2, [sa, ta], [rec.RowWise, rec.TensorWise], [tb, sb],
                      [rec.TensorWise, rec.RowWise], output_dtype=torch.float32)
    monkeypatch.undo()
    assert_close(out, reference(a, mat2, sa * ta, sb * tb), torch.float32)


@pytest.mark.skipif(not HAS_SCALED_MM_V2, reason="this torch has no torch.nn.functional.scaled_mm")
def test_scaled_mm_v2_block128_weight(patched, routes):
    m, k, n = 3, 256, 130
    kb, nb = 2, 2
    a, mat2 = fp8((m, k)), column_major(n, k)
    sa = torch.rand(m, 1) + 0.1
    sb = (torch.rand(nb, 4) + 0.1).t()  # [round_up(Kb, 4), Nb], column-major: rows 2, 3 padding
    rec = F.ScalingType
    out = F.scaled_mm(a, mat2, sa, rec.RowWise, sb, rec.BlockWise128x128,
                      output_dtype=torch.bfloat16)
    assert "-> kiln" in routes()
    sb_full = sb[:kb].repeat_interleave(128, dim=0)[:k].repeat_interleave(128, dim=1)[:, :n]
    assert_close(out, reference(a, mat2, sa, sb_full), torch.bfloat16)


@pytest.mark.skipif(not HAS_SCALED_MM_V2, reason="this torch has no torch.nn.functional.scaled_mm")
def test_scaled_mm_v2_falls_through_on_swizzle(patched, routes):
    a, mat2 = fp8((4, 64)), column_major(32, 64)
    one = torch.tensor(1.0)
    rec, swz = F.ScalingType, F.SwizzleType
    try:
        F.scaled_mm(a, mat2, one, rec.TensorWise, one, rec.TensorWise,
                    swizzle_a=swz.SWIZZLE_32_4_4, swizzle_b=swz.SWIZZLE_32_4_4,
                    output_dtype=torch.bfloat16)
    except (RuntimeError, ValueError):
        pass  # torch's own verdict on a swizzled tensorwise call
    assert "-> torch (swizzled scales)" in routes()


# ---- routing on GPUs ----------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_routing(patched, routes):
    major, minor = torch.cuda.get_device_capability()
    for m in (1, 16, 17, 256):
        a, mat2 = fp8((m, 256), device="cuda"), column_major(512, 256, device="cuda")
        sa, sb = torch.rand(m, 1, device="cuda") + 0.1, torch.rand(1, 512, device="cuda") + 0.1
        out = torch._scaled_mm(a, mat2, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        assert_close(out, reference(a, mat2, sa, sb), torch.bfloat16)
        last = routes().splitlines()[-1]
        # At m = 1, scale_a [1, 1] reads as tensor-wise, and torch refuses tensor-wise x row-wise.
        torch_refuses = m == 1
        if (major, minor) < (8, 9) or m <= kiln_torch.KILN_FASTER_MAX_M or torch_refuses:
            assert "-> kiln" in last
        else:
            assert "-> torch" in last


# ---- comfy_kitchen ---------------------------------------------------------------------------


def test_comfy_kitchen_quantize_dequantize(routes):
    ck = pytest.importorskip("comfy_kitchen")
    x = torch.randn(33, 70, dtype=torch.bfloat16) * 5
    scale = (x.float().abs().amax() / 448).to(torch.float32)
    eager_q = ck.quantize_per_tensor_fp8(x, scale, torch.float8_e4m3fn)
    assert ck.registry.get_capable_backend(
        "quantize_per_tensor_fp8", {"x": x, "scale": scale, "output_type": torch.float8_e4m3fn}
    ) != "kiln"
    kiln_torch.patch()
    try:
        kw = {"x": x, "scale": scale, "output_type": torch.float8_e4m3fn}
        assert ck.registry.get_capable_backend("quantize_per_tensor_fp8", kw) == "kiln"
        q = ck.quantize_per_tensor_fp8(x, scale, torch.float8_e4m3fn)
        want, _ = kiln.quantize_fp8(x, "e4m3fn", "tensor", scale=scale)
        assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
        # comfy_kitchen's eager backend divides in x's dtype (bf16 here): at most one code off.
        diff = (q.float() - eager_q.float()).abs()
        step = torch.maximum(q.float().abs(), eager_q.float().abs()) * 2.0**-3 + 2.0**-9
        assert bool((diff <= step).all())
        deq = ck.dequantize_per_tensor_fp8(q, scale, torch.bfloat16)
        want = (q.double() * scale.double()).to(torch.bfloat16)
        assert torch.equal(deq, want)
        # Through its FP8 layout (QuantizedTensor), as ComfyUI uses it.
        from comfy_kitchen.tensor import QuantizedTensor

        qt = QuantizedTensor.from_float(x, "TensorCoreFP8Layout")
        back = qt.dequantize()
        assert back.dtype == torch.bfloat16
        assert ((back.double() - x.double()).norm() / x.double().norm()).item() < 0.05
    finally:
        kiln_torch.unpatch()
    assert ck.registry.get_capable_backend(
        "quantize_per_tensor_fp8", {"x": x, "scale": scale, "output_type": torch.float8_e4m3fn}
    ) != "kiln"
    assert torch.equal(ck.quantize_per_tensor_fp8(x, scale).view(torch.uint8),
                       eager_q.view(torch.uint8))


def test_patch_keeps_a_registration_it_did_not_make():
    """kiln registered with comfy-kitchen before patch() stays registered after unpatch()."""
    pytest.importorskip("comfy_kitchen")
    import kiln.comfy_kitchen

    kiln.comfy_kitchen.register(priority=1)
    try:
        kiln_torch.patch()
        kiln_torch.unpatch()
        assert kiln.comfy_kitchen.is_registered()
    finally:
        kiln.comfy_kitchen.unregister()
    kiln_torch.patch()
    kiln_torch.unpatch()
    assert not kiln.comfy_kitchen.is_registered()


def test_comfy_kitchen_installed():
    """The CI command installs the real comfy-kitchen: make its absence a failure, not a skip."""
    import comfy_kitchen  # noqa: F401



def test_patched_scaled_mm_under_torch_compile(patched):
    """The wrappers trace: torch.compile(fullgraph=True) holds kiln's op where the patch routes
    the call to kiln."""
    m, k, n = 5, 64, 48
    a, mat2 = fp8((m, k)), column_major(n, k)
    sa, sb = torch.rand(m, 1) + 0.1, torch.rand(1, n) + 0.1

    def f(a, mat2, sa, sb):
        return torch._scaled_mm(a, mat2, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(a, mat2, sa, sb), f(a, mat2, sa, sb))
    if HAS_SCALED_MM_V2:
        rec = F.ScalingType

        def g(a, mat2, sa, sb):
            return F.scaled_mm(a, mat2, sa, rec.RowWise, sb, rec.RowWise,
                               output_dtype=torch.bfloat16)

        compiled = torch.compile(g, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(a, mat2, sa, sb), g(a, mat2, sa, sb))


def test_wrapper_held_after_unpatch_calls_torch(routes):
    kiln_torch.patch()
    held = torch._scaled_mm
    kiln_torch.unpatch()
    a, mat2, one = fp8((4, 64)), column_major(32, 64), torch.tensor(1.0)
    out = held(a, mat2, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    assert "-> torch (unpatched)" in routes()
    assert torch.equal(out, ORIGINAL_SCALED_MM(a, mat2, scale_a=one, scale_b=one,
                                               out_dtype=torch.bfloat16))
