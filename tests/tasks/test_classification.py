"""camserve.tasks.classification: class targets as data, through the engine and the server."""
from __future__ import annotations

import pytest
import torch

from camserve import CamEngine
from camserve.errors import OptionError
from camserve.tasks import Classification, Geometry, TargetBatch, TaskError
from camserve.testing.nets import TinyNet

LABELS = ["circle", "square", "triangle", "star", "cross", "ring"]
GEOM = Geometry((32, 32), (32, 32))


@pytest.mark.parametrize("value,want", [
    (None, [[5], [0]]), (2, [[2], [2]]), ([1, -1], [[1], [0]]),
    (torch.tensor([[1, 2], [3, -1]]), [[1, 2], [3, 0]]), (torch.tensor(4), [[4], [4]]),
])
def test_engine_target_forms(value, want):
    task = Classification(LABELS)
    logits = torch.tensor([[0, 0, 0, 0, 0, 9.0], [9.0, 0, 0, 0, 0, 0]])
    assert task.as_targets(value, logits).index.tolist() == want


@pytest.mark.parametrize("value,match", [
    (True, "invalid value for targets"), (torch.tensor([0.5, 1.0]), "integer tensor"),
    ([1, 2, 3], "does not fit a batch of 2"), ([6, 0], "out of range 0..5"), (["x", 1], "None, an int"),
])
def test_engine_target_forms_refused(value, match):
    with pytest.raises(TaskError, match=match):
        Classification(LABELS).as_targets(value, torch.zeros(2, 6))


def test_scores_are_the_target_logits_and_differentiable():
    task = Classification(LABELS)
    logits = torch.randn(3, 6, requires_grad=True)
    t = TargetBatch.of_classes([[1, 2], [0], [5, 4]])
    s = task.scores(logits, t)
    assert s.shape == (3, 2) and s.requires_grad
    torch.testing.assert_close(s.detach(), logits.detach().gather(1, t.index))


def test_engine_with_a_target_batch_equals_class_targets():
    net = TinyNet(len(LABELS), seed=4).eval()
    eng = CamEngine(net, "features", task=Classification(LABELS))
    x = torch.randn(3, 3, 32, 32)
    tb = TargetBatch.of_classes([[1, 2], [0, 0], [5, 3]])
    a = eng(x, targets=tb, method="gradcam++")
    b = eng(x, targets=tb.index, method="gradcam++")
    assert a.cams.shape == b.cams.shape == (3, 2, 8, 8)
    torch.testing.assert_close(a.cams, b.cams)


def test_request_options_and_answer():
    task = Classification(LABELS)
    p = task.parse_options({"target": "square, 4"}, max_targets=16)
    assert p.targets == (1, 4) and task.max_targets(p) == 2
    with pytest.raises(OptionError, match="unknown label 'hexagon'"):
        task.parse_options({"target": "hexagon"}, max_targets=16)
    logits = torch.tensor([[0.0, 3.0, 0.0, 0.0, 1.0, 0.0]])
    tb = task.request_targets(logits, [p], [GEOM], [2])
    shown = task.shown(logits[0], tb, 0, GEOM)
    assert [(s.index, s.label) for s in shown] == [(1, "square"), (4, "cross")]
    body = task.answer(logits[0], p, 2, GEOM, [{"x": 1}])
    assert [q["label"] for q in body["predictions"]] == ["square", "cross"]
    assert body["explanations"] == [{"x": 1}]
    assert "explanations" not in task.answer(logits[0], p, 2, GEOM, None)
