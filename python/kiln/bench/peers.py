"""What the suites' PyTorch peers run that more than one suite needs, written once."""

# Keeps an all-zero row's scale finite (torchao's float8 utilities clamp the same way).
AMAX_FLOOR = 1e-12


def quantize_rows(torch, y, dtype=None):
    """y [..., C] quantized per row (token) to fp8 the way torchao's dynamic fp8 recipe
    (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())) quantizes activations:
    amax of each row, scale = amax / the format's max, y / scale in f32 saturated to the format's
    range, cast. Returns (q: fp8, y's shape; scale: f32 [R], R = the product of y's leading
    dims): the pair torch._scaled_mm takes with scale.reshape(-1, 1), and the pair kiln's fused
    quantize returns (kiln takes an all-zero row's scale as 1)."""
    dtype = torch.float8_e4m3fn if dtype is None else dtype
    top = torch.finfo(dtype).max
    rows = y.reshape(-1, y.shape[-1])  # [R, C]
    scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=AMAX_FLOOR) / top  # [R, 1]
    q = (rows.float() / scale).clamp(-top, top).to(dtype)
    return q.view(y.shape), scale.reshape(-1)
