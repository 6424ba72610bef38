"""Ray benchmark: the same folder through the local batch job and through ``--ray local`` on this
machine (one node), images/s side by side and the ratio Ray / local.

Writes ``--images`` photo-like JPEGs (400-640 px), exports the default model's CAM graph (or takes
``--model``), then runs ``--rounds`` rounds; each round runs, in turn:

* local job     — ``camserve.onnx.batch.run_job`` in this process (session threads = all CPUs);
* Ray, warm     — ``camserve.onnx.ray.run_ray_job`` on a private local Ray started once by this
                  script (the cost of a job on a running cluster: dataset, actor pool start-up,
                  one onnxruntime session per actor, the streaming pipeline);
* Ray, cold     — ``python -m export.batch_cam ... --ray local`` as a user runs it: a new process
                  that starts and stops its own Ray (wall time of the command);
* one actor     — from the warm runs: images per second of actor time (each batch's time inside
                  the actor: decode, session, heatmaps, files) — the per-actor rate that the
                  steady state of a pool of N actors multiplies, without the per-job start-up.

Every run writes heatmap PNGs and results.jsonl to a fresh folder. The table gives medians over the
rounds. Usage::

    python bench/ray.py [--images 200] [--rounds 3] [--batch-size 32] [--model GRAPH.onnx]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the private Ray on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from camserve.onnx.batch import run_job  # noqa: E402  (after the env)
from camserve.onnx.job import JobConfig  # noqa: E402
from camserve.onnx.ray import RayOptions, connect, disconnect, run_ray_job  # noqa: E402
from camserve.onnx.session import available_cpus  # noqa: E402
from camserve.testing.photos import write_photos  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", type=Path, help="a CAM graph (default: export models/shapes)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="camserve-bench-ray-"))
    try:
        _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> None:
    photos = work / "photos"
    write_photos(photos, args.images)
    graph = args.model
    if graph is None:
        graph = work / "shapes.cam.onnx"
        subprocess.run([sys.executable, "-m", "export.onnx_export", str(ROOT / "models/shapes"),
                        "--out", str(graph)], cwd=ROOT, check=True, capture_output=True)
    cpus = available_cpus()
    t0 = time.perf_counter()
    connect("local")  # the warm runs reuse it; the cold runs start their own
    print(f"{args.images} JPEGs, graph {graph.name}, batch {args.batch_size}, {cpus} CPUs; "
          f"private Ray started in {time.perf_counter() - t0:.1f}s")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rates: dict[str, list[float]] = {"local job": [], "Ray, warm": [], "Ray, cold": [],
                                     "one actor": []}
    first: list[float] = []
    try:
        for r in range(args.rounds):
            cfg = JobConfig(model=graph, inputs=[str(photos)], out=work / f"local{r}",
                            batch_size=args.batch_size, progress=False)
            st = run_job(cfg)
            rates["local job"].append(st.ok / st.seconds)
            cfg.out = work / f"warm{r}"
            times: dict[str, float] = {}
            st = run_ray_job(cfg, RayOptions("local"), timings=times)  # reuses this process's Ray
            rates["Ray, warm"].append(st.ok / st.seconds)
            rates["one actor"].append(st.ok / times["actor_seconds"])
            first.append(times["first"])
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "export.batch_cam", "--model", str(graph),
                                  str(photos), "--out", str(work / f"cold{r}"), "--batch-size",
                                  str(args.batch_size), "--ray", "local"],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            m = re.match(r"(\d+) images explained", res.stdout)
            if res.returncode != 0 or not m:
                raise RuntimeError(f"--ray local failed: {res.stderr[-1000:]}")
            rates["Ray, cold"].append(int(m.group(1)) / wall)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
                  + " images/s", flush=True)
    finally:
        disconnect()
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["local job"]
    print(f"\n| {'run':14} | images/s (median of {args.rounds}) | ratio / local job |")
    print(f"|{'-' * 16}|{'-' * 29}|-------------------|")
    for k, v in med.items():
        print(f"| {k:14} | {v:27.1f} | {v / base:17.3f} |")
    actors = cpus  # the default pool on this node: one 1-CPU actor per CPU
    print(f"\nRay, warm: first results after {statistics.median(first):.1f}s (median: dataset, "
          f"actor start-up, first batch). One actor: images per second of actor time (decode, "
          f"session, heatmaps, files), 1 CPU; x {actors} actors = {med['one actor'] * actors:.1f} "
          f"images/s once the pool runs")
    print(f"Ray 1-node / local job = {med['Ray, warm'] / base:.3f} (warm: a job on a running Ray), "
          f"{med['Ray, cold'] / base:.3f} (cold: --ray local, with Ray's start and stop), "
          f"{med['one actor'] * actors / base:.3f} (steady state, {actors} actors x one actor's "
          f"rate)")


if __name__ == "__main__":
    main()
