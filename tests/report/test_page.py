"""camserve.report.page and the command line: the page, its data scripts (escaping, chunks), the
summary, regeneration, and the jobs at the edges (empty, errors only, hostile names, broken
artefacts)."""
from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import pytest
from PIL import Image

from camserve.onnx.inputs import UsageError
from camserve.report import page as P
from camserve.report import write_report
from camserve.report.cli import main
from camserve.report.thumbs import IMAGE, OVERLAY

from .conftest import parse_script

ASSETS = Path(P.__file__).parent / "assets"


def test_script_is_one_call_of_ascii_json_that_cannot_end_a_script() -> None:
    value = {"p": "</script><script>alert(1)</script>&amp;\u2028\u2029", "s": os.fsdecode(b"\xe9")}
    data = P.script("index", 3, [value])
    assert data.isascii() and b"<" not in data and b">" not in data and b"&" not in data
    assert b"\n" not in data[:-1]
    assert parse_script(data) == ("index", 3, [value])
    with pytest.raises(ValueError):
        P.script("index", 0, {"x": float("nan")})


def test_report_of_a_synthetic_job(job, report_data, tmp_path: Path) -> None:
    out = job(12, errors=2)
    lines = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    stats = write_report(out, input_root=tmp_path)
    assert (stats.results, stats.errors, stats.malformed, stats.preview_failures,
            stats.thumbs_made) == (12, 2, 0, 0, 24)
    d = report_data(out)
    m = d.manifest
    assert m["rows"] == len(d.rows) == len(d.details) == 14
    assert [r["p"] for r in d.rows[:12]] == [line["path"] for line in lines]
    assert all(r["f"] == IMAGE | OVERLAY for r in d.rows[:12])
    for r in d.rows[:12]:
        for kind in ("image", "overlay"):
            assert (out / (r["k"] + m["thumbs"][kind])).is_file()
    assert [m["labels"][r["l"][0]] for r in d.rows[:12]] == [line["label"] for line in lines]
    assert [r["s"] for r in d.rows[:12]] == [line["score"] for line in lines]
    assert m["metricKeys"] == ["deletion", "avg_drop"] and m["lowerIsBetter"] == ["deletion", "avg_drop"]
    for j, key in enumerate(m["metricKeys"]):
        assert [r["x"][j] for r in d.rows[:12]] == [line["metrics"][key] for line in lines]
        assert m["metricMeans"][key]["mean"] == pytest.approx(
            statistics.mean(line["metrics"][key] for line in lines))
    assert sum(m["histogram"]) == m["scored"] == 12
    assert dict((m["labels"][i], n) for i, n in m["labelCounts"]) == {
        label: sum(line["label"] == label for line in lines) for label in {x["label"] for x in lines}}
    assert [m["errorTypes"][r["e"]] for r in d.rows[12:]] == ["InvalidImage"] * 2
    assert m["errorCounts"] == [[0, 2]] and len(m["errorList"]) == 2
    det = d.details[0]
    assert det["url"] == "../" + lines[0]["path"] and det["files"] == lines[0]["files"]
    assert det["bbox"] == lines[0]["bbox"] and det["topk"] == lines[0]["topk"]
    assert d.details[12]["error"]["type"] == "InvalidImage"
    page = (out / "report.html").read_text()
    assert d.folder.name in page and (out / "report_files" / "report.js").is_file()


def test_chunks(job, report_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "INDEX_ROWS", 4)
    monkeypatch.setattr(P, "DETAIL_ROWS", 3)
    out = job(9, errors=1)
    write_report(out, input_root=tmp_path)
    d = report_data(out)
    assert (d.manifest["indexChunks"], d.manifest["detailChunks"]) == (3, 4)
    assert (d.manifest["indexRows"], d.manifest["detailRows"]) == (4, 3)
    assert [r["i"] for r in d.rows] == list(range(10))
    assert [x["path"] for x in d.details] == [r["p"] for r in d.rows]
    assert sorted(p.name for p in d.folder.iterdir()) == [
        *(f"detail-{n:05d}.js" for n in range(4)), *(f"index-{n:05d}.js" for n in range(3)),
        "manifest.js"]


def test_regeneration_is_incremental_and_keeps_one_data_folder(job, tmp_path: Path) -> None:
    out = job(5)
    first = write_report(out, input_root=tmp_path)
    assets = out / "report_files"
    (assets / "data-notours").mkdir()
    (assets / "data-00000000000000ff").symlink_to(tmp_path / "in")
    second = write_report(out, input_root=tmp_path)
    assert (first.thumbs_made, second.thumbs_made) == (10, 0)
    data = sorted(p.name for p in assets.iterdir() if p.name.startswith("data-"))
    assert len(data) == 3 and "data-notours" in data and "data-00000000000000ff" in data
    assert len(list((tmp_path / "in").iterdir())) == 5          # the symlink was not followed


def test_empty_job_and_errors_only_job(tmp_path: Path, write_lines, report_data) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results.jsonl").write_bytes(b"")
    stats = write_report(empty)
    d = report_data(empty)
    assert (stats.results, stats.errors, d.manifest["rows"], d.manifest["indexChunks"]) == (0, 0, 0, 0)
    errs = tmp_path / "errs"
    errs.mkdir()
    write_lines(errs / "errors.jsonl", [{"path": f"x{i}.png", "type": t, "reason": "r"}
                                        for i, t in enumerate(["FileTooLarge", "InvalidImage",
                                                               "InvalidImage"])])
    write_report(errs)
    d = report_data(errs)
    assert d.manifest["counts"]["errors"] == 3 and d.manifest["counts"]["results"] == 0
    assert {d.manifest["errorTypes"][i]: n for i, n in d.manifest["errorCounts"]} == {
        "InvalidImage": 2, "FileTooLarge": 1}
    assert all("k" not in r for r in d.rows) and not (errs / "thumbs").exists()


