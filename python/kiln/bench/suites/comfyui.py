"""comfyui: FLUX.1 in the real ComfyUI at 1024², as shipped against ComfyUI with kiln's node.

Needs a CUDA GPU and the ComfyUI snapshot: scripts/prepare_comfyui.sh puts it into .comfyui/
(and the wheels its imports need beyond the GPU machine's packages into .whl/; KILN_COMFYUI names
the snapshot elsewhere). Without either, the suite says so and measures nothing.

The model is FLUX.1-dev's architecture at full depth (19 double + 38 single blocks, hidden 3072,
24 heads x 128, guidance embedding) with random weights (see flux_state_dict), loaded through
ComfyUI's loader (comfy.sd.load_diffusion_model_state_dict) as bf16, as e4m3 weights with a
per-tensor scale_weight and the scaled_fp8 marker (ComfyUI's "scaled fp8" checkpoints), and as
plain e4m3 weights (the common fp8 FLUX.1 checkpoints), and run on 1024² latents (4096 image +
512 text tokens, batch 1). Contenders, in one process, in this order:
  ComfyUI bf16          as shipped
  ComfyUI fp8           scaled fp8, as shipped with --fast fp8_matrix_mult: comfy.ops.fp8_linear
                        casts each activation to e4m3 with scale 1 (saturating at +-448),
                        torch._scaled_mm
  ComfyUI fp8 plain     plain e4m3, as shipped: manual_cast dequantizes every weight to bf16 on
                        every call (--fast changes nothing: its fp8_ops layers call fp8_linear
                        only outside training mode, and this ComfyUI leaves Flux models in it)
  kiln bf16             the node loaded: Flux blocks on kiln (fused AdaLN norms, QK RMSNorm +
                        RoPE, kiln.attention, gate / residual epilogues), bf16 GEMMs by cuBLAS
  kiln fp8              the node loaded, scaled fp8: the blocks on kiln, fp8 x fp8 GEMMs with
                        per-token activation scales fused into the norms and activations
  kiln fp8 plain        the node loaded, plain e4m3: the same, on the weights as stored
  kiln fp8 plain, bf16 activations
                        the node with KILN_COMFY_FP8_ACTIVATIONS=bf16: bf16 activations x fp8
                        weights decoded in registers, what sm_80/86 run, measured here
  VAE decode            the Flux VAE (random weights) decoding a 128² latent to 1024², bf16, as
                        shipped and with the node (decoder convolutions on kiln.conv2d)
Step: one call of the model as a sampling step makes it (BaseModel.apply_model with the
patcher's transformer_options, where the node's block replacements are: Euler at CFG 1 is one
call), median of CUDA-event-timed calls. Peak: torch.cuda.max_memory_allocated during one call
above what was allocated before it (the weights excluded), plus kiln's own workspace peak.
Error: the Frobenius relative error of a step's output against ComfyUI bf16's on the same inputs
(of kiln's VAE decode against ComfyUI's).
Checks: the node's fp8 error over ComfyUI's fp8 error stays below 1; the issue's targets as
time ratios (kiln fp8 step / ComfyUI bf16 step < 1 / 1.3, / ComfyUI fp8 step < 1, VAE decode
< 1 / 1.2), and the plain-fp8 step against ComfyUI's below 1.

It runs in a child process (python -m kiln.bench.suites.comfyui), so that ComfyUI's
process-wide settings stay out of the other suites; the child writes JSON that run() reads.

The helpers above run() (finding and unpacking the snapshot, starting ComfyUI, loading the node
the way ComfyUI loads custom nodes, random Flux and VAE state dicts, one model call) are also
what tests/python/test_comfyui.py drives ComfyUI with.
"""

import asyncio
import importlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..core import relative_error

NAME = "comfyui"
DESCRIPTION = "FLUX.1 in ComfyUI at 1024²: a sampling step and the VAE decode, as shipped vs kiln"

