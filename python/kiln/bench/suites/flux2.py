"""flux2: Flux.2 klein 4B end to end, kiln.diffusers against diffusers and its fast recipes.

The model: diffusers' Flux2Transformer2DModel and AutoencoderKLFlux2 built from klein 4B's real
configs (kiln.diffusers.configs) with random bf16 weights (nothing can be downloaded where this
runs), batch 1, 512 text tokens of given embeddings (no text encoder), at 1024² (4096 image
tokens); with --all also at 512² and 1792² (1024 and 12544), --filter 1792 picks one. One
resolution a run fits a GPU check's 10-minute command: the compiled peers compile again for each
resolution (torchao's compilation takes minutes).

Contenders, each on the same weights and inputs in one run:
  kiln fp8           kiln.diffusers.apply(pipe): fp8 weights, fp8 x fp8 GEMMs, CUDA graphs
  kiln fp8 (gemm)    activations="bf16": bf16 x fp8 weights decoded in registers, the sm_80/86
                     path, forced on this GPU
  kiln bf16          weights="bf16": cuBLAS GEMMs, kiln's fused rest, CUDA graphs
  diffusers bf16     eager, SDPA's default backend
  diffusers+compile  transformer.compile_repeated_blocks(fullgraph=True) (regional torch.compile)
  torchao fp8+compile  torchao's Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
                     + compile_repeated_blocks; where torchao cannot be imported, the same recipe
                     written with torch._scaled_mm (rowwise scales), said in the log
The VAE decoder is kiln's for the kiln contenders and diffusers' eager bf16 for the others.

Cases per resolution: "step" (one transformer forward), "image" (Flux2KleinPipeline with the
embeddings given: 4 steps, the scheduler, VAE decode, postprocessing) and "vae decode". Times
are wall-clock medians of synchronized calls (what a caller waits for: host overhead, which
CUDA graphs remove, is part of it), after the first call and warm-up. Reported with each: TFLOP/s
of the step (every GEMM 2·M·N·K, attention 4·L²·D per head), peak memory (the contender's
weights plus torch's peak allocation above them during its first call, plus kiln's own
workspace, kiln.workspace_peak_bytes), the first call's time (kiln: capture of the CUDA graph
included; torch.compile: compilation included) and the relative error of the step's output
against an f32 eager forward of the same weights. kiln's first call with a cold and with a warm
JIT disk cache is measured at 1024² in fresh processes (KILN_CACHE_DIR emptied for the first).

Checks (a failure fails the run): kiln fp8's error <= 1.5x the fp8 recipe's, kiln bf16's <= 1.0x
diffusers bf16's. The issue's speed and memory targets are logged against the measurement, met
or missed, without failing the run.

`kiln bench flux2 --gpus N` (N >= 2) measures sequence parallelism instead: the transformer step
at 1024² and 2048² (4096 and 16384 image tokens + 512 text) on 1 GPU and on 2, 4, ... up to N
GPUs, one torchrun-style launch of W processes (python -m torch.distributed.run, NCCL, one GPU
each) per GPU count W. In each launch every rank first times kiln fp8 and diffusers bf16 (SDPA)
on its own GPU (the one-GPU baselines of the same run; rank 0's are reported), then, per mode
(Ulysses W, ring W) on a freshly built model: diffusers' own context parallelism
(enable_parallelism; Ulysses on the native SDPA backend, ring on SDPA's cuDNN backend, which
returns the LSE the ring needs), then kiln.diffusers.apply on top (kiln fp8, CUDA graphs).
Reported: step ms, speedup and scaling efficiency (t1 / (W tW)) against kiln on one GPU, ratio
to diffusers' context parallelism at the same GPU count, and the output's relative error against
kiln on one GPU (checked: below kiln fp8's own difference from diffusers bf16). The issue's
targets (2048²: >= 1.85x on 2 GPUs, >= 3.4x on 4 against kiln on one; >= 1.2x diffusers' context
parallelism with SDPA) are logged met or missed. With fewer GPUs than asked for, it says so and
measures only the counts the machine has; with one GPU or none, nothing.
"""

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from ... import _C, reset_workspace_peak, workspace_peak_bytes
from ..core import Measurement
from ..peers import quantize_rows

NAME = "flux2"
DESCRIPTION = ("Flux.2 klein 4B step / 4-step image / VAE decode: kiln.diffusers vs diffusers "
               "bf16 eager, + torch.compile, torchao fp8 + compile")

