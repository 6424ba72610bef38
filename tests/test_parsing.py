"""camserve.parsing: bounded echoing, strict integers, comma lists of choices."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from camserve.parsing import log_name, parse_choices, parse_int, short_repr


@given(st.text(max_size=40))
def test_parse_int_is_strict(text):
    n = parse_int(text)
    if n is not None:
        assert text.strip().lstrip("+-").isascii() and abs(n) < 10 ** 18


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
    forged = "key\n2026-11-28 12:00:00 INFO forged line\r" + "k" * 500
    out = log_name(forged)
    assert "\n" not in out and "\r" not in out and "\\n" in out and len(out) <= 60
    assert log_name(3) == "'int'"


ALLOWED = ("heatmap", "overlay", "raw", "bbox")


@pytest.mark.parametrize("value,expected", [
    ("heatmap", ("heatmap",)), (" Overlay , bbox,overlay ", ("overlay", "bbox")),
    (["raw", "BBOX"], ("raw", "bbox")), (("heatmap", " "), ("heatmap",)),
])
def test_parse_choices(value, expected):
    assert parse_choices(value, ALLOWED, key="outputs") == expected


@pytest.mark.parametrize("value,match", [
    ("cam", "invalid value for outputs: 'cam' \\(allowed: heatmap, overlay, raw, bbox\\)"),
    ("", "empty"), (" , ,", "empty"), ([1], "is not a name"), ({"a": 1}, "comma-separated"),
    (None, "comma-separated"), ("x" * 10_000, "invalid value for outputs"),
])
def test_parse_choices_refuses_with_one_error_shape(value, match):
    with pytest.raises(KeyError, match=match) as info:
        parse_choices(value, ALLOWED, key="outputs", exc=KeyError)
    assert len(str(info.value)) < 300


def test_parse_choices_groups_skip_and_case():
    assert parse_choices("ALL", ("a", "b"), key="k", groups={"all": ("a", "b")}) == ("a", "b")
    assert parse_choices("none", ("a",), key="k", skip=("none",), empty_ok=True) == ()
    assert parse_choices("jpeg,png", ("JPEG", "PNG"), key="k", normalize=str.upper) == ("JPEG", "PNG")
    with pytest.raises(ValueError, match="allowed: a, b, all, none"):
        parse_choices("c", ("a", "b"), key="k", groups={"all": ("a", "b")}, skip=("none",))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(st.one_of(st.text(max_size=10), st.integers()),
                                                 max_size=10), st.none(), st.integers()))
def test_parse_choices_total(value):
    try:
        out = parse_choices(value, ALLOWED, key="outputs")
    except ValueError as exc:
        assert str(exc).startswith("invalid value for outputs") and len(str(exc)) < 300
        return
    assert out and set(out) <= set(ALLOWED) and len(set(out)) == len(out)
