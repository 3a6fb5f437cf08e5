"""A GGUF model file of the llama or qwen3 architecture: its hyperparameters and its weights as
torch tensors in their stored format.

Weights stay in the file's encoding: Q8_0 as uint8 blocks [N, K / 32 * 34] (ggml's block_q8_0,
{f16 d; int8 qs[32]}, which is kiln's Q8_0 format byte for byte), bf16 and f16 as such, f32
norms as f32. Row order is the file's: rows of attn_q / attn_k are rotated in llama.cpp's
convention for the architecture (adjacent pairs for llama, halves for qwen3; see
kiln.llm.synthetic for what that means against HF checkpoints).
"""

import dataclasses
import math
import struct

import numpy as np

# Architecture -> kiln.rope style (llama.cpp: LLAMA_ROPE_TYPE_NORM for llama, NEOX for qwen3).
ROPE_STYLES = {"llama": "normal", "qwen3": "neox"}
# The tensor types kiln.llm reads (ggml's names).
WEIGHT_TYPES = ("Q8_0", "BF16", "F16", "F32")
# GGUF constants (ggml's gguf.h and ggml.h).
_MAGIC = 0x46554747  # "GGUF", little-endian
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_TYPE_NAMES = {0: "F32", 1: "F16", 8: "Q8_0", 30: "BF16"}


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
    """Hyperparameters (`hparams`) and tensors (`tensor(name)`) of one file.

    The header is parsed here rather than by gguf.GGUFReader, which builds an object per element
    of every metadata array: 18 s for a 152K-token vocabulary on the development machine, against
    a 2 s first-token budget. Arrays are skipped, not decoded (kiln.llm takes token ids); tensors
    are views of a copy-on-write mapping of the file (torch takes them without a copy or a
    warning; the file stays untouched)."""

    def __init__(self, path):
        self.path = str(path)
        self._data = np.memmap(self.path, mode="c")
        self._view = memoryview(self._data)
        self._metadata, self._tensors = self._parse()
        self.hparams = self._hparams()
        self.weight_type = self._tensor_info("token_embd.weight")[1]

    # ---- the GGUF header -----------------------------------------------------------------------

    def _parse(self):
        view, pos = self._view, 0

        def take(fmt):
            nonlocal pos
            values = struct.unpack_from("<" + fmt, view, pos)
            pos += struct.calcsize("<" + fmt)
            return values if len(values) > 1 else values[0]

        def string():
            nonlocal pos
            size = take("Q")
            pos += size
            return bytes(view[pos - size:pos]).decode("utf-8")

        def value(kind):
            nonlocal pos
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                item, count = take("IQ")
                if item == _STRING:  # skipped: each string carries its own length
                    for _ in range(count):
                        size = take("Q")
                        pos += size
                elif item in _SCALARS:
                    pos += count * struct.calcsize(_SCALARS[item])
                else:
                    raise GgufError(f"kiln.llm: {self.path}: metadata array of type {item}")
                return None
            if kind not in _SCALARS:
                raise GgufError(f"kiln.llm: {self.path}: metadata value of unknown type {kind}")
            return take(_SCALARS[kind])

        if len(view) < 24 or take("I") != _MAGIC:
            raise GgufError(f"kiln.llm: {self.path} is not a GGUF file (no GGUF magic)")
        version = take("I")
        if version not in (2, 3):
            raise GgufError(f"kiln.llm: {self.path} is GGUF version {version}, expected 2 or 3")
        n_tensors, n_kv = take("QQ")
        metadata = {}
        for _ in range(n_kv):
            key = string()
            metadata[key] = value(take("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = take("I")
            shape = tuple(reversed([take("Q") for _ in range(dims)]))  # [rows, cols]
            kind, offset = take("IQ")
            infos.append((name, shape, kind, offset))
        alignment = metadata.get("general.alignment", 32)
        base = -(-pos // alignment) * alignment
        tensors = {name: (shape, kind, base + offset) for name, shape, kind, offset in infos}
        return metadata, tensors

    def _tensor_info(self, name: str):
        """(logical shape, type name, file offset) of a tensor."""
        info = self._tensors.get(name)
        if info is None:
            raise GgufError(f"kiln.llm: {self.path} has no tensor {name}")
        shape, kind, offset = info
        return shape, _TYPE_NAMES.get(kind, f"ggml type {kind}"), offset

    def _field(self, key: str, default=None):
        value = self._metadata.get(key)
        if value is None:
            if default is not None:
                return default
            raise GgufError(f"kiln.llm: {self.path} has no metadata key {key!r}")
        return value

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
        scaling = self._metadata.get(f"{arch}.rope.scaling.type")
        if scaling is not None:
            if scaling not in ("none", ""):
                raise GgufError(
                    f"kiln.llm: {self.path} has rope scaling {scaling!r}, expected none"
                )
        n_vocab = int(self._tensor_info("token_embd.weight")[0][0])
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

        logical, kind, offset = self._tensor_info(name)
        if logical != tuple(shape):
            raise GgufError(
                f"kiln.llm: {self.path}: {name} has shape {list(logical)}, expected "
                f"{list(shape)}"
            )
        if kind not in WEIGHT_TYPES:
            raise GgufError(
                f"kiln.llm: {self.path}: {name} is {kind}, expected one of "
                f"{', '.join(WEIGHT_TYPES)}"
            )
        cols = logical[-1]
        if kind == "Q8_0":
            if cols % 32:
                raise GgufError(f"kiln.llm: {self.path}: {name} is Q8_0 with {cols} columns, "
                                "expected a multiple of 32")
            stored = (*logical[:-1], cols // 32 * 34)
        else:
            stored = logical
        dtype = {"Q8_0": np.uint8, "BF16": np.int16, "F16": np.float16, "F32": np.float32}[kind]
        count = math.prod(stored)
        end = offset + count * np.dtype(dtype).itemsize
        if end > len(self._data):
            raise GgufError(f"kiln.llm: {self.path}: {name} ends at byte {end}, past the end of "
                            f"the file ({len(self._data)} bytes)")
        data = torch.from_numpy(np.ndarray(stored, dtype=dtype, buffer=self._data, offset=offset))
        return data.view(torch.bfloat16) if kind == "BF16" else data
