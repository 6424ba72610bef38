"""Tests of tools/shapes.py (generator, samples, the committed default model, evaluation, training)
and of the model folder models/shapes."""
from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.methods import available_methods
from camserve.models import ConfigError
from tools import shapes
from tools.shapes import CLASSES, IMAGE_SIZE, make_dataset, render_sample, rng_for

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "shapes"
THRESHOLDS = {"accuracy": 0.98, "pointing_game": 0.97, "pointing_game_two_objects": 0.95}


# -- generator ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_objects", [1, 2])
def test_same_seed_same_images_other_seed_other_images(n_objects: int) -> None:
    a = make_dataset(seed=11, n=6, n_objects=n_objects)
    b = make_dataset(seed=11, n=6, n_objects=n_objects)
    c = make_dataset(seed=12, n=6, n_objects=n_objects)
    assert a.images.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert (a.images != c.images).mean() > 0.5


def test_streams_are_independent() -> None:
    train = make_dataset(seed=3, n=4, stream="train")
    held_out = make_dataset(seed=3, n=4, stream="evaluate")
    assert (train.images != held_out.images).mean() > 0.5


def test_single_object_classes_are_balanced() -> None:
    data = make_dataset(seed=5, n=24)
    assert np.bincount(data.labels[:, 0], minlength=len(CLASSES)).tolist() == [3] * len(CLASSES)


def _drawn_box(image: np.ndarray, region: tuple[int, int, int, int], bg: np.ndarray,
               fg: np.ndarray) -> tuple[int, int, int, int]:
    """Box of the pixels in ``region`` closer to the shape colour than to the background."""
    x0, y0, x1, y1 = region
    crop = image[y0:y1, x0:x1].astype(float)
    closer = np.linalg.norm(crop - fg, axis=-1) < np.linalg.norm(crop - bg, axis=-1)
    ys, xs = np.nonzero(closer)
    return int(xs.min()) + x0, int(ys.min()) + y0, int(xs.max()) + 1 + x0, int(ys.max()) + 1 + y0


