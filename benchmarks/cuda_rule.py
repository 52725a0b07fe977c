"""Writes fastlstm/measured_cuda.py, the figures dispatch's CUDA rule reads, from benchmarks/gpu_grid.py's JSON.

    python benchmarks/cuda_rule.py GRID.json [GRID.json ...] [--out PATH] [--capability 9.0]

Every timed row of the grid (status "ok", triton as the module runs it) becomes one measured shape; a shape timed
in several files keeps its lowest speedup. The GPU's compute capability comes from the grid's header (grids written
before it was recorded there need --capability). All files must come from GPUs of one compute capability. The
rule itself (how near a call must be to a measured shape, and how much faster) is dispatch._triton_slower_reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_AS_RUN = "fastlstm.LSTM(backend='triton')"  # gpu_grid.py's impl of a plain row (others: variants)
DTYPES = ("fp32", "bf16", "fp16")
MODES = ("inference", "training")


def measured_rows(grids: list[dict], capability: str | None) -> tuple[str, list[tuple]]:
    """(capability, rows) from grid JSONs; raises ValueError on grids that cannot be read as one GPU's."""
    found = {capability or grid["header"].get("capability") for grid in grids}
    if None in found:
        raise ValueError("a grid's header has no compute capability: give --capability (e.g. 9.0 for an H200)")
    if len(found) != 1:
        raise ValueError(f"grids from GPUs of different compute capabilities: {sorted(found)}")
    slowest: dict[tuple, float] = {}
    for grid in grids:
        for row in grid["rows"]:
            if row.get("status") != "ok" or row.get("impl", TRITON_AS_RUN) != TRITON_AS_RUN:
                continue
            if row["mode"] not in MODES or row["dtype"] not in DTYPES:
                raise ValueError(f"a row of unknown mode or dtype: {row}")
            key = (row["mode"], row["dtype"], row["layers"], row["batch"], row["hidden"], row["seq"])
            slowest[key] = min(slowest.get(key, float("inf")), float(row["speedup"]))
    (cap,) = found
    # rounded down: a shape just below the rule's margin must not cross it in the table (1.0496x is not 1.05x)
    return cap, [(cap, *key, math.floor(speedup * 1000) / 1000) for key, speedup in sorted(slowest.items())]


def module_text(rows: list[tuple], source: str) -> str:
    with open(os.path.join(ROOT, "fastlstm", "measured_cuda.py")) as f:
        docstring = f.read().split('"""')[1]
    # json.dumps writes each string, int and float as ruff's formatter would: the file is committed as written
    body = "".join(f"    ({', '.join(json.dumps(v) for v in row)}),\n" for row in rows)
    return (
        f'"""{docstring}"""\n\nfrom __future__ import annotations\n\nSOURCE = {json.dumps(source)}\n\n'
        f"MEASURED: tuple[tuple[str, str, str, int, int, int, int, float], ...] = (\n{body})\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="+", help="gpu_grid.py's JSON files")
    parser.add_argument("--out", default=os.path.join(ROOT, "fastlstm", "measured_cuda.py"))
    parser.add_argument("--capability", help="the GPU's compute capability, where the grids' headers lack it")
    args = parser.parse_args(argv)
    grids = []
    for path in args.grids:
        with open(path) as f:
            grids.append(json.load(f))
    try:
        capability, rows = measured_rows(grids, args.capability)
    except ValueError as error:
        print(f"cuda_rule: {error}", file=sys.stderr)
        return 2
    heads = [g["header"] for g in grids]
    source = "; ".join(f"{h['gpu']}, torch {h['torch']}, triton {h['triton']}, commit {h['commit']}" for h in heads)
    text = module_text(rows, source)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"{len(rows)} measured shapes (compute capability {capability}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
