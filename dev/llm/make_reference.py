"""llama.cpp's logits and greedy tokens for kiln.llm's small test models, stored in the tree as
the oracle of tests/python/test_llm.py (CI does not build llama.cpp: its CPU build of the
library and this dumper took 577 s on the 2-core development machine, NOTES.md).

    dev/llm/llama_cpp.sh fetch && dev/llm/llama_cpp.sh build cpu
    PYTHONPATH=.pyinstall python dev/llm/make_reference.py      # rewrites tests/data/llm/*.npz

For each small shape (llama-small, qwen3-small) and weight type (q8_0, bf16, f16) it writes the
seeded GGUF file with kiln.llm.synthetic, runs kiln-llama-logits (dev/llm/peer/logits.cpp, built
against llama.cpp) on PROMPT for STEPS greedy steps, and stores

    prompt  i64 [T]              the prompt ids
    tokens  i64 [STEPS]          llama.cpp's greedy ids
    logits  f32 [T + STEPS - 1, V]  row t: logits after token t of prompt + tokens[:-1]
    gguf_sha256                  of the file the logits came from (the test regenerates the file
                                 and checks it is the same)
    peer                         llama.cpp version and build (system info line)
    margin                       the smallest top-1 minus top-2 logit gap along the greedy path,
                                 over the RMS of the logits (how robust greedy agreement is)
"""

import hashlib
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
DUMPER = ROOT / ".peers/llama.cpp/build-cpu/bin/kiln-llama-logits"
VERSION_FILE = ROOT / ".peers/llama.cpp/src/KILN_PEER_VERSION"
OUT = ROOT / "tests/data/llm"
SHAPES = ("llama-small", "qwen3-small")
WEIGHT_TYPES = ("q8_0", "bf16", "f16")
PROMPT = [1, 7, 42, 300, 11, 99, 256, 123]
STEPS = 64


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def greedy_margin(logits: np.ndarray, start: int) -> float:
    """Smallest (top-1 - top-2) / RMS over rows start.. (the rows whose argmax was taken)."""
    rows = logits[start:]
    top2 = np.sort(rows, axis=1)[:, -2:]
    rms = np.sqrt((rows.astype(np.float64) ** 2).mean(axis=1))
    return float(((top2[:, 1] - top2[:, 0]) / rms).min())


def main() -> int:
    from kiln.llm import synthetic

    if not DUMPER.exists():
        print(f"no {DUMPER}: run dev/llm/llama_cpp.sh fetch && dev/llm/llama_cpp.sh build cpu",
              file=sys.stderr)
        return 2
    version = VERSION_FILE.read_text().strip()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for shape in SHAPES:
            for wtype in WEIGHT_TYPES:
                model = pathlib.Path(tmp) / f"{shape}-{wtype}.gguf"
                synthetic.write(model, shape, wtype)
                prefix = pathlib.Path(tmp) / f"{shape}-{wtype}"
                result = subprocess.run(
                    [str(DUMPER), str(model), "--prompt", ",".join(map(str, PROMPT)),
                     "--steps", str(STEPS), "--out", str(prefix), "--threads", "2"],
                    check=True, capture_output=True, text=True)
                info = json.loads(result.stdout.strip().splitlines()[-1])
                vocab = info["vocab"]
                logits = np.fromfile(f"{prefix}.logits", dtype=np.float32).reshape(-1, vocab)
                tokens = np.loadtxt(f"{prefix}.tokens", dtype=np.int64).reshape(-1)
                margin = greedy_margin(logits, len(PROMPT) - 1)
                np.savez(OUT / f"{shape}-{wtype}.npz", prompt=np.array(PROMPT, dtype=np.int64),
                         tokens=tokens, logits=logits, gguf_sha256=sha256(model),
                         peer=f"{version}; {info['system']}; KV cache {info['cache']}",
                         margin=margin)
                print(f"{shape} {wtype}: {len(tokens)} tokens, logits {logits.shape}, "
                      f"greedy margin {margin:.3f} x RMS, tokens {tokens[:12].tolist()}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
