"""Peak memory of the batch job on 24 MP photos: ``python -m bench.batch_memory``.

Writes ``--n`` synthetic 6000x4000 JPEGs (smooth colour fields with a bright block and mild noise,
about photo-sized files) to a temporary folder, exports the default model's CAM graph, then runs
``python -m export.batch_cam`` on the folder in a child process for each configuration and prints
the child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, measured in a fresh
intermediate process per run so runs do not mask each other), its time and images/s.

``--code DIR`` runs the job from another checkout too (for example the code before the byte-bounded
window), side by side with this one. Options: ``--n`` images (default 40), ``--save`` one or more
``--save`` values (default ``heatmap`` = the job's default, and ``heatmap,overlay``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_photos(folder: Path, n: int, size: tuple[int, int] = (4000, 6000)) -> int:
    """``n`` JPEGs of ``size`` (H, W) in ``folder``; returns their total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (w + h) * 255], axis=2)
    base = (base + rng.normal(0, 6, base.shape)).clip(0, 255).astype(np.uint8)
    total = 0
    for i in range(n):
        img = base.copy()
        y0, x0 = (i * 397) % (h // 2), (i * 911) % (w // 2)
        img[y0:y0 + h // 4, x0:x0 + w // 4] = (255, 230 - 3 * i % 200, 40)
        path = folder / f"photo{i:03d}.jpg"
        Image.fromarray(img).save(path, "JPEG", quality=90)
        total += path.stat().st_size
    return total


_MEASURE = """
import resource, subprocess, sys, time, json
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
took = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": p.returncode, "peak": peak, "seconds": took, "out": p.stdout[-300:],
                  "err": p.stderr[-1500:]}))
"""


def run_job(code: Path, graph: Path, photos: Path, out: Path, save: str) -> dict:
    """One job in a fresh process tree; its peak RSS and time."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "export.batch_cam",
           "--model", str(graph), str(photos), "--out", str(out), "--save", save]
    res = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch_memory", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--save", action="append", help="--save value(s) to measure")
    p.add_argument("--code", type=Path, action="append", default=[],
                   help="another checkout to measure side by side (its own camserve)")
    args = p.parse_args(argv)
    saves = args.save or ["heatmap", "heatmap,overlay"]
    with tempfile.TemporaryDirectory(prefix="batch_memory_") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        total = make_photos(tmp_path / "photos", args.n)
        print(f"{args.n} JPEGs of 6000x4000 ({total / 2**20 / args.n:.1f} MiB each) written in "
              f"{time.perf_counter() - t0:.0f}s")
        graph = tmp_path / "shapes.cam.onnx"
        subprocess.run([sys.executable, "-m", "export.onnx_export", str(ROOT / "models" / "shapes"),
                        "--out", str(graph)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       check=True, capture_output=True)
        print(f"{'code':<28} {'--save':<18} {'peak RSS':>10} {'time':>8} {'img/s':>7}  exit")
        for code in [ROOT, *args.code]:
            for save in saves:
                out = tmp_path / f"out-{abs(hash((str(code), save)))}"
                r = run_job(code, graph, tmp_path / "photos", out, save)
                name = "this checkout" if code == ROOT else str(code)
                print(f"{name:<28} {save:<18} {r['peak'] / 2**20:>7.0f} MiB {r['seconds']:>7.1f}s "
                      f"{args.n / r['seconds']:>7.2f}  {r['rc']}", flush=True)
                if r["rc"] not in (0, 3):
                    print(r["err"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
