"""End to end, bring your own model: a timm checkpoint and a Hugging Face ``save_pretrained`` folder
each go ``camserve-scaffold`` -> ``python -m scripts.archive`` -> a real TorchServe
(token auth, free loopback ports) -> ``/explanations/NAME`` with heatmaps at the image size; and
``python -m export.onnx_export DIR --out F`` -> ``python -m export.batch_cam`` (what ``make export``
and ``make batch`` run) on a few images, with the model's own preprocessing and labels in the
graph's metadata.

Random weights (BatchNorm recalibrated), small input sizes. Skipped without Java (TorchServe's
frontend) or without the timm / transformers extras.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from .conftest import run_command as run


TIMM_LABELS = ["apple", "banana", "cherry", "date", "elder"]
HF_LABELS = {0: "cat", 1: "dog", 2: "fox"}
IMAGE_SIZES = [(50, 40), (33, 61), (64, 64)]  # (W, H)

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]


def timm_checkpoint(tmp: Path) -> tuple[Path, Path]:
    """A timm ResNet-18 with 5 classes, random weights, BN calibrated at 96x96: weights + labels."""
    timm = pytest.importorskip("timm")
    from camserve.models import recalibrate_batchnorm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(TIMM_LABELS)).eval()
    recalibrate_batchnorm(model, (96, 96))
    weights = tmp / "resnet18_ft.pth"
    torch.save({"state_dict": model.state_dict()}, weights)
    labels = tmp / "labels.txt"
    labels.write_text("\n".join(TIMM_LABELS) + "\n")
    return weights, labels


def hf_folder(tmp: Path) -> Path:
    """A tiny ViTForImageClassification (32x32, patch 8) saved with save_pretrained, with its
    image processor (mean/std 0.5, size 32) and id2label."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64,
                                 num_labels=len(HF_LABELS), id2label=HF_LABELS,
                                 label2id={v: k for k, v in HF_LABELS.items()})
    model = transformers.ViTForImageClassification(cfg).eval()
    folder = tmp / "vit_tiny_saved"
    model.save_pretrained(folder, safe_serialization=True)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        arr[h // 4: h // 2, w // 4: w // 2] = 255
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Scaffolded model folders: ``timmnet`` (timm:resnet18 .pth + labels.txt) and ``hfvit``."""
    tmp = tmp_path_factory.mktemp("byom")
    weights, labels = timm_checkpoint(tmp)
    saved = hf_folder(tmp)
    out = {"timmnet": tmp / "models" / "timmnet", "hfvit": tmp / "models" / "hfvit"}
    report = run("camserve-scaffold", str(out["timmnet"]), "--arch", "timm:resnet18",
                 "--weights", str(weights), "--labels", str(labels), "--input-size", "96")
    assert "layer:  layer4" in report and "grid:   3x3" in report and "apple" in report
    report = run("camserve-scaffold", str(out["hfvit"]), "--arch", f"hf:{saved}")
    assert "layernorm_before" in report and "grid:   4x4" in report and "cat, dog, fox" in report
    return out


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory, start_torchserve) -> Iterator[object]:
    from camserve.testing.torchserve import LocalTorchServe

    home = tmp_path_factory.mktemp("torchserve")
    for name, folder in folders.items():
        run("-m", "scripts.archive", str(folder), "--name", name, "--out", str(home / "store"))
        assert (home / "store" / f"{name}.mar").is_file()
    with start_torchserve(LocalTorchServe(home, list(folders), ready_timeout=300)) as ts:
        yield ts


@pytest.mark.parametrize("name,labels", [("timmnet", TIMM_LABELS), ("hfvit", list(HF_LABELS.values()))])
def test_explanations_from_a_real_torchserve(server, tmp_path, name: str, labels: list[str]) -> None:
    for path, (w, h) in zip(images(tmp_path / "imgs"), IMAGE_SIZES):
        r = requests.post(f"{server.url}/explanations/{name}", data=path.read_bytes(),
                          headers={"Authorization": f"Bearer {server.token}",
                                   "Content-Type": "application/octet-stream"}, timeout=120)
        assert r.status_code == 200, r.text[:500]
        body = r.json()
        assert body["predictions"] and all(p["label"] in labels for p in body["predictions"])
        [e] = body["explanations"]
        hm = np.asarray(Image.open(io.BytesIO(base64.b64decode(e["heatmap"]))))
        assert hm.shape[:2] == (h, w) and hm.max() > hm.min()
        assert e["label"] in labels and len(e["bbox"]) == 4


@pytest.mark.parametrize("name", ["timmnet", "hfvit"])
def test_export_then_batch_job(folders, tmp_path, name: str) -> None:
    from camserve.models import load_model_dir
    from camserve.onnx.format import GraphMeta

    folder = folders[name]
    graph = tmp_path / f"{name}.cam.onnx"
    out = run("-m", "export.onnx_export", str(folder), "--out", str(graph))
    assert "verified against the PyTorch engine" in out
    meta = GraphMeta.from_file(graph)
    loaded = load_model_dir(folder)
    assert meta.labels == tuple(loaded.labels) and meta.layer == loaded.layer
    assert meta.mean == pytest.approx(loaded.spec.mean) and meta.input_size == loaded.spec.input_size
    assert meta.grid == loaded.grid and meta.spec.layout == loaded.layout
    if name == "hfvit":
        assert meta.labels == ("cat", "dog", "fox") and meta.mean == pytest.approx((0.5,) * 3)
        assert meta.input_size == (32, 32) and meta.grid == (4, 4) and meta.prefix_tokens == 1
    else:
        assert meta.labels == tuple(TIMM_LABELS) and meta.grid == (3, 3)
        assert meta.spec.interpolation == "bicubic" and meta.spec.crop == pytest.approx(loaded.spec.crop) == 0.95
    imgs = images(tmp_path / "imgs")
    run("-m", "export.batch_cam", "--model", str(graph), str(tmp_path / "imgs"), "--out",
        str(tmp_path / "out"), "--save", "heatmap")
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(imgs)
    for row in rows:
        assert row["topk"][0]["label"] in meta.labels
    heatmaps = sorted((tmp_path / "out").rglob("*.heatmap.png"))
    assert len(heatmaps) == len(imgs)
    for p in heatmaps:
        src = next(q for q in imgs if p.name.startswith(q.name))
        assert Image.open(p).size == Image.open(src).size
