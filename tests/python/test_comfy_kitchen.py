"""kiln as a comfy-kitchen backend (kiln.comfy_kitchen), against the real comfy-kitchen: its
public functions and torch.ops.comfy_kitchen.* ops, called with kiln registered, give kiln's
results; what kiln's constraints refuse goes to the next backend (eager on CPU); register()'s
priority places kiln in comfy-kitchen's order and unregister() takes it out."""

import logging

import pytest
import torch

import kiln
import kiln.comfy_kitchen as kck

ck = pytest.importorskip("comfy_kitchen")
OPS = ("apply_rope", "apply_rope1", "rms_rope", "rms_rope1", "quantize_per_tensor_fp8",
       "dequantize_per_tensor_fp8")
MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


@pytest.fixture
def registered():
    kck.register()
    yield
    kck.unregister()


@pytest.fixture
def dispatch(caplog):
    """The backends comfy-kitchen's registry picked during the test, in order."""
    caplog.set_level(logging.DEBUG, logger="comfy_kitchen.dispatch")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "comfy_kitchen.dispatch"]


def freqs(batch, length, d, dtype=torch.float32, device="cpu"):
    """comfy's rotation table [B, 1, L, D/2, 2, 2]: [[cos, -sin], [sin, cos]] of random
    angles."""
    angle = torch.rand(batch, 1, length, d // 2, device=device) * 6.3
    table = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], dim=-1)
    return table.reshape(batch, 1, length, d // 2, 2, 2).to(dtype)


def packed_qk(b, h, length, d, dtype, device):
    """q, k [B, H, L, D] as Flux's blocks hold them: strided views of a packed [B, L, 3, H, D]
    projection."""
    qkv = torch.randn(b, length, 3, h, d, device=device).to(dtype)
    return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)


def rope_reference(x, table, scale=None, eps=1e-6, magnitude=False):
    """f64 RoPE (after RMSNorm with weight `scale` when given) of x [B, H, L, D]; with
    magnitude, the sums of the products' absolute values instead (what f32 rounding scales
    with)."""
    x64 = x.double()
    if scale is not None:
        x64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * scale.double()
    pairs = x64.reshape(*x.shape[:-1], -1, 1, 2)
    t = table[:, :, : x.shape[2]].double()
    if magnitude:
        t, pairs = t.abs(), pairs.abs()
    return (t[..., 0] * pairs[..., 0] + t[..., 1] * pairs[..., 1]).reshape(x.shape)


def assert_rope(got, x, table):
    """got is the f64 RoPE of x rounded once to x's dtype (half a step: relative to the value,
    or half the subnormal step below the normal range), give or take f32 math (a few f32 ulps of
    the products)."""
    assert got.dtype == x.dtype
    x, table = x.cpu(), table.cpu()
    want = rope_reference(x, table)
    subnormal_step = torch.finfo(x.dtype).smallest_normal * 2.0 ** -MANTISSA[x.dtype]
    bound = (2.0 ** -(MANTISSA[x.dtype] + 1) * want.abs() + subnormal_step / 2
             + 2.0**-21 * rope_reference(x, table, magnitude=True))
    assert bool(((got.cpu().double() - want).abs() <= bound).all())


# ---- registration ----------------------------------------------------------------------------


def test_register_priority_unregister():
    before = list(ck.registry._priority)
    assert "kiln" not in before and not kck.is_registered()
    try:
        kck.register()
        assert ck.registry._priority == ["kiln", *before] and kck.is_registered()
        assert ck.list_backends()["kiln"]["capabilities"] == sorted(OPS)
        kck.register(priority=2)
        assert ck.registry._priority == [*before[:2], "kiln", *before[2:]]
        kck.register(priority=99)
        assert ck.registry._priority == [*before, "kiln"]
        with pytest.raises(kiln.InvalidArgumentError, match="priority is -1"):
            kck.register(priority=-1)
        with pytest.raises(kiln.InvalidArgumentError, match="devices is"):
            kck.register(devices=("mps",))
    finally:
        kck.unregister()
    assert ck.registry._priority == before and not kck.is_registered()
    kck.unregister()  # idempotent
    x, table = torch.randn(1, 2, 3, 8), freqs(1, 3, 8)
    assert ck.registry.get_capable_backend("apply_rope1", {"x": x, "freqs_cis": table}) != "kiln"


