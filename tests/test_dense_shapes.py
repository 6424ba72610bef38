"""tools.dense_shapes: images of one to three shapes with known masks, the dense default folders
(models/shapes-seg, models/shapes-multi), their metrics, training and evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tools import dense_shapes as D
from tools.shapes import CLASSES

ROOT = Path(__file__).resolve().parents[1]


def test_same_seed_same_images_and_masks_fit_the_labels() -> None:
    a, b = D.make_dense_dataset(3, 12), D.make_dense_dataset(3, 12)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.classes, b.classes)
    assert not np.array_equal(a.images, D.make_dense_dataset(4, 12).images)
    counts = (a.labels >= 0).sum(1)
    assert set(counts) <= {1, 2, 3} and len(set(counts)) > 1
    for i in range(len(a)):
        present = sorted(int(v) + 1 for v in a.labels[i] if v >= 0)
        assert sorted(set(np.unique(a.classes[i])) - {0}) == present
        for j in range(counts[i]):  # each class's pixels lie inside its object's box
            x0, y0, x1, y1 = a.boxes[i, j]
            ys, xs = np.nonzero(a.classes[i] == a.labels[i, j] + 1)
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    hot = a.multi_hot()
    assert hot.shape == (12, len(CLASSES)) and (hot.sum(1) == counts).all()


def test_train_and_evaluate_streams_differ() -> None:
    assert not np.array_equal(D.make_dense_dataset(0, 4).images,
                              D.make_dense_dataset(0, 4, stream="evaluate").images)


def test_iou_and_average_precision() -> None:
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    truth = np.array([[0, 1, 2], [2, 2, 0]])
    iou = D.iou_per_class(pred, truth, 4)
    assert iou[:3].tolist() == [1.0, 0.5, 2 / 3] and np.isnan(iou[3])
    assert D.average_precision(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0
    assert D.average_precision(np.array([0.1, 0.9]), np.array([1, 0])) == 0.5
    assert np.isnan(D.average_precision(np.array([0.1]), np.array([0])))


@pytest.mark.parametrize("folder,task,n", [("shapes-seg", "segmentation", 9),
                                           ("shapes-multi", "multilabel", 8)])
def test_committed_folders_load_as_the_server_loads_them(folder: str, task: str, n: int) -> None:
    loaded = D.load_model(ROOT / "models" / folder)
    assert loaded.spec.task == task and loaded.num_classes == n
    assert loaded.layer == ("encoder" if task == "segmentation" else "features")
    state = torch.load(ROOT / "models" / folder / "weights.pt", weights_only=True)
    assert sum(v.numel() for v in state.values()) < 1_000_000  # small, committed
    with torch.inference_mode():
        out = loaded.model(torch.zeros(2, 3, 96, 96))
    assert out.shape == ((2, 9, 96, 96) if task == "segmentation" else (2, 8))


def test_read_spec_refuses_another_task(tmp_path: Path) -> None:
    from camserve.models import ConfigError

    with pytest.raises(ConfigError, match="not a shapes multilabel model"):
        D.read_spec(ROOT / "models" / "shapes-seg", "multilabel")


def test_evaluate_prints_one_json_line(capsys) -> None:
    """The command line's last line is the JSON report (few images: this checks the shape)."""
    assert D.main(["evaluate", "--model", str(ROOT / "models" / "shapes-seg"), "--seed", "7",
                   "--n", "6", "--methods", "gradcam,eigencam", "--threads", "1"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["task"] == "segmentation" and 0 <= rep["miou"] <= 1
    assert set(rep["energy_in_mask"]) == {"gradcam", "eigencam"} and rep["n"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("folder,key,bar", [("shapes-seg", "miou", 0.85),
                                            ("shapes-multi", "map", 0.95)])
def test_trained_defaults_meet_their_bars_on_an_unseen_seed(folder: str, key: str, bar: float) -> None:
    rep = D.evaluate(ROOT / "models" / folder, 1234, methods=["gradcam"])
    assert rep[key] >= bar, rep


@pytest.mark.train
@pytest.mark.parametrize("task", D.TASKS)
def test_train_writes_a_folder_the_server_loads(task: str, tmp_path: Path) -> None:
    src = D.DEFAULT_DIRS[task]
    for name in ("model.py", "model-config.yaml"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    rep = D.train(tmp_path, task, n=16, epochs=1, batch_size=8)
    assert rep.steps == 2 and all(f.is_file() for f in rep.files)
    assert D.load_model(tmp_path).spec.task == task
    with pytest.raises(ValueError, match="invalid value for epochs"):
        D.train(tmp_path, task, epochs=0)
