"""Parity with pytorch-grad-cam 1.5.7 for every method it has, float64, over the architectures of
tests/methods/archs.py: same layer, targets and options.

Maps are compared raw, at the layer's resolution (post-ReLU, before pytorch-grad-cam's float32
scaling), as the largest difference relative to the reference's largest value (<= 1e-6);
FullGrad and ``aug_smooth``, whose reference exists only as float32 maps at the input's size, are
compared there (absolute, on [0, 1] maps); FullGrad's reference gets each layer's own gradient
(see :func:`_pgc_fullgrad`).

pytorch-grad-cam rounds scores to float32 inside ScoreCAM and AblationCAM (``torch.Tensor`` /
``np.float32``); the test lifts those casts to float64 so that it measures the algorithm, not
the rounding. Its AblationLayer lowers an ablated channel by a further 1e7 for every copy of a
batch when the layer's minimum is not 0 (copy j gets min - (j+1)·1e7); the test runs it one copy
at a time there, which gives every copy min - 1e7, our rule. Its EigenCAM / EigenGradCAM /
``eigen_smooth`` keep the SVD's sign: our ``sign="svd"``.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any

import numpy as np
import pytest
import torch

from camserve import CamEngine
from camserve.engine import normalize_maps
from camserve.methods import as_spec
from tests.methods.archs import CASES, CASE_BY_NAME, Case, model_of, params

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import (AblationCAM, EigenCAM, EigenGradCAM, FinerCAM, FullGrad,  # noqa: E402
                              GradCAM, GradCAMElementWise, GradCAMPlusPlus, HiResCAM, KPCA_CAM,
                              LayerCAM, RandomCAM, ScoreCAM, ShapleyCAM, XGradCAM)
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

TARGETS = [3, 7]
REFERENCE = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
             "xgradcam": XGradCAM, "layercam": LayerCAM, "gradcamelementwise": GradCAMElementWise,
             "eigencam": EigenCAM, "eigengradcam": EigenGradCAM, "kpcacam": KPCA_CAM,
             "randomcam": RandomCAM, "scorecam": ScoreCAM, "ablationcam": AblationCAM,
             "shapleycam": ShapleyCAM}
#: our options that select pytorch-grad-cam's behaviour
OURS = {"eigencam": {"sign": "svd"}, "eigengradcam": {"sign": "svd"}}
CHANNEL_SUMS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "gradcamelementwise",
                "randomcam")
PERTURBATION = ("scorecam", "ablationcam")
REL = 1e-6


@contextlib.contextmanager
def float64_scores():
    """pytorch-grad-cam's ScoreCAM / AblationCAM with their float32 casts lifted to float64."""
    import pytorch_grad_cam.ablation_cam as ab
    import pytorch_grad_cam.score_cam as sc

    np64 = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    np64.float32 = np.float64
    t64 = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    t64.Tensor = lambda data: torch.tensor(data, dtype=torch.float64)
    saved = ab.np, sc.torch
    ab.np, sc.torch = np64, t64
    try:
        yield
    finally:
        ab.np, sc.torch = saved


def release(obj: Any) -> None:
    """Remove a pytorch-grad-cam object's hooks (its own ``release`` fails on gradients that are
    views, ``detach_``, and would leave them on the model)."""
    aag = obj.activations_and_grads
    for h in aag.handles:
        h.remove()
    aag.handles.clear()
    aag.activations, aag.gradients = [], []


def _layer_min_is_zero(case: Case, x: torch.Tensor) -> bool:
    from camserve.layers import capture_layer

    model = model_of(case)
    with torch.no_grad(), capture_layer(model, case.layer, "record") as cap:
        model(x)
    return all(float(cap.output[i].min()) == 0 for i in range(x.shape[0]))