def test_devices_cpu_off(dispatch):
    kck.register(devices=("cuda",))
    try:
        x, table = torch.randn(1, 2, 3, 8), freqs(1, 3, 8)
        assert ck.registry.get_capable_backend("apply_rope1", {"x": x, "freqs_cis": table}) \
            == "eager"
    finally:
        kck.unregister()


def test_device_problem():
    cpu = torch.zeros(1)
    assert kck.device_problem([cpu]) is None
    assert kck.device_problem([torch.zeros(1, device="meta")]) == "meta device"
    assert "several devices" in kck.device_problem([cpu, torch.zeros(1, device="meta")])


# ---- RoPE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b, h, length, d, table_batch, extra", [
    (2, 3, 5, 16, 2, 0),     # odd sizes, one table per batch element
    (2, 3, 7, 8, 1, 3),      # a table shared by the batch, longer than L (trimmed)
    (1, 24, 64, 128, 1, 0),  # Flux's heads
])
def test_apply_rope_is_kiln(registered, dispatch, device, dtype, b, h, length, d, table_batch,
                            extra):
    q, k = packed_qk(b, h, length, d, dtype, device)
    table = freqs(table_batch, length + extra, d, device=device)
    out_q, out_k = ck.apply_rope(q, k, table)
    assert dispatch() == ["Backend kiln selected for apply_rope"]
    for x, out in ((q, out_q), (k, out_k)):
        assert out.shape == x.shape and out.is_contiguous()
        pe = table[:, 0, :length]
        want = kiln.rope_flux(x.transpose(1, 2), pe[0] if table_batch == 1 else pe)
        assert torch.equal(out, want)
        assert_rope(out, x, table)
    one = ck.apply_rope1(q, table)
    assert torch.equal(one, out_q)
    assert torch.equal(torch.ops.comfy_kitchen.apply_rope1(q, table), out_q)
    with ck.use_backend("eager"):
        eager = ck.apply_rope1(q, table)
    assert_rope(eager, q, table)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_rope_is_kiln(registered, dispatch, device, dtype):
    b, h, length, d = 2, 3, 9, 64
    q, k = packed_qk(b, h, length, d, dtype, device)
    q = q * 3
    table = freqs(1, length, d, device=device)
    q_scale = (torch.rand(d, device=device) + 0.5).to(dtype)
    k_scale = (torch.rand(d, device=device) + 0.5).to(dtype)
    out_q, out_k = ck.rms_rope(q, k, table, q_scale, k_scale, 1e-6)
    shared_q, shared_k = ck.rms_rope(q, k, table, q_scale)  # k_scale None: q's
    one = ck.rms_rope1(k, table, k_scale)
    assert dispatch() == ["Backend kiln selected for rms_rope"] * 2 + [
        "Backend kiln selected for rms_rope1"]
    assert torch.equal(out_q, kiln.rope_flux(q.transpose(1, 2), table[0, 0],
                                             norm_weight=q_scale))
    assert torch.equal(one, out_k) and torch.equal(shared_q, out_q)
    assert torch.equal(shared_k, kiln.rope_flux(k.transpose(1, 2), table[0, 0],
                                                norm_weight=q_scale))
    # kiln rounds once from f32; eager rounds the norm to x's dtype first: a few ulps apart.
    for x, scale, out in ((q, q_scale, out_q), (k, k_scale, out_k)):
        want = rope_reference(x.cpu(), table.cpu(), scale.cpu())
        err = ((out.cpu().double() - want).norm() / want.norm()).item()
        assert 0 <= err <= 2.0 ** -MANTISSA[dtype]
        with ck.use_backend("eager"):
            eager = ck.rms_rope1(x, table, scale)
        eager_err = ((eager.cpu().double() - want).norm() / want.norm()).item()
        assert err <= eager_err * 1.5 + 2.0 ** -(MANTISSA[dtype] + 4)


