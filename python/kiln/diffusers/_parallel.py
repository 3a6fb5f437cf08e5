"""kiln's transformer blocks inside diffusers' context parallelism.

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))   # diffusers'
    handle = kiln.diffusers.apply(model)       # before or after enable_parallelism

What diffusers does: the model's `_cp_plan` hooks (diffusers/hooks/context_parallel.py) split
hidden_states, encoder_hidden_states and the position ids along the sequence before the model's
forward and all-gather proj_out's output after it, so every rank runs the model on its share of
the text and of the image tokens. Only attention needs the other ranks: diffusers' attention
processors pass their ParallelConfig to attention_dispatch, whose templated Ulysses / ring
functions wrap a backend's per-rank kernel.

kiln replaces each block's forward, so diffusers' processors never run. kiln's blocks take the
attention step's job themselves, over the process groups of the device mesh diffusers built
from the ContextParallelConfig (its "ulysses" and "ring" dimensions), with torch.distributed
collectives:

  Ulysses (degree U): kiln.rope_flux writes Q and K/V of the local tokens straight into the
      all-to-all send buffers (token-major, head group outermost), one all_to_all_single for Q
      and one for K/V give each rank every token of its ulysses group for H/U heads,
      kiln.attention reads strided views of the receive buffers (no copy; batch folded into the
      heads: [1, B H/U, L, D]), and one all-to-all sends every rank its tokens back for all
      heads.
  ring (degree R): each rank keeps its queries; K/V blocks travel around the ring group
      (batch_isend_irecv: to the next rank, from the previous one), the next block in flight
      while kiln.attention(..., return_lse=True) multiplies the current one; the partial outputs
      are merged exactly, in f32, with their log-sum-exps.
  both (R x U): Ulysses inside each ulysses group, then the ring over the groups' sequences, the
      order of diffusers' _templated_unified_attention.

Attention has no mask here, so the order of the keys does not matter: a gathered sequence is
[text_0, image_0, text_1, image_1, ...], and each rank's queries and outputs keep their order.
Uneven shares (ContextParallelConfig(ulysses_anything=True) or ring_anything=True, where
diffusers splits with tensor_split): every rank's token count is gathered once per forward with
diffusers' gather_size_by_comm, and each collective takes its split sizes from them.
"""

import logging
import weakref

import torch
import torch.distributed as dist

import kiln

from .._C import InvalidArgumentError, UnsupportedError
from ._transformer import joint_attention

log = logging.getLogger("kiln.diffusers")


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """The [B, H, L, D] view (kiln.rope_flux's out) of a token-major [L, B, H, D] buffer."""
    return x.permute(1, 2, 0, 3)


def _folded(x: torch.Tensor) -> torch.Tensor:
    """The [1, B H, L, D] view of a token-major [L, B, H, D] buffer whose batch stride is H times
    its head stride: batch folded into the heads (attention is independent per batch and head),
    so the strides grow outwards (head, token), as in a packed QKV's slices, the layout of
    kiln.attention's Hopper tensor maps."""
    return x.flatten(1, 2).permute(1, 0, 2).unsqueeze(0)


def _kv_views(kv: torch.Tensor):
    """k and v [1, B H, L, D] views of a token-major K/V block [L, 2, B, H, D]."""
    return _folded(kv[:, 0]), _folded(kv[:, 1])


