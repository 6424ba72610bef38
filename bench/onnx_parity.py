"""ONNX parity report over the architecture zoo: for every architecture and target layer of
:data:`camserve.testing.zoo.ARCHS`, the worst relative error of the exported CAM graph against the
float64 PyTorch engine, next to PyTorch float32's own error (the baseline the verification allows a
multiple of), over the verification's target cases (explicit targets, -1, no target input, batch
of one), plus export times. The zoo tests (``pytest -m zoo tests/onnx/test_export.py``) assert the
same rows; this prints them. Usage::

    python -m bench.onnx_parity [--arch resnet18,vit_b_16] [--workers N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any, Optional

from camserve.parsing import parse_choices
from camserve.testing.zoo import ARCHS, export_zoo

OUTPUTS = ("logits", "activations", "gradients", "cam")


def worst(row: dict[str, Any], table: str) -> dict[str, float]:
    """The largest relative error per output over the target cases of ``row[table]``
    (``errors``: the graph's; ``baseline``: PyTorch float32's)."""
    cases = row[table]
    return {n: max(cases[c][n] for c in cases) for n in OUTPUTS}


def report(results: dict[str, dict[str, Any]]) -> list[str]:
    """The table's lines: one per architecture-layer, then the worst over the zoo."""
    lines = ["worst relative error vs float64 (graph / PyTorch float32), over explicit, -1, "
             "omitted and batch-of-one targets:",
             f"  {'arch-layer':<46} " + " ".join(f"{n:>19}" for n in OUTPUTS)
             + "  redrawn   export s (trace, verify)"]
    overall = {n: 0.0 for n in OUTPUTS}
    for key, row in sorted(results.items()):
        if "failure" in row:
            lines.append(f"  {key:<46} FAILED: {row['failure'].strip().splitlines()[-1]}")
            continue
        graph, torch32 = worst(row, "errors"), worst(row, "baseline")
        overall = {n: max(overall[n], graph[n]) for n in OUTPUTS}
        t = row["timings"]
        lines.append(f"  {key:<46} " + " ".join(f"{graph[n]:>9.1e}/{torch32[n]:<9.1e}" for n in OUTPUTS)
                     + f"  {str(row['redrawn']):<8}  {row['seconds']:.1f} ({t['trace']:.1f}, "
                       f"{t.get('verify', 0):.1f})")
    lines.append("  worst over the zoo (graph): "
                 + ", ".join(f"{n} {v:.1e}" for n, v in overall.items()))
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="all",
                    help="comma-separated architectures of the zoo, or all (the default)")
    ap.add_argument("--workers", type=int, default=None, help="export processes (default: up to 4)")
    args = ap.parse_args(argv)
    known = tuple(a.name for a in ARCHS)
    try:
        names = parse_choices(args.arch, known, key="--arch", normalize=str.strip,
                              groups={"all": known})
    except ValueError as exc:
        ap.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="camserve-parity-") as tmp:
        results = export_zoo(names, tmp, args.workers)
    print("\n".join(report(results)))
    return 1 if any("failure" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