SNAPSHOT = "ComfyUI-a125cd84.tar.gz"  # ComfyUI at a125cd84 (2025-10-12), GPL-3.0, a test client
NODE_NAME = "comfyui-kiln"
# FLUX.1-dev's widths (ComfyUI's loader fixes them), depth given by the caller.
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768,
            context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
            axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
FLUX1_DEPTH = (19, 38)  # double, single blocks
FLUX_VAE = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3,
            "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "attn_resolutions": [], "dropout": 0.0}
TEXT_TOKENS = 512
# Each MLP's first OUTLIER_CHANNELS hidden channels: activations OUTLIER_GAIN times the others
# (up to about 1500, past e4m3's 448), each weighing OUTLIER_WEIGHT typical channels in the
# layer after the activation.
OUTLIER_CHANNELS = 4
OUTLIER_GAIN = 512.0
OUTLIER_WEIGHT = 64.0
GUIDANCE = 3.5
STEP_REPS = 10  # a whole model call: fewer repeats than the op suites
FP8_ERROR_RATIO = 1.0  # the node's fp8 error / ComfyUI's fp8 error must stay below this
# The issue's targets, as kiln's time over the peer's: a step 1.3x ComfyUI bf16's speed, 1.0x
# its fp8 fast mode's; the VAE decode 1.2x ComfyUI's.
STEP_VS_BF16 = 0.769
STEP_VS_FP8 = 1.0
VAE_VS_COMFY = 0.833


# ---- ComfyUI, shared with tests/python/test_comfyui.py -----------------------------------------


def repo_root() -> Path:
    """The kiln checkout this runs from: the current directory (kiln bench runs from the
    repo root), else the source tree this file is in."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[4]):
        if (root / "comfyui" / NODE_NAME / "__init__.py").is_file():
            return root
    return Path.cwd()


def find_snapshot(root: Path) -> Path | None:
    """The ComfyUI snapshot tarball: $KILN_COMFYUI, else .comfyui/ in the repo (what
    scripts/prepare_comfyui.sh makes), else ../shared/clients/ beside the repo."""
    env = os.environ.get("KILN_COMFYUI")
    candidates = [Path(env)] if env else []
    candidates += [root / ".comfyui" / SNAPSHOT, root.parent / "shared" / "clients" / SNAPSHOT]
    return next((path for path in candidates if path.is_file()), None)


def unpack(snapshot: Path, folder: Path) -> Path:
    """Unpacks the snapshot into `folder`; returns its ComfyUI directory."""
    with tarfile.open(snapshot) as tar:
        tar.extractall(folder, filter="data")
    comfy_dir = folder / "ComfyUI"
    if not (comfy_dir / "comfy" / "sd.py").is_file():
        raise RuntimeError(f"kiln: {snapshot} holds no ComfyUI/comfy/sd.py")
    return comfy_dir


def start_comfyui(comfy_dir: Path, *, cpu: bool, fp8_compute: bool = False,
                  highvram: bool = False):
    """Imports ComfyUI from comfy_dir with the command-line settings given (--cpu,
    --supports-fp8-compute, --highvram); returns its `comfy` package."""
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu, args.supports_fp8_compute, args.highvram = cpu, fp8_compute, highvram
    for name in ("comfy.model_management", "comfy.sd", "comfy.sample", "comfy.samplers",
                 "comfy.utils", "comfy.ldm.flux.model", "nodes"):
        importlib.import_module(name)
    return sys.modules["comfy"]


def set_fast_fp8(on: bool) -> None:
    """ComfyUI's --fast fp8_matrix_mult, read when a model is built."""
    import comfy.cli_args

    feature = comfy.cli_args.PerformanceFeature.Fp8MatrixMultiplication
    (comfy.cli_args.args.fast.add if on else comfy.cli_args.args.fast.discard)(feature)


