"""The report in a real headless Chromium: a real batch job over the shapes samples renders every
thumbnail, sorting and filtering change the gallery as they should, hostile names and labels are
shown as text and run nothing, from a file:// URL and from a static server; detection boxes,
segmentation masks and pages of a larger job. Screenshots go to build/report/ for a person to look
at."""
from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from camserve.report import page as P
from camserve.report import write_report

from ..conftest import assert_ran_nothing
from .conftest import HOSTILE_NAME, LATIN1_NAME, ROOT, SVG_NAME, ShapesJob

pytestmark = pytest.mark.browser

BUILD = ROOT / "build" / "report"
READY = "document.documentElement.dataset.state"
#: the number of gallery thumbnails when every one of them has loaded, else 0
THUMBS_LOADED = ("(() => { const i = Array.from(document.querySelectorAll('#gallery img'));"
                 " return i.length && i.every((x) => x.complete && x.naturalWidth > 0) ? i.length : 0;"
                 " })()")
#: the detail view's figure images, when all have loaded (else 0)
DETAIL_LOADED = ("(() => { const i = Array.from(document.querySelectorAll('#d-body figure img'));"
                 " return i.length && i.every((x) => x.complete && x.naturalWidth > 0) ? i.length : 0;"
                 " })()")


def open_page(b: Any, url: str) -> None:
    b.clear_events()
    b.navigate(url)
    assert b.wait_for(READY) == "ready", b.problems()


def control(b: Any, element: str, value: str, event: str = "change") -> None:
    b.evaluate(f"(() => {{ const e = document.getElementById({json.dumps(element)});"
               f" e.value = {json.dumps(value)}; e.dispatchEvent(new Event({json.dumps(event)})); }})()")


def gallery_rows(b: Any) -> list[int]:
    return b.evaluate("Array.from(document.querySelectorAll('#gallery .card'))"
                      ".map((c) => Number(c.dataset.row))")


def texts(b: Any, selector: str) -> list[str]:
    return b.evaluate(f"Array.from(document.querySelectorAll({json.dumps(selector)}))"
                      f".map((e) => e.textContent)")


def open_detail(b: Any, row: int) -> None:
    b.click(f'#gallery .card[data-row="{row}"]')
    b.wait_for("document.querySelector('#d-body .detail-grid') !== null")


# -- the real job (slow: the graph is exported and the job run once per session) ------------------------

@pytest.fixture(scope="module")
def shapes_report(shapes_job: ShapesJob) -> ShapesJob:
    """The job's page as ``camserve-batch --report`` wrote it."""
    return shapes_job


