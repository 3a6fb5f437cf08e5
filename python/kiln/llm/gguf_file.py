"""A GGUF model file of the llama or qwen3 architecture, read with the `gguf` package: its
hyperparameters and its weights as torch tensors in their stored format.

Weights stay in the file's encoding: Q8_0 as uint8 blocks [N, K / 32 * 34] (ggml's block_q8_0,
{f16 d; int8 qs[32]}, which is kiln's Q8_0 format byte for byte), bf16 and f16 as such, f32
norms as f32. Row order is the file's: rows of attn_q / attn_k are rotated in llama.cpp's
convention for the architecture (adjacent pairs for llama, halves for qwen3; see
kiln.llm.synthetic for what that means against HF checkpoints).
"""

import dataclasses

import numpy as np

# Architecture -> kiln.rope style (llama.cpp: LLAMA_ROPE_TYPE_NORM for llama, NEOX for qwen3).
ROPE_STYLES = {"llama": "normal", "qwen3": "neox"}
# GGML type name -> how kiln reads it.
WEIGHT_TYPES = ("Q8_0", "BF16", "F16", "F32")


class GgufError(ValueError):
    """A file kiln.llm cannot run: says which file, what is wrong and what was expected."""


@dataclasses.dataclass(frozen=True)
class Hparams:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    rope_theta: float
    rms_eps: float
    context_length: int

    @property
    def style(self) -> str:
        return ROPE_STYLES[self.arch]

    @property
    def qk_norm(self) -> bool:
        return self.arch == "qwen3"


class GgufFile:
    """Hyperparameters (`hparams`) and tensors (`tensor(name)`) of one file."""

    def __init__(self, path):
        import gguf

        self.path = str(path)
        # Copy-on-write mapping: tensors become writable numpy views (torch takes them without
        # a copy or a warning) while the file stays untouched.
        self.reader = gguf.GGUFReader(self.path, mode="c")
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.hparams = self._hparams()
        self.weight_type = self._tensors["token_embd.weight"].tensor_type.name

    def _field(self, key: str, default=None):
        field = self.reader.get_field(key)
        if field is None:
            if default is not None:
                return default
            raise GgufError(f"kiln.llm: {self.path} has no metadata key {key!r}")
        return field.contents()

    def _hparams(self) -> Hparams:
        arch = self._field("general.architecture")
        if arch not in ROPE_STYLES:
            raise GgufError(
                f"kiln.llm: {self.path} is a {arch!r} model, expected one of "
                f"{', '.join(sorted(ROPE_STYLES))}"
            )
        n_embd = int(self._field(f"{arch}.embedding_length"))
        n_head = int(self._field(f"{arch}.attention.head_count"))
        head_dim = int(self._field(f"{arch}.attention.key_length", n_embd // n_head))
        value_dim = int(self._field(f"{arch}.attention.value_length", head_dim))
        if value_dim != head_dim:
            raise GgufError(
                f"kiln.llm: {self.path} has key length {head_dim} and value length {value_dim}, "
                "expected them equal"
            )
        rope_dims = int(self._field(f"{arch}.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise GgufError(
                f"kiln.llm: {self.path} rotates {rope_dims} of {head_dim} dims per head, "
                "expected the whole head (partial rotary is not supported)"
            )
        if self.reader.get_field(f"{arch}.rope.scaling.type") is not None:
            scaling = self._field(f"{arch}.rope.scaling.type")
            if scaling not in ("none", ""):
                raise GgufError(
                    f"kiln.llm: {self.path} has rope scaling {scaling!r}, expected none"
                )
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise GgufError(f"kiln.llm: {self.path} has no token_embd.weight")
        n_vocab = int(embd.shape[1])
        return Hparams(
            arch=arch,
            n_layer=int(self._field(f"{arch}.block_count")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(self._field(f"{arch}.attention.head_count_kv", n_head)),
            head_dim=head_dim,
            n_ff=int(self._field(f"{arch}.feed_forward_length")),
            n_vocab=n_vocab,
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon")),
            context_length=int(self._field(f"{arch}.context_length")),
        )

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str, shape: tuple):
        """The tensor `name` as a CPU torch tensor in its stored format, checked against the
        logical `shape` ([rows, cols] or [n]): f32 / f16 / bf16 [rows, cols], or uint8 Q8_0
        blocks [rows, cols / 32 * 34]."""
        import torch

        t = self._tensors.get(name)
        if t is None:
            raise GgufError(f"kiln.llm: {self.path} has no tensor {name}")
        logical = tuple(int(d) for d in reversed(t.shape.tolist()))
        if logical != tuple(shape):
            raise GgufError(
                f"kiln.llm: {self.path}: {name} has shape {list(logical)}, expected "
                f"{list(shape)}"
            )
        kind = t.tensor_type.name
        if kind not in WEIGHT_TYPES:
            raise GgufError(
                f"kiln.llm: {self.path}: {name} is {kind}, expected one of "
                f"{', '.join(WEIGHT_TYPES)}"
            )
        data = t.data
        if kind == "BF16":  # stored as bytes [rows, 2 * cols]
            data = np.ascontiguousarray(data).view(np.int16).reshape(shape)
            return torch.from_numpy(data).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(data))
