"""Random-weight GGUF models of the llama and qwen3 architectures, seeded and deterministic, that
llama.cpp loads as it loads a converted checkpoint: kiln.llm's test models and bench files.

    python -m kiln.llm.synthetic llama-small q8_0 out.gguf        # or: kiln.llm.synthetic.write()

Shapes (SHAPES): "llama-8b" is Llama-3-8B (32 layers, hidden 4096, 32 query / 8 KV heads of 128,
MLP 14336, vocab 128256, theta 500000, RMSNorm eps 1e-5); "qwen3-8b" is Qwen3-8B (36 layers,
hidden 4096, 32 / 8 heads of 128, MLP 12288, vocab 151936, QK RMSNorm, theta 1e6, eps 1e-6);
"llama-small" and "qwen3-small" are 2-layer, 256-wide versions with a 384-token vocabulary for
CPU tests (qwen3-small has heads of 64, so its 8 query heads span 512 != hidden, as Qwen3's
smaller models do).

Weight types: "q8_0" (ggml's block_q8_0, quantized by kiln.quantize_q8_0, byte-identical to
ggml's quantize_row_q8_0_ref), "bf16", "f16" for every 2-D tensor; norms are f32, as llama.cpp's
converter writes them.

Rotation convention: llama.cpp rotates adjacent pairs (rows 2i, 2i+1 of each head of
attn_q / attn_k) for the llama architecture (LLAMA_ROPE_TYPE_NORM) and halves (rows i, i + D/2)
for qwen3 (NEOX). These files are written in those orders directly: a llama file is in Meta's
(and llama.cpp's) row order, the order convert_hf_to_gguf.py produces by permuting HF's q_proj /
k_proj rows (HF's LlamaAttention rotates halves); loading one into transformers would need the
inverse permutation, per head: w.reshape(H, 2, D/2, K) <- w.reshape(H, D/2, 2, K).transpose(1, 2).
qwen3 files need no permutation (HF and llama.cpp both rotate halves).

Vocabulary: a made-up SentencePiece ("llama" tokenizer model) vocabulary: <unk>, <s>, </s>, the
256 byte tokens <0x00>..<0xFF>, then "▁w{i}" words with decreasing scores. The real Llama-3 and
Qwen3 tokenizers are BPE; only the size matters here (the models are fed token ids).

Values: random with fixed seeds per tensor (numpy's PCG64 seeded from the model seed and the
tensor name, so a file is the same wherever it is written), scaled so activations stay near
unit RMS through any depth, with a planted successor map that makes greedy decoding robust: the
output head row of token succ(v) is alpha * the embedding of v plus a random part, so the logit
of succ(current token) leads the others by a margin many times the logit error of quantized
activations (llama.cpp quantizes activations to Q8_0 on its CPU path). The layers' contribution
moves every other logit (the random part), so logits compared position by position test every
layer; the greedy path itself follows the successor map.
"""

import argparse
import concurrent.futures
import math
import os
import sys
import zlib

import numpy as np

from .gguf_file import Hparams

WEIGHT_TYPES = ("q8_0", "bf16", "f16")
SEED = 20261207
# Random values are drawn in chunks of this many, each from its own seeded generator.
RANDOM_CHUNK = 1 << 20


SHAPES = {
    "llama-8b": Hparams("llama", 32, 4096, 32, 8, 128, 14336, 128256, 500000.0, 1e-5, 131072),
    "qwen3-8b": Hparams("qwen3", 36, 4096, 32, 8, 128, 12288, 151936, 1000000.0, 1e-6, 40960),
    "llama-small": Hparams("llama", 2, 256, 8, 2, 32, 704, 384, 500000.0, 1e-5, 4096),
    "qwen3-small": Hparams("qwen3", 2, 256, 8, 2, 64, 768, 384, 1000000.0, 1e-6, 4096),
}

