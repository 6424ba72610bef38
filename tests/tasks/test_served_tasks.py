"""The dense tasks where camserve serves: the KServe predictor (v1, v2 and gRPC-style bodies,
in-process, on each backend: the folder's exported graph for onnxruntime) and a real TorchServe
(multipart form files, JSON), each answering as the serving core does, a hostile row beside good
ones."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from PIL import Image

from camserve.serving import CamService
from camserve.testing.hostile import hostile_corpus
from camserve.testing.nets import TinyEmbedNet, TinySegNet, frozen, write_model_folder

MODEL_PY = "from camserve.testing.nets import TinyEmbedNet, TinySegNet\n"
HANDLERS = {
    "seg": {"arch": "model:TinySegNet", "arch_args": {"num_classes": 4}, "task": "segmentation",
            "background": 0, "num_classes": 4, "input_size": [32, 32], "target_layer": "features",
            "weights": "weights.pt"},
    "emb": {"arch": "model:TinyEmbedNet", "task": "embedding", "input_size": [32, 32],
            "target_layer": "features", "weights": "weights.pt"},
}


def _png(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    nets = {"seg": TinySegNet(4, seed=3), "emb": TinyEmbedNet(8, seed=3)}
    return {k: write_model_folder(root / k, frozen(nets[k]), HANDLERS[k], model_py=MODEL_PY,
                                  labels=["background", "a", "b", "c"] if k == "seg" else None)
            for k in HANDLERS}


def _rows(kind: str) -> list[dict[str, Any]]:
    """A good row, a row with a task option that fails, a good row with a task option."""
    if kind == "seg":
        return [{"data": _png(1)}, {"data": _png(2), "region": b64(_png(3, (39, 30), "L"))},
                {"data": _png(4), "region": [0, 0, 20, 15]}]
    return [{"data": _png(1), "reference_embedding": [1.0] * 8},
            {"data": _png(2), "reference": b64(hostile_corpus()["png_truncated_half"].data)},
            {"data": _png(4), "reference": b64(_png(5))}]


@pytest.fixture(scope="module")
def graphs(folders: dict[str, Path]) -> dict[str, Path]:
    """The folders with their exported CAM graphs (what ``--backend onnxruntime`` serves)."""
    from scripts.archive import export_graph

    for folder in folders.values():
        export_graph(folder, methods=("gradcam",), verify=False)
    return folders


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("kind", ["seg", "emb"])
def test_kserve_v1_and_v2_answer_as_the_core(kind: str, backend: str,
                                             graphs: dict[str, Path]) -> None:
    from camserve.kserve import import_kserve

    import_kserve()
    from kserve.model import InferenceVerb

    from camserve.kserve.model import CamModel
    from camserve.kserve.server import AnswerError, V2Body
    from camserve.testing.equality import compare_answers

    model = CamModel(kind, graphs[kind], device="cpu", max_batch_delay_ms=1.0, backend=backend)
    model.load()
    service = CamService.from_model_dir(graphs[kind], overrides={"backend": backend})
    rows = _rows(kind)
    want = [r.body for r in service.handle_batch(rows, [True] * len(rows)).results]
    assert [("code" in w) for w in want] == [False, True, False]
    v1, _ = asyncio.run(model({"instances": rows}, verb=InferenceVerb.EXPLAIN))
    assert v1 == {"predictions": want}
    if backend == "onnxruntime":  # and the torch backend's answers, within the bar
        torch_core = CamService.from_model_dir(graphs[kind], overrides={"backend": "torch"})
        compare_answers([r.body for r in torch_core.handle_batch(rows, [True] * 3).results],
                        v1["predictions"]).check()
    # v2: one image per request here, the task's options as request parameters
    for row, expected in zip(rows, want):
        params = {k: v for k, v in row.items() if k != "data"}
        body = {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                            "data": [b64(row["data"])]}], "parameters": {**params, "explain": True}}
        try:
            got, _ = asyncio.run(model(V2Body(json.dumps(body).encode()),
                                       verb=InferenceVerb.PREDICT))
        except AnswerError as exc:  # its only image failed: the v2 body with the request's status
            assert exc.status == expected["code"]
            assert json.loads(exc.body["outputs"][0]["data"][0]) == expected
            continue
        outputs = got.outputs if hasattr(got, "outputs") else got["outputs"]
        data = outputs[0].data if hasattr(outputs[0], "data") else outputs[0]["data"]
        assert json.loads(data[0]) == expected
    assert model.gate.held == 0


@pytest.fixture(scope="module")
def torchserve(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
               handler_file) -> Iterator[Any]:
    import yaml

    from camserve.client import ClientError
    from camserve.testing.torchserve import LocalTorchServe, archive

    home = tmp_path_factory.mktemp("ts-tasks")
    for kind, folder in folders.items():
        cfg = yaml.safe_load((folder / "model-config.yaml").read_text())
        cfg.update(batchSize=4, maxBatchDelay=200, minWorkers=1, maxWorkers=1)
        extra = [folder / "index_to_name.json"] if (folder / "index_to_name.json").is_file() else []
        archive(home / "store", kind, str(handler_file), folder / "weights.pt", cfg,
                folder / "model.py", extra)
    ts = LocalTorchServe(home, list(folders), ready_timeout=240)
    try:
        ts.__enter__()
    except ClientError as exc:
        pytest.fail(str(exc))
    try:
        yield ts
    finally:
        ts.stop()


@pytest.mark.torchserve
@pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
                    reason="Java is not installed: TorchServe's frontend needs Java 17+")
def test_torchserve_form_files_and_json(torchserve: Any, folders: dict[str, Path]) -> None:
    """Regions and references as multipart form files and as JSON, concurrent with a hostile one;
    the worker answers each as the serving core does."""
    import concurrent.futures as cf

    headers = {"Authorization": f"Bearer {torchserve.token}"}
    half = Image.new("L", (40, 30), 0)
    half.paste(255, (0, 0, 20, 30))
    buf = io.BytesIO()
    half.save(buf, "PNG")
    calls = [
        ("seg", {"files": {"data": _png(1), "region": buf.getvalue()}}, 200),
        ("seg", {"files": {"data": _png(2), "region": hostile_corpus()["png_declares_65535"].data}},
         413),
        ("seg", {"json": {"data": b64(_png(3)), "region": [0, 0, 10, 10], "target": "a"}}, 200),
        ("emb", {"files": {"data": _png(4), "reference": _png(5)}}, 200),
        ("emb", {"files": {"data": _png(6), "reference": b"not an image"}}, 400),
        ("emb", {"json": {"data": b64(_png(7)), "reference_embedding": [1] * 8}}, 200),
    ]

    def post(call: tuple[str, dict, int]) -> requests.Response:
        kind, kw, _ = call
        return requests.post(f"{torchserve.url}/explanations/{kind}", headers=headers,
                             timeout=120, **kw)

    with cf.ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(post, calls))
    assert [a.status_code for a in answers] == [c[2] for c in calls], [a.text[:200] for a in answers]
    seg = answers[0].json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(seg["segmentation"]["mask"]))))
    assert mask.shape == (30, 40) and len(seg["explanations"]) == 1
    assert answers[1].json()["message"].startswith("region mask:")
    emb = answers[3].json()
    assert [e["image"] for e in emb["explanations"]] == ["input", "reference"]
    assert answers[4].json()["message"].startswith("reference:")
    local = CamService.from_model_dir(folders["emb"])
    [want] = local.handle_batch([{"data": _png(4), "reference": _png(5)}], [True]).results
    assert emb["similarity"] == pytest.approx(want.body["similarity"], abs=1e-5)
