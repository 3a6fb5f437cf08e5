"""kiln.llm end to end: the small GGUF models of kiln.llm.synthetic (llama and qwen3, Q8_0, bf16
and f16 weights) decoded by kiln against llama.cpp's logits and greedy tokens for the same
files, stored in tests/data/llm by dev/llm/make_reference.py (llama.cpp's CPU build; CI does not
build llama.cpp).

What must hold, per model:
- the writer regenerates byte for byte the file the reference was made from (its sha256);
- kiln's 64 greedy tokens are llama.cpp's;
- kiln's logits at every position (the prompt's, in one prefill, and each decode step's) are
  within LOGIT_ERROR of llama.cpp's, relative (||kiln - llama.cpp|| / ||llama.cpp||).

The two sides round differently on purpose: llama.cpp's CPU matmuls quantize activations to the
weight's vec_dot type (Q8_0 blocks for Q8_0 weights, bf16, f16) and keep an f32 KV cache here;
kiln feeds bf16 activations to its matmuls and keeps a bf16 cache. LOGIT_ERROR is about twice
the error measured on this pair (dev/llm/NOTES.md). The greedy path is robust by construction,
not by tolerance: every step's top-1 logit leads by more than 3x the logits' RMS (`margin` in
the stored reference), hundreds of times the measured error.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln
import kiln.llm
from kiln.llm import synthetic

from conftest import CUDA_REASON, HAS_CUDA

DATA = pathlib.Path(__file__).parent.parent / "data" / "llm"
SHAPES = ("llama-small", "qwen3-small")
WEIGHT_TYPES = ("q8_0", "bf16", "f16")
MODELS = [f"{shape}-{wtype}" for shape in SHAPES for wtype in WEIGHT_TYPES]
# ||kiln - llama.cpp|| / ||llama.cpp|| over all logits, by weight type (see the docstring).
LOGIT_ERROR = {"q8_0": 1.5e-2, "bf16": 5e-3, "f16": 5e-3}
# fp8 e4m3 weights (kiln's own option; llama.cpp has no such file): the weights' own rounding
# (3 mantissa bits) dominates.
FP8_LOGIT_ERROR = 6e-2
# The smallest top-1 lead (over the logits' RMS) the stored greedy paths may have.
MIN_MARGIN = 3.0


def reference(name):
    data = np.load(DATA / f"{name}.npz")
    return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """The six small models, written by the seeded writer (about 3 s on two cores)."""
    folder = tmp_path_factory.mktemp("llm")
    paths = {}
    for shape in SHAPES:
        for wtype in WEIGHT_TYPES:
            path = folder / f"{shape}-{wtype}.gguf"
            synthetic.write(path, shape, wtype)
            paths[f"{shape}-{wtype}"] = path
    return paths


def relative_error(got, want) -> float:
    want = torch.as_tensor(want, dtype=torch.float64)
    norm = want.norm().item()
    assert norm > 0, "reference logits are all zeros: the test would pass vacuously"
    return ((got.double().cpu() - want).norm() / norm).item()


@pytest.mark.parametrize("name", MODELS)
def test_writer_regenerates_the_reference_file(model_files, name):
    ref = reference(name)
    digest = hashlib.sha256(model_files[name].read_bytes()).hexdigest()
    assert digest == str(ref["gguf_sha256"]), (
        f"{name}: the writer no longer produces the file llama.cpp's reference logits came "
        "from; regenerate them with dev/llm/make_reference.py"
    )
    assert float(ref["margin"]) > MIN_MARGIN


@pytest.mark.parametrize("name", MODELS)
def test_gguf_loading(model_files, name):
    """Hyperparameters from the metadata; every tensor in its stored format, equal to what the
    writer drew; Q8_0 blocks read the same by kiln and by gguf's ggml port."""
    import gguf

    shape_name, wtype = name.rsplit("-", 1)
    shape = synthetic.SHAPES[shape_name]
    f = kiln.llm.GgufFile(model_files[name])
    hp = f.hparams
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff,
            hp.n_vocab) == (shape.arch, shape.n_layer, shape.n_embd, shape.n_head,
                            shape.n_head_kv, shape.head_dim, shape.n_ff, shape.n_vocab)
    assert hp.rope_theta == shape.rope_theta and hp.rms_eps == pytest.approx(shape.rms_eps)
    assert hp.style == {"llama": "normal", "qwen3": "neox"}[shape.arch]
    assert f.weight_type == wtype.upper()
    embedding = None
    for tensor_name in synthetic.tensor_names(shape):
        size = synthetic.tensor_shape(shape, tensor_name)
        want = synthetic.make_tensor(torch, shape, tensor_name, synthetic.SEED, "cpu", embedding)
        if tensor_name == "token_embd.weight":
            embedding = want
        got = f.tensor(tensor_name, size)
        if len(size) == 1:
            assert got.dtype == torch.float32 and torch.equal(got, want)
        elif wtype == "q8_0":
            assert got.dtype == torch.uint8 and got.shape == (size[0], size[1] // 32 * 34)
            assert torch.equal(got, kiln.quantize_q8_0(want))
            ggml = gguf.quants.dequantize(got.numpy(), gguf.GGMLQuantizationType.Q8_0)
            assert torch.equal(kiln.dequantize(got), torch.from_numpy(ggml))
        else:
            dtype = torch.bfloat16 if wtype == "bf16" else torch.float16
            assert got.dtype == dtype and torch.equal(got, want.to(dtype))


def test_gguf_errors(model_files, tmp_path):
    import gguf

    f = kiln.llm.GgufFile(model_files["llama-small-q8_0"])
    with pytest.raises(kiln.llm.GgufError, match=r"attn_q.weight has shape \[256, 256\], "
                                                 r"expected \[512, 256\]"):
        f.tensor("blk.0.attn_q.weight", (512, 256))
    with pytest.raises(kiln.llm.GgufError, match="has no tensor blk.9.attn_q.weight"):
        f.tensor("blk.9.attn_q.weight", (256, 256))
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(kiln.llm.GgufError, match="is not a GGUF file"):
        kiln.llm.GgufFile(not_gguf)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model_files["llama-small-bf16"].read_bytes()[:-4096])
    with pytest.raises(kiln.llm.GgufError, match=r"ffn_down.weight ends at byte \d+, past the "):
        kiln.llm.GgufFile(truncated).tensor("blk.1.ffn_down.weight", (256, 704))
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(kiln.llm.GgufError, match=r"is a 'gpt2' model, expected one of llama, "
                                                 r"qwen3"):
        kiln.llm.load(path, "cpu")