class Layout:
    """Where this rank stands in diffusers' context-parallel mesh during one forward: the degrees,
    the ring and ulysses process groups, and the local token count of every rank (in the order of
    diffusers' flattened mesh: ring index major, ulysses index minor)."""

    def __init__(self, cp, lengths):
        self.ring_degree, self.ulysses_degree = cp.ring_degree, cp.ulysses_degree
        self.ring_rank, self.ulysses_rank = cp._ring_local_rank, cp._ulysses_local_rank
        self.ring_group = cp._ring_mesh.get_group()
        self.ulysses_group = cp._ulysses_mesh.get_group()
        self.group = cp._flattened_mesh.get_group()  # every rank of the mesh
        self.lengths = tuple(lengths)
        u = self.ulysses_degree
        # The tokens each rank of each ulysses group holds, per ring index.
        self.group_lengths = [self.lengths[r * u:(r + 1) * u] for r in range(self.ring_degree)]
        flat = self.ring_rank * u + self.ulysses_rank
        if dist.get_rank(self.group) != flat:
            raise UnsupportedError(
                f"kiln.diffusers: rank {dist.get_rank()} is {dist.get_rank(self.group)} in the "
                f"flattened context-parallel mesh, expected ring index x ulysses degree + ulysses "
                f"index = {flat} (a mesh whose flattening is not ring-major)")
        self.local = self.lengths[flat]
        if self.ring_degree > 1:
            n = self.ring_degree
            self.ring_next = dist.get_global_rank(self.ring_group, (self.ring_rank + 1) % n)
            self.ring_prev = dist.get_global_rank(self.ring_group, (self.ring_rank - 1) % n)
        self.anything = cp.ulysses_anything or cp.ring_anything
        self.key = ("context parallel", self.ring_degree, u, self.lengths)

    def describe(self) -> str:
        parts = [f"{name} {degree}" for name, degree in (("ulysses", self.ulysses_degree),
                                                          ("ring", self.ring_degree))
                 if degree > 1]
        return " x ".join(parts)


class ContextParallel:
    """One per transformer on kiln: reads the model's diffusers ParallelConfig at every forward
    (begin(), called by the model's forward before any CUDA graph is looked up), and runs the
    blocks' attention as Ulysses / ring over its mesh when context parallelism is on, as one
    joint attention when it is off."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self._name = type(model).__name__
        self._heads = model.config.num_attention_heads
        self.layout = None
        self._even = None  # the last even-split Layout, reused while the config and shares hold
        self._said = set()

    def begin(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        """Sets the layout of the forward that starts: its inputs are the rank's shares (the
        context-parallel split hook runs before kiln's forward)."""
        self.layout = None
        config = getattr(self._model(), "_parallel_config", None)
        if config is None:
            return
        if config.tensor_parallel_config is not None:
            raise UnsupportedError(
                f"kiln.diffusers: {self._name} has tensor parallelism on (a TensorParallelConfig "
                "given to enable_parallelism or from_pretrained): kiln's blocks hold whole "
                "weights and run context parallelism only; call handle.remove() first")
        cp = config.context_parallel_config
        if cp is None:
            return
        if self._heads % cp.ulysses_degree != 0:
            raise UnsupportedError(
                f"kiln.diffusers: {self._name} has {self._heads} attention heads, which "
                f"ulysses_degree {cp.ulysses_degree} does not divide; kiln's Ulysses attention "
                "needs a divisor of the head count (diffusers pads heads with ulysses_anything, "
                "kiln does not)")
        local = hidden_states.shape[1] + encoder_hidden_states.shape[1]
        ranks = cp.ring_degree * cp.ulysses_degree
        if cp.ulysses_anything or cp.ring_anything:
            from diffusers.models._modeling_parallel import gather_size_by_comm

            lengths = gather_size_by_comm(local, cp._flattened_mesh.get_group())
            self.layout = Layout(cp, lengths)
        else:
            even = self._even
            if even is None or even[0] is not cp or even[1].lengths != (local,) * ranks:
                self._even = even = (cp, Layout(cp, [local] * ranks))
            self.layout = even[1]
        mode = self.layout.describe()
        if mode not in self._said:
            self._said.add(mode)
            log.info("kiln.diffusers: %s under diffusers' context parallelism (%s, %d ranks): "
                     "kiln's attention runs it over diffusers' mesh", self._name, mode, ranks)

    def end(self) -> None:
        self.layout = None

    def graph_key(self):
        """What joins a CUDA graph's signature: the layout (all ranks capture and replay the same
        graphs in step: a collective captured on one rank must be replayed on all)."""
        return None if self.layout is None else self.layout.key

    def eager_reason(self):
        """Why this forward cannot be a CUDA graph, or None."""
        if self.layout is not None and self.layout.anything:
            return ("uneven context-parallel shares (ulysses_anything / ring_anything): diffusers' "
                    "output gather reads every rank's share on the host")
        return None

    def all_succeeded(self, ok: bool) -> bool:
        """Under context parallelism: whether every rank's CUDA-graph capture succeeded (one
        all-reduce, outside any capture), so that a capture failing on one rank makes all of them
        run that shape eagerly, in step. Without it: `ok`."""
        layout = self.layout
        if layout is None:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32,
                            device=torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=layout.group)
        return bool(flag.item())

    def attention(self, streams, heads: int, head_dim: int, pe):
        """The blocks' attention (kiln.diffusers._transformer.joint_attention's arguments and
        result) over every rank's tokens when context parallelism is on."""
        if self.layout is None:
            return joint_attention(streams, heads, head_dim, pe)
        return parallel_attention(self.layout, streams, heads, head_dim, pe)


