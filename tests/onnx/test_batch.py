"""The batch job's local runner (camserve.onnx.batch), end to end through its command line: real
onnxruntime sessions on a small exported CAM graph, real files, hostile ones among them."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from camserve import CamEngine, heatmaps_at_sizes
from camserve.images import load_image_file, preprocess
from camserve.onnx import inputs as batch_inputs
from camserve.onnx.batch import run_job
from camserve.onnx.cli import main
from camserve.onnx.job import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, JobConfig

from .conftest import LABELS, LAYER, MEAN, ROOT, SIZE, STD, job_env, photo

JsonLines = Callable[[Path], list[dict]]


def _engine_heatmap(model: torch.nn.Module, path: Path, method: str = "gradcam") -> np.ndarray:
    img = load_image_file(path)
    x = preprocess(img, SIZE, MEAN, STD)[None]
    res = CamEngine(model, LAYER)(x, method=method)
    return heatmaps_at_sizes(res.cams, [(img.height, img.width)])[0]


def test_folder_with_broken_files(graph: Path, images: dict[str, Path], model: torch.nn.Module,
                                  tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  json_lines: JsonLines) -> None:
    out = tmp_path / "out"
    code = main(["--model", str(graph), str(images["root"]), "--out", str(out), "--batch-size", "2",
                 "--save", "heatmap,overlay,npy"])
    assert code == EXIT_PARTIAL == 3
    captured = capsys.readouterr()
    assert "5 images explained, 3 failed" in captured.out
    assert "img/s]" not in captured.err  # no progress bar when stderr is not a terminal

    errors = {Path(e["path"]).name: e for e in json_lines(out / "errors.jsonl")}
    assert set(errors) == {"truncated.jpg", "empty.jpg", "notes.png"}
    assert "truncated" in errors["truncated.jpg"]["reason"]
    assert "empty" in errors["empty.jpg"]["reason"]
    assert errors["notes.png"]["type"] == "InvalidImage"

    results = {Path(r["path"]).stem: r for r in json_lines(out / "results.jsonl")}
    assert set(results) == {"a", "b", "c", "d", "e"}
    for key, r in results.items():
        img = Image.open(images[key])
        assert (r["width"], r["height"]) == img.size
        assert [t["label"] for t in r["topk"]] == [LABELS[t["index"]] for t in r["topk"]]
        assert len(r["topk"]) == 3  # the graph's topk metadata
        scores = [t["score"] for t in r["topk"]]
        assert scores == sorted(scores, reverse=True)
        assert r["target"] == r["topk"][0]["index"] and r["label"] == LABELS[r["target"]]
        assert r["method"] == "gradcam" and r["layer"] == LAYER
        x0, y0, x1, y1 = r["bbox"]
        assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
        # output names mirror the input tree under DIR
        rel = Path(r["name"])
        assert rel.parts[0] == "photos" and rel.name == images[key].name
        assert r["files"] == {"heatmap": f"{r['name']}.heatmap.png",
                              "overlay": f"{r['name']}.overlay.png", "npy": f"{r['name']}.cam.npy"}
    assert (out / "photos" / "sub" / "deeper" / "d.jpeg.heatmap.png").is_file()

    # heatmaps at the original size, equal to the engine's (the handler's path) within 1 level
    for key in ("a", "c", "d"):
        r = results[key]
        hm = np.asarray(Image.open(out / r["files"]["heatmap"]))
        assert hm.shape == (r["height"], r["width"]) and hm.dtype == np.uint8
        ref = _engine_heatmap(model, images[key])
        assert int(np.abs(hm.astype(int) - ref.astype(int)).max()) <= 1
        overlay = Image.open(out / r["files"]["overlay"])
        assert overlay.size == (r["width"], r["height"]) and overlay.mode == "RGB"
        raw = np.load(out / r["files"]["npy"])
        assert raw.dtype == np.float32 and raw.shape == (4, 4)


def test_all_good_exits_0_and_method_choice(graph: Path, images: dict[str, Path],
                                            model: torch.nn.Module, tmp_path: Path,
                                            json_lines: JsonLines) -> None:
    out = tmp_path / "out"
    code = main(["--model", str(graph), str(images["a"]), str(images["b"]), "--out", str(out),
                 "--method", "layercam", "--threads", "1", "--workers", "2"])
    assert code == EXIT_OK
    results = json_lines(out / "results.jsonl")
    assert [Path(r["path"]).name for r in results] == ["a.jpg", "b.png"]
    assert all(r["method"] == "layercam" for r in results)
    assert (out / "errors.jsonl").read_text() == ""
    hm = np.asarray(Image.open(out / "a.jpg.heatmap.png"))  # a file given directly: its name
    ref = _engine_heatmap(model, images["a"], method="layercam")
    assert int(np.abs(hm.astype(int) - ref.astype(int)).max()) <= 1


def test_explicit_target(graph: Path, images: dict[str, Path], model: torch.nn.Module,
                         tmp_path: Path, json_lines: JsonLines) -> None:
    out = tmp_path / "out"
    assert main(["--model", str(graph), str(images["b"]), "--out", str(out), "--target", "eel",
                 "--save", "npy"]) == EXIT_OK
    [r] = json_lines(out / "results.jsonl")
    assert r["target"] == 4 and r["label"] == "eel"
    img = load_image_file(images["b"])
    x = preprocess(img, SIZE, MEAN, STD)[None]
    ref = CamEngine(model, LAYER)(x, targets=[4]).cams[0].numpy()
    raw = np.load(out / r["files"]["npy"])
    assert np.abs(raw - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1e-12)


def test_target_labels_resolve_like_the_server(graph: Path, images: dict[str, Path],
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              json_lines: JsonLines) -> None:
    """--target takes labels case-insensitively and indices, as the handler's target option does
    (camserve.records.parse_target); -1 is each image's top-1 class."""
    for value, want in (("EEL", 4), ("Bee", 1), ("2", 2), ("-1", None)):
        out = tmp_path / f"out-{value}"
        assert main(["--model", str(graph), str(images["a"]), "--out", str(out), "--save", "none",
                     "--target", value]) == EXIT_OK
        [r] = json_lines(out / "results.jsonl")
        assert r["target"] == (r["topk"][0]["index"] if want is None else want)
        assert r["label"] == LABELS[r["target"]]
    for value, match in (("yak", "unknown label 'yak'"), ("5", "out of range"), ("-2", "out of range")):
        assert main(["--model", str(graph), str(images["a"]), "--out", str(tmp_path / "x"),
                     "--target", value]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "invalid value for --target" in err and match in err


def test_list_file_input(graph: Path, images: dict[str, Path], tmp_path: Path,
json_lines: JsonLines) -> None:
    root = images["root"]
    listing = root / "todo.txt"
    listing.write_text("# images to explain\nb.png\n\nsub/c.png\nmissing.jpg\n"
                       f"{images['e']}\n")
    out = tmp_path / "out"
    assert main(["--model", str(graph), str(listing), "--out", str(out)]) == EXIT_PARTIAL
    names = [r["name"] for r in json_lines(out / "results.jsonl")]
    assert names[:2] == ["b.png", "sub/c.png"]  # relative to the list's folder
    assert names[2].endswith("photos/e.bmp")  # an absolute entry keeps its path under DIR
    assert (out / "sub" / "c.png.heatmap.png").is_file()
    [err] = json_lines(out / "errors.jsonl")
    assert err["path"].endswith("missing.jpg") and err["type"] == "UnreadableFile"


def test_resume_skips_done_images(graph: Path, images: dict[str, Path], tmp_path: Path,
json_lines: JsonLines) -> None:
    out = tmp_path / "out"
    cfg = JobConfig(model=graph, inputs=[str(images["root"])], out=out, batch_size=2)
    first = run_job(cfg)
    assert (first.ok, first.failed, first.exit_status) == (5, 3, 3)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    # an interrupted run: two complete lines and a torn third one
    (out / "results.jsonl").write_text("".join(lines[:2]) + lines[2][:25])
    done = [json.loads(line)["path"] for line in lines[:2]]
    stamp = {p: (out / json.loads(line)["files"]["heatmap"]).stat().st_mtime_ns
             for p, line in zip(done, lines[:2])}

    second = run_job(JobConfig(model=graph, inputs=[str(images["root"])], out=out, batch_size=2,
                               resume=True))
    assert (second.ok, second.failed, second.skipped) == (3, 3, 2)
    results = json_lines(out / "results.jsonl")
    assert sorted(r["path"] for r in results) == sorted(json.loads(line)["path"] for line in lines)
    assert len(json_lines(out / "errors.jsonl")) == 3  # failures are retried, not duplicated
    for r in results:
        if r["path"] in stamp:  # not rewritten
            assert (out / r["files"]["heatmap"]).stat().st_mtime_ns == stamp[r["path"]]

    third = run_job(JobConfig(model=graph, inputs=[str(images["root"])], out=out, resume=True))
    assert (third.ok, third.skipped) == (0, 5)


def test_overlapped_and_phased_runs_agree(graph: Path, images: dict[str, Path],
                                          tmp_path: Path, json_lines: JsonLines) -> None:
    """Decoding alongside the session or between its runs changes timing, not results."""
    lines = {}
    for overlap in (True, False):
        out = tmp_path / f"out-{overlap}"
        stats = run_job(JobConfig(model=graph, inputs=[str(images["root"])], out=out, batch_size=3,
                                  overlap=overlap, save=("npy",)))
        assert (stats.ok, stats.failed) == (5, 3)
        lines[overlap] = (out / "results.jsonl").read_text()
        for r in json_lines(out / "results.jsonl"):
            assert np.load(out / r["files"]["npy"]).shape == (4, 4)
    assert lines[True].replace("out-True", "") == lines[False].replace("out-False", "")


def test_export_then_job_on_committed_samples_matches_the_handler(tmp_path: Path,
json_lines: JsonLines) -> None:
    """The issue's acceptance path on the committed default model: the export CLI, then the batch
    CLI over models/shapes/samples; results and heatmap PNGs equal what the TorchServe handler
    answers for the same files (same decoding, preprocessing and map code)."""
    pytest.importorskip("ts", reason="TorchServe (the ts package) is not installed")
    import base64

    from camserve.testing.context import FakeContext
    from camserve.testing.handler import load_handler
    from export import onnx_export  # the thin entry point of the Makefile

    root = Path(__file__).resolve().parents[2]
    model_dir, samples = root / "models" / "shapes", root / "models" / "shapes" / "samples"
    onnx_path, out = tmp_path / "shapes.cam.onnx", tmp_path / "job"
    assert onnx_export.main([str(model_dir), "--out", str(onnx_path)]) == 0
    assert main(["--model", str(onnx_path), str(samples), "--out", str(out), "--batch-size", "3",
                 "--save", "heatmap,npy"]) == EXIT_OK
    rows = {Path(r["path"]).name: r for r in json_lines(out / "results.jsonl")}
    boxes = json.loads((samples / "boxes.json").read_text())
    assert set(rows) == set(boxes) and not (out / "errors.jsonl").read_text().strip()

    ctx = FakeContext(model_dir, model_name="shapes", model_file="model.py")
    handler = load_handler(root / "handler" / "gradcam_handler.py", ctx).instance
    names = sorted(boxes)
    ctx.set_requests([{"explain": "True"}] * len(names))
    answers = [json.loads(a) for a in handler.handle(
        [{"body": (samples / n).read_bytes()} for n in names], ctx)]
    for name, ans in zip(names, answers):
        r, e = rows[name], ans["explanations"][0]
        assert r["label"] == e["label"] == boxes[name]["label"], name
        assert [t["index"] for t in r["topk"]] == [p["index"] for p in ans["predictions"]]
        for t, p in zip(r["topk"], ans["predictions"]):
            assert abs(t["score"] - p["score"]) < 1e-4
        job_map = np.asarray(Image.open(out / r["files"]["heatmap"]))
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(e["heatmap"]))))
        assert job_map.shape == served.shape == (r["height"], r["width"])
        assert int(np.abs(job_map.astype(int) - served.astype(int)).max()) <= 1, name
        assert np.abs(np.array(r["bbox"]) - np.array(e["bbox"])).max() <= 1, name