def pgc_raw(case: Case, method: str, x: torch.Tensor, targets: Any = None, *,
            cls: Any = None, eigen_smooth: bool = False) -> np.ndarray:
    """pytorch-grad-cam's map at the layer's resolution, ReLU'd (its get_cam_image)."""
    model = model_of(case)
    layer = model.get_submodule(case.layer)
    cls = cls or REFERENCE[method]
    kw: dict[str, Any] = {}
    if method == "ablationcam":
        kw["ablation_layer"] = AblationLayerVit() if case.layout == "tokens" else AblationLayer()
        kw["batch_size"] = 32 if _layer_min_is_zero(case, x) else 1
    obj = cls(model=model, target_layers=[layer], reshape_transform=case.reshape_ref, **kw)
    targets = targets or [ClassifierOutputTarget(t) for t in TARGETS]
    try:
        with float64_scores():
            if method == "randomcam":
                np.random.seed(0)
            xin = x.clone().requires_grad_(True)
            outputs = obj.activations_and_grads(xin)
            if obj.uses_gradients:
                loss = sum(t(o) for t, o in zip(targets, outputs))
                if obj.detach:
                    loss.backward(retain_graph=True)
                else:
                    torch.autograd.grad(loss, xin, retain_graph=True, create_graph=True)
            acts = obj.activations_and_grads.activations
            grads = obj.activations_and_grads.gradients
            if obj.detach:
                A = acts[0].numpy()
                G = grads[0].numpy() if grads else None
            else:
                A, G = acts[0], grads[0]
            cam = obj.get_cam_image(xin, layer, targets, A, G, eigen_smooth)
    finally:
        release(obj)
    return np.maximum(cam, 0)


def ours(case: Case, method: str, x: torch.Tensor, **options: Any) -> torch.Tensor:
    eng = CamEngine(model_of(case), case.layer, layout=case.layout, chunk=16)
    spec = as_spec(method, {**OURS.get(method, {}), **options})
    return eng(x, targets=TARGETS, method=spec).cams


def rel_diff(a: torch.Tensor, ref: np.ndarray) -> float:
    r = torch.from_numpy(np.asarray(ref, dtype=np.float64))
    scale = float(r.abs().max())
    assert scale > 0, "the reference map is all zero: the comparison would be vacuous"
    return float((a.to(torch.float64) - r).abs().max()) / scale


RAW_CASES = [c for c in CASES if c.name not in ("swin_t",)] + [CASE_BY_NAME["swin_t"]]


def _skip_unsupported(case: Case, method: str) -> None:
    if method == "shapleycam" and case.layout is not None:
        pytest.skip("pytorch-grad-cam's ShapleyCAM takes only NCHW activations")
    if method == "ablationcam" and case.layout == "nhwc":
        pytest.skip("pytorch-grad-cam's ablation layers take NCHW or token layouts only")


@pytest.mark.parametrize("case,method", params(CASES, list(REFERENCE),
                                               slow_methods=PERTURBATION))
def test_raw_maps_equal_pytorch_grad_cam(case: Case, method: str):
    _skip_unsupported(case, method)
    x = case.input(2)
    try:
        ref = pgc_raw(case, method, x)
    except RuntimeError as exc:
        # pytorch-grad-cam's ShapleyCAM fails where the score is linear in the activations (a
        # pooled linear head: no second derivative); there ShapleyCAM is Grad-CAM
        assert method == "shapleycam" and "does not require grad" in str(exc)
        ref = pgc_raw(case, "gradcam", x)
    got = ours(case, method, x)
    d = rel_diff(got, ref)
    print(f"pgc parity {case.name} {method}: max rel {d:.2e}")
    assert d <= REL


@pytest.mark.parametrize("case,method", params(CASES, CHANNEL_SUMS))  # EigenGradCAM: a projection already
def test_eigen_smooth_equals_pytorch_grad_cam(case: Case, method: str):
    x = case.input(2)
    ref = pgc_raw(case, method, x, eigen_smooth=True)
    got = ours(case, method, x, eigen_smooth=True, sign="svd")
    d = rel_diff(got, ref)
    print(f"pgc parity {case.name} {method} eigen_smooth: max rel {d:.2e}")
    assert d <= REL


