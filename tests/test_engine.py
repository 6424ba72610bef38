"""CamEngine contract: parity with pytorch-grad-cam and Captum over a list of architectures,
batching, (B, K) targets, and no side effects on the caller's model."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from camserve import CamEngine, available_methods, get_method, heatmaps_at_sizes
from camserve.engine import normalize_maps
from camserve.tasks import TargetBatch
from camserve.testing.zoo import ARCHS, Arch, reshape_for_reference

pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

REFERENCE = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
             "xgradcam": XGradCAM, "layercam": LayerCAM}
TARGETS = [3, 7]

CASES = [pytest.param(arch, layer, id=f"{arch.name}-{layer}") for arch in ARCHS for layer in arch.layers]


@functools.lru_cache(maxsize=None)
def _model(arch: Arch) -> nn.Module:
    """The float64 model, kept for the module (about 3 GB for the whole list). Parameters do not
    require grad: the references then differentiate through the input instead, skipping the
    parameter gradients that would only cost time."""
    model = arch.build(torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
def _ours(arch: Arch, layer: str):
    return CamEngine(_model(arch), layer)(arch.input(2), targets=TARGETS, method="gradcam")


def _reference(arch: Arch, layer: str) -> dict[str, "np.ndarray"]:
    """pytorch-grad-cam's heatmaps for all five methods from one forward/backward: every method
    object hooks the layer, GradCAM runs the pass, the others apply their own formula and scaling
    code to what their hooks captured."""
    model = _model(arch)
    x = arch.input(2)
    targets = [ClassifierOutputTarget(t) for t in TARGETS]
    objs = {m: cls(model=model, target_layers=[model.get_submodule(layer)],
                   reshape_transform=reshape_for_reference(arch.layout)) for m, cls in REFERENCE.items()}
    objs["gradcam"].compute_input_gradient = True  # parameters do not require grad (see _model)
    try:
        out = {"gradcam": objs["gradcam"](input_tensor=x, targets=targets)}
        for m, obj in objs.items():
            if m != "gradcam":
                out[m] = obj.aggregate_multi_layers(obj.compute_cam_per_layer(x, targets, False))
    finally:
        for obj in objs.values():
            obj.activations_and_grads.release()
    return out


def test_available_methods_lists_the_five():
    assert set(REFERENCE) <= set(available_methods())


def test_unknown_method_names_the_known():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"invalid value for method: 'nope' \(known: gradcam"):
        CamEngine(model, "0")(torch.rand(1, 3, 8, 8), method="nope")


@pytest.mark.parametrize("method", list(REFERENCE))
def test_engine_method_equals_method_of_its_tensors(method: str):
    """Each method through the engine is the registered function of the engine's A and G."""
    torch.manual_seed(0)
    model = _small_net().eval()
    res = CamEngine(model, "3")(torch.rand(2, 3, 12, 12), targets=[1, 2], method=method)
    torch.testing.assert_close(res.cams, get_method(method)(res.activations, res.gradients))


@pytest.mark.parametrize("arch,layer", CASES)
def test_parity_with_pytorch_grad_cam(arch: Arch, layer: str):
    """Every method's heatmap at input size equals pytorch-grad-cam's within 1e-4 (float64)."""
    res = _ours(arch, layer)
    assert res.activations.dtype == torch.float64
    ref = _reference(arch, layer)
    worst = {}
    for method in REFERENCE:
        cams = get_method(method)(res.activations, res.gradients)
        ours = normalize_maps(cams, (arch.size, arch.size))
        worst[method] = (ours - torch.from_numpy(ref[method]).to(ours.dtype)).abs().max().item()
    print(f"parity {arch.name}:{layer} max|diff| {max(worst.values()):.2e}")
    assert max(worst.values()) <= 1e-4, worst


@pytest.mark.parametrize("arch,layer", [c for c in CASES if c.values[0].layout is None])
def test_raw_gradcam_equals_captum(arch: Arch, layer: str):
    """Raw Grad-CAM equals Captum's LayerGradCam (relu_attributions=True) within 1e-4 relative;
    the pre-ReLU weighted sums are compared too, so all-negative maps cannot pass vacuously."""
    from captum.attr import LayerGradCam

    model = _model(arch)
    res = _ours(arch, layer)
    lgc = LayerGradCam(model, model.get_submodule(layer))
    signed = lgc.attribute(arch.input(2), target=TARGETS, relu_attributions=False)[:, 0].detach()
    ours_signed = (res.gradients.mean(dim=(-2, -1), keepdim=True) * res.activations).sum(1)
    scale = signed.abs().max().clamp_min(1e-300)
    assert scale > 0
    rel = max(((ours_signed - signed).abs().max() / scale).item(),
              ((res.cams - signed.clamp_min(0)).abs().max() / scale).item())
    print(f"captum {arch.name}:{layer} max rel {rel:.2e}")
    assert rel <= 1e-4


