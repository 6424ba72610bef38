"""The offline batch job: real onnxruntime sessions on a small exported CAM graph, real files."""
from __future__ import annotations

import io
import json
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
from camserve.onnx.batch import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, JobConfig, main, run_job
from camserve.onnx.batch import UsageError
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
    (camserve.records.resolve_target); -1 is each image's top-1 class."""
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
    items = batch_cam.iter_inputs([str(tmp_path / "many")])
    pulled = 0

    def counting():
        nonlocal pulled
        for it in items:
            pulled += 1
            yield it

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        seen = 0
        for outcome in batch_cam._decoded_stream(counting(), pool, 6, meta, False, 10**6):
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

    from export import onnx_export  # the thin entry point of the Makefile
    from tests.test_handler import load_handler_module, make_context, set_requests

    root = Path(__file__).resolve().parents[2]
    model_dir, samples = root / "models" / "shapes", root / "models" / "shapes" / "samples"
    onnx_path, out = tmp_path / "shapes.cam.onnx", tmp_path / "job"
    assert onnx_export.main([str(model_dir), "--out", str(onnx_path)]) == 0
    assert main(["--model", str(onnx_path), str(samples), "--out", str(out), "--batch-size", "3",
                 "--save", "heatmap,npy"]) == EXIT_OK
    rows = {Path(r["path"]).name: r for r in _lines(out / "results.jsonl")}
    boxes = json.loads((samples / "boxes.json").read_text())
    assert set(rows) == set(boxes) and not (out / "errors.jsonl").read_text().strip()

    handler = load_handler_module().GradCamHandler()
    ctx = make_context(model_dir)
    handler.initialize(ctx)
    names = sorted(boxes)
    set_requests(ctx, [{"explain": "True"}] * len(names))
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
    assert main(base + ["--metrics", "deletion", "--ray", "local"]) == EXIT_USAGE
    assert "--metrics does not run on Ray" in capsys.readouterr().err
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
