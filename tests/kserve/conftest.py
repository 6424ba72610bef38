"""Shared by the KServe predictor's tests: the shapes model folder, its samples, and what the
TorchServe handler answers (the serving core in-process, given the rows TorchServe would hand the
handler), which the predictor's answers are compared with."""
from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import pytest

from camserve.serving import CamService, RowResult

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "shapes"
SAMPLES = sorted((MODEL_DIR / "samples").glob("*.png"))
NAME = "shapes"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def handler_answers(service: CamService, rows: list[Any],
                    explain_route: bool = False) -> list[RowResult]:
    """What the TorchServe handler answers for these rows (one batch)."""
    return service.handle_batch(rows, [explain_route] * len(rows)).results


@pytest.fixture(scope="module")
def service() -> CamService:
    return CamService.from_model_dir(MODEL_DIR, device="cpu")


@pytest.fixture(scope="session")
def onnx_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shapes folder with its exported CAM graph (for ``--backend onnxruntime``)."""
    from camserve.backends import GRAPH_FILE
    from scripts.archive import export_graph

    folder = tmp_path_factory.mktemp("kserve_onnx") / NAME
    shutil.copytree(MODEL_DIR, folder, ignore=shutil.ignore_patterns("samples", GRAPH_FILE))
    export_graph(folder, verify=False)
    return folder
