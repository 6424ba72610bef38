"""End to end: the shapes detector (models/shapes-det) through a real ``torchserve --start``
(token auth on) and a real KServe predictor, with per-box maps, requested boxes and a bad row
beside good ones; the answers equal the serving core's."""
from __future__ import annotations

import base64
import json
import os
import shutil

import numpy as np
import pytest
import requests
import yaml

from camserve.serving import CamService
from camserve.testing.kserve import LocalPredictor
from camserve.testing.torchserve import LocalTorchServe, archive

TOLERANCE = 3


@pytest.fixture(scope="module")
def det_dir(repo_root):
    return repo_root / "models" / "shapes-det"


def _scene(det_dir, i=0):
    boxes = json.loads((det_dir / "samples" / "boxes.json").read_text())
    name = sorted(boxes)[i]
    return (det_dir / "samples" / name).read_bytes(), boxes[name]


def _check(body, truth, open_image):
    dets = body["detections"]
    explained = [d for d in dets if "explanation" in d]
    assert explained and len(explained) <= 5
    for d in explained:  # every object is found, and its map peaks in its box
        gt = next(t for t in truth if t["label"] == d["label"])
        hm = np.asarray(open_image(d["explanation"]["heatmap"]))
        y, x = np.unravel_index(int(hm.argmax()), hm.shape)
        b = gt["box"]
        assert b[0] - TOLERANCE <= x < b[2] + TOLERANCE and b[1] - TOLERANCE <= y < b[3] + TOLERANCE
    assert {d["label"] for d in explained} == {t["label"] for t in truth}


@pytest.mark.torchserve
@pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
                    reason="Java is not installed: TorchServe's frontend needs Java 17+")
def test_shapes_detector_through_torchserve(tmp_path, det_dir, handler_file, open_image):
    config = yaml.safe_load((det_dir / "model-config.yaml").read_text())
    archive(tmp_path / "store", "shapes-det", str(handler_file), det_dir / "weights.pt", config,
            det_dir / "model.py", [det_dir / "index_to_name.json"])
    img, truth = _scene(det_dir)
    with LocalTorchServe(tmp_path, ["shapes-det"], ready_timeout=240) as ts:
        auth = {"Authorization": f"Bearer {ts.token}"}
        r = requests.post(f"{ts.url}/explanations/shapes-det", data=img, timeout=120,
                          headers={**auth, "Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text[:500]
        _check(r.json(), truth, open_image)
        boxes = json.dumps([{"label": truth[0]["label"], "box": truth[0]["box"]}])
        r = requests.post(f"{ts.url}/predictions/shapes-det", timeout=120, headers=auth,
                          files={"data": img}, data={"explain": "true", "boxes": boxes,
                                                     "outputs": "overlay,bbox"})
        assert r.status_code == 200, r.text[:500]
        asked = [d for d in r.json()["detections"] if "requested" in d]
        assert len(asked) == 1 and asked[0]["label"] == truth[0]["label"]
        assert open_image(asked[0]["explanation"]["overlay"]).size == (96, 96)
        bad = requests.post(f"{ts.url}/predictions/shapes-det", timeout=120, headers=auth,
                            files={"data": img}, data={"boxes": '[{"label": "cow", "box": [0, 0, 5, 5]}]'})
        assert bad.status_code == 422 and "unknown label" in bad.json()["message"]


@pytest.mark.slow
def test_shapes_detector_through_kserve(tmp_path, det_dir, open_image):
    img, truth = _scene(det_dir, 1)
    b64 = base64.b64encode(img).decode()
    with LocalPredictor(det_dir, "shapes-det", log_path=tmp_path / "kserve.log") as srv:
        r = requests.post(f"{srv.url}/v1/models/shapes-det:explain", timeout=120,
                          json={"instances": [{"data": b64}, {"data": b64, "explain_top": "99"},
                                              {"data": b64, "boxes": "[{]"}]})
        assert r.status_code == 200, r.text[:500]
        first, too_many, bad = r.json()["predictions"]
    _check(first, truth, open_image)
    assert too_many["code"] == 422 and "explain_top" in too_many["message"]
    assert bad["code"] == 422 and "boxes" in bad["message"]
    want = CamService.from_model_dir(det_dir).handle_batch([{"data": img}], [True]).results[0].body
    assert [d["box"] for d in first["detections"]] == [d["box"] for d in want["detections"]]
