"""Ultralytics YOLO detectors (camserve[yolo]): built from a model yaml with random weights and
from a .pt checkpoint, their layer located, per-box Grad-CAM equal to an independent hook on
the head's raw output."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from camserve import CamEngine
from camserve.models import ConfigError, load_model_dir
from camserve.tasks import make_task
from camserve.tasks.detection import detection_targets

_SPEC = importlib.util.find_spec("ultralytics")  # not imported at collection: it patches Pillow
SIZE = (64, 96)
CFG = Path(list(_SPEC.submodule_search_locations)[0]) / "cfg" / "models" if _SPEC else Path(".")
pytestmark = [pytest.mark.slow,  # building a YOLO model takes seconds
              pytest.mark.skipif(_SPEC is None, reason="ultralytics (camserve[yolo]) is missing")]


def _folder(tmp_path, src, name, size=SIZE):
    shutil.copy(src, tmp_path / name)
    (tmp_path / "model-config.yaml").write_text(
        f"handler:\n  arch: yolo:{name}\n  task: detection\n  num_classes: 3\n"
        f"  score_threshold: 0.0\n  input_size: [{size[0]}, {size[1]}]\n")
    torch.manual_seed(0)
    return load_model_dir(tmp_path)


@pytest.mark.parametrize("yaml,name,layer", [
    (CFG / "v8" / "yolov8.yaml", "yolov8n.yaml", "model.9"),
    (CFG / "11" / "yolo11.yaml", "yolo11n.yaml", "model.10"),
])
def test_yolo_yaml_layer_and_gradcam_equal_an_independent_hook(tmp_path, yaml, name, layer):
    from PIL import Image

    lm = _folder(tmp_path, yaml, name)
    assert Image.open.__module__ == "PIL.Image"  # Ultralytics' replacement undone
    assert lm.layer == layer and lm.num_classes == 3 and lm.spec.mean == (0.0, 0.0, 0.0)
    model = lm.model.double()
    task = make_task("detection", lm.labels, lm.spec.task_settings)
    eng = CamEngine(model, lm.layer, reshape=lm.reshape, task=task)
    x = torch.rand(1, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = eng.predict(x)[0]
    assert len(out) > 2
    rows = [[(int(out.labels[j]), out.boxes[j].tolist(), "score") for j in (0, 1)]]
    cams = eng(x, targets=detection_targets(rows, dtype=torch.float64), method="gradcam").cams
    acts = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        y = type(model).__mro__[1].forward(model, x.clone().requires_grad_(True))[0][0]
    finally:
        handle.remove()
    xy, wh = y[:2].T, y[2:4].T
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1).detach()
    for k, j in enumerate((0, 1)):
        a = int((boxes - out.boxes[j]).abs().sum(1).argmin())
        value = y[4 + int(out.labels[j]), a]
        (g,) = torch.autograd.grad(value, acts[0], retain_graph=True)
        ref = torch.relu((g[0].mean(dim=(-2, -1), keepdim=True) * acts[0][0]).sum(0))
        torch.testing.assert_close(cams[0, k], ref.detach(), rtol=1e-6, atol=1e-14)


def test_yolo_checkpoint_and_input_size_rules(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    raw = DetectionModel(str(CFG / "v8" / "yolov8.yaml"), nc=3, verbose=False)
    torch.save({"model": raw}, tmp_path / "best.pt")
    (tmp_path / "model-config.yaml").write_text(
        "handler:\n  arch: yolo:best.pt\n  task: detection\n  score_threshold: 0.0\n"
        f"  input_size: [{SIZE[0]}, {SIZE[1]}]\n")
    lm = load_model_dir(tmp_path)
    assert lm.layer == "model.9" and lm.num_classes == 3
    bad = tmp_path / "odd"
    bad.mkdir()
    with pytest.raises(ConfigError, match="multiples of 32"):
        _folder(bad, CFG / "v8" / "yolov8.yaml", "yolov8n.yaml", size=(60, 96))