def parallel_attention(layout: Layout, streams, heads: int, head_dim: int, pe):
    """joint_attention over the tokens of every rank: `streams` (qkv [B, Ls, 3 H D], Q norm,
    K norm) are this rank's shares in sequence order; returns [B, sum Ls, H D] for them."""
    first = streams[0][0]
    b = first.shape[0]
    local = sum(qkv.shape[1] for qkv, _, _ in streams)
    if local != layout.local:
        raise InvalidArgumentError(
            f"kiln.diffusers: a block got {local} tokens, expected this rank's share of "
            f"{layout.local} (context parallelism, {layout.describe()}): were the inputs split "
            "by the model's context-parallel hooks?")
    u = layout.ulysses_degree
    group_heads = heads // u
    q_send = first.new_empty(u, local, b, group_heads, head_dim)  # (head group, token, B, H/U, D)
    kv_send = first.new_empty(u, local, 2, b, group_heads, head_dim)  # (.., token, k | v, B, ..)
    start = 0
    for qkv, norm_q, norm_k in streams:
        rows = slice(start, start + qkv.shape[1])
        x = qkv.unflatten(-1, (3, heads, head_dim))  # [B, Ls, 3, H, D], a view
        stream_pe = None if pe is None else pe[rows]
        for g in range(u):
            cols = slice(g * group_heads, (g + 1) * group_heads)
            kiln.rope_flux(x[:, :, 0, cols], stream_pe, norm_weight=norm_q.weight, eps=norm_q.eps,
                           out=_head_major(q_send[g])[:, :, rows])
            kiln.rope_flux(x[:, :, 1, cols], stream_pe, norm_weight=norm_k.weight, eps=norm_k.eps,
                           out=_head_major(kv_send[g, :, 0])[:, :, rows])
            kiln.rope_flux(x[:, :, 2, cols], out=_head_major(kv_send[g, :, 1])[:, :, rows])
        start = rows.stop
    q, kv = _ulysses_gather(layout, q_send, kv_send)  # [Lg, B, H/U, D], [Lg, 2, B, H/U, D]
    # The attention output lands token-major, in the scatter's send buffer (no transpose copy).
    send = torch.empty_like(q)  # [Lg, B, H/U, D]
    if layout.ring_degree > 1:
        _folded(send).copy_(_ring(layout, q, kv))  # from f32 [1, B H/U, Lg, D]
    else:
        kiln.attention(_folded(q), *_kv_views(kv), out=_folded(send))
    return _ulysses_scatter(layout, send, local, heads)


def _split_sizes(lengths, local: int):
    """all_to_all_single's split sizes (rows of dim 0) between this rank (`local` tokens) and
    its ulysses group (`lengths` tokens each): (the group's shares, [local] per rank), or
    (None, None) when the shares are even."""
    if len(set(lengths)) == 1:
        return None, None
    return list(lengths), [local] * len(lengths)


