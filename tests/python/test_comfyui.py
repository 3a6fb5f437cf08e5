"""kiln's ComfyUI node (comfyui/comfyui-kiln) inside the real ComfyUI.

The snapshot of ComfyUI (../shared/clients/ComfyUI-a125cd84.tar.gz, or $KILN_COMFYUI: a test
client, GPL-3.0) is unpacked into a temporary folder and imported with its requirements (in
scripts/requirements.txt); kiln's node is linked into its custom_nodes and loaded by ComfyUI's
own loader (nodes.init_external_custom_nodes). The test writes a FLUX.1-architecture checkpoint
as safetensors (random weights, each linear's output about unit variance, a few MLP channels
past e4m3's 448 as in real transformers: kiln.bench.suites.comfyui.flux_state_dict) in three
formats: bf16; e4m3 with a per-tensor scale_weight and the scaled_fp8 marker that turns on
ComfyUI's fp8 matmuls ("scaled fp8"); and plain e4m3, the weights cast as they are (the common
fp8 FLUX.1 checkpoints, which this ComfyUI dequantizes on every call). It writes a Flux VAE and
a LoRA for a few of the model's linears too, samples with ComfyUI's sampling functions
(comfy.sample.sample, Euler, CFG 1, FLUX.1-dev guidance) and decodes with its VAE class, before
the node is loaded (ComfyUI as shipped) and after, in one ComfyUI process: a child process
running this file as a script, since ComfyUI's imports change process-wide state that other tests
must not see. The child saves what it measured; the tests below check it.

The LoRA runs on the plain e4m3 model loaded as ComfyUI loads a model that does not fit its GPU
(ModelPatcher.patch_model with a tiny lowvram_model_memory): the LoRA's weight patches are then
applied at every call (weight_function), which kiln leaves to ComfyUI; one model call each
(comfy.sample loads models fully on CPU), through kiln.bench.suites.comfyui.model_call.

CPU (CI): ComfyUI's loader takes FLUX.1's widths only (hidden 3072, 24 heads x 128, T5 4096), so
the model is those widths at 1 double + 1 single block, on a 4 x 4 latent (4 image + 2 text
tokens), 2 steps (1 for the fp8 comparisons, whose runs are the slowest); the VAE (real widths,
fixed by the loader too) decodes a 2 x 2 crop of the latent (16 x 16 pixels). kiln runs its CPU
reference there (KILN_COMFY_DEVICES=cuda,cpu), exact and slow, which sets those sizes
(comfyui/NOTES.md has the times). ComfyUI computes in f32 on CPUs, where kiln's attention
(f16/bf16) declines: the test has ComfyUI compute in bf16 as it does on GPUs (its
should_use_bf16 answers yes) and checks the f32 decline separately. ComfyUI's fp8 matmuls on CPU
come from --supports-fp8-compute. kiln's fp8 linears run fp8 activations on CPU (what sm_89 and
newer run), and bf16 activations against the fp8 weights (what sm_80/86 run) where the node is
set so. Weights and inputs come from a fresh seed, printed.

GPU: the same at 1024² (128² latent) with FLUX.1's full depth (19 + 38 blocks), the state dicts
handed to ComfyUI's loader in memory (comfy.sd.load_diffusion_model_state_dict: 24 GB of bf16
weights); skipped without a GPU.

Bounds: kiln's blocks round once from f32 where ComfyUI's chain rounds to bf16 after each step
(norm, modulation, QK-norm, RoPE, bias, gate, residual), so the two differ by bf16 roundings
carried through the blocks and steps. The bound is the larger of 4 bf16 ulps (2^-6, relative)
and twice the difference between two of ComfyUI's own attention functions on the same model (its
default and attention_basic), measured in the same run (for the LoRA's model call, on that
call). It holds where kiln and ComfyUI do the same math: bf16 weights, and fp8 weights against
bf16 activations (ComfyUI dequantizes e4m3 to bf16 exactly). Quantizing activations to e4m3 per token adds e4m3's relative precision, about
0.03 a layer (E4M3_ROW_ERROR bounds it), against ComfyUI's dequantized plain e4m3 model.
"""

