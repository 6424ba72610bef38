"""camserve.records: strict target resolution shared by the server and the batch job; records JSON."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from camserve.records import (Explanation, Prediction, TargetError, parse_target, parse_targets,
                              top_predictions)

LABELS = ["cat", "Dog", "bird"]


@pytest.mark.parametrize("value,expected", [
    (None, None), ("", None), (1, (1,)), ("2", (2,)), (" +1 ", (1,)), ("dog", (1,)), ("DOG", (1,)),
    ("cat,bird", (0, 2)), ("[0, \"Dog\"]", (0, 1)), ([2, "cat"], (2, 0)),
])
def test_resolve_targets(value, expected):
    assert parse_targets(value, LABELS) == expected


@pytest.mark.parametrize("value,match", [
    ("²", "invalid value for target"), ("+-1", "invalid value for target"),
    ("9" * 5000, "invalid value for target"), (3, "out of range"), (-1, "out of range"),
    ("horse", "unknown label"), ([], "empty list"), ([0] * 17, "at most 16"), ("[1,", "not a JSON list"),
    ("[" * 5000, "not a JSON list"), (True, "invalid value"), ({"a": 1}, "invalid value"),
])
def test_resolve_targets_refuses(value, match):
    with pytest.raises(TargetError, match=match) as info:
        parse_targets(value, LABELS)
    assert len(str(info.value)) < 400  # never echoes unbounded input


def test_top1_only_where_allowed():
    assert parse_target("-1", LABELS, allow_top1=True) == -1
    with pytest.raises(TargetError):
        parse_target("-1", LABELS)


def test_exact_label_wins_over_case_insensitive():
    assert parse_target("dog", ["Dog", "dog"]) == 1
    assert parse_target("DOG", ["Dog", "dog"]) == 0


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.integers(), st.lists(st.one_of(st.text(max_size=8),
                                                                         st.integers()), max_size=20),
                 st.none(), st.booleans(), st.floats()))
def test_resolve_targets_total(value):
    try:
        out = parse_targets(value, LABELS)
    except TargetError:
        return
    assert out is None or all(0 <= i < len(LABELS) for i in out)


def test_records_json():
    assert Prediction(2, "bird", 0.1234567).to_json() == {"index": 2, "label": "bird", "score": 0.123457}
    e = Explanation(1, "Dog", 0.5, "gradcam", "layer4", 40, 30, bbox=None, with_bbox=True)
    assert e.to_json() == {"target": 1, "label": "Dog", "score": 0.5, "method": "gradcam",
                           "layer": "layer4", "width": 40, "height": 30, "bbox": None}
    assert "bbox" not in Explanation(1, "Dog", 0.5, "gradcam", "layer4", 40, 30).to_json()
    assert [p.index for p in top_predictions([0.1, 0.6, 0.3], LABELS, 2)] == [1, 2]
