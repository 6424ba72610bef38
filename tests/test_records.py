"""camserve.records: strict target resolution shared by the server and the batch job; records JSON."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from camserve.records import (Explanation, Prediction, TargetError, parse_int, resolve_target,
                              resolve_targets, short_repr, top_predictions)

LABELS = ["cat", "Dog", "bird"]


@pytest.mark.parametrize("value,expected", [
    (None, None), ("", None), (1, (1,)), ("2", (2,)), (" +1 ", (1,)), ("dog", (1,)), ("DOG", (1,)),
    ("cat,bird", (0, 2)), ("[0, \"Dog\"]", (0, 1)), ([2, "cat"], (2, 0)),
])
def test_resolve_targets(value, expected):
    assert resolve_targets(value, LABELS) == expected


@pytest.mark.parametrize("value,match", [
    ("²", "invalid value for target"), ("+-1", "invalid value for target"),
    ("9" * 5000, "invalid value for target"), (3, "out of range"), (-1, "out of range"),
    ("horse", "unknown label"), ([], "empty list"), ([0] * 17, "at most 16"), ("[1,", "not a JSON list"),
    ("[" * 5000, "not a JSON list"), (True, "invalid value"), ({"a": 1}, "invalid value"),
])
def test_resolve_targets_refuses(value, match):
    with pytest.raises(TargetError, match=match) as info:
        resolve_targets(value, LABELS)
    assert len(str(info.value)) < 400  # never echoes unbounded input


def test_top1_only_where_allowed():
    assert resolve_target("-1", LABELS, allow_top1=True) == -1
    with pytest.raises(TargetError):
        resolve_target("-1", LABELS)


def test_exact_label_wins_over_case_insensitive():
    assert resolve_target("dog", ["Dog", "dog"]) == 1
    assert resolve_target("DOG", ["Dog", "dog"]) == 0


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.integers(), st.lists(st.one_of(st.text(max_size=8),
                                                                         st.integers()), max_size=20),
                 st.none(), st.booleans(), st.floats()))
def test_resolve_targets_total(value):
    try:
        out = resolve_targets(value, LABELS)
    except TargetError:
        return
    assert out is None or all(0 <= i < len(LABELS) for i in out)


@given(st.text(max_size=40))
def test_parse_int_is_strict(text):
    n = parse_int(text)
    if n is not None:
        assert text.strip().lstrip("+-").isascii() and abs(n) < 10 ** 18


def test_records_json():
    assert Prediction(2, "bird", 0.1234567).to_json() == {"index": 2, "label": "bird", "score": 0.123457}
    e = Explanation(1, "Dog", 0.5, "gradcam", "layer4", 40, 30, bbox=None, with_bbox=True)
    assert e.to_json() == {"target": 1, "label": "Dog", "score": 0.5, "method": "gradcam",
                           "layer": "layer4", "width": 40, "height": 30, "bbox": None}
    assert "bbox" not in Explanation(1, "Dog", 0.5, "gradcam", "layer4", 40, 30).to_json()
    assert [p.index for p in top_predictions([0.1, 0.6, 0.3], LABELS, 2)] == [1, 2]
    assert len(short_repr("x" * 10_000)) <= 100


def test_short_repr_never_recurses_or_builds_huge_reprs():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert short_repr(deep) == "[[[[...]]]]"
    assert short_repr({"k": {"k": {"k": {"k": 1}}}}).count("{") <= 4
    assert short_repr(10 ** 5000) == "<int of many digits>" and short_repr(7) == "7"
    assert len(short_repr("x" * 10_000_000)) == 100

    class Bad:
        def __repr__(self):
            raise RuntimeError("no")

    assert short_repr([Bad()]).startswith("[<Bad instance")  # a failing __repr__ is not raised


def test_log_name_escapes_control_characters():
    from camserve.records import log_name

    forged = "key\n2026-11-28 12:00:00 INFO forged line\r" + "k" * 500
    out = log_name(forged)
    assert "\n" not in out and "\r" not in out and "\\n" in out and len(out) <= 60
    assert log_name(3) == "'int'"
