"""Cost of an explained target per task, against a predict-only request, through the serving core.

For each task — classification (``models/shapes``), multilabel (``models/shapes-multi``),
segmentation (``models/shapes-seg``) and embedding (``models/shapes`` declared ``task:
embedding``: its 8 logits as the vector) — a batch of 8 requests of 480x360 images goes through
:class:`camserve.serving.CamService` predict-only, explaining one target per request, and
explaining three (an embedding's second case: a reference image, two maps per request). Every case
is timed once per round in a rotating order; the table gives medians over the rounds after warm-up:
ms per request, the ratio to predict-only, and ms per explained target above predict-only (outputs
``heatmap,bbox`` at the original size). Usage::

    python -m bench.tasks [--rounds 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from camserve.serving import CamService

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8
SIZE = (480, 360)


def _images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` PNGs of shapes images upscaled to :data:`SIZE` (the models see 96x96)."""
    from tools.dense_shapes import make_dense_dataset

    data = make_dense_dataset(seed, n, stream="evaluate")
    out = []
    for im in data.images:
        buf = io.BytesIO()
        Image.fromarray(im).resize(SIZE, Image.BILINEAR).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _cases(task: str, images: list[bytes]) -> dict[str, tuple[list[dict[str, Any]], int]]:
    """case -> (the batch's rows, explained targets per request)."""
    base = [{"data": d, "outputs": "heatmap,bbox"} for d in images]
    if task == "embedding":
        one = [{**r, "explain": "true", "reference_embedding": [1.0] * 8} for r in base]
        two = [{**r, "explain": "true", "reference": images[(i + 1) % len(images)]}
               for i, r in enumerate(base)]
        return {"predict": (base, 0), "explain 1": (one, 1), "reference image": (two, 2)}
    first, three = ("[1]", "[1, 2, 3]")
    return {"predict": (base, 0),
            "explain 1": ([{**r, "explain": "true", "target": first} for r in base], 1),
            "explain 3": ([{**r, "explain": "true", "target": three} for r in base], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    services = {
        "classification": CamService.from_model_dir(ROOT / "models" / "shapes"),
        "multilabel": CamService.from_model_dir(ROOT / "models" / "shapes-multi"),
        "segmentation": CamService.from_model_dir(ROOT / "models" / "shapes-seg"),
        "embedding": CamService.from_model_dir(ROOT / "models" / "shapes",
                                               overrides={"task": "embedding"}),
    }
    images = _images(BATCH)
    cases = {(t, c): rows for t in services for c, rows in _cases(t, images).items()}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    keys = list(cases)
    for r in range(args.warmup + args.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:  # a rotating order
            rows, _ = cases[k]
            t0 = time.perf_counter()
            out = services[k[0]].handle_batch(rows)
            dt = time.perf_counter() - t0
            if any(res.status != 200 for res in out.results):
                raise SystemExit(f"{k}: {[res.body for res in out.results if res.status != 200][:1]}")
            if r >= args.warmup:
                times[k].append(dt)
    print(f"batch of {BATCH} requests, {SIZE[0]}x{SIZE[1]} images, outputs heatmap,bbox; "
          f"medians of {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(f"{'task':<15} {'case':<16} {'ms/request':>10} {'x predict':>9} {'ms/target':>9}")
    for task in services:
        pred = statistics.median(times[(task, "predict")]) / BATCH * 1000
        for (t, case), (_, k) in cases.items():
            if t != task:
                continue
            ms = statistics.median(times[(t, case)]) / BATCH * 1000
            per = "" if not k else f"{(ms - pred) / k:9.2f}"
            print(f"{task:<15} {case:<16} {ms:10.2f} {ms / pred:9.2f} {per:>9}")


if __name__ == "__main__":
    main()
