"""Run diffusers' Flux.2 and FLUX.1 transformers and their VAE decoders on kiln.

    import torch, kiln.diffusers
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(..., torch_dtype=torch.bfloat16).to("cuda")
    handle = kiln.diffusers.apply(pipe)            # transformer (fp8 weights) + VAE decoder
    image = pipe("a fox in the snow", num_inference_steps=4).images[0]
    handle.remove()                                # diffusers' own forwards and weights again

kiln.diffusers.apply(target, *, weights="fp8", activations="auto", graphs=True,
                     offload_replaced=True) -> Handle

target: a diffusers pipeline (its `transformer` and `vae` components), a Flux2Transformer2DModel
   or FluxTransformer2DModel, or an AutoencoderKLFlux2 / AutoencoderKL. Anything else, or a
   known model with a part kiln does not know (a LoRA adapter, a KV-cache or IP-adapter
   processor, fused QKV projections, accelerate hooks or diffusers hooks other than context
   parallelism's, tensor parallelism, a compiled block), is refused whole with
   kiln.UnsupportedError naming the part: nothing is changed.
weights: "fp8": every linear of the transformer is quantized once, here, to fp8 e4m3 with one
   scale per output channel; "bf16": the model's own weights through cuBLAS (F.linear). Both
   run every non-GEMM part of a block on kiln's fused ops.
activations (fp8 weights only): "fp8" quantizes the activations per token inside the fused op
   before each GEMM (kiln.layer_norm / kiln.glu / kiln.gelu_tanh with quantize=) and runs fp8 x
   fp8 GEMMs with the AdaLN gate and the residual add in their epilogue; "bf16" keeps bf16
   activations and decodes the fp8 weights in registers (kiln.matmul path "gemm"), what GPUs
   without fp8 tensor cores run; "auto" (default) picks "fp8" on sm_89 and newer (and on CPU)
   and "bf16" on sm_80 to sm_87. Pass "bf16" on a Hopper GPU to measure the Ampere path there.
graphs: capture the transformer's forward as a CUDA graph per input shape and replay it
   (CUDA only; a capture that fails runs eagerly, said once in the log).
offload_replaced: with fp8 weights, move the bf16 weights kiln replaced to host memory while
   applied (the model keeps zero-cost stand-ins of the same shape, so its device and dtype read
   as before; its state_dict() does not hold the weights until remove()). False keeps both.

Handle.remove() restores every forward, processor and weight (the model's outputs are then
bit-identical to before apply); a Handle is also a context manager. Apply after the model is on
its device and dtype: kiln's weights do not follow a later .to(); remove() first. apply logs one line on the
"kiln.diffusers" logger saying what it replaced.

What runs where (transformer block, per stream): LayerNorm + AdaLN shift/scale (+ fp8 quantize)
in kiln.layer_norm; Q, K, V as one GEMM (kiln.matmul fp8, or cuBLAS); QK RMSNorm + RoPE +
head-major layout in kiln.rope_flux, written into the text or image row range of one joint
attention input (no concatenation); kiln.attention; the out projection with gate and residual in
the epilogue; the MLP with SwiGLU (Flux.2) or GELU-tanh (FLUX.1) fused with the next quantize.
The single-stream block's output projection runs as two GEMMs over its attention and MLP column
ranges, so [attention, MLP] is never concatenated. VAE decoder: kiln.conv2d for every
convolution, kiln.group_norm with fused SiLU, the mid-block attention through kiln.attention
(head dims up to 256: the Flux VAEs' single 512-wide head runs on torch SDPA, said in the log).
The model's own forward (timestep embedding, RoPE tables, patchify) stays diffusers'.

Several GPUs: under diffusers' context parallelism (model.enable_parallelism(config=
ContextParallelConfig(ulysses_degree=..., ring_degree=...)), before or after apply) diffusers
splits the tokens over the ranks and gathers the output, and kiln's blocks run the attention
step across ranks over diffusers' process groups: Ulysses all-to-alls, ring attention with the
next K/V block in flight, or both; uneven shares (ulysses_anything / ring_anything) too. CUDA
graphs stay on (the NCCL collectives are captured; every rank captures and replays in step).
Tensor parallelism is refused. See kiln.diffusers._parallel.

Written against diffusers 0.42.1 (DIFFUSERS_VERSION; another version logs a warning and is
still checked part by part).
"""

from ._apply import DIFFUSERS_VERSION, Handle, apply

__all__ = ["DIFFUSERS_VERSION", "Handle", "apply"]
