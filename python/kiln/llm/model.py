"""A Llama-family decoder (llama, qwen3) run on kiln's ops: prefill and greedy decode.

One layer, for T tokens at positions p..p+T-1 (batch 1; x is the f32 residual stream [T, D]):

    h   = rms_norm(x, attn_norm)                          bf16 [T, D]
    qkv = matmul(h, w_qkv)                                bf16 [T, (Hq + 2 Hkv) * hd]  (Q, K, V
                                                          weights concatenated: one GEMV)
    q   = rope(qkv[Q], positions, norm_weight=q_norm)     bf16 [1, Hq, T, hd]
          rope(qkv[K], positions, norm_weight=k_norm, cache=k_cache)   K rotated into the cache
          rope(qkv[V], positions, theta=None, cache=v_cache)           V copied into the cache
    o   = attention(q, k_cache, v_cache)                  causal prefill over the cache's first
                                                          p + T rows; decode (T = 1): split-KV
                                                          over a context bucket with kv_len
    x   = matmul(o, w_o, residual=x)                      f32: the residual add in the epilogue
    h   = rms_norm(x, ffn_norm)
    g   = glu(matmul(h, w_gate_up))                       silu(gate) * up, gate and up weights
                                                          concatenated: one GEMV
    x   = matmul(g, w_down, residual=x)

then logits = matmul(rms_norm(x, output_norm), w_output) in f32 and argmax. The KV cache is bf16
[1, Hkv, S, hd] per layer. Weights are read in the file's format (Q8_0 blocks, bf16, f16), or
fp8 e4m3 with per-row scales quantized at load (weights="e4m3fn"). On CUDA a Q8_0 matmul with
more rows than the GEMV takes (prefill) multiplies a copy kiln.prepare_weight makes for that call
(on sm_90 the bf16 weight that cuBLASLt multiplies, on sm_80 the GEMM's packed layout): the GEMM
would otherwise gather ggml's 2-byte-aligned blocks element by element (4.5x slower than fp8
weights at M = 16, matmul NOTES). The copy, at most the largest weight's size in bf16, lives for
the call; the decode steps read the file's blocks.

On CUDA each decode step is captured as one CUDA graph per context bucket (the attention reads
the first `bucket` rows of the cache; kv_len hides the rest), with the token id, position and
kv_len in device buffers that the graph itself advances, so steps replay back to back with no
host synchronization. On CPU every op runs kiln's reference backend.
"""

import logging
import os

from .gguf_file import GgufFile

log = logging.getLogger("kiln.llm")

# Smallest decode bucket (keys attended per step); buckets double up to the cache length.
MIN_BUCKET = 256
# Prefill runs in chunks of at most this many tokens (bounds the activations' memory).
PREFILL_CHUNK = 4096
WEIGHT_FORMATS = (None, "e4m3fn")


def _buckets(context: int) -> list[int]:
    buckets = [MIN_BUCKET]
    while buckets[-1] < context:
        buckets.append(buckets[-1] * 2)
    return [min(b, context) for b in buckets]


class Layer:
    __slots__ = ("attn_norm", "w_qkv", "q_norm", "k_norm", "w_o", "ffn_norm", "w_gate_up",
                 "w_down")


class Weight:
    """A matmul weight as kiln.matmul takes it: data (Q8_0 blocks, bf16, f16 or fp8) and the
    fp8 row scale (None otherwise)."""

    __slots__ = ("data", "scale")

    def __init__(self, data, scale=None):
        self.data, self.scale = data, scale

    @property
    def nbytes(self) -> int:
        scale = 0 if self.scale is None else self.scale.numel() * 4
        return self.data.numel() * self.data.element_size() + scale