@pytest.mark.parametrize("arch", [pytest.param(a, id=a.name) for a in ARCHS])
def test_batched_equals_rows_and_bk_equals_k_calls(arch: Arch):
    """(B, K) targets in one backward == K calls with (B,) targets == row-by-row calls."""
    model = _model(arch)
    x = arch.input(2, seed=2)
    engine = CamEngine(model, arch.layers[0])
    multi = torch.tensor([[1, 5], [4, 9]])
    res = engine(x, targets=multi, method="gradcam++")
    assert res.cams.shape[:2] == (2, 2) and res.targets.shape == (2, 2)
    for k in range(2):
        col = engine(x, targets=multi[:, k], method="gradcam++")
        torch.testing.assert_close(res.cams[:, k], col.cams, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res.gradients[:, k], col.gradients, rtol=1e-9, atol=1e-12)
    for i in range(2):
        row = engine(x[i:i + 1], targets=int(multi[i, 0]), method="gradcam++")
        torch.testing.assert_close(res.cams[i, 0], row.cams[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res.logits[i], row.logits[0], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# no side effects, hooks, autograd scope


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_no_hooks_left_after_success_and_after_exception():
    model = _small_net()
    engine = CamEngine(model, "3")
    engine(torch.rand(2, 3, 16, 16))
    assert _hook_count(model) == 0
    model[5] = _Boom()  # fails after the target layer ran
    with pytest.raises(RuntimeError, match="boom"):
        engine(torch.rand(2, 3, 16, 16))
    assert _hook_count(model) == 0
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("training", [False, True])
def test_model_state_unchanged(training: bool):
    model = _small_net().train(training)
    model[0].weight.requires_grad_(False)  # a mix, to see nothing is flipped
    before_rg = [p.requires_grad for p in model.parameters()]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    CamEngine(model, "3")(torch.rand(2, 3, 16, 16), method="layercam")
    assert [p.requires_grad for p in model.parameters()] == before_rg
    assert all(p.grad is None for p in model.parameters())
    assert model.training == training
    if not training:  # in training mode BatchNorm updates its running stats, as any forward does
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before_state[k])


def test_prefix_records_no_graph_and_no_parameter_gradients():
    """Only the head after the target layer saves tensors for backward."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    saved: list[int] = []

    def pack(t):
        saved.append(1)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    full = len(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CamEngine(model, "layer4")(x)
    assert full > 50
    assert len(saved) <= 4, f"{len(saved)} tensors saved for backward (full forward: {full})"
    assert all(p.grad is None for p in model.parameters())


def test_inference_mode_is_refused():
    engine = CamEngine(_small_net().eval(), "3")
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            engine(torch.rand(1, 3, 8, 8))


class _CachingNet(nn.Module):
    """Caches a tensor on its first call and reuses it (as YOLO's head caches its anchors)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.cache = torch.linspace(0.5, 1.5, 4)
        a = self.conv(x)
        return self.fc(a.mean(dim=(2, 3)) * self.cache)


def test_predict_first_then_explain_on_a_model_that_caches_tensors():
    """predict runs without autograd but not in inference mode: a tensor the model caches during
    a predict-only call is still usable by an explaining call."""
    engine = CamEngine(_CachingNet().eval(), "conv")
    x = torch.rand(2, 3, 10, 10)
    engine.predict(x)
    assert engine(x, targets=[0, 2]).cams.shape == (2, 8, 8)


def test_inference_tensor_input_is_accepted():
    engine = CamEngine(_small_net().eval(), "3")
    with torch.inference_mode():
        x = torch.rand(1, 3, 8, 8)
    assert engine(x).cams.shape == (1, 8, 8)


def test_in_place_op_after_target_layer_does_not_change_activations():
    model = _small_net().eval()
    x = torch.rand(2, 3, 12, 12)
    res = CamEngine(model, "3")(x)  # layer "3" (conv) is followed by ReLU(inplace=True)
    with torch.no_grad():
        conv_out = model[3](model[2](model[1](model[0](x))))
    torch.testing.assert_close(res.activations, conv_out)
    assert (res.activations < 0).any()  # would be clamped if the in-place ReLU had reached it


def test_bad_target_layer_names_the_known():
    with pytest.raises(ValueError, match=r"invalid value for target_layer: 'layer9' \(no 'layer9' in "
                                         r"the model; known: conv1, bn1"):
        import torchvision

        CamEngine(torchvision.models.resnet18(), "layer9")


@pytest.mark.parametrize("targets,match", [
    (10, "out of range"), ([1, 2, 3], "does not fit"), (torch.tensor([0.5, 1.0]), "integer tensor"),
    ("cat", "invalid value for targets")])
def test_bad_targets(targets, match):
    engine = CamEngine(_small_net().eval(), "3")
    with pytest.raises(ValueError, match=match):
        engine(torch.rand(2, 3, 8, 8), targets=targets)


def test_target_forms_agree():
    engine = CamEngine(_small_net().eval(), "3")
    x = torch.rand(2, 3, 8, 8)
    a = engine(x, targets=[2, 2]).cams
    torch.testing.assert_close(engine(x, targets=2).cams, a)
    torch.testing.assert_close(engine(x, targets=torch.tensor([2, 2])).cams, a)
    top = engine(x)
    assert torch.equal(top.targets, top.logits.argmax(1))


@pytest.mark.parametrize("arch,expected", [
    ("resnet18", "layer4"), ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1"),
    ("swin_t", None), ("densenet121", None)])
def test_auto_locate(arch: str, expected, caplog):
    from camserve.testing.zoo import ARCH_BY_NAME

    spec = ARCH_BY_NAME[arch]
    model = spec.build(torch.float32)
    engine = CamEngine(model, None)
    with caplog.at_level("INFO", logger="camserve.families"):
        res = engine(spec.input(2, torch.float32))
    assert engine.layer_name and engine.layer_name in caplog.text
    if expected:
        assert engine.layer_name == expected
    assert res.cams.dim() == 3 and res.cams.shape[-1] > 1
    assert (res.cams.flatten(1) > 0).sum(1).min() > 1  # a real map, not zeros


def test_heatmaps_order_and_range():
    cams = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    hm = normalize_maps(cams, (4, 4))
    assert hm.shape == (1, 4, 4) and abs(hm.min().item()) < 1e-7 and abs(hm.max().item() - 1) < 1e-6
    # bilinear (align_corners=False) first, then min-max: corners of a 2x2 -> 4x4 upsample
    up = torch.nn.functional.interpolate(cams[None], size=(4, 4), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(hm, (up - up.min()) / (up.max() - up.min()))
    tiny = normalize_maps(cams * 1e-9)  # scale-free: tiny maps still span [0, 1]
    torch.testing.assert_close(tiny, normalize_maps(cams))
    assert normalize_maps(torch.full((1, 3, 3), 5.0)).abs().max() == 0  # constant -> zeros


def test_heatmaps_at_sizes_one_copy_per_map_size():
    cams = torch.rand(3, 5, 5)
    out = heatmaps_at_sizes(cams, [(10, 20), (7, 7), (5, 5)])
    assert [o.shape for o in out] == [(10, 20), (7, 7), (5, 5)]
    assert all(o.dtype.name == "uint8" and o.max() == 255 and o.min() == 0 for o in out)
    ref = (normalize_maps(cams[0], (10, 20)) * 255).round().to(torch.uint8).numpy()
    assert (out[0] == ref).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stays_on_device():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    res = CamEngine(model, "layer4")(torch.rand(2, 3, 64, 64, device="cuda"))
    assert res.cams.is_cuda and res.heatmaps((64, 64)).is_cuda
    cpu = CamEngine(model.cpu(), "layer4")(torch.rand(2, 3, 64, 64))
    assert cpu.cams.device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# suffix forwards, chunks, methods mixed per row


def _replay_vs_full(model: nn.Module, layer: str, x: torch.Tensor, layout=None) -> tuple[float, int]:
    from camserve.engine import PrefixCache
    from camserve.layers import capture_layer

    eng = CamEngine(model, layer, layout=layout)
    eng(x[:1])  # locate the layout
    cache = PrefixCache(model, eng._layer, x.shape[0])
    with torch.no_grad(), capture_layer(model, eng._layer, "record") as cap, cache.recording():
        model(x)
    owner = torch.tensor([1, 0, 1])
    pert = cap.output.index_select(0, owner) * 0.5 + 0.1
    with torch.no_grad():
        with cache.replay(owner, pert):
            a = model(x.index_select(0, owner))
        b = eng._full_suffix(x.index_select(0, owner), pert)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert _hook_count(model) == 0
    return float((a - b).abs().max() / b.abs().max()), len(cache.entries)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.zoo] if c.zoo else [])
                                  for c in __import__("tests.methods.archs", fromlist=["CASES"]).CASES])
