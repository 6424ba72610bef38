"""What makes the PyTorch backend faster, step by step, against onnxruntime on the same batches.

ResNet-50 (random weights, BatchNorm calibrated), batch ``--batch`` at 224×224, CPU, ``--threads``
intra-op threads for torch and onnxruntime alike. Each round times every contender once in a
rotating order (after a pause, so no contender pays for another's spinning threads); the table
gives medians over the rounds as images/s and, for each ratio (to the model as loaded, to
onnxruntime), the median of the ratios within a round:

explain (Grad-CAM at layer4, maps included):

* engine, as loaded            — :class:`camserve.CamEngine` on the model as the loader gives it;
* + channels-last              — the same with channels-last weights;
* + BatchNorm folded           — BatchNorm folded into the convolutions (NCHW);
* TorchBackend (both)          — :class:`camserve.backends.TorchBackend`: both steps;
* onnxruntime CAM graph        — :class:`camserve.backends.ort.OnnxBackend`'s CAM session;

predict (logits only):

* model as loaded under ``torch.no_grad`` (what inference mode is measured against) and under
  ``torch.inference_mode`` / TorchBackend's copy / onnxruntime forward graph;
* ``torch.compile`` of the copy (``--compile``; inductor with freezing), with its compile time.

    python -m bench.backends [--batch 8] [--rounds 7] [--threads N] [--compile]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

from camserve import CamEngine
from camserve.backends import TorchBackend
from camserve.backends.ort import OnnxBackend
from camserve.backends.pytorch import fold_batchnorm
from camserve.models import ModelSpec, from_module, recalibrate_batchnorm
from camserve.onnx.export import export_cam_onnx
from camserve.onnx.session import available_cpus

SETTLE_S = 0.3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: every CPU)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (predict)")
    args = ap.parse_args()
    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = recalibrate_batchnorm(torchvision.models.resnet50(weights=None).eval(), (224, 224))
    for p in model.parameters():
        p.requires_grad_(False)
    spec = ModelSpec.from_config({"arch": "torchvision.models.resnet50", "target_layer": "layer4",
                                  "input_size": 224})
    loaded = from_module(model, spec)
    work = Path(tempfile.mkdtemp(prefix="camserve-bench-backends-"))
    export_cam_onnx(loaded, work / "model.cam.onnx", verify=False)
    ort = OnnxBackend(work / "model.cam.onnx", threads=threads)
    backend = TorchBackend(loaded)
    x = torch.rand(args.batch, 3, 224, 224)
    xn = x.numpy()
    target = -torch.ones(args.batch, dtype=torch.long).numpy()

    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, x[:1], keep=("layer4",))
    engines = {"engine, as loaded": CamEngine(model, "layer4"),
               "+ channels-last": CamEngine(cl, "layer4"),
               "+ BatchNorm folded": CamEngine(folded, "layer4"),
               "TorchBackend (both)": backend.engine}

    def explain(engine: CamEngine) -> Callable[[], None]:
        return lambda: engine(x, method="gradcam").heatmaps_uint8((224, 224))

    def predict(m: torch.nn.Module, mode: Callable[[], object] = torch.inference_mode
                ) -> Callable[[], None]:
        def run() -> None:
            with mode():  # type: ignore[attr-defined]
                m(x)
        return run

    contenders: dict[str, Callable[[], None]] = {f"explain: {k}": explain(e)
                                                 for k, e in engines.items()}
    contenders["explain: onnxruntime CAM graph"] = lambda: ort.cam_session.run(
        ["logits", "cam"], {"input": xn, "target": target})
    contenders["predict: model as loaded, no_grad"] = predict(model, torch.no_grad)
    contenders["predict: model as loaded"] = predict(model)
    contenders["predict: TorchBackend's copy"] = predict(backend.model)
    contenders["predict: onnxruntime forward graph"] = lambda: ort.forward_session.run(
        ["logits"], {"input": xn})
    compile_s = None
    if args.compile:
        import torch._inductor.config as inductor

        inductor.freezing = True
        t0 = time.perf_counter()
        compiled = torch.compile(copy.deepcopy(backend.model))
        predict(compiled)()
        compile_s = time.perf_counter() - t0
        contenders["predict: torch.compile of the copy"] = predict(compiled)

    names = list(contenders)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            time.sleep(SETTLE_S)
            t = time.perf_counter()
            contenders[name]()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}

    def ratio(k: str, base: str) -> float:
        """Median over the rounds of the speed ratio k / base within each round."""
        return statistics.median(b / t for t, b in zip(times[k], times[base]))

    print(f"\nResNet-50, batch {args.batch}, 224x224, CPU, {threads} threads, median of "
          f"{args.rounds} rounds after {args.warmup} warm-up; ratios: medians of the ratios "
          f"within a round (TorchBackend: {', '.join(backend.optimizations)})")
    print(f"| {'contender':42} | images/s | x as loaded | x onnxruntime |")
    print(f"|{'-' * 44}|----------|-------------|---------------|")
    for k in names:
        explain_row = k.startswith("explain")
        base = "explain: engine, as loaded" if explain_row else "predict: model as loaded, no_grad"
        ort = "explain: onnxruntime CAM graph" if explain_row else \
            "predict: onnxruntime forward graph"
        print(f"| {k:42} | {ips[k]:8.1f} | {ratio(k, base):11.2f} | {ratio(k, ort):13.2f} |")
    if compile_s is not None:
        print(f"torch.compile: {compile_s:.1f} s to compile (at every worker start)")


if __name__ == "__main__":
    main()
