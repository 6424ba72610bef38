"""handler/gradcam_handler.py with a fake TorchServe context (no server).

The context is TorchServe's own :class:`ts.context.Context` with one
:class:`ts.context.RequestProcessor` per row, so per-row headers, status codes and content types
go through the very code the worker uses; metrics go to a recorder.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("ts", reason="TorchServe (the ts package) is not installed")
from ts.context import Context, RequestProcessor  # noqa: E402
from ts.utils.util import list_classes_from_module  # noqa: E402

from camserve.models import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HANDLER = ROOT / "handler" / "gradcam_handler.py"
SHAPES_MODEL = ROOT / "models" / "shapes" / "model.py"
LABELS = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon"]


def load_handler_module():
    spec = importlib.util.spec_from_file_location("gradcam_handler", HANDLER)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gradcam_handler"] = mod
    spec.loader.exec_module(mod)
    return mod


class MetricsRecorder:
    """Stands in for TorchServe's metrics cache: records add_time / add_counter calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def add_time(self, name: str, value: float, idx: Any = None, unit: str = "ms", **_: Any) -> None:
        self.calls.append(("time", name, value))

    def add_counter(self, name: str, value: float, idx: Any = None, **_: Any) -> None:
        self.calls.append(("counter", name, value))

    def names(self) -> set[str]:
        return {n for _, n, _ in self.calls}


def shapes_config(**over: Any) -> dict:
    handler = {"arch": "model:ShapesNet", "num_classes": 8, "weights": "weights.pt",
               "labels": "index_to_name.json", "target_layer": "features", "input_size": [96, 96],
               "mean": [0.5] * 3, "std": [0.25] * 3, "method": "gradcam", "topk": 3,
               "outputs": ["heatmap", "bbox"]}
    handler.update(over)
    return {"batchSize": 8, "maxBatchDelay": 100, "handler": handler}