@pytest.mark.parametrize("n_objects", [1, 2])
def test_boxes_are_tight_around_the_drawn_pixels(n_objects: int) -> None:
    rng = rng_for(21)
    for i in range(40):
        labels = [i % 8] if n_objects == 1 else [i % 8, (i + 1 + i // 8) % 8]
        s = render_sample(rng, labels, clutter=False)  # flat background, no noise
        bg = s.image[0, 0].astype(float)
        assert len(s.boxes) == n_objects
        for k, box in enumerate(s.boxes):
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE, box
            assert x1 - x0 >= 12 and y1 - y0 >= 12, (CLASSES[labels[k]], box)
            inner = np.argwhere(s.masks[k] == 255)
            fg = s.image[inner[0][0], inner[0][1]].astype(float)
            region = (max(x0 - 2, 0), max(y0 - 2, 0), min(x1 + 2, IMAGE_SIZE), min(y1 + 2, IMAGE_SIZE))
            drawn = _drawn_box(s.image, region, bg, fg)
            assert np.abs(np.subtract(drawn, box)).max() <= 1, (CLASSES[labels[k]], box, drawn)


def test_cluttered_boxes_lie_inside_the_image_and_fit_the_masks() -> None:
    rng = rng_for(8)
    for i in range(30):
        s = render_sample(rng, [i % 8])
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
        assert s.box == shapes.mask_box(s.masks[0])
        # the shape stands out: its colour differs from the background just around its box
        inside = s.image[s.masks[0] == 255].astype(float).mean(axis=0)
        around = np.zeros(s.image.shape[:2], dtype=bool)
        around[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True
        around[y0:y1, x0:x1] = False
        outside = s.image[around].astype(float).mean(axis=0)
        assert np.linalg.norm(inside - outside) > 30, (CLASSES[i % 8], inside, outside)


def test_two_object_images_have_two_classes_and_disjoint_boxes() -> None:
    data = make_dataset(seed=9, n=60, n_objects=2)
    assert data.labels.shape == (60, 2) and data.boxes.shape == (60, 2, 4)
    assert (data.labels[:, 0] != data.labels[:, 1]).all()
    assert len(np.unique(data.labels)) == len(CLASSES)
    a, b = data.boxes[:, 0], data.boxes[:, 1]
    apart = (a[:, 2] <= b[:, 0]) | (b[:, 2] <= a[:, 0]) | (a[:, 3] <= b[:, 1]) | (b[:, 3] <= a[:, 1])
    assert apart.all()


def test_render_sample_rejects_bad_labels() -> None:
    rng = rng_for(0)
    with pytest.raises(ValueError, match="labels"):
        render_sample(rng, [1, 1])
    with pytest.raises(ValueError, match="labels"):
        render_sample(rng, [len(CLASSES)])
    with pytest.raises(ValueError, match="stream"):
        rng_for(0, "test")


# -- samples command ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """``samples --seed 5 --n 9`` written by the CLI entry point: (folder, boxes.json)."""
    out = tmp_path_factory.mktemp("samples")
    assert shapes.main(["samples", "--seed", "5", "--n", "9", "--out", str(out)]) == 0
    return out, json.loads((out / "boxes.json").read_text())


def test_samples_command_writes_one_png_per_entry(samples) -> None:
    out, index = samples
    assert len(index) == 9
    assert sorted(p.name for p in out.glob("*.png")) == sorted(index)
    assert {v["label"] for v in index.values()} == set(CLASSES)


def test_samples_are_named_after_their_label_and_are_rgb(samples) -> None:
    out, index = samples
    for name, entry in index.items():
        assert set(entry) == {"label", "box"}
        assert name.startswith(entry["label"] + "_") and name.endswith(".png")
        with Image.open(out / name) as img:
            assert img.mode == "RGB" and img.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_sample_boxes_are_int_boxes_inside_the_image(samples) -> None:
    _, index = samples
    for entry in index.values():
        x0, y0, x1, y1 = entry["box"]
        assert all(isinstance(v, int) for v in entry["box"])
        assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE


def test_samples_are_deterministic(samples, tmp_path: Path) -> None:
    out, index = samples
    shapes.write_samples(tmp_path, seed=5, n=9)
    assert (tmp_path / "boxes.json").read_text() == (out / "boxes.json").read_text()
    first = sorted(index)[0]
    assert (tmp_path / first).read_bytes() == (out / first).read_bytes()


def test_cli_runs_as_a_module_from_the_checkout(tmp_path: Path) -> None:
    """``python -m tools.shapes`` (what make samples/evaluate/train run) from the repository root."""
    proc = subprocess.run([sys.executable, "-m", "tools.shapes", "samples", "--seed", "1", "--n", "1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"wrote 1 images and boxes.json to {tmp_path}"


def test_the_installed_package_does_not_import_the_tooling() -> None:
    offenders = []
    for path in sorted((ROOT / "camserve").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "tools"]
    assert offenders == []
    assert not (ROOT / "camserve" / "shapes.py").exists()


# -- the committed model folder -------------------------------------------------------------------

def test_model_file_is_standalone_and_has_the_target_layer() -> None:
    tree = ast.parse((MODEL_DIR / "model.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"torch", "__future__"}, imported
    spec = importlib.util.spec_from_file_location("standalone_shapes_model", MODEL_DIR / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.ShapesNet(num_classes=8).eval()
    with torch.no_grad():
        feats = net.features(torch.zeros(1, 3, 96, 96))
        assert net(torch.zeros(2, 3, 96, 96)).shape == (2, 8)
    assert feats.shape[-2:] == (12, 12)


def _config() -> dict:
    import yaml

    return yaml.safe_load((MODEL_DIR / "model-config.yaml").read_text())


def test_model_config_torchserve_settings() -> None:
    cfg = _config()
    assert cfg["minWorkers"] == 1 and cfg["maxWorkers"] == 1 and cfg["batchSize"] == 8
    assert cfg["maxBatchDelay"] == 50 and cfg["responseTimeout"] == 120


def test_model_config_handler_block() -> None:
    h = _config()["handler"]
    assert h["arch"] == "model:ShapesNet" and h["num_classes"] == 8 and h["method"] == "gradcam"
    assert h["input_size"] == [96, 96] and h["outputs"] == ["heatmap", "bbox"] and h["topk"] == 3


def test_labels_file_and_weights_size() -> None:
    labels = json.loads((MODEL_DIR / "index_to_name.json").read_text())
    assert labels == {str(i): c for i, c in enumerate(CLASSES)}
    assert (MODEL_DIR / "weights.pt").stat().st_size < 2_000_000


def test_committed_weights_load_with_weights_only() -> None:
    state = torch.load(MODEL_DIR / "weights.pt", map_location="cpu", weights_only=True)
    loaded = shapes.load_model(MODEL_DIR)
    assert set(state) == set(loaded.model.state_dict())
    assert loaded.labels == list(CLASSES)
    assert loaded.layer == "features" and not loaded.model.training


def test_load_model_goes_through_the_one_loader(shapes_folder) -> None:
    """Labels come from index_to_name.json when the config names none, as for the server."""
    loaded = shapes.load_model(shapes_folder(labels=None))
    assert loaded.spec.labels is None and loaded.labels == list(CLASSES)


def test_load_model_refuses_other_classes(model_folder) -> None:
    with pytest.raises(ConfigError, match="shapes dataset has 8 classes"):
        shapes.load_model(model_folder())


def test_fast_preprocessing_matches_the_server_path() -> None:
    spec = shapes.read_spec(MODEL_DIR)
    images = make_dataset(seed=2, n=3).images
    torch.testing.assert_close(shapes.to_batch(images, spec), shapes.preprocess_images(images, spec),
                               rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def committed_samples():
    """The committed samples explained by the committed model: (boxes.json, file names, result)."""
    from camserve import CamEngine
    from camserve.images import load_image_file, preprocess

    index = json.loads((MODEL_DIR / "samples" / "boxes.json").read_text())
    loaded = shapes.load_model(MODEL_DIR)
    spec = loaded.spec
    files = sorted(index)
    x = torch.stack([preprocess(load_image_file(MODEL_DIR / "samples" / f), spec.input_size,
                                spec.mean, spec.std) for f in files])
    truth = torch.tensor([loaded.labels.index(index[f]["label"]) for f in files])
    return index, files, CamEngine(loaded.model, loaded.layer)(x, targets=truth)


def test_committed_samples_cover_every_class(committed_samples) -> None:
    index, _, _ = committed_samples
    assert sorted(v["label"] for v in index.values()) == sorted(CLASSES)


def test_committed_samples_are_classified(committed_samples) -> None:
    index, files, res = committed_samples
    assert [CLASSES[i] for i in res.logits.argmax(1).tolist()] == [index[f]["label"] for f in files]


def test_committed_samples_are_located(committed_samples) -> None:
    index, files, res = committed_samples
    boxes = np.array([index[f]["box"] for f in files])
    assert shapes.pointing_hits(res.heatmaps((96, 96)), boxes, shapes.POINTING_TOLERANCE).all()


# -- evaluation -----------------------------------------------------------------------------------

def test_pointing_hits_counts_the_peak_with_tolerance() -> None:
    maps = torch.zeros(3, 96, 96)
    maps[0, 50, 40] = 1.0  # inside
    maps[1, 50, 62] = 1.0  # 3 px right of the box: inside with tolerance 3
    maps[2, 50, 63] = 1.0  # 4 px right: outside
    boxes = np.array([[30, 30, 60, 60]] * 3)
    assert shapes.pointing_hits(maps, boxes, 3).tolist() == [True, True, False]
    assert shapes.pointing_hits(maps, boxes, 0).tolist() == [True, False, False]


@pytest.mark.slow
def test_evaluate_cli_meets_the_thresholds(capsys) -> None:
    assert shapes.main(["evaluate", "--model", str(MODEL_DIR), "--seed", "2026", "--n", "200",
                        "--metrics-n", "4", "--road-n", "1", "--steps", "10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads(out[-1])
    assert set(metrics) == set(THRESHOLDS) | {"metrics", "method_cost"}
    assert set(metrics["method_cost"]) == set(available_methods())
    assert all(c["forwards"] >= 1 and c["ms"] > 0 for c in metrics["method_cost"].values())
    for key, low in THRESHOLDS.items():
        assert metrics[key] >= low, (key, metrics)
    rows = metrics["metrics"]
    assert list(rows) == available_methods() + ["random", "center"]
    for row, values in rows.items():
        assert list(values) == list(shapes.COMPARISON_KEYS), row
        assert all(v is None if (row in ("random", "center") and k == "randomization_rank_corr")
                   else isinstance(v, float) for k, v in values.items()), (row, values)
    # the table precedes the JSON line: a header with the directions, then one line per row
    head = next(i for i, line in enumerate(out) if line.startswith("method "))
    assert "deletion ↓" in out[head] and "insertion ↑" in out[head]
    assert "randomization_rank_corr ↓" in out[head] and "road_lerf ↑" in out[head]
    assert [line.split()[0] for line in out[head + 1:-1]] == list(rows)
    assert "first 4 single-object images, ROAD on the first 1" in out[head - 1]


def test_evaluate_fails_for_an_untrained_model(shapes_folder) -> None:
    rep = shapes.evaluate(shapes_folder(seed=0), seed=1, n=48, n_pairs=24)
    assert rep.accuracy < 0.5 and rep.pointing_game_two_objects < 0.95
    assert rep.comparison is None and set(rep.to_json()) == set(THRESHOLDS)


# -- faithfulness comparison ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def comparison() -> "shapes.Comparison":
    """The committed model compared on 16 evaluation images, 10 steps, no ROAD (seconds per
    image: the slow CLI test covers it)."""
    loaded = shapes.load_model(MODEL_DIR)
    data = make_dataset(seed=77, n=16, stream="evaluate")
    return shapes.compare_methods(loaded, data, n=16, road_n=0, steps=10, seed=77)


@pytest.mark.slow
def test_every_cam_method_beats_the_random_map_on_deletion_and_insertion(comparison) -> None:
    v = comparison.values
    for method in available_methods():
        assert v[method]["deletion"] < v["random"]["deletion"], (method, v[method], v["random"])
        assert v[method]["insertion"] > v["random"]["insertion"], (method, v[method], v["random"])


@pytest.mark.slow
def test_comparison_rows_keys_and_undefined_randomization(comparison) -> None:
    v = comparison.values
    assert list(v) == available_methods() + ["random", "center"]
    no_road = [k for k in shapes.COMPARISON_KEYS if not k.startswith("road")]
    assert all(list(row) == no_road for row in v.values())
    assert v["random"]["randomization_rank_corr"] is None and v["center"]["randomization_rank_corr"] is None
    for method in available_methods():
        assert -1.0 <= v[method]["randomization_rank_corr"] <= 1.0
        assert 0.0 <= v[method]["energy_in_box"] <= 1.0 and 0.0 <= v[method]["avg_drop"] <= 100.0
    # Grad-CAM's maps depend on the classifier: re-initialising it decorrelates them
    assert v["gradcam"]["randomization_rank_corr"] < 0.5
    # the shape is where the evidence is: every method puts more mass in the box than the baselines
    assert min(v[m]["energy_in_box"] for m in available_methods()) > max(
        v["random"]["energy_in_box"], v["center"]["energy_in_box"])
    assert comparison.n == 16 and comparison.road_n == 0 and comparison.steps == 10
    assert comparison.cost["deletion"] == 10 and "road_morf" not in comparison.cost
    # what each map costs: the declared forwards (the shared one included) and the measured time
    mc = comparison.method_cost
    assert list(mc) == available_methods() and all(c["ms"] > 0 for c in mc.values())
    assert mc["gradcam"]["forwards"] < 2 <= mc["scorecam"]["forwards"] and mc["eigencam"]["forwards"] == 1
    assert json.loads(json.dumps(comparison.rounded())) == comparison.rounded()


def test_comparison_table_marks_directions_best_rows_and_undefined_cells() -> None:
    c = shapes.Comparison(n=1, road_n=0, steps=5, baseline="mean", cost={}, seconds=0.0, values={
        "gradcam": {"deletion": 0.2, "insertion": 0.9, "avg_drop": 12.345, "randomization_rank_corr": 0.1},
        "random": {"deletion": 0.5, "insertion": 0.3, "avg_drop": 50.0, "randomization_rank_corr": None}})
    lines = c.table().splitlines()
    assert lines[0].split() == ["method", "deletion", "↓", "insertion", "↑", "avg_drop", "↓",
                                "randomization_rank_corr", "↓"]
    assert lines[1].split() == ["gradcam", "0.2000*", "0.9000*", "12.35*", "0.1000*"]
    assert lines[2].split() == ["random", "0.5000", "0.3000", "50.00", "-"]
    costed = shapes.Comparison(n=1, road_n=0, steps=5, baseline="mean", cost={}, seconds=0.0,
                               values=c.values, method_cost={"gradcam": {"forwards": 1.4, "ms": 2.25}})
    lines = costed.table().splitlines()
    assert lines[0].split()[-2:] == ["forwards/img", "ms/img"]
    assert lines[1].split()[-2:] == ["1.4", "2.2"] and lines[2].split()[-2:] == ["-", "-"]


@pytest.mark.slow
def test_comparison_perturbation_baseline_is_used() -> None:
    loaded = shapes.load_model(MODEL_DIR)
    data = make_dataset(seed=5, n=4, stream="evaluate")
    mean = shapes.compare_methods(loaded, data, n=4, road_n=0, steps=4, methods=["gradcam"])
    blur = shapes.compare_methods(loaded, data, n=4, road_n=0, steps=4, methods=["gradcam"],
                                  baseline="blur")
    assert mean.values["gradcam"]["deletion"] != blur.values["gradcam"]["deletion"]
    assert mean.values["gradcam"]["energy_in_box"] == blur.values["gradcam"]["energy_in_box"]


@pytest.mark.parametrize("kwargs, match", [
    ({"metrics_n": 8, "road_n": 9}, "road_n"),
    ({"metrics_n": 100}, "metrics_n"),
    ({"metrics_n": -1}, "metrics_n"),
    ({"metrics_n": 4, "baseline": "zero"}, "baseline"),
])
def test_evaluate_refuses_bad_comparison_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shapes.evaluate(MODEL_DIR, seed=1, n=48, **kwargs)


def test_evaluate_cli_help_names_the_comparison_options(capsys) -> None:
    with pytest.raises(SystemExit):
        shapes.main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for option in ("--metrics-n", "--road-n", "--steps", "--baseline"):
        assert option in text


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, "shapes.TrainReport"]:
    """One epoch on 24 images into a new folder (it gets the default config and model.py)."""
    out = tmp_path_factory.mktemp("train") / "m"
    return out, shapes.train(out, seed=1, epochs=1, n=24, batch_size=16)


@pytest.mark.train
def test_train_reports_its_steps_and_files(trained) -> None:
    out, rep = trained
    assert rep.epochs == 1 and rep.steps >= 1
    assert {p.name for p in rep.files} == {"weights.pt", "index_to_name.json"}
    assert {p.name for p in out.iterdir()} >= {
        "weights.pt", "index_to_name.json", "model.py", "model-config.yaml"}


@pytest.mark.train
def test_train_writes_a_folder_the_server_loads(trained) -> None:
    out, _ = trained
    loaded = shapes.load_model(out)
    assert loaded.labels == list(CLASSES) and not loaded.model.training


def test_train_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        shapes.train(tmp_path / "m", epochs=0)
    with pytest.raises(ValueError, match="pair_fraction"):
        shapes.train(tmp_path / "m", pair_fraction=1.5)
