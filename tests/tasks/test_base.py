"""camserve.tasks.base and the registry: targets as data, geometry, the task registry."""
from __future__ import annotations

import pytest
import torch

from camserve.tasks import (Classification, Geometry, TargetBatch, TaskError, available_tasks,
                            get_task, make_task, task_config_keys)


def test_target_batch_pads_counts_and_allows_empty_rows():
    t = TargetBatch.of_classes([[3, 1, 2], [], [5]])
    assert t.index.tolist() == [[3, 1, 2], [0, 0, 0], [5, 5, 5]] and t.count == (3, 0, 1)
    assert (t.rows, t.k) == (3, 3)


def test_target_batch_select_and_repeat_carry_every_tensor():
    region = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    t = TargetBatch.of_classes([[1, 2], [3]], region=region)
    s = t.select(torch.tensor([1]))
    assert s.index.tolist() == [[3, 3]] and s.count == (1,)
    torch.testing.assert_close(s.region, region[1:])
    r = t.repeat(3)
    assert r.count == (2, 2, 2, 1, 1, 1) and r.index[3:].tolist() == [[3, 3]] * 3
    torch.testing.assert_close(r.region[4], region[1])


@pytest.mark.parametrize("kw,match", [
    ({"index": torch.zeros(2, dtype=torch.long), "count": (1, 1)}, "index must be"),
    ({"index": torch.zeros(2, 1), "count": (1, 1)}, "index must be"),
    ({"index": torch.zeros(2, 1, dtype=torch.long), "count": (1,)}, "1 counts for 2 rows"),
    ({"index": torch.zeros(2, 1, dtype=torch.long), "count": (1, 1),
      "box": torch.zeros(2, 2, 4)}, "box of shape"),
])
def test_target_batch_refuses_shapes_that_do_not_fit(kw, match):
    with pytest.raises(TaskError, match=match):
        TargetBatch(**kw)


def test_geometry_maps_boxes_both_ways():
    g = Geometry((640, 480), (240, 320))  # image W, H; input H, W
    assert g.scale == (2.0, 2.0)
    assert g.box_to_image([10, 20, 30, 40]) == [20.0, 40.0, 60.0, 80.0]
    assert g.box_to_input(g.box_to_image([10, 20, 30, 40])) == [10.0, 20.0, 30.0, 40.0]
    assert g.box_to_image([-5, 0, 400, 300]) == [0.0, 0.0, 640.0, 480.0]  # clipped


def test_registry_names_the_known_tasks():
    assert {"classification", "multilabel"} <= set(available_tasks())
    assert get_task(" Classification ") is Classification
    with pytest.raises(TaskError, match="invalid value for task: 'clasification' .known: "):
        get_task("clasification")
    assert "threshold" in task_config_keys()
    assert make_task("multilabel", ["a"], {"threshold": 0.3}).threshold == 0.3