def load_node(comfy_dir: Path, node_dir: Path):
    """Links kiln's node into ComfyUI's custom_nodes and loads the custom nodes as ComfyUI's
    main.py does (nodes.init_external_custom_nodes); returns the node's module."""
    import nodes

    link = comfy_dir / "custom_nodes" / NODE_NAME
    if not link.exists():
        link.symlink_to(node_dir.resolve(), target_is_directory=True)
    asyncio.run(nodes.init_external_custom_nodes())
    module = sys.modules.get(str(link).replace(".", "_x_"))
    if module is None or nodes.NODE_CLASS_MAPPINGS.get("Kiln") is None:
        raise RuntimeError(f"kiln: ComfyUI did not load {link} (see ComfyUI's log above)")
    return module


def _uniform(torch, shape, fan_in, device, generator, dtype, gain=1.0):
    """Uniform weights of variance gain^2 / fan_in: a linear's output about unit variance."""
    bound = gain * math.sqrt(3.0 / fan_in)
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound,
                                                                   generator=generator)


def flux_state_dict(torch, depth: int, depth_single: int, *, device="cpu", dtype=None,
                    seed: int = 0, outliers: int = OUTLIER_CHANNELS) -> dict:
    """Random weights for ComfyUI's Flux (keys and shapes from its own class, built on the meta
    device): linears of unit-variance output, biases small, QK-norm scales 1. In each MLP the
    first `outliers` hidden channels are OUTLIER_GAIN times larger, each weighing OUTLIER_WEIGHT
    typical channels after the activation: a few activations above e4m3's 448 that matter, the
    outlier channels that transformers' MLPs have (and why ComfyUI clamps to 448), with every
    layer's output still about unit variance."""
    import comfy.ldm.flux.model
    import comfy.ops

    dtype = dtype or torch.bfloat16
    meta = comfy.ldm.flux.model.Flux(device="meta", dtype=dtype,
                                     operations=comfy.ops.disable_weight_init, depth=depth,
                                     depth_single_blocks=depth_single, **FLUX)
    generator = torch.Generator(device).manual_seed(seed)
    hidden = FLUX["hidden_size"]
    out = {}
    for key, p in meta.state_dict().items():
        if key.endswith(".scale"):
            out[key] = torch.ones(p.shape, dtype=dtype, device=device)
            continue
        fan_in = 2500 if key.endswith(".bias") else p.shape[1]
        value = _uniform(torch, p.shape, fan_in, device, generator, dtype)
        if key.endswith(("_mlp.0.weight", "_mlp.0.bias")):
            value[:outliers] *= OUTLIER_GAIN
        elif key.endswith(("linear1.weight", "linear1.bias")):
            value[3 * hidden:3 * hidden + outliers] *= OUTLIER_GAIN
        elif key.endswith("_mlp.2.weight"):
            value[:, :outliers] *= OUTLIER_WEIGHT / OUTLIER_GAIN
        elif key.endswith("linear2.weight"):
            value[:, hidden:hidden + outliers] *= OUTLIER_WEIGHT / OUTLIER_GAIN
        out[key] = value
    return out


def fp8_state_dict(torch, sd: dict, scaled: bool) -> dict:
    """sd with each linear weight in e4m3: scaled (per-tensor scale_weight = amax / 448 and
    ComfyUI's "scaled_fp8" marker, whose empty tensor turns on its fp8 matmuls), or a plain cast
    (saturating) as ComfyUI's fp8 checkpoints hold them."""
    out = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.dim() == 2:
            if scaled:
                scale = value.float().abs().amax() / 448.0
                out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
                out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            else:
                out[key] = value.to(torch.float8_e4m3fn)
        else:
            out[key] = value
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def on_host(sd: dict) -> dict:
    """sd's tensors in host memory (the loader copies them to the GPU it loads onto): a GPU run
    keeps three FLUX.1 state dicts, 48 GB, beside the model it runs."""
    return {key: value.cpu() for key, value in sd.items()}


