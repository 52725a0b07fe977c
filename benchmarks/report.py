"""Turn pytest-benchmark JSON into a markdown speedup table (and optionally a PNG plot).

    python benchmarks/report.py bench.json [--plot bench.png] [--out table.md]

speedup = nn.LSTM's median / the provider's median, within each group (one shape and mode); the baseline
of a group is its provider whose name starts with "nn.LSTM" (e.g. "nn.LSTM", "nn.LSTM packed").
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict


def load(path: str) -> tuple[dict, dict[str, dict[str, float]]]:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = bench["params"]["provider"]
        groups[bench["group"]][provider] = bench["stats"]["median"]
    return data, groups


def header(data: dict) -> list[str]:
    machine = data.get("machine_info", {})
    fast = machine.get("fastlstm", {})
    commit = data.get("commit_info", {})
    return [
        f"- device: {fast.get('device', machine.get('cpu', {}).get('brand_raw', '?'))}",
        f"- torch {fast.get('torch', '?')}, triton {fast.get('triton', '?')}, threads {fast.get('threads', '?')}",
        f"- commit {commit.get('id', '?')[:12]}{' (dirty)' if commit.get('dirty') else ''}, {data.get('datetime', '')}",
    ]


def baseline(group: dict[str, float]) -> tuple[str | None, float | None]:
    """The group's nn.LSTM provider and its median."""
    for provider, median in group.items():
        if provider.startswith("nn.LSTM"):
            return provider, median
    return None, None


def table(groups: dict[str, dict[str, float]]) -> tuple[list[str], dict[str, list[float]]]:
    lines = ["| group | nn.LSTM ms | fastlstm ms (speedup) |", "|---|---:|---|"]
    speedups: dict[str, list[float]] = defaultdict(list)
    for group in sorted(groups):
        base_name, base = baseline(groups[group])
        cells = []
        for provider, t in sorted(groups[group].items()):
            if provider == base_name:
                continue
            if base is None:
                cells.append(f"{provider} {t * 1e3:.3f}")
                continue
            speedups[provider].append(base / t)
            cells.append(f"{provider} {t * 1e3:.3f} ({base / t:.2f}x)")
        base_text = f"{base_name} {base * 1e3:.3f}" if base else "-"
        lines.append(f"| {group} | {base_text} | " + "; ".join(cells) + " |")
    lines.append("")
    for p, values in speedups.items():
        gmean = math.exp(sum(math.log(v) for v in values) / len(values))
        lines.append(f"- {p}: geometric-mean speedup {gmean:.2f}x, min {min(values):.2f}x over {len(values)} groups")
    return lines, speedups


def plot(groups: dict[str, dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(name for name, group in groups.items() if baseline(group)[1])  # a speedup needs nn.LSTM's time
    providers = sorted({p for n in names for p in groups[n] if not p.startswith("nn.LSTM")})
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    width = 0.8 / max(1, len(providers))
    for k, p in enumerate(providers):
        values = [baseline(groups[n])[1] / groups[n][p] if p in groups[n] else 0 for n in names]
        ax.bar([i + k * width for i in range(len(names))], values, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("speedup over nn.LSTM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--plot", help="write a PNG bar chart here")
    parser.add_argument("--out", help="write the markdown here as well as to stdout")
    args = parser.parse_args(argv)
    from fastlstm.__main__ import _unwritable  # bench --json's check (it opens the file: os.access passed root)

    for option, path in (("--out", args.out), ("--plot", args.plot)):
        problem = path and _unwritable(path)
        if problem:  # before the work, as bench --json: the table had printed, then a traceback
            parser.error(f"{option} {path}: {problem}")
    if args.plot:
        from matplotlib.figure import Figure

        kind = os.path.splitext(args.plot)[1].lstrip(".").lower()
        # matplotlib's formats but pgf, which needs a LaTeX install; no extension: PNG, matplotlib's default
        formats = set(Figure().canvas.get_supported_filetypes()) - {"pgf"}
        if kind and kind not in formats:
            parser.error(f"--plot {args.plot}: a file name ending in one of .{', .'.join(sorted(formats))} (or none)")
    try:
        data, groups = load(args.json)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a bench --json or an A/B script's JSON, say
        parser.error(f"{args.json}: not a pytest-benchmark JSON (`pytest benchmarks --benchmark-json`): {e!r}")
    lines, _ = table(groups)
    text = "\n".join(["## fastlstm vs nn.LSTM", "", *header(data), "", *lines])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(groups, args.plot)


if __name__ == "__main__":
    main()
