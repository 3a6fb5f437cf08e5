"""kiln.llm: Llama-family GGUF models (llama, qwen3) decoded on kiln's ops.

    import kiln.llm

    model = kiln.llm.load("model.gguf", device="cuda")   # or "cpu": kiln's reference backend
    ids = model.generate([1, 17, 42], max_new_tokens=64)  # greedy ids
    logits = model.logits([1, 17, 42])                    # f32 [T, vocab]

Q8_0, bf16 and f16 weights are read in their stored format; load(..., weights="e4m3fn")
re-quantizes them to fp8 with per-row scales. kiln.llm.synthetic writes random-weight models of
both architectures (Llama-3-8B and Qwen3-8B shapes, and small ones for CPU tests).
"""

from .gguf_file import GgufError, GgufFile, Hparams
from .model import Model, load

__all__ = ["GgufError", "GgufFile", "Hparams", "Model", "load"]
