"""Tiny diffusers Flux.2 / FLUX.1 models and their inputs, shared by test_diffusers.py and
test_diffusers_parallel.py (one definition of each).

Models are the real configs (kiln.diffusers.configs) with fewer, narrower blocks (heads of the
real 128), filled with random bf16-representable weights (configs.random_weights), saved with
save_pretrained and loaded back with from_pretrained, so the real loading code runs.
"""

import torch

from kiln.diffusers import configs

BATCH = 2  # two batch elements with different timesteps: per-batch gates and modulations
TEXT_TOKENS = 12
LATENT = 6  # latent grid of the transformer inputs (tokens = LATENT^2)
FAMILIES = ["flux2", "flux1"]


def tiny_config(family: str, heads: int = 2) -> dict:
    """The real config of `family` with 2 double + 2 single blocks of `heads` heads of 128."""
    if family == "flux2":
        return {**configs.FLUX2_KLEIN_4B, "num_layers": 2, "num_single_layers": 2,
                "num_attention_heads": heads, "joint_attention_dim": 192}
    return {**configs.FLUX1_DEV, "num_layers": 2, "num_single_layers": 2,
            "num_attention_heads": heads, "joint_attention_dim": 192,
            "pooled_projection_dim": 64}


TINY_FLUX2 = tiny_config("flux2")
TINY_FLUX1 = tiny_config("flux1")
TINY_VAE = {"block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2}


def transformer_class(family: str):
    import diffusers

    return diffusers.Flux2Transformer2DModel if family == "flux2" else \
        diffusers.FluxTransformer2DModel


def relative_error(got, want) -> float:
    want = want.double()
    norm = want.norm().item()
    assert norm > 0, "reference is all zeros: the comparison would pass vacuously"
    got = got.double()
    assert torch.isfinite(got).all(), "output holds NaN or inf"
    return ((got - want).norm() / norm).item()


def saved(folder, cls, config, seed):
    """Saves a randomly initialized `cls(**config)` to `folder` and loads it back in f32 and
    bf16."""
    configs.random_weights(cls(**config), seed).save_pretrained(folder)
    f32 = cls.from_pretrained(folder, torch_dtype=torch.float32).eval()
    bf16 = cls.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    return {"f32": f32, "bf16": bf16, "folder": folder, "cls": cls}


def transformer_inputs(family, model, dtype, device="cpu", latent=LATENT, text=TEXT_TOKENS,
                       batch=BATCH):
    """Keyword arguments of a transformer forward as the pipelines build them (fresh random
    latents and text embeddings, one timestep per batch element, position ids: Flux.2's with a
    batch dimension, as Flux2KleinPipeline passes them and its context-parallel plan splits
    them). latent: the latent grid, square (an int) or (rows, cols)."""
    config = model.config
    rows, cols = (latent, latent) if isinstance(latent, int) else latent
    tokens = rows * cols
    hidden = torch.randn(batch, tokens, config.in_channels, device=device).to(dtype)
    context = torch.randn(batch, text, config.joint_attention_dim, device=device).to(dtype)
    # Timesteps and guidance whose x1000 the bf16 models hold exactly (diffusers rounds them to
    # the model's dtype before the sinusoidal embedding): the errors measured are the blocks'.
    timestep = torch.tensor([0.5, 0.25, 0.125, 0.375][:batch], device=device)
    grid_rows, grid_cols = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    if family == "flux2":
        zeros = torch.zeros(tokens)
        img_ids = torch.stack([zeros, grid_rows.flatten(), grid_cols.flatten(), zeros], -1)
        txt_ids = torch.zeros(text, 4)
        txt_ids[:, 3] = torch.arange(text)
        img_ids, txt_ids = img_ids.expand(batch, -1, -1), txt_ids.expand(batch, -1, -1)
        extra = {}
    else:
        img_ids = torch.stack([torch.zeros(tokens), grid_rows.flatten(), grid_cols.flatten()],
                              -1)
        txt_ids = torch.zeros(text, 3)
        extra = {"pooled_projections": torch.randn(batch, config.pooled_projection_dim,
                                                   device=device).to(dtype),
                 "guidance": torch.full((batch,), 4.0, device=device)}
    return {"hidden_states": hidden, "encoder_hidden_states": context, "timestep": timestep,
            "img_ids": img_ids.to(device), "txt_ids": txt_ids.to(device), "return_dict": False,
            **extra}


def in_dtype(inputs, dtype):
    """The same inputs with the activations (not ids or timesteps) in `dtype`."""
    cast = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    return {k: v.to(dtype) if k in cast else v for k, v in inputs.items()}


@torch.no_grad()
def forward(model, inputs):
    return model(**inputs)[0]