import gc
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "comfyui" / "comfyui-kiln"
BF16_FLOOR = 2.0**-6  # 4 bf16 ulps, relative
NOISE_FACTOR = 2.0
CPU_RUN = {"device": "cpu", "depth": [1, 1], "latent": 4, "text": 2, "steps": 2, "fp8_steps": 1,
           "crop": 2, "files": True}
GPU_RUN = {"device": "cuda", "depth": [19, 38], "latent": 128, "text": 512, "steps": 2,
           "fp8_steps": 2, "crop": 128, "files": False}
CHILD_TIMEOUT_S = 1800
LAYER_AMAX = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3]  # token amax of the fp8_ops layer check
LAYER_ROWS = 32  # tokens per amax: the mean error is e4m3's to a few percent
E4M3_NORMAL_MIN, E4M3_MAX = 2.0**-6, 448.0
E4M3_ROW_ERROR = 0.05  # a token's output error at e4m3's 3 mantissa bits: about 0.03
# The LoRA: rank-4 patches on these linears of the model, each as large as the weight it
# patches; the LoRA's effect on the output must exceed the bound this many times.
LORA_LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.2",
               "single_blocks.0.linear2")
LORA_RANK = 4
LORA_EFFECT = 10.0
LORA_SIGMA = 0.75  # the noise level of the LoRA's model calls


def _harness():
    from kiln.bench.suites import comfyui

    return comfyui


