"""kiln.diffusers under diffusers' context parallelism (Ulysses, ring, both), against one process.

On CPU (CI): 2 and 4 processes (torch.multiprocessing spawn, gloo over a free local port, one
thread each), loading the tiny Flux.2 / FLUX.1 models of diffusers_models.py (4 heads of 128, so
that a Ulysses degree of 4 divides them) saved once by this process, with kiln's CPU references.
One spawn per process count runs every case of that count, so the suite pays for two process
starts. The model cases (CASES) cover Ulysses, ring and ring x Ulysses, kiln applied before and
after enable_parallelism, bf16 and fp8 weights. Uneven shares (ulysses_anything / ring_anything,
13 text + 35 image tokens, which 2 and 4 do not divide) run at the attention step
(ATTENTION_CASES): diffusers' output gather of uneven shares (dist.all_gather of tensors of
different sizes) is NCCL-only, gloo refuses it, so the whole model runs them on GPUs only.

Each model case's output (all ranks hold it: diffusers' hook all-gathers proj_out's output) is
compared with the one-process kiln forward of the same weights and inputs, and with diffusers'
f32 eager forward. The bound ("the bf16 bound"): the context-parallel output differs from the
one-process output by at most what the low-precision forward itself costs against f32 (diffusers
bf16's error, or kiln fp8's own where larger: a perturbation of the size of one bf16 rounding
moves fp8 per-token quantization by whole fp8 steps), and its error against f32 is at most 1.25x
the one-process kiln error. (FLUX.1's differ even under Ulysses: diffusers' split hands the
embedders strided views of a batch of 2, and torch's CPU bf16 linear with a bias rounds those
differently from contiguous rows; diffusers' own context parallelism shows the same.) After
handle.remove() the model runs diffusers' own context parallelism (native SDPA backend, Ulysses
cases): its output is checked too. Each case also counts the blocks whose attention ran across
ranks (all of them), so that no case passes by running on one rank's tokens. The 2-process spawn
also runs `kiln bench flux2 --gpus N`'s worker on the tiny config. The errors and times are
printed (pytest -s); the file takes about 100 s on a loaded 2-core machine.

On GPUs: the same machinery over NCCL with klein 4B's real config at 1024² (CUDA graphs on, so
the captured collectives replay) on 2 and 4 GPUs, and uneven shares at 1040²; skipped with
fewer GPUs.
"""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kiln

from conftest import CUDA_REASON, HAS_CUDA

diffusers = pytest.importorskip("diffusers")

import kiln.diffusers  # noqa: E402
from diffusers_models import (  # noqa: E402
    FAMILIES,
    forward,
    in_dtype,
    relative_error,
    saved,
    tiny_config,
    transformer_class,
    transformer_inputs,
)

HEADS = 4
# NVLink multicast stays off wherever NCCL runs (the shared GPU hosts require it).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def _case(world, family, parallel, order, weights="bf16"):
    degrees = "x".join(f"{k.removesuffix('_degree')}{v}" for k, v in parallel.items())
    name = f"{world}proc-{family}-{degrees}-{order.replace(' ', '_')}-{weights}"
    return dict(name=name, world=world, family=family, parallel=parallel, order=order,
                weights=weights)


CASES = [
    _case(2, "flux2", {"ulysses_degree": 2}, "kiln first"),
    _case(2, "flux2", {"ring_degree": 2}, "cp first"),
    _case(2, "flux2", {"ring_degree": 2}, "kiln first", weights="fp8"),
    _case(2, "flux1", {"ulysses_degree": 2}, "cp first"),
    _case(2, "flux1", {"ring_degree": 2}, "kiln first"),
    _case(4, "flux2", {"ulysses_degree": 4}, "kiln first"),
    _case(4, "flux2", {"ring_degree": 4}, "cp first"),
    _case(4, "flux2", {"ring_degree": 2, "ulysses_degree": 2}, "kiln first"),
    _case(4, "flux1", {"ring_degree": 2, "ulysses_degree": 2}, "cp first"),
]
CASE_IDS = [c["name"] for c in CASES]
# The attention step alone with uneven shares: (processes, ContextParallelConfig arguments).
ATTENTION_CASES = [(2, {"ulysses_degree": 2, "ulysses_anything": True}),
                   (2, {"ring_degree": 2, "ring_anything": True}),
                   (4, {"ulysses_degree": 4, "ulysses_anything": True}),
                   (4, {"ring_degree": 4, "ring_anything": True})]