@pytest.mark.parametrize("case,method", params(CASES, ["finercam"]))
def test_finercam_equals_pytorch_grad_cam(case: Case, method: str, monkeypatch):
    """FinerCAM: pytorch-grad-cam builds its comparison targets (top-1 against the 3 nearest
    classes); its base GradCAM's raw map on those targets is the reference."""
    import pytorch_grad_cam.finer_cam as fc

    made = []

    class Recording(fc.FinerWeightedTarget):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(fc, "FinerWeightedTarget", Recording)
    model = model_of(case)
    x = case.input(2)
    finer = FinerCAM(model, [model.get_submodule(case.layer)], case.reshape_ref)
    try:
        finer(x.clone().requires_grad_(True), targets=None)
    finally:
        release(finer.base_cam)
    ref = pgc_raw(case, "gradcam", x, targets=made)
    eng = CamEngine(model, case.layer, layout=case.layout)
    got = eng(x, targets=[t.main_category for t in made], method="finercam").cams
    d = rel_diff(got, ref)
    print(f"pgc parity {case.name} finercam: max rel {d:.2e}")
    assert d <= REL


def _pgc_heatmaps(case: Case, cls: Any, x: torch.Tensor, **call: Any) -> np.ndarray:
    model = model_of(case)
    obj = cls(model=model, target_layers=[model.get_submodule(case.layer)],
              reshape_transform=case.reshape_ref)
    obj.compute_input_gradient = True  # parameters do not require grad
    try:
        return obj(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in TARGETS], **call)
    finally:
        release(obj)


#: float32 maps at the input's size: pytorch-grad-cam's own rounding (cv2 resize, float32 scaling)
HEATMAP_ABS = 2e-6
#: FullGrad's reference sums a float32 map per channel of every biased layer (thousands), each
#: min-max scaled and resized in float32 (measured: <= 5e-6, timm's resnet26d 3.0e-5)
FULLGRAD_ABS = 5e-5


def _pgc_fullgrad(case: Case, x: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's FullGrad map (its ``compute_cam_per_layer`` and aggregation) with each
    biased layer's own gradient. pytorch-grad-cam pairs its bias list (module order) with the
    gradients in the order its hooks fire (reverse backward order), which is not module order where
    a branch is defined before and runs after another (Hugging Face ResNet's shortcut) or where
    autograd orders parallel branches its own way (timm's resnet26d): there its map sums biases
    with other layers' gradients. The test hands it the gradients in module order instead."""
    model = model_of(case)
    obj = FullGrad(model=model, target_layers=[], reshape_transform=case.reshape_ref)
    grads: dict[int, torch.Tensor] = {}

    def record(k: int):  # the gradient of the layer's output as it left the layer (before in-place ops)
        def hook(_m: Any, _i: Any, o: torch.Tensor) -> None:
            o.register_hook(lambda g: grads.setdefault(k, g.detach()))
        return hook

    hooks = [m.register_forward_hook(record(k)) for k, m in enumerate(obj.target_layers)]
    try:
        xin = x.clone().requires_grad_(True)
        logits = model(xin)
        sum(ClassifierOutputTarget(t)(o) for t, o in zip(TARGETS, logits)).backward()
        obj.activations_and_grads.gradients = [grads[k] for k in range(len(obj.target_layers))]
        return obj.aggregate_multi_layers(obj.compute_cam_per_layer(xin, None, False))
    finally:
        for h in hooks:
            h.remove()
        release(obj)


@pytest.mark.parametrize("case,method", params([c for c in CASES if c.layout is None], ["fullgrad"]))
def test_fullgrad_equals_pytorch_grad_cam(case: Case, method: str):
    x = case.input(2)
    ref = _pgc_fullgrad(case, x)
    got = normalize_maps(ours(case, "fullgrad", x))
    d = float((got - torch.from_numpy(ref).to(got.dtype)).abs().max())
    print(f"pgc parity {case.name} fullgrad: max abs {d:.2e}")
    assert d <= FULLGRAD_ABS


@pytest.mark.parametrize("case,method", params(CASES, ["gradcam", "eigencam", "scorecam"],
                                               slow_methods=("scorecam",)))
def test_aug_smooth_equals_pytorch_grad_cam(case: Case, method: str):
    x = case.input(2)
    with float64_scores():
        ref = _pgc_heatmaps(case, REFERENCE[method], x, aug_smooth=True)
    got = normalize_maps(ours(case, method, x, aug_smooth=True))
    r = normalize_maps(torch.from_numpy(ref).to(got.dtype))  # the mean of six [0, 1] maps
    assert float(r.max()) > 0
    d = float((got - r).abs().max())
    print(f"pgc parity {case.name} {method} aug_smooth: max abs {d:.2e}")
    assert d <= HEATMAP_ABS