# Residual-stream scale: the layers together add about RESIDUAL_SHARE of the embedding's RMS.
RESIDUAL_SHARE = 0.6
# Successor strength and random part of the output head (in units of one embedding row).
HEAD_ALPHA = 0.5
HEAD_BETA = 0.5
# Query / key gain: attention logits of about unit spread (before the 1/sqrt(D) they are
# multiplied by it), so attention is neither uniform nor one-hot.
QK_GAIN = 1.2
# Norm weights: 1 + NORM_SPREAD * N(0, 1).
NORM_SPREAD = 0.1


def tensor_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def successor(shape: Hparams, seed: int):
    """The planted successor map: a random permutation of the token ids (int64 numpy [V])."""
    return np.random.default_rng(tensor_seed(seed, f"{shape.arch}.successor")).permutation(
        shape.n_vocab)


def tensor_names(shape: Hparams) -> list[str]:
    """Tensor names in file order (llama.cpp's names)."""
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(shape.n_layer):
        block = [
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
            "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
        ]
        if shape.qk_norm:
            block[4:4] = ["attn_q_norm", "attn_k_norm"]
        names += [f"blk.{i}.{part}.weight" for part in block]
    return names


def tensor_shape(shape: Hparams, name: str) -> tuple:
    """[rows, cols] of a 2-D weight (rows = output features), or [n] of a norm."""
    q_dim, kv_dim = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    part = name.split(".")[-2]
    return {
        "token_embd": (shape.n_vocab, shape.n_embd),
        "output": (shape.n_vocab, shape.n_embd),
        "output_norm": (shape.n_embd,),
        "attn_norm": (shape.n_embd,),
        "ffn_norm": (shape.n_embd,),
        "attn_q_norm": (shape.head_dim,),
        "attn_k_norm": (shape.head_dim,),
        "attn_q": (q_dim, shape.n_embd),
        "attn_k": (kv_dim, shape.n_embd),
        "attn_v": (kv_dim, shape.n_embd),
        "attn_output": (shape.n_embd, q_dim),
        "ffn_gate": (shape.n_ff, shape.n_embd),
        "ffn_up": (shape.n_ff, shape.n_embd),
        "ffn_down": (shape.n_embd, shape.n_ff),
    }[part]