ATTENTION_IDS = [f"{w}proc-{'-'.join(k for k in p if k.endswith('anything'))}"
                 f"{max(p.get('ring_degree', 1), p.get('ulysses_degree', 1))}"
                 for w, p in ATTENTION_CASES]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the worker: one process of a context-parallel run -------------------------------------------


def _init(rank, world, port, backend):
    if backend == "gloo" and torch.accelerator.device_count() == 0:
        # diffusers 0.42.1's _resolve_parallel_config places rank r on accelerator
        # r % torch.accelerator.device_count(), a division by zero on a machine without one:
        # one CPU "device" stands in for it.
        torch.accelerator.device_count = lambda: 1
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        # Named per device type, so that diffusers' gather_size_by_comm (the uneven shares)
        # gathers on the CPU rather than on torch's accelerator, absent here.
        backend = "cpu:gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)


def _run_case(case, model, inputs, reps=1):
    """Applies kiln and diffusers' context parallelism in the case's order, runs the forward
    `reps` times (the last result kept); returns (output, seconds of the last call, diffusers'
    own context-parallel output after remove() or None, how many attentions ran across
    ranks)."""
    from diffusers import ContextParallelConfig

    from kiln.diffusers import _parallel

    calls = []
    across_ranks = _parallel.parallel_attention
    _parallel.parallel_attention = lambda *args: calls.append(1) or across_ranks(*args)
    config = ContextParallelConfig(**case["parallel"])
    if case["order"] == "kiln first":
        handle = kiln.diffusers.apply(model, weights=case["weights"])
        model.enable_parallelism(config=config)
    else:
        model.enable_parallelism(config=config)
        handle = kiln.diffusers.apply(model, weights=case["weights"])
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        out = forward(model, inputs)
        if out.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    handle.remove()
    _parallel.parallel_attention = across_ranks
    after = None
    if config.ring_degree == 1:  # diffusers' native (SDPA) backend runs Ulysses only
        after = forward(model, inputs)
    return out, seconds, after, len(calls)


class _Stand:
    """What kiln.diffusers._parallel.ContextParallel reads of a model: its config's head count
    and its diffusers ParallelConfig."""

    def __init__(self, heads, parallel_config):
        self.config = type("Config", (), {"num_attention_heads": heads})()
        self._parallel_config = parallel_config