def vae_state_dict(torch, *, device="cpu", dtype=None, seed: int = 1) -> dict:
    """Random weights for the Flux VAE (ComfyUI's Encoder and Decoder, keys and shapes from its
    classes): convolutions of unit-variance output, conv_out at half that so that most decoded
    pixels stay inside ComfyUI's [0, 1] clamp, norms 1 and 0."""
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    dtype = dtype or torch.bfloat16
    with torch.device("meta"):
        parts = {"encoder.": Encoder(**FLUX_VAE), "decoder.": Decoder(**FLUX_VAE)}
    generator = torch.Generator(device).manual_seed(seed)
    out = {}
    for prefix, module in parts.items():
        for key, p in module.state_dict().items():
            if "norm" in key and key.endswith(".weight"):
                value = torch.ones(p.shape, dtype=dtype, device=device)
            elif key.endswith(".bias"):
                value = torch.zeros(p.shape, dtype=dtype, device=device)
            else:
                gain = 0.5 if key.startswith("conv_out") else 1.0
                value = _uniform(torch, p.shape, p[0].numel(), device, generator, dtype, gain)
            out[prefix + key] = value
    return out


def flux_inputs(torch, batch: int, latent: int, text: int, seed: int = 2):
    """(conditioning for comfy.sample.sample, noise latent [B, 16, latent, latent]): random T5
    context [B, text, 4096], pooled CLIP [B, 768] and guidance, as CLIPTextEncode and
    FluxGuidance would give them."""
    generator = torch.Generator("cpu").manual_seed(seed)
    context = torch.randn(batch, text, 4096, generator=generator)
    pooled = torch.randn(batch, 768, generator=generator)
    positive = [[context, {"pooled_output": pooled, "guidance": GUIDANCE}]]
    noise = torch.randn(batch, 16, latent, latent, generator=generator)
    return positive, noise


def model_call(patcher, x, sigma, context, pooled, guidance):
    """One call of the patcher's model as a sampling step makes it (BaseModel.apply_model), with
    the patcher's transformer_options and wrappers, where its block replacements and the Kiln
    node's wrapper are (ComfyUI's sampler hands them over the same way)."""
    import comfy.patcher_extension

    options = dict(patcher.model_options["transformer_options"])
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(options.get("wrappers", {}),
                                                                     patcher.wrappers)
    return patcher.model.apply_model(x, sigma, c_crossattn=context, y=pooled, guidance=guidance,
                                      transformer_options=options)


# ---- the bench -------------------------------------------------------------------------------


