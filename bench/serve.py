"""Serving benchmark: predict vs explain through a real TorchServe, and the stock Captum baseline.

Starts its own TorchServe (a temporary directory, free loopback ports, token auth on) with three
models, each one worker:

* ``shapes``: the default model (models/shapes) with the camserve handler;
* ``resnet50``: torchvision ResNet-50 (random weights, 224×224 input) with the camserve handler;
* ``resnet50_stock``: the same network and weights with TorchServe's stock ``image_classifier``
  handler, whose ``/explanations`` runs Captum IntegratedGradients (what a user would otherwise
  use). Its batch size is 1: IntegratedGradients multiplies the batch by its 15 steps.

8 concurrent clients (loopback only) send a bounded number of requests per mode; the table gives
req/s and p50/p99 latency, explain/predict as a ratio, and camserve explain vs the stock explain.

    python -m bench.serve                 # make bench-serve (from the repository root)
    python -m bench.serve --requests 40 --stock-requests 8
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import requests
import torch
import yaml
from PIL import Image

from camserve.testing.load import closed_loop
from camserve.testing.torchserve import LocalTorchServe, archive

ROOT = Path(__file__).resolve().parents[1]

SHAPES = ROOT / "models" / "shapes"
RESNET_FILE = '''"""ResNet-50 for the stock TorchServe handler (one nn.Module class per model file)."""
from torchvision.models.resnet import Bottleneck, ResNet


class ResNet50(ResNet):
    """torchvision's ResNet-50 layout, 1000 classes."""

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
'''


@dataclass
class Result:
    model: str
    mode: str
    n: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def rps(self) -> float:
        return self.n / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000.0


def build_store(home: Path, batch: int, delay: int, shapes: Path = SHAPES) -> None:
    import torchvision

    shapes_cfg = yaml.safe_load((shapes / "model-config.yaml").read_text())
    shapes_cfg.update(batchSize=batch, maxBatchDelay=delay, minWorkers=1, maxWorkers=1)
    handler = str(ROOT / "handler" / "gradcam_handler.py")
    archive(home / "store", "shapes", handler, shapes / "weights.pt", shapes_cfg, shapes / "model.py",
            [shapes / "index_to_name.json"])
    torch.manual_seed(0)
    weights = home / "resnet50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    r50_cfg = {"batchSize": batch, "maxBatchDelay": delay, "minWorkers": 1, "maxWorkers": 1,
               "handler": {"arch": "torchvision.models.resnet50", "num_classes": 1000,
                           "weights": "resnet50.pt", "target_layer": "layer4", "input_size": 224,
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                           "topk": 5, "outputs": ["heatmap", "bbox"]}}
    archive(home / "store", "resnet50", handler, weights, r50_cfg)
    (home / "resnet50_model.py").write_text(RESNET_FILE)
    archive(home / "store", "resnet50_stock", "image_classifier", weights,
            {"batchSize": 1, "maxBatchDelay": delay, "minWorkers": 1, "maxWorkers": 1},
            home / "resnet50_model.py")


def synthetic_jpegs(n: int, size: tuple[int, int]) -> list[bytes]:
    """JPEGs with a bright disc on dark noise (W, H) = ``size``."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        arr = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        cx, cy = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4)
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < (min(w, h) // 6) ** 2] = (230, 200 - 20 * (i % 8), 40)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run_load(ts: LocalTorchServe, model: str, route: str, images: list[bytes], total: int,
             clients: int) -> Result:
    """``clients`` threads send ``total`` requests in all (bounded), each waiting for its answer."""
    headers = {"Authorization": f"Bearer {ts.token}"}

    def send(sess: requests.Session, i: int) -> bool:
        r = sess.post(f"{ts.url}/{route}/{model}", data=images[i % len(images)], headers=headers,
                      timeout=600)
        return r.status_code == 200

    seconds, lat, errors = closed_loop(total, clients, send, requests.Session)
    return Result(model, route, total, seconds, lat, errors)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=160, help="requests per mode, shapes")
    ap.add_argument("--r50-requests", type=int, default=48, help="requests per mode, ResNet-50")
    ap.add_argument("--stock-requests", type=int, default=8, help="requests, stock Captum explain")
    ap.add_argument("--batch", type=int, default=8, help="batchSize of the camserve models")
    ap.add_argument("--delay", type=int, default=20, help="maxBatchDelay (ms)")
    ap.add_argument("--shapes-dir", type=Path, default=SHAPES, help="the default model's folder")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        print("error: Java not found: TorchServe needs Java 17+", file=sys.stderr)
        return 2
    home = Path(tempfile.mkdtemp(prefix="camserve_bench_serve_"))
    results: list[Result] = []
    try:
        build_store(home, args.batch, args.delay, args.shapes_dir)
        shapes_imgs = [p.read_bytes() for p in sorted((args.shapes_dir / "samples").glob("*.png"))]
        if not shapes_imgs:
            shapes_imgs = synthetic_jpegs(8, (96, 96))
        photo_imgs = synthetic_jpegs(16, (640, 480))
        with LocalTorchServe(home, ["shapes", "resnet50", "resnet50_stock"],
                             properties={"max_request_size": 52428800,
                                         "max_response_size": 104857600}) as ts:
            plan = [("shapes", "predictions", shapes_imgs, args.requests),
                    ("shapes", "explanations", shapes_imgs, args.requests),
                    ("resnet50", "predictions", photo_imgs, args.r50_requests),
                    ("resnet50", "explanations", photo_imgs, args.r50_requests),
                    ("resnet50_stock", "predictions", photo_imgs, args.r50_requests),
                    ("resnet50_stock", "explanations", photo_imgs, args.stock_requests)]
            for model, route, imgs, n in plan:
                warm = min(n, args.clients) if model != "resnet50_stock" or route == "predictions" else 1
                run_load(ts, model, route, imgs, warm, min(args.clients, warm))
                res = run_load(ts, model, route, imgs, n, args.clients)
                results.append(res)
                print(f"  {model:<15} {route:<13} {res.n:4d} requests  {res.rps:7.2f} req/s  "
                      f"errors {res.errors}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"kept {home}", file=sys.stderr)
    by = {(r.model, r.mode): r for r in results}
    print(f"\nServing benchmark — {args.clients} concurrent clients, loopback, 1 worker per model, "
          f"batchSize {args.batch} / maxBatchDelay {args.delay} ms (stock: batchSize 1)")
    gpu = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    print(f"machine: {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}; "
          f"Python {platform.python_version()}")
    print("images: shapes samples 96x96 PNG; ResNet-50 synthetic 640x480 JPEG (input 224x224)\n")
    print(f"| {'model':<15} | {'endpoint':<26} | {'requests':>8} | {'req/s':>7} | {'p50 ms':>8} | "
          f"{'p99 ms':>8} | {'errors':>6} |")
    print(f"|{'-' * 17}|{'-' * 28}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    names = {"predictions": "/predictions", "explanations": "/explanations"}
    for r in results:
        label = names[r.mode] + (" (Captum IG)" if r.model == "resnet50_stock" and r.mode == "explanations"
                                 else " (Grad-CAM)" if r.mode == "explanations" else "")
        print(f"| {r.model:<15} | {label:<26} | {r.n:>8} | {r.rps:7.2f} | {r.pct(50):8.1f} | "
              f"{r.pct(99):8.1f} | {r.errors:>6} |")
    print()
    for model in ("shapes", "resnet50"):
        p, e = by[(model, "predictions")], by[(model, "explanations")]
        ok = "meets" if e.rps / p.rps >= 0.85 else "below"
        print(f"{model}: explain / predict throughput = {e.rps / p.rps:.2f}x ({ok} the 0.85x goal)")
    e, s = by[("resnet50", "explanations")], by[("resnet50_stock", "explanations")]
    ok = "meets" if e.rps / s.rps >= 20 else "below"
    print(f"resnet50: camserve Grad-CAM explain vs stock image_classifier Captum explain = "
          f"{e.rps / s.rps:.1f}x faster (req/s; {ok} the 20x goal), p50 {s.pct(50) / e.pct(50):.1f}x lower")
    errors = sum(r.errors for r in results)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