def _json_lines(path: Path) -> list[dict]:
    """Lines of a .jsonl file, read as bytes: each must be valid UTF-8 and valid JSON."""
    raw = path.read_bytes()
    raw.decode("utf-8")  # the whole file is valid UTF-8
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def _tree(root: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under ``root`` (links not followed): kind and content (or link target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = os.fsencode(p.relative_to(root)).decode("utf-8", "backslashreplace")
            if p.is_symlink():
                out[rel] = ("link", os.fsencode(os.readlink(p)))
            elif p.is_dir():
                out[rel] = ("dir", b"")
            elif p.is_file():
                out[rel] = ("file", p.read_bytes())
            else:
                out[rel] = ("special", b"")
    return out


def test_long_and_non_utf8_names(graph: Path, tmp_path: Path) -> None:
    """An over-long output name is shortened with a hash (keeping the suffix); a name that is not
    UTF-8 is kept losslessly and written as escaped JSON in a valid UTF-8 line."""
    root = tmp_path / "photos"
    long_name = "x" * 240 + ".png"  # fits the input filesystem, not with ".overlay.png" added
    photo(root / long_name, (30, 40), 1)
    raw_name = b"caf\xe9-\xff.png"  # Latin-1, not UTF-8
    photo(Path(os.fsdecode(os.fsencode(root) + b"/" + raw_name)), (30, 40), 2)
    out = tmp_path / "out"
    assert main(["--model", str(graph), str(root), "--out", str(out), "--save",
                 "heatmap,overlay"]) == EXIT_OK
    lines = _json_lines(out / "results.jsonl")
    assert len(lines) == 2
    by_raw = {os.fsencode(r["path"]): r for r in lines}
    r = by_raw[os.fsencode(root) + b"/" + raw_name]  # the original bytes, back from the JSON
    assert os.fsencode(r["name"]) == b"photos/" + raw_name
    assert (out / r["files"]["heatmap"]).is_file()
    text = (out / "results.jsonl").read_bytes()
    assert b"\\udce9" in text and b"\xe9" not in text  # escaped, never raw bytes
    [long] = [r for r in lines if r["path"].endswith(long_name)]
    last = Path(long["name"]).name
    assert last.endswith(".png") and "~" in last and len(last.encode()) <= 200
    assert all((out / rel).is_file() for rel in long["files"].values())
    # the same name twice gives the same shortening; another long name another one
    assert batch_inputs._short_component(long_name) == last
    assert batch_inputs._short_component("y" * 240 + ".png") != last


def test_special_and_huge_files_are_refused(graph: Path, tmp_path: Path) -> None:
    """A FIFO in a folder and /dev/zero in a list are refused without reading; a file over
    --max-file-size is refused; the job goes on (exit 3)."""
    root = tmp_path / "photos"
    photo(root / "good.png", (30, 40), 1)
    os.mkfifo(root / "fifo.jpg")
    big = root / "big.png"
    photo(big, (300, 300), 2)
    listing = tmp_path / "list.txt"
    listing.write_text(f"/dev/zero\n{root / 'good.png'}\n")
    out = tmp_path / "out"
    t0 = time.monotonic()
    code = main(["--model", str(graph), str(root), str(listing), "--out", str(out),
                 "--max-file-size", str(big.stat().st_size - 1)])
    assert time.monotonic() - t0 < 60
    assert code == EXIT_PARTIAL
    errors = {Path(e["path"]).name: e for e in _json_lines(out / "errors.jsonl")}
    assert errors["fifo.jpg"]["type"] == "NotARegularFile" and "FIFO" in errors["fifo.jpg"]["reason"]
    assert errors["zero"]["type"] == "NotARegularFile"
    assert errors["big.png"]["type"] == "FileTooLarge"
    assert len(_json_lines(out / "results.jsonl")) == 1  # good.png, listed twice, done once
    with pytest.raises(batch_inputs.Refused):
        batch_inputs.read_file(big, max_size=10)


def test_output_folder_inside_input_and_symlinks(graph: Path, tmp_path: Path) -> None:
    """The output folder inside the input folder is never listed; an existing symlink in it is
    replaced, its target untouched; results.jsonl as a symlink is not followed."""
    root = tmp_path / "photos"
    photo(root / "a.png", (30, 40), 1)
    out = root / "cams"
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (out / "photos").mkdir(parents=True)
    os.symlink(outside, out / "photos" / "a.png.heatmap.png")
    os.symlink(outside, out / "errors.jsonl")
    for _ in range(2):  # the second run would see the first one's heatmaps if it listed DIR
        assert main(["--model", str(graph), str(root), "--out", str(out)]) == EXIT_OK
        assert [r["name"] for r in _json_lines(out / "results.jsonl")] == ["photos/a.png"]
    assert outside.read_text() == "keep me"
    assert not (out / "photos" / "a.png.heatmap.png").is_symlink()
    assert not (out / "errors.jsonl").is_symlink()
    # a symlinked folder inside DIR is not followed: that image's error, not a file outside
    target_dir = tmp_path / "elsewhere"
    target_dir.mkdir()
    out2 = tmp_path / "out2"
    out2.mkdir()
    os.symlink(target_dir, out2 / "photos")
    assert main(["--model", str(graph), str(root / "a.png"), str(root), "--out",
                 str(out2)]) == EXIT_PARTIAL
    [err] = _json_lines(out2 / "errors.jsonl")
    assert err["type"] == "UnwritableOutput" and "symlink" in err["reason"]
    assert list(target_dir.iterdir()) == []


def test_resume_keeps_names_unique_across_runs(graph: Path, tmp_path: Path) -> None:
    """A/photos then B/photos into the same DIR with --resume: the second run's a.png is
    photos/a.png~2, the first run's files are not overwritten."""
    a = photo(tmp_path / "A" / "photos" / "a.png", (30, 40), 1)
    b = photo(tmp_path / "B" / "photos" / "a.png", (40, 30), 2)
    out = tmp_path / "out"
    assert main(["--model", str(graph), str(a.parent), "--out", str(out)]) == EXIT_OK
    first = (out / "photos" / "a.png.heatmap.png").read_bytes()
    assert main(["--model", str(graph), str(b.parent), "--out", str(out), "--resume"]) == EXIT_OK
    lines = _json_lines(out / "results.jsonl")
    assert [r["name"] for r in lines] == ["photos/a.png", "photos/a.png~2"]
    assert (out / "photos" / "a.png.heatmap.png").read_bytes() == first
    assert Image.open(out / "photos" / "a.png~2.heatmap.png").size == (30, 40)


def test_resume_skips_malformed_middle_lines(graph: Path, images: dict[str, Path],
                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_job(JobConfig(model=graph, inputs=[str(images["root"])], out=out)).ok == 5
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    bad = [b"not json\n", b"\xff\xfe garbage\n", b'{"no": "path"}\n', b"[1, 2]\n"]
    # a malformed middle line, valid lines after it, and a torn last line
    text = lines[0] + bad[0] + lines[1] + bad[1] + bad[2] + lines[2] + bad[3] + lines[3] + lines[4][:20]
    (out / "results.jsonl").write_bytes(text)
    stats = run_job(JobConfig(model=graph, inputs=[str(images["root"])], out=out, resume=True))
    assert (stats.ok, stats.skipped, stats.malformed) == (1, 4, 4)
    after = (out / "results.jsonl").read_bytes()
    assert after.startswith(text[: -20])  # only the torn last line was cut
    paths = [json.loads(line)["path"] for line in after.splitlines()
             if line.startswith(b'{"path"')]
    assert sorted(paths) == sorted(json.loads(line)["path"] for line in lines)


def test_overlay_drawn_from_a_bounded_copy(graph: Path, tmp_path: Path) -> None:
    big = photo(tmp_path / "wide.png", (300, 2600), 1)
    out = tmp_path / "out"
    assert main(["--model", str(graph), str(big), "--out", str(out), "--save",
                 "heatmap,overlay"]) == EXIT_OK
    [r] = _json_lines(out / "results.jsonl")
    assert Image.open(out / r["files"]["heatmap"]).size == (2600, 300)  # the original size
    assert Image.open(out / r["files"]["overlay"]).size == (2048, 236)  # long side 2048


@pytest.mark.timeout(300)
def test_ctrl_c_stops_within_2s_then_resume(graph: Path, tmp_path: Path) -> None:
    """SIGINT to a real job mid-run: exit 130 within 2 s, whole lines only; --resume finishes."""
    n = 400
    for i in range(n):
        photo(tmp_path / "photos" / f"{i:03d}.png", (120, 160), i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "export.batch_cam", "--model", str(graph),
           str(tmp_path / "photos"), "--out", str(out), "--batch-size", "2",
           "--save", "heatmap,overlay"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None:
            if (out / "results.jsonl").exists() and (out / "results.jsonl").stat().st_size:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before Ctrl-C"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert took < 2.0, f"took {took:.2f}s to stop"
    assert "run again with --resume" in stderr
    text = (out / "results.jsonl").read_bytes()
    assert text.endswith(b"\n")
    done = [json.loads(line)["path"] for line in text.splitlines()]
    assert len(done) == len(set(done)) < n
    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=job_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == EXIT_OK, again.stderr[-2000:]
    assert f"{n - len(done)} images explained, 0 failed, {len(done)} skipped" in again.stdout
    paths = [r["path"] for r in _json_lines(out / "results.jsonl")]
    assert len(paths) == len(set(paths)) == n
    print(f"\nSIGINT after {len(done)}/{n} lines: exit 130 in {took:.2f}s")


@pytest.mark.timeout(300)
def test_hostile_folder_in_one_run(graph: Path, tmp_path: Path) -> None:
    """Items 8-12 together: long and non-UTF-8 names, a FIFO, a symlink in the output folder
    pointing outside it, the output folder inside the input folder, a binary list, a list with a
    NUL entry and /dev/zero, a corrupt image, the hostile corpus; then a malformed middle line and
    --resume. Exit 3, every good image explained, every bad item in errors.jsonl, nothing written
    outside the output folder."""
    from camserve.testing.hostile import hostile_corpus, write_corpus

    limit = 4_000_000  # --max-pixels: keeps the corpus's big valid images fast
    src = tmp_path / "in"
    good = [photo(src / "a.png", (40, 50), 1), photo(src / "sub" / "b.jpg", (60, 30), 2)]
    good.append(photo(src / ("L" * 245 + ".png"), (30, 30), 3))
    good.append(photo(Path(os.fsdecode(os.fsencode(src) + b"/\xff\xfe-latin\xe9.png")), (30, 30), 4))
    bad: dict[str, str] = {}  # path -> expected error type
    os.mkfifo(src / "pipe.jpg")
    bad[str(src / "pipe.jpg")] = "NotARegularFile"
    jpeg = io.BytesIO()
    Image.open(good[1]).save(jpeg, "JPEG")
    (src / "corrupt.jpg").write_bytes(jpeg.getvalue()[:200])
    bad[str(src / "corrupt.jpg")] = "InvalidImage"
    write_corpus(src / "hostile")
    corpus = hostile_corpus()
    manifest = json.loads((src / "hostile" / "manifest.json").read_text())
    (src / "hostile.txt").write_text("".join(f"hostile/{m['file']}\n" for m in manifest))
    for m in manifest:
        outcome = corpus[m["name"]].outcome(max_pixels=limit)
        if outcome.type is not None:
            bad[str(src / "hostile" / m["file"])] = outcome.type
        else:
            good.append(src / "hostile" / m["file"])
    (src / "binary.txt").write_bytes((src / "a.png").read_bytes())
    bad[str(src / "binary.txt")] = "InvalidList"
    (src / "nul.txt").write_bytes(b"# entries\na.png\nbad\x00entry.png\n/dev/zero\nsub/b.jpg\n"
                                  b"a.png\n" * 3)
    bad["bad\x00entry.png"] = "InvalidListEntry"
    bad["/dev/zero"] = "NotARegularFile"
    # the output folder, inside the input folder, with links pointing out of it
    out = src / "cams"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.bin").write_bytes(b"precious")
    (outside / "errs.txt").write_bytes(b"also precious")
    (out / "in").mkdir(parents=True)
    os.symlink(outside / "target.bin", out / "in" / "a.png.heatmap.png")
    os.symlink(outside / "errs.txt", out / "errors.jsonl")

    def snapshot() -> dict:
        return {k: v for k, v in _tree(tmp_path).items() if not k.startswith("in/cams")}

    before = snapshot()
    args = ["--model", str(graph), str(src), str(src / "hostile.txt"), str(src / "binary.txt"),
            str(src / "nul.txt"), "--out", str(out), "--batch-size", "4", "--max-pixels",
            str(limit), "--save", "heatmap,overlay,npy"]
    t0 = time.monotonic()
    assert main(args) == EXIT_PARTIAL
    seconds = time.monotonic() - t0
    assert snapshot() == before  # nothing outside DIR written, the link targets intact
    results = _json_lines(out / "results.jsonl")
    errors = _json_lines(out / "errors.jsonl")
    done = {r["path"] for r in results}
    assert len(done) == len(results)
    want_good = {str(p) for p in good}
    assert want_good <= done  # every good image explained
    # a.png and b.jpg are also listed in nul.txt (other paths, same files): explained again
    assert done - want_good == {str(src / "a.png"), str(src / "sub" / "b.jpg")} - want_good
    got_bad = {e["path"]: e["type"] for e in errors}
    for path, typ in bad.items():
        assert got_bad.get(path) == typ, (path, typ, got_bad.get(path))
    assert set(got_bad) == set(bad)
    assert not any(p.startswith(str(out)) for p in done | set(got_bad))  # DIR never listed
    for r in results:
        for rel in r["files"].values():
            f = out / rel
            assert f.is_file() and not f.is_symlink()
            assert len(os.fsencode(f.name)) <= 255
    assert not [p for p in out.rglob(".~*.tmp")]  # no temporary file left
    # a malformed middle line, then --resume: valid lines after it are kept, nothing redone
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[:3]) + b"{oops\n" + b"".join(lines[3:]))
    before = snapshot()
    assert main(args + ["--resume"]) == EXIT_PARTIAL
    assert snapshot() == before
    after = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    assert after[:3] == lines[:3] and after[4:4 + len(lines) - 3] == lines[3:]
    assert len(after) == len(lines) + 1  # nothing explained twice
    assert {e["path"]: e["type"] for e in _json_lines(out / "errors.jsonl")} == got_bad
    print(f"\nhostile run: {len(results)} explained, {len(errors)} errors in {seconds:.1f}s")


def test_metrics_flag_adds_per_image_metrics_and_their_means(graph: Path, images: dict[str, Path],
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             json_lines: JsonLines) -> None:
    out = tmp_path / "out"
    keys = ["deletion", "insertion", "road_morf", "avg_drop"]
    code = main(["--model", str(graph), str(images["root"]), "--out", str(out), "--batch-size", "2",
                 "--save", "none", "--metrics", ",".join(keys), "--metrics-steps", "5"])
    assert code == EXIT_PARTIAL  # the three broken files; the five images get their metrics
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    results = json_lines(out / "results.jsonl")
    assert len(results) == 5
    for r in results:
        m = r["metrics"]
        assert list(m) == keys, r["name"]
        assert 0.0 <= m["deletion"] <= 1.0 and 0.0 <= m["insertion"] <= 1.0
        assert -1.0 <= m["road_morf"] <= 1.0 and 0.0 <= m["avg_drop"] <= 100.0
    # 1 reference + 5 + 5 steps + 9 ROAD percentiles + 1 confidence run
    assert "metrics (mean of 5 images, 21 session runs per image" in summary
    for k in keys:
        mean = float(np.mean([r["metrics"][k] for r in results]))
        shown = float(summary.split(f"{k}=")[1].split()[0])
        assert abs(shown - mean) <= (0.006 if k == "avg_drop" else 6e-5), (k, shown, mean)


def test_metrics_through_onnxruntime_equal_the_torch_model(graph: Path, images: dict[str, Path],
                                                           model: torch.nn.Module) -> None:
    """The graph's session is the audit's model: same numbers as the PyTorch model it came from."""
    from camserve import metrics as M
    from camserve.onnx.audit import audit_batch
    from camserve.onnx.session import ort_session

    sess = ort_session(graph, threads=1)
    x = torch.stack([preprocess(load_image_file(images[k]), SIZE, MEAN, STD) for k in "ab"])
    logits, cams = sess.run(["logits", "cam"], {"input": x.numpy()})
    targets = torch.from_numpy(logits).argmax(1)
    keys = ("deletion", "insertion", "avg_drop", "avg_increase")  # ROAD: the job test above
    rows = audit_batch(sess, x, cams, targets, keys, steps=4)
    ref = M.compute_metrics(model, x, torch.from_numpy(cams), targets, keys=keys, steps=4)
    for k in keys:
        got = torch.tensor([row[k] for row in rows], dtype=torch.float64)
        torch.testing.assert_close(got, ref[k].double(), atol=1e-3 if k == "avg_drop" else 1e-4,
                                   rtol=0, msg=k)

