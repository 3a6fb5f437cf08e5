"""kiln's ComfyUI node (comfyui/comfyui-kiln) inside the real ComfyUI.

The snapshot of ComfyUI (../shared/clients/ComfyUI-a125cd84.tar.gz, or $KILN_COMFYUI: a test
client, GPL-3.0) is unpacked into a temporary folder and imported with its requirements (in
scripts/requirements.txt); kiln's node is linked into its custom_nodes and loaded by ComfyUI's
own loader (nodes.init_external_custom_nodes). The test writes a FLUX.1-architecture checkpoint
as safetensors (random weights, each linear's output about unit variance, a few MLP channels
past e4m3's 448 as in real transformers: kiln.bench.suites.comfyui.flux_state_dict; bf16, and
e4m3 with a per-tensor scale_weight and the scaled_fp8 marker that turns on ComfyUI's fp8
matmuls) and a Flux VAE, samples with ComfyUI's sampling functions (comfy.sample.sample, Euler, CFG 1, FLUX.1-dev
guidance) and decodes with its VAE class, before the node is loaded (ComfyUI as shipped) and
after, in one ComfyUI process: a child process running this file as a script, since ComfyUI's
imports change process-wide state that other tests must not see. The child saves what it
measured; the tests below check it.

CPU (CI): ComfyUI's loader takes FLUX.1's widths only (hidden 3072, 24 heads x 128, T5 4096), so
the model is those widths at 1 double + 1 single block, on a 4 x 4 latent (4 image + 2 text
tokens), 2 steps (1 for the fp8 comparison, whose three runs are the slowest); the VAE (real
widths, fixed by the loader too) decodes a 2 x 2 crop of the latent (16 x 16 pixels). kiln runs
its CPU reference there (KILN_COMFY_DEVICES=cuda,cpu), exact and slow, which sets those sizes
(comfyui/NOTES.md has the times). ComfyUI computes in f32 on CPUs, where kiln's attention
(f16/bf16) declines: the test has ComfyUI compute in bf16 as it does on GPUs (its
should_use_bf16 answers yes) and checks the f32 decline separately. ComfyUI's fp8 matmuls on CPU
come from --supports-fp8-compute. Weights and inputs come from a fresh seed, printed.

GPU: the same at 1024² (128² latent) with FLUX.1's full depth (19 + 38 blocks), the state dicts
handed to ComfyUI's loader in memory (comfy.sd.load_diffusion_model_state_dict: 24 GB of bf16
weights); skipped without a GPU.

Bounds: kiln's RoPE and attention round once from f32 where ComfyUI's chain rounds q and k to
bf16 before its attention, so the two differ by bf16 roundings carried through the blocks and
steps. The bound is the larger of 4 bf16 ulps (2^-6, relative) and twice the difference between
two of ComfyUI's own attention functions on the same model (its default and attention_basic),
measured in the same run.
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


def _bound(result) -> float:
    return max(BF16_FLOOR, NOISE_FACTOR * result["metrics"]["comfy attention noise"])


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
                 "comfy.ldm.flux.layers.attention", "attention function 'kiln'",
                 "comfy.ops.fp8_linear", "comfy.sd.VAE"):
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
    assert "kiln: attention on kiln (Flux RoPE (kiln.rope_flux) + kiln.attention" in \
        cpu_run["log"]


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
    assert "fp8 x fp8 matmul with per-token activation scales" in cpu_run["log"]


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


# ---- the child: one ComfyUI process ----------------------------------------------------------


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _scenario(settings: dict) -> None:
    """Runs ComfyUI as shipped, loads the node, runs it again; saves latents, images and
    metrics to <folder>/result.pt."""
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
    fp8 = harness.fp8_state_dict(torch, bf16, scaled=True)
    vae_sd = harness.vae_state_dict(torch, device=device, seed=seed + 1)
    sources = {"bf16": bf16, "fp8": fp8}
    if settings["files"]:
        import safetensors.torch

        for name, sd in (("bf16", bf16), ("fp8", fp8), ("vae", vae_sd)):
            safetensors.torch.save_file(sd, folder / f"{name}.safetensors")
        sources = {name: folder / f"{name}.safetensors" for name in ("bf16", "fp8")}
        vae_source = folder / "vae.safetensors"
        del bf16, fp8, vae_sd
        phase("checkpoints written")

    def load(kind):
        source = sources[kind]
        if isinstance(source, Path):
            return comfy.sd.load_diffusion_model(str(source))
        return comfy.sd.load_diffusion_model_state_dict(dict(source))

    def load_vae():
        if settings["files"]:
            import comfy.utils

            return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_source)))
        return comfy.sd.VAE(sd=dict(vae_sd))

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
    latents, images, metrics = {"noise": noise}, {}, {}

    def decode(vae, latent):
        # Under inference mode, as ComfyUI's executor runs every node (execution.py): the VAE's
        # weights require grad, and kiln refuses them under grad mode (no backward).
        with torch.inference_mode():
            return vae.decode(latent[:, :, :crop, :crop]).float()

    # ComfyUI as shipped.
    model = load("bf16")
    latents["comfy bf16"] = sample(model)
    phase("ComfyUI bf16 sampled")
    basic = model.clone()
    basic.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
        lambda func, *args, **kwargs: comfy.ldm.modules.attention.attention_basic(*args,
                                                                                   **kwargs))
    metrics["comfy attention noise"] = _rel(sample(basic), latents["comfy bf16"])
    del model, basic
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
    metrics["fp8_ops comfy errors"] = comfy_rows
    metrics["fp8_ops kiln errors"] = layer_case()
    kiln_f32 = attention_case()
    metrics["f32 attention error"] = _rel(kiln_f32, comfy_f32)
    metrics["counts f32 attention"] = counts()
    torch.save({"latents": latents, "images": images, "metrics": metrics},
               folder / "result.pt")


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
