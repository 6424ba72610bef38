"""camserve.explain: target table, batch CAMs (one forward, per-row methods), rendering into
complete Explanation records."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from camserve import CamEngine
from camserve.engine import normalize_maps, to_uint8
from camserve.explain import batch_cams, batch_heatmaps, render_row, target_table
from camserve.methods import available_methods
from camserve.options import RequestOptions
from camserve.records import Explanation

LABELS = ["circle", "square", "triangle", "star", "cross", "ring"]


class TinyNet(nn.Module):
    """conv -> conv (the target, 8×8 for a 32×32 input) -> pool -> fc."""

    def __init__(self, num_classes: int = len(LABELS)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.features(x))).flatten(1))


def opts(targets=None, method="gradcam", outputs=("heatmap", "bbox")) -> RequestOptions:
    return RequestOptions(explain=True, targets=targets, topk=3, method=method, outputs=outputs)


def test_target_table_pads_and_marks_top1():
    t = target_table([opts((1, 4, 2)), opts(None), opts((5,))])
    assert t.table.tolist() == [[1, 4, 2], [-1, -1, -1], [5, 5, 5]] and t.counts == (3, 1, 1)
    logits = torch.tensor([[0.0] * 6, [0, 0, 0, 9, 0, 0], [0.0] * 6])
    assert t.resolve(logits).tolist() == [[1, 4, 2], [3, 3, 3], [5, 5, 5]]


def test_engine_rows_match_a_sub_batch():
    torch.manual_seed(1)
    model = TinyNet().eval()
    eng = CamEngine(model, "features")
    x = torch.randn(5, 3, 32, 32)
    sub = eng(x[[1, 4]], targets=torch.tensor([[2, 3], [0, 5]]), method="gradcam++")
    full = eng(x, targets=torch.tensor([[2, 3], [0, 5]]), method="gradcam++", rows=[1, 4])
    assert full.logits.shape == (5, len(LABELS)) and full.cams.shape == sub.cams.shape
    torch.testing.assert_close(full.cams, sub.cams, rtol=1e-4, atol=1e-6)
    assert not model.features._forward_hooks


def test_batch_cams_per_row_methods_equal_their_own_engine_call():
    torch.manual_seed(2)
    model = TinyNet().eval()
    eng = CamEngine(model, "features")
    x = torch.randn(4, 3, 32, 32)
    methods = available_methods()[:3]
    options = [opts((2, 1), methods[0]), opts(None, methods[1]), opts((3,), methods[2])]
    rows = [0, 2, 3]
    out = batch_cams(eng, x, rows, options, target_table(options))
    assert out.cams.shape[:2] == (3, 2) and out.logits.shape == (4, len(LABELS))
    top1 = int(out.logits[2].argmax())
    assert out.targets.tolist() == [[2, 1], [top1, top1], [3, 3]]
    for p, (r, o) in enumerate(zip(rows, options)):
        ref = eng(x[r:r + 1], targets=[out.targets[p, 0].item()], method=o.method)
        torch.testing.assert_close(out.cams[p, 0], ref.cams[0], rtol=1e-4, atol=1e-6)


def test_render_row_builds_complete_records():
    torch.manual_seed(3)
    cams = torch.rand(2, 8, 8)
    img = Image.new("RGB", (40, 30), "blue")
    o = opts((1, 4), "layercam", ("heatmap", "overlay", "raw", "bbox"))
    maps = [to_uint8(normalize_maps(c, (30, 40))).numpy() for c in cams]
    probs = torch.softmax(torch.arange(6.0), 0)
    recs = render_row(img, o, cams, [1, 4], maps, probs, LABELS, "features")
    assert all(isinstance(r, Explanation) for r in recs)
    assert [(r.target, r.label, r.method, r.layer) for r in recs] == [
        (1, "square", "layercam", "features"), (4, "cross", "layercam", "features")]
    assert recs[1].score == float(probs[4]) and recs[0].score == float(probs[1])
    js = recs[0].to_json()
    assert set(js) == {"target", "label", "score", "method", "layer", "width", "height", "bbox",
                       "heatmap", "overlay", "raw"}
    assert js["raw"]["shape"] == [8, 8] and (js["width"], js["height"]) == (40, 30)
    only_raw = render_row(img, opts((1,), outputs=("raw",)), cams[:1], [1], [None], probs, LABELS, "f")
    assert set(only_raw[0].to_json()) == {"target", "label", "score", "method", "layer", "width",
                                          "height", "raw"}


def test_batch_heatmaps_only_for_rows_that_need_maps():
    cams = type("C", (), {})()
    cams.cams = torch.rand(2, 2, 8, 8)
    options = [opts((1, 2)), opts((0,), outputs=("raw",))]
    imgs = [Image.new("RGB", (20, 10)), Image.new("RGB", (9, 9))]
    maps = batch_heatmaps(cams, [2, 1], options, imgs)
    assert sorted(maps) == [(0, 0), (0, 1)]
    assert maps[(0, 1)].shape == (10, 20) and maps[(0, 1)].dtype == np.uint8
