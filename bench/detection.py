"""Detection benchmark: what an explained box costs next to a predict-only request.

For each detector, one request (one image) is answered by the serving core
(:class:`camserve.serving.CamService`, the path of the TorchServe handler and KServe) as
predict-only, and explained with 1 and with 5 boxes (Grad-CAM, ``outputs=bbox`` so the maps are
made but no PNG is encoded; ``--outputs`` changes that). All contenders run side by side in one
run: each round times every contender once in a rotating order; the table reports medians after
warm-up, as ms/request, as ratios to predict-only, and the cost of one more box
((t5 - t1) / 4) relative to predict-only. Detectors: the shapes detector (``models/shapes-det``,
96×96) and torchvision's Faster R-CNN MobileNetV3-FPN (random weights, 5 classes, every box
kept, 320×320); ``--resnet`` adds Faster R-CNN ResNet-50-FPN. Usage::

    python -m bench.detection [--rounds 7] [--threads 2] [--outputs bbox] [--resnet]
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from camserve.models import ModelSpec, load_model, load_model_config
from camserve.serving import CamService

ROOT = Path(__file__).resolve().parents[1]


def _png(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _services(resnet: bool) -> list[tuple[str, CamService, bytes]]:
    out = []
    folder = ROOT / "models" / "shapes-det"
    handler = dict(load_model_config(folder)["handler"])
    if not (folder / "weights.pt").is_file():
        handler.pop("weights", None)
        handler["score_threshold"] = 0.0
    sample = sorted((folder / "samples").glob("*.png"))
    img = sample[0].read_bytes() if sample else _png((96, 96))
    out.append(("shapes-det 96x96", CamService(load_model(ModelSpec.from_config(handler), folder)),
                img))
    archs = ["fasterrcnn_mobilenet_v3_large_fpn"] + (["fasterrcnn_resnet50_fpn"] if resnet else [])
    for arch in archs:
        spec = ModelSpec.from_config({"arch": f"torchvision.models.{arch}", "num_classes": 5,
                                      "task": "detection", "score_threshold": 0.0,
                                      "input_size": [320, 320]})
        torch.manual_seed(0)
        out.append((f"{arch} 320x320", CamService(load_model(spec)), _png((320, 320))))
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave)")
    ap.add_argument("--outputs", default="bbox")
    ap.add_argument("--resnet", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, {args.rounds} rounds after {args.warmup} "
          f"warm-up, medians; outputs={args.outputs}")
    print(f"{'detector':<40} {'predict':>9} {'1 box':>9} {'5 boxes':>9}  {'1 box/pred':>10} "
          f"{'5 boxes/pred':>12} {'+1 box/pred':>11}")
    for name, svc, img in _services(args.resnet):
        rows = {
            "predict": [{"data": img}],
            "1 box": [{"data": img, "explain": "true", "explain_top": "1", "outputs": args.outputs}],
            "5 boxes": [{"data": img, "explain": "true", "explain_top": "5",
                         "outputs": args.outputs}],
        }
        for r in rows.values():  # every contender answers 200 with the boxes it asked for
            res = svc.handle_batch(r).results[0]
            assert res.status == 200, res.body
        times: dict[str, list[float]] = {k: [] for k in rows}
        keys = list(rows)
        for i in range(args.warmup + args.rounds):
            order = keys[i % len(keys):] + keys[:i % len(keys)]
            for k in order:
                t = _timed(lambda: svc.handle_batch(rows[k]))
                if i >= args.warmup:
                    times[k].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        extra = (med["5 boxes"] - med["1 box"]) / 4
        print(f"{name:<40} {med['predict']:8.1f}ms {med['1 box']:8.1f}ms {med['5 boxes']:8.1f}ms  "
              f"{med['1 box'] / med['predict']:9.2f}x {med['5 boxes'] / med['predict']:11.2f}x "
              f"{extra / med['predict']:10.2f}x")


if __name__ == "__main__":
    main()