RESOLUTIONS = (512, 1024, 1792)
DEFAULT_RESOLUTION = 1024  # the default case list's; the others with --all or --filter
TEXT_TOKENS = 512
STEPS = 4
MAX_REPS = 5  # timed calls per case at most (a 1792² image takes about a second)
MAX_WARMUP = 2
SEED = 0
FIRST_CALL_RESOLUTION = 1024
# The targets (H100 / H200), logged against the measurements.
TARGETS = {
    "step 1024² vs diffusers bf16": 1.8,
    "step 1024² vs diffusers+compile": 1.3,
    "step 1024² vs torchao fp8+compile": 1.1,
    "image 1024² vs diffusers bf16": 1.6,
}
PEAK_MEMORY_RATIO = 0.6
FIRST_CALL_COLD_S = 10.0
FIRST_CALL_WARM_S = 2.0
# Sequence parallelism (--gpus N): resolutions, modes (ContextParallelConfig arguments for W GPUs
# and the diffusers backend of its own context parallelism), targets of the issue.
PARALLEL_RESOLUTIONS = (1024, 2048)
PARALLEL_MODES = {"ulysses": ("ulysses_degree", "native"), "ring": ("ring_degree", "_native_cudnn")}
PARALLEL_SPEEDUP_TARGETS = {2: 1.85, 4: 3.4}  # 2048² step against kiln on one GPU
PARALLEL_VS_DIFFUSERS = 1.2  # against diffusers' context parallelism at the same GPU count
PARALLEL_MARK = "kiln-flux2-parallel:"  # rank 0's result line in a launch's stdout
# NVLink multicast stays off in every launched process (the shared multi-GPU hosts need it).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
KILN_MODES = {"kiln fp8": dict(weights="fp8", activations="fp8"),
              "kiln fp8 (gemm)": dict(weights="fp8", activations="bf16"),
              "kiln bf16": dict(weights="bf16")}
PEERS = ("diffusers bf16", "diffusers+compile", "torchao fp8+compile")


def _import_diffusers():
    try:
        import diffusers
    except ImportError as error:
        return None, f"diffusers is not installed ({error}); scripts/fetch_bench_wheels.sh"
    return diffusers, None


# ---- models and inputs ---------------------------------------------------------------------------


def build_models(torch, diffusers, device, dtype, transformer_config=None, vae_config=None):
    """klein 4B's transformer and VAE (or the configs given) with random weights, built on
    `device` in `dtype` directly (meta tensors first: no f32 copy, no host memory)."""
    from ...diffusers import configs

    def make(cls, config, seed):
        with torch.device("meta"):
            model = cls(**config)
        model = model.to(dtype).to_empty(device=device)
        for module in model.modules():
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
        return configs.random_weights(model, seed).eval()

    transformer = make(diffusers.Flux2Transformer2DModel,
                       transformer_config or configs.FLUX2_KLEIN_4B, SEED)
    vae = make(diffusers.AutoencoderKLFlux2, vae_config or configs.FLUX2_VAE, SEED + 1)
    return transformer, vae


