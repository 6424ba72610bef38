"""Handler-level batch path: explain vs predict, timed inside one process (no TorchServe server).

The TorchServe handler is loaded as a worker loads it (:mod:`camserve.testing.handler`) and runs
over a fake TorchServe context (:mod:`camserve.testing.context`: per-row request headers, status
and content type), exactly as a worker would call it: decode, preprocess, one forward, CAM, maps to
uint8 on the device, one device-to-host copy, PNG encoding. Each batch is either all predict-only
rows or all explain rows; the ratio is explain throughput / predict throughput. From the
repository root::

    python -m bench.gpu_handler --device cuda            # a GPU worker (gpu_id 0)
    python -m bench.gpu_handler --device cpu --model resnet50 --batches 5

Models: ``shapes`` (models/shapes) or ``resnet50`` (torchvision, random weights, 224×224).
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from camserve.testing.context import FakeContext
from camserve.testing.handler import load_handler
from camserve.testing.nets import write_model_folder

ROOT = Path(__file__).resolve().parents[1]
HANDLER = ROOT / "handler" / "gradcam_handler.py"


def resnet50_dir(tmp: Path) -> Path:
    """A model folder for torchvision's ResNet-50 with a saved random state_dict."""
    import torchvision

    torch.manual_seed(0)
    return write_model_folder(tmp, torchvision.models.resnet50(), {
        "arch": "torchvision.models.resnet50", "num_classes": 1000, "weights": "weights.pt",
        "target_layer": "layer4", "input_size": 224, "topk": 5, "outputs": ["heatmap", "bbox"]})


def make_context(model_dir: Path, gpu: Optional[int], batch: int) -> FakeContext:
    return FakeContext(model_dir, model_name="bench", batch_size=batch, gpu_id=gpu)


def images(n: int, size: tuple[int, int]) -> list[bytes]:
    """``n`` JPEGs with a bright disc on noise, ``size`` (W, H)."""
    rng = np.random.default_rng(0)
    out = []
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        arr = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        cx, cy, r = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4), min(w, h) // 6
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (230, 200 - 20 * (i % 8), 40)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def time_batches(handler: Any, ctx: FakeContext, batch: list[bytes], explain: bool, n: int,
                 sync: bool) -> list[float]:
    rows = [{"body": b} for b in batch]
    times = []
    for _ in range(n):
        ctx.set_requests([{"explain": "True" if explain else "False"} for _ in rows])
        ctx.metrics.clear()
        t0 = time.perf_counter()
        out = handler.handle(rows, ctx)
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if explain and "explanations" not in json.loads(out[0]):
            raise RuntimeError("the explain batch returned no explanations")
    return times


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model", choices=("shapes", "resnet50"), default="resnet50")
    ap.add_argument("--batch", type=int, default=8, help="rows per batch (TorchServe batchSize)")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per mode")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shapes-dir", type=Path, default=ROOT / "models" / "shapes",
                    help="the default model's folder (for --model shapes)")
    ap.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                    help="size of the synthetic JPEGs (default: 640 480 for resnet50, 96 96 for shapes)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False (use --device cpu)",
              file=sys.stderr)
        return 2
    gpu = 0 if args.device == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="camserve_bench_") as tmp:
        model_dir = args.shapes_dir if args.model == "shapes" else resnet50_dir(Path(tmp))
        default = (96, 96) if args.model == "shapes" else (640, 480)
        size = tuple(args.image_size) if args.image_size else default
        ctx = make_context(model_dir, gpu, args.batch)
        handler = load_handler(HANDLER, ctx).instance
        batch = images(args.batch, size)  # type: ignore[arg-type]
        sync = args.device == "cuda"
        for explain in (False, True):
            time_batches(handler, ctx, batch, explain, args.warmup, sync)
        pred = time_batches(handler, ctx, batch, False, args.batches, sync)
        expl = time_batches(handler, ctx, batch, True, args.batches, sync)
    if args.device == "cuda":
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"handler batch path: {args.model}, batch {args.batch}, images {size[0]}x{size[1]} JPEG, "
          f"device {args.device} [{dev}], torch {torch.__version__}")
    print(f"{'mode':<10} {'ms/batch p50':>13} {'p90':>8} {'images/s':>9}")
    rows = {}
    for name, ts in (("predict", pred), ("explain", expl)):
        p50 = statistics.median(ts) * 1000
        p90 = float(np.percentile(ts, 90)) * 1000
        ips = args.batch / statistics.median(ts)
        rows[name] = ips
        print(f"{name:<10} {p50:13.1f} {p90:8.1f} {ips:9.1f}")
    print(f"explain / predict throughput: {rows['explain'] / rows['predict']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
