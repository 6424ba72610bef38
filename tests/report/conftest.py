"""Fixtures of the report's tests.

* ``job`` — ``job(n, **kw) -> out_dir``: a synthetic batch-job folder under ``tmp_path``
  (:func:`camserve.testing.jobs.write_job`, paths relative to ``tmp_path``);
* ``write_lines`` — ``write_lines(path, lines)``: objects (or raw text lines) as a ``.jsonl``
  file, encoded as the batch job encodes them;
* ``report_data`` — ``report_data(out_dir) -> Data``: a generated report's manifest, gallery rows
  and detail records, read back from its data scripts;
* ``shapes_job`` — a real batch job over the shapes samples plus hostile names (session, cached):
  the exported graph, the job run by the batch CLI with ``--save heatmap,overlay``,
  ``--metrics`` and ``--report``;
* ``chromium`` (tests/conftest.py) — a headless Chromium for a module.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from camserve.onnx.outputs import encode_line
from camserve.testing.jobs import write_job

ROOT = Path(__file__).resolve().parents[2]
#: the hostile and unusual file names of ``shapes_job`` (bytes: one is not UTF-8)
HOSTILE_NAME = "<img src=x onerror=window.__pwned=1>.png"
SVG_NAME = "<svg onload=window.__pwned=2>.png"
LATIN1_NAME = b"caf\xe9.png"
_CALL = re.compile(rb'^camserveReport\.receive\("(\w+)",(\d+),(.*)\);\n$', re.S)


@pytest.fixture()
def job(tmp_path: Path) -> Callable[..., Path]:
    """``job(n, *, name="job", **write_job_kw) -> out_dir`` (inputs under ``tmp_path/in``)."""
    def make(n: int, *, name: str = "job", **kw: Any) -> Path:
        out = tmp_path / name
        kw.setdefault("inputs", tmp_path / "in")
        write_job(out, n, root=tmp_path, **kw)
        return out
    return make


def _write_lines(path: Path, lines: Sequence[Any]) -> Path:
    with open(path, "wb") as fh:
        for line in lines:
            text = line if isinstance(line, (str, bytes)) else encode_line(line)
            fh.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape"))
            fh.write(b"\n")
    return path


@pytest.fixture(scope="session")
def write_lines() -> Callable[[Path, Sequence[Any]], Path]:
    return _write_lines


def parse_script(data: bytes) -> tuple[str, int, Any]:
    """(kind, n, payload) of one data script; AssertionError when it is anything else than one
    ``camserveReport.receive`` call of pure ASCII JSON."""
    assert data.isascii()
    m = _CALL.match(data)
    assert m, data[:200]
    return m.group(1).decode(), int(m.group(2)), json.loads(m.group(3))


@dataclass
class Data:
    manifest: dict[str, Any]
    rows: list[dict[str, Any]]
    details: list[dict[str, Any]]
    folder: Path


def _report_data(out_dir: Path) -> Data:
    page = (out_dir / "report.html").read_text()
    folder = out_dir / re.search(r'src="(report_files/data-[0-9a-f]{16})/manifest\.js"',
                                 page).group(1)
    kind, _, manifest = parse_script((folder / "manifest.js").read_bytes())
    assert kind == "manifest"
    rows: list[dict[str, Any]] = []
    for n in range(manifest["indexChunks"]):
        kind, k, payload = parse_script((folder / f"index-{n:05d}.js").read_bytes())
        assert (kind, k) == ("index", n)
        rows.extend(payload)
    details: list[dict[str, Any]] = []
    for n in range(manifest["detailChunks"]):
        kind, k, payload = parse_script((folder / f"detail-{n:05d}.js").read_bytes())
        assert (kind, k) == ("detail", n)
        details.extend(payload)
    return Data(manifest, rows, details, folder)


@pytest.fixture(scope="session")
def report_data() -> Callable[[Path], Data]:
    return _report_data


# -- the real batch job ---------------------------------------------------------------------------------

@dataclass
class ShapesJob:
    root: Path        # the folder holding inputs/ and job/
    inputs: Path
    out: Path
    graph: Path


@pytest.fixture(scope="session")
def shapes_job(tmp_path_factory: pytest.TempPathFactory) -> ShapesJob:
    """The shapes samples, copies under two hostile names (an ``<img onerror>`` and an ``<svg onload>``), one under
    a name that is not UTF-8, and a truncated PNG, through the exported graph and the batch CLI
    (in this process) with ``--save heatmap,overlay --metrics avg_drop,deletion --report``: the
    job's own page is in ``out``."""
    from camserve.onnx.cli import main as batch_main
    from camserve.onnx.job import EXIT_PARTIAL
    from export import onnx_export

    root = tmp_path_factory.mktemp("shapes_job")
    graph = root / "shapes.cam.onnx"
    assert onnx_export.main([str(ROOT / "models" / "shapes"), "--out", str(graph)]) == 0
    inputs = root / "inputs"
    inputs.mkdir()
    samples = ROOT / "models" / "shapes" / "samples"
    for png in sorted(samples.glob("*.png")):
        shutil.copy(png, inputs / png.name)
    shutil.copy(samples / "circle_000.png", inputs / HOSTILE_NAME)
    shutil.copy(samples / "square_001.png", inputs / SVG_NAME)
    shutil.copy(samples / "star_003.png", os.fsencode(inputs) + b"/" + LATIN1_NAME)
    (inputs / "truncated.png").write_bytes((samples / "ring_005.png").read_bytes()[:300])
    out = root / "job"
    status = batch_main(["--model", str(graph), str(inputs), "--out", str(out), "--batch-size", "4",
                         "--save", "heatmap,overlay", "--metrics", "avg_drop,deletion",
                         "--metrics-steps", "8", "--no-progress", "--report"])
    assert status == EXIT_PARTIAL  # the truncated file; the page is written all the same
    assert (out / "report.html").is_file()
    return ShapesJob(root, inputs, out, graph)
