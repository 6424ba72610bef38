"""Engine benchmark: every CAM method of camserve against its reference implementation, side by side.

ResNet-50 (random weights, BatchNorm calibrated), target layer ``layer4``. Two settings:

* gradient and activation methods at batch ``--batch`` (8), ``--size`` (224): plain inference,
  then camserve and pytorch-grad-cam 1.5.7 per method;
* perturbation methods (thousands of forwards each) at ``--pert-batch`` x ``--pert-size`` (2 x 64 by
  default on a CPU: layer4 is then 2 x 2 with its 2048 channels): ScoreCAM and AblationCAM against
  pytorch-grad-cam, SS-CAM / IS-CAM / SmoothGrad-CAM++ against torchcam 0.5.0 (``--samples``), and
  ScoreCAM's *limit*: the plain batched forwards of all its masked inputs (chunks of ``--chunk``);
  ReciproCAM alone (its reference, OpenVINO XAI, does not install beside numpy 2).

Each round times every contender once, in a rotating order; the table gives the median over the
rounds after warm-up, as images/s and ms/image; the speed ratio (reference time / camserve time: > 1
means camserve is faster) and the ratios to plain inference are taken within each round, then
their median. Usage::

    python -m bench.engine [--device cpu|cuda] [--batch 8] [--size 224] [--rounds 3]
        [--pert-batch 2] [--pert-size 64] [--pert-rounds 1] [--methods gradcam,scorecam,...]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import time
from typing import Callable, Optional

import torch
import torchvision

from camserve import CamEngine
from camserve.methods import as_spec, available_methods
from camserve.testing.nets import calibrate_bn

GRADIENT = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "gradcamelementwise",
            "eigencam", "eigengradcam", "kpcacam", "randomcam", "shapleycam", "finercam")
#: the second setting: thousands of forwards each, or (FullGrad) pytorch-grad-cam's float32 map per
#: channel of every biased layer at the input size (over 40 GB at batch 8, 224 x 224)
PERTURBATION = ("scorecam", "ablationcam", "reciprocam", "sscam", "iscam", "smoothgradcam++",
                "fullgrad")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _quiet(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` with its progress bars and prints (tqdm, warnings) silenced."""
    def run() -> None:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            fn()
    return run


def pgc_contender(name: str, model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor
                  ) -> Optional[Callable[[], None]]:
    """pytorch-grad-cam's method ``name`` on (model, layer, x), top-1 targets; None if it has none."""
    import pytorch_grad_cam as p

    classes = {"gradcam": p.GradCAM, "gradcam++": p.GradCAMPlusPlus, "hirescam": p.HiResCAM,
               "xgradcam": p.XGradCAM, "layercam": p.LayerCAM,
               "gradcamelementwise": p.GradCAMElementWise, "eigencam": p.EigenCAM,
               "eigengradcam": p.EigenGradCAM, "kpcacam": p.KPCA_CAM, "randomcam": p.RandomCAM,
               "shapleycam": p.ShapleyCAM, "fullgrad": p.FullGrad, "finercam": p.FinerCAM,
               "scorecam": p.ScoreCAM, "ablationcam": p.AblationCAM}
    if name not in classes:
        return None

    def run() -> None:
        # built per call and released after: pytorch-grad-cam's hooks on the layer must not run
        # (and keep activations) during the other contenders' forwards
        obj = classes[name](model, [layer])
        if name == "scorecam":
            obj.batch_size = 64
        try:
            obj(input_tensor=x, targets=None) if name != "finercam" else obj(x, targets=None)
        finally:
            getattr(obj, "base_cam", obj).activations_and_grads.release()
    return _quiet(run)