def make_pipeline(diffusers, transformer, vae):
    pipe = diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, transformer=transformer, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def step_inputs(torch, pipe, resolution, device):
    """A transformer forward's keyword arguments as Flux2KleinPipeline builds them at
    `resolution`² (random latents and text embeddings, timestep 0.5)."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    embeds = torch.randn(1, TEXT_TOKENS, pipe.transformer.config.joint_attention_dim,
                         generator=generator, device=device, dtype=torch.bfloat16)
    latents, latent_ids = pipe.prepare_latents(
        batch_size=1, num_latents_channels=pipe.transformer.config.in_channels // 4,
        height=resolution, width=resolution, dtype=torch.bfloat16, device=device,
        generator=generator, latents=None)
    return {"hidden_states": latents, "encoder_hidden_states": embeds,
            "timestep": torch.full((1,), 0.5, device=device), "guidance": None,
            "img_ids": latent_ids, "txt_ids": pipe._prepare_text_ids(embeds).to(device),
            "return_dict": False}


def step_flops(config: dict, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one forward: 2·M·N·K per linear over its tokens, 4·L²·D per attention head."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(d * config["mlp_ratio"])
    tokens = image_tokens + text_tokens
    double = 2 * tokens * (3 * d * d + d * d + 2 * mlp * d + mlp * d)
    single = 2 * tokens * ((3 * d + 2 * mlp) * d + (d + mlp) * d)
    attention = 4 * tokens * tokens * d
    embed = 2 * d * (2 * image_tokens * config["in_channels"]
                     + text_tokens * config["joint_attention_dim"])
    return (config["num_layers"] * (double + attention)
            + config["num_single_layers"] * (single + attention) + embed)


# ---- measuring -----------------------------------------------------------------------------------


def wall_ms(torch, fn, warmup: int, reps: int) -> float:
    """Median wall time of synchronized calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def first_call(torch, device, fn):
    """(seconds, peak bytes above what was allocated before, result) of one call."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    reset_workspace_peak(device.index or 0)
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before + workspace_peak_bytes(
        device.index or 0)
    return seconds, peak, result


def relative_error(torch, got, want) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def allocated(torch, device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device)


class Results:
    """Per contender and case: ms, first-call s, peak bytes, error; weights bytes per contender."""

    def __init__(self):
        self.ms, self.first_s, self.peak, self.error, self.weights = {}, {}, {}, {}, {}

    def record(self, contender, case, ms, first_s, peak, error=None):
        self.ms[(contender, case)] = ms
        self.first_s[(contender, case)] = first_s
        self.peak[(contender, case)] = peak + self.weights[contender]
        if error is not None:
            self.error[(contender, case)] = error


def run_contender(bench, torch, name, pipe, cases, references, results, warmup, reps):
    """Times one contender on every wanted resolution: step, image and VAE decode."""
    device = bench.device
    for resolution, inputs in cases.items():
        step = f"step {resolution}²"
        try:
            seconds, peak, out = first_call(
                torch, device, lambda: pipe.transformer(**inputs)[0])
            error = relative_error(torch, out, references[resolution])
            del out
            ms = wall_ms(torch, lambda: pipe.transformer(**inputs), warmup, reps)
            results.record(name, step, ms, seconds, peak, error)

            def image():
                return pipe(prompt_embeds=inputs["encoder_hidden_states"], height=resolution,
                            width=resolution, num_inference_steps=STEPS, guidance_scale=1.0,
                            generator=torch.Generator(device=device).manual_seed(SEED),
                            output_type="pt").images

            seconds, peak, _ = first_call(torch, device, image)
            results.record(name, f"image {resolution}²", wall_ms(torch, image, 1, reps),
                           seconds, peak)
            latents = torch.randn(1, pipe.vae.config.latent_channels, resolution // 8,
                                  resolution // 8, device=device, dtype=torch.bfloat16)

            def decode():
                return pipe.vae.decode(latents).sample

            seconds, peak, _ = first_call(torch, device, decode)
            results.record(name, f"vae decode {resolution}²", wall_ms(torch, decode, warmup, reps),
                           seconds, peak)
        except torch.OutOfMemoryError:
            bench.log(f"{name} ran out of memory at {resolution}²: skipped")
            torch.cuda.empty_cache()
            continue
        bench.log(f"{name} {resolution}²: step {results.ms[(name, step)]:.2f} ms "
                  f"(first call {results.first_s[(name, step)]:.1f} s, error "
                  f"{results.error[(name, step)]:.2e}), image "
                  f"{results.ms[(name, f'image {resolution}²')]:.1f} ms")


# ---- the fp8 recipe peer -------------------------------------------------------------------------


def fp8_recipe(bench, torch, transformer) -> str:
    """Quantizes `transformer` in place the way users pick on Hopper: torchao's
    Float8DynamicActivationFloat8WeightConfig with per-row scales; without torchao, every block
    linear as torch._scaled_mm with the same per-row scales. Returns the recipe's name."""
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, PerRow,
                                          quantize_)
    except ImportError as error:
        bench.log(f"torchao cannot be imported ({error}): the fp8 peer is the same recipe "
                  "written with torch._scaled_mm")
    else:
        import torchao

        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        bench.log(f"fp8 peer: torchao {torchao.__version__} "
                  "Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())")
        return "torchao"
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _ScaledMmLinear(torch, module)
    return "torch._scaled_mm"


