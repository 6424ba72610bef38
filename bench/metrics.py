"""Cost of each faithfulness metric on the default shapes model: forward passes and ms per image.

Batch of 16 96x96 images (the 8 committed samples and their mirror images), Grad-CAM maps from
CamEngine on the config's target layer, every metric through ``camserve.metrics.compute_metrics``
with its default settings (deletion/insertion 50 steps, ROAD 9 percentiles with noise). Each round
times every metric once in a rotating order (ROAD, the costly one, in fewer rounds); the table shows
medians over the rounds. Usage::

    python bench/metrics.py [--rounds 3] [--road-rounds 1] [--device cpu|cuda] [--threads N]
                            [--steps 50] [--only deletion,road_morf,...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camserve import CamEngine
from camserve import metrics as M

SHAPES_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes"


def _load_model(device: str):
    from camserve import models

    if hasattr(models, "load_model_dir"):
        loaded = models.load_model_dir(SHAPES_DIR, device=device)
        return loaded.model, loaded.spec
    spec = models.ModelSpec.from_config(models.load_model_config(SHAPES_DIR)["handler"])
    return models.build_model(spec, SHAPES_DIR, device=device), spec


def _batch(spec, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = json.loads((SHAPES_DIR / "samples" / "boxes.json").read_text())
    names = json.loads((SHAPES_DIR / "index_to_name.json").read_text())
    index = {v: int(k) for k, v in names.items()}
    files = sorted(meta)
    imgs = np.stack([np.asarray(Image.open(SHAPES_DIR / "samples" / f).convert("RGB")) for f in files])
    w = imgs.shape[2]
    imgs = np.concatenate([imgs, imgs[:, :, ::-1]])
    boxes = np.array([meta[f]["box"] for f in files])
    mirrored = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    boxes = np.concatenate([boxes, mirrored])
    labels = [index[meta[f]["label"]] for f in files] * 2
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    return x.to(device), torch.tensor(labels, device=device), torch.from_numpy(boxes).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--road-rounds", type=int, default=1, help="rounds for the two ROAD keys")
    ap.add_argument("--only", default="", help="comma-separated subset of the rows")
    ap.add_argument("--steps", type=int, default=M.DEFAULT_STEPS)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    model, spec = _load_model(dev)
    x, labels, boxes = _batch(spec, dev)
    b = x.shape[0]

    def explain(m, xx, t):
        return CamEngine(m, spec.target_layer)(xx, t).cams

    maps = explain(model, x, labels)
    settings = dict(steps=args.steps, generator=torch.Generator().manual_seed(0))
    runs = {
        "reference": lambda: M.reference_targets(model, x, labels),
        "deletion": lambda: M.compute_metrics(model, x, maps, labels, keys=("deletion",), **settings),
        "insertion": lambda: M.compute_metrics(model, x, maps, labels, keys=("insertion",), **settings),
        "road_morf": lambda: M.compute_metrics(model, x, maps, labels, keys=("road_morf",), **settings),
        "road_lerf": lambda: M.compute_metrics(model, x, maps, labels, keys=("road_lerf",), **settings),
        "avg_drop+avg_increase": lambda: M.compute_metrics(
            model, x, maps, labels, keys=("avg_drop", "avg_increase"), **settings),
        "energy_in_box+pointing_game": lambda: M.compute_metrics(
            model, x, maps, labels, keys=("energy_in_box", "pointing_game"), boxes=boxes, tolerance=3),
        "randomization_rank_corr": lambda: M.compute_metrics(
            model, x, maps, labels, keys=("randomization_rank_corr",), explain=explain, top_k=1),
    }
    names = [n for n in runs if not args.only or n in args.only.split(",")]
    times: dict[str, list[float]] = {n: [] for n in names}
    values: dict[str, dict[str, float]] = {}
    explain(model, x, labels)                          # warm-up: one forward and backward
    for r in range(max(args.rounds, args.road_rounds)):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if r >= (args.road_rounds if n.startswith("road") else args.rounds):
                continue
            _sync(dev)
            t0 = time.perf_counter()
            out = runs[n]()
            _sync(dev)
            times[n].append(time.perf_counter() - t0)
            if isinstance(out, dict):
                values[n] = M.summarize(out)

    cost_keys = {"reference": (), "deletion": ("deletion",), "insertion": ("insertion",),
                 "road_morf": ("road_morf",), "road_lerf": ("road_lerf",),
                 "avg_drop+avg_increase": ("avg_drop", "avg_increase"),
                 "energy_in_box+pointing_game": ("energy_in_box", "pointing_game"),
                 "randomization_rank_corr": ("randomization_rank_corr",)}
    print(f"shapes model, batch {b}, {tuple(x.shape[-2:])}, device {dev}, threads "
          f"{torch.get_num_threads()}, steps {args.steps}, {len(M.DEFAULT_PERCENTILES)} ROAD "
          f"percentiles, medians of {args.rounds} rounds ({args.road_rounds} for ROAD)")
    print(f"{'metric':30s} {'fwd/img':>8s} {'ms/img':>9s}  mean value(s)")
    for n in names:
        if not times[n]:
            continue
        fwd = 1 if n == "reference" else sum(v for k, v in M.cost(
            cost_keys[n], steps=args.steps).items() if k != "reference")
        note = " (+1 bwd each)" if n == "randomization_rank_corr" else ""
        ms = statistics.median(times[n]) * 1e3 / b
        vals = ", ".join(f"{k}={v:.4f}" for k, v in values.get(n, {}).items())
        print(f"{n:30s} {fwd:>8d} {ms:>9.2f}  {vals}{note}")
    print("compute_metrics adds the one shared reference forward to the keys' own passes.")


if __name__ == "__main__":
    main()