def _randn(torch, size, seed: int, device):
    """Standard normal f32 values from numpy's PCG64, on device: chunk i of RANDOM_CHUNK values
    comes from the generator seeded with (seed, i), so the values are the same on every machine
    while the chunks are drawn in parallel (numpy releases the GIL while it fills)."""
    count = math.prod(size)
    values = np.empty(count, dtype=np.float32)

    def fill(i):
        chunk = values[i * RANDOM_CHUNK:(i + 1) * RANDOM_CHUNK]
        np.random.default_rng([seed, i]).standard_normal(chunk.size, dtype=np.float32, out=chunk)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(fill, range(-(-count // RANDOM_CHUNK))))
    return torch.from_numpy(values.reshape(size)).to(device)


def make_tensor(torch, shape: Hparams, name: str, seed: int, device, embedding=None):
    """One f32 tensor of the model. `embedding` (token_embd.weight) is needed for the output
    head."""
    size = tensor_shape(shape, name)
    part = name.split(".")[-2]
    x = _randn(torch, size, tensor_seed(seed, name), device)
    if len(size) == 1:
        return 1 + NORM_SPREAD * x
    fan_in = size[1]
    # Per-sublayer gain so that 2 * n_layer sublayers add RESIDUAL_SHARE of unit RMS in total.
    layer_gain = RESIDUAL_SHARE / (2 * shape.n_layer) ** 0.5
    if part == "token_embd":
        return x
    if part == "output":
        pred = torch.from_numpy(np.argsort(successor(shape, seed))).to(device)  # succ^-1
        return (HEAD_ALPHA * embedding[pred] + HEAD_BETA * x) / shape.n_embd**0.5
    if part in ("attn_q", "attn_k"):
        return x * (QK_GAIN / fan_in**0.5)
    if part == "attn_v":
        return x / fan_in**0.5
    if part == "attn_output":
        # The attention output is an average of unit-RMS values: about 0.7 RMS.
        return x * (layer_gain / 0.7 / fan_in**0.5)
    if part in ("ffn_gate", "ffn_up"):
        return x / fan_in**0.5
    # ffn_down: silu(gate) * up of unit-RMS gate and up has about 0.6 RMS.
    return x * (layer_gain / 0.6 / fan_in**0.5)


def _encode(torch, kiln, tensor, wtype: str):
    """(numpy array to write, GGML type) for one f32 tensor."""
    import gguf

    if tensor.dim() == 1:
        return tensor.cpu().numpy(), None
    if wtype == "q8_0":
        return kiln.quantize_q8_0(tensor).cpu().numpy(), gguf.GGMLQuantizationType.Q8_0
    if wtype == "bf16":
        bits = tensor.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
        return bits, gguf.GGMLQuantizationType.BF16
    return tensor.to(torch.float16).cpu().numpy(), None


def _vocabulary(n_vocab: int):
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    words = n_vocab - len(tokens)
    if words < 0:
        raise ValueError(f"kiln.llm.synthetic: vocabulary of {n_vocab}, expected at least 259")
    tokens += [f"\u2581w{i}" for i in range(words)]
    types += [gguf.TokenType.NORMAL] * words
    scores = [0.0] * 259 + [-float(i) for i in range(words)]
    return tokens, scores, types


def write(path, shape_name: str, wtype: str, *, seed: int = SEED, device="cpu",
          progress=None) -> None:
    """Writes the model `shape_name` (a SHAPES key) with 2-D weights of `wtype` to `path`.
    device: where the values are scaled and quantized ("cuda" makes the 8B shapes' Q8_0
    quantization quick; the bytes are the same). progress(i, n, name) is called per tensor."""
    import gguf
    import torch

    import kiln

    shape = SHAPES[shape_name]
    if wtype not in WEIGHT_TYPES:
        raise ValueError(f"kiln.llm.synthetic: weight type {wtype!r}, expected {WEIGHT_TYPES}")
    arch = shape.arch
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"kiln synthetic {shape_name} {wtype} seed {seed}")
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_file_type({
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
    }[wtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = _vocabulary(shape.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    names = tensor_names(shape)
    q8_type = gguf.GGMLQuantizationType.Q8_0
    for name in names:
        size = tensor_shape(shape, name)
        if len(size) == 1:
            writer.add_tensor_info(name, size, np.dtype(np.float32), size[0] * 4)
        elif wtype == "q8_0":
            nbytes = size[0] * size[1] // 32 * 34
            writer.add_tensor_info(name, (size[0], size[1] // 32 * 34), np.dtype(np.uint8),
                                   nbytes, raw_dtype=q8_type)
        elif wtype == "bf16":
            writer.add_tensor_info(name, size, np.dtype(np.uint16), size[0] * size[1] * 2,
                                   raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor_info(name, size, np.dtype(np.float16), size[0] * size[1] * 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    device = torch.device(device)
    embedding = None
    with torch.no_grad():
        for i, name in enumerate(names):
            if progress is not None:
                progress(i, len(names), name)
            tensor = make_tensor(torch, shape, name, seed, device, embedding)
            if name == "token_embd.weight":
                embedding = tensor
            data, _ = _encode(torch, kiln, tensor, wtype)
            writer.write_tensor_data(data)
            del tensor, data
    writer.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.llm.synthetic", description=__doc__)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("wtype", choices=WEIGHT_TYPES)
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--device", default="cpu", help="where to draw and quantize (cpu, cuda)")
    args = parser.parse_args(argv)

    def progress(i, n, name):
        print(f"\r[{i + 1}/{n}] {name:40s}", end="", file=sys.stderr, flush=True)

    write(args.path, args.shape, args.wtype, seed=args.seed, device=args.device,
          progress=progress)
    print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