class _ScaledMmLinear:
    """x quantized per token and W per output channel to e4m3fn, torch._scaled_mm with rowwise
    scales, bf16 out (the torchao recipe without torchao)."""

    def __init__(self, torch, linear):
        self.torch = torch
        self.w, scale = quantize_rows(torch, linear.weight.detach().float())  # [N, K], [N]
        self.w_scale = scale.reshape(1, -1)  # [1, N]
        self.bias = linear.bias

    def __call__(self, x):
        torch = self.torch
        rows = x.reshape(-1, x.shape[-1]).float()
        m = rows.shape[0]
        rows = torch.nn.functional.pad(rows, (0, 0, 0, -m % 16))  # M a multiple of 16
        q, scale = quantize_rows(torch, rows)
        y = torch._scaled_mm(q, self.w.t(), scale_a=scale.reshape(-1, 1), scale_b=self.w_scale,
                             bias=self.bias, out_dtype=x.dtype)
        return y[:m].reshape(*x.shape[:-1], y.shape[-1])


# ---- kiln's first call in a fresh process --------------------------------------------------------


def first_call_process(resolution: int) -> dict:
    """In this process: build klein 4B, apply kiln (fp8), time apply and the first forward."""
    import torch

    import kiln.diffusers

    diffusers, _ = _import_diffusers()
    device = torch.device("cuda")
    transformer, vae = build_models(torch, diffusers, device, torch.bfloat16)
    pipe = make_pipeline(diffusers, transformer, vae)
    inputs = step_inputs(torch, pipe, resolution, device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        kiln.diffusers.apply(pipe)
        applied = time.perf_counter()
        transformer(**inputs)
        torch.cuda.synchronize()
    end = time.perf_counter()
    return {"apply_s": applied - start, "first_forward_s": end - applied,
            "total_s": end - start, "jit": _C.jit_stats()}


def _first_calls(bench) -> dict:
    """kiln's first call at 1024² in fresh processes: cold (empty KILN_CACHE_DIR) then warm."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="kiln-flux2-jit-") as cache:
        env = {**os.environ, "KILN_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            done = subprocess.run(
                [sys.executable, "-m", "kiln.bench.suites.flux2", "--first-call",
                 str(FIRST_CALL_RESOLUTION)], env=env, capture_output=True, text=True,
                timeout=900)
            if done.returncode != 0:
                bench.log(f"first call ({label} JIT cache) failed: {done.stderr[-2000:]}")
                return results
            results[label] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[label]
            bench.log(f"kiln fp8 first call at {FIRST_CALL_RESOLUTION}², {label} JIT cache: apply "
                      f"{r['apply_s']:.2f} s + first forward {r['first_forward_s']:.2f} s "
                      f"(CUDA graph capture included; {r['jit']['compiles']} compiles, "
                      f"{r['jit']['disk_hits']} disk hits)")
    return results


# ---- the suite -----------------------------------------------------------------------------------


def _torch_and_diffusers(bench, needs: str):
    """(torch, diffusers), or None after saying why nothing is measured (`needs`: what the run
    needs a GPU for)."""
    if not bench.cuda:
        bench.log(f"no CUDA device ({_C.cuda_unavailable_reason()}): {needs}; nothing measured")
        return None
    torch = bench.require_torch()
    diffusers, why = _import_diffusers()
    if diffusers is None:
        bench.log(f"{why}: nothing measured")
        return None
    return torch, diffusers


def run(bench) -> None:
    if bench.gpus > 1:
        run_parallel(bench)
        return
    found = _torch_and_diffusers(bench, "the flux2 suite runs a 4B model on the GPU only")
    if found is None:
        return
    torch, diffusers = found
    import kiln.diffusers

    resolutions = [r for r in RESOLUTIONS if bench.wants(f"{r}²", r == DEFAULT_RESOLUTION)]
    if not resolutions:
        return
    warmup, reps = min(bench.warmup, MAX_WARMUP), min(bench.reps, MAX_REPS)
    bench.log(f"diffusers {diffusers.__version__}, torch {torch.__version__}; klein 4B random "
              f"weights; {warmup} warm-up and {reps} timed calls per case")
    device = bench.device
    with torch.no_grad():
        _run(bench, torch, diffusers, kiln.diffusers, device, resolutions, warmup, reps)


def _run(bench, torch, diffusers, kiln_diffusers, device, resolutions, warmup, reps):
    results = Results()
    base = allocated(torch, device)
    transformer, vae = build_models(torch, diffusers, device, torch.bfloat16)
    vae_bytes = sum(p.nbytes for p in vae.parameters())
    model_bytes = allocated(torch, device) - base
    pipe = make_pipeline(diffusers, transformer, vae)
    cases = {r: step_inputs(torch, pipe, r, device) for r in resolutions}

    # The f32 eager forward every contender's step is compared with (TF32 off).
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    reference_model, _ = build_models(torch, diffusers, device, torch.float32)
    reference_model.load_state_dict(transformer.state_dict())
    references = {}
    for r, inputs in cases.items():
        f32_inputs = {k: (v.float() if k in ("hidden_states", "encoder_hidden_states") else v)
                      for k, v in inputs.items()}
        references[r] = reference_model(**f32_inputs)[0]
    del reference_model, f32_inputs
    torch.backends.cuda.matmul.allow_tf32 = tf32
    allocated(torch, device)

    results.weights["diffusers bf16"] = model_bytes
    run_contender(bench, torch, "diffusers bf16", pipe, cases, references, results, warmup, reps)
    for name, kwargs in KILN_MODES.items():
        before = allocated(torch, device)
        handle = kiln_diffusers.apply(pipe, **kwargs)
        results.weights[name] = model_bytes + allocated(torch, device) - before
        bench.log(f"{name}: {handle.summary}")
        run_contender(bench, torch, name, pipe, cases, references, results, warmup, reps)
        handle.remove()
        del handle
    # Compiled in place (irreversibly) last; the torchao peer gets a copy of the weights.
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    results.weights["diffusers+compile"] = model_bytes
    run_contender(bench, torch, "diffusers+compile", pipe, cases, references, results, warmup,
                  reps)
    del pipe
    transformer_bytes = model_bytes - vae_bytes
    state = {k: v for k, v in transformer.state_dict().items()}
    del transformer
    # What is allocated without any transformer: `state` holds the bf16 weights until the copy
    # is quantized, so their bytes are taken off.
    before = allocated(torch, device) - sum(v.nbytes for v in state.values())
    quantized, _ = build_models(torch, diffusers, device, torch.bfloat16)
    quantized.load_state_dict(state)
    del state
    recipe = fp8_recipe(bench, torch, quantized)
    quantized.compile_repeated_blocks(fullgraph=True, dynamic=False)
    results.weights["torchao fp8+compile"] = allocated(torch, device) - before + vae_bytes
    bench.log(f"weights on the GPU: bf16 transformer {transformer_bytes / 2**30:.2f} GiB, "
              f"fp8 recipe ({recipe}) "
              f"{(results.weights['torchao fp8+compile'] - vae_bytes) / 2**30:.2f} GiB")
    pipe = make_pipeline(diffusers, quantized, vae)
    run_contender(bench, torch, "torchao fp8+compile", pipe, cases, references, results,
                  warmup, reps)
    del pipe, quantized
    allocated(torch, device)
    first = _first_calls(bench)
    _report(bench, results, resolutions, first, vae_bytes)


def _report(bench, results, resolutions, first, vae_bytes):
    """One Measurement per case and kiln mode (the other contenders as its peers), then the
    summary table, the targets and the accuracy checks."""
    from ...diffusers import configs

    config = configs.FLUX2_KLEIN_4B
    for r in resolutions:
        image_tokens = (r // 16) ** 2
        flop = step_flops(config, image_tokens, TEXT_TOKENS)
        for what in ("step", "image", "vae decode"):
            case = f"{what} {r}²"
            for kiln_name in (KILN_MODES if what != "vae decode" else ("kiln fp8",)):
                if (kiln_name, case) not in results.ms:
                    continue
                peers = {p: results.ms[(p, case)] for p in (*PEERS, *KILN_MODES)
                         if p != kiln_name and (p, case) in results.ms}
                contenders = [kiln_name, *peers]
                notes = {"first_call_s": {c: results.first_s[(c, case)] for c in contenders},
                         "peak_bytes": {c: results.peak[(c, case)] for c in contenders}}
                if what == "step":
                    notes["tflops"] = {c: flop / results.ms[(c, case)] / 1e9 for c in contenders}
                    notes["relative_error_vs_f32"] = {c: results.error[(c, case)]
                                                      for c in contenders}
                # bytes: the weights one call reads (the transformer's per step, the VAE's).
                transformer_bytes = results.weights[kiln_name] - vae_bytes
                read = {"step": transformer_bytes, "image": STEPS * transformer_bytes + vae_bytes,
                        "vae decode": vae_bytes}[what]
                bench.add(Measurement(
                    case=f"{what} {kiln_name}",
                    shape=f"{r}² ({image_tokens} + {TEXT_TOKENS} tokens)",
                    kiln_ms=results.ms[(kiln_name, case)], bytes=read, peers=peers, notes=notes))
    _log_summary(bench, results, resolutions, config, first)


def _log_summary(bench, results, resolutions, config, first):
    mib = 2.0**20
    names = (*KILN_MODES, *PEERS)
    bench.log("resolution | contender | step ms | TFLOP/s | image ms | vae ms | step peak MiB | "
              "image peak MiB | first step s | error vs f32")
    for r in resolutions:
        flop = step_flops(config, (r // 16) ** 2, TEXT_TOKENS)
        for name in names:
            step = (name, f"step {r}²")
            if step not in results.ms:
                continue
            image = (name, f"image {r}²")
            vae = (name, f"vae decode {r}²")
            bench.log(f"{r}² | {name} | {results.ms[step]:.2f} | "
                      f"{flop / results.ms[step] / 1e9:.0f} | {results.ms.get(image, math.nan):.1f}"
                      f" | {results.ms.get(vae, math.nan):.1f} | {results.peak[step] / mib:.0f} | "
                      f"{results.peak.get(image, math.nan) / mib:.0f} | "
                      f"{results.first_s[step]:.1f} | {results.error[step]:.3e}")
    ms = results.ms
    for target, want in TARGETS.items():
        what, rest = target.split(" vs ")
        peer_key, kiln_key = (rest, what), ("kiln fp8", what)
        if peer_key in ms and kiln_key in ms:
            got = ms[peer_key] / ms[kiln_key]
            bench.log(f"target {target}: {got:.2f}x (>= {want}x: "
                      f"{'met' if got >= want else 'MISSED'})")
    if ("kiln fp8", "image 1024²") in results.peak and ("diffusers bf16",
                                                         "image 1024²") in results.peak:
        ratio = results.peak[("kiln fp8", "image 1024²")] / results.peak[("diffusers bf16",
                                                                           "image 1024²")]
        bench.log(f"target peak memory 1024² image: {ratio:.2f}x diffusers bf16 (<= "
                  f"{PEAK_MEMORY_RATIO}: {'met' if ratio <= PEAK_MEMORY_RATIO else 'MISSED'})")
    for label, limit in (("cold", FIRST_CALL_COLD_S), ("warm", FIRST_CALL_WARM_S)):
        if label in first:
            total = first[label]["total_s"]
            bench.log(f"target first call, {label} JIT cache: {total:.1f} s (<= {limit} s: "
                      f"{'met' if total <= limit else 'MISSED'})")
    for r in resolutions:
        errors = results.error
        recipe = errors.get(("torchao fp8+compile", f"step {r}²"))
        for name in ("kiln fp8", "kiln fp8 (gemm)"):
            if recipe and (name, f"step {r}²") in errors:
                bench.check(f"{name} error / fp8 recipe's, {r}²",
                            errors[(name, f"step {r}²")] / recipe, "x", 1.5)
        plain = errors.get(("diffusers bf16", f"step {r}²"))
        if plain and ("kiln bf16", f"step {r}²") in errors:
            bench.check(f"kiln bf16 error / diffusers bf16's, {r}²",
                        errors[("kiln bf16", f"step {r}²")] / plain, "x", 1.0 + 1e-9)


# ---- sequence parallelism: --gpus N --------------------------------------------------------------


def gpu_counts(asked: int, present: int) -> list:
    """The GPU counts measured: 2, 4, 8 ... up to what was asked for and the machine has."""
    counts, w = [], 2
    while w <= min(asked, present):
        counts.append(w)
        w *= 2
    return counts


def run_parallel(bench) -> None:
    """kiln bench flux2 --gpus N: one launch of W processes per GPU count W (see the module)."""
    found = _torch_and_diffusers(bench, f"--gpus {bench.gpus} measures sequence parallelism "
                                 "over several GPUs")
    if found is None:
        return
    torch, diffusers = found
    present = torch.cuda.device_count()
    counts = gpu_counts(bench.gpus, present)
    if present < bench.gpus:
        bench.log(f"asked for {bench.gpus} GPUs, this machine has {present}: "
                  + (f"measuring {', '.join(map(str, counts))} GPUs only" if counts
                     else "sequence parallelism needs 2 or more; nothing measured"))
    resolutions = [r for r in PARALLEL_RESOLUTIONS if bench.wants(f"{r}²")]
    if not counts or not resolutions:
        return
    settings = {"resolutions": resolutions, "warmup": min(bench.warmup, MAX_WARMUP),
                "reps": min(bench.reps, MAX_REPS)}
    bench.log(f"diffusers {diffusers.__version__}, torch {torch.__version__}; klein 4B random "
              f"weights on {present} x {torch.cuda.get_device_name()}; "
              f"{settings['warmup']} warm-up and {settings['reps']} timed steps per case")
    launches = {}
    for world in counts:
        result = _launch(bench, world, settings)
        if result is not None:
            launches[world] = result
    _report_parallel(bench, launches, resolutions)


def _launch(bench, world: int, settings: dict):
    """Runs parallel_worker in `world` processes (torchrun); returns rank 0's results or None."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", "-m", "kiln.bench.suites.flux2", "--parallel-worker",
               json.dumps(settings)]
    env = {**os.environ, **NCCL_ENV}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        bench.log(f"{world} GPUs: the launch ran past an hour; nothing measured for it")
        return None
    result = parse_worker_output(done.stdout)
    if done.returncode != 0 or result is None:
        bench.log(f"{world} GPUs: the launch failed (exit {done.returncode}): "
                  f"{(done.stderr or done.stdout)[-3000:]}")
        return None
    bench.log(f"{world} GPUs: launch done in {time.perf_counter() - start:.0f} s")
    return result


