"""tools.shapes_det: scenes with known boxes, the COCO-style AP, the training and evaluation CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tools.shapes import MAX_OBJECTS
from tools.shapes_det import (average_precision, main, make_scenes, map50, match_detections,
                              scene_targets)


def test_scenes_are_seeded_with_one_to_four_different_classes():
    a, b = make_scenes(3, 20, stream="evaluate"), make_scenes(3, 20, stream="evaluate")
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, make_scenes(3, 1, stream="train")[0].image)
    assert {len(s.labels) for s in a} <= set(range(1, MAX_OBJECTS + 1)) and len({len(s.labels) for s in a}) > 1
    assert all(len(set(s.labels)) == len(s.labels) for s in a)


def test_targets_put_each_object_at_its_centre_cell():
    s = make_scenes(1, 4)
    heat, boxes, mask = scene_targets(s, (12, 12))
    assert int(mask.sum()) == sum(len(x.labels) for x in s)
    assert int((heat == 1).sum()) == int(mask.sum())
    i, y, x = (int(v[0]) for v in np.nonzero(mask))
    assert list(boxes[i, :, y, x]) in [list(b) for b in s[i].boxes]


def test_map50_perfect_missed_and_false_positive():
    scenes = make_scenes(2, 6, stream="evaluate")
    perfect = [(np.asarray(s.boxes, float), np.linspace(1, 0.5, len(s.labels)), np.asarray(s.labels))
               for s in scenes]
    assert map50(perfect, scenes) == pytest.approx(1.0)
    wrong = [(b, sc, (lab + 1) % 8) for b, sc, lab in perfect]
    assert map50(wrong, scenes) == 0.0
    assert [list(m) for m in match_detections(perfect, scenes)] == \
        [list(range(len(s.labels))) for s in scenes]
    assert average_precision(np.array([]), np.array([])) == 0.0


@pytest.mark.train
def test_train_and_evaluate_cli_on_a_copy_of_the_folder(tmp_path, repo_root, capsys):
    folder = tmp_path / "det"
    folder.mkdir()
    for name in ("model.py", "model-config.yaml"):
        shutil.copy(repo_root / "models" / "shapes-det" / name, folder / name)
    assert main(["train", "--out", str(folder), "--n", "128", "--epochs", "1"]) == 0
    assert (folder / "weights.pt").is_file() and (folder / "index_to_name.json").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(folder), "--seed", "5", "--n", "8",
                 "--methods", "gradcam"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= line["map50"] <= 1.0 and set(line["box_pointing"]) == {"gradcam"}
