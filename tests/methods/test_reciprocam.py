"""ReciproCAM and ViT-ReciproCAM against the papers' definition, implemented here independently
(a forward hook that stacks the mosaic feature maps after the batch, as OpenVINO XAI's PyTorch
implementation does), and against openvino-xai 1.1.0 itself where it imports (it pins numpy < 2,
so it is not part of the test extra: ``PYTHONPATH=<a folder with openvino-xai and openvino>``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camserve import CamEngine
from tests.methods.archs import CASE_BY_NAME, CASES, Case, model_of, params

GAUSS = torch.tensor([[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]])
REL = 1e-6


def mosaic_reference(case: Case, x: torch.Tensor, gaussian: bool, cls_token: bool) -> torch.Tensor:
    """(B, classes, h, w): for each image alone, the layer output replaced by its mosaic copies
    (one position kept, or a 3x3 Gaussian around it), the model's logits of each copy."""
    model = model_of(case)
    layer = model.get_submodule(case.layer)
    maps = []
    for b in range(x.shape[0]):
        shape = {}

        def hook(_m, _i, out):
            if case.layout == "tokens":
                n, c = out.shape[1:]
                side = int((n - 1) ** 0.5)
                grid = out[0, 1:].reshape(side, side, c).permute(2, 0, 1)
            else:
                grid = out[0]
            c, h, w = grid.shape
            shape["hw"] = (h, w)
            copies = []
            for i in range(h):
                for j in range(w):
                    m = torch.zeros(h + 2, w + 2, dtype=out.dtype)
                    if gaussian:
                        m[i:i + 3, j:j + 3] = GAUSS
                    else:
                        m[i + 1, j + 1] = 1
                    g = grid * m[1:-1, 1:-1]
                    if case.layout == "tokens":
                        cls = out[0, :1] if cls_token else torch.zeros_like(out[0, :1])
                        copies.append(torch.cat([cls, g.permute(1, 2, 0).reshape(h * w, c)]))
                    else:
                        copies.append(g)
            return torch.stack(copies)

        handle = layer.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(x[b:b + 1])  # the copies broadcast against the block's residual
        finally:
            handle.remove()
        h, w = shape["hw"]
        maps.append(logits.T.reshape(-1, h, w))
    return torch.stack(maps)


def ours(case: Case, method: str, x: torch.Tensor, targets, **options) -> torch.Tensor:
    eng = CamEngine(model_of(case), case.layer, layout=case.layout, chunk=7)
    return eng(x, targets=targets, method=method, options=options or None).cams


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.abs().max())
    assert scale > 0
    return float((a - ref).abs().max()) / scale


CNN_CASES = [c for c in CASES if c.layout is None]
VIT_CASES = [c for c in CASES if c.layout == "tokens"]


@pytest.mark.parametrize("case,method", params(CNN_CASES, ["reciprocam"]))
def test_reciprocam_equals_the_definition(case: Case, method: str):
    x = case.input(2)
    targets = torch.tensor([[3, 7], [1, 2]])
    ref = mosaic_reference(case, x, gaussian=False, cls_token=False)
    got = ours(case, method, x, targets)
    d = rel(got, ref.gather(1, targets[:, :, None, None].expand(-1, -1, *ref.shape[-2:])))
    print(f"definition parity {case.name} reciprocam: max rel {d:.2e}")
    assert d <= REL


@pytest.mark.parametrize("case,method", params(VIT_CASES, ["vitreciprocam"]) + [
    pytest.param(CASE_BY_NAME["hf_vit"], "vitreciprocam", id="hf_vit-fast")])
def test_vit_reciprocam_equals_the_definition(case: Case, method: str):
    x = case.input(2)
    targets = torch.tensor([[3], [5]])
    ref = mosaic_reference(case, x, gaussian=True, cls_token=True)
    got = ours(case, method, x, targets)
    d = rel(got, ref.gather(1, targets[:, :, None, None].expand(-1, -1, *ref.shape[-2:])))
    print(f"definition parity {case.name} vitreciprocam: max rel {d:.2e}")
    assert d <= REL


def test_reciprocam_serves_every_target_from_the_same_forwards():
    case = CASES[0]
    x = case.input(2)
    both = ours(case, "reciprocam", x, torch.tensor([[3, 7], [1, 2]]))
    one = ours(case, "reciprocam", x, torch.tensor([[7], [2]]))
    torch.testing.assert_close(both[:, 1:], one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,method,layer", [("tinybn", "reciprocam", "features.3"),
                                                ("timm_vit_tiny", "vitreciprocam", "blocks.10.norm1")])
def test_equals_openvino_xai(name: str, method: str, layer: str):
    wb = pytest.importorskip("openvino_xai.methods.white_box.torch")
    case = CASE_BY_NAME[name]
    model32 = model_of(case).float()
    try:
        cls = wb.TorchReciproCAM if method == "reciprocam" else wb.TorchViTReciproCAM
        ref_m = cls(model32, target_layer=layer, embed_scaling=False, input_size=case.size)
        x = case.input(1).float()
        ref = torch.from_numpy(ref_m.generate_saliency_map(x.numpy()))
        got = CamEngine(model32, case.layer, layout=case.layout)(
            x, targets=torch.arange(10)[None], method=method).cams
    finally:
        model_of(case).double()
    d = rel(got.double(), ref.double())
    print(f"openvino-xai parity {name} {method}: max rel {d:.2e} (float32)")
    assert d <= 1e-5
