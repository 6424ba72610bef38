"""camserve.explain: batch CAMs (one forward, targets from the task, per-row methods), rendering
into complete Explanation records."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from camserve import CamEngine
from camserve.backends import TorchBackend
from camserve.engine import normalize_maps, to_uint8
from camserve.explain import (MapPlan, batch_cams, explanation_json, plan_maps, render_row,
                              row_maps)
from camserve.errors import RequestError, ResponseTooLarge
from camserve.methods import available_methods
from camserve.options import RequestOptions, ServingLimits
from camserve.models import LoadedModel
from camserve.records import Explanation
from camserve.tasks import Classification, Geometry, Shown
from camserve.testing.nets import TinyNet, tiny_spec

LABELS = ["circle", "square", "triangle", "star", "cross", "ring"]


def opts(targets=None, method="gradcam", outputs=("heatmap", "bbox")) -> RequestOptions:
    return RequestOptions(explain=True, targets=targets, topk=3, method=method, outputs=outputs)


def shown(targets, probs) -> list[Shown]:
    return [Shown(i, LABELS[i], float(probs[i])) for i in targets]


GEOM = Geometry((32, 32), (32, 32))


def test_request_targets_pad_and_take_the_top1():
    task = Classification(LABELS)
    logits = torch.tensor([[0.0] * 6, [0, 0, 0, 9, 0, 0], [0.0] * 6])
    t = task.request_targets(logits, [o.task for o in (opts((1, 4, 2)), opts(None), opts((5,)))],
                             [GEOM] * 3, [3] * 3)
    assert t.index.tolist() == [[1, 4, 2], [3, 3, 3], [5, 5, 5]] and t.count == (3, 1, 1)


def test_engine_rows_match_a_sub_batch():
    model = TinyNet(len(LABELS), seed=1).eval()
    eng = CamEngine(model, "features")
    x = torch.randn(5, 3, 32, 32)
    sub = eng(x[[1, 4]], targets=torch.tensor([[2, 3], [0, 5]]), method="gradcam++")
    full = eng(x, targets=torch.tensor([[2, 3], [0, 5]]), method="gradcam++", rows=[1, 4])
    assert full.logits.shape == (5, len(LABELS)) and full.cams.shape == sub.cams.shape
    torch.testing.assert_close(full.cams, sub.cams, rtol=1e-4, atol=1e-6)
    assert not model.features._forward_hooks


def test_batch_cams_per_row_methods_equal_their_own_engine_call():
    model = TinyNet(len(LABELS), seed=2).eval()
    eng = CamEngine(model, "features")
    backend = TorchBackend(LoadedModel(model, tiny_spec(), LABELS, "features",
                                       torch.device("cpu")), optimize=False)
    x = torch.randn(4, 3, 32, 32)
    methods = available_methods()[:3]
    options = [opts((2, 1), methods[0]), opts(None, methods[1]), opts((3,), methods[2])]
    rows = [0, 2, 3]
    out = batch_cams(backend, x, rows, options, [GEOM] * 3)
    assert out.cams.shape[:2] == (3, 2) and out.logits.shape == (4, len(LABELS))
    top1 = int(out.logits[2].argmax())
    assert out.targets.index.tolist() == [[2, 1], [top1, top1], [3, 3]]
    assert out.targets.count == (2, 1, 1)
    for p, (r, o) in enumerate(zip(rows, options)):
        ref = eng(x[r:r + 1], targets=[out.targets.index[p, 0].item()], method=o.method)
        torch.testing.assert_close(out.cams[p, 0], ref.cams[0], rtol=1e-4, atol=1e-6)


def test_render_row_builds_complete_records(decode_png):
    torch.manual_seed(3)
    cams = torch.rand(2, 8, 8)
    img = Image.new("RGB", (40, 30), "blue")
    o = opts((1, 4), "layercam", ("heatmap", "overlay", "raw", "bbox"))
    probs = torch.softmax(torch.arange(6.0), 0)
    recs = render_row(img, o, cams, shown([1, 4], probs), "features")
    assert all(isinstance(r, Explanation) for r in recs)
    assert [(r.target, r.label, r.method, r.layer) for r in recs] == [
        (1, "square", "layercam", "features"), (4, "cross", "layercam", "features")]
    assert recs[1].score == float(probs[4]) and recs[0].score == float(probs[1])
    js = recs[0].to_json()
    assert set(js) == {"target", "label", "score", "method", "layer", "width", "height", "bbox",
                       "heatmap", "overlay", "raw"}
    assert js["raw"]["shape"] == [8, 8] and (js["width"], js["height"]) == (40, 30)
    hm = to_uint8(normalize_maps(cams[1], (30, 40))).numpy()
    # maps made one at a time equal the direct ones
    np.testing.assert_array_equal(decode_png(js_heat(recs[1])), hm)


def test_render_row_gives_only_the_outputs_asked_for():
    img = Image.new("RGB", (40, 30), "blue")
    probs = torch.softmax(torch.arange(6.0), 0)
    only_raw = render_row(img, opts((1,), outputs=("raw",)), torch.rand(1, 8, 8),
                          shown([1], probs), "f")
    assert set(only_raw[0].to_json()) == {"target", "label", "score", "method", "layer", "width",
                                          "height", "raw"}


def js_heat(rec: Explanation) -> str:
    assert rec.heatmap is not None
    return rec.heatmap


def test_row_maps_chunks_equal_one_call():
    cams = torch.rand(5, 6, 6)
    want = [to_uint8(normalize_maps(c, (10, 20))).numpy() for c in cams]
    for chunk in (1, 200, 400, 10 ** 6):
        got = list(row_maps(cams, (20, 10), chunk_pixels=chunk))
        assert len(got) == 5
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


LIMITS = ServingLimits(max_map_side=100, max_row_work=1, max_batch_work=2)


def test_plan_small_image_is_exact_and_counts_targets_times_outputs():
    p = plan_maps(opts((1, 2), outputs=("heatmap", "overlay", "bbox", "raw")), (80, 60), LIMITS)
    assert p == MapPlan((80, 60), (80, 60), (80, 60), 2 * 5 * 80 * 60) and not p.scaled
    assert plan_maps(opts(outputs=("raw",)), (5000, 5000), LIMITS).work == 0
    predict = RequestOptions(False, None, 1, "gradcam", ("heatmap",))
    assert plan_maps(predict, (5000, 5000), LIMITS).work == 0


ONE = opts(None, outputs=("heatmap", "bbox"))


def test_plan_large_image_within_budget_is_full_size():
    p = plan_maps(ONE, (400, 200), LIMITS)  # 80,000 + 5,000 pixels: full size
    assert p.map_size == (100, 50) and p.render_size == (400, 200) and p.work == 85_000


def test_plan_large_image_over_budget_is_scaled():
    p = plan_maps(opts((1, 2, 3), outputs=("heatmap", "overlay", "bbox")), (2000, 1000), LIMITS)
    assert p.scaled and p.render_size == p.map_size == (100, 50) and p.work == 3 * 5 * 5000


def test_plan_over_the_row_budget_even_scaled_is_413():
    with pytest.raises(RequestError) as e:
        plan_maps(opts(tuple(range(6)) * 12, outputs=("heatmap", "overlay", "bbox")),
                  (100, 100), LIMITS)
    assert e.value.code == 413 and e.value.type == "WorkTooLarge"
    assert "handler.max_row_work" in e.value.message and "fewer targets" in e.value.message


def test_plan_within_what_the_batch_left_scales_or_refuses():
    with pytest.raises(RequestError, match="left after the requests batched with it"):
        plan_maps(ONE, (400, 200), LIMITS, available=1000)
    assert plan_maps(ONE, (400, 200), LIMITS, available=12_000).scaled


SPOT = torch.zeros(1, 8, 8)
SPOT[0, 2:4, 4:6] = 1.0
SCALED = MapPlan((800, 800), (80, 80), (80, 80), 1)
MAPS = opts((1,), outputs=("heatmap", "overlay", "bbox"))


def _render(img, plan=None):
    return render_row(img, MAPS, SPOT, shown([1], torch.full((6,), 1 / 6)), "f", plan=plan)[0]


def test_render_scaled_plan_gives_small_pngs(open_image):
    rec = _render(Image.new("RGB", (80, 80), "gray"), SCALED)
    assert open_image(rec.heatmap).size == (80, 80)
    assert open_image(rec.overlay).size == (80, 80)


def test_render_scaled_plan_gives_the_bbox_in_original_pixels():
    rec = _render(Image.new("RGB", (80, 80), "gray"), SCALED)
    exact = _render(Image.new("RGB", (800, 800)))
    x0, y0, x1, y1 = rec.bbox
    e0, f0, e1, f1 = exact.bbox
    assert abs(x0 - e0) <= 10 and abs(y0 - f0) <= 10 and abs(x1 - e1) <= 10 and abs(y1 - f1) <= 10


def test_scaled_explanations_say_so_and_exact_ones_do_not():
    rec = _render(Image.new("RGB", (80, 80), "gray"), SCALED)
    js = explanation_json(rec, SCALED)
    assert (js["scaled"], js["map_width"], js["map_height"], js["width"]) == (True, 80, 80, 800)
    exact = _render(Image.new("RGB", (800, 800)))
    assert "scaled" not in explanation_json(exact, MapPlan.exact((800, 800)))


def test_a_plan_may_upsample_small_maps_to_the_original_size(open_image):
    big = MapPlan((800, 800), (80, 80), (800, 800), 1)  # PNGs upsampled to the original size
    rec = _render(Image.new("RGB", (800, 800)), big)
    assert open_image(rec.overlay).size == (800, 800)
    assert "scaled" not in explanation_json(rec, big)


def test_render_stops_once_the_answer_passes_its_byte_limit(monkeypatch):
    import camserve.explain as explain

    calls = []
    real = explain.overlay_png

    def counting(*a, **kw):
        calls.append(kw.get("max_bytes"))
        return real(*a, **kw)

    monkeypatch.setattr(explain, "overlay_png", counting)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), "RGB")
    o = opts(tuple(range(6)), outputs=("overlay",))
    with pytest.raises(ResponseTooLarge) as e:
        render_row(img, o, torch.rand(6, 8, 8), shown(range(6), torch.full((6,), 1 / 6)), "f",
                   max_bytes=200_000)
    assert len(calls) == 1 and calls[0] == 150_000  # the first overlay alone passes the limit
    assert "overlay" in e.value.message and e.value.size > 200_000


def test_maps_are_made_on_one_thread_and_the_count_comes_back():
    from camserve.explain import one_thread

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        with one_thread(torch.device("cpu")):
            seen.append(torch.get_num_threads())
        with one_thread(torch.device("cuda")):  # not CPU work: left alone
            seen.append(torch.get_num_threads())
        with pytest.raises(ZeroDivisionError), one_thread(torch.device("cpu")):
            raise ZeroDivisionError
        assert seen == [1, 2] and torch.get_num_threads() == 2
        maps = list(row_maps(torch.rand(3, 4, 4), (9, 7)))
        assert [m.shape for m in maps] == [(7, 9)] * 3 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