def torchcam_contender(name: str, model: torch.nn.Module, x: torch.Tensor, samples: int,
                       chunk: int) -> Optional[Callable[[], None]]:
    """torchcam 0.5.0's SS-CAM / IS-CAM / SmoothGrad-CAM++ (top-1 targets)."""
    try:
        import torchcam.methods as tc
    except ImportError:
        return None
    shape = tuple(int(s) for s in x.shape[1:])
    if name == "sscam":
        make = lambda: tc.SSCAM(model, "layer4", batch_size=chunk, num_samples=samples, input_shape=shape)  # noqa: E731
    elif name == "iscam":
        make = lambda: tc.ISCAM(model, "layer4", batch_size=chunk, num_samples=samples, input_shape=shape)  # noqa: E731
    elif name == "smoothgradcam++":
        make = lambda: tc.SmoothGradCAMpp(model, "layer4", num_samples=samples, input_shape=shape)  # noqa: E731
    else:
        return None

    def run() -> None:
        with make() as ext:
            out = model(x)
            ext(class_idx=out.argmax(1).tolist(), scores=out)
    return _quiet(run)


def scorecam_limit(model: torch.nn.Module, x: torch.Tensor, chunk: int) -> Callable[[], None]:
    """The plain batched forwards of all of ScoreCAM's masked inputs (what any ScoreCAM must run
    without shortcuts), in chunks of ``chunk``; the masks themselves are made beforehand."""
    with torch.no_grad():
        feats = {}
        h = model.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
        model(x)
        h.remove()
    a = feats["a"]
    b, c = a.shape[:2]

    def run() -> None:
        with torch.inference_mode():
            n = b * c
            for i in range(0, n, chunk):
                j = torch.arange(i, min(n, i + chunk))
                m = torch.nn.functional.interpolate(a.flatten(0, 1)[j, None], size=x.shape[-2:],
                                                    mode="bilinear", align_corners=True)
                model(x[j // c] * m)
    return run


def measure(contenders: dict[str, Callable[[], None]], rounds: int, warmup: int, device: str,
            per_round: Optional[dict[str, list[float]]] = None) -> dict[str, float]:
    """Median seconds per call of each contender, timed side by side in rotating order;
    ``per_round`` (if given) receives every round's seconds per contender, for ratios taken
    within a round (:func:`round_ratio`)."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    if per_round is not None:
        per_round.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def round_ratio(times: dict[str, list[float]], num: str, den: str) -> Optional[float]:
    """Median over the rounds of ``times[num] / times[den]`` measured in the same round (the
    machine's load drifts between rounds; within one it hits both alike)."""
    if num not in times or den not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pert-batch", type=int, default=2)
    ap.add_argument("--pert-size", type=int, default=64)
    ap.add_argument("--pert-rounds", type=int, default=1)
    ap.add_argument("--samples", type=int, default=2, help="SS-CAM / IS-CAM / SmoothGrad-CAM++ samples")
    ap.add_argument("--chunk", type=int, default=64, help="perturbed copies per forward")
    ap.add_argument("--methods", default="", help="comma list (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    wanted = [m for m in (args.methods.split(",") if args.methods else available_methods()) if m]
    torch.manual_seed(0)
    model = calibrate_bn(torchvision.models.resnet50(weights=None), args.size).eval().to(dev)
    rows: list[tuple[str, str, float, Optional[float], int, Optional[float]]] = []
    per_round: dict[str, list[float]] = {}

    # -- gradient and activation methods -----------------------------------------------------
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    engine = CamEngine(model, "layer4", chunk=args.chunk)
    size = (args.size, args.size)

    def ours(name: str, xx: torch.Tensor, opts: Optional[dict] = None) -> Callable[[], None]:
        spec = as_spec(name, opts)
        return lambda: engine(xx, method=spec).heatmaps_uint8(tuple(xx.shape[-2:])).cpu()

    def plain() -> None:
        with torch.inference_mode():
            model(x)

    cont: dict[str, Callable[[], None]] = {"plain inference": plain}
    for m in [m for m in GRADIENT if m in wanted]:
        cont[f"camserve {m}"] = ours(m, x)
        ref = pgc_contender(m, model, model.layer4, x)
        if ref is not None:
            cont[f"pgc {m}"] = ref
    med = measure(cont, args.rounds, args.warmup, dev, per_round)
    for m in [m for m in GRADIENT if m in wanted]:
        rows.append((m, "pytorch-grad-cam", med[f"camserve {m}"], med.get(f"pgc {m}"), args.batch,
                     round_ratio(per_round, f"pgc {m}", f"camserve {m}")))
    base = med["plain inference"]

    # -- perturbation methods ----------------------------------------------------------------
    pert = [m for m in PERTURBATION if m in wanted]
    limit_t = None
    if pert:
        xp = torch.rand(args.pert_batch, 3, args.pert_size, args.pert_size, device=dev)
        calibrate_bn(model, args.pert_size)
        cont = {}
        for m in pert:
            opts = {"samples": args.samples} if m in ("sscam", "iscam", "smoothgradcam++") else None
            cont[f"camserve {m}"] = ours(m, xp, opts)
            ref = pgc_contender(m, model, model.layer4, xp) or \
                torchcam_contender(m, model, xp, args.samples, args.chunk)
            if ref is not None:
                cont[f"ref {m}"] = ref
        if "scorecam" in pert:
            cont["scorecam limit"] = scorecam_limit(model, xp, args.chunk)
        times_p: dict[str, list[float]] = {}
        medp = measure(cont, args.pert_rounds, 0, dev, times_p)
        limit_t = medp.get("scorecam limit")
        for m in pert:
            who = "pytorch-grad-cam" if m in ("scorecam", "ablationcam", "fullgrad") else \
                ("torchcam" if m in ("sscam", "iscam", "smoothgradcam++") else "-")
            rows.append((m, who, medp[f"camserve {m}"], medp.get(f"ref {m}"), args.pert_batch,
                         round_ratio(times_p, f"ref {m}", f"camserve {m}")))
        per_round.update({f"pert {k}": v for k, v in times_p.items()})

    print(f"ResNet-50 layer4, device {dev}, threads {torch.get_num_threads()}; gradient methods at "
          f"batch {args.batch} {args.size}x{args.size} (median of {args.rounds}), perturbation "
          f"methods at batch {args.pert_batch} {args.pert_size}x{args.pert_size} (median of "
          f"{args.pert_rounds}; samples {args.samples}, chunk {args.chunk})")
    print(f"plain inference: {args.batch / base:.2f} images/s ({1000 * base / args.batch:.1f} ms/image)")
    print("| method | reference | camserve img/s | reference img/s | camserve ms/img | reference ms/img | speed ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for m, who, ours_t, ref_t, n, within in rows:
        ref_s = f"{n / ref_t:.2f}" if ref_t else "-"
        ref_ms = f"{1000 * ref_t / n:.1f}" if ref_t else "-"
        ratio = f"{within:.2f}x" if within else "-"
        print(f"| {m} | {who} | {n / ours_t:.2f} | {ref_s} | {1000 * ours_t / n:.1f} | {ref_ms} | {ratio} |")
    if "gradcam" in wanted:
        for m in [m for m in GRADIENT if m in wanted]:
            print(f"camserve {m} / plain inference = "
                  f"{round_ratio(per_round, f'camserve {m}', 'plain inference'):.3f} (goal <= 1.05)")
    if limit_t is not None:
        sc = [r for r in rows if r[0] == "scorecam"][0]
        print(f"ScoreCAM limit (plain forwards of its {args.pert_batch * 2048} masked inputs): "
              f"{args.pert_batch / limit_t:.2f} images/s; camserve scorecam / limit time = "
              f"{round_ratio(per_round, 'pert camserve scorecam', 'pert scorecam limit'):.3f} "
              f"(goal <= 1.10)")
    if any(r[0] == "ablationcam" and r[3] for r in rows):
        ab = [r for r in rows if r[0] == "ablationcam"][0]
        print(f"AblationCAM speed-up over pytorch-grad-cam: {ab[5]:.1f}x (goal >= 3)")


if __name__ == "__main__":
    main()