def _lines(job: ShapesJob) -> list[dict[str, Any]]:
    return [json.loads(t) for t in (job.out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_real_job_renders_every_thumbnail(chromium: Any, shapes_report: ShapesJob) -> None:
    lines = _lines(shapes_report)
    assert len(lines) == 11
    open_page(chromium, (shapes_report.out / "report.html").as_uri())
    assert sorted(gallery_rows(chromium)) == list(range(12))          # 11 results, 1 error
    assert chromium.wait_for(THUMBS_LOADED) == 22
    assert sorted(texts(chromium, "#gallery .card .pred .label")) == sorted(
        line["label"] for line in lines)
    assert texts(chromium, "#gallery .card.error .path") == [str(shapes_report.inputs / "truncated.png")]
    assert chromium.evaluate("window.camserveReport.timing.render") > 0
    chromium.screenshot(BUILD / "report.png", full_page=True)
    # the detail of the best-scored circle: the original, its overlay and heatmap, the box, top-k
    circle = next(i for i, line in enumerate(lines) if line["path"].endswith("circle_000.png"))
    open_detail(chromium, circle)
    assert chromium.wait_for(DETAIL_LOADED) == 3
    assert chromium.evaluate("document.querySelectorAll('#d-body .box.cam').length") == 3
    assert texts(chromium, "#d-body table tr td:first-child")[:3] == [
        p["label"] for p in lines[circle]["topk"]]
    assert chromium.evaluate("document.getElementById('d-path').textContent") == lines[circle]["path"]
    chromium.screenshot(BUILD / "detail.png")
    chromium.evaluate("document.getElementById('d-close').click()")
    assert_ran_nothing(chromium)


@pytest.mark.slow
def test_sorting_and_filtering_change_the_gallery(chromium: Any, shapes_report: ShapesJob) -> None:
    lines = _lines(shapes_report)
    open_page(chromium, (shapes_report.out / "report.html").as_uri())

    def by(key: Any, desc: bool) -> list[int]:
        """Row order: by ``key`` (ties in job order), the error row (no score) last."""
        return sorted(range(len(lines)), key=lambda i: (-key(lines[i]) if desc else key(lines[i]),
                                                         i)) + [11]

    assert gallery_rows(chromium) == by(lambda x: x["score"], True)
    control(chromium, "f-order", "asc")
    assert gallery_rows(chromium) == by(lambda x: x["score"], False)
    control(chromium, "f-sort", "x0")                                 # the first metric
    assert chromium.evaluate("document.getElementById('f-sort').selectedOptions[0].textContent") \
        == "metric: avg_drop"
    assert gallery_rows(chromium) == by(lambda x: x["metrics"]["avg_drop"], False)
    control(chromium, "f-order", "desc")
    control(chromium, "f-sort", "x1")
    assert gallery_rows(chromium) == by(lambda x: x["metrics"]["deletion"], True)

    labels = chromium.evaluate("Array.from(document.getElementById('f-label').options)"
                               ".map((o) => [o.value, o.textContent])")
    star = next(v for v, t in labels if t.startswith("star "))
    control(chromium, "f-label", star)
    assert sorted(gallery_rows(chromium)) == sorted(
        i for i, x in enumerate(lines) if x["label"] == "star")
    assert len(gallery_rows(chromium)) == 2                          # star_003 and its copy
    control(chromium, "f-label", "")
    control(chromium, "f-text", "CROSS", "input")
    chromium.wait_for("document.querySelectorAll('#gallery .card').length === 1")
    assert texts(chromium, "#gallery .card .path")[0].endswith("cross_004.png")
    control(chromium, "f-text", "<img src", "input")
    chromium.wait_for("(() => { const p = document.querySelectorAll('#gallery .card .path');"
                      " return p.length === 1 && p[0].textContent.endsWith("
                      f"{json.dumps(HOSTILE_NAME)}); }})()")
    control(chromium, "f-text", "", "input")
    chromium.wait_for("document.querySelectorAll('#gallery .card').length === 12")
    control(chromium, "f-status", "errors")
    assert gallery_rows(chromium) == [11]
    assert texts(chromium, "#gallery .card .reason")[0].startswith("not an image: corrupt or truncated")
    control(chromium, "f-status", "results")
    assert len(gallery_rows(chromium)) == 11
    assert chromium.evaluate("document.getElementById('shown').textContent") == "11 of 12 shown"
    assert chromium.evaluate("document.getElementById('pager').hidden") is True
    assert_ran_nothing(chromium)


@pytest.mark.slow
def test_hostile_names_are_text_and_run_nothing(chromium: Any, shapes_report: ShapesJob) -> None:
    lines = _lines(shapes_report)
    open_page(chromium, (shapes_report.out / "report.html").as_uri())
    chromium.wait_for(THUMBS_LOADED)
    paths = texts(chromium, "#gallery .card .path")
    inputs = str(shapes_report.inputs)
    assert f"{inputs}/{HOSTILE_NAME}" in paths and f"{inputs}/{SVG_NAME}" in paths
    assert f"{inputs}/caf\\xe9.png" in paths
    # the originals of both names load in the detail view (percent-encoded from their bytes)
    for fname in (HOSTILE_NAME, os.fsdecode(LATIN1_NAME)):
        row = next(i for i, x in enumerate(lines) if x["path"].endswith(fname))
        open_detail(chromium, row)
        assert chromium.wait_for(DETAIL_LOADED) == 3
        assert chromium.evaluate("document.querySelector('#d-body figure img').naturalWidth") == 96
        shown = chromium.evaluate("document.getElementById('d-path').textContent")
        assert shown == (f"{inputs}/{HOSTILE_NAME}" if fname == HOSTILE_NAME
                         else f"{inputs}/caf\\xe9.png")
        chromium.evaluate("document.getElementById('d-close').click()")
    assert_ran_nothing(chromium)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def static_server() -> Iterator[Any]:
    """``serve(folder) -> base URL``: a static file server on a free loopback port."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(folder: Path) -> str:
        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield serve
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_from_a_static_server(chromium: Any, shapes_report: ShapesJob, static_server: Any) -> None:
    base = static_server(shapes_report.root)            # serves the inputs too
    open_page(chromium, f"{base}/job/report.html")
    assert chromium.wait_for(THUMBS_LOADED) == 22
    open_detail(chromium, 0)
    assert chromium.wait_for(DETAIL_LOADED) == 3
    assert chromium.evaluate("document.querySelector('#d-body figure img').naturalWidth") == 96
    chromium.evaluate("document.getElementById('d-close').click()")
    assert_ran_nothing(chromium)
    # a server of the job folder alone cannot reach the originals: the detail view shows the
    # thumbnail instead and says why
    base = static_server(shapes_report.out)
    open_page(chromium, f"{base}/report.html")
    assert chromium.wait_for(THUMBS_LOADED) == 22
    open_detail(chromium, 0)
    chromium.wait_for("document.querySelector('#d-body .note') !== null")
    assert "not reachable" in texts(chromium, "#d-body .note")[0]
    chromium.wait_for(DETAIL_LOADED)
    assert chromium.evaluate("document.querySelector('#d-body figure img').naturalWidth") <= 128
    chromium.evaluate("document.getElementById('d-close').click()")
    assert [p for p in chromium.problems() if "404" not in p] == []   # the original's 404


def test_relative_inputs_from_a_static_server(chromium: Any, job: Any, tmp_path: Path,
                                              static_server: Any) -> None:
    out = job(3)
    write_report(out, input_root=tmp_path)
    base = static_server(tmp_path)
    open_page(chromium, f"{base}/job/report.html")
    assert chromium.wait_for(THUMBS_LOADED) == 6
    open_detail(chromium, 0)
    assert chromium.wait_for(DETAIL_LOADED) == 3                       # the original itself
    assert chromium.evaluate("document.querySelector('#d-body figure img').naturalWidth") == 64
    assert_ran_nothing(chromium)


# -- synthetic jobs ---------------------------------------------------------------------------------------

def test_hostile_labels_methods_metrics_and_title(chromium: Any, job: Any, tmp_path: Path,
                                                  write_lines: Any) -> None:
    out = job(2)
    lines = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    evil = ["<img src=x onerror=window.__pwned=3>", "<script>window.__pwned=4</script>",
            "<b onmouseover=window.__pwned=5>m</b>"]
    for line in lines:
        line["label"] = line["topk"][0]["label"] = evil[0]
        line["method"] = evil[1]
        line["metrics"] = {evil[2]: 0.5}
        line["layer"] = "</dd><iframe src=javascript:window.__pwned=6>"
    write_lines(out / "results.jsonl", lines)
    write_lines(out / "errors.jsonl", [{"path": "<svg onload=window.__pwned=7>.png",
                                        "type": "<i>T</i>", "reason": "</td><script>x</script>"}])
    write_report(out, input_root=tmp_path, title="<img src=x onerror=window.__pwned=8>")
    open_page(chromium, (out / "report.html").as_uri())
    assert chromium.evaluate("document.getElementById('title').textContent") == \
        "<img src=x onerror=window.__pwned=8>"
    assert chromium.evaluate("document.title") == "<img src=x onerror=window.__pwned=8>"
    assert texts(chromium, "#gallery .card .pred .label") == [evil[0]] * 2
    assert texts(chromium, "#gallery .card .pred .method") == [evil[1]] * 2
    assert texts(chromium, "#gallery .card .metrics dt") == [evil[2]] * 2
    assert texts(chromium, "#label-counts .bar-name") == [evil[0]]
    assert texts(chromium, "#error-list td")[:2] == ["<svg onload=window.__pwned=7>.png", "<i>T</i>"]
    open_detail(chromium, 0)
    cells = texts(chromium, "#d-body dd")
    assert evil[1] in cells and lines[0]["layer"] in cells
    open_detail(chromium, 2)
    assert texts(chromium, "#d-body dd")[2] == "</td><script>x</script>"
    assert_ran_nothing(chromium)


def _png(path: Path, img: Image.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")
    return path.name


def test_detection_boxes_segmentation_masks_and_multilabel(chromium: Any, tmp_path: Path,
                                                           write_lines: Any) -> None:
    out = tmp_path / "job"
    _png(tmp_path / "in" / "street.png", Image.new("RGB", (200, 100), (90, 90, 90)))
    _png(tmp_path / "in" / "road.png", Image.new("RGB", (120, 80), (200, 200, 200)))
    _png(tmp_path / "in" / "sky.png", Image.new("RGB", (50, 50), (20, 20, 200)))
    _png(out / "in" / "street.png.0.overlay.png", Image.new("RGB", (200, 100), (255, 0, 0)))
    _png(out / "in" / "street.png.0.heatmap.png", Image.new("L", (200, 100), 128))
    index = np.zeros((80, 120), np.uint8)
    index[40:] = 3
    _png(out / "in" / "road.png.mask.png", Image.fromarray(index, "L"))
    write_lines(out / "results.jsonl", [
        {"path": "in/street.png", "name": "in/street.png", "task": "detection", "width": 200,
         "height": 100, "detections": [
             {"box": [10, 10, 90, 90], "label": "car", "index": 2, "score": 0.9,
              "explanation": {"method": "gradcam", "bbox": [20, 20, 80, 80], "files": {
                  "heatmap": "in/street.png.0.heatmap.png",
                  "overlay": "in/street.png.0.overlay.png"}}},
             {"box": [120, 30, 190, 70], "label": "person", "index": 0, "score": 0.7}]},
        {"path": "in/road.png", "name": "in/road.png", "task": "segmentation", "width": 120,
         "height": 80, "segmentation": {"mask": "in/road.png.mask.png", "classes": [
             {"index": 0, "label": "background", "share": 0.5},
             {"index": 3, "label": "road", "share": 0.5}]}},
        {"path": "in/sky.png", "name": "in/sky.png", "task": "multilabel", "width": 50,
         "height": 50, "labels": [{"index": 1, "label": "sky", "score": 0.8},
                                  {"index": 4, "label": "sea", "score": 0.3}]}])
    stats = write_report(out, input_root=tmp_path)
    assert stats.preview_failures == 0
    open_page(chromium, (out / "report.html").as_uri())
    assert chromium.wait_for(THUMBS_LOADED) == 4          # no map: segmentation and multilabel
    control(chromium, "f-sort", "order")
    control(chromium, "f-order", "asc")
    assert gallery_rows(chromium) == [0, 1, 2]
    # the segmentation row's image thumbnail is the one with its mask in colour
    assert chromium.evaluate("document.querySelectorAll('#gallery .card')[1]"
                             ".querySelector('img').src").endswith(".s128.jpg")
    assert chromium.evaluate("document.querySelectorAll('#gallery .card')[0]"
                             ".querySelectorAll('.box.det').length") == 2
    assert texts(chromium, "#gallery .card .pred .label") == ["car, person", "background, road",
                                                              "sky, sea"]
    open_detail(chromium, 0)
    chromium.wait_for(DETAIL_LOADED)
    # the image with both boxes; the car's overlay and heatmap with its box and its CAM box
    assert chromium.evaluate("document.querySelectorAll('#d-body figure')[0]"
                             ".querySelectorAll('.box.det').length") == 2
    assert texts(chromium, "#d-body figcaption") == ["image", "1. car: overlay", "1. car: heatmap"]
    left = chromium.evaluate("document.querySelectorAll('#d-body figure')[0]"
                             ".querySelectorAll('.box.det')[1].style.left")
    assert left == "60%"                                               # 120 / 200
    chromium.screenshot(BUILD / "detection.png")
    open_detail(chromium, 1)
    chromium.wait_for("(() => { const l = document.querySelector('#d-body img.layer');"
                      " return l !== null && l.complete && l.naturalWidth === 120; })()")
    assert chromium.evaluate("Array.from(document.querySelectorAll('#d-body .swatch'))"
                             ".map((s) => s.style.backgroundColor)") == ["rgb(0, 0, 0)",
                                                                         "rgb(128, 128, 0)"]
    chromium.screenshot(BUILD / "segmentation.png")
    open_detail(chromium, 2)
    assert texts(chromium, "#d-body table tr td:first-child") == ["sky", "sea"]
    assert_ran_nothing(chromium)


def test_pages_chunks_and_detail_navigation(chromium: Any, job: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "INDEX_ROWS", 50)
    monkeypatch.setattr(P, "DETAIL_ROWS", 20)
    out = job(260, size=(24, 16), metrics=())
    write_report(out, input_root=tmp_path, thumb_side=32)
    open_page(chromium, (out / "report.html").as_uri())
    control(chromium, "f-sort", "order")
    control(chromium, "f-order", "asc")
    assert gallery_rows(chromium) == list(range(100))
    assert chromium.evaluate("document.querySelectorAll('#gallery img').length") == 200
    chromium.click("#pager button:nth-of-type(3)")                     # next page
    assert gallery_rows(chromium) == list(range(100, 200))
    chromium.click("#pager button:nth-of-type(4)")                     # last page
    assert gallery_rows(chromium) == list(range(200, 260))
    assert texts(chromium, "#pager .page-no") == ["page 3 of 3"]
    open_detail(chromium, 259)
    assert chromium.evaluate("document.getElementById('d-path').textContent").endswith("img_00259.png")
    chromium.evaluate("document.getElementById('d-prev').click()")
    chromium.wait_for("document.getElementById('d-path').textContent.endsWith('img_00258.png')"
                      " && document.querySelector('#d-body .detail-grid') !== null")
    assert chromium.evaluate("document.getElementById('d-next').disabled") is False
    # loaded: every index chunk and one detail chunk (of 13), never the others
    loaded = chromium.evaluate("Array.from(document.scripts).map((s) => s.src.split('/').pop())")
    assert sorted(n for n in loaded if n.startswith("detail-")) == ["detail-00012.js"]
    assert len([n for n in loaded if n.startswith("index-")]) == 6
    assert_ran_nothing(chromium)


#: labels of the synthetic task jobs: markup, an entity, a bidi override, plain words
TASK_LABELS = ("background", "<img src=x onerror=window.__pwned=9>",
               "<script>window.__pwned=10</script>", "car & bus", "road", "sky\u202egnp.exe",
               "<b>sea</b>", "tree")


def _task_labels(task: str, line: dict[str, Any]) -> list[str]:
    """A line's predicted labels as the report shows them (in the line's order)."""
    if task == "multilabel":
        found = [x["label"] for x in line["labels"]]
    elif task == "segmentation":
        found = [c["label"] for c in line["segmentation"]["classes"] if c["share"] > 0]
    else:
        found = [d["label"] for d in line["detections"]]
    return [x.replace("\u202e", "\\u202e") for x in dict.fromkeys(found)]


@pytest.mark.parametrize("task", ["multilabel", "segmentation", "detection"])
def test_each_task_is_drawn_filtered_by_label_and_its_labels_are_text(
        chromium: Any, job: Any, tmp_path: Path, task: str) -> None:
    out = job(6, task=task, labels=TASK_LABELS, metrics=(), size=(80, 60))
    lines = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    assert write_report(out, input_root=tmp_path).preview_failures == 0
    open_page(chromium, (out / "report.html").as_uri())
    control(chromium, "f-sort", "order")
    control(chromium, "f-order", "asc")
    assert chromium.wait_for(THUMBS_LOADED) == 12                    # image (+ mask), overlay
    shown = [_task_labels(task, x) for x in lines]
    assert texts(chromium, "#gallery .card .pred .label") == [
        ", ".join(x[:3]) + (f" +{len(x) - 3}" if len(x) > 3 else "") for x in shown]
    if task == "detection":
        assert chromium.evaluate("Array.from(document.querySelectorAll('#gallery .card'))"
                                 ".map((c) => c.querySelectorAll('.thumb')[0]"
                                 ".querySelectorAll('.box.det').length)") == [2] * 6
    if task == "segmentation":
        assert all(src.endswith(".s128.jpg") for src in chromium.evaluate(
            "Array.from(document.querySelectorAll('#gallery .card')).map((c) =>"
            " c.querySelector('img').src)"))
    # the label filter: every label shows exactly the rows predicting it
    options = chromium.evaluate("Array.from(document.getElementById('f-label').options)"
                                ".slice(1).map((o) => [o.value, o.textContent])")
    assert {t.rsplit(" (", 1)[0] for _, t in options} == {x for row in shown for x in row}
    for value, text in options:
        control(chromium, "f-label", value)
        label = text.rsplit(" (", 1)[0]
        assert gallery_rows(chromium) == [i for i, x in enumerate(shown) if label in x], label
    control(chromium, "f-label", "")
    open_detail(chromium, 0)
    chromium.wait_for(DETAIL_LOADED)
    if task == "detection":
        assert chromium.evaluate("document.querySelectorAll('#d-body figure')[0]"
                                 ".querySelectorAll('.box.det').length") == 2
        assert texts(chromium, "#d-body figure:first-child .box-label") == [
            f"{k + 1}. {d['label']} {d['score']:.2f}".replace("\u202e", "\\u202e")
            for k, d in enumerate(lines[0]["detections"])]
        assert len(texts(chromium, "#d-body figcaption")) == 1 + 2 * 2   # image, 2 × (overlay, heatmap)
    elif task == "segmentation":
        chromium.wait_for("(() => { const l = document.querySelector('#d-body img.layer');"
                          " return l !== null && l.complete && l.naturalWidth === 80; })()")
        assert len(texts(chromium, "#d-body .swatch")) == 2
        chromium.click("#d-mask")
        assert chromium.evaluate("document.querySelector('#d-body img.layer').hidden") is True
        assert texts(chromium, "#d-body figcaption") == ["image", "overlay", "heatmap"]
    else:
        assert [t for t in texts(chromium, "#d-body table tr td:first-child")][-len(shown[0]):] \
            == shown[0]
    chromium.screenshot(BUILD / f"{task}.png")
    assert_ran_nothing(chromium)
