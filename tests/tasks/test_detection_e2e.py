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

from ..conftest import run_command

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


# -- every detector family: scaffold -> archive -> real TorchServe, KServe, the batch job ---------

def _torchvision_source(tmp):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=4).eval()
    torch.save(model.state_dict(), tmp / "frcnn.pth")
    (tmp / "labels.txt").write_text("background\ncat\ndog\nbird\n")
    return ["--arch", "torchvision.models.fasterrcnn_mobilenet_v3_large_fpn", "--weights",
            str(tmp / "frcnn.pth"), "--labels", str(tmp / "labels.txt"), "--input-size", "128,160"]


def _hf_source(tmp):
    pytest.importorskip("transformers")
    import torch

    from tests.tasks.test_detection_hf import _detr

    torch.manual_seed(0)
    model, proc = _detr()
    model.eval().save_pretrained(tmp / "detr")
    proc.save_pretrained(tmp / "detr")
    return ["--arch", f"hf:{tmp / 'detr'}", "--input-size", "64,96"]


def _yolo_source(tmp):
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    if spec is None:
        pytest.skip("ultralytics (camserve[yolo]) is missing")
    yaml_file = tmp / "yolov8n.yaml"
    shutil.copy(os.path.join(list(spec.submodule_search_locations)[0], "cfg", "models", "v8",
                             "yolov8.yaml"), yaml_file)
    return ["--arch", f"yolo:{yaml_file}", "--num-classes", "3", "--input-size", "64,96"]


FAMILY_SOURCES = {"frcnn": _torchvision_source, "detr": _hf_source, "yolo": _yolo_source}


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    """A scaffolded detector folder per family (random weights, score threshold 0)."""
    tmp = tmp_path_factory.mktemp("detfamilies")
    out = {}
    for name, source in FAMILY_SOURCES.items():
        (tmp / name).mkdir()
        folder = tmp / "models" / name
        report = run_command("camserve-scaffold", str(folder), "--task", "detection",
                      "--score-threshold", "0", *source(tmp / name))
        assert "layer:" in report
        out[name] = folder
    return out


def _scene_png():
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, (90, 150, 3), dtype=np.uint8)
    arr[20:60, 30:90] = (250, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _check_family(body, open_image, size=(150, 90)):
    dets = body["detections"]
    explained = [d for d in dets if "explanation" in d]
    assert dets and explained, body
    for d in explained:
        assert len(d["box"]) == 4 and d["label"] in ("cat", "dog", "bird", "0", "1", "2", "3",
                                                      "background")
        assert open_image(d["explanation"]["heatmap"]).size == size


@pytest.mark.torchserve
@pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
                    reason="Java is not installed: TorchServe's frontend needs Java 17+")
def test_every_family_scaffold_archive_torchserve(family_folders, tmp_path, start_torchserve,
                                                  open_image):
    """torchvision Faster R-CNN, Hugging Face DETR and YOLOv8 folders, each scaffolded and
    archived as a user would, served by one real TorchServe (token auth): /explanations answers
    per-box maps at the image's size; a bad box is that request's 422."""
    from camserve.testing.torchserve import LocalTorchServe

    for name, folder in family_folders.items():
        run_command("-m", "scripts.archive", str(folder), "--name", name, "--out", str(tmp_path / "store"))
    img = _scene_png()
    with start_torchserve(LocalTorchServe(tmp_path, list(family_folders), ready_timeout=300)) as ts:
        auth = {"Authorization": f"Bearer {ts.token}"}
        for name in family_folders:
            r = requests.post(f"{ts.url}/explanations/{name}", data=img, timeout=120,
                              headers={**auth, "Content-Type": "application/octet-stream"})
            assert r.status_code == 200, (name, r.text[:500])
            _check_family(r.json(), open_image)
            bad = requests.post(f"{ts.url}/predictions/{name}", timeout=120, headers=auth,
                                files={"data": img}, data={"boxes": '[{"label": 1, "box": [5, 5, 1, 1]}]'})
            assert bad.status_code == 422, (name, bad.text[:300])


@pytest.mark.slow
def test_every_family_through_kserve_and_the_batch_job(family_folders, tmp_path, open_image):
    """The same folders through a real KServe predictor (:explain) and camserve-export ->
    camserve-batch (a gradient-free detection graph; detections lines with per-box files)."""
    img = _scene_png()
    b64 = base64.b64encode(img).decode()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "scene.png").write_bytes(img)
    for name, folder in family_folders.items():
        with LocalPredictor(folder, name, log_path=tmp_path / f"{name}.log") as srv:
            r = requests.post(f"{srv.url}/v1/models/{name}:explain", timeout=120,
                              json={"instances": [{"data": b64}, {"data": b64, "boxes": "[{]"}]})
            assert r.status_code == 200, r.text[:500]
            good, bad = r.json()["predictions"]
        _check_family(good, open_image)
        assert bad["code"] == 422 and "boxes" in bad["message"]
        graph = tmp_path / f"{name}.cam.onnx"
        run_command("camserve-export", str(folder), "--out", str(graph), "--gradient-free")
        run_command("camserve-batch", "--model", str(graph), str(tmp_path / "imgs"), "--out",
             str(tmp_path / f"out_{name}"), "--save", "heatmap")
        [line] = [json.loads(x) for x in (tmp_path / f"out_{name}" / "results.jsonl").read_text().splitlines()]
        assert line["detections"] and line["method"] == "eigencam"
