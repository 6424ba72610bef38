"""Detection through the serving core: per-row detections with per-box explanations, requested
boxes, box-normalised maps, budgets, and bad rows beside good ones in one batch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from camserve.models import ModelSpec, load_model, load_model_config
from camserve.serving import CamService


@pytest.fixture(scope="module")
def det_service(repo_root) -> CamService:
    """The shapes detector's folder with random weights and every box kept (threshold 0)."""
    folder = repo_root / "models" / "shapes-det"
    handler = {k: v for k, v in load_model_config(folder)["handler"].items() if k != "weights"}
    spec = ModelSpec.from_config({**handler, "score_threshold": 0.0, "max_row_work": 4})
    torch.manual_seed(0)
    return CamService(load_model(spec, folder))


def _body(result):
    return json.loads(result.to_json())


def test_rows_answer_detections_with_explanations_and_bad_rows_their_own_4xx(det_service, png,
                                                                              decode_png):
    boxes = json.dumps([{"label": "circle", "box": [10, 10, 60, 50]},
                        {"label": "star", "box": [0, 0, 30, 30]}])
    rows = [
        {"data": png(seed=1, size=(120, 80)), "explain": "true"},
        {"data": png(seed=2, size=(120, 80)), "boxes": json.dumps([{"label": "cow", "box": [0, 0, 5, 5]}])},
        {"data": png(seed=3, size=(120, 80)), "explain": "true", "boxes": boxes,
         "outputs": "overlay,bbox"},
        {"data": png(seed=4, size=(96, 96)), "boxes": json.dumps([{"label": 1, "box": [5, 5, 1, 9]}])},
        {"data": png(seed=5, size=(96, 96)),
         "boxes": json.dumps([{"label": 1, "box": [0, 0, 5, 5]}] * 17)},
        {"body": b"not an image"},
        {"data": png(seed=6, size=(96, 96))},
        {"data": png(seed=7, size=(200, 100)), "explain": "true", "method": "eigencam",
         "explain_top": "2", "outputs": "heatmap"},
        {"data": png(seed=8, size=(96, 96)), "explain": "true", "box_target": "area"},
    ]
    out = det_service.handle_batch(rows)
    assert [r.status for r in out.results] == [200, 422, 200, 422, 422, 400, 200, 200, 422]
    first = _body(out.results[0])
    dets = first["detections"]
    assert len(dets) == 20  # max_detections of the folder
    explained = [d for d in dets if "explanation" in d]
    assert dets[:5] == explained  # explain_top 5: the five best
    assert all(d["explanation"]["width"] == 120 and d["explanation"]["height"] == 80 for d in explained)
    assert all(0 <= d["box"][0] <= d["box"][2] <= 120 and 0 <= d["box"][1] <= d["box"][3] <= 80
               for d in dets)
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    assert "unknown label" in _body(out.results[1])["message"]
    assert "x0 < x1" in _body(out.results[3])["message"]
    assert "17 boxes" in _body(out.results[4])["message"]
    assert "box_target" in _body(out.results[8])["message"]
    asked = [d for d in _body(out.results[2])["detections"] if "requested" in d]
    assert sorted(d["requested"] for d in asked) == [0, 1]
    for d in asked:
        over = decode_png(d["explanation"]["overlay"])
        assert over.shape == (80, 120, 3) and "bbox" in d["explanation"]
    assert "explanation" not in json.dumps(_body(out.results[6]))  # predict only
    eigen = [d for d in _body(out.results[7])["detections"] if "explanation" in d]
    assert len(eigen) == 2
    for d in eigen:  # gradient-free: renormalised inside its box, zero outside
        hm = decode_png(d["explanation"]["heatmap"])
        x0, y0, x1, y1 = (int(round(v)) for v in d["box"])
        mask = np.zeros_like(hm, dtype=bool)
        mask[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True
        assert hm.shape == (100, 200) and int(hm[~mask].max(initial=0)) == 0
        assert int(hm[mask].max()) == 255


def test_every_box_counts_in_the_work_budget(det_service, png):
    big = png(seed=9, size=(1200, 1200))
    out = det_service.handle_batch([{"data": big, "explain": "true", "explain_top": "1"},
                                    {"data": big, "explain": "true", "explain_top": "5"}])
    assert [r.status for r in out.results] == [200, 413]
    assert "5 targets" in _body(out.results[1])["message"]


def test_describe_names_the_task_and_its_options(det_service):
    d = det_service.describe()
    assert d["task"] == "detection"
    assert {"boxes", "explain_top", "box_target", "box_normalize"} <= set(d["options"])
    assert "target" not in d["options"]
