"""The "Kiln" node: kiln's parts on or off for one model (and its VAE)."""

from . import parts
from . import vae as vae_hooks


class Kiln:
    DESCRIPTION = (
        "Turns kiln's parts on or off for this model and VAE: Flux blocks (QK RMSNorm + RoPE, "
        "attention, AdaLN norms, GEMM epilogues), linears with fp8 weights, the VAE decoder's "
        "convolutions. Without this node every part is on (KILN_COMFY_PARTS sets the default)."
    )
    CATEGORY = "advanced/kiln"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "VAE")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL",),
                "attention": ("BOOLEAN", {"default": True, "tooltip": (
                    "Flux blocks on kiln: QK RMSNorm + RoPE, attention, AdaLN norms, GEMM "
                    "epilogues")}),
                "fp8_linear": ("BOOLEAN", {"default": True, "tooltip": (
                    "linears with fp8 weights on kiln, never dequantized: fp8 x fp8 with "
                    "per-token scales (sm_89+), fp8 weights decoded in registers (sm_80/86)")}),
                "vae_conv2d": ("BOOLEAN", {"default": True,
                                           "tooltip": "VAE decoder convolutions on kiln"}),
            },
            "optional": {"vae": ("VAE",)},
        }

    def apply(self, model, attention, fp8_linear, vae_conv2d, vae=None):
        import comfy.patcher_extension

        kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        model = model.clone()
        model.remove_wrappers_with_key(kind, "kiln")
        model.add_wrapper_with_key(kind, "kiln", parts.diffusion_model_wrapper(
            {"attention": attention, "fp8_linear": fp8_linear}))
        if vae is not None:
            vae = vae_hooks.with_conv2d(vae, vae_conv2d)
        return (model, vae)
