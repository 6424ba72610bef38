"""camserve.tasks.detection: normalised detections, per-box targets (score and iou+score),
families with their layer, parity with an independent hook implementation for every family and
with pytorch-grad-cam's FasterRCNNBoxScoreTarget, and the boxes option."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from camserve import CamEngine
from camserve.errors import OptionError
from camserve.models import ConfigError, ModelSpec, load_model
from camserve.tasks import Detection, Geometry, TaskError, make_task
from camserve.tasks.detection import detection_targets, parse_boxes

LABELS = ["bg", "cat", "dog", "bird"]

#: every torchvision family; the slow ones (ResNet-50 backbones) outside the fast tier
FAMILIES = [
    ("fasterrcnn_mobilenet_v3_large_fpn", "backbone.body.16"),
    ("ssdlite320_mobilenet_v3_large", "backbone.features.0"),
    pytest.param("fasterrcnn_resnet50_fpn", "backbone.body.layer4", marks=pytest.mark.slow),
    pytest.param("fasterrcnn_resnet50_fpn_v2", "backbone.body.layer4", marks=pytest.mark.slow),
    pytest.param("maskrcnn_resnet50_fpn", "backbone.body.layer4", marks=pytest.mark.slow),
    pytest.param("retinanet_resnet50_fpn", "backbone.body.layer4", marks=pytest.mark.slow),
    pytest.param("fcos_resnet50_fpn", "backbone.body.layer4", marks=pytest.mark.slow),
    pytest.param("ssd300_vgg16", "backbone.features", marks=pytest.mark.slow),
]
SIZE = (96, 128)  # non-square, a multiple of 32


def _raw(boxes, scores, labels):
    return [{"boxes": torch.tensor(boxes, dtype=torch.float64, requires_grad=True),
             "scores": torch.tensor(scores, dtype=torch.float64, requires_grad=True),
             "labels": torch.tensor(labels)}]


def test_settings_are_validated_and_the_config_takes_them():
    task = Detection(LABELS)
    assert (task.score_threshold, task.max_detections, task.explain_top, task.box_target) == \
        (0.5, 100, 5, "score")
    for key, bad in (("score_threshold", 1.5), ("max_detections", 0), ("box_target", "iou"),
                     ("explain_top", "x"), ("box_normalize", "maybe"), ("nms_iou", float("nan"))):
        with pytest.raises(TaskError, match=f"handler.{key}"):
            Detection(LABELS, {key: bad})
    spec = ModelSpec.from_config({"arch": "x:Y", "task": "detection", "score_threshold": 0.2,
                                  "box_target": "iou+score"})
    assert spec.task_settings == {"score_threshold": 0.2, "box_target": "iou+score"}
    with pytest.raises(ConfigError, match="handler.score_threshold: it is a key of another task"):
        ModelSpec.from_config({"arch": "x:Y", "score_threshold": 0.2})
    with pytest.raises(ConfigError, match="handler.box_target"):
        ModelSpec.from_config({"arch": "x:Y", "task": "detection", "box_target": "area"})


def test_output_filters_sorts_and_keeps_the_graph():
    task = Detection(LABELS, {"score_threshold": 0.3, "max_detections": 2})
    raw = _raw([[0, 0, 10, 10], [5, 5, 30, 20], [1, 1, 4, 4], [2, 2, 9, 9]],
               [0.4, 0.9, 0.1, 0.6], [1, 2, 1, 3])
    out = task.output(raw)
    assert out[0].scores.tolist() == [0.9, 0.6] and out[0].labels.tolist() == [2, 3]
    assert out[0].scores.requires_grad and out[0].boxes.requires_grad
    nms = Detection(LABELS, {"score_threshold": 0.0, "nms_iou": 0.3}).output(
        _raw([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]], [0.9, 0.8, 0.7], [1, 1, 2]))
    assert nms[0].scores.tolist() == [0.9, 0.7]  # same label suppressed, other label kept
    with pytest.raises(TaskError, match="boxes', 'scores' and 'labels'"):
        task.output([{"boxes": torch.zeros(0, 4)}])
    with pytest.raises(TaskError, match="list of"):
        task.output(torch.zeros(2, 3))


def test_score_targets_match_by_label_then_iou_and_iou_score_as_pytorch_grad_cam():
    task = Detection(LABELS, {"score_threshold": 0.0})
    out = task.output(_raw([[0, 0, 10, 10], [0, 0, 10, 11], [40, 40, 60, 60]],
                           [0.9, 0.8, 0.7], [1, 2, 1]))
    ref = [0.0, 0.0, 10.0, 11.0]
    rows = [[(2, ref, "score"), (1, ref, "score"), (3, ref, "score"), (1, [40, 40, 50, 50], "score")],
            [(2, ref, "iou+score"), (1, ref, "iou+score")]]
    tb = detection_targets(rows, dtype=torch.float64)
    s = task.scores(task.output(_raw([[0, 0, 10, 10], [0, 0, 10, 11], [40, 40, 60, 60]],
                                     [0.9, 0.8, 0.7], [1, 2, 1])) * 2, tb)
    # score: same label, highest IoU > 0.5; unknown label or IoU 0.25 -> 0
    assert s[0].tolist() == pytest.approx([0.8, 0.9, 0.0, 0.0])
    # iou+score: highest IoU whatever the label (the dog box, IoU 1), counted only for label 2
    assert s[1, :2].tolist() == pytest.approx([1.0 + 0.8, 0.0])
    g_score = torch.autograd.grad(task.scores(out, detection_targets([rows[0][:1]], dtype=torch.float64)).sum(),
                                  [out[0].boxes, out[0].scores], allow_unused=True)
    assert g_score[0] is None or float(g_score[0].abs().sum()) == 0.0
    g_iou = torch.autograd.grad(task.scores(out, detection_targets([[(2, [0, 0, 10, 12], "iou+score")]],
                                                                   dtype=torch.float64)).sum(),
                                out[0].boxes)[0]
    assert float(g_iou[1].abs().sum()) > 0 and float(g_iou[0].abs().sum()) == 0


def test_no_detection_scores_zero_with_a_graph():
    task = Detection(LABELS)
    out = task.output(_raw(np.zeros((0, 4)).tolist(), [], []))
    s = task.scores(out, detection_targets([[(1, [0, 0, 5, 5], "iou+score")]], dtype=torch.float64))
    assert s.tolist() == [[0.0]] and s.requires_grad
    assert task.default_targets(out).count == (0,)


def test_boxes_option_parser():
    ok = parse_boxes('[{"label": "Dog", "box": [1, 2, 30.5, 40]}, {"label": 3, "box": [0, 0, 1, 1]}]',
                     LABELS, max_targets=4)
    assert [(b.label, b.box) for b in ok] == [(2, (1.0, 2.0, 30.5, 40.0)), (3, (0.0, 0.0, 1.0, 1.0))]
    assert parse_boxes("", LABELS, max_targets=4) is None
    bad = {
        "[": "not JSON", "[]": "empty list", "5": "a list of", '[[1, 2, 3, 4]]': "an object",
        '[{"label": "cat"}]': "needs 'label' and 'box'",
        '[{"label": "cow", "box": [0, 0, 1, 1]}]': "unknown label",
        '[{"label": 9, "box": [0, 0, 1, 1]}]': "out of range",
        '[{"label": true, "box": [0, 0, 1, 1]}]': "a label or a class index",
        '[{"label": "cat", "box": [0, 0, 1]}]': "four finite numbers",
        '[{"label": "cat", "box": [0, 0, 1, "2"]}]': "four finite numbers",
        '[{"label": "cat", "box": [0, 0, 1, 1e999]}]': "four finite numbers",
        '[{"label": "cat", "box": [-1, 0, 1, 1]}]': "coordinates in",
        '[{"label": "cat", "box": [3, 0, 3, 1]}]': "x0 < x1",
        '[{"label": "cat", "box": [0, 0, 1, 1], "score": 1}]': "unknown key",
        json.dumps([{"label": "cat", "box": [0, 0, 1, 1]}] * 5): "5 boxes (at most 4",
        "[" * 5000 + "]" * 5000: "not JSON",
    }
    for text, what in bad.items():
        with pytest.raises(OptionError, match="invalid value for boxes") as info:
            parse_boxes(text, LABELS, max_targets=4)
        assert what in str(info.value) and len(str(info.value)) < 300


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=5) | st.dictionaries(
                         st.sampled_from(["label", "box", "x"]), kids, max_size=3), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(value=_JSON)
def test_boxes_parser_takes_anything_and_answers_boxes_or_a_422(value):
    for form in (value, json.dumps(value)):
        try:
            got = parse_boxes(form, LABELS, max_targets=4)
        except OptionError as exc:
            assert str(exc).startswith("invalid value for boxes") and len(str(exc)) < 400
            continue
        for b in got or ():
            assert 0 <= b.label < len(LABELS) and b.box[0] < b.box[2] and b.box[1] < b.box[3]


@settings(max_examples=100, deadline=None)
@given(boxes=st.lists(st.tuples(st.sampled_from(LABELS), st.floats(0, 500), st.floats(0, 500),
                                st.floats(0.01, 500), st.floats(0.01, 500)), min_size=1, max_size=4))
def test_valid_boxes_round_trip(boxes):
    items = [{"label": lab, "box": [x, y, x + w, y + h]} for lab, x, y, w, h in boxes]
    got = parse_boxes(json.dumps(items), LABELS, max_targets=4)
    assert [LABELS[b.label] for b in got] == [i["label"] for i in items]
    assert [list(b.box) for b in got] == [i["box"] for i in items]


# -- families ---------------------------------------------------------------------------------

def _detector(arch, dtype=torch.float64, **keys):
    if "rcnn" in arch:  # 100 proposals, not 1000: the float64 box head dominates otherwise
        keys.setdefault("arch_args", {"rpn_post_nms_top_n_test": 100})
    spec = ModelSpec.from_config({"arch": f"torchvision.models.{arch}", "num_classes": 4,
                                  "task": "detection", "score_threshold": 0.0,
                                  "input_size": list(SIZE), **keys})
    torch.manual_seed(0)
    lm = load_model(spec)
    lm.model.to(dtype)
    return lm, make_task("detection", LABELS, spec.task_settings)


def _independent_gradcams(model, layer, x, items):
    """Grad-CAM of detections ``items`` ((image, box, label) each) by a plain forward hook, one
    forward for all: each raw output entry is found by its box and label (exact equality), its
    score differentiated by autograd."""
    acts = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        out = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    maps = []
    for image, box, label in items:
        d = out[image]
        hit = ((d["boxes"].detach() == box).all(1) & (d["labels"] == label)).nonzero()[0, 0]
        (g,) = torch.autograd.grad(d["scores"][hit], acts[0], retain_graph=True)
        maps.append(torch.relu((g[image].mean(dim=(-2, -1), keepdim=True) * acts[0][image]).sum(0)))
    return maps


@pytest.mark.parametrize("arch,layer", FAMILIES)
def test_family_layer_and_per_box_gradcam_equal_an_independent_hook(arch, layer):
    lm, task = _detector(arch)
    assert lm.layer == layer and lm.num_classes == 4 and lm.layout == "nchw"
    model = lm.model
    x = torch.rand(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eng = CamEngine(model, lm.layer, reshape=lm.reshape, task=task)
    out = eng.predict(x)
    assert all(len(d) > 2 for d in out), "thresholds at 0: a random detector finds boxes"
    rows = [[(int(out[0].labels[j]), out[0].boxes[j].tolist(), "score") for j in (0, 2)],
            [(int(out[1].labels[0]), out[1].boxes[0].tolist(), "score")]]
    res = eng(x, targets=detection_targets(rows, dtype=torch.float64), method="gradcam")
    assert res.cams.shape[:2] == (2, 2)
    where = [(r, k) for r, items in enumerate(rows) for k in range(len(items))]
    refs = _independent_gradcams(model, lm.layer, x, [(r, torch.tensor(rows[r][k][1], dtype=torch.float64),
                                                        rows[r][k][0]) for r, k in where])
    for (r, k), ref in zip(where, refs):
        torch.testing.assert_close(res.cams[r, k], ref, rtol=1e-6, atol=1e-12 * float(ref.detach().abs().max()))
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_named_layer_overrides_the_family_default():
    lm, _ = _detector("ssdlite320_mobilenet_v3_large", target_layer="backbone.features.1")
    assert lm.layer == "backbone.features.1" and lm.grid == (10, 10)  # SSD keeps its fixed 320 square
    with pytest.raises(ConfigError, match="handler.target_layer"):
        _detector("ssdlite320_mobilenet_v3_large", target_layer="backbone.nope")


@pytest.mark.slow
def test_iou_score_equals_pytorch_grad_cam_box_score_target_on_faster_rcnn():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    lm, _ = _detector("fasterrcnn_resnet50_fpn")
    task = make_task("detection", LABELS, {"score_threshold": 0.0, "box_target": "iou+score"})
    model = lm.model
    eng = CamEngine(model, lm.layer, reshape=lm.reshape, task=task)
    for seed in range(3, 40):  # an input where both random-weight maps are not all zero
        x = torch.rand(1, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        out = eng.predict(x)[0]
        # reference boxes: a predicted box exactly (the IoU kink: min/max ties split gradients,
        # the same in both) and a shifted one; float32-representable, as pytorch-grad-cam makes
        # them so
        refs = [out.boxes[0].float().double(),
                (out.boxes[1] + torch.tensor([1.5, -1.0, 2.0, 0.5], dtype=torch.float64)).float().double()]
        labels = [int(out.labels[0]), int(out.labels[1])]
        rows = [[(lab, b.tolist(), "iou+score") for lab, b in zip(labels, refs)]]
        res = eng(x, targets=detection_targets(rows, dtype=torch.float64), method="gradcam")
        if bool((res.cams.flatten(2).amax(-1) > 0).all()):
            break
    ours = res.heatmaps(SIZE)
    for k in range(2):
        target = FasterRCNNBoxScoreTarget(labels=[labels[k]], bounding_boxes=[refs[k].numpy()])
        with GradCAM(model=model, target_layers=[model.get_submodule(lm.layer)]) as cam:
            ref = cam(x.clone().requires_grad_(True), targets=[target])  # frozen parameters
        assert float(ref.max()) > 0
        np.testing.assert_allclose(ours[0, k].numpy(), ref[0], rtol=1e-6, atol=1e-6)


def test_geometry_maps_detections_to_original_pixels():
    task = Detection(LABELS, {"score_threshold": 0.0})
    out = task.output(_raw([[10, 20, 50, 60]], [0.9], [1]))
    geo = Geometry((400, 200), (100, 200))  # original W, H = 400 x 200; input H, W = 100 x 200
    p = task.parse_options({}, max_targets=16)
    body = task.answer(out[0], p, 5, geo, None)
    assert body == {"detections": [{"box": [20.0, 40.0, 100.0, 120.0], "label": "cat", "index": 1,
                                    "score": 0.9}]}
    asked = task.parse_options({"boxes": [{"label": "cat", "box": [24, 40, 100, 124]}]}, max_targets=16)
    tb = task.request_targets(task.detach(out), [asked], [geo], [5])
    assert tb.box[0, 0].tolist() == [12.0, 20.0, 50.0, 62.0]
    shown = task.shown(out[0], tb, 0, geo)
    assert shown[0].box == (20.0, 40.0, 100.0, 120.0) and shown[0].score == pytest.approx(0.9)
    body = task.answer(out[0], asked, 5, geo, [{"method": "gradcam"}])
    assert body["detections"][0]["explanation"] == {"method": "gradcam"}
    assert body["detections"][0]["requested"] == 0
    miss = task.parse_options({"boxes": [{"label": "dog", "box": [24, 40, 100, 124]}]}, max_targets=16)
    body = task.answer(out[0], miss, 5, geo, [{"method": "gradcam"}])
    assert body["detections"][1]["matched"] is False and body["detections"][1]["score"] == 0.0


def test_the_core_never_imports_ultralytics(tmp_path):
    """AGPL: serving a non-YOLO detector (and importing every core module) leaves ultralytics
    unimported."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "import camserve, camserve.serving, camserve.sources, camserve.families\n"
            "from camserve.tasks.detectors import family_of\n"
            "from camserve.models import ModelSpec, load_model\n"
            "spec = ModelSpec.from_config({'arch': 'torchvision.models.ssdlite320_mobilenet_v3_large',"
            " 'num_classes': 3, 'task': 'detection', 'input_size': [64, 64]})\n"
            "lm = load_model(spec)\n"
            "assert family_of(lm.model).name == 'torchvision SSD'\n"
            "print('ultralytics' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_scaffold_writes_and_explains_a_detector_folder(tmp_path, capsys):
    from camserve.scaffold import main

    folder = tmp_path / "det"
    assert main([str(folder), "--task", "detection", "--arch",
                 "torchvision.models.ssdlite320_mobilenet_v3_large", "--num-classes", "3",
                 "--input-size", "320", "--score-threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "layer:  backbone.features.0" in out and "grid:   20x20" in out
    cfg = (folder / "model-config.yaml").read_text()
    assert "task: detection" in cfg and "score_threshold: 0.0" in cfg
    assert main([str(tmp_path / "c"), "--arch", "torchvision.models.resnet18", "--num-classes",
                 "2", "--score-threshold", "0.5", "--quiet"]) == 2