def parse_worker_output(stdout: str):
    """Rank 0's result line of a launch's stdout, or None."""
    lines = [line for line in stdout.splitlines() if line.startswith(PARALLEL_MARK)]
    return json.loads(lines[-1][len(PARALLEL_MARK):]) if lines else None


def parallel_worker(settings: dict) -> None:
    """One rank of a launch (torchrun's RANK / WORLD_SIZE / LOCAL_RANK): the one-GPU baselines on
    this rank's GPU, then every mode under diffusers' context parallelism, diffusers' attention
    first and kiln's after; rank 0 prints the results as one line. Without CUDA it runs on the
    CPU over gloo (the tests' small configs: settings "transformer_config", "vae_config",
    "modes", and "kiln" for apply's arguments)."""
    import torch
    import torch.distributed as dist

    import kiln.diffusers
    from kiln.diffusers._graphs import settled

    diffusers, _ = _import_diffusers()
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("cpu:gloo")
    world = dist.get_world_size()
    warmup, reps = settings["warmup"], settings["reps"]
    modes = settings.get("modes", list(PARALLEL_MODES))
    kiln_args = settings.get("kiln", {})  # kiln.diffusers.apply's defaults: fp8, CUDA graphs
    results = {"world": world, "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
               "modes": modes, "steps": {}, "errors": {}}

    def model():
        transformer, vae = build_models(torch, diffusers, device, torch.bfloat16,
                                        settings.get("transformer_config"),
                                        settings.get("vae_config"))
        return transformer, make_pipeline(diffusers, transformer, vae)

    def step_ms(fn):
        if cuda:
            return wall_ms(torch, fn, warmup, reps)
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def time_step(name, transformer, inputs, resolution):
        dist.barrier()
        out = settled(transformer(**inputs)[0])
        results["steps"][f"{name} {resolution}"] = step_ms(
            lambda: settled(transformer(**inputs)))
        return out

    def release():
        if cuda:
            allocated(torch, device)

    with torch.no_grad():
        transformer, pipe = model()
        cases = {r: step_inputs(torch, pipe, r, device) for r in settings["resolutions"]}
        plain = {r: time_step("diffusers 1", transformer, inputs, r)
                 for r, inputs in cases.items()}
        with kiln.diffusers.apply(transformer, **kiln_args):
            one = {r: time_step("kiln 1", transformer, inputs, r) for r, inputs in cases.items()}
        for r in cases:
            results["errors"][f"kiln 1 {r}"] = relative_error(torch, one[r], plain[r])
        del transformer, pipe, plain
        release()
        for mode in modes:
            degree, backend = PARALLEL_MODES[mode]
            transformer, pipe = model()
            transformer.set_attention_backend(backend)
            transformer.enable_parallelism(
                config=diffusers.ContextParallelConfig(**{degree: world}))
            for r, inputs in cases.items():
                time_step(f"diffusers {mode} {world}", transformer, inputs, r)
            with kiln.diffusers.apply(transformer, **kiln_args):
                for r, inputs in cases.items():
                    out = time_step(f"kiln {mode} {world}", transformer, inputs, r)
                    results["errors"][f"kiln {mode} {world} {r}"] = relative_error(torch, out,
                                                                                   one[r])
            del transformer, pipe, out
            release()
    if dist.get_rank() == 0:
        print(PARALLEL_MARK + json.dumps(results), flush=True)
    dist.destroy_process_group()


