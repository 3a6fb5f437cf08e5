"""`kiln generate MODEL.gguf`: greedy decoding of a GGUF model with kiln.llm, progress and timings
on stderr, the generated ids on stdout (one line, space-separated)."""

import sys
import time

# Decode steps between two progress lines.
PROGRESS_EVERY = 16


def add_arguments(parser) -> None:
    parser.add_argument("model", help="GGUF file (llama or qwen3 architecture)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-tokens", type=int, default=16,
                        help="length of a random prompt (seeded by --seed; default 16)")
    prompt.add_argument("--prompt", help="the prompt as comma-separated token ids")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--weights", choices=["e4m3fn"], default=None,
                        help="re-quantize the weights to fp8 e4m3 at load (default: as stored)")
    parser.add_argument("--context", type=int, default=None,
                        help="KV cache length (default: prompt + tokens)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")


def _say(message: str) -> None:
    print(f"kiln generate: {message}", file=sys.stderr, flush=True)


def run(args) -> int:
    start = time.perf_counter()
    import torch

    from .. import cuda_available, cuda_unavailable_reason
    from .model import load

    device = args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() and cuda_available() else "cpu"
        if device == "cpu":
            _say(f"no CUDA device ({cuda_unavailable_reason()}): running kiln's CPU reference "
                 "backend")
    if args.prompt is not None:
        prompt = [int(t) for t in args.prompt.split(",") if t.strip()]
    else:
        prompt = None
    if args.tokens < 1:
        _say(f"--tokens {args.tokens}: expected at least 1")
        return 2

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    n_prompt = len(prompt) if prompt is not None else args.prompt_tokens
    context = args.context or n_prompt + args.tokens
    model = load(args.model, device, context=context, weights=args.weights)
    hp = model.hparams
    sync()
    loaded = time.perf_counter()
    _say(f"{hp.arch}, {hp.n_layer} layers, hidden {hp.n_embd}, {model.weight_format} weights "
         f"({model.weight_bytes / 2**20:.1f} MiB) on {device}: loaded in {loaded - start:.2f} s "
         "(imports included)")
    if prompt is None:
        generator = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(3, hp.n_vocab, (n_prompt,), generator=generator).tolist()

    last = model.prefill(prompt)
    first = int(last.argmax(dim=-1))
    sync()
    prefilled = time.perf_counter()
    _say(f"prefill {len(prompt)} tokens: {prefilled - loaded:.3f} s "
         f"({len(prompt) / (prefilled - loaded):.1f} tokens/s); first token after "
         f"{prefilled - start:.2f} s")
    ids = [first]
    # A terminal gets one progress line rewritten in place, a log one line a chunk.
    end = "\r" if sys.stderr.isatty() else "\n"
    while len(ids) < args.tokens:
        ids += model.decode(ids[-1], min(PROGRESS_EVERY, args.tokens - len(ids)))
        elapsed = time.perf_counter() - prefilled
        print(f"kiln generate: {len(ids)}/{args.tokens} tokens, "
              f"{(len(ids) - 1) / elapsed:.1f} tokens/s", end=end, file=sys.stderr, flush=True)
    sync()
    if args.tokens > 1:
        elapsed = time.perf_counter() - prefilled
        if end == "\r":
            print(file=sys.stderr)
        _say(f"decode {args.tokens - 1} tokens: {elapsed:.3f} s "
             f"({(args.tokens - 1) / elapsed:.1f} tokens/s)")
    print(" ".join(map(str, ids)))
    return 0