def _run_child(settings: dict, folder: Path) -> dict:
    snapshot = _harness().find_snapshot(REPO)
    if snapshot is None:
        pytest.fail(f"no ComfyUI snapshot: set KILN_COMFYUI to {_harness().SNAPSHOT} (in "
                    "../shared/clients beside the repo, or .comfyui/ from "
                    "scripts/prepare_comfyui.sh)")
    settings = {**settings, "snapshot": str(snapshot), "folder": str(folder)}
    env = {**os.environ, "KILN_COMFY_DEVICES": "cuda,cpu", "PYTHONUNBUFFERED": "1"}
    if torch.cuda.is_initialized():  # the GPU memory earlier tests of this process left cached
        gc.collect()
        torch.cuda.empty_cache()
    done = subprocess.run([sys.executable, __file__, json.dumps(settings)], env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"the ComfyUI child (seed {settings['seed']}) failed (exit "
                    f"{done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result = torch.load(folder / "result.pt")
    result["log"] = done.stderr
    result["seed"] = settings["seed"]
    return result


def _seed() -> int:
    """A fresh seed for the child's weights and inputs, printed (and in the failure's log)."""
    value = secrets.randbits(31)
    print(f"ComfyUI child seed = {value}")
    return value


@pytest.fixture(scope="module")
def cpu_run():
    with tempfile.TemporaryDirectory(prefix="kiln-comfyui-") as folder:
        yield _run_child({**CPU_RUN, "seed": _seed()}, Path(folder))


def _bound(result, noise="comfy attention noise") -> float:
    return max(BF16_FLOOR, NOISE_FACTOR * result["metrics"][noise])


def _rel(got, want) -> float:
    return _harness().relative_error(torch, got, want, "test_comfyui")


# ---- CPU: the real ComfyUI, the node loaded by ComfyUI's loader ------------------------------


def test_comfyui_loads_the_node(cpu_run):
    log = cpu_run["log"]
    print(f"ComfyUI child seed = {cpu_run['seed']}")
    print("\n".join(line for line in log.splitlines() if line.startswith("[test_comfyui]")))
    assert "IMPORT FAILED" not in log
    assert "comfyui-kiln" in log  # ComfyUI's list of custom nodes and their import times
    hooks = cpu_run["metrics"]["load line"]
    for hook in ("comfy-kitchen backend 'kiln' (cpu,cuda, priority 0)",
                 "Flux blocks (patches_replace 'dit', ModelPatcher.set_model_patch_replace)",
                 "comfy.ldm.flux.layers.attention", "attention function 'kiln'",
                 "comfy.ops.pick_operations", "comfy.ops.fp8_linear", "comfy.sd.VAE"):
        assert hook in hooks, hooks
    assert cpu_run["metrics"]["Kiln node registered"]
    assert cpu_run["metrics"]["supports_fp8_compute wrapped"]


def test_flux_bf16_sample_matches_comfyui(cpu_run):
    lat, m = cpu_run["latents"], cpu_run["metrics"]
    want = lat["comfy bf16"]
    assert torch.isfinite(want).all() and _rel(want, lat["noise"]) > 0.1  # the model did work
    err = _rel(lat["kiln bf16"], want)
    print(f"kiln bf16 vs ComfyUI bf16: {err:.3e} (bound {_bound(cpu_run):.3e}, ComfyUI's own "
          f"attention noise {m['comfy attention noise']:.3e})")
    assert 0 < err <= _bound(cpu_run)
    calls = sum(CPU_RUN["depth"]) * CPU_RUN["steps"]  # one per block and model call
    assert m["counts kiln bf16"] == {"attention kiln": calls}
    assert m["kiln block patches"] == sum(CPU_RUN["depth"])
    for kind in ("double", "single"):
        assert (f"kiln: attention on kiln (Flux {kind} block: LayerNorm + AdaLN (kiln.layer_norm), "
                "QK RMSNorm + RoPE (kiln.rope_flux)") in cpu_run["log"]


def test_vae_decode_matches_comfyui(cpu_run):
    img, m = cpu_run["images"], cpu_run["metrics"]
    want = img["comfy"]
    inside = ((want > 0) & (want < 1)).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of the pixels are inside ComfyUI's [0, 1] clamp"
    err = _rel(img["kiln"], want)
    print(f"VAE decode kiln vs ComfyUI: {err:.3e} (bound {BF16_FLOOR:.3e})")
    assert 0 < err <= BF16_FLOOR
    assert m["counts kiln decode"].get("vae_conv2d kiln", 0) > 0
    assert m["counts kiln decode"].get("vae_conv2d comfyui", 0) == 0
    assert "kiln: vae_conv2d on kiln (VAE decoder convolutions (kiln.conv2d)" in cpu_run["log"]


def test_fp8_per_token_scales_beat_comfyui_scale_1(cpu_run):
    lat, m = cpu_run["latents"], cpu_run["metrics"]
    ref = lat["comfy bf16 fp8 steps"]
    # Against the bf16 model: the e4m3 weights' error is common to both.
    kiln_err, comfy_err = _rel(lat["kiln fp8"], ref), _rel(lat["comfy fp8"], ref)
    # Against the same fp8 weights with bf16 activations (ComfyUI without fp8 compute): the
    # activations' quantization alone.
    dequant = lat["comfy fp8 dequant"]
    kiln_act, comfy_act = _rel(lat["kiln fp8"], dequant), _rel(lat["comfy fp8"], dequant)
    print(f"fp8 vs bf16 model: kiln {kiln_err:.4e}, ComfyUI {comfy_err:.4e}; vs fp8 weights at "
          f"bf16 activations: kiln {kiln_act:.4e}, ComfyUI {comfy_act:.4e}")
    assert kiln_err <= comfy_err
    assert kiln_act < comfy_act
    counts = m["counts kiln fp8"]
    assert counts.get("fp8_linear kiln", 0) > 0 and counts.get("fp8_linear comfyui", 0) == 0
    assert "fp8_linear on kiln (fp8 x fp8, per-token activation scales (quantized by the op " \
        "before)" in cpu_run["log"]


def _plain_fp8_errors(result) -> dict:
    lat = result["latents"]
    bf16, comfy = lat["comfy bf16 fp8 steps"], lat["comfy plain fp8"]
    return {
        "ComfyUI vs bf16 model": _rel(comfy, bf16),
        "kiln fp8 activations vs bf16 model": _rel(lat["kiln plain fp8"], bf16),
        "kiln bf16 activations vs bf16 model": _rel(lat["kiln plain fp8 bf16 activations"], bf16),
        "kiln fp8 activations vs ComfyUI": _rel(lat["kiln plain fp8"], comfy),
        "kiln bf16 activations vs ComfyUI": _rel(lat["kiln plain fp8 bf16 activations"], comfy),
    }


def _check_plain_fp8(result, blocks: int) -> None:
    """A plain e4m3 checkpoint (no scaled_fp8 marker) on kiln: every fp8 linear on kiln on the
    weights as stored, none dequantized by ComfyUI. bf16 activations against the fp8 weights do
    ComfyUI's math (its dequantize to bf16 is exact): within the bf16 bound of ComfyUI as
    shipped. fp8 activations add e4m3's precision per layer."""
    errors, m = _plain_fp8_errors(result), result["metrics"]
    print("plain e4m3 checkpoint:", {k: f"{v:.4e}" for k, v in errors.items()})
    assert 0 < errors["kiln bf16 activations vs ComfyUI"] <= _bound(result)
    assert errors["kiln fp8 activations vs ComfyUI"] <= E4M3_ROW_ERROR
    for run in ("counts kiln plain fp8", "counts kiln plain fp8 bf16 activations"):
        counts = m[run]
        assert counts.get("fp8_linear kiln", 0) > 0, (run, counts)
        assert counts.get("fp8_linear comfyui", 0) == 0, (run, counts)
        assert counts.get("attention kiln", 0) == blocks, (run, counts)


def test_plain_fp8_checkpoint_runs_on_kiln(cpu_run):
    _check_plain_fp8(cpu_run, sum(CPU_RUN["depth"]) * CPU_RUN["fp8_steps"])
    log = cpu_run["log"]
    assert "model weight dtype torch.float8_e4m3fn, manual cast: torch.bfloat16" in log
    for way in ("fp8 x fp8, per-token activation scales (quantized by the op before) on cpu",
                "activations as they come x fp8 weights decoded in registers on cpu"):
        assert f"kiln: fp8_linear on kiln ({way})" in log


def test_lora_patched_layers_fall_back(cpu_run):
    """LoRA weight patches applied at call time (ComfyUI's low-VRAM load): those layers run
    ComfyUI's code, logged; the rest of the model stays on kiln. With bf16 activations kiln
    does ComfyUI's math, so the two agree within the bf16 bound, far closer than the LoRA's
    effect."""
    out, m = cpu_run["outputs"], cpu_run["metrics"]
    effect = _rel(out["comfy lora"], out["comfy no lora"])
    err = _rel(out["kiln lora"], out["comfy lora"])
    bound = _bound(cpu_run, "comfy attention noise lora")
    print(f"LoRA call: kiln vs ComfyUI {err:.3e} (bound {bound:.3e}, ComfyUI's own attention "
          f"noise {m['comfy attention noise lora']:.3e}); the LoRA's effect {effect:.3e}")
    assert effect > LORA_EFFECT * bound
    assert 0 < err <= bound
    counts = m["counts kiln lora"]
    assert counts.get("fp8_linear comfyui", 0) == len(LORA_LAYERS), counts
    assert counts.get("fp8_linear kiln", 0) > 0, counts
    assert cpu_run["log"].count("kiln: fp8_linear -> ComfyUI (weight patches applied at call "
                                "time") == 1


def test_fp8_ops_linear_small_and_large_tokens(cpu_run):
    """comfy.ops.fp8_ops.Linear (plain e4m3 weight, --fast fp8_matrix_mult's clamp-and-cast) on
    tokens of amax 1e-3 ... 1e3. ComfyUI's scale 1 puts the small ones in e4m3's subnormals (or
    zero) and saturates the large ones at 448; per-token scales keep every token at e4m3's
    relative precision, and within its normal range both are that precision. (The layer is in
    eval mode: fp8_ops skips fp8_linear in training mode, where this ComfyUI leaves its Flux
    models, so its plain e4m3 Flux checkpoints dequantize even with --fast.)"""
    m = cpu_run["metrics"]
    kiln, comfy = m["fp8_ops kiln errors"], m["fp8_ops comfy errors"]
    print("amax, mean error kiln, ComfyUI:", list(zip(LAYER_AMAX, kiln, comfy)))
    assert max(kiln) < E4M3_ROW_ERROR
    for amax, k, c in zip(LAYER_AMAX, kiln, comfy):
        if amax < E4M3_NORMAL_MIN * 2 or amax > E4M3_MAX:
            assert c > 3 * k, (amax, k, c)
        else:
            assert k <= 1.05 * c, (amax, k, c)


def test_kiln_node_turns_parts_off(cpu_run):
    """The Kiln node with every part off gives ComfyUI's own results, bit for bit; on, the
    node's."""
    lat, img, m = cpu_run["latents"], cpu_run["images"], cpu_run["metrics"]
    assert torch.equal(lat["node off bf16"], lat["comfy bf16"])
    assert torch.equal(img["node off"], img["comfy"])
    assert torch.equal(lat["node on bf16"], lat["kiln bf16"])
    assert m["counts node off"].get("attention kiln", 0) == 0
    assert m["counts node off"].get("attention comfyui", 0) > 0
    assert "kiln: attention -> ComfyUI (turned off)" in cpu_run["log"]


def test_declined_calls_go_to_comfyui_logged_once(cpu_run):
    """f32 attention (ComfyUI's dtype on CPUs): RoPE on kiln, attention by ComfyUI's own
    function, one log line for the reason however many calls."""
    m = cpu_run["metrics"]
    assert m["f32 attention error"] < 1e-5
    line = "kiln: attention -> ComfyUI (k, v torch.float32, torch.float32"
    assert cpu_run["log"].count(line) == 1
    assert m["counts f32 attention"].get("attention comfyui", 0) == 3


def test_node_respects_kiln_patch_0():
    """KILN_PATCH=0: the node loads and changes nothing."""
    env = {**os.environ, "KILN_PATCH": "0"}
    script = (
        "import importlib.util, sys, torch\n"
        "spec = importlib.util.spec_from_file_location(\n"
        f"    'comfyui_kiln', r'{NODE_DIR / '__init__.py'}')\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['comfyui_kiln'] = m\n"
        "spec.loader.exec_module(m)\n"
        "import kiln.torch\n"
        "assert not kiln.torch.is_patched(), 'patched despite KILN_PATCH=0'\n"
        "assert 'Kiln' in m.NODE_CLASS_MAPPINGS\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device (with one, the "
                    "suite runs: scripts/gpu_check.sh's bench stage)")
def test_bench_says_there_is_no_gpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "kiln", "bench", "comfyui", "--no-chart"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device: the comfyui suite times ComfyUI on a GPU at 1024²" in result.stderr
    record = json.loads((tmp_path / "bench_comfyui.json").read_text())
    assert record["suite"] == "comfyui" and record["measurements"] == []


# ---- GPU: 1024², full FLUX.1 depth -----------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_flux1_1024_on_gpu():
    with tempfile.TemporaryDirectory(prefix="kiln-comfyui-gpu-") as folder:
        result = _run_child({**GPU_RUN, "seed": _seed()}, Path(folder))
    lat, img, m = result["latents"], result["images"], result["metrics"]
    assert _rel(lat["kiln bf16"], lat["comfy bf16"]) <= _bound(result)
    assert _rel(img["kiln"], img["comfy"]) <= BF16_FLOOR
    ref = lat["comfy bf16 fp8 steps"]
    assert _rel(lat["kiln fp8"], ref) <= _rel(lat["comfy fp8"], ref)
    assert _rel(lat["kiln fp8"], lat["comfy fp8 dequant"]) < _rel(lat["comfy fp8"],
                                                                    lat["comfy fp8 dequant"])
    assert m["counts kiln bf16"].get("attention comfyui", 0) == 0
    assert m["counts kiln fp8"].get("fp8_linear comfyui", 0) == 0
    assert m["counts kiln decode"].get("vae_conv2d comfyui", 0) == 0
    _check_plain_fp8(result, sum(GPU_RUN["depth"]) * GPU_RUN["fp8_steps"])
    out = result["outputs"]
    assert _rel(out["kiln lora"], out["comfy lora"]) <= _bound(result,
                                                             "comfy attention noise lora")
    assert m["counts kiln lora"].get("fp8_linear comfyui", 0) == len(LORA_LAYERS)


# ---- the child: one ComfyUI process ----------------------------------------------------------


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _scenario(settings: dict) -> None:
    """Runs ComfyUI as shipped, loads the node, runs it again; saves latents, images, model
    call outputs and metrics to <folder>/result.pt."""
    harness = _harness()
    started = time.perf_counter()

    def phase(name):
        print(f"[test_comfyui] {time.perf_counter() - started:6.1f} s: {name}", file=sys.stderr,
              flush=True)

    device = torch.device(settings["device"])
    cpu = device.type == "cpu"
    folder = Path(settings["folder"])
    comfy_dir = harness.unpack(Path(settings["snapshot"]), folder)
    logging.basicConfig(level=logging.INFO)
    harness.start_comfyui(comfy_dir, cpu=cpu, fp8_compute=cpu, highvram=not cpu)
    import comfy.ldm.flux.layers
    import comfy.ldm.modules.attention
    import comfy.model_management as management
    import comfy.ops
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import nodes

    if cpu:  # ComfyUI computes in bf16 here, as on GPUs (see the module's docstring)
        management.should_use_bf16 = lambda *args, **kwargs: True
    lines = _Lines()
    logging.getLogger().addHandler(lines)
    phase("ComfyUI imported")

    # Checkpoints.
    depth, single = settings["depth"]
    seed = settings["seed"]
    bf16 = harness.flux_state_dict(torch, depth, single, device=device, seed=seed)
    sources = {"fp8": harness.on_host(harness.fp8_state_dict(torch, bf16, scaled=True)),
               "plain": harness.on_host(harness.fp8_state_dict(torch, bf16, scaled=False)),
               "lora": _lora_state_dict(bf16, seed + 5)}
    sources["bf16"] = harness.on_host(bf16)
    del bf16
    vae_sd = harness.vae_state_dict(torch, device=device, seed=seed + 1)
    if settings["files"]:
        import safetensors.torch

        for name, sd in (*sources.items(), ("vae", vae_sd)):
            safetensors.torch.save_file(sd, folder / f"{name}.safetensors")
        sources = {name: folder / f"{name}.safetensors" for name in sources}
        vae_source = folder / "vae.safetensors"
        del vae_sd
        phase("checkpoints written")

    def load(kind):
        source = sources[kind]
        if isinstance(source, Path):
            return comfy.sd.load_diffusion_model(str(source))
        return comfy.sd.load_diffusion_model_state_dict(dict(source))

    def load_vae():
        if settings["files"]:
            return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_source)))
        return comfy.sd.VAE(sd=dict(vae_sd))

    def lora_sd():
        source = sources["lora"]
        return comfy.utils.load_torch_file(str(source)) if isinstance(source, Path) else source

    positive, noise = harness.flux_inputs(torch, 1, settings["latent"], settings["text"],
                                          seed=seed + 2)
    negative = [[torch.zeros_like(positive[0][0]),
                 {"pooled_output": torch.zeros_like(positive[0][1]["pooled_output"])}]]
    empty = torch.zeros_like(noise)

    def sample(model, steps=settings["steps"]):
        out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative,
                                  empty, seed=0, disable_pbar=True)
        management.unload_all_models()
        gc.collect()
        management.soft_empty_cache()
        return out.float()

    crop = settings["crop"]
    latents, images, outputs, metrics = {"noise": noise}, {}, {}, {}

    def decode(vae, latent):
        # Under inference mode, as ComfyUI's executor runs every node (execution.py): the VAE's
        # weights require grad, and kiln refuses them under grad mode (no backward).
        with torch.inference_mode():
            return vae.decode(latent[:, :, :crop, :crop]).float()

    call_inputs = (noise.to(device, torch.bfloat16), torch.full((1,), LORA_SIGMA, device=device),
                   positive[0][0].to(device, torch.bfloat16),
                   positive[0][1]["pooled_output"].to(device, torch.bfloat16),
                   torch.full((1,), harness.GUIDANCE, device=device))

    def call(patcher, lora, patch=lambda patcher: patcher):
        """One model call of the plain e4m3 model, with the LoRA applied at call time (loaded
        as ComfyUI loads a model larger than its GPU's free memory) or without; patch() may
        change the patcher first."""
        if lora:
            patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd(), 1.0, 0.0)
        patcher = patch(patcher)
        patcher.patch_model(device_to=device, lowvram_model_memory=1 if lora else 0)
        try:
            with torch.inference_mode():
                return harness.model_call(patcher, *call_inputs).float().cpu()
        finally:
            patcher.unpatch_model()

    # ComfyUI as shipped.
    model = load("bf16")
    latents["comfy bf16"] = sample(model)
    phase("ComfyUI bf16 sampled")
    def attention_basic(patcher):
        """The patcher with ComfyUI's attention_basic in place of its default attention."""
        patcher.model_options["transformer_options"]["optimized_attention_override"] = (
            lambda func, *args, **kwargs: comfy.ldm.modules.attention.attention_basic(*args,
                                                                                       **kwargs))
        return patcher

    metrics["comfy attention noise"] = _rel(sample(attention_basic(model.clone())),
                                            latents["comfy bf16"])
    del model
    phase("ComfyUI bf16 with attention_basic sampled")
    vae = load_vae()
    images["comfy"] = decode(vae, latents["comfy bf16"])
    phase("ComfyUI decoded")
    latents["comfy bf16 fp8 steps"] = sample(load("bf16"), settings["fp8_steps"])
    latents["comfy fp8"] = sample(load("fp8"), settings["fp8_steps"])
    phase("ComfyUI fp8 sampled")
    supports = management.supports_fp8_compute
    management.supports_fp8_compute = lambda device=None: False  # ComfyUI without fp8 compute
    latents["comfy fp8 dequant"] = sample(load("fp8"), settings["fp8_steps"])
    management.supports_fp8_compute = supports
    phase("ComfyUI fp8 without fp8 compute sampled")
    latents["comfy plain fp8"] = sample(load("plain"), settings["fp8_steps"])
    outputs["comfy no lora"] = call(load("plain"), lora=False)
    outputs["comfy lora"] = call(load("plain"), lora=True)
    metrics["comfy attention noise lora"] = _rel(
        call(load("plain"), lora=True, patch=attention_basic), outputs["comfy lora"])
    phase("ComfyUI plain fp8 sampled, called with and without the LoRA")
    layer_case = _fp8_ops_layer(comfy.ops, device, seed + 3)
    comfy_rows = layer_case()
    attention_case = _f32_attention(comfy.ldm.flux.layers, device, seed + 4)
    comfy_f32 = attention_case()

    # The node, loaded by ComfyUI's loader.
    node = harness.load_node(comfy_dir, NODE_DIR)
    metrics["load line"] = next((line for line in lines.lines if "hooks:" in line), "")
    metrics["Kiln node registered"] = "Kiln" in nodes.NODE_CLASS_MAPPINGS
    metrics["supports_fp8_compute wrapped"] = hasattr(management.supports_fp8_compute,
                                                      "kiln_original")

    def counts():
        out = {f"{part} {who}": n for (part, who), n in node.parts.counts().items()}
        node.parts.reset_counts()
        return out

    node.parts.reset_counts()
    model = load("bf16")
    metrics["kiln block patches"] = sum(
        getattr(patch, "kiln_block", False) for patch in
        model.model_options["transformer_options"]["patches_replace"]["dit"].values())
    latents["kiln bf16"] = sample(model)
    metrics["counts kiln bf16"] = counts()
    phase("kiln bf16 sampled")
    kiln_node = nodes.NODE_CLASS_MAPPINGS["Kiln"]()
    vae = load_vae()
    images["kiln"] = decode(vae, latents["comfy bf16"])
    metrics["counts kiln decode"] = counts()
    phase("kiln decoded")
    off_model, off_vae = kiln_node.apply(model, False, False, False, vae=vae)
    latents["node off bf16"] = sample(off_model)
    images["node off"] = decode(off_vae, latents["comfy bf16"])
    metrics["counts node off"] = counts()
    on_model, _ = kiln_node.apply(off_model, True, True, True)
    latents["node on bf16"] = sample(on_model)
    phase("Kiln node off and on")
    del model, off_model, on_model, vae, off_vae
    counts()
    latents["kiln fp8"] = sample(load("fp8"), settings["fp8_steps"])
    metrics["counts kiln fp8"] = counts()
    phase("kiln fp8 sampled")
    latents["kiln plain fp8"] = sample(load("plain"), settings["fp8_steps"])
    metrics["counts kiln plain fp8"] = counts()
    node.parts.configure(fp8_activations="bf16")  # what sm_80/86 run
    latents["kiln plain fp8 bf16 activations"] = sample(load("plain"), settings["fp8_steps"])
    metrics["counts kiln plain fp8 bf16 activations"] = counts()
    phase("kiln plain fp8 sampled, fp8 and bf16 activations")
    outputs["kiln lora"] = call(load("plain"), lora=True)
    metrics["counts kiln lora"] = counts()
    node.parts.configure(fp8_activations="auto")
    phase("kiln called with the LoRA")
    metrics["fp8_ops comfy errors"] = comfy_rows
    metrics["fp8_ops kiln errors"] = layer_case()
    kiln_f32 = attention_case()
    metrics["f32 attention error"] = _rel(kiln_f32, comfy_f32)
    metrics["counts f32 attention"] = counts()
    torch.save({"latents": latents, "images": images, "outputs": outputs, "metrics": metrics},
               folder / "result.pt")