def test_suffix_replay_equals_the_whole_model(case):
    """Replaying the outputs of the modules before the target layer gives the scores the whole
    model gives on the same perturbed layer output (torchvision, timm, Hugging Face, ViTs)."""
    from tests.methods.archs import model_of

    d, n = _replay_vs_full(model_of(case), case.layer, case.input(2), case.layout)
    print(f"replay {case.name}: {n} modules replayed, max rel {d:.1e}")
    assert n >= 1 and d <= 1e-12


class _BatchFreeOutput(nn.Module):
    """A module whose output does not depend on the batch but has the batch's length."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.arange(2.0)


class _Tricky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.const = _BatchFreeOutput()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.const(x)  # (2,), recorded as if it were per row
        a = self.conv(x)
        return self.head(a.mean(dim=(2, 3))) + c.sum()


def test_a_replay_that_differs_falls_back_to_the_whole_model(caplog):
    """chunk 4 over 2 rows: ReciproCAM's suffix batches hold two copies of each row, so the
    replayed batch-free output (recorded for rows 0, 1) is indexed as 0, 0, 1, 1 and differs."""
    torch.manual_seed(0)
    model = _Tricky().eval()
    x = torch.rand(2, 3, 8, 8)
    eng = CamEngine(model, "conv", layout="nchw", chunk=4)
    with caplog.at_level("WARNING", logger="camserve.engine"):
        res = eng(x, targets=[0, 1], method="reciprocam")
    assert "running the whole model" in caplog.text
    ref = CamEngine(model, "conv", layout="nchw", chunk=4)
    ref._replay_ok[(2, 3, 8, 8)] = False
    torch.testing.assert_close(res.cams, ref(x, targets=[0, 1], method="reciprocam").cams)
    assert not any("forward" in m.__dict__ for m in model.modules())


def _counting(model: nn.Module) -> list[int]:
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda m, a: sizes.append(int(a[0].shape[0])))
    return sizes


@pytest.mark.parametrize("method,options", [("scorecam", None), ("ablationcam", None),
                                            ("reciprocam", None), ("iscam", {"samples": 2}),
                                            ("sscam", {"samples": 2})])
def test_perturbation_runs_in_bounded_chunks_and_chunks_do_not_change_maps(method, options):
    model = _small_net().eval()
    x = torch.rand(2, 3, 10, 12, dtype=torch.float64)
    model = model.double()
    big = CamEngine(model, "3", chunk=64)(x, targets=[1, 2], method=method, options=options).cams
    eng = CamEngine(model, "3", chunk=5)
    eng(x, method="gradcam")  # the layout is decided (probe forwards) before counting
    sizes = _counting(model)
    small = eng(x, targets=[1, 2], method=method, options=options).cams
    model._forward_pre_hooks.clear()
    torch.testing.assert_close(small, big, rtol=1e-10, atol=1e-12)
    assert max(sizes[1:]) <= 5 and len(sizes) > 4  # the first forward is the batch itself


def test_methods_mixed_per_row_equal_their_own_calls():
    """One call with a method per row (gradient, gradient-free, perturbation, aug_smooth) gives
    each row the map of its own method; rows of one gradient method share one backward."""
    from camserve.methods import as_spec

    model = _small_net().double().eval()
    x = torch.rand(4, 3, 10, 12, dtype=torch.float64)
    specs = ["gradcam", "eigencam", as_spec("scorecam", {"max_channels": 4}), "gradcam"]
    eng = CamEngine(model, "3")
    mixed = eng(x, targets=[1, 2, 3, 4], method=specs).cams
    for i, s in enumerate(specs):
        alone = eng(x[i:i + 1], targets=[[1, 2, 3, 4][i]], method=s).cams
        torch.testing.assert_close(mixed[i], alone[0], rtol=1e-9, atol=1e-12)


def test_max_channels_scores_only_the_most_varied_channels():
    model = _small_net().double().eval()
    x = torch.rand(1, 3, 10, 12, dtype=torch.float64)
    eng = CamEngine(model, "3", chunk=64)
    eng(x, method="gradcam")
    sizes = _counting(model)
    eng(x, targets=[1], method="scorecam", options={"max_channels": 3})
    model._forward_pre_hooks.clear()
    assert sum(sizes[1:]) <= 3 + 1  # three masked inputs (and the all-zero one, if any)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "reciprocam", "gradcam", "eigencam"])
def test_perturbation_methods_serve_multilabel_through_task_scores(method):
    from camserve.tasks import make_task

    model = _small_net().double().eval()
    x = torch.rand(2, 3, 10, 12, dtype=torch.float64)
    task = make_task("multilabel", [str(i) for i in range(5)])
    res = CamEngine(model, "3", task=task)(x, targets=TargetBatch.of_classes([[1, 3], [2]]),
                                           method=method, options={"max_channels": 8}
                                           if method in ("scorecam", "ablationcam") else None)
    assert res.cams.shape[:2] == (2, 2) and torch.isfinite(res.cams).all()
    cls = CamEngine(model, "3")(x, targets=torch.tensor([[1, 3], [2, 2]]), method=method,
                                options={"max_channels": 8} if method in ("scorecam", "ablationcam") else None)
    torch.testing.assert_close(res.cams, cls.cams)  # both score the label's logit