def run(bench) -> None:
    if not bench.cuda:
        bench.log("no CUDA device: the comfyui suite times ComfyUI on a GPU at 1024²; skipped")
        return
    root = repo_root()
    snapshot = find_snapshot(root)
    if snapshot is None:
        bench.log(f"no ComfyUI snapshot ({SNAPSHOT}) in $KILN_COMFYUI, {root / '.comfyui'} or "
                  f"{root.parent / 'shared' / 'clients'}: run scripts/prepare_comfyui.sh; skipped")
        return
    with tempfile.TemporaryDirectory(prefix="kiln-bench-comfyui-") as folder:
        result_path = Path(folder) / "result.json"
        settings = {"snapshot": str(snapshot), "node": str(root / "comfyui" / NODE_NAME),
                    "folder": folder, "result": str(result_path),
                    "device": f"cuda:{bench.device_index}", "warmup": bench.warmup,
                    "reps": min(bench.reps, STEP_REPS), "depth": FLUX1_DEPTH, "latent": 128,
                    "text": TEXT_TOKENS}
        command = [sys.executable, "-m", __name__, json.dumps(settings)]
        bench.log(f"ComfyUI from {snapshot}, in a child process")
        done = subprocess.run(command, text=True, capture_output=True)
        for line in done.stderr.splitlines():
            if line.startswith(("kiln", "[comfyui]", "INFO:kiln")):
                bench.log(line)
        if done.returncode != 0 or not result_path.is_file():
            bench.log(f"the ComfyUI child failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            bench.check("comfyui child failed", 1, "runs", 1)
            return
        result = json.loads(result_path.read_text())
    _report(bench, result)


CASES = (  # (case, kiln contender, its peer)
    ("step bf16", "kiln bf16", "ComfyUI bf16"),
    ("step fp8", "kiln fp8", "ComfyUI fp8"),
    ("step fp8 plain", "kiln fp8 plain", "ComfyUI fp8 plain"),
    ("step fp8 plain, bf16 activations", "kiln fp8 plain bf16", "ComfyUI fp8 plain"),
    ("VAE decode", "kiln VAE", "ComfyUI VAE"),
)


def _report(bench, result) -> None:
    from ..core import Measurement

    mib = 2.0**20
    bf16_ms = result["ComfyUI bf16"]["ms"]
    for case, kiln_name, peer_name in CASES:
        kiln, peer = result[kiln_name], result[peer_name]
        also_bf16 = case.startswith("step fp8")
        bench.add(Measurement(
            case=case, shape=result["shape"][case], kiln_ms=kiln["ms"], bytes=0,
            peers={peer_name: peer["ms"], **({"ComfyUI bf16": bf16_ms} if also_bf16 else {})},
            host_us={kiln_name: kiln["host_us"], peer_name: peer["host_us"]},
            notes={"peak_extra_bytes": {kiln_name: kiln["peak"], peer_name: peer["peak"]},
                   "relative_error": {kiln_name: kiln.get("error"),
                                      peer_name: peer.get("error")},
                   "kiln_parts": kiln.get("parts")}))
        bench.log(f"{case}: kiln {kiln['ms']:.2f} ms, {peer_name} {peer['ms']:.2f} ms "
                  f"({peer['ms'] / kiln['ms']:.2f}x)"
                  + (f", ComfyUI bf16 {bf16_ms:.2f} ms ({bf16_ms / kiln['ms']:.2f}x)"
                     if also_bf16 else "")
                  + f"; peak {kiln['peak'] / mib:.0f} / {peer['peak'] / mib:.0f} MiB; error "
                  f"{kiln.get('error')} / {peer.get('error')}")
    kiln_err, comfy_err = result["kiln fp8"]["error"], result["ComfyUI fp8"]["error"]
    bench.check("fp8 error kiln / ComfyUI", kiln_err / comfy_err, "x", FP8_ERROR_RATIO)
    for name in ("kiln fp8", "kiln fp8 plain"):
        bench.check(f"{name} step / ComfyUI bf16 step", result[name]["ms"] / bf16_ms, "x",
                    STEP_VS_BF16)
    bench.check("kiln fp8 step / ComfyUI fp8 step",
                result["kiln fp8"]["ms"] / result["ComfyUI fp8"]["ms"], "x", STEP_VS_FP8)
    bench.check("kiln fp8 plain step / ComfyUI fp8 plain step",
                result["kiln fp8 plain"]["ms"] / result["ComfyUI fp8 plain"]["ms"], "x", 1.0)
    bench.check("kiln VAE decode / ComfyUI's", result["kiln VAE"]["ms"]
                / result["ComfyUI VAE"]["ms"], "x", VAE_VS_COMFY)


def _child(settings: dict) -> None:
    """The measurements, in the child process; writes the JSON run() reads. settings: the
    snapshot, node and scratch folder, the result path, the device ("cuda:0"; "cpu" runs the
    same at a size the caller picks, with kiln's CPU code, to try this code without a GPU),
    warmup and reps, the model's depth, the latent's side and the text tokens."""
    import torch

    from ... import reset_workspace_peak, workspace_peak_bytes
    from ..timing import CpuTimer, CudaTimer

    device = torch.device(settings["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        timer = CudaTimer(torch, device, settings["warmup"], settings["reps"])
    else:
        os.environ.setdefault("KILN_COMFY_DEVICES", "cuda,cpu")
        timer = CpuTimer(settings["warmup"], settings["reps"])
    folder = Path(settings["folder"])
    comfy_dir = unpack(Path(settings["snapshot"]), folder)
    start_comfyui(comfy_dir, cpu=not cuda, fp8_compute=not cuda, highvram=cuda)
    import comfy.model_management
    import comfy.sd

    if not cuda:  # bf16 compute on CPU, as ComfyUI does on GPUs
        comfy.model_management.should_use_bf16 = lambda *args, **kwargs: True

    def log(message):
        print(f"[comfyui] {message}", file=sys.stderr, flush=True)

    def peak(fn):
        """fn()'s result and the memory it allocated beyond what was live (0 on CPU)."""
        if not cuda:
            return fn(), 0
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        reset_workspace_peak(device.index)
        out = fn()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before + workspace_peak_bytes(
            device.index)
        return out, extra

    latent_side = settings["latent"]
    positive, noise = flux_inputs(torch, 1, latent_side, settings["text"])
    context = positive[0][0].to(device, torch.bfloat16)
    pooled = positive[0][1]["pooled_output"].to(device, torch.bfloat16)
    x = noise.to(device, torch.bfloat16)
    sigma = torch.full((1,), 0.75, device=device)
    guidance = torch.full((1,), GUIDANCE, device=device)
    bf16 = flux_state_dict(torch, *settings["depth"], device=device)
    fp8 = on_host(fp8_state_dict(torch, bf16, scaled=True))
    plain = on_host(fp8_state_dict(torch, bf16, scaled=False))
    bf16 = on_host(bf16)
    vae_sd = vae_state_dict(torch, device=device)
    tokens = (latent_side // 2) ** 2 + settings["text"]
    step_shape = f"FLUX.1 {latent_side * 8}² L{tokens}"
    result = {"shape": {case: step_shape for case, _, _ in CASES}}
    result["shape"]["VAE decode"] = f"latent {latent_side}² -> {latent_side * 8}²"
    outputs = {}

    def record(name, timing, out, extra, reference):
        outputs[name] = out.float()
        error = (None if reference is None
                 else relative_error(torch, out, outputs[reference], f"kiln bench comfyui {name}"))
        result[name] = {"ms": timing.ms, "host_us": timing.host_us, "peak": extra,
                        "error": error}
        log(f"{name}: {timing.ms:.2f} ms, peak {extra / 2**20:.0f} MiB, error {error}")

    def measure_step(name, sd, reference="ComfyUI bf16"):
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd))  # the loader pops keys
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)

        def step():
            return model_call(patcher, x, sigma, context, pooled, guidance)

        with torch.inference_mode():
            out, extra = peak(step)
            timing = timer.time(step, [()])
        record(name, timing, out, extra, None if name == reference else reference)
        del patcher
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()

    def measure_vae(name, reference="ComfyUI VAE"):
        vae = comfy.sd.VAE(sd=dict(vae_sd))
        latent = noise.to(device)
        with torch.inference_mode():
            vae.decode(latent)  # loads it, compiles kiln's kernels
            out, extra = peak(lambda: vae.decode(latent))
            timing = timer.time(lambda: vae.decode(latent), [()])
        record(name, timing, out, extra, None if name == reference else reference)
        del vae
        comfy.model_management.unload_all_models()

    measure_step("ComfyUI bf16", bf16)
    set_fast_fp8(True)
    measure_step("ComfyUI fp8", fp8)
    set_fast_fp8(False)
    measure_step("ComfyUI fp8 plain", plain)
    measure_vae("ComfyUI VAE")
    node = load_node(comfy_dir, Path(settings["node"]))
    node.parts.reset_counts()
    for name, sd in (("kiln bf16", bf16), ("kiln fp8", fp8), ("kiln fp8 plain", plain)):
        measure_step(name, sd)
        result[name]["parts"] = _parts(node)
    node.parts.configure(fp8_activations="bf16")
    measure_step("kiln fp8 plain bf16", plain)
    result["kiln fp8 plain bf16"]["parts"] = _parts(node)
    node.parts.configure(fp8_activations="auto")
    measure_vae("kiln VAE")
    result["kiln VAE"]["parts"] = _parts(node)
    Path(settings["result"]).write_text(json.dumps(result, indent=1))


def _parts(node) -> dict:
    """Calls each part sent to kiln or to ComfyUI since the last call, then reset."""
    counts = {f"{part} {who}": n for (part, who), n in node.parts.counts().items()}
    node.parts.reset_counts()
    return counts


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
