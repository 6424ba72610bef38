"""The offline batch job: real onnxruntime sessions on a small exported CAM graph, real files."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from camserve import CamEngine, heatmaps_at_sizes
from camserve.images import load_image_file, preprocess
from camserve.models import ModelSpec, from_module
from camserve.onnx import batch as batch_cam
from camserve.onnx import inputs as batch_inputs
from camserve.onnx import outputs as batch_outputs
from camserve.onnx.batch import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, JobConfig, main, run_job
from camserve.onnx.export import export_cam_onnx, export_plain_onnx
from camserve.onnx.format import GraphMeta

LABELS = ["ant", "bee", "cat", "dog", "eel"]
SIZE = (64, 64)
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.3, 0.2)
LAYER = "layer3"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=len(LABELS)).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def graph(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec(arch="torchvision.models.resnet18", input_size=SIZE, mean=MEAN, std=STD,
                     target_layer=LAYER, topk=3)
    src = from_module(model, spec, labels=LABELS)
    out = tmp_path_factory.mktemp("graph") / "r18.cam.onnx"
    export_cam_onnx(src, out, methods=("gradcam", "layercam"))
    return out


def _img(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB", fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    h, w = size
    base = np.zeros((h, w, 3), np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    base[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(100, 255, 3)  # a bright block
    base += rng.integers(0, 40, base.shape, dtype=np.uint8)
    img = Image.fromarray(base)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "photos"
    good = {
        "a": _img(root / "a.jpg", (48, 80), 1),
        "b": _img(root / "b.png", (90, 60), 2),
        "c": _img(root / "sub" / "c.png", (33, 47), 3, mode="RGBA"),
        "d": _img(root / "sub" / "deeper" / "d.jpeg", (70, 70), 4, mode="L"),
        "e": _img(root / "e.bmp", (20, 100), 5),
    }
    jpeg = io.BytesIO()
    Image.open(good["a"]).save(jpeg, "JPEG")
    bad = {
        "truncated": root / "bad" / "truncated.jpg",
        "empty": root / "bad" / "empty.jpg",
        "text": root / "bad" / "notes.png",
    }
    bad["truncated"].parent.mkdir(parents=True)
    bad["truncated"].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not an image\n")
    (root / "README.txt").write_text("not listed: folders only pick image suffixes\n")
    return {"root": root, **good, **{f"bad_{k}": v for k, v in bad.items()}}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _engine_heatmap(model: torch.nn.Module, path: Path, method: str = "gradcam") -> np.ndarray:
    img = load_image_file(path)
    x = preprocess(img, SIZE, MEAN, STD)[None]
    res = CamEngine(model, LAYER)(x, method=method)
    return heatmaps_at_sizes(res.cams, [(img.height, img.width)])[0]


def test_folder_with_broken_files(graph: Path, images: dict[str, Path], model: torch.nn.Module,
                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["--model", str(graph), str(images["root"]), "--out", str(out), "--batch-size", "2",
                 "--save", "heatmap,overlay,npy"])
    assert code == EXIT_PARTIAL == 3
    captured = capsys.readouterr()
    assert "5 images explained, 3 failed" in captured.out
    assert "img/s]" not in captured.err  # no progress bar when stderr is not a terminal

    errors = {Path(e["path"]).name: e for e in _lines(out / "errors.jsonl")}
    assert set(errors) == {"truncated.jpg", "empty.jpg", "notes.png"}
    assert "truncated" in errors["truncated.jpg"]["reason"]
    assert "empty" in errors["empty.jpg"]["reason"]
    assert errors["notes.png"]["type"] == "InvalidImage"

    results = {Path(r["path"]).stem: r for r in _lines(out / "results.jsonl")}
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
                                            model: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["--model", str(graph), str(images["a"]), str(images["b"]), "--out", str(out),
                 "--method", "layercam", "--threads", "1", "--workers", "2"])
    assert code == EXIT_OK
    results = _lines(out / "results.jsonl")
    assert [Path(r["path"]).name for r in results] == ["a.jpg", "b.png"]
    assert all(r["method"] == "layercam" for r in results)
    assert (out / "errors.jsonl").read_text() == ""
    hm = np.asarray(Image.open(out / "a.jpg.heatmap.png"))  # a file given directly: its name
    ref = _engine_heatmap(model, images["a"], method="layercam")
    assert int(np.abs(hm.astype(int) - ref.astype(int)).max()) <= 1


def test_explicit_target(graph: Path, images: dict[str, Path], model: torch.nn.Module,
                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--model", str(graph), str(images["b"]), "--out", str(out), "--target", "eel",
                 "--save", "npy"]) == EXIT_OK
    [r] = _lines(out / "results.jsonl")
    assert r["target"] == 4 and r["label"] == "eel"
    img = load_image_file(images["b"])
    x = preprocess(img, SIZE, MEAN, STD)[None]
    ref = CamEngine(model, LAYER)(x, targets=[4]).cams[0].numpy()
    raw = np.load(out / r["files"]["npy"])
    assert np.abs(raw - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1e-12)


def test_target_labels_resolve_like_the_server(graph: Path, images: dict[str, Path],
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--target takes labels case-insensitively and indices, as the handler's target option does
    (camserve.records.parse_target); -1 is each image's top-1 class."""
    for value, want in (("EEL", 4), ("Bee", 1), ("2", 2), ("-1", None)):
        out = tmp_path / f"out-{value}"
        assert main(["--model", str(graph), str(images["a"]), "--out", str(out), "--save", "none",
                     "--target", value]) == EXIT_OK
        [r] = _lines(out / "results.jsonl")
        assert r["target"] == (r["topk"][0]["index"] if want is None else want)
        assert r["label"] == LABELS[r["target"]]
    for value, match in (("yak", "unknown label 'yak'"), ("5", "out of range"), ("-2", "out of range")):
        assert main(["--model", str(graph), str(images["a"]), "--out", str(tmp_path / "x"),
                     "--target", value]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "invalid value for --target" in err and match in err


def test_list_file_input(graph: Path, images: dict[str, Path], tmp_path: Path) -> None:
    root = images["root"]
    listing = root / "todo.txt"
    listing.write_text("# images to explain\nb.png\n\nsub/c.png\nmissing.jpg\n"
                       f"{images['e']}\n")
    out = tmp_path / "out"
    assert main(["--model", str(graph), str(listing), "--out", str(out)]) == EXIT_PARTIAL
    names = [r["name"] for r in _lines(out / "results.jsonl")]
    assert names[:2] == ["b.png", "sub/c.png"]  # relative to the list's folder
    assert names[2].endswith("photos/e.bmp")  # an absolute entry keeps its path under DIR
    assert (out / "sub" / "c.png.heatmap.png").is_file()
    [err] = _lines(out / "errors.jsonl")
    assert err["path"].endswith("missing.jpg") and err["type"] == "UnreadableFile"


def test_resume_skips_done_images(graph: Path, images: dict[str, Path], tmp_path: Path) -> None:
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
    results = _lines(out / "results.jsonl")
    assert sorted(r["path"] for r in results) == sorted(json.loads(line)["path"] for line in lines)
    assert len(_lines(out / "errors.jsonl")) == 3  # failures are retried, not duplicated
    for r in results:
        if r["path"] in stamp:  # not rewritten
            assert (out / r["files"]["heatmap"]).stat().st_mtime_ns == stamp[r["path"]]

    third = run_job(JobConfig(model=graph, inputs=[str(images["root"])], out=out, resume=True))
    assert (third.ok, third.skipped) == (0, 5)


def test_overlapped_and_phased_runs_agree(graph: Path, images: dict[str, Path],
                                          tmp_path: Path) -> None:
    """Decoding alongside the session or between its runs changes timing, not results."""
    lines = {}
    for overlap in (True, False):
        out = tmp_path / f"out-{overlap}"
        stats = run_job(JobConfig(model=graph, inputs=[str(images["root"])], out=out, batch_size=3,
                                  overlap=overlap, save=("npy",)))
        assert (stats.ok, stats.failed) == (5, 3)
        lines[overlap] = (out / "results.jsonl").read_text()
        for r in _lines(out / "results.jsonl"):
            assert np.load(out / r["files"]["npy"]).shape == (4, 4)
    assert lines[True].replace("out-True", "") == lines[False].replace("out-False", "")


def test_usage_errors(graph: Path, images: dict[str, Path], tmp_path: Path, model: torch.nn.Module,
                      capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert main(["--model", str(graph), str(tmp_path / "nope"), "--out", out]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert main(["--model", str(graph), str(images["a"]), "--out", out, "--save", "gif"]) == EXIT_USAGE
    assert "allowed: heatmap, overlay, npy" in capsys.readouterr().err
    assert main(["--model", str(graph), str(images["a"]), "--out", out,
                 "--method", "hirescam"]) == EXIT_USAGE
    assert "available: gradcam, layercam" in capsys.readouterr().err
    assert main(["--model", str(graph), str(images["a"]), "--out", out, "--target", "yak"]) == EXIT_USAGE
    assert main(["--model", str(graph), str(images["a"]), "--out", out, "--batch-size", "0"]) == EXIT_USAGE
    plain = export_plain_onnx(model, tmp_path / "plain.onnx", SIZE)
    assert main(["--model", str(plain), str(images["a"]), "--out", out]) == EXIT_USAGE
    assert "not a camserve CAM graph" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(graph), "--out", out])  # no INPUT: argparse
    assert exc.value.code == 2


def test_decoding_window_is_bounded(graph: Path, tmp_path: Path) -> None:
    meta = GraphMeta.from_file(graph)
    for i in range(40):
        _img(tmp_path / "many" / f"{i:03d}.png", (16, 16), i)
    items = batch_inputs.iter_inputs([str(tmp_path / "many")])
    pulled = 0

    def counting():
        nonlocal pulled
        for it in items:
            pulled += 1
            yield it

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        seen = 0
        for outcome in batch_inputs._decoded_stream(counting(), pool, 6, meta, False, 10**6):
            seen += 1
            assert pulled - seen <= 6  # never more than the window ahead of the consumer
            assert outcome.image is None  # images are dropped unless overlays are asked for
    assert seen == 40


def test_metadata_is_enough(graph: Path) -> None:
    meta = GraphMeta.from_file(graph)
    assert meta.labels == tuple(LABELS) and meta.layer == LAYER
    assert meta.input_size == SIZE and meta.mean == MEAN and meta.std == STD
    assert meta.methods == ("gradcam", "layercam")
    assert meta.output_for("layercam") == "cam_layercam" and meta.output_for("GradCAM") == "cam"


def test_export_then_job_on_committed_samples_matches_the_handler(tmp_path: Path) -> None:
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
    rows = {Path(r["path"]).name: r for r in _lines(out / "results.jsonl")}
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


# -- hardening (issue 9, items 8-13) ------------------------------------------------------------------

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
    _img(root / long_name, (30, 40), 1)
    raw_name = b"caf\xe9-\xff.png"  # Latin-1, not UTF-8
    _img(Path(os.fsdecode(os.fsencode(root) + b"/" + raw_name)), (30, 40), 2)
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
    _img(root / "good.png", (30, 40), 1)
    os.mkfifo(root / "fifo.jpg")
    big = root / "big.png"
    _img(big, (300, 300), 2)
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
    with pytest.raises(batch_inputs._Refused):
        batch_inputs.read_file(big, max_size=10)


def test_bounded_read_stops_at_the_limit(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"a" * 1000)
    assert batch_inputs.read_file(f, 1000) == b"a" * 1000
    with pytest.raises(batch_inputs._Refused, match="1000 bytes"):
        batch_inputs.read_file(f, 999)


def test_list_files_binary_and_nul_entries(tmp_path: Path) -> None:
    good = _img(tmp_path / "a.png", (20, 20), 1)
    text = tmp_path / "list.txt"
    text.write_bytes(b"# a list\n" + bytes(good) + b"\nbad\x00name.png\n" + b"b.png\n" * 5)
    items = list(batch_inputs.iter_inputs([str(text)]))
    assert [it.error is None for it in items] == [True, False] + [True] * 5
    assert items[1].error[0] == "InvalidListEntry" and "NUL" in items[1].error[1]
    binary = tmp_path / "bin.txt"
    binary.write_bytes(good.read_bytes())
    [item] = batch_inputs.iter_inputs([str(binary)])
    assert item.error[0] == "InvalidList"
    assert not batch_inputs._is_binary("é.jpg\nà.png\n".encode() * 50)
    assert not batch_inputs._is_binary(b"caf\xe9.jpg\n" * 50)  # Latin-1 names are still text
    assert batch_inputs._is_binary(np.random.default_rng(0).bytes(8192))


def test_output_folder_inside_input_and_symlinks(graph: Path, tmp_path: Path) -> None:
    """The output folder inside the input folder is never listed; an existing symlink in it is
    replaced, its target untouched; results.jsonl as a symlink is not followed."""
    root = tmp_path / "photos"
    _img(root / "a.png", (30, 40), 1)
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
    a = _img(tmp_path / "A" / "photos" / "a.png", (30, 40), 1)
    b = _img(tmp_path / "B" / "photos" / "a.png", (40, 30), 2)
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


def _meta(**spec: object) -> GraphMeta:
    base = dict(arch="torchvision.models.resnet18", input_size=SIZE, mean=MEAN, std=STD,
                target_layer=LAYER)
    base.update(spec)
    return GraphMeta(ModelSpec(**base), labels=tuple(LABELS), methods=("gradcam", "layercam"))


class _Arg:
    def __init__(self, name: str, shape: list) -> None:
        self.name, self.shape = name, shape


def test_metadata_checked_against_bounds_and_session(graph: Path) -> None:
    from camserve.onnx.batch import UsageError, check_meta, check_session

    check_meta(_meta())
    for bad, key in ((dict(std=(0.2, float("nan"), 0.2)), "std"), (dict(std=(0.2, 0.0, 0.2)), "std"),
                     (dict(mean=(float("inf"), 0, 0)), "mean")):
        with pytest.raises(UsageError, match=f"'{key}'"):
            check_meta(_meta(**bad))
    ins = [_Arg("input", ["batch", 3, 64, 64]), _Arg("target", [1])]
    outs = [_Arg("logits", ["batch", 5]), _Arg("cam", ["batch", 4, 4]),
            _Arg("cam_layercam", ["batch", 4, 4])]
    check_session(_meta(), ins, outs, target=-1)
    with pytest.raises(UsageError, match="input_size"):
        check_session(_meta(input_size=(96, 96)), ins, outs, -1)
    with pytest.raises(UsageError, match="5 labels for 6 logits"):
        check_session(_meta(), ins, [_Arg("logits", ["batch", 6]), *outs[1:]], -1)
    with pytest.raises(UsageError, match="no output for method layercam"):
        check_session(_meta(), ins, outs[:2], -1)
    with pytest.raises(UsageError, match="'target'"):
        check_session(_meta(), ins[:1], outs, 2)


def test_edited_graph_metadata_is_refused_before_any_image(graph: Path, images: dict[str, Path],
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    proto = onnx.load(str(graph))
    props = {p.key: p.value for p in proto.metadata_props}

    def edited(name: str, **changes: str) -> Path:
        del proto.metadata_props[:]
        for k, v in {**props, **changes}.items():
            proto.metadata_props.add(key=k, value=v)
        path = tmp_path / name
        onnx.save(proto, str(path))
        return path

    few = edited("few.onnx", labels=json.dumps(LABELS[:3]), num_classes="3")
    out = tmp_path / "out"
    assert main(["--model", str(few), str(images["a"]), "--out", str(out)]) == EXIT_USAGE
    assert "3 labels for 5 logits" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()  # refused before any output
    wrong = edited("size.onnx", input_size="[96, 96]")
    assert main(["--model", str(wrong), str(images["a"]), "--out", str(out)]) == EXIT_USAGE
    assert "input_size" in capsys.readouterr().err
    huge = edited("huge.onnx", max_pixels=str(10**12))
    plan = batch_cam.plan_job(JobConfig(model=huge, inputs=[str(images["a"])], out=out))
    assert plan.max_pixels == 40_000_000  # capped at camserve.images' default
    plan = batch_cam.plan_job(JobConfig(model=huge, inputs=[str(images["a"])], out=out,
                                        max_pixels=50_000_000))
    assert plan.max_pixels == 50_000_000  # unless the command line raises it


def test_non_finite_scores_are_error_records(tmp_path: Path) -> None:
    meta = _meta()
    items = [batch_inputs.Item("a.png", "a.png"), batch_inputs.Item("b.png", "b.png")]
    logits = np.array([[1, 2, 3, 4, 5], [np.nan, 0, 0, 0, 0]], np.float32)
    cams = np.ones((2, 4, 4), np.float32)
    good, bad = batch_outputs.result_lines(items, [(10, 10)] * 2, logits, cams, -1, 3, meta, "gradcam")
    assert isinstance(good, dict) and isinstance(bad, batch_inputs.Failed)
    assert bad.type == "InvalidOutput"
    outputs = batch_outputs.Outputs(tmp_path, resume=False)
    assert outputs.result({**good, "score": float("nan")}) is False  # never a bare NaN
    outputs.close()
    [err] = _json_lines(tmp_path / "errors.jsonl")
    assert err["type"] == "InvalidOutput" and (tmp_path / "results.jsonl").read_bytes() == b""


def test_window_is_bounded_in_bytes(graph: Path, tmp_path: Path) -> None:
    """With a byte budget the stream stops reading ahead once the decoded data reaches it."""
    meta = GraphMeta.from_file(graph)
    for i in range(30):
        _img(tmp_path / "many" / f"{i:03d}.png", (64, 64), i)
    per_image = 3 * 64 * 64 * 4  # one preprocessed tensor
    budget = batch_inputs.ByteBudget(4 * per_image)
    from concurrent.futures import ThreadPoolExecutor

    items = batch_inputs.iter_inputs([str(tmp_path / "many")])
    pulled = seen = 0

    def counting():
        nonlocal pulled
        for it in items:
            pulled += 1
            yield it

    with ThreadPoolExecutor(4) as pool:
        for outcome in batch_inputs._decoded_stream(counting(), pool, 100, meta, False, 10**6,
                                                 budget=budget):
            seen += 1
            time.sleep(0.01)  # a slow consumer: the decodes run ahead until the budget stops them
            assert pulled - seen <= 4 + 1  # the count window (100) alone would allow 100
            budget.release(outcome.nbytes)  # written
    assert seen == 30 and budget.peak <= 5 * per_image and budget.held == 0


def test_overlay_drawn_from_a_bounded_copy(graph: Path, tmp_path: Path) -> None:
    big = _img(tmp_path / "wide.png", (300, 2600), 1)
    out = tmp_path / "out"
    assert main(["--model", str(graph), str(big), "--out", str(out), "--save",
                 "heatmap,overlay"]) == EXIT_OK
    [r] = _json_lines(out / "results.jsonl")
    assert Image.open(out / r["files"]["heatmap"]).size == (2600, 300)  # the original size
    assert Image.open(out / r["files"]["overlay"]).size == (2048, 236)  # long side 2048


ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.timeout(300)
def test_ctrl_c_stops_within_2s_then_resume(graph: Path, tmp_path: Path) -> None:
    """SIGINT to a real job mid-run: exit 130 within 2 s, whole lines only; --resume finishes."""
    n = 400
    for i in range(n):
        _img(tmp_path / "photos" / f"{i:03d}.png", (120, 160), i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "export.batch_cam", "--model", str(graph),
           str(tmp_path / "photos"), "--out", str(out), "--batch-size", "2",
           "--save", "heatmap,overlay"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
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
    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=_env(), capture_output=True,
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
    good = [_img(src / "a.png", (40, 50), 1), _img(src / "sub" / "b.jpg", (60, 30), 2)]
    good.append(_img(src / ("L" * 245 + ".png"), (30, 30), 3))
    good.append(_img(Path(os.fsdecode(os.fsencode(src) + b"/\xff\xfe-latin\xe9.png")), (30, 30), 4))
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


# -- --metrics: the faithfulness audit through the graph ----------------------------------------

def test_metrics_flag_adds_per_image_metrics_and_their_means(graph: Path, images: dict[str, Path],
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    keys = ["deletion", "insertion", "road_morf", "avg_drop"]
    code = main(["--model", str(graph), str(images["root"]), "--out", str(out), "--batch-size", "2",
                 "--save", "none", "--metrics", ",".join(keys), "--metrics-steps", "5"])
    assert code == EXIT_PARTIAL  # the three broken files; the five images get their metrics
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    results = _lines(out / "results.jsonl")
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


def test_metrics_usage_errors_and_default_off(graph: Path, images: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", str(graph), str(images["a"]), "--out", str(tmp_path / "o"), "--save", "none"]
    assert main(base + ["--metrics", "pointing_game"]) == EXIT_USAGE
    assert "invalid value for --metrics: 'pointing_game' (allowed: deletion" in capsys.readouterr().err
    assert main(base + ["--metrics", "deletion", "--metrics-steps", "0"]) == EXIT_USAGE
    assert "--metrics-steps" in capsys.readouterr().err
    # with --ray the same checks, before any cluster is reached (no refusal of --metrics itself)
    assert main(base + ["--metrics", "deletion", "--metrics-steps", "0",
                        "--ray", "local"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--metrics-steps" in err and "Ray" not in err
    from camserve.onnx.batch import UsageError

    with pytest.raises(UsageError, match="--metrics-baseline"):
        run_job(JobConfig(model=graph, inputs=[str(images["a"])], out=tmp_path / "o",
                          metrics=("deletion",), metrics_baseline="zero"))
    # without --metrics: no "metrics" in the lines, nothing on the summary line
    assert main(base) == EXIT_OK
    assert "; metrics (" not in capsys.readouterr().out
    assert all("metrics" not in r for r in _lines(tmp_path / "o" / "results.jsonl"))


def test_metrics_help_states_the_cost(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--metrics KEYS" in text and "deletion 50, insertion 50, road_morf 9, road_lerf 9" in text
    assert "deletion,insertion,road_morf,avg_drop = 111 runs per image" in text
