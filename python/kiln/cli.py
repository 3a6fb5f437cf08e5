"""The `kiln` command (also `python -m kiln`).

  kiln bench [suite] [options]       time kiln against its peers (see kiln.bench)
  kiln generate MODEL.gguf [--prompt-tokens N] [--tokens M]
                                     greedy decoding of a GGUF LLM with kiln.llm (timings on
                                     stderr, ids on stdout)
  kiln cache list [--json]           the disk cache's entries
  kiln cache clear                   empty the disk cache
  kiln cache warmup [--workload NAME] [--arch sm_80,sm_90a | --device N]
                                     compile and store a workload's kernels; with --arch it
                                     needs no GPU, without it compiles for CUDA device --device;
                                     fails when it cannot store what it compiled
"""

import argparse
import json
import os
import sys

from . import jit
from ._C import KilnError
from .device import cuda_arch, cuda_device_count, cuda_unavailable_reason


def _cache_list(args) -> int:
    folder = jit.cache_dir()
    entries = sorted(jit.list_cache(), key=lambda e: (e["kernel"], e["arch"]))
    if args.json:
        print(json.dumps({"cache_dir": folder, "writable": jit.cache_writable(),
                          "entries": entries}, indent=1))
        return 0
    if not folder:
        print("kiln cache: memory-only (the cache folder cannot be read or created)")
        return 0
    total = sum(e["bytes"] for e in entries)
    state = "" if jit.cache_writable() else " (read-only: read, not written)"
    if not os.path.isdir(folder):
        state = " (not created yet: the first compile makes it)"
    print(f"{folder}: {len(entries)} entries, {total / 2**20:.2f} MiB{state}")
    for e in entries:
        state = "ok" if e["valid"] else "INVALID"
        print(f"  {e['arch']:8s} {e['bytes']:>9d} B  {state:7s}  {e['kernel']}")
    return 0


def _cache_clear(args) -> int:
    removed = jit.clear_cache()
    print(f"kiln cache: removed {removed} files from {jit.cache_dir() or 'the memory cache'}")
    return 0


def _cache_warmup(args) -> int:
    if args.arch is not None:
        if args.device is not None:
            print("kiln cache warmup: --arch and --device exclude each other (--device picks the "
                  "arch of that GPU)", file=sys.stderr)
            return 2
        archs = [a.strip() for a in args.arch.split(",") if a.strip()]
        if not archs:
            print(f"kiln cache warmup: --arch {args.arch!r} names no arch, expected e.g. "
                  "--arch sm_80,sm_90a", file=sys.stderr)
            return 2
    elif cuda_device_count() == 0:
        print(
            f"kiln cache warmup: no CUDA device ({cuda_unavailable_reason()}); name the targets "
            "with --arch, e.g. --arch sm_80,sm_90a",
            file=sys.stderr,
        )
        return 2
    else:
        archs = [cuda_arch(args.device or 0)]
    result = jit.warmup(args.workload, archs)
    folder = jit.cache_dir() or "no disk cache"
    print(
        f"kiln cache warmup {args.workload} for {', '.join(archs)}: {result['variants']} "
        f"variants, {result['compiled']} compiled, {result['variants'] - result['compiled']} "
        f"already cached, {result['stored']} stored in {folder}"
    )
    if result["stored"] < result["compiled"]:
        why = "is read-only" if jit.cache_dir() else "cannot be read or created"
        print(
            f"kiln cache warmup: stored {result['stored']} of the {result['compiled']} kernels it "
            f"compiled: the cache folder {jit.cache_dir() or '(KILN_CACHE_DIR)'} {why}",
            file=sys.stderr,
        )
        return 1
    return 0


def _bench(args) -> int:
    from . import bench

    return bench.run(args)


def _generate(args) -> int:
    from .llm import cli

    return cli.run(args)


def parser() -> argparse.ArgumentParser:
    from .bench import add_arguments

    top = argparse.ArgumentParser(
        prog="kiln",
        description="kiln: shape-specialized CUDA kernels compiled at run time",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    commands = top.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="time kiln against its peers")
    add_arguments(bench)
    bench.set_defaults(func=_bench)

    generate = commands.add_parser("generate", help="greedy decoding of a GGUF LLM")
    from .llm.cli import add_arguments as add_generate_arguments

    add_generate_arguments(generate)
    generate.set_defaults(func=_generate)

    cache = commands.add_parser("cache", help="inspect, clear or fill the kernel cache")
    actions = cache.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list the disk cache's entries")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_cache_list)
    actions.add_parser("clear", help="remove every kiln entry").set_defaults(func=_cache_clear)
    warmup = actions.add_parser("warmup", help="compile and store a workload's kernels")
    warmup.add_argument("--workload", default="flux", help="workload name (default flux)")
    warmup.add_argument(
        "--arch", help="comma-separated targets, e.g. sm_80,sm_90a (default: the GPU's)"
    )
    warmup.add_argument("--device", type=int, help="CUDA device whose arch to compile for "
                        "(default 0), when --arch is absent")
    warmup.set_defaults(func=_cache_warmup)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KilnError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`kiln cache list | head`): say nothing more, and keep Python from
        # complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