def make_model_dir(path: Path, config: Optional[dict] = None, torchvision_arch: bool = False) -> Path:
    """A folder laid out like an extracted archive: model file, weights, labels, config."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if torchvision_arch:
        import torchvision
        model = torchvision.models.resnet18(num_classes=len(LABELS))
        config = config or {"handler": {"arch": "torchvision.models.resnet18",
                                        "num_classes": len(LABELS), "weights": "weights.pt",
                                        "target_layer": "layer4", "input_size": 64}}
    else:
        shutil.copy(SHAPES_MODEL, path / "model.py")
        spec = importlib.util.spec_from_file_location("shapes_model_for_test", SHAPES_MODEL)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.ShapesNet(num_classes=8)
        config = config or shapes_config()
    torch.save(model.state_dict(), path / "weights.pt")
    (path / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(LABELS)}))
    (path / "model-config.yaml").write_text(yaml.safe_dump(config))
    return path


def make_context(model_dir: Path, config: Optional[dict] = None, gpu: Optional[int] = None,
                 model_file: Optional[str] = "model.py") -> Context:
    if config is None:
        config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    manifest = {"model": {"modelName": "shapes", "serializedFile": "weights.pt",
                          "handler": "gradcam_handler.py", "modelVersion": "1.0"}}
    if model_file:
        manifest["model"]["modelFile"] = model_file
    return Context("shapes", str(model_dir), manifest, 8, gpu, "0.12.0", metrics=MetricsRecorder(),
                   model_yaml_config=config)


def set_requests(ctx: Context, headers: list[dict]) -> None:
    ctx.request_processor = [RequestProcessor(h) for h in headers]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(headers))}


def png(seed: int, size=(96, 96), fmt: str = "PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("shapes_mar"))


@pytest.fixture(scope="module")
def handler(model_dir):
    mod = load_handler_module()
    h = mod.GradCamHandler()
    h.initialize(make_context(model_dir))
    return h


def test_module_defines_exactly_one_class():
    mod = load_handler_module()
    classes = list_classes_from_module(mod)
    assert [c.__name__ for c in classes] == ["GradCamHandler"]


def test_initialize(handler, model_dir):
    assert handler.initialized and handler.device == torch.device("cpu")
    svc = handler.service
    assert svc.labels == LABELS and svc.num_classes == 8
    assert svc.engine.layer_name == "features"
    assert all(not p.requires_grad for p in svc.model.parameters()) and not svc.model.training
    # the weights are the archive's, not a fresh init
    state = torch.load(model_dir / "weights.pt", weights_only=True)
    torch.testing.assert_close(svc.model.state_dict()["fc.weight"], state["fc.weight"])


def test_gpu_id_without_cuda_falls_back_to_cpu(model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    h = load_handler_module().GradCamHandler()
    h.initialize(make_context(model_dir, gpu=0))
    assert h.device == torch.device("cpu")


def test_mixed_batch_per_row(handler, model_dir):
    ctx = make_context(model_dir)
    rows = [
        {"body": png(0)},                                                 # /explanations
        {"body": png(1)},                                                 # /predictions
        {"data": png(2), "explain": "true", "target": "star,1", "method": "hirescam"},
        {"body": b"\x89PNG\r\n\x1a\n broken"},                            # bad image
        {"body": {"data": base64.b64encode(png(3)).decode(), "explain": True, "topk": 99}},
        {"body": {"data": base64.b64encode(png(4)).decode(), "explain": True,
                  "method": "layercam", "outputs": ["raw"]}},
    ]
    set_requests(ctx, [{"explain": "True"}, {"explain": "False"}, {"explain": "False"},
                       {"explain": "False"}, {"explain": "False"}, {"explain": "False"}])
    out = handler.handle(rows, ctx)
    assert len(out) == len(rows) and all(isinstance(o, str) for o in out)
    bodies = [json.loads(o) for o in out]
    status = [ctx.get_response_status(i)[0] for i in range(len(rows))]
    assert status == [200, 200, 200, 400, 422, 200]
    assert ctx.get_response_status(3) == (400, "Bad Request")
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(len(rows)))

    assert "explanations" in bodies[0] and "explanations" not in bodies[1]
    assert bodies[0]["explanations"][0]["target"] == bodies[0]["predictions"][0]["index"]
    assert [(e["target"], e["label"], e["method"]) for e in bodies[2]["explanations"]] == [
        (3, "star", "hirescam"), (1, "square", "hirescam")]
    assert bodies[3]["type"] == "InvalidImage" and bodies[3]["code"] == 400
    assert bodies[4] == {"code": 422, "type": "InvalidOption",
                         "message": "invalid value for topk: 99 (allowed: 1..8)"}
    e5 = bodies[5]["explanations"][0]
    assert e5["method"] == "layercam" and set(e5) == {"target", "label", "score", "method", "layer",
                                                      "width", "height", "raw"}
    assert e5["raw"]["shape"] == [12, 12]

    names = ctx.metrics.names()
    assert {"HandlerTime", "CamTime", "CamExplainedRows", "CamRequestErrors", "CamInternalErrors",
            "CamFailedBatches"} <= names
    assert ("counter", "CamExplainedRows", 3) in ctx.metrics.calls  # rows 0, 2, 5
    assert ("counter", "CamRequestErrors", 2) in ctx.metrics.calls


def test_explain_is_decided_per_row_not_from_row_0(handler, model_dir):
    ctx = make_context(model_dir)
    set_requests(ctx, [{"explain": "False"}, {"explain": "True"}, {"explain": "False"}])
    out = [json.loads(o) for o in handler.handle([{"body": png(i)} for i in range(3)], ctx)]
    assert [("explanations" in b) for b in out] == [False, True, False]


def test_rows_get_their_own_answers(handler, model_dir):
    """Each row's answer is the one it gets alone (no mix-up inside a batch)."""
    ctx = make_context(model_dir)
    imgs = [png(10 + i) for i in range(6)]
    set_requests(ctx, [{"explain": "True"}] * 6)
    batch = [json.loads(o) for o in handler.handle([{"body": d} for d in imgs], ctx)]
    for d, b in zip(imgs, batch):
        one = make_context(model_dir)
        set_requests(one, [{"explain": "True"}])
        assert_same_answer(json.loads(handler.handle([{"body": d}], one)[0]), b)


def assert_same_answer(a: dict, b: dict) -> None:
    """Equal up to float noise between batch sizes (a heatmap pixel may round 1 level apart)."""
    assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
    assert [p["score"] for p in a["predictions"]] == pytest.approx(
        [p["score"] for p in b["predictions"]], abs=1e-5)
    assert len(a["explanations"]) == len(b["explanations"])
    for ea, eb in zip(a["explanations"], b["explanations"]):
        for k in ("target", "label", "method", "layer", "width", "height"):
            assert ea[k] == eb[k]
        assert ea["score"] == pytest.approx(eb["score"], abs=1e-5)
        ha, hb = (np.asarray(Image.open(io.BytesIO(base64.b64decode(e["heatmap"]))), dtype=int)
                  for e in (ea, eb))
        assert np.abs(ha - hb).max() <= 1
        assert np.abs(np.subtract(ea["bbox"], eb["bbox"])).max() <= 1