def _lora_state_dict(sd: dict, seed: int) -> dict:
    """A LoRA in the kohya format ComfyUI's loader reads (lora_unet_<path>.lora_up / lora_down /
    alpha) for LORA_LAYERS of the model in `sd`: rank LORA_RANK, alpha = rank (scale 1), each
    patch's entries of the patched weight's size (up @ down has variance 1 / K)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    out = {}
    for layer in LORA_LAYERS:
        n, k = sd[f"{layer}.weight"].shape
        key = "lora_unet_" + layer.replace(".", "_")
        up = torch.randn(n, LORA_RANK, generator=generator) / LORA_RANK**0.5
        down = torch.randn(LORA_RANK, k, generator=generator) / k**0.5
        out[f"{key}.lora_up.weight"] = up.to(torch.bfloat16)
        out[f"{key}.lora_down.weight"] = down.to(torch.bfloat16)
        out[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    return out


def _fp8_ops_layer(ops, device, seed):
    """A comfy.ops.fp8_ops.Linear (e4m3 weight, no scales: ComfyUI's fast fp8 layer) on
    LAYER_ROWS tokens for each amax of LAYER_AMAX; run() gives each amax's mean relative error
    of a token's output against f64 math on the same e4m3 weight."""
    k, n = 256, 128
    generator = torch.Generator("cpu").manual_seed(seed)
    layer = ops.fp8_ops.Linear(k, n, bias=False, dtype=torch.float8_e4m3fn, device=device)
    layer.eval()  # ComfyUI runs fp8_linear outside training only
    weight = torch.randn(n, k, generator=generator).to(torch.float8_e4m3fn)
    layer.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
    amax = torch.tensor(LAYER_AMAX).repeat_interleave(LAYER_ROWS)
    rows = torch.randn(len(amax), k, generator=generator)
    x = (rows / rows.abs().amax(dim=1, keepdim=True) * amax[:, None]).to(torch.bfloat16)
    want = x.double() @ weight.double().t()

    def run():
        with torch.inference_mode():
            out = layer(x.to(device)[None].clone())[0].double().cpu()
        errors = (out - want).norm(dim=1) / want.norm(dim=1)
        return errors.reshape(len(LAYER_AMAX), LAYER_ROWS).mean(dim=1).tolist()

    return run


def _f32_attention(flux_layers, device, seed):
    """Flux's attention (as its blocks call it) on f32 q, k, v with a real pe, three calls."""
    generator = torch.Generator("cpu").manual_seed(seed)
    b, h, length, d = 1, 24, 6, 128
    q, k, v = (torch.randn(b, h, length, d, generator=generator).to(device) for _ in range(3))
    ids = torch.randint(0, 8, (b, length, 3), generator=generator).float().to(device)
    pe = flux_layers.EmbedND(dim=d, theta=10000, axes_dim=[16, 56, 56])(ids)

    def run():
        with torch.inference_mode():
            return [flux_layers.attention(q, k, v, pe=pe) for _ in range(3)][-1].cpu()

    return run


if __name__ == "__main__":
    _scenario(json.loads(sys.argv[1]))
