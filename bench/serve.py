"""Serving benchmark: predict and explain through a real server on each backend, side by side.

Starts its own TorchServe (a temporary directory, free loopback ports, token auth on; each model
archived as ``make archive`` does, :func:`scripts.archive.build_archive`) — or, with ``--server
kserve``, one camserve KServe predictor per model and backend (``camserve-kserve``, KServe v1
bodies) — one worker per model, the same batching for all (``--batch`` rows, ``--delay`` ms):

* ``resnet50``: torchvision ResNet-50 (random weights, BatchNorm calibrated), 224×224 input,
  target ``layer4``, 640×480 synthetic JPEGs (heatmap + bbox back at 640×480);
* ``shapes``: the default model (models/shapes) on its 96×96 samples;

each on three backends: ``torch0`` — the PyTorch backend as it was before the serving copy
(``handler.optimize: false``, today's baseline), ``torch`` (the faster copy) and ``onnxruntime``
(the exported CAM graph; ``--backends`` chooses which of the last two run, the baseline always
does). The same client (:func:`camserve.testing.load.closed_loop`, ``--clients`` threads) sends
``--requests`` requests per mode; rounds alternate the order of the models and backends, and the
table gives the median req/s of the rounds and p50/p99 latency over all of them; each ratio is
the median (and range) of the ratios within a round, both sides measured back to back. After each
round the bare CAM-graph session (the worker's thread count) runs the same batches of
preprocessed images, for the serving ÷ bare ratio.

``--stock`` adds the stock TorchServe ``image_classifier`` handler on the same ResNet-50, whose
``/explanations`` runs Captum IntegratedGradients (batch size 1), against camserve's explain.

    python -m bench.serve                  # make bench-serve [BACKEND=torch|onnxruntime]
    python -m bench.serve --rounds 5 --r50-requests 64 --models resnet50
    python -m bench.serve --server kserve  # the same on the KServe predictor
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import requests
import torch
import yaml
from PIL import Image

from camserve.backends import GRAPH_FILE
from camserve.onnx.session import available_cpus
from camserve.testing.load import closed_loop
from camserve.testing.nets import write_model_folder
from camserve.testing.torchserve import LocalTorchServe, archive
from scripts.archive import build_archive, export_graph, plan_archive, stale_graph

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "models" / "shapes"
MODES = ("predictions", "explanations")
#: backend label -> (handler.backend, handler.optimize)
BACKENDS = {"torch0": ("torch", False), "torch": ("torch", True),
            "onnxruntime": ("onnxruntime", True)}
RESNET_FILE = '''"""ResNet-50 for the stock TorchServe handler (one nn.Module class per model file)."""
from torchvision.models.resnet import Bottleneck, ResNet


class ResNet50(ResNet):
    """torchvision's ResNet-50 layout, 1000 classes."""

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
'''


@dataclass
class Series:
    """One (model, backend, mode): req/s per round and every latency (s)."""

    rps: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.rps) if self.rps else float("nan")

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000.0 if self.latencies else float("nan")


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


def resnet50_folder(home: Path) -> Path:
    import torchvision

    from camserve.models import recalibrate_batchnorm

    torch.manual_seed(0)
    net = recalibrate_batchnorm(torchvision.models.resnet50().eval(), (224, 224))
    return write_model_folder(home / "resnet50", net, {
        "arch": "torchvision.models.resnet50", "num_classes": 1000, "weights": "weights.pt",
        "target_layer": "layer4", "input_size": 224, "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225], "topk": 5, "outputs": ["heatmap", "bbox"]})


def shapes_folder(home: Path, shapes: Path) -> Path:
    folder = home / "shapes"
    shutil.copytree(shapes, folder, ignore=shutil.ignore_patterns("samples", GRAPH_FILE))
    return folder


def build_store(home: Path, folders: dict[str, Path], backends: list[str], batch: int,
                delay: int) -> list[str]:
    """One archive per (model, backend): ``<model>_<backend>``; returns their names."""
    names = []
    for model, folder in folders.items():
        doc = yaml.safe_load((folder / "model-config.yaml").read_text())
        for label in backends:
            kind, optimize = BACKENDS[label]
            doc.update(batchSize=batch, maxBatchDelay=delay, minWorkers=1, maxWorkers=1)
            doc["handler"].update(backend=kind, optimize=optimize)
            (folder / "model-config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
            name = f"{model}_{label}"
            build_archive(folder, name, home / "store")
            names.append(name)
    return names


def stock_archive(home: Path, folder: Path, delay: int) -> str:
    (home / "resnet50_model.py").write_text(RESNET_FILE)
    archive(home / "store", "resnet50_stock", "image_classifier", folder / "weights.pt",
            {"batchSize": 1, "maxBatchDelay": delay, "minWorkers": 1, "maxWorkers": 1},
            home / "resnet50_model.py")
    return "resnet50_stock"


def run_load(url: str, kind: str, images: list[bytes], total: int, clients: int,
             headers: dict[str, str]) -> tuple[float, list[float], int]:
    """``clients`` threads send ``total`` requests to ``url`` in all, TorchServe's raw body or
    KServe's v1 body (``kind``); (seconds, latencies, errors)."""
    bodies = [{"instances": [{"data": base64.b64encode(i).decode()}]} for i in images]

    def send(sess: requests.Session, i: int) -> bool:
        if kind == "kserve":
            r = sess.post(url, json=bodies[i % len(bodies)], headers=headers, timeout=600)
            return r.status_code == 200 and '"code"' not in r.text
        r = sess.post(url, data=images[i % len(images)], headers=headers, timeout=600)
        return r.status_code == 200

    return closed_loop(total, clients, send, requests.Session)


def contender_folder(home: Path, folder: Path, name: str, backend: str, batch: int,
                     delay: int) -> Path:
    """A folder serving ``folder``'s model on ``backend`` (:data:`BACKENDS` label): its files
    linked, its config rewritten."""
    kind, optimize = BACKENDS[backend]
    out = home / "kserve" / name
    out.mkdir(parents=True)
    for f in folder.iterdir():
        if f.name != "model-config.yaml":
            (out / f.name).symlink_to(f.resolve())
    doc = yaml.safe_load((folder / "model-config.yaml").read_text())
    doc.update(batchSize=batch, maxBatchDelay=delay)
    doc["handler"].update(backend=kind, optimize=optimize)
    (out / "model-config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


class Servers:
    """The servers of a run: TorchServe with one archive per (model, backend), or one KServe
    predictor each; :meth:`url` and :attr:`headers` for a request."""

    def __init__(self, kind: str, home: Path, folders: dict[str, Path], backends: list[str],
                 args: argparse.Namespace) -> None:
        self.kind = kind
        self.stack = contextlib.ExitStack()
        self.headers: dict[str, str] = {}
        self.urls: dict[str, str] = {}
        if kind == "torchserve":
            names = build_store(home, folders, backends, args.batch, args.delay)
            if args.stock and "resnet50" in folders:
                names.append(stock_archive(home, folders["resnet50"], args.delay))
            ts = self.stack.enter_context(LocalTorchServe(
                home, names, properties={"max_request_size": 52428800,
                                         "max_response_size": 104857600}))
            self.headers = {"Authorization": f"Bearer {ts.token}"}
            self.urls = {n: ts.url for n in names}
            return
        from camserve.testing.kserve import LocalPredictor

        if "onnxruntime" in backends:
            for folder in folders.values():  # the graph, as make archive would export it
                if stale_graph(plan_archive(folder, "onnxruntime")):
                    export_graph(folder)
        for m, folder in folders.items():
            for b in backends:
                name = f"{m}_{b}"
                served = contender_folder(home, folder, name, b, args.batch, args.delay)
                pred = self.stack.enter_context(LocalPredictor(
                    served, name, log_path=home / f"{name}.log", ready_timeout=600,
                    args=["--grpc-port", "0", "--max-batch-size", str(args.batch),
                          "--max-batch-delay", str(args.delay)], env={"CAMSERVE_DEVICE": "cpu"}))
                self.urls[name] = pred.url

    def url(self, name: str, route: str) -> str:
        if self.kind == "kserve":
            verb = "explain" if route == "explanations" else "predict"
            return f"{self.urls[name]}/v1/models/{name}:{verb}"
        return f"{self.urls[name]}/{route}/{name}"

    def close(self) -> None:
        self.stack.close()


class Bare:
    """The CAM graph's session alone (the worker's threads) on batches of preprocessed images."""

    def __init__(self, graph: Path, images: list[bytes], batch: int, threads: int) -> None:
        from camserve.backends.ort import OnnxBackend
        from camserve.images import decode_image, preprocess

        self.backend = OnnxBackend(graph, threads=threads)
        spec = self.backend.spec
        x = torch.stack([preprocess(decode_image(d), spec.input_size, spec.mean, spec.std,
                                    interpolation=spec.interpolation) for d in images])
        self.batches = [x[i:i + batch].numpy() for i in range(0, len(x), batch)]
        self.batches = [b for b in self.batches if len(b) == batch] or self.batches[:1]

    def rate(self, what: str, runs: int = 3) -> float:
        """Images/s of ``what`` (``explanations``: logits + cam; ``predictions``: the forward
        graph), the median of ``runs`` passes over the batches."""
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            for b in self.batches:
                if what == "explanations":
                    self.backend.cam_session.run(["logits", "cam"], {
                        "input": b, "target": -np.ones(len(b), np.int64)})
                else:
                    self.backend.forward_session.run(["logits"], {"input": b})
            rates.append(sum(len(b) for b in self.batches) / (time.perf_counter() - t0))
        return statistics.median(rates)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="torch,onnxruntime",
                    help="comma list of torch, onnxruntime (the torch0 baseline always runs)")
    ap.add_argument("--models", default="resnet50,shapes", help="comma list of resnet50, shapes")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=160, help="requests per mode, shapes")
    ap.add_argument("--r50-requests", type=int, default=48, help="requests per mode, ResNet-50")
    ap.add_argument("--batch", type=int, default=8, help="batchSize")
    ap.add_argument("--delay", type=int, default=20, help="maxBatchDelay (ms)")
    ap.add_argument("--server", choices=("torchserve", "kserve"), default="torchserve")
    ap.add_argument("--stock", action="store_true",
                    help="TorchServe: also the stock image_classifier handler's Captum explain "
                         "(slow)")
    ap.add_argument("--stock-requests", type=int, default=8)
    ap.add_argument("--shapes-dir", type=Path, default=SHAPES, help="the default model's folder")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not set(chosen) <= {"torch", "onnxruntime"} or not set(models) <= {"resnet50", "shapes"}:
        print("error: --backends takes torch, onnxruntime; --models resnet50, shapes",
              file=sys.stderr)
        return 2
    backends = ["torch0"] + [b for b in ("torch", "onnxruntime") if b in chosen]
    if args.server == "torchserve" and shutil.which("java") is None \
            and not os.environ.get("JAVA_HOME"):
        print("error: Java not found: TorchServe needs Java 17+", file=sys.stderr)
        return 2
    home = Path(tempfile.mkdtemp(prefix="camserve_bench_serve_"))
    threads = available_cpus()  # one worker per model, one model busy at a time
    series: dict[tuple[str, str, str], Series] = {}
    bare: dict[tuple[str, str], list[float]] = {}
    try:
        folders = {}
        if "resnet50" in models:
            folders["resnet50"] = resnet50_folder(home)
        if "shapes" in models:
            folders["shapes"] = shapes_folder(home, args.shapes_dir)
        images = {"resnet50": synthetic_jpegs(16, (640, 480)),
                  "shapes": [p.read_bytes() for p in sorted((args.shapes_dir / "samples")
                                                             .glob("*.png"))]}
        total = {"resnet50": args.r50_requests, "shapes": args.requests}
        servers = Servers(args.server, home, folders, backends, args)
        try:
            bares = {m: Bare(folders[m] / GRAPH_FILE, images[m] * 2, args.batch, threads)
                     for m in folders if "onnxruntime" in backends}

            def load(name: str, route: str, m: str, n: int) -> tuple[float, list[float], int]:
                return run_load(servers.url(name, route), args.server, images[m], n,
                                args.clients, servers.headers)

            plan = [(m, b) for m in folders for b in backends]
            for m, b in plan:  # warm-up: every worker, both modes
                for route in MODES:
                    load(f"{m}_{b}", route, m, args.clients)
            for r in range(args.rounds):
                order = plan[r % len(plan):] + plan[:r % len(plan)]
                for m, b in order:
                    for route in (MODES if r % 2 == 0 else MODES[::-1]):
                        sec, lat, err = load(f"{m}_{b}", route, m, total[m])
                        s = series.setdefault((m, b, route), Series())
                        s.rps.append(total[m] / sec)
                        s.latencies += lat
                        s.errors += err
                        print(f"  round {r + 1} {m:<9} {b:<12} {route:<13} {total[m] / sec:7.2f} "
                              f"req/s errors {err}", file=sys.stderr)
                for m, bs in bares.items():
                    for route in MODES:
                        bare.setdefault((m, route), []).append(bs.rate(route))
            if "resnet50_stock" in servers.urls:
                for route, n in (("predictions", args.r50_requests),
                                 ("explanations", args.stock_requests)):
                    load("resnet50_stock", route, "resnet50", 1)
                    sec, lat, err = load("resnet50_stock", route, "resnet50", n)
                    series[("resnet50", "stock", route)] = Series([n / sec], lat, err)
        finally:
            servers.close()
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"kept {home}", file=sys.stderr)
    report(args, series, bare, threads)
    return 1 if any(s.errors for s in series.values()) else 0


def ratio(a: list[float], b: list[float]) -> str:
    """The median of the per-round ratios a/b (measured side by side in each round), and their
    range: the load of a shared machine moves both sides of a round together."""
    r = sorted(x / y for x, y in zip(a, b))
    return f"{statistics.median(r):.2f}" + (f" [{r[0]:.2f}..{r[-1]:.2f}]" if len(r) > 1 else "")


def report(args: argparse.Namespace, series: dict[tuple[str, str, str], Series],
           bare: dict[tuple[str, str], list[float]], threads: int) -> None:
    gpu = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    server = "TorchServe" if args.server == "torchserve" else "camserve KServe predictor"
    print(f"\nServing benchmark — {server}, {args.clients} concurrent clients, loopback, 1 worker "
          f"per model ({threads} threads), batchSize {args.batch} / maxBatchDelay {args.delay} ms, "
          f"{args.rounds} alternating rounds (req/s: median of the rounds; p50/p99: all requests)")
    print(f"machine: {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}; Python "
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    print("images: ResNet-50 synthetic 640x480 JPEG (input 224x224); shapes samples 96x96 PNG\n")
    print(f"| {'model':<9} | {'backend':<12} | {'endpoint':<14} | {'req/s':>7} | {'p50 ms':>8} | "
          f"{'p99 ms':>8} | {'errors':>6} |")
    print(f"|{'-' * 11}|{'-' * 14}|{'-' * 16}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    for (m, b, route), s in series.items():
        print(f"| {m:<9} | {b:<12} | /{route:<13} | {s.median:7.2f} | {s.pct(50):8.1f} | "
              f"{s.pct(99):8.1f} | {s.errors:>6} |")
    print()
    models = dict.fromkeys(m for m, _, _ in series)
    for m in models:
        base = series.get((m, "torch0", "explanations"))
        for b in ("torch0", "torch", "onnxruntime"):
            e, p = series.get((m, b, "explanations")), series.get((m, b, "predictions"))
            if e is None or p is None:
                continue
            line = f"{m} {b}: explain / predict = {ratio(e.rps, p.rps)} (goal >= 0.9)"
            if b != "torch0" and base is not None:
                line += f"; explain vs torch0 = {ratio(e.rps, base.rps)}x"
                if b == "onnxruntime" and m == "resnet50":
                    line += " (goal >= 1.8)"
            if b == "onnxruntime" and (m, "explanations") in bare:
                bare_ips = bare[(m, "explanations")]
                line += (f"; explain vs the bare CAM-graph session "
                         f"({statistics.median(bare_ips):.1f} images/s) = "
                         f"{ratio(e.rps, bare_ips)} (goal >= 0.9)")
            print(line)
        stock = series.get((m, "stock", "explanations"))
        if stock is not None and base is not None:
            best = max(series[(m, b, "explanations")].median for b in ("torch0", "torch",
                                                                       "onnxruntime")
                       if (m, b, "explanations") in series)
            print(f"{m}: camserve Grad-CAM explain vs the stock handler's Captum explain = "
                  f"{best / stock.median:.1f}x req/s")


if __name__ == "__main__":
    sys.exit(main())