class Model:
    """A loaded model (see kiln.llm.load). `hparams` holds its shape, `weight_bytes` the bytes
    of its matmul weights, `kv_bytes_per_token` the KV cache bytes one token adds."""

    def __init__(self, path, device="cuda", *, context=4096, weights=None, graphs=True):
        import torch

        import kiln

        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"kiln.llm: weights={weights!r}, expected None (the file's format) "
                             "or 'e4m3fn'")
        self.torch, self.kiln = torch, kiln
        self.device = torch.device(device)
        self.file = GgufFile(path)
        hp = self.hparams = self.file.hparams
        self.weight_format = weights or self.file.weight_type.lower()
        self.context = int(context)
        if self.context < 1:
            raise ValueError(f"kiln.llm: context={context}, expected >= 1")
        self.act_dtype = torch.bfloat16
        self._logged_prepare = False
        self._load_weights(weights)

        S, dev = self.context, self.device
        self.k_cache = [torch.zeros(1, hp.n_head_kv, S, hp.head_dim, dtype=torch.bfloat16,
                                    device=dev) for _ in range(hp.n_layer)]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        self.kv_bytes_per_token = 2 * hp.n_layer * hp.n_head_kv * hp.head_dim * 2
        self.length = 0  # tokens in the cache
        # Decode step state, in device buffers a captured graph reads and advances.
        self._step_token = torch.zeros(1, dtype=torch.int64, device=dev)
        self._step_pos = torch.zeros(1, 1, dtype=torch.int32, device=dev)
        self._step_kv_len = torch.zeros(1, dtype=torch.int32, device=dev)
        self._tokens = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        self._graphs = {}
        self._graph_pool = None
        self._use_graphs = graphs and self.device.type == "cuda" and \
            os.environ.get("KILN_LLM_GRAPHS", "1") != "0"
        if self.device.type == "cuda" and not self._use_graphs:
            log.warning("kiln.llm: CUDA graphs off (graphs=False or KILN_LLM_GRAPHS=0): decode "
                        "steps launch eagerly")

    # ---- loading -------------------------------------------------------------------------

    def _load_weights(self, weights) -> None:
        torch, hp, f = self.torch, self.hparams, self.file
        D, hd, F = hp.n_embd, hp.head_dim, hp.n_ff
        q_dim, kv_dim = hp.n_head * hd, hp.n_head_kv * hd

        def vector(name, n):
            return f.tensor(name, (n,)).to(self.device, torch.float32)

        def matrix(names, rows, cols):
            # Each part goes to the device as it is mapped, the concatenation happens there.
            parts = [f.tensor(name, (n, cols)).to(self.device) for name, n in zip(names, rows)]
            return self._weight(parts[0] if len(parts) == 1 else torch.cat(parts, 0), weights)

        self.tok_embd = f.tensor("token_embd.weight", (hp.n_vocab, D)).to(self.device)
        self.output_norm = vector("output_norm.weight", D)
        self.output = matrix(["output.weight"], [hp.n_vocab], D)
        self.layers = []
        for i in range(hp.n_layer):
            b = f"blk.{i}."
            layer = Layer()
            layer.attn_norm = vector(b + "attn_norm.weight", D)
            layer.w_qkv = matrix([b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"],
                                 [q_dim, kv_dim, kv_dim], D)
            layer.q_norm = vector(b + "attn_q_norm.weight", hd) if hp.qk_norm else None
            layer.k_norm = vector(b + "attn_k_norm.weight", hd) if hp.qk_norm else None
            layer.w_o = matrix([b + "attn_output.weight"], [D], q_dim)
            layer.ffn_norm = vector(b + "ffn_norm.weight", D)
            layer.w_gate_up = matrix([b + "ffn_gate.weight", b + "ffn_up.weight"], [F, F], D)
            layer.w_down = matrix([b + "ffn_down.weight"], [D], F)
            self.layers.append(layer)
        matrices = [self.output] + [w for layer in self.layers
                                    for w in (layer.w_qkv, layer.w_o, layer.w_gate_up,
                                              layer.w_down)]
        self.weight_bytes = sum(w.nbytes for w in matrices)

    def _weight(self, data, weights) -> Weight:
        """A file weight as kiln.matmul reads it, or re-quantized to fp8 e4m3 with row scales."""
        if weights is None:
            return Weight(data)
        kiln, torch = self.kiln, self.torch
        dense = kiln.dequantize(data) if data.dtype == torch.uint8 else data.float()
        q, scale = kiln.quantize_fp8(dense, "e4m3fn", "row")
        return Weight(q, scale)

    # ---- the forward pass --------------------------------------------------------------------

    def _embed(self, ids):
        """f32 [T, D] embedding rows of device ids [T]."""
        rows = self.tok_embd.index_select(0, ids)
        if rows.dtype == self.torch.uint8:
            return self.kiln.dequantize(rows, out_dtype="f32")
        return rows.float()

    def _matmul(self, a, w: Weight, out_dtype, residual=None):
        data = w.data
        if (data.dtype == self.torch.uint8 and data.is_cuda
                and self.kiln.select_path(a.shape[0], data) == "gemm"):
            if not self._logged_prepare:
                self._logged_prepare = True
                log.info("kiln.llm: Q8_0 matmuls of more than the GEMV's rows multiply a copy "
                         "prepared per call (kiln.prepare_weight): the GEMM reads ggml's blocks "
                         "element by element")
            data = self.kiln.prepare_weight(data)
        return self.kiln.matmul(a, data, w_scale=w.scale, out_dtype=out_dtype,
                                residual=residual)

    def _forward(self, ids, positions, start: int, kv_len=None, bucket=None, all_rows=False):
        """Logits f32 [T, V] (or [1, V], the last row, unless all_rows) of tokens `ids` [T] at
        `positions` [1, T] (i32, device); the cache holds `start` tokens before them. Prefill
        (kv_len None): causal attention over the cache's first start + T rows. Decode (T = 1):
        attention over the first `bucket` rows, keys at or past kv_len [1] hidden."""
        kiln, torch, hp = self.kiln, self.torch, self.hparams
        T = ids.shape[0]
        hq, hkv, hd = hp.n_head, hp.n_head_kv, hp.head_dim
        act, eps = self.act_dtype, hp.rms_eps
        x = self._embed(ids)  # f32 [T, D]
        for i, layer in enumerate(self.layers):
            h = kiln.rms_norm(x, layer.attn_norm, eps=eps, out_dtype=act)
            qkv = self._matmul(h, layer.w_qkv, act).view(1, T, hq + 2 * hkv, hd)
            q = kiln.rope(qkv[:, :, :hq], positions, theta=hp.rope_theta, style=hp.style,
                          norm_weight=layer.q_norm, eps=eps)  # [1, Hq, T, hd]
            kiln.rope(qkv[:, :, hq:hq + hkv], positions, theta=hp.rope_theta, style=hp.style,
                      norm_weight=layer.k_norm, eps=eps, cache=self.k_cache[i])
            kiln.rope(qkv[:, :, hq + hkv:], positions, theta=None, cache=self.v_cache[i])
            # Written token-major ([T, Hq * hd], as the output projection reads it).
            o = q.new_empty(T, hq * hd)
            heads_view = o.view(1, T, hq, hd).transpose(1, 2)  # [1, Hq, T, hd]
            if kv_len is None:
                rows = start + T
                kiln.attention(q, self.k_cache[i][:, :, :rows], self.v_cache[i][:, :, :rows],
                               causal=True, out=heads_view)
            else:
                kiln.attention(q, self.k_cache[i][:, :, :bucket], self.v_cache[i][:, :, :bucket],
                               kv_len=kv_len, out=heads_view)
            x = self._matmul(o, layer.w_o, torch.float32, residual=x)
            h = kiln.rms_norm(x, layer.ffn_norm, eps=eps, out_dtype=act)
            g = kiln.glu(self._matmul(h, layer.w_gate_up, act), activation="silu")
            x = self._matmul(g, layer.w_down, torch.float32, residual=x)
        if not all_rows:
            x = x[T - 1:]
        h = kiln.rms_norm(x, self.output_norm, eps=eps, out_dtype=act)
        return self._matmul(h, self.output, torch.float32)

    # ---- prefill and decode ------------------------------------------------------------------

    def reset(self) -> None:
        """Empties the KV cache (the next prefill starts a new sequence)."""
        self.length = 0

    def _check_room(self, tokens: int) -> None:
        if self.length + tokens > self.context:
            raise ValueError(
                f"kiln.llm: {self.length} cached + {tokens} new tokens exceed the context of "
                f"{self.context} (load(..., context=N) sets it)"
            )

    def _ids(self, ids):
        torch = self.torch
        if isinstance(ids, torch.Tensor):
            ids = ids.to(self.device, torch.int64).reshape(-1)
        else:
            ids = torch.tensor(list(ids), dtype=torch.int64, device=self.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.hparams.n_vocab):
            raise ValueError(
                f"kiln.llm: token ids must lie in [0, {self.hparams.n_vocab}), got "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        return ids

    def prefill(self, ids, all_rows=False):
        """Appends tokens `ids` to the cache; returns the f32 logits of the last one [1, V] (of
        every one [T, V] with all_rows). Runs in chunks of PREFILL_CHUNK tokens."""
        torch = self.torch
        ids = self._ids(ids)
        T = ids.numel()
        if T == 0:
            raise ValueError("kiln.llm: prefill of no tokens")
        self._check_room(T)
        outputs = []
        with torch.no_grad():
            for first in range(0, T, PREFILL_CHUNK):
                chunk = ids[first:first + PREFILL_CHUNK]
                n = chunk.numel()
                positions = torch.arange(self.length, self.length + n, dtype=torch.int32,
                                         device=self.device).view(1, n)
                last = first + n == T
                if all_rows or last:
                    outputs.append(self._forward(chunk, positions, self.length,
                                                 all_rows=all_rows))
                else:
                    self._forward(chunk, positions, self.length)
                self.length += n
        return torch.cat(outputs, 0) if all_rows else outputs[-1]

    def logits(self, ids):
        """f32 [T, V] logits of every position of the sequence `ids` (a fresh sequence)."""
        self.reset()
        return self.prefill(ids, all_rows=True)

    def _bucket(self, kv_len: int) -> int:
        for bucket in _buckets(self.context):
            if bucket >= kv_len:
                return bucket
        raise AssertionError("unreachable: kv_len within the context")

    def _step_body(self, bucket: int):
        """One decode step on the device buffers: the logits [1, V] of _step_token at _step_pos
        (returned); their argmax becomes the next _step_token, recorded in _tokens, and position
        and kv_len advance. Everything here is capturable."""
        torch = self.torch
        logits = self._forward(self._step_token, self._step_pos, 0, kv_len=self._step_kv_len,
                               bucket=bucket)
        nxt = logits.argmax(dim=-1)  # i64 [1]
        self._step_token.copy_(nxt)
        self._tokens.index_copy_(0, self._step_pos.view(1).to(torch.int64) + 1, nxt)
        self._step_pos.add_(1)
        self._step_kv_len.add_(1)
        return logits

    def _step(self, bucket: int):
        """One decode step, replayed from the bucket's graph when there is one; returns the
        step's logits (the graph's output buffer when replayed)."""
        if not self._use_graphs:
            return self._step_body(bucket)
        captured = self._graphs.get(bucket)
        if captured is not None:
            graph, logits = captured
            graph.replay()
            return logits
        # First step in this bucket: run it eagerly (this also compiles its kernels), then
        # capture the same step for the next ones. Capture records the kernels without running
        # them: the buffers' current values are what the first replay starts from.
        logits = self._step_body(bucket)
        self._capture(bucket)
        return logits

    def _capture(self, bucket: int) -> None:
        torch = self.torch
        try:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                logits = self._step_body(bucket)
            self._graphs[bucket] = (graph, logits)
        except RuntimeError as error:
            log.warning("kiln.llm: CUDA graph capture failed (%s): decode steps launch eagerly",
                        error)
            self._use_graphs = False

    def decode(self, token, steps: int, return_logits=False):
        """Greedy decode: feeds `token` (int) at the next position, then each argmax, `steps`
        times; returns the `steps` generated ids (and their f32 logits [steps, V] with
        return_logits: row i produced id i)."""
        torch = self.torch
        self._check_room(steps)
        self._step_token.fill_(int(token))
        self._step_pos.fill_(self.length)
        self._step_kv_len.fill_(self.length + 1)
        start = self.length
        logits = []
        with torch.no_grad():
            for i in range(steps):
                step_logits = self._step(self._bucket(start + i + 1))
                if return_logits:
                    logits.append(step_logits.clone())
        self.length += steps
        ids = self._tokens[start + 1:start + 1 + steps].tolist()
        return (ids, torch.cat(logits, 0)) if return_logits else ids

    def generate(self, prompt_ids, max_new_tokens: int, return_logits=False):
        """Greedy continuation of `prompt_ids` (a fresh sequence): the `max_new_tokens` ids (and
        with return_logits the f32 [max_new_tokens, V] logits each was the argmax of)."""
        self.reset()
        if max_new_tokens < 1:
            return ([], None) if return_logits else []
        prompt = self._ids(prompt_ids)
        self._check_room(prompt.numel() + max_new_tokens - 1)
        last = self.prefill(prompt)
        first = int(last.argmax(dim=-1))
        if max_new_tokens == 1:
            return ([first], last) if return_logits else [first]
        decoded = self.decode(first, max_new_tokens - 1, return_logits=return_logits)
        if return_logits:
            ids, logits = decoded
            return [first, *ids], self.torch.cat([last, logits], 0)
        return [first, *decoded]


def load(path, device="cuda", *, context=4096, weights=None, graphs=True) -> Model:
    """Loads a GGUF model of the llama or qwen3 architecture (Q8_0, bf16 or f16 weights).

    device: "cuda" (kiln's kernels) or "cpu" (kiln's reference backend).
    context: KV cache length in tokens (prompt + generated).
    weights: None keeps the file's weight format; "e4m3fn" re-quantizes every matmul weight to
       fp8 e4m3 with per-row scales at load.
    graphs: capture CUDA decode steps as CUDA graphs (KILN_LLM_GRAPHS=0 also turns them off).
    """
    return Model(path, device, context=context, weights=weights, graphs=graphs)