def test_predict_rows_under_inference_mode_and_cam_outside(handler, model_dir, monkeypatch):
    seen: list[bool] = []
    hook = handler.service.model.register_forward_pre_hook(
        lambda m, a: seen.append(torch.is_inference_mode_enabled()))
    try:
        ctx = make_context(model_dir)
        set_requests(ctx, [{"explain": "False"}, {"explain": "False"}])
        handler.handle([{"body": png(1)}, {"body": png(2)}], ctx)
        set_requests(ctx, [{"explain": "True"}, {"explain": "False"}])
        handler.handle([{"body": png(1)}, {"body": png(2)}], ctx)
    finally:
        hook.remove()
    assert seen == [True, False]


def test_worker_survives_a_batch_of_garbage(handler, model_dir):
    ctx = make_context(model_dir)
    rows = [{"body": b""}, {"body": {"data": "!!"}}, {"body": [1]}, {"other": b"x"},
            {"body": png(5, size=(9000, 5000))}]
    set_requests(ctx, [{}] * len(rows))
    out = [json.loads(o) for o in handler.handle(rows, ctx)]
    assert [ctx.get_response_status(i)[0] for i in range(len(rows))] == [400, 400, 400, 400, 413]
    assert out[4]["type"] == "ImageTooLarge"


def test_torchvision_arch_by_name(tmp_path):
    d = make_model_dir(tmp_path / "r18", torchvision_arch=True)
    h = load_handler_module().GradCamHandler()
    h.initialize(make_context(d, model_file=None))
    assert h.service.engine.layer_name == "layer4" and h.service.labels == LABELS
    ctx = make_context(d, model_file=None)
    set_requests(ctx, [{"explain": "True"}])
    body = json.loads(h.handle([{"body": png(1, size=(70, 50))}], ctx)[0])
    assert (body["explanations"][0]["width"], body["explanations"][0]["height"]) == (70, 50)


def test_auto_located_layer_when_config_leaves_it_out(tmp_path):
    cfg = shapes_config()
    del cfg["handler"]["target_layer"]
    d = make_model_dir(tmp_path / "auto", cfg)
    h = load_handler_module().GradCamHandler()
    h.initialize(make_context(d))
    assert h.service.engine.layer_name  # found by the warm-up pass


@pytest.mark.parametrize("config, needle", [
    ({}, "handler block"),
    ({"handler": {"num_classes": 8}}, "handler.arch"),
    (shapes_config(arch="model:NoSuchNet"), "handler.arch"),
    (shapes_config(arch="torchvision.models.resnet9000"), "handler.arch"),
    (shapes_config(target_layer="features.99"), "target_layer"),
    (shapes_config(method="cam"), "handler.method"),
    (shapes_config(input_size=[2, 2]), "handler.input_size"),
    (shapes_config(std=[0, 1, 1]), "handler.std"),
    (shapes_config(outputs=["heatmap", "jpeg"]), "handler.outputs"),
    (shapes_config(num_classes=10), "handler.weights"),
    (shapes_config(labels="missing.json"), "handler.labels"),
    (shapes_config(target_layer="pool"), "handler.target_layer"),
])
def test_bad_config_fails_initialize_naming_the_key(model_dir, config, needle):
    h = load_handler_module().GradCamHandler()
    with pytest.raises(ConfigError) as ei:
        h.initialize(make_context(model_dir, config=config))
    assert needle in str(ei.value)
    assert not h.initialized


def test_customized_describe(handler, model_dir):
    ctx = make_context(model_dir)
    set_requests(ctx, [{"describe": "True"}])
    [out] = handler.handle([{}], ctx)
    desc = json.loads(out)
    assert desc["labels"] == LABELS and desc["target_layer"] == "features"
    assert "gradcam" in desc["methods"] and desc["defaults"]["topk"] == 3


def test_handle_before_initialize_is_an_error():
    h = load_handler_module().GradCamHandler()
    with pytest.raises(RuntimeError, match="before initialize"):
        h.handle([{"body": b""}], None)


