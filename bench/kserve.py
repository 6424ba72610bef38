"""Explain throughput on KServe's wire format: camserve's native KServe predictor vs the TorchServe
handler, the same client, the same machine, side by side.

Starts both servers on free loopback ports (models/shapes, one model worker each, the same
batching: up to ``--batch`` rows gathered for ``--delay`` ms), then runs ``--rounds`` rounds; in
each round both servers get ``--requests`` explain requests from ``--clients`` concurrent clients
(order alternates between rounds). Both servers run with the same
``OMP_NUM_THREADS`` (``--threads``, default 1: on a busy machine torch's default thread pool in
TorchServe's worker, beside its Java frontend, collapses under oversubscription). Every request is the same KServe v1 body
``POST /v1/models/shapes:explain`` ``{"instances": [{"data": "<base64 PNG>"}]}`` — the route
both servers offer. Prints req/s and p50/p99 latency (medians over rounds) and the ratio.

    python bench/kserve.py                 # make bench-kserve
    python bench/kserve.py --rounds 5 --requests 120
"""
from __future__ import annotations

import argparse
import base64
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import requests
import torch
import yaml

from camserve.testing.kserve import LocalPredictor
from camserve.testing.load import closed_loop
from camserve.testing.torchserve import LocalTorchServe, archive

ROOT = Path(__file__).resolve().parents[1]

SHAPES = ROOT / "models" / "shapes"


def load(url: str, bodies: list[dict], total: int, clients: int,
         headers: dict[str, str]) -> tuple[float, list[float], int]:
    """``clients`` threads send ``total`` explain requests; (seconds, latencies, errors)."""
    def send(sess: requests.Session, i: int) -> bool:
        r = sess.post(url, json=bodies[i % len(bodies)], headers=headers, timeout=600)
        return r.status_code == 200 and "explanations" in r.text

    return closed_loop(total, clients, send, requests.Session)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=80, help="explain requests per server per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="rows per model call (both servers)")
    ap.add_argument("--delay", type=int, default=10, help="batching delay in ms (both servers)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of both servers (0: leave unset, torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:  # both child servers inherit it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        print("error: Java not found: TorchServe needs Java 17+", file=sys.stderr)
        return 2
    images = [p.read_bytes() for p in sorted((SHAPES / "samples").glob("*.png"))]
    bodies = [{"instances": [{"data": base64.b64encode(i).decode()}]} for i in images]
    home = Path(tempfile.mkdtemp(prefix="camserve_bench_kserve_"))
    rows: dict[str, list[tuple[float, float, float]]] = {"native": [], "torchserve": []}
    errors = {"native": 0, "torchserve": 0}
    try:
        cfg = yaml.safe_load((SHAPES / "model-config.yaml").read_text())
        cfg.update(batchSize=args.batch, maxBatchDelay=args.delay, minWorkers=1, maxWorkers=1)
        archive(home / "store", "shapes", str(ROOT / "handler" / "gradcam_handler.py"),
                SHAPES / "weights.pt", cfg, SHAPES / "model.py", [SHAPES / "index_to_name.json"])
        with LocalTorchServe(home, ["shapes"]) as ts, \
                LocalPredictor(SHAPES, "shapes", log_path=home / "kserve.log",
                               args=["--grpc-port", "0", "--max-batch-size", str(args.batch),
                                     "--max-batch-delay", str(args.delay)],
                               env={"CAMSERVE_DEVICE": "cpu" if not torch.cuda.is_available()
                                    else "cuda"}) as ks:
            targets = {
                "native": (f"{ks.url}/v1/models/shapes:explain", {}),
                "torchserve": (f"{ts.url}/v1/models/shapes:explain",
                               {"Authorization": f"Bearer {ts.token}"}),
            }
            for name, (url, hdr) in targets.items():  # warm-up
                load(url, bodies, args.clients, args.clients, hdr)
            for rnd in range(args.rounds):
                order = list(targets) if rnd % 2 == 0 else list(reversed(list(targets)))
                for name in order:
                    url, hdr = targets[name]
                    secs, lat, err = load(url, bodies, args.requests, args.clients, hdr)
                    rows[name].append((args.requests / secs, float(np.percentile(lat, 50)) * 1e3,
                                       float(np.percentile(lat, 99)) * 1e3))
                    errors[name] += err
                    print(f"  round {rnd + 1} {name:<10} {args.requests / secs:7.2f} req/s "
                          f"errors {err}", file=sys.stderr)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in rows.items()}
    gpu = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    print(f"\nExplain throughput, KServe v1 body on both servers — {args.clients} concurrent "
          f"clients, loopback, one model worker each, batch {args.batch} / delay {args.delay} ms, "
          f"{args.rounds} rounds x {args.requests} requests (medians), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"machine: {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}; "
          f"Python {platform.python_version()}; images: shapes samples 96x96 PNG\n")
    print(f"| {'server':<34} | {'req/s':>7} | {'p50 ms':>8} | {'p99 ms':>8} | {'errors':>6} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    label = {"native": "camserve.kserve (KServe 0.21.0)", "torchserve": "TorchServe 0.12.0 + handler"}
    for k in ("native", "torchserve"):
        rps, p50, p99 = med[k]
        print(f"| {label[k]:<34} | {rps:7.2f} | {p50:8.1f} | {p99:8.1f} | {errors[k]:>6} |")
    print(f"\nnative / TorchServe throughput: {med['native'][0] / med['torchserve'][0]:.2f}x")
    return 0 if not any(errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
