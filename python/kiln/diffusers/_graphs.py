"""CUDA graphs for a model's forward: captured once per input signature, then replayed.

A signature is the shapes, dtypes, devices and strides of the tensor arguments plus the values
of the others. The first call with a new signature copies the inputs into static buffers, runs
the forward twice eagerly on a side stream (which also compiles and loads every kiln kernel it
needs, outside the capture), captures a third run into a torch.cuda.CUDAGraph, and replays it.
Later calls with that signature copy their inputs into the static buffers, replay, and return a
copy of the static output (a caller may hold one result while asking for the next, as
classifier-free guidance does).

kiln's kernels are capture-safe: their workspaces are stream-ordered allocations
(cudaMallocFromPoolAsync, which become the graph's own allocation nodes under capture), their
memsets are async, and attention's split-KV arrival counters are zeroed inside the graph when
captured. A capture that fails anyway falls back to the eager forward for that signature, said
once in the log; so do calls with grad enabled and calls whose arguments are not tensors,
numbers, strings or None (a KV cache object, say).

Under diffusers' context parallelism the graphs hold NCCL collectives (Ulysses all-to-alls, the
ring's send / receive pairs, diffusers' all-gather of the output), which CUDA graphs capture
(PyTorch >= 2.7 for isend / irecv) on the conditions kept here: the communicators exist before
the capture (the eager warm-up calls make them); every rank captures and replays the same graphs
in step (the context-parallel layout, every rank's token counts, joins each signature); a
capture that fails on one rank runs that signature eagerly on all of them (one all-reduce of a
success flag after each capture); the output's functional-collective result is waited inside
the capture (settled()), which joins NCCL's stream back into the captured one. Uneven shares
(ulysses_anything / ring_anything) run eagerly, said once: diffusers' gather of uneven outputs
reads their sizes on the host.
"""

import logging

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger("kiln.diffusers")

_EAGER = object()  # a signature whose capture failed
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def settled(outputs):
    """`outputs` with every functional-collective result waited for: diffusers' all-gather of
    proj_out's output under context parallelism returns an AsyncCollectiveTensor, whose wait
    joins the collective's stream back into the caller's (a CUDA graph capture cannot end with a
    stream left unjoined; a timing loop that drops the output would leave it in flight)."""
    return pytree.tree_map(
        lambda x: x.wait() if isinstance(x, torch.Tensor) and hasattr(x, "wait") else x, outputs)


def _signature(args, kwargs):
    """A hashable description of the call, or None when an argument cannot be captured."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device),
                          leaf.stride()))
        elif isinstance(leaf, _PLAIN):
            parts.append(leaf)
        else:
            return None
    return (str(spec), tuple(parts))


class GraphedForward:
    """Calls `forward` through per-signature CUDA graphs (see the module's docstring).

    ranks: None, or the model's kiln.diffusers._parallel.ContextParallel: its graph_key() joins
    every signature, its all_succeeded() makes each capture's outcome the same on all ranks, and
    its eager_reason() names the calls no graph can hold (uneven shares: diffusers' output
    gather reads their sizes on the host).
    """

    def __init__(self, forward, name: str, warmup: int = 2, ranks=None):
        self.forward = forward
        self.name = name
        self.warmup = warmup
        self.ranks = ranks
        self.graphs = {}
        self._said = set()

    def _say_once(self, key, message, *args):
        if key not in self._said:
            self._said.add(key)
            log.info(message, *args)

    def __call__(self, *args, **kwargs):
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if not tensors or tensors[0].device.type != "cuda":
            return self.forward(*args, **kwargs)
        if torch.is_grad_enabled():
            self._say_once("grad", "kiln.diffusers: %s called with grad enabled: eager, no CUDA "
                           "graph", self.name)
            return self.forward(*args, **kwargs)
        key = _signature(args, kwargs)
        if self.ranks is not None:
            reason = self.ranks.eager_reason()
            if reason is not None:
                self._say_once(reason, "kiln.diffusers: %s: %s: eager, no CUDA graph", self.name,
                               reason)
                return self.forward(*args, **kwargs)
            if key is not None:
                key = (key, self.ranks.graph_key())
        if key is None:
            self._say_once("plain", "kiln.diffusers: %s got an argument a CUDA graph cannot "
                           "hold: eager", self.name)
            return self.forward(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, args, kwargs)
        if entry is _EAGER:
            return self.forward(*args, **kwargs)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, pytree.tree_leaves((args, kwargs))):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x,
                               static_out)

    def _capture(self, key, args, kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        static_in = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(static_in, spec)
        failure = None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    settled(self.forward(*static_args, **static_kwargs))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = settled(self.forward(*static_args, **static_kwargs))
        except Exception as error:  # noqa: BLE001 - any failure means: run this shape eagerly
            failure = f"{type(error).__name__}: {error}"
        if self.ranks is not None and not self.ranks.all_succeeded(failure is None):
            failure = failure or "the capture failed on another rank"
        if failure is not None:
            log.info("kiln.diffusers: CUDA graph capture of %s failed (%s): eager for this "
                     "input shape", self.name, failure)
            self.graphs[key] = _EAGER
            return _EAGER
        entry = (graph, static_in, static_out)
        self.graphs[key] = entry
        log.info("kiln.diffusers: %s captured as a CUDA graph (%d signature(s) held)",
                 self.name, len(self.graphs))
        return entry
