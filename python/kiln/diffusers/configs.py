"""The real configs of the models kiln.diffusers runs, and random weights for them.

No weights can be downloaded where kiln is tested and benchmarked: `kiln bench flux2` and the
tests build each model from its published config (values below, with their source) and fill it
with random_weights(), scaled so that activations stay bounded through the blocks.
"""

import math

import torch

# Flux.2 [klein] 4B transformer: the "klein-4b" entry of diffusers'
# scripts/convert_flux2_to_diffusers.py, which is black-forest-labs/FLUX.2-klein-4B's
# transformer/config.json (hidden 3072 = 24 heads x 128; 5 double + 20 single blocks; text
# embeddings of 7680 = three stacked Qwen3-4B layers of 2560).
FLUX2_KLEIN_4B = dict(
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)

# What the Flux.2 and FLUX.1 VAE configs share (their encoder / decoder geometry).
_FLUX_VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
    sample_size=1024,
    mid_block_add_attention=True,
)

# Flux.2 VAE (AutoencoderKLFlux2), shared by every Flux.2 model: black-forest-labs/FLUX.2-dev
# vae/config.json, which the klein repos use too (also diffusers 0.42.1's defaults).
FLUX2_VAE = dict(
    _FLUX_VAE_COMMON,
    latent_channels=32,
    use_quant_conv=True,
    use_post_quant_conv=True,
    batch_norm_eps=1e-4,
    batch_norm_momentum=0.1,
    patch_size=(2, 2),
)

# FLUX.1 [dev] transformer: black-forest-labs/FLUX.1-dev transformer/config.json (19 double +
# 38 single blocks, GELU-tanh MLPs with biases, RoPE axes 16/56/56 with theta 10000 fixed in the
# model, T5 text embeddings of 4096, CLIP pooled 768, guidance-distilled).
FLUX1_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# FLUX.1 VAE (AutoencoderKL): black-forest-labs/FLUX.1-dev vae/config.json.
FLUX1_VAE = dict(
    _FLUX_VAE_COMMON,
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# Linears whose output is an AdaLN modulation (shift, scale, gate): small weights, so that
# 1 + scale stays near 1 and the gates well below it, as in trained models.
_MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear")


@torch.no_grad()
def random_weights(model: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Fills every parameter of `model` from N(0, 1) draws scaled for bounded activations: linear
    and conv weights std gain / sqrt(fan_in) (AdaLN modulation projections 0.25 of that), biases
    std 0.05, norm weights 1 + N(0, 0.1^2) and norm biases N(0, 0.05^2). Draws come from a
    generator seeded with `seed` on the parameters' device (a model on the GPU fills in place,
    without a trip through host memory); values are rounded to bf16, so that an f32 and a bf16
    copy of the model hold the same weights. Returns `model`."""
    generators = {}
    filled = set()

    def draw(t, std, mean=0.0):
        if t.device not in generators:
            generators[t.device] = torch.Generator(device=t.device).manual_seed(seed)
        values = torch.randn(t.shape, generator=generators[t.device], device=t.device)
        t.copy_((values * std + mean).to(torch.bfloat16))
        filled.add(id(t))

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = module.weight[0].numel()
            modulation = "modulation" in name or name.endswith(_MODULATION)
            draw(module.weight, gain * (0.25 if modulation else 1.0) / math.sqrt(fan_in))
            if module.bias is not None:
                draw(module.bias, 0.05)
        elif isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)):
            if getattr(module, "weight", None) is not None:
                draw(module.weight, 0.1, 1.0)
            if getattr(module, "bias", None) is not None:
                draw(module.bias, 0.05)
    missed = [name for name, p in model.named_parameters() if id(p) not in filled]
    if missed:
        raise ValueError(f"random_weights: no rule for {missed[:5]} ({len(missed)} parameters)")
    return model
