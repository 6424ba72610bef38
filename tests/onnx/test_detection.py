"""Detection graphs: the shapes detector's decoding as tensor operations (what makes its graph
exact), the packed ``detections`` output, the exported graph's per-box maps against the PyTorch
engine on real scenes, and the batch job's detections lines (local runner and the Ray actor's
batch function) beside hostile files. Graph exports take ~20 s: those tests are marked slow."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.engine import CamEngine
from camserve.models import load_model_dir
from camserve.onnx.batch import run_job
from camserve.onnx.cli import main
from camserve.onnx.export import export_cam_onnx
from camserve.onnx.format import GraphMeta
from camserve.onnx.inputs import iter_inputs
from camserve.onnx.job import EXIT_PARTIAL, EXIT_USAGE, JobConfig, plan_job
from camserve.onnx.session import ort_session
from camserve.tasks import make_task
from camserve.tasks.detection import Detection, Detections, ImageDetections, detection_targets
from camserve.tasks.detectors import GraphError, family_of
from camserve.testing.hostile import hostile_corpus, write_corpus
from tools.shapes import CLASSES
from tools.shapes_det import make_scenes, write_samples

from .conftest import ROOT

JsonLines = Callable[[Path], list[dict]]
DET_DIR = ROOT / "models" / "shapes-det"


def _scenes_batch(lm, seed: int, n: int) -> torch.Tensor:
    """``n`` preprocessed shapes scenes (the folder's mean/std), (n, 3, 96, 96)."""
    x = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255
                     for s in make_scenes(seed, n, stream="samples")])
    mean, std = torch.tensor(lm.spec.mean)[:, None, None], torch.tensor(lm.spec.std)[:, None, None]
    return (x - mean) / std


def _iou(a, b) -> float:
    lt = np.maximum(a[:2], b[:2])
    rb = np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    area = lambda v: (v[2] - v[0]) * (v[3] - v[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# -- the decoding and the packed output (no graph) ----------------------------------------------------

@pytest.mark.parametrize("threshold", [0.3, 0.0])
def test_fixed_detections_are_the_served_detections(threshold: float) -> None:
    """The tensor-only decoding (greedy NMS as M picks) gives exactly what the served forward
    gives — same boxes, scores, labels, order — on scenes and on noise, where every peak passes
    a threshold of 0 and NMS has work to do."""
    lm = load_model_dir(DET_DIR, overrides={"score_threshold": threshold})
    task = make_task(lm.spec.task, lm.labels, lm.spec.task_settings)
    x = torch.cat([_scenes_batch(lm, 3, 6), torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))])
    with torch.no_grad():
        packed = task.graph_forward(lm.model, x)
        served = task.output(lm.model(x))
    assert packed.shape == (8, task.max_detections, 6)
    assert torch.equal(packed, task.graph_value(served))
    counts = [len(d) for d in served]
    assert min(counts[:6]) >= 1 and (threshold > 0 or min(counts) == task.max_detections)
    for row, d in zip(packed, served):
        back = task.unpack(row)
        assert torch.equal(back.boxes, d.boxes) and torch.equal(back.labels, d.labels)


def test_graph_targets_are_the_top_detections() -> None:
    task = Detection(["a", "b", "c"], {"explain_top": 2, "max_detections": 4})
    dets = Detections([ImageDetections(torch.tensor([[1., 2., 5., 6.], [0., 0., 3., 3.], [4., 4., 9., 9.]]),
                                       torch.tensor([0.9, 0.5, 0.2]), torch.tensor([2, 0, 1])),
                       ImageDetections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))])
    packed = task.graph_value(dets)
    assert packed.shape == (2, 4, 6) and packed[1, :, 5].tolist() == [-1, -1, -1, -1]
    tb = task.graph_targets(packed, {})
    assert task.graph_top == 2 and tb.count is None
    assert tb.index.tolist() == [[2, 0], [0, 0]]  # padding: label 0 and a zero box
    assert tb.box[0].tolist() == [[1., 2., 5., 6.], [0., 0., 3., 3.]] and not tb.box[1].any()
    assert task.graph_scores(packed, tb).flatten().tolist() == pytest.approx([0.9, 0.5, 0.0, 0.0])


