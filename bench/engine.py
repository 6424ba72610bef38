"""Engine benchmark: plain inference vs CamEngine Grad-CAM vs pytorch-grad-cam vs Captum.

ResNet-50 (random weights), batch 8, 224x224, all measured side by side in one run: each round
times every contender once in a rotating order, and the table reports medians over the rounds after
warm-up, as ms/image and as ratios to plain inference. Usage::

    python bench/engine.py [--device cpu|cuda] [--batch 8] [--size 224] [--rounds 7] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torchvision

from camserve import CamEngine


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _saved_for_backward_mb(fn: Callable[[], None], params: set[int]) -> float:
    """MB of activation tensors autograd keeps for the backward pass during one call of ``fn``
    (parameters, which are stored anyway, are not counted)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(dev)
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    layer = model.layer4

    engine = CamEngine(model, "layer4")

    def plain() -> None:
        with torch.inference_mode():
            model(x)

    def ours() -> None:
        engine(x, method="gradcam").heatmaps_uint8((args.size, args.size)).cpu()

    from pytorch_grad_cam import GradCAM

    gc = GradCAM(model=model, target_layers=[layer])

    def pgc() -> None:
        gc(input_tensor=x, targets=None)

    from captum.attr import LayerAttribution, LayerGradCam

    lgc = LayerGradCam(model, layer)

    with torch.no_grad():  # given to Captum for free (it cannot pick the top-1 itself)
        targets = model(x).argmax(1)

    def captum() -> None:
        attr = lgc.attribute(x, target=targets, relu_attributions=True)
        LayerAttribution.interpolate(attr, (args.size, args.size), "bilinear").cpu()

    params = {p.data_ptr() for p in model.parameters()}
    contenders: dict[str, Callable[[], None]] = {
        "plain inference (inference_mode)": plain,
        "camserve CamEngine Grad-CAM": ours,
        "pytorch-grad-cam GradCAM": pgc,
        "Captum LayerGradCam": captum,
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _sync(dev)
            t0 = time.perf_counter()
            contenders[name]()
            _sync(dev)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    saved = {k: _saved_for_backward_mb(fn, params) for k, fn in contenders.items()}
    gc.activations_and_grads.release()

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[names[0]]
    ours_t = med[names[1]]
    print(f"ResNet-50, batch {args.batch}, {args.size}x{args.size}, device {dev}, "
          f"threads {torch.get_num_threads()}, median of {args.rounds} rounds")
    print(f"| {'contender':34} | ms/image | x plain | x camserve | saved for backward |")
    print(f"|{'-' * 36}|----------|---------|------------|--------------------|")
    for k in names:
        print(f"| {k:34} | {1000 * med[k] / args.batch:8.2f} | {med[k] / base:7.2f} | "
              f"{med[k] / ours_t:10.2f} | {saved[k]:15.1f} MB |")
    print(f"engine / plain = {ours_t / base:.3f} (goal <= 1.10); "
          f"pytorch-grad-cam / engine = {med[names[2]] / ours_t:.2f} (goal >= 2.5); "
          f"Captum / engine = {med[names[3]] / ours_t:.2f} (goal >= 1.3)")


if __name__ == "__main__":
    main()
