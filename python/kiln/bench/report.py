"""Results of a suite: the table on stdout, the JSON record and the PNG chart."""

import datetime
import json
import os
from pathlib import Path

from .core import Bench


def default_json_path(suite: str) -> Path:
    """$OUT/bench_<suite>.json, else ./out/bench_<suite>.json (out/ is git-ignored in a kiln
    checkout, so a run there leaves the tree clean)."""
    folder = os.environ.get("OUT") or "out"
    return Path(folder) / f"bench_{suite}.json"


def table(bench: Bench) -> str:
    lines = []
    if bench.measurements:
        copy = bench.measured_copy_gbps
        header = ("op / shape", "kiln ms", "peer", "peer ms", "peer/kiln", "kiln GB/s", "% copy BW")
        rows = []
        for m in bench.measurements:
            share = f"{100 * m.kiln_gbps() / copy:.0f}%" if copy else "-"
            first = True
            for peer, ms in (m.peers or {"-": float("nan")}).items():
                rows.append((
                    f"{m.case} {m.shape}" if first else "",
                    f"{m.kiln_ms:.4f}" if first else "",
                    peer,
                    f"{ms:.4f}",
                    f"{ms / m.kiln_ms:.2f}x",
                    f"{m.kiln_gbps():.0f}" if first else "",
                    share if first else "",
                ))
                first = False
        lines += _format(header, rows)
    if bench.checks:
        if lines:
            lines.append("")
        header = ("check", "value", "target", "result")
        rows = [
            (c.name, f"{c.value:.3f} {c.unit}", f"< {c.target} {c.unit}",
             "pass" if c.passed else "FAIL")
            for c in bench.checks
        ]
        lines += _format(header, rows)
    return "\n".join(lines)


def _format(header, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(  # noqa: E731
        str(v).ljust(w) if i == 0 or i == 2 else str(v).rjust(w)
        for i, (v, w) in enumerate(zip(row, widths))
    )
    return [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]


def record(bench: Bench) -> dict:
    copy = bench.measured_copy_gbps
    return {
        "suite": bench.suite,
        "smoke_test": not bench.cuda,  # no GPU: toy sizes on the CPU, not a measurement
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **bench.environment(),
        "copy_GBps": copy,
        "measurements": [
            {
                "case": m.case,
                "shape": m.shape,
                "kiln_ms": m.kiln_ms,
                "bytes": m.bytes,
                "kiln_GBps": m.kiln_gbps(),
                "pct_copy_bw": 100 * m.kiln_gbps() / copy if copy else None,
                "peers_ms": m.peers,
                "peer_over_kiln": {p: ms / m.kiln_ms for p, ms in m.peers.items()},
                "host_us": m.host_us,
                **m.notes,
            }
            for m in bench.measurements
        ],
        "checks": [
            {"name": c.name, "value": c.value, "unit": c.unit, "target": c.target,
             "passed": c.passed}
            for c in bench.checks
        ],
        "log": bench.log_lines,
    }


def write_json(bench: Bench, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record(bench), indent=1) + "\n")
    bench.log(f"wrote {path}")


def write_chart(bench: Bench, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        bench.log("matplotlib not installed: no chart")
        return
    if not bench.measurements and not bench.checks:
        return
    env = bench.environment()
    if bench.measurements:
        labels = [f"{m.case}\n{m.shape}" for m in bench.measurements]
        peers = list(dict.fromkeys(p for m in bench.measurements for p in m.peers))
        fig, (ax_ratio, ax_bw) = plt.subplots(
            1, 2, figsize=(14, 0.45 * len(labels) * max(len(peers), 1) + 2), sharey=True
        )
        height = 0.8 / max(len(peers), 1)
        for j, peer in enumerate(peers):
            ys = [i + j * height for i in range(len(labels))]
            ratios = [m.peers.get(peer, float("nan")) / m.kiln_ms for m in bench.measurements]
            ax_ratio.barh(ys, ratios, height=height, label=peer)
        ax_ratio.axvline(1.0, color="black", linewidth=0.8)
        ax_ratio.set_xscale("log")
        ax_ratio.set_xlabel("peer time / kiln time (> 1: kiln faster)")
        ax_ratio.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=7)
        ax_ratio.invert_yaxis()
        ax_ratio.legend(fontsize=7, loc="lower right")
        copy = bench.measured_copy_gbps
        if copy:
            share = [100 * m.kiln_gbps() / copy for m in bench.measurements]
            ax_bw.barh([i + 0.4 - height / 2 for i in range(len(labels))], share, color="tab:green")
            ax_bw.axvline(100, color="black", linewidth=0.8)
            ax_bw.set_xlabel(f"kiln, % of copy bandwidth ({copy:.0f} GB/s)")
    else:
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(bench.checks) + 1.5))
        names = [f"{c.name} ({c.value:.3g} {c.unit})" for c in bench.checks]
        values = [c.value / c.target for c in bench.checks]
        colors = ["tab:green" if c.passed else "tab:red" for c in bench.checks]
        ax.barh(names, values, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("value / target (< 1: pass)")
        ax.invert_yaxis()
    fig.suptitle(f"kiln bench {bench.suite} — {env['gpu']}, kiln {env['kiln']}, "
                 f"torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    bench.log(f"wrote {path}")