def test_a_detector_without_tensor_decoding_is_refused() -> None:
    class Plain(torch.nn.Module):
        def forward(self, x):
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                     "labels": torch.zeros(0, dtype=torch.long)}]

    with pytest.raises(GraphError, match="fixed_detections.*gradient-free"):
        family_of(Plain()).fixed_detections(Plain(), torch.zeros(1, 3, 8, 8))


# -- the exported graph --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def det_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes detector's CAM graph (gradcam, eigencam), verified against the engine."""
    lm = load_model_dir(DET_DIR)
    out = tmp_path_factory.mktemp("det") / "shapes-det.cam.onnx"
    info = export_cam_onnx(lm, out, methods=("gradcam", "eigencam"), threads=1)
    assert info.outputs == ["detections", "activations", "gradients", "cam", "cam_eigencam"]
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_graph_per_box_maps_equal_the_engine(det_graph: Path) -> None:
    """On real scenes: the graph's detections are the served ones, and each explained box's
    gradients and Grad-CAM map equal the PyTorch engine's for the same box (float32 parity)."""
    lm = load_model_dir(DET_DIR)
    task = make_task(lm.spec.task, lm.labels, lm.spec.task_settings)
    meta = GraphMeta.from_file(det_graph)
    assert meta.spec.task == "detection" and meta.task.graph_top == 5
    x = _scenes_batch(lm, 11, 8)
    sess = ort_session(det_graph, threads=1)
    dets, grads, cams = sess.run(["detections", "gradients", "cam"], {"input": x.numpy()})
    engine = CamEngine(lm.model, lm.layer, reshape=lm.reshape, task=task)
    served = engine.predict(x)
    np.testing.assert_allclose(dets, task.graph_value(served).numpy(), rtol=0, atol=2e-4)
    rows = [[(int(lab), box, "score") for lab, box in zip(d.labels[:5].tolist(), d.boxes[:5].tolist())]
            for d in served]
    res = engine(x, targets=detection_targets(rows), method="gradcam")
    explained = 0
    for r, d in enumerate(served):
        n = min(5, len(d))
        explained += n
        ref = res.cams[r, :n].numpy()
        assert np.abs(cams[r, :n] - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1e-6)
        g_ref = res.gradients[r, :n].numpy()
        assert np.abs(grads[r, :n] - g_ref).max() <= 1e-4 * max(np.abs(g_ref).max(), 1e-6)
        assert not cams[r, n:].any()  # no detection there: a zero map
    assert explained >= 8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_detections_lines_beside_hostile_files(det_graph: Path, tmp_path: Path,
                                                   json_lines: JsonLines) -> None:
    """A folder of shapes scenes with the hostile corpus beside them: one detections line per
    good image (boxes in original pixels find the scenes' true boxes; the top explain_top with
    per-box files, the overlay drawing the box), one errors line per bad file; images resized
    from 96 px keep their boxes in their own pixels."""
    src = tmp_path / "in"
    truth = write_samples(src, 21, 6)
    big = Image.open(src / "scene_000.png").resize((192, 144), Image.BILINEAR)
    big.save(src / "big_000.png")
    truth["big_000.png"] = [{"label": o["label"], "box": [o["box"][0] * 2, o["box"][1] * 1.5,
                                                          o["box"][2] * 2, o["box"][3] * 1.5]}
                            for o in truth["scene_000.png"]]
    write_corpus(src / "hostile")
    corpus = hostile_corpus()
    manifest = json.loads((src / "hostile" / "manifest.json").read_text())
    limit = 4_000_000
    bad = {str(src / "hostile" / m["file"]) for m in manifest
           if corpus[m["name"]].outcome(max_pixels=limit).type is not None}
    hostile_good = {str(src / "hostile" / m["file"]) for m in manifest} - bad
    listed = tmp_path / "hostile.txt"  # every corpus file, whatever its suffix
    listed.write_text("".join(f"{src / 'hostile' / m['file']}\n" for m in manifest))
    out = tmp_path / "out"
    assert main(["--model", str(det_graph), str(src), str(listed), "--out", str(out),
                 "--batch-size", "4",
                 "--threads", "1", "--workers", "2", "--max-pixels", str(limit),
                 "--save", "heatmap,overlay"]) == EXIT_PARTIAL
    lines = {Path(r["path"]).name: r for r in json_lines(out / "results.jsonl")}
    errors = json_lines(out / "errors.jsonl")
    assert {e["path"] for e in errors} == bad
    assert {r["path"] for r in json_lines(out / "results.jsonl")} == \
        {str(src / n) for n in truth} | hostile_good
    found = total = 0
    for name, objs in truth.items():
        line = lines[name]
        assert line["task"] == "detection" and line["method"] == "gradcam" and line["layer"] == "head"
        dets = line["detections"]
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
        for d in dets:
            assert d["label"] == CLASSES[d["index"]] and d["score"] >= 0.3
            assert 0 <= d["box"][0] < d["box"][2] <= line["width"]
            assert 0 <= d["box"][1] < d["box"][3] <= line["height"]
        explained = [d for d in dets if "explanation" in d]
        assert explained == dets[:min(5, len(dets))]
        for k, d in enumerate(explained):
            exp = d["explanation"]
            assert exp["method"] == "gradcam" and set(exp["files"]) == {"heatmap", "overlay"}
            assert exp["files"]["heatmap"].endswith(f".det{k}.heatmap.png")
            with Image.open(out / exp["files"]["heatmap"]) as hm:
                assert hm.size == (line["width"], line["height"])
            with Image.open(out / exp["files"]["overlay"]) as ov:
                x0, y0 = int(d["box"][0]), int(d["box"][1])
                assert ov.getpixel((min(x0 + 2, ov.size[0] - 1), y0)) == (255, 255, 255)
        for o in objs:
            total += 1
            found += any(d["label"] == o["label"] and _iou(np.array(d["box"]), np.array(o["box"])) >= 0.5
                         for d in dets)
    assert found >= 0.8 * total, (found, total)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_options_of_detection_graphs(det_graph: Path, tmp_path: Path, json_lines: JsonLines,
                                         capsys) -> None:
    """--explain-top 1 explains one box per image; eigencam maps are renormalised inside each box
    (zero outside it); --explain-top above the graph's, --metrics and --target are refused
    before any image."""
    src = tmp_path / "in"
    write_samples(src, 5, 3)
    (src / "boxes.json").unlink()
    out = tmp_path / "one"
    assert main(["--model", str(det_graph), str(src), "--out", str(out), "--threads", "1",
                 "--explain-top", "1", "--method", "eigencam"]) == 0
    for line in json_lines(out / "results.jsonl"):
        explained = [d for d in line["detections"] if "explanation" in d]
        assert len(explained) == 1 and explained[0]["explanation"]["method"] == "eigencam"
        hm = np.asarray(Image.open(out / explained[0]["explanation"]["files"]["heatmap"]))
        b = explained[0]["box"]  # box_heatmap's pixels: from floor(x0) to round(x1)
        x0, y0, x1, y1 = int(b[0]), int(b[1]), int(round(b[2])), int(round(b[3]))
        inside = hm[y0:y1, x0:x1]
        assert inside.max() == 255 and hm.sum() == inside.sum()
    for args, match in ((["--explain-top", "6"], "--explain-top: 6 .*0..5"),
                        (["--metrics", "deletion"], "--metrics: none applies"),
                        (["--target", "square"], "--target: the detection graph has no target")):
        assert main(["--model", str(det_graph), str(src), "--out", str(tmp_path / "x"), *args]) \
            == EXIT_USAGE
        assert __import__("re").search(match, capsys.readouterr().err)
    assert not (tmp_path / "x" / "results.jsonl").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_worker_writes_the_local_lines(det_graph: Path, tmp_path: Path,
                                           json_lines: JsonLines) -> None:
    """The Ray actor's batch function (in-process) gives the local job's detections lines and
    per-box files, byte for byte."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from camserve.onnx.ray import CamBatchWorker

    from .test_ray import _rows_of

    src = tmp_path / "in"
    write_samples(src, 9, 5)
    (src / "boxes.json").unlink()
    (src / "empty.png").write_bytes(b"")
    local = tmp_path / "local"
    cfg = JobConfig(model=det_graph, inputs=[str(src)], out=local, batch_size=2,
                    save=("heatmap", "overlay"))
    assert run_job(cfg).exit_status == EXIT_PARTIAL
    out = tmp_path / "ray"
    worker = CamBatchWorker(plan_job(JobConfig(model=det_graph, inputs=[str(src)], out=out,
                                               save=("heatmap", "overlay"))))
    rows = worker(_rows_of(list(iter_inputs([str(src)]))))
    got = [json.loads(t) for t, ok in zip(rows["line"], rows["ok"]) if ok]
    assert sorted(got, key=lambda r: r["path"]) == sorted(json_lines(local / "results.jsonl"),
                                                          key=lambda r: r["path"])
    assert sum(not ok for ok in rows["ok"]) == 1
    for line in got:
        for d in line["detections"]:
            for rel in d.get("explanation", {}).get("files", {}).values():
                assert (out / rel).read_bytes() == (local / rel).read_bytes()


# -- gradient-free graphs of detectors with NMS / RoIAlign decoding -----------------------------------

TV_SIZE = (96, 128)  # non-square
#: torchvision families (random weights, threshold 0): SSDlite's random heads score every box
#: alike (ties: NMS may keep another of the equal boxes), so its detections are not compared
TV_FAMILIES = [
    ("fasterrcnn_mobilenet_v3_large_fpn", True),
    ("ssdlite320_mobilenet_v3_large", False),
    pytest.param("fasterrcnn_resnet50_fpn", True, marks=[pytest.mark.slow, pytest.mark.zoo]),
    pytest.param("fasterrcnn_resnet50_fpn_v2", True, marks=[pytest.mark.slow, pytest.mark.zoo]),
    pytest.param("maskrcnn_resnet50_fpn", True, marks=[pytest.mark.slow, pytest.mark.zoo]),
    pytest.param("retinanet_resnet50_fpn", True, marks=[pytest.mark.slow, pytest.mark.zoo]),
    pytest.param("fcos_resnet50_fpn", True, marks=[pytest.mark.slow, pytest.mark.zoo]),
    pytest.param("ssd300_vgg16", True, marks=[pytest.mark.slow, pytest.mark.zoo]),
]


def _tv_detector(arch: str):
    from camserve.models import ModelSpec, load_model

    spec = ModelSpec.from_config({"arch": f"torchvision.models.{arch}", "num_classes": 4,
                                  "task": "detection", "input_size": list(TV_SIZE),
                                  "score_threshold": 0.0, "max_detections": 30, "explain_top": 3})
    torch.manual_seed(0)
    return load_model(spec)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch,untied", TV_FAMILIES)
def test_torchvision_detectors_export_gradient_free(arch: str, untied: bool, tmp_path: Path) -> None:
    """Every torchvision family exports for inference with its activations and EigenCAM (batch
    size 1, no gradients output); activations and maps match PyTorch, and so do the detections
    where scores are not tied. A method that needs gradients is refused, naming the usable
    ones."""
    from camserve.onnx.export import gradient_free_methods
    from camserve.onnx.translate import ExportError

    lm = _tv_detector(arch)
    info = export_cam_onnx(lm, tmp_path / "g.onnx", methods=("eigencam",), threads=1)
    assert info.exporter == "torchscript" and info.outputs == ["detections", "activations", "cam"]
    assert info.gradients is False
    assert gradient_free_methods(lm) == ("eigencam",)  # what --gradient-free picks for a detector
    errors = info.errors["random"]
    assert errors["activations"] <= 1e-4 and errors["cam"] <= 1e-4
    if untied:
        assert errors["detections_mismatch"] == 0.0 and errors["detections"] <= 1e-4
    sess = ort_session(info.path, threads=1)
    assert sess.get_inputs()[0].shape == [1, 3, *TV_SIZE]
    dets, cam = sess.run(["detections", "cam"], {"input": np.random.default_rng(0).random(
        (1, 3, *TV_SIZE), dtype=np.float32)})
    assert dets.shape == (1, 30, 6) and (dets[0, :, 5] >= 0).any()
    assert cam.shape[:2] == (1, 3) and np.array_equal(cam[0, 0], cam[0, 2])  # one map, every box
    assert GraphMeta.from_file(info.path).task.graph_top == 3
    with pytest.raises(ExportError, match="no ONNX gradient.*'gradcam'.*eigencam"):
        export_cam_onnx(lm, tmp_path / "x.onnx", methods=("gradcam",))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_over_a_gradient_free_graph(tmp_path: Path, json_lines: JsonLines) -> None:
    """A batch-size-1 graph runs image by image inside batches of 3: every image gets its
    detections line, each explained box its own map renormalised inside the box."""
    lm = _tv_detector("fasterrcnn_mobilenet_v3_large_fpn")
    graph = export_cam_onnx(lm, tmp_path / "g.onnx", methods=("eigencam",), threads=1).path
    src = tmp_path / "in"
    write_samples(src, 4, 5)
    (src / "boxes.json").unlink()
    (src / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["--model", str(graph), str(src), "--out", str(out), "--batch-size", "3",
                 "--threads", "1", "--save", "heatmap"]) == EXIT_PARTIAL
    lines = json_lines(out / "results.jsonl")
    assert len(lines) == 5 and len(json_lines(out / "errors.jsonl")) == 1
    for line in lines:
        explained = [d for d in line["detections"] if "explanation" in d]
        assert len(explained) == 3 and line["method"] == "eigencam"
        for d in explained:
            hm = np.asarray(Image.open(out / d["explanation"]["files"]["heatmap"]))
            b = d["box"]
            inside = hm[int(b[1]):int(round(b[3])), int(b[0]):int(round(b[2]))]
            assert hm.sum() == inside.sum()


def _hf_detector(tmp_path: Path, kind: str):
    from tests.tasks.test_detection_hf import _detr, _folder, _rtdetr

    return _folder(tmp_path, {"detr": _detr, "rt_detr": _rtdetr}[kind])


def _yolo_detector(tmp_path: Path, kind: str):
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("ultralytics")
    if spec is None:
        pytest.skip("ultralytics (camserve[yolo]) is missing")
    cfg = Path(list(spec.submodule_search_locations)[0]) / "cfg" / "models" / "v8" / "yolov8.yaml"
    shutil.copy(cfg, tmp_path / "yolov8n.yaml")
    (tmp_path / "model-config.yaml").write_text(
        "handler:\n  arch: yolo:yolov8n.yaml\n  task: detection\n  num_classes: 3\n"
        "  score_threshold: 0.0\n  input_size: [64, 96]\n")
    torch.manual_seed(0)
    return load_model_dir(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind,build", [("detr", _hf_detector), ("rt_detr", _hf_detector),
                                        ("yolov8", _yolo_detector)])
def test_hf_and_yolo_detectors_export_gradient_free_and_run_in_the_job(kind, build, tmp_path: Path,
                                                                       json_lines: JsonLines) -> None:
    """Hugging Face DETR / RT-DETR (their image processor's post-processing) and Ultralytics YOLO
    (its NMS) export as gradient-free detection graphs like the torchvision families: activations
    and EigenCAM within 1e-4 of PyTorch, and the batch job writes a detections line per image."""
    lm = build(tmp_path / "folder" if kind != "yolov8" else tmp_path, kind)
    info = export_cam_onnx(lm, tmp_path / "g.onnx", methods=("eigencam",), threads=1)
    assert info.exporter == "torchscript" and info.gradients is False
    assert info.outputs == ["detections", "activations", "cam"]
    errors = info.errors["random"]
    assert errors["activations"] <= 1e-4 and errors["cam"] <= 1e-4
    src = tmp_path / "in"
    write_samples(src, 2, 3)
    (src / "boxes.json").unlink()
    out = tmp_path / "out"
    assert main(["--model", str(info.path), str(src), "--out", str(out), "--threads", "1",
                 "--save", "heatmap"]) == 0
    lines = json_lines(out / "results.jsonl")
    assert len(lines) == 3 and all(line["method"] == "eigencam" for line in lines)
    assert all(len(line["detections"]) > 0 for line in lines)
