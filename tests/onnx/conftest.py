"""Fixtures and helpers of the batch job's tests (test_batch, test_job, test_cli, test_inputs,
test_ray):

* ``model``, ``graph``: a random ResNet-18 over :data:`LABELS` at :data:`SIZE` (target
  :data:`LAYER`, top-k 3) and its CAM graph (gradcam, layercam), exported once per session;
* ``shapes_graph``: the default model's CAM graph, exported once per session by the export command
  line in a child process;
* ``images``: a folder ``photos`` of five good images (JPEG, PNG, RGBA, grey, BMP; two in
  subfolders) and three broken ones under ``photos/bad``;
* :func:`photo` (an image file: a bright block on dark noise) and :func:`job_env` (the environment
  of a job run in a child process).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from camserve.models import ModelSpec, from_module
from camserve.onnx.export import export_cam_onnx

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["ant", "bee", "cat", "dog", "eel"]
SIZE = (64, 64)
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.3, 0.2)
LAYER = "layer3"
#: a private Ray binds loopback only and sends no usage stats
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def photo(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB",
          fmt: str | None = None) -> Path:
    """An image of ``size`` (H, W) at ``path`` (parents created): a bright block at a seeded place
    on dark noise, converted to ``mode``, in ``fmt`` (default: from the suffix)."""
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


def job_env() -> dict[str, str]:
    """The environment of a job in a child process: this checkout first on ``PYTHONPATH``,
    :data:`RAY_ENV` set."""
    env = {**os.environ, **RAY_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="session")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=len(LABELS)).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="session")
def graph(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec(arch="torchvision.models.resnet18", input_size=SIZE, mean=MEAN, std=STD,
                     target_layer=LAYER, topk=3)
    src = from_module(model, spec, labels=LABELS)
    out = tmp_path_factory.mktemp("graph") / "r18.cam.onnx"
    export_cam_onnx(src, out, methods=("gradcam", "layercam"))
    return out


@pytest.fixture(scope="session")
def shapes_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "shapes.cam.onnx"
    subprocess.run([sys.executable, "-m", "export.onnx_export", str(ROOT / "models" / "shapes"),
                    "--out", str(out)], cwd=ROOT, env=job_env(), check=True, capture_output=True,
                   timeout=300)
    return out


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "photos"
    good = {
        "a": photo(root / "a.jpg", (48, 80), 1),
        "b": photo(root / "b.png", (90, 60), 2),
        "c": photo(root / "sub" / "c.png", (33, 47), 3, mode="RGBA"),
        "d": photo(root / "sub" / "deeper" / "d.jpeg", (70, 70), 4, mode="L"),
        "e": photo(root / "e.bmp", (20, 100), 5),
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
