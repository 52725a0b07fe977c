"""Writes fastlstm/measured_cuda.py, the figures dispatch's CUDA rule reads, from benchmarks/gpu_grid.py's JSON.

    python benchmarks/cuda_rule.py GRID.json [GRID.json ...] [--out PATH] [--capability 9.0]

Every timed row of the grid (status "ok", triton as the module runs it) becomes one measured shape; a shape timed
in several files keeps its lowest speedup. The GPU's compute capability comes from the grid's header (grids written
before it was recorded there need --capability). All files must come from GPUs of one compute capability. The
rule itself (how near a call must be to a measured shape, and how much faster) is dispatch._triton_slower_reason.

It also prints how the grid stands against issue 4's targets: the geometric-mean speedup of inference at batch <= 16
and of training at batch >= 64, for `auto` (triton where the rule picks it, nn.LSTM's own time elsewhere) and for
triton alone, and the slowest shape `auto` gives triton, on the grid and with each shape left out of the rule in turn
(as a call the grid did not measure would meet it).
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
# Issue 4's targets: (mode, the batches a target covers, how it names them, the geometric mean asked of auto)
TARGETS = (
    ("inference", lambda batch: batch <= 16, "batch <= 16", 1.5),
    ("training", lambda batch: batch >= 64, "batch >= 64", 1.0),
)
FLOOR = 0.95  # where auto picks triton, no shape slower than this against cuDNN


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


def _picks_triton(row: tuple, measured: list[tuple]) -> bool:
    """Whether dispatch's CUDA rule, reading `measured`, gives this grid shape to triton."""
    from fastlstm import dispatch
    from fastlstm.backends import LayerCall

    capability, mode, dtype, _, batch, hidden, seq, _ = row
    (torch_dtype,) = [t for t, name in dispatch._CUDA_DTYPES.items() if name == dtype]  # the names the rule reads
    call = LayerCall(
        device_type="cuda", dtype=torch_dtype, seq_len=seq, batch=batch, input_size=hidden,
        hidden_size=hidden, proj_size=0, bias=True, packed=False, reverse=False, needs_grad=mode == "training",
        device_index=0,
    )  # fmt: skip
    return dispatch._triton_slower_reason(call, measured, capability) is None


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _label(row: tuple) -> str:
    _, mode, dtype, layers, batch, hidden, seq, speedup = row
    return f"{speedup:.3f}x at {mode} {dtype} L{layers} B{batch} H{hidden} T{seq}"


def target_lines(rows: list[tuple], untimed: int) -> list[str]:
    """How the measured rows stand against issue 4's targets, in words (one line each)."""
    lines = [
        f"Issue 4's targets on this grid ({len(rows)} shapes timed, {untimed} not: skipped or failed); auto counts "
        "nn.LSTM's own time (1.00x) where the rule keeps cuDNN:"
    ]
    for mode, covers, words, target in TARGETS:
        mine = [r for r in rows if r[1] == mode and covers(r[4])]
        if not mine:
            lines.append(f"  {mode}, {words}: no shape timed (target >= {target}x)")
            continue
        auto = _geomean([r[7] if _picks_triton(r, rows) else 1.0 for r in mine])
        verdict = "met" if auto >= target else "missed"
        lines.append(
            f"  {mode}, {words}: geometric mean over {len(mine)} shapes: auto {auto:.2f}x ({verdict}; target >= "
            f"{target}x), triton alone {_geomean([r[7] for r in mine]):.2f}x"
        )
    # On the grid each shape is its own nearest, so auto meets the floor there by the rule's margin; a shape left
    # out of the rule meets it as an unmeasured call would, through its neighbours.
    for how, picked in [
        ("the grid's figures", [r for r in rows if _picks_triton(r, rows)]),
        ("each shape by the others' figures", [r for r in rows if _picks_triton(r, [o for o in rows if o is not r])]),
    ]:
        if not picked:
            lines.append(f"  auto picks triton ({how}): on no shape")
            continue
        below = [r for r in picked if r[7] < FLOOR]
        verdict = "met" if not below else "missed: " + "; ".join(map(_label, below))
        slowest = min(picked, key=lambda r: r[7])
        lines.append(
            f"  auto picks triton ({how}): on {len(picked)} of {len(rows)} shapes, slowest {_label(slowest)} "
            f"(never below {FLOOR}x: {verdict})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="+", help="gpu_grid.py's JSON files")
    parser.add_argument("--out", default=os.path.join(ROOT, "fastlstm", "measured_cuda.py"))
    parser.add_argument("--capability", help="the GPU's compute capability, where the grids' headers lack it")
    args = parser.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # the targets ask dispatch's rule; a GPU machine runs this from a bare checkout
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
    untimed = sum(row.get("status") != "ok" for grid in grids for row in grid["rows"])
    print("\n".join(target_lines(rows, untimed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