def check_against_llama_cpp(model, name, max_error):
    """Greedy tokens and logits of `model` against the stored llama.cpp reference; returns the
    errors (prefill of the whole sequence, decode steps)."""
    ref = reference(name)
    prompt, tokens, logits = ref["prompt"].tolist(), ref["tokens"].tolist(), ref["logits"]
    steps = len(tokens)

    ids, step_logits = model.generate(prompt, steps, return_logits=True)
    assert ids == tokens, f"{name}: greedy tokens differ from llama.cpp's at step " \
        f"{next(i for i, (a, b) in enumerate(zip(ids, tokens)) if a != b)}"
    assert step_logits.shape == (steps, logits.shape[1]) and step_logits.dtype == torch.float32
    decode_error = relative_error(step_logits, logits[len(prompt) - 1:])

    full = model.logits(prompt + tokens[:-1])
    assert full.shape == logits.shape
    prefill_error = relative_error(full, logits)
    print(f"{name}: relative logit error vs llama.cpp: prefill {prefill_error:.2e}, decode "
          f"{decode_error:.2e}")
    assert prefill_error <= max_error and decode_error <= max_error
    return prefill_error, decode_error


@pytest.mark.parametrize("name", MODELS)
def test_cpu_against_llama_cpp(model_files, name):
    model = kiln.llm.load(model_files[name], "cpu", context=128)
    check_against_llama_cpp(model, name, LOGIT_ERROR[name.rsplit("-", 1)[1]])


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_fp8_weights(model_files, shape):
    """weights="e4m3fn" (re-quantized at load, per-row scales): same greedy path."""
    model = kiln.llm.load(model_files[f"{shape}-bf16"], "cpu", context=128, weights="e4m3fn")
    assert model.weight_format == "e4m3fn"
    assert model.layers[0].w_qkv.data.dtype == torch.float8_e4m3fn
    check_against_llama_cpp(model, f"{shape}-bf16", FP8_LOGIT_ERROR)


def test_prefill_in_pieces_equals_one_prefill(model_files):
    """The cache carries a sequence across prefills: two halves give the logits of the whole."""
    model = kiln.llm.load(model_files["qwen3-small-bf16"], "cpu", context=64)
    ids = reference("qwen3-small-bf16")["prompt"].tolist() * 3
    whole = model.logits(ids)
    model.reset()
    first = model.prefill(ids[:10], all_rows=True)
    second = model.prefill(ids[10:], all_rows=True)
    assert relative_error(torch.cat([first, second]), whole) < 1e-6


def test_context_and_id_checks(model_files):
    model = kiln.llm.load(model_files["llama-small-bf16"], "cpu", context=16)
    with pytest.raises(ValueError, match=r"0 cached \+ 17 new tokens exceed the context of 16"):
        model.logits(list(range(17)))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 384\), got \[0, 384\]"):
        model.logits([0, 384])
    with pytest.raises(ValueError, match="weights='e5m2'"):
        kiln.llm.load(model_files["llama-small-bf16"], "cpu", weights="e5m2")


def run_kiln(*args, tmp_path):
    env = dict(os.environ, KILN_CACHE_DIR=str(tmp_path / "cache"), OUT=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "kiln", *args], env=env, capture_output=True,
                          text=True)