def _attention_case(rank, world, parallel, seed=7):
    """The attention step of kiln's blocks under uneven shares of 13 text + 35 image tokens
    (diffusers' tensor_split over the flattened mesh), against one joint attention over all of
    them: returns this rank's relative error."""
    from diffusers import ContextParallelConfig, ParallelConfig

    from kiln.diffusers._parallel import ContextParallel
    from kiln.diffusers._transformer import QkNorm, joint_attention

    cp = ContextParallelConfig(**parallel)
    mesh = dist.device_mesh.init_device_mesh("cpu", cp.mesh_shape,
                                             mesh_dim_names=cp.mesh_dim_names)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(rank, world, torch.device("cpu"), mesh=mesh)
    heads, head_dim, b = 4, 64, 2
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator)

    norms = [QkNorm(torch.nn.RMSNorm(head_dim, eps=1e-6), head_dim, torch.bfloat16)
             for _ in range(4)]
    for norm in norms:
        norm.weight = (1 + 0.1 * draw(head_dim)).bfloat16()
    lengths = (13, 35)
    qkv = [draw(b, n, 3 * heads * head_dim).bfloat16() for n in lengths]
    angles = draw(sum(lengths), head_dim // 2)
    c, s = angles.cos(), angles.sin()
    pe = torch.stack([c, -s, s, c], dim=-1).unflatten(-1, (2, 2))
    full = joint_attention([(qkv[0], *norms[:2]), (qkv[1], *norms[2:])], heads, head_dim, pe)
    shard = cp._flattened_mesh.get_local_rank()
    parts = [x.tensor_split(world, dim=1)[shard] for x in qkv]
    pe_rows = [p.tensor_split(world)[shard] for p in (pe[:lengths[0]], pe[lengths[0]:])]
    want = torch.cat([full[:, :lengths[0]].tensor_split(world, dim=1)[shard],
                      full[:, lengths[0]:].tensor_split(world, dim=1)[shard]], dim=1)
    model = _Stand(heads, config)  # held: ContextParallel keeps a weak reference
    parallel_state = ContextParallel(model)
    parallel_state.begin(parts[1], parts[0])
    assert parallel_state.eager_reason() is not None  # uneven shares never become a graph
    got = parallel_state.attention([(parts[0], *norms[:2]), (parts[1], *norms[2:])], heads,
                                   head_dim, torch.cat(pe_rows))
    parallel_state.end()
    return relative_error(got, want)


def _bench_worker(rank, world, port, folder):
    """`kiln bench flux2 --gpus N`'s worker, as torchrun would start it (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR / PORT), over gloo on the tiny Flux.2 config at 64² (16 image + 512
    text tokens), Ulysses only (diffusers has no CPU attention backend returning the LSE its
    ring needs), kiln with bf16 weights; rank 0's output goes to a file."""
    import contextlib

    from kiln.bench.suites import flux2
    from kiln.diffusers import configs

    from diffusers_models import TINY_VAE

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    settings = {"resolutions": [64], "warmup": 0, "reps": 1, "modes": ["ulysses"],
                "kiln": {"weights": "bf16"},  # fp8 on CPU's reference GEMMs costs seconds
                "transformer_config": tiny_config("flux2", HEADS),
                "vae_config": {**configs.FLUX2_VAE, **TINY_VAE}}
    with open(os.path.join(folder, f"bench-rank{rank}.txt"), "w") as out:
        with contextlib.redirect_stdout(out):
            flux2.parallel_worker(settings)


def _worker(rank, world, port, backend, folder, cases, attention_cases, bench_port=None):
    torch.set_num_threads(1)  # the processes share the machine's cores
    _init(rank, world, port, backend)
    try:
        for case in cases:
            cls = transformer_class(case["family"])
            model = cls.from_pretrained(os.path.join(folder, case["family"]),
                                        torch_dtype=torch.bfloat16).eval()
            inputs = torch.load(os.path.join(folder, f"{case['family']}-inputs.pt"))
            out, seconds, after, calls = _run_case(case, model, inputs)
            if rank == 0:
                torch.save({"out": out, "seconds": seconds, "after": after, "calls": calls},
                           os.path.join(folder, f"{case['name']}.pt"))
        for name, parallel in attention_cases:
            error = _attention_case(rank, world, parallel)
            torch.save(error, os.path.join(folder, f"{name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    if bench_port is not None:
        _bench_worker(rank, world, bench_port, folder)


# ---- one process: the models, inputs and references ----------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny models saved for the workers, their inputs (12 text + 36 image tokens, batch 2),
    and the one-process results: diffusers' f32 and bf16 forwards and kiln's, per family."""
    folder = tmp_path_factory.mktemp("parallel")
    references = {}
    for seed, family in enumerate(FAMILIES, start=11):
        models = saved(folder / family, transformer_class(family), tiny_config(family, HEADS),
                       seed)
        inputs = transformer_inputs(family, models["f32"], torch.float32)
        inputs16 = in_dtype(inputs, torch.bfloat16)
        torch.save(inputs16, folder / f"{family}-inputs.pt")
        ref = {"f32": forward(models["f32"], inputs),
               "diffusers bf16": forward(models["bf16"], inputs16)}
        for weights in {c["weights"] for c in CASES if c["family"] == family}:
            with kiln.diffusers.apply(models["bf16"], weights=weights):
                ref[f"kiln {weights}"] = forward(models["bf16"], inputs16)
        references[family] = ref
    return {"folder": folder, "references": references, "runs": {}}


def _spawned(setup, world):
    """Runs every case of `world` processes once (one spawn), results in the setup's folder."""
    runs = setup["runs"]
    if world not in runs:
        cases = [c for c in CASES if c["world"] == world]
        attention = [(name, p) for name, (w, p) in zip(ATTENTION_IDS, ATTENTION_CASES)
                     if w == world]
        bench_port = _free_port() if world == 2 else None  # the bench worker runs in 2 processes
        start = time.perf_counter()
        mp.spawn(_worker, args=(world, _free_port(), "gloo", str(setup["folder"]), cases,
                                attention, bench_port), nprocs=world)
        runs[world] = time.perf_counter() - start
        print(f"\n{world} processes (gloo): {len(cases)} model cases and {len(attention)} "
              f"attention cases in {runs[world]:.1f} s (process starts included)")
    return runs[world]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_context_parallel_matches_one_process(setup, case):
    _spawned(setup, case["world"])
    result = torch.load(setup["folder"] / f"{case['name']}.pt")
    ref = setup["references"][case["family"]]
    one = ref[f"kiln {case['weights']}"]
    one_vs_f32 = relative_error(one, ref["f32"])
    bound = max(relative_error(ref["diffusers bf16"], ref["f32"]), one_vs_f32)
    vs_one = relative_error(result["out"], one)
    vs_f32 = relative_error(result["out"], ref["f32"])
    print(f"\n{case['name']}: vs one process {vs_one:.2e} (bound {bound:.2e}), vs f32 "
          f"{vs_f32:.3e} (one process {one_vs_f32:.3e}); forward {result['seconds']:.2f} s")
    config = tiny_config(case["family"], HEADS)
    assert result["calls"] == config["num_layers"] + config["num_single_layers"]
    assert result["out"].shape == one.shape
    assert vs_one <= bound
    assert vs_f32 <= 1.25 * one_vs_f32
    if result["after"] is not None:  # diffusers' own context parallelism after remove()
        after = relative_error(result["after"], ref["diffusers bf16"])
        print(f"  after remove(): diffusers' context parallelism vs one process {after:.2e}")
        assert after <= bound


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=ATTENTION_IDS)
def test_uneven_shares_attention(setup, case):
    """Every rank's rows of the Ulysses / ring attention over uneven shares equal one joint
    attention's within bf16 rounding (one rounding of the output; the ring's merge of
    bf16-rounded partials adds at most one more)."""
    world, _ = case
    _spawned(setup, world)
    name = ATTENTION_IDS[ATTENTION_CASES.index(case)]
    errors = [torch.load(setup["folder"] / f"{name}-rank{r}.pt") for r in range(world)]
    print(f"\n{name}: per-rank relative error vs one attention {[f'{e:.1e}' for e in errors]}")
    assert max(errors) <= 2 ** -8


def test_bench_parallel_worker_on_cpu(setup):
    """`kiln bench flux2 --gpus 2`'s worker and report end to end on 2 CPU processes (torchrun
    itself and the GPU timings aside): rank 0's result line parses, the report has a measurement
    per mode and resolution, and the error check passes (kiln under Ulysses against kiln on one
    process, within kiln's own difference from diffusers bf16)."""
    from kiln.bench.core import Bench
    from kiln.bench.suites import flux2

    _spawned(setup, 2)
    result = flux2.parse_worker_output((setup["folder"] / "bench-rank0.txt").read_text())
    assert result is not None and result["world"] == 2
    assert set(result["steps"]) == {"diffusers 1 64", "kiln 1 64", "diffusers ulysses 2 64",
                                    "kiln ulysses 2 64"}
    bench = Bench(0, 1, 0, None)
    bench.start_suite("flux2")
    flux2._report_parallel(bench, {2: result}, [64])
    assert [m.case for m in bench.measurements] == ["step ulysses 2 GPUs"]
    assert bench.checks and all(c.passed for c in bench.checks)
    print(f"\nbench worker on CPU: errors {result['errors']}")


def test_bench_parallel_says_no_gpu(capsys):
    from kiln.bench import main

    if HAS_CUDA:
        pytest.skip("a CUDA device is present: the suite would run")
    assert main(["flux2", "--gpus", "4", "--no-chart", "--json", "/dev/null"]) == 0
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_gpu_counts():
    """--gpus N measures 2, 4, ... up to N and what the machine has."""
    from kiln.bench.suites.flux2 import gpu_counts

    assert gpu_counts(4, 8) == [2, 4] and gpu_counts(8, 8) == [2, 4, 8]
    assert gpu_counts(4, 2) == [2] and gpu_counts(4, 1) == [] and gpu_counts(3, 4) == [2]


# ---- one process: the pieces ---------------------------------------------------------------------


def test_merge_partials_is_exact():
    """Attention over key blocks merged with their log-sum-exps equals attention over all keys:
    with f32 queries kiln.attention returns f32 partials, and the merge adds no rounding beyond
    f32's; with bf16 queries the partials are rounded to bf16 once each (the ring's case)."""
    from kiln.diffusers._parallel import merge_partials

    q = torch.randn(2, 3, 7, 64)
    k, v = torch.randn(2, 3, 29, 64).bfloat16(), torch.randn(2, 3, 29, 64).bfloat16()
    for query, bound in ((q, 1e-6), (q.bfloat16(), 2 ** -8)):
        full, full_lse = kiln.attention(query, k, v, return_lse=True)
        acc = lse = None
        for rows in (slice(0, 5), slice(5, 17), slice(17, 29)):  # uneven blocks
            out, block_lse = kiln.attention(query, k[:, :, rows], v[:, :, rows], return_lse=True)
            acc, lse = merge_partials(acc, lse, out, block_lse)
        assert acc.dtype == torch.float32 and relative_error(acc, full) < bound
        assert relative_error(lse, full_lse) < 1e-6


def _model(family="flux2", heads=HEADS):
    from kiln.diffusers import configs

    return configs.random_weights(transformer_class(family)(**tiny_config(family, heads)), 5)


def _hooked(model):
    """diffusers' context-parallel hooks on `model` (what enable_parallelism registers), without
    a process group: the hooks only read the config when the model runs."""
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel

    apply_context_parallel(model, ContextParallelConfig(ulysses_degree=2), model._cp_plan)


def _chain(module):
    """The forwards a call of `module` goes through: diffusers' hook wrappers down to the one they
    wrap."""
    registry = getattr(module, "_diffusers_hook", None)
    refs = list(registry._fn_refs) if registry is not None else []
    return [ref.forward for ref in refs]


@pytest.mark.parametrize("order", ["kiln first", "cp first"])
def test_kiln_goes_beneath_context_parallel_hooks(order):
    """Either order leaves diffusers' split / gather hooks outermost with kiln's forwards beneath
    them, and remove() leaves the hooks wrapping diffusers' own forwards."""
    model = _model().to(torch.bfloat16)
    if order == "kiln first":
        handle = kiln.diffusers.apply(model, weights="fp8")
        _hooked(model)
    else:
        _hooked(model)
        handle = kiln.diffusers.apply(model, weights="fp8")
    for module in (model, model.proj_out):
        inner = _chain(module)[0]
        assert getattr(inner, "__self__", None) is not module, "kiln's forward is not beneath"
        assert getattr(module.forward, "__wrapped__", None) is not None  # the hook wrapper
    handle.remove()
    for module, hook in ((model, "cp_input---"), (model.proj_out, "cp_output---proj_out")):
        inner = _chain(module)[0]
        assert inner.__self__ is module and inner.__func__ is type(module).forward
        assert list(module._diffusers_hook.hooks) == [hook]


def test_refuses_other_diffusers_hooks():
    from diffusers.hooks import apply_first_block_cache, FirstBlockCacheConfig

    model = _model()
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(kiln.UnsupportedError, match="diffusers hooks"):
        kiln.diffusers.apply(model)


def test_tensor_parallelism_refused():
    """kiln holds whole weights: a TensorParallelConfig on the model is refused at apply, and
    one that appears after apply fails the forward with the same word."""
    from diffusers import ParallelConfig, TensorParallelConfig

    model = _model().to(torch.bfloat16)
    config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    model._parallel_config = config
    with pytest.raises(kiln.UnsupportedError, match="tensor parallelism"):
        kiln.diffusers.apply(model)
    model._parallel_config = None
    inputs = in_dtype(transformer_inputs("flux2", model, torch.float32), torch.bfloat16)
    with kiln.diffusers.apply(model, weights="bf16"):
        model._parallel_config = config
        with pytest.raises(kiln.UnsupportedError, match="tensor parallelism"):
            forward(model, inputs)


def test_heads_not_divisible_refused():
    """2 heads under Ulysses 4: a clear error before any communication."""
    from diffusers import ContextParallelConfig, ParallelConfig

    model = _model(heads=2).to(torch.bfloat16)
    inputs = in_dtype(transformer_inputs("flux2", model, torch.float32), torch.bfloat16)
    with kiln.diffusers.apply(model, weights="bf16"):
        model._parallel_config = ParallelConfig(
            context_parallel_config=ContextParallelConfig(ulysses_degree=4))
        with pytest.raises(kiln.UnsupportedError, match="2 attention heads, which "
                                                        "ulysses_degree 4 does not divide"):
            forward(model, inputs)


# ---- GPUs: NCCL, klein 4B's real config ----------------------------------------------------------


def _gpu_worker(rank, world, port, folder, parallel, resolution):
    """klein 4B (random weights, built alike on every GPU) at `resolution`²: kiln fp8 on one GPU,
    then under context parallelism with CUDA graphs (three calls: capture, two replays)."""
    os.environ.update(NCCL_ENV)
    _init(rank, world, port, "nccl")
    try:
        from kiln.bench.suites import flux2

        device = torch.device("cuda", rank)
        with torch.no_grad():
            transformer, vae = flux2.build_models(torch, diffusers, device, torch.bfloat16)
            pipe = flux2.make_pipeline(diffusers, transformer, vae)
            inputs = flux2.step_inputs(torch, pipe, resolution, device)
            with kiln.diffusers.apply(transformer):
                one = forward(transformer, inputs)
            reference, _ = flux2.build_models(torch, diffusers, device, torch.float32)
            f32 = forward(reference, in_dtype(inputs, torch.float32))
            plain = forward(transformer, inputs)
            del reference
            case = dict(parallel=parallel, order="cp first", weights="fp8")
            out, seconds, _, _ = _run_case(case, transformer, inputs, reps=3)
        if rank == 0:
            torch.save({"one": one.cpu(), "f32": f32.cpu(), "plain": plain.cpu(),
                        "out": out.cpu(), "seconds": seconds},
                       os.path.join(folder, "gpu.pt"))
    finally:
        dist.destroy_process_group()


GPU_CASES = [({"ulysses_degree": 2}, 1024), ({"ring_degree": 2}, 1024),
             ({"ulysses_degree": 4}, 1024), ({"ring_degree": 4}, 1024),
             ({"ring_degree": 2, "ulysses_degree": 2}, 1024),
             ({"ulysses_degree": 2, "ulysses_anything": True}, 1040),
             ({"ring_degree": 4, "ring_anything": True}, 1040)]


@pytest.mark.parametrize("parallel, resolution", GPU_CASES,
                         ids=["ulysses2", "ring2", "ulysses4", "ring4", "ring2xulysses2",
                              "ulysses2-anything-1040", "ring4-anything-1040"])
def test_klein_4b_nccl(tmp_path, parallel, resolution):
    """klein 4B's real config on 2 or 4 GPUs over NCCL: the context-parallel output (CUDA graphs
    replayed; eager for uneven shares) against kiln on one GPU, within the bf16 bound."""
    world = parallel.get("ring_degree", 1) * parallel.get("ulysses_degree", 1)
    if not HAS_CUDA:
        pytest.skip(CUDA_REASON)
    if torch.cuda.device_count() < world:
        pytest.skip(f"{world} GPUs needed, {torch.cuda.device_count()} present")
    mp.spawn(_gpu_worker, args=(world, _free_port(), str(tmp_path), parallel, resolution),
             nprocs=world)
    result = torch.load(tmp_path / "gpu.pt")
    bound = max(relative_error(result["plain"], result["f32"]),
                relative_error(result["one"], result["f32"]))
    vs_one = relative_error(result["out"], result["one"])
    print(f"\nklein 4B {resolution}², {parallel} on {world} {torch.cuda.get_device_name()}: vs "
          f"one GPU {vs_one:.2e} (bound {bound:.2e}), step {result['seconds'] * 1e3:.1f} ms")
    assert vs_one <= bound
    assert relative_error(result["out"], result["f32"]) <= 1.25 * relative_error(result["one"],
                                                                                 result["f32"])