def _ulysses_gather(layout: Layout, q_send, kv_send):
    """Q [U, L, B, H/U, D] and K/V [U, L, 2, B, H/U, D] send buffers (head group g for rank g of
    the ulysses group) -> every token of the group for this rank's heads, token-major."""
    if layout.ulysses_degree == 1:
        return q_send[0], kv_send[0]
    lengths = layout.group_lengths[layout.ring_rank]
    local = q_send.shape[1]
    out_sizes, in_sizes = _split_sizes(lengths, local)
    q = q_send.new_empty(sum(lengths), *q_send.shape[2:])
    kv = kv_send.new_empty(sum(lengths), *kv_send.shape[2:])
    works = [dist.all_to_all_single(dst, src.flatten(0, 1), out_sizes, in_sizes,
                                    group=layout.ulysses_group, async_op=True)
             for dst, src in ((q, q_send), (kv, kv_send))]
    for work in works:
        work.wait()
    return q, kv


def _ulysses_scatter(layout: Layout, send, local: int, heads: int):
    """The attention output, token-major [Lg, B, H/U, D] (every token of the ulysses group in
    rank order, this rank's heads) -> [B, local, H D] (this rank's tokens, every head)."""
    _, b, group_heads, head_dim = send.shape
    u = layout.ulysses_degree
    joint = send.new_empty(b, local, heads, head_dim)  # [B, L, H, D]
    if u == 1:
        joint.copy_(send.transpose(0, 1))
        return joint.view(b, local, heads * head_dim)
    recv = send.new_empty(u * local, b, group_heads, head_dim)  # (head group, token, B, H/U, D)
    lengths = layout.group_lengths[layout.ring_rank]
    shares, own = _split_sizes(lengths, local)
    dist.all_to_all_single(recv, send, own, shares, group=layout.ulysses_group)
    joint.view(b, local, u, group_heads, head_dim).copy_(
        recv.view(u, local, b, group_heads, head_dim).permute(2, 1, 0, 3, 4))
    return joint.view(b, local, heads * head_dim)


def _ring(layout: Layout, q, kv):
    """Attention of the queries q [Lq, B, H, D] over the K/V blocks [Lk, 2, B, H, D] of every rank
    of the ring group (this rank's is `kv`), each block sent on to the next rank while the
    current one is multiplied; returns f32 [1, B H, Lq, D]."""
    n, rank = layout.ring_degree, layout.ring_rank
    row = kv[0].numel()  # elements of one token's K and V
    blocks = [sum(lengths) for lengths in layout.group_lengths]  # tokens of each rank's block
    # Receive buffers, used in turn: the one a step receives into was last read two steps ago.
    buffers = [kv.new_empty(max(blocks) * row) for _ in range(min(n - 1, 2))]
    queries = _folded(q)
    current = kv.reshape(-1)
    acc = lse = None
    for step in range(n):
        source = (rank - step) % n  # the rank whose K/V block `current` is
        works = []
        if step + 1 < n:
            incoming = buffers[step % 2][:blocks[(source - 1) % n] * row]
            works = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, current, layout.ring_next, layout.ring_group),
                dist.P2POp(dist.irecv, incoming, layout.ring_prev, layout.ring_group)])
        k, v = _kv_views(current.view(blocks[source], *kv.shape[1:]))
        out, block_lse = kiln.attention(queries, k, v, return_lse=True)
        acc, lse = merge_partials(acc, lse, out, block_lse)
        for work in works:
            work.wait()
        if works:
            current = incoming
    return acc


def merge_partials(acc, lse, out, block_lse):
    """Joins two attentions of the same queries over disjoint key blocks, exactly:
    o = (e^lse_a o_a + e^lse_b o_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b), in f32.
    acc f32 [B, H, L, D] and lse f32 [B, H, L] (None before the first block) are updated in
    place; out [B, H, L, D] and block_lse are the new block's (kiln.attention's return_lse)."""
    if acc is None:
        return out.float(), block_lse
    joined = torch.logaddexp(lse, block_lse)
    acc.mul_((lse - joined).exp_().unsqueeze(-1))
    acc.addcmul_(out, (block_lse - joined).exp_().unsqueeze(-1))
    return acc, joined
