"""camserve.report.job: results and errors lines as rows, tolerant of anything a line holds."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camserve.onnx.inputs import UsageError
from camserve.report import job as J
from camserve.report.job import JobLines, Locator, display_text, error_row, iter_lines, read_job, \
    result_row


def test_display_text_escapes_what_cannot_be_read_or_could_forge() -> None:
    assert display_text(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert display_text("a\nb\tc\x00") == "a\\x0ab\\x09c\\x00"
    assert display_text("evil\u202egnp.exe") == "evil\\u202egnp.exe"   # right-to-left override
    assert display_text("\ud800x") == "\\ud800x"                          # a lone surrogate
    assert display_text("café ☃ <b>") == "café ☃ <b>"                    # printable stays (the page
    assert display_text("x" * 500, 10) == "x" * 9 + "…"                  # writes it as text)


def test_locator_urls_are_relative_encoded_and_never_a_scheme(tmp_path: Path) -> None:
    loc = Locator(tmp_path / "job", tmp_path)
    full, url = loc.original("in/a b#?%.png")
    assert full == str(tmp_path / "in" / "a b#?%.png") and url == "../in/a%20b%23%3F%25.png"
    assert loc.original(os.fsdecode(b"in/caf\xe9.png"))[1] == "../in/caf%E9.png"
    assert loc.original("javascript:alert(1)")[1] == "../javascript%3Aalert%281%29"
    assert loc.original(str(tmp_path / "job" / "x.png"))[1] == "x.png"   # absolute paths too
    (tmp_path / "job" / "in").mkdir(parents=True)
    assert loc.artefact("in/a.png.heatmap.png") == (str(tmp_path / "job" / "in" / "a.png.heatmap.png"),
                                                   "in/a.png.heatmap.png")


@pytest.mark.parametrize("rel", ["/etc/passwd", "../secret.png", "in/../../x.png", "a\0b.png", "",
                                 "c:/x.png", "in//x.png", "./x.png", 7, None, ["x"]])
def test_locator_refuses_artefacts_outside_the_job(tmp_path: Path, rel: object) -> None:
    assert Locator(tmp_path / "job", tmp_path).artefact(rel) is None


def test_locator_refuses_a_symlink_out_of_the_job(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "job" / "link").symlink_to(tmp_path / "outside")
    assert Locator(tmp_path / "job", tmp_path).artefact("link/x.png") is None


def _row(line: dict, tmp_path: Path, keys: dict | None = None) -> J.Row:
    return result_row(line, encode(line), Locator(tmp_path / "job", tmp_path),
                      {} if keys is None else keys)


def encode(line: dict) -> bytes:
    return json.dumps(line).encode() + b"\n"


def test_classification_line(tmp_path: Path) -> None:
    line = {"path": "in/a.png", "name": "in/a.png", "width": 40, "height": 30,
            "topk": [{"index": 2, "label": "star", "score": 0.9}, {"index": 0, "label": "circle",
                                                                     "score": 0.1}],
            "target": 2, "label": "star", "score": 0.9, "bbox": [1, 2, 30, 20], "method": "gradcam",
            "layer": "features", "metrics": {"deletion": 0.25, "avg_drop": None},
            "files": {"heatmap": "in/a.png.heatmap.png", "overlay": "../x.png"}}
    keys: dict = {}
    row = _row(line, tmp_path, keys)
    assert (row.task, row.labels, row.score, row.method, row.size) == (
        "classification", ("star",), 0.9, "gradcam", (40, 30))
    assert row.metrics == {"deletion": 0.25, "avg_drop": None} and list(keys) == ["deletion", "avg_drop"]
    assert row.sources.image == str(tmp_path / "in" / "a.png")
    assert row.sources.heatmap == str(tmp_path / "job" / "in" / "a.png.heatmap.png")
    assert row.sources.overlay is None                       # outside the job: ignored
    d = row.detail
    assert d["target"] == {"index": 2, "label": "star", "score": 0.9} and d["bbox"] == [1, 2, 30, 20]
    assert d["files"] == {"heatmap": "in/a.png.heatmap.png"} and d["url"] == "../in/a.png"
    assert [p["label"] for p in d["topk"]] == ["star", "circle"] and json.loads(d["raw"]) == line


def test_detection_segmentation_multilabel_lines(tmp_path: Path) -> None:
    det = _row({"path": "a.jpg", "task": "detection", "width": 100, "height": 50, "detections": [
        {"box": [10, 5, 60, 45], "label": "cat", "index": 3, "score": 0.8,
         "explanation": {"method": "gradcam", "bbox": [12, 6, 50, 40], "files": {
             "heatmap": "a.jpg.0.heatmap.png", "overlay": "a.jpg.0.overlay.png"}}},
        {"box": [0, 0, 5, 5], "label": "dog", "index": 4, "score": 0.95,
         "explanation": {"method": "gradcam", "files": {"overlay": "../../etc/passwd"}}},
        {"box": "nope", "label": "cat", "score": float("inf")}]}, tmp_path)
    assert det.labels == ("cat", "dog") and det.score == 0.95 and det.method == "gradcam"
    assert det.boxes == [[10, 5, 60, 45], [0, 0, 5, 5]]
    assert det.sources.overlay == str(tmp_path / "job" / "a.jpg.0.overlay.png")
    assert det.detail["detections"][0]["explanation"]["overlay"] == "a.jpg.0.overlay.png"
    assert det.detail["detections"][1]["explanation"]["overlay"] is None   # outside the job
    assert det.detail["detections"][2]["box"] is None and det.detail["detections"][2]["score"] is None

    seg = _row({"path": "b.png", "task": "segmentation", "target": 5, "label": "road",
                "score": 0.81, "bbox": [1, 2, 30, 40], "method": "gradcam",
                "files": {"overlay": "b.png.overlay.png"}, "segmentation": {
        "mask": "b.png.mask.png", "classes": [{"index": 0, "label": "background", "share": 0.7},
                                              {"index": 5, "label": "road", "share": 0.3},
                                              {"index": 9, "label": "car", "share": 0.0}]}},
               tmp_path)
    assert seg.labels == ("background", "road") and seg.score == 0.81
    assert seg.sources.mask == str(tmp_path / "job" / "b.png.mask.png")
    assert seg.sources.overlay == str(tmp_path / "job" / "b.png.overlay.png")
    assert seg.detail["target"] == {"index": 5, "label": "road", "score": 0.81}
    assert seg.detail["bbox"] == [1, 2, 30, 40]
    assert [c["share"] for c in seg.detail["segmentation"]["classes"]] == [0.7, 0.3, 0.0]

    ml = _row({"path": "c.png", "task": "multilabel",
               "labels": [{"index": 1, "label": "sky", "score": 0.6},
                          {"index": 2, "label": "sea", "score": 0.7}]}, tmp_path)
    assert ml.labels == ("sky", "sea") and ml.score == 0.7           # no explained label: the best
    ml = _row({"path": "c.png", "task": "multilabel", "target": 1, "label": "sky", "score": 0.6,
               "threshold": 0.5, "topk": [{"index": 2, "label": "sea", "score": 0.7}],
               "labels": [{"index": 1, "label": "sky", "score": 0.6},
                          {"index": 2, "label": "sea", "score": 0.7}]}, tmp_path)
    assert ml.score == 0.6 and ml.detail["threshold"] == 0.5 and ml.detail["topk"][0]["label"] == "sea"


def test_unknown_task_and_wrong_types_are_absent_values(tmp_path: Path) -> None:
    row = _row({"path": "a.png", "task": ["x"], "label": 5, "score": "0.9", "width": -3,
                "height": True, "bbox": [5, 5, 1, 1], "topk": {"a": 1}, "metrics": [1, 2],
                "files": "a.png", "method": 12}, tmp_path)
    assert (row.task, row.labels, row.score, row.size, row.method, row.metrics) == (
        "classification", (), None, None, None, {})
    assert row.detail["bbox"] is None and row.detail["topk"] == [] and row.detail["files"] == {}
    other = _row({"path": "a.png", "task": "keypoints\n", "label": "x", "score": 0.5}, tmp_path)
    assert other.task == "keypoints\\x0a" and other.labels == ("x",)


def test_metric_keys_are_bounded(tmp_path: Path) -> None:
    keys: dict = {}
    for start in (0, 20, 40):
        _row({"path": "a.png", "metrics": {f"m{i}": i for i in range(start, start + 20)}},
             tmp_path, keys)
    _row({"path": "a.png", "metrics": {"k" * 65: 1.0, "": 2.0, "nan": float("nan")}}, tmp_path, keys)
    assert len(keys) == J.MAX_METRIC_KEYS and "k" * 65 not in keys


def test_error_row() -> None:
    row = error_row({"path": "x<b>.png", "type": "InvalidImage", "reason": "bad\nline"})
    assert row.error == ("InvalidImage", "bad\\x0aline") and row.detail["path"] == "x<b>.png"
    assert error_row({"path": "y", "type": 3}).error == ("Error", "")


def test_iter_lines_counts_malformed_and_skips_blank(tmp_path: Path, write_lines,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(J, "MAX_RESULT_LINE_BYTES", 200)
    path = write_lines(tmp_path / "r.jsonl", [
        {"path": "a"}, "", "not json", "[1, 2]", {"path": 3}, {"name": "x"},
        {"path": "b", "pad": "x" * 300}, b"\xff\xfe", {"path": "c"}])
    got = list(iter_lines(path))
    assert [g if g is None else g[0]["path"] for g in got] == ["a", None, None, None, None, None,
                                                               None, "c"]


def test_read_job_results_then_errors(tmp_path: Path, write_lines) -> None:
    out = tmp_path / "job"
    out.mkdir()
    write_lines(out / "results.jsonl", [{"path": "a.png", "label": "x"}, "{", {"path": "b.png"}])
    write_lines(out / "errors.jsonl", [{"path": "c.png", "type": "FileTooLarge", "reason": "big"},
                                       "oops"])
    counts = JobLines()
    rows = list(read_job(out, Locator(out, tmp_path), counts))
    assert [(r.path, r.error) for r in rows] == [("a.png", None), ("b.png", None),
                                                  ("c.png", ("FileTooLarge", "big"))]
    assert (counts.results, counts.errors, counts.malformed_results, counts.malformed_errors) == (
        2, 1, 1, 1)


def test_a_fifo_as_results_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "results.jsonl")
    with pytest.raises(UsageError, match="not a regular file"):
        list(iter_lines(tmp_path / "results.jsonl"))


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) |
                     st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) |
                     st.dictionaries(st.sampled_from(["index", "label", "score", "box", "mask",
                                                      "classes", "explanation", "heatmap",
                                                      "overlay", "method", "bbox", "share", "x"]),
                                     inner, max_size=5), max_leaves=20)
_line = st.fixed_dictionaries({"path": st.text(max_size=30)}, optional={
    k: _json for k in ("name", "task", "width", "height", "topk", "target", "label", "score",
                       "bbox", "method", "layer", "metrics", "files", "detections",
                       "segmentation", "labels")}) | st.fixed_dictionaries(
    {"path": st.text(max_size=5), "task": st.sampled_from(sorted(J.TASKS))},
    optional={"detections": _json, "segmentation": _json, "labels": _json})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=_line)
def test_any_line_gives_a_row_that_encodes_as_strict_json(tmp_path: Path, line: dict) -> None:
    row = result_row(line, b"{}", Locator(tmp_path / "job", tmp_path), {})
    json.dumps(row.detail, allow_nan=False)
    assert all(isinstance(label, str) for label in row.labels)
    assert row.score is None or isinstance(row.score, float)