def test_rope_declines_go_to_eager(registered):
    b, h, length, d = 1, 2, 5, 16
    q, k = packed_qk(b, h, length, d, torch.bfloat16, "cpu")
    table = freqs(1, length, d)
    scale = torch.ones(d)
    cases = [
        ("apply_rope1", {"x": q, "freqs_cis": table.bfloat16()}),           # bf16 table
        ("apply_rope1", {"x": q.transpose(1, 2),                            # [B, L, H, D] x
                         "freqs_cis": table.transpose(1, 2)}),
        ("apply_rope1", {"x": q.detach().clone().requires_grad_(),          # needs grad
                         "freqs_cis": table}),
        ("apply_rope1", {"x": q[0], "freqs_cis": table}),                   # 3-D x
        ("apply_rope1", {"x": q, "freqs_cis": table[:, :, :3]}),            # too few positions
        ("rms_rope1", {"x": q, "freqs_cis": freqs(1, length + 2, d),        # not trimmed here
                       "scale": scale}),
        ("rms_rope", {"q": q, "k": k, "q_scale": scale,                     # a table per head
                      "freqs_cis": table.expand(b, h, length, d // 2, 2, 2)}),
    ]
    for name, kwargs in cases:
        backend = ck.registry.get_capable_backend(name, kwargs)
        assert backend != "kiln", (name, {k: getattr(v, "shape", v) for k, v in kwargs.items()})
    x, table2 = cases[1][1]["x"], cases[1][1]["freqs_cis"]
    with ck.use_backend("eager"):
        eager = ck.apply_rope1(x, table2)
    assert torch.equal(ck.apply_rope1(x, table2), eager)


# ---- fp8 quantize / dequantize ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_quantize_dequantize_is_kiln(registered, dispatch, device, fmt):
    x = (torch.randn(33, 70, device=device) * 5).to(torch.bfloat16)
    scale = (x.float().abs().amax() / torch.finfo(fmt).max).to(torch.float32)
    q = ck.quantize_per_tensor_fp8(x, scale, fmt)
    want, _ = kiln.quantize_fp8(x, fmt, "tensor", scale=scale)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    deq = ck.dequantize_per_tensor_fp8(q, scale, torch.float16)
    assert torch.equal(deq, (q.double() * scale.double()).to(torch.float16))
    assert dispatch() == ["Backend kiln selected for quantize_per_tensor_fp8",
                          "Backend kiln selected for dequantize_per_tensor_fp8"]
    with ck.use_backend("eager"):
        eager = ck.quantize_per_tensor_fp8(x, scale, fmt)
    # comfy-kitchen's eager backend divides in x's dtype (bf16): at most one code apart.
    diff = (q.float() - eager.float()).abs()
    step = torch.maximum(q.float().abs(), eager.float().abs()) * 2.0**-2 + 2.0**-16
    assert bool((diff <= step).all())


def test_quantized_tensor_layout_runs_on_kiln(registered, dispatch):
    """comfy-kitchen's TensorCoreFP8Layout (how later ComfyUIs hold fp8 weights) quantizes and
    dequantizes through kiln."""
    from comfy_kitchen.tensor import QuantizedTensor

    x = torch.randn(64, 48, dtype=torch.bfloat16)
    qt = QuantizedTensor.from_float(x, "TensorCoreFP8Layout")
    back = qt.dequantize()
    assert back.dtype == torch.bfloat16
    assert ((back.double() - x.double()).norm() / x.double().norm()).item() < 0.05
    assert "Backend kiln selected for quantize_per_tensor_fp8" in dispatch()
    assert "Backend kiln selected for dequantize_per_tensor_fp8" in dispatch()


def test_quantize_declines(registered):
    x = torch.randn(4, 8)
    two = torch.ones(2)
    assert ck.registry.get_capable_backend(
        "quantize_per_tensor_fp8", {"x": x, "scale": two, "output_type": torch.float8_e4m3fn}
    ) != "kiln"
    assert ck.registry.get_capable_backend(
        "quantize_per_tensor_fp8",
        {"x": torch.tensor(1.0), "scale": torch.ones(()), "output_type": torch.float8_e4m3fn},
    ) != "kiln"