def _report_parallel(bench, launches: dict, resolutions) -> None:
    """Measurements per resolution, mode and GPU count (peers: diffusers' context parallelism at
    that count, kiln and diffusers on one GPU), scaling, errors, and the issue's targets."""
    from ...diffusers import configs

    config = configs.FLUX2_KLEIN_4B
    bench.log("resolution | GPUs | mode | kiln ms | diffusers CP (SDPA) ms | kiln 1 GPU ms | "
              "speedup | scaling efficiency | vs diffusers CP | error vs kiln 1 GPU")
    best = {}  # (resolution, world) -> (kiln ms, diffusers CP ms) of the faster kiln mode
    for world, result in sorted(launches.items()):
        steps, errors = result["steps"], result["errors"]
        for r in resolutions:
            one, plain = steps[f"kiln 1 {r}"], steps[f"diffusers 1 {r}"]
            for mode in result["modes"]:
                kiln_ms = steps[f"kiln {mode} {world} {r}"]
                peer_ms = steps[f"diffusers {mode} {world} {r}"]
                error = errors[f"kiln {mode} {world} {r}"]
                image_tokens = (r // 16) ** 2
                bench.add(Measurement(
                    case=f"step {mode} {world} GPUs", shape=f"{r}² ({image_tokens} + "
                    f"{TEXT_TOKENS} tokens)", kiln_ms=kiln_ms, bytes=0,
                    peers={f"diffusers {mode} {world} GPUs (SDPA)": peer_ms,
                           "kiln 1 GPU": one, "diffusers 1 GPU": plain},
                    notes={"gpus": world, "gpu": result["gpu"], "speedup_vs_kiln_1gpu":
                           one / kiln_ms, "scaling_efficiency": one / (world * kiln_ms),
                           "relative_error_vs_kiln_1gpu": error,
                           "tflops_per_gpu": step_flops(config, image_tokens, TEXT_TOKENS)
                           / kiln_ms / 1e9 / world}))
                bench.log(f"{r}² | {world} | {mode} | {kiln_ms:.1f} | {peer_ms:.1f} | {one:.1f} | "
                          f"{one / kiln_ms:.2f}x | {one / (world * kiln_ms):.0%} | "
                          f"{peer_ms / kiln_ms:.2f}x | {error:.2e}")
                # Within kiln's own difference from diffusers bf16 on one GPU.
                bench.check(f"kiln {mode} {world} GPUs {r}² error vs 1 GPU / kiln 1 GPU's vs "
                            "diffusers bf16", error / errors[f"kiln 1 {r}"], "x", 1.0)
                if (r, world) not in best or kiln_ms < best[(r, world)][0]:
                    best[(r, world)] = (kiln_ms, peer_ms, mode, one)
    for (r, world), (kiln_ms, peer_ms, mode, one) in sorted(best.items()):
        if r != 2048:
            continue
        want = PARALLEL_SPEEDUP_TARGETS.get(world)
        if want is not None:
            got = one / kiln_ms
            bench.log(f"target 2048² step on {world} GPUs vs kiln on one ({mode}): {got:.2f}x "
                      f"(>= {want}x: {'met' if got >= want else 'MISSED'})")
        got = peer_ms / kiln_ms
        bench.log(f"target 2048² step on {world} GPUs vs diffusers' context parallelism with "
                  f"SDPA ({mode}): {got:.2f}x (>= {PARALLEL_VS_DIFFUSERS}x: "
                  f"{'met' if got >= PARALLEL_VS_DIFFUSERS else 'MISSED'})")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--first-call":
        print(json.dumps(first_call_process(int(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--parallel-worker":
        parallel_worker(json.loads(sys.argv[2]))
    else:
        print("usage: python -m kiln.bench.suites.flux2 --first-call RESOLUTION | "
              "--parallel-worker SETTINGS (run by `kiln bench flux2`)", file=sys.stderr)
        sys.exit(2)