def test_forged_describe_header_gets_ordinary_answers_per_row(handler, model_dir):
    # alone: an inference row always has a parameter ("body"), so it is answered as a request
    ctx = make_context(model_dir)
    set_requests(ctx, [{"describe": "True"}])
    [out] = handler.handle([{"body": png(1)}], ctx)
    assert "predictions" in json.loads(out)
    # as row 0 of a batch: one answer per row, never the description
    ctx = make_context(model_dir)
    set_requests(ctx, [{"describe": "True"}, {}, {"explain": "True"}])
    out = handler.handle([{"body": png(1)}, {"body": png(2)}, {"body": png(3)}], ctx)
    assert len(out) == 3 and all("predictions" in json.loads(o) for o in out)
    # an empty form (no parameters) carries a form content type: not the management call
    for ctype in ("multipart/form-data; boundary=x", "application/x-www-form-urlencoded"):
        ctx = make_context(model_dir)
        set_requests(ctx, [{"describe": "True", "Content-Type": ctype}])
        [out] = handler.handle([{}], ctx)
        assert json.loads(out)["code"] == 400 and ctx.get_response_status(0)[0] == 400
    # a row with no parameters in a batch of two is never the management call either
    ctx = make_context(model_dir)
    set_requests(ctx, [{"describe": "True"}, {"describe": "True"}])
    out = handler.handle([{}, {}], ctx)
    assert [json.loads(o)["code"] for o in out] == [400, 400]


def test_describe_header_rule():
    mod = load_handler_module()

    class Ctx:
        def __init__(self, headers):
            self.headers = headers

        def get_all_request_header(self, i):
            return self.headers[i]

    assert mod.is_management_describe([{}], Ctx([{"describe": "True", "Accept": "*/*"}]))
    assert not mod.is_management_describe([{}], Ctx([{"describe": "true"}]))
    assert not mod.is_management_describe([{"body": b""}], Ctx([{"describe": "True"}]))
    assert not mod.is_management_describe([{}], Ctx([{"describe": "True",
                                                      "content-type": "multipart/form-data"}]))
    assert mod.explain_flags(Ctx([{"explain": "True"}, {}, {"explain": "false"}]), 3) == [
        True, False, False]


def test_serving_limits_in_the_handler_block(model_dir):
    h = load_handler_module().GradCamHandler()
    cfg = shapes_config(max_response_size=5000, max_option_length=64, outputs=["overlay"])
    h.initialize(make_context(model_dir, config=cfg))
    assert h.service.limits.max_response_size == 5000
    ctx = make_context(model_dir)
    set_requests(ctx, [{"explain": "True"}, {}, {}])
    out = [json.loads(o) for o in h.handle([{"body": png(1, size=(300, 200))}, {"body": png(2)},
                                            {"data": png(3), "method": "x" * 65}], ctx)]
    assert [ctx.get_response_status(i)[0] for i in range(3)] == [413, 200, 422]
    assert out[0]["type"] == "ResponseTooLarge" and "overlay" in out[0]["message"]
    assert "at most 64" in out[2]["message"]


def test_a_bug_outside_the_row_guards_still_answers_every_row(handler, model_dir, monkeypatch):
    def broken(rows, force_explain=None):
        raise RuntimeError("bug")

    monkeypatch.setattr(handler.service, "handle_batch", broken)
    ctx = make_context(model_dir)
    set_requests(ctx, [{}, {}])
    out = [json.loads(o) for o in handler.handle([{"body": png(1)}, {"body": png(2)}], ctx)]
    assert [o["type"] for o in out] == ["InternalError"] * 2
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [500, 500]
    assert ("counter", "CamFailedBatches", 1) in ctx.metrics.calls


PRECISION_SCRIPT = r"""
import json, sys, torch
# pretend to be an Ampere-class GPU host: TorchServe's BaseHandler switches to TF32 on import here
torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda *a: (8, 0)
torch.set_float32_matmul_precision("highest")
sys.path.insert(0, sys.argv[1])
import test_handler as th
mod = th.load_handler_module()
h = mod.GradCamHandler()
h.initialize(th.make_context(th.make_model_dir(th.Path(sys.argv[2]))))
print(json.dumps({"precision": torch.get_float32_matmul_precision(),
                  "base_handler": "ts.torch_handler.base_handler" in sys.modules,
                  "device": str(h.device)}))
"""


def test_handler_leaves_the_matmul_precision_alone(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", PRECISION_SCRIPT, str(ROOT / "tests"),
                           str(tmp_path / "m")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"precision": "highest", "base_handler": False, "device": "cpu"}