def test_generate_command(model_files, tmp_path):
    """`kiln generate`: the greedy ids on stdout, progress and timings on stderr."""
    ref = reference("qwen3-small-q8_0")
    prompt = ",".join(map(str, ref["prompt"].tolist()))
    result = run_kiln("generate", str(model_files["qwen3-small-q8_0"]), "--prompt", prompt,
                      "--tokens", "20", "--device", "cpu", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [int(t) for t in result.stdout.split()] == ref["tokens"][:20].tolist()
    assert "prefill 8 tokens" in result.stderr and "decode 19 tokens" in result.stderr
    assert "first token after" in result.stderr
    result = run_kiln("generate", str(model_files["llama-small-bf16"]), "--prompt-tokens", "5",
                      "--tokens", "3", "--device", "cpu", tmp_path=tmp_path)
    assert result.returncode == 0 and len(result.stdout.split()) == 3, result.stderr


@pytest.mark.skipif(HAS_CUDA, reason="the suite runs on the GPU here")
def test_bench_llm_says_there_is_no_gpu(tmp_path):
    result = run_kiln("bench", "llm", "--no-chart", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stderr and "skipped" in result.stderr
    assert json.loads((tmp_path / "bench_llm.json").read_text())["measurements"] == []


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("name", MODELS)
def test_cuda_against_llama_cpp(model_files, name):
    """The CUDA path (kernels, graph-captured decode) against the same CPU reference of
    llama.cpp, and the CUDA tokens and logits against kiln's CPU backend."""
    model = kiln.llm.load(model_files[name], "cuda", context=128)
    check_against_llama_cpp(model, name, LOGIT_ERROR[name.rsplit("-", 1)[1]])
    assert model._graphs, "decode steps were not captured as CUDA graphs"


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_cuda_graphs_equal_eager(model_files, monkeypatch):
    """Replayed graphs give the eager steps' tokens and logits, across a bucket boundary."""
    from kiln.llm import model as model_module

    monkeypatch.setattr(model_module, "MIN_BUCKET", 16)
    prompt = reference("llama-small-q8_0")["prompt"].tolist()
    graphed = kiln.llm.load(model_files["llama-small-q8_0"], "cuda", context=64)
    eager = kiln.llm.load(model_files["llama-small-q8_0"], "cuda", context=64, graphs=False)
    ids_g, logits_g = graphed.generate(prompt, 40, return_logits=True)
    ids_e, logits_e = eager.generate(prompt, 40, return_logits=True)
    assert ids_g == ids_e
    assert sorted(graphed._graphs) == [16, 32, 64]
    assert relative_error(logits_g, logits_e.cpu()) < 1e-6


def test_bench_reads_llama_bench_json(tmp_path, monkeypatch):
    """The llm suite's reading of llama-bench's JSON output (fields as llama-bench.cpp writes
    them), through a stand-in executable named by KILN_LLAMA_BENCH."""
    from kiln.bench.suites import llm

    rows = [{"build_commit": "0c1e5709", "build_number": 1, "n_prompt": p, "n_gen": g,
             "n_depth": d, "avg_ts": ts, "samples_ts": [ts]}
            for p, g, d, ts in [(512, 0, 0, 9000.5), (0, 128, 0, 120.25),
                                (512, 0, 32768, 4000.0), (0, 128, 32768, 80.0)]]
    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!{sys.executable}\nimport sys\nassert '-d' in sys.argv\n"
                    f"print({json.dumps(json.dumps(rows))})\n")
    fake.chmod(0o755)
    monkeypatch.setenv("KILN_LLAMA_BENCH", str(fake))

    class Bench:
        lines = []

        def log(self, message):
            self.lines.append(message)

    bench = Bench()
    rates = llm._llama_rates(bench, tmp_path / "model.gguf")
    assert rates == {("pp", 0): 9000.5, ("tg", 0): 120.25, ("pp", 32768): 4000.0,
                     ("tg", 32768): 80.0}
    assert any("0c1e5709" in line for line in bench.lines)
    monkeypatch.setenv("KILN_LLAMA_BENCH", str(tmp_path / "absent"))
    assert llm._llama_rates(bench, tmp_path / "model.gguf") is None
    assert "llama.cpp peer skipped" in bench.lines[-1]


def test_bench_first_token_time(model_files, monkeypatch, tmp_path):
    """The llm suite's first-token figure: a fresh `kiln generate` process, read from its
    stderr (on CPU here, the small model)."""
    from kiln.bench.suites import llm

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))

    class Bench:
        lines = []

        def log(self, message):
            self.lines.append(message)

    seconds = llm._first_token_seconds(Bench(), model_files["llama-small-q8_0"])
    assert seconds is not None and 0 < seconds < 600
    assert "after the command started" in Bench.lines[-1]