def test_not_a_job_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="neither results.jsonl nor errors.jsonl"):
        write_report(tmp_path)
    with pytest.raises(UsageError, match="is not a folder"):
        write_report(tmp_path / "missing")
    (tmp_path / "errors.jsonl").write_text("")
    with pytest.raises(UsageError, match="thumb-size"):
        write_report(tmp_path, thumb_side=8)


def test_hostile_names_labels_and_non_utf8_names(tmp_path: Path, write_lines, report_data) -> None:
    out = tmp_path / "job"
    out.mkdir()
    (tmp_path / "in").mkdir()
    latin = os.fsdecode(b"in/caf\xe9.png")
    html_name = "in/<img src=x onerror=alert(1)>.png"
    for name in (latin, html_name):
        Image.new("RGB", (30, 20), (9, 90, 200)).save(os.fsencode(tmp_path / name), "PNG")
    evil = "<script>alert(2)</script>"
    write_lines(out / "results.jsonl", [
        {"path": latin, "name": latin, "label": evil, "score": 0.5, "method": "<b>m</b>",
         "metrics": {"<i>k</i>": 1.0}, "topk": [{"index": 0, "label": evil, "score": 0.5}]},
        {"path": html_name, "name": html_name, "label": "x\u2028y", "score": 0.25}])
    write_lines(out / "errors.jsonl", [{"path": "in/\u202e<svg onload=alert(3)>", "type": "<T>",
                                        "reason": "</script>"}])
    stats = write_report(out, input_root=tmp_path, title="</title><script>alert(4)</script>")
    assert stats.preview_failures == 0 and stats.thumbs_made == 2
    d = report_data(out)
    for f in d.folder.iterdir():
        assert b"<" not in f.read_bytes() and b">" not in f.read_bytes()
    assert d.rows[0]["p"] == "in/caf\\xe9.png" and d.details[0]["url"] == "../in/caf%E9.png"
    assert d.rows[1]["p"] == html_name
    assert d.details[1]["url"] == "../in/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.png"
    assert d.manifest["labels"] == [evil, "x\\u2028y"] and d.manifest["methods"] == ["<b>m</b>"]
    assert d.manifest["metricKeys"] == ["<i>k</i>"]
    assert d.rows[2]["p"] == "in/\\u202e<svg onload=alert(3)>" and d.manifest["errorTypes"] == ["<T>"]
    page = (out / "report.html").read_text()
    assert "<script>alert" not in page and "&lt;/title&gt;&lt;script&gt;alert(4)" in page


def test_broken_artefacts_are_listed_not_fatal(tmp_path: Path, job, report_data) -> None:
    out = job(4)
    (tmp_path / "in" / "img_00001.png").write_bytes(b"not a png")
    (out / "in" / "img_00002.png.overlay.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    os.remove(tmp_path / "in" / "img_00003.png")
    stats = write_report(out, input_root=tmp_path)
    assert (stats.preview_failures, stats.missing_originals) == (3, 1)
    d = report_data(out)
    flags = [r["f"] for r in d.rows]
    assert flags == [IMAGE | OVERLAY, OVERLAY, IMAGE, OVERLAY]
    assert [e["i"] for e in d.manifest["previewList"]] == [1, 2, 3]
    assert d.rows[1]["r"].startswith("image: InvalidImage") and d.rows[2]["r"].startswith(
        "overlay: InvalidImage") and "No such file" in d.rows[3]["r"]
    assert d.manifest["counts"]["missingOriginals"] == 1


def test_relative_paths_resolve_against_the_input_root(job, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = job(2)
    monkeypatch.chdir(out)                       # not where the job ran
    assert write_report(out).missing_originals == 2
    monkeypatch.chdir(tmp_path)                  # where it ran
    stats = write_report(out)
    assert (stats.missing_originals, stats.preview_failures) == (0, 0)


def test_page_and_script_run_nothing_from_data() -> None:
    html = (ASSETS / "report.html").read_text()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert "default-src 'none'" in csp and "script-src 'self';" in csp and "unsafe" not in csp
    assert all('src="' in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"\son[a-z]+=", html) and "style=" not in html
    js = (ASSETS / "report.js").read_text()
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                   "new Function", "setAttribute(\"on", "javascript:"):
        assert banned not in js, banned
    assert not re.search(r"setTimeout\(\s*[\"'`]", js)


def test_assets_are_package_data() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["camserve.report"]
    for name in ("report.html", *P.ASSET_FILES):
        assert (ASSETS / name).is_file()
        assert any(Path("assets", name).match(g) for g in globs), name
    assert project["project"]["scripts"]["camserve-report"] == "camserve.report.cli:main"


def test_cli(job, tmp_path: Path, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> None:
    out = job(3, errors=1)
    monkeypatch.chdir(tmp_path)
    assert main([str(out), "--title", "Audit", "--thumb-size", "64", "--workers", "1"]) == 0
    assert "3 results, 1 errors, 0 malformed lines, 0 failed previews, 6 thumbnails" in \
        capsys.readouterr().out
    assert "<title>Audit</title>" in (out / "report.html").read_text()
    assert main([str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([str(out), "--thumb-size", "9999"]) == 2
    assert main([str(out), "--workers", "0"]) == 2
    with pytest.raises(SystemExit):
        main([str(out), "--max-pixels", "lots"])


def test_the_report_imports_no_onnx_runtime() -> None:
    import subprocess
    import sys

    code = ("import sys, camserve.report, camserve.report.cli; "
            "print([m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.stdout.strip() == "[]"
