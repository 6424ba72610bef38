"""handler/gradcam_handler.py with a fake TorchServe context (no server).

The handler is imported as a TorchServe worker imports it
(:func:`camserve.testing.handler.load_handler`) and runs on
:class:`camserve.testing.context.FakeContext`: per-row request headers, response status codes and
content types, metrics to a recorder. One module-scoped handler over a random shapes folder serves
most tests; a mixed batch is handled once and each of its contracts is its own test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("ts", reason="TorchServe (the ts package) is not installed")
from ts.utils.util import list_classes_from_module  # noqa: E402

from camserve.backends import GRAPH_FILE  # noqa: E402
from camserve.models import ConfigError  # noqa: E402
from camserve.testing.context import FakeContext  # noqa: E402
from camserve.testing.handler import load_handler  # noqa: E402
from camserve.testing.handler import load_handler_module as load_module  # noqa: E402
from camserve.testing.nets import write_model_folder  # noqa: E402

LABELS = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon"]


@pytest.fixture(scope="module")
def model_dir(shapes_folder) -> Path:
    """A folder laid out like the extracted shapes archive (random ShapesNet weights); read-only."""
    return shapes_folder("shapes_mar")


@pytest.fixture(scope="module")
def onnx_dir(model_dir, tmp_path_factory) -> Path:
    """The same model laid out like an extracted archive for the onnxruntime backend: the config
    (``backend: onnxruntime``), the labels and the exported CAM graph; no model code, no weights."""
    import shutil

    import yaml

    from camserve.methods import available_methods
    from camserve.models import load_model_dir
    from camserve.onnx.export import export_cam_onnx

    folder = tmp_path_factory.mktemp("shapes_onnx") / "shapes"
    folder.mkdir()
    export_cam_onnx(load_model_dir(model_dir), folder / GRAPH_FILE,
                    methods=available_methods(exportable=True), verify=False)
    cfg = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    cfg["handler"]["backend"] = "onnxruntime"
    (folder / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copy(model_dir / "index_to_name.json", folder)
    return folder


@pytest.fixture(scope="module")
def new_context(model_dir, fake_context):
    """``new_context(folder=model_dir, *, headers=None, config=None, gpu=None) -> FakeContext``:
    the conftest's ``fake_context`` for model ``shapes``."""
    def make(folder: Path = model_dir, *, headers=None, config=None, gpu=None) -> FakeContext:
        kw: dict[str, Any] = {} if config is None else {"model_yaml_config": config}
        return fake_context(folder, headers=headers, model_name="shapes", gpu_id=gpu, **kw)
    return make


def new_handler(handler_file: Path, ctx: FakeContext):
    """A freshly imported GradCamHandler, initialised with ``ctx``."""
    return load_handler(handler_file, ctx).instance


def uninitialised(handler_file: Path):
    return load_handler(handler_file, initialize=False).instance


@pytest.fixture(autouse=True)
def _torch_threads():
    """initialize sets the worker's torch threads; the test process gets its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def torch_handler(handler_file, new_context):
    return new_handler(handler_file, new_context())


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def handler(request, handler_file, new_context, onnx_dir, torch_handler):
    """The handler over the shapes folder on each backend (onnxruntime: its archive's folder)."""
    if request.param == "torch":
        return torch_handler
    h = new_handler(handler_file, new_context(onnx_dir))
    assert h.service.backend.name == "onnxruntime"
    return h


def answers(handler, ctx: FakeContext, rows: list) -> list[dict]:
    return [json.loads(o) for o in handler.handle(rows, ctx)]


def test_module_defines_exactly_one_class(handler_file):
    mod = load_module(handler_file)
    classes = list_classes_from_module(mod)
    assert [c.__name__ for c in classes] == ["GradCamHandler"]


def test_initialize_reads_the_folder(handler):
    assert handler.initialized and handler.device == torch.device("cpu")
    svc = handler.service
    assert svc.labels == LABELS and svc.num_classes == 8
    assert svc.layer == "features"


def test_initialize_gives_a_frozen_eval_model(torch_handler):
    model = torch_handler.service.backend.model
    assert all(not p.requires_grad for p in model.parameters()) and not model.training


def test_initialize_loads_the_archive_weights_not_a_fresh_init(torch_handler, model_dir):
    state = torch.load(model_dir / "weights.pt", weights_only=True)
    torch.testing.assert_close(torch_handler.service.backend.model.state_dict()["fc.weight"],
                               state["fc.weight"])


def test_gpu_id_without_cuda_falls_back_to_cpu(handler_file, new_context, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    h = new_handler(handler_file, new_context(gpu=0))
    assert h.device == torch.device("cpu")


# -- one mixed batch, handled once; one contract per test ------------------------------------------

MIXED_HEADERS = [{"explain": "True"}, {"explain": "False"}, {"explain": "False"},
                 {"explain": "False"}, {"explain": "False"}, {"explain": "False"}]


@pytest.fixture(scope="module")
def mixed(handler, new_context, png) -> tuple[FakeContext, list[dict]]:
    """Six rows as TorchServe presents them: /explanations (header), /predictions, a form with
    explain/target/method fields, a broken image, a JSON body with a bad topk, a JSON body asking
    for layercam raw maps."""
    import base64

    def b64(seed: int) -> str:
        return base64.b64encode(png(seed=seed, size=(96, 96))).decode()

    rows = [
        {"body": png(seed=0, size=(96, 96))},
        {"body": png(seed=1, size=(96, 96))},
        {"data": png(seed=2, size=(96, 96)), "explain": "true", "target": "star,1",
         "method": "hirescam"},
        {"body": b"\x89PNG\r\n\x1a\n broken"},
        {"body": {"data": b64(3), "explain": True, "topk": 99}},
        {"body": {"data": b64(4), "explain": True, "method": "layercam", "outputs": ["raw"]}},
    ]
    ctx = new_context(headers=MIXED_HEADERS)
    out = handler.handle(rows, ctx)
    assert len(out) == len(rows) and all(isinstance(o, str) for o in out)
    return ctx, [json.loads(o) for o in out]


def test_mixed_batch_statuses_per_row(mixed):
    ctx, _ = mixed
    assert [s for s, _ in ctx.statuses()] == [200, 200, 200, 400, 422, 200]
    assert ctx.get_response_status(3) == (400, "Bad Request")


def test_mixed_batch_every_row_is_json(mixed):
    ctx, _ = mixed
    assert ctx.content_types() == ["application/json"] * len(MIXED_HEADERS)


def test_explain_header_explains_the_top1(mixed):
    _, bodies = mixed
    assert "explanations" in bodies[0] and "explanations" not in bodies[1]
    assert bodies[0]["explanations"][0]["target"] == bodies[0]["predictions"][0]["index"]


def test_form_fields_choose_targets_by_label_or_index_and_method(mixed):
    _, bodies = mixed
    assert [(e["target"], e["label"], e["method"]) for e in bodies[2]["explanations"]] == [
        (3, "star", "hirescam"), (1, "square", "hirescam")]


def test_broken_image_is_its_own_400(mixed):
    _, bodies = mixed
    assert bodies[3]["type"] == "InvalidImage" and bodies[3]["code"] == 400


def test_bad_option_is_its_own_422(mixed):
    _, bodies = mixed
    assert bodies[4] == {"code": 422, "type": "InvalidOption",
                         "message": "invalid value for topk: 99 (allowed: 1..8)"}


def test_raw_output_has_only_the_raw_map(mixed):
    _, bodies = mixed
    e5 = bodies[5]["explanations"][0]
    assert e5["method"] == "layercam" and set(e5) == {"target", "label", "score", "method", "layer",
                                                      "width", "height", "raw"}
    assert e5["raw"]["shape"] == [12, 12]


def test_mixed_batch_metrics(mixed):
    ctx, _ = mixed
    assert {"HandlerTime", "CamTime", "CamExplainedRows", "CamRequestErrors", "CamInternalErrors",
            "CamFailedBatches"} <= ctx.metrics.names()
    assert ctx.metrics.values("CamExplainedRows") == [3]  # rows 0, 2, 5
    assert ctx.metrics.values("CamRequestErrors") == [2]


# -- batches -------------------------------------------------------------------------------------

def test_explain_is_decided_per_row_not_from_row_0(handler, new_context, png):
    ctx = new_context(headers=[{"explain": "False"}, {"explain": "True"}, {"explain": "False"}])
    out = answers(handler, ctx, [{"body": png(seed=i, size=(96, 96))} for i in range(3)])
    assert [("explanations" in b) for b in out] == [False, True, False]


def test_rows_get_their_own_answers(handler, new_context, png, decode_png):
    """Each row's answer is the one it gets alone (no mix-up inside a batch)."""
    imgs = [png(seed=10 + i, size=(96, 96)) for i in range(6)]
    ctx = new_context(headers=[{"explain": "True"}] * 6)
    batch = answers(handler, ctx, [{"body": d} for d in imgs])
    for d, b in zip(imgs, batch):
        [alone] = answers(handler, new_context(headers=[{"explain": "True"}]), [{"body": d}])
        assert_same_answer(alone, b, decode_png)


def assert_same_answer(a: dict, b: dict, decode_png) -> None:
    """Equal up to float noise between batch sizes (a heatmap pixel may round 1 level apart)."""
    assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
    assert [p["score"] for p in a["predictions"]] == pytest.approx(
        [p["score"] for p in b["predictions"]], abs=1e-5)
    assert len(a["explanations"]) == len(b["explanations"])
    for ea, eb in zip(a["explanations"], b["explanations"]):
        for k in ("target", "label", "method", "layer", "width", "height"):
            assert ea[k] == eb[k]
        assert ea["score"] == pytest.approx(eb["score"], abs=1e-5)
        ha, hb = (decode_png(e["heatmap"]).astype(int) for e in (ea, eb))
        assert np.abs(ha - hb).max() <= 1
        assert np.abs(np.subtract(ea["bbox"], eb["bbox"])).max() <= 1


def test_predict_rows_without_autograd_and_cam_with_it(torch_handler, new_context, png):
    handler = torch_handler
    seen: list[tuple[bool, bool]] = []
    hook = handler.service.backend.model.register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled())))
    rows = [{"body": png(seed=1, size=(96, 96))}, {"body": png(seed=2, size=(96, 96))}]
    try:
        handler.handle(rows, new_context(headers=[{"explain": "False"}, {"explain": "False"}]))
        handler.handle(rows, new_context(headers=[{"explain": "True"}, {"explain": "False"}]))
    finally:
        hook.remove()
    # predict-only: no autograd (nor inference mode: a model's cached tensors stay usable by an
    # explaining call); the explain batch: the engine's own forward (the target layer tracked)
    assert seen[0] == (False, False) and seen[1][1] is False and len(seen) == 2


def test_worker_survives_a_batch_of_garbage(handler, new_context, png):
    from PIL import Image

    huge = png(Image.new("1", (9000, 5000)))  # 45 Mpx, cheap to encode (1 bit per pixel)
    rows = [{"body": b""}, {"body": {"data": "!!"}}, {"body": [1]}, {"other": b"x"},
            {"body": huge}]
    ctx = new_context(headers=[{}] * len(rows))
    out = answers(handler, ctx, rows)
    assert [s for s, _ in ctx.statuses()] == [400, 400, 400, 400, 413]
    assert out[4]["type"] == "ImageTooLarge"


def test_a_bug_outside_the_row_guards_still_answers_every_row(handler, new_context, png,
                                                              monkeypatch):
    def broken(rows, force_explain=None):
        raise RuntimeError("bug")

    monkeypatch.setattr(handler.service, "handle_batch", broken)
    ctx = new_context(headers=[{}, {}])
    out = answers(handler, ctx, [{"body": png(seed=1)}, {"body": png(seed=2)}])
    assert [o["type"] for o in out] == ["InternalError"] * 2
    assert [s for s, _ in ctx.statuses()] == [500, 500]
    assert ctx.metrics.values("CamFailedBatches") == [1]


# -- model folders and configs ---------------------------------------------------------------------

def test_torchvision_arch_by_name(tmp_path, handler_file, new_context, png):
    import torchvision

    torch.manual_seed(0)
    folder = write_model_folder(
        tmp_path / "r18", torchvision.models.resnet18(num_classes=len(LABELS)),
        {"arch": "torchvision.models.resnet18", "num_classes": len(LABELS),
         "weights": "weights.pt", "target_layer": "layer4", "input_size": 64}, labels=LABELS)
    h = new_handler(handler_file, new_context(folder))
    assert h.service.layer == "layer4" and h.service.labels == LABELS
    [body] = answers(h, new_context(folder, headers=[{"explain": "True"}]),
                     [{"body": png(seed=1, size=(70, 50))}])
    assert (body["explanations"][0]["width"], body["explanations"][0]["height"]) == (70, 50)


def test_auto_located_layer_when_config_leaves_it_out(handler_file, new_context, shapes_config):
    h = new_handler(handler_file, new_context(config=shapes_config(target_layer=None)))
    assert h.service.layer  # found by the warm-up pass


@pytest.mark.parametrize("whole, over, needle", [
    ({}, None, "handler block"),
    ({"handler": {"num_classes": 8}}, None, "handler.arch"),
    (None, {"arch": "model:NoSuchNet"}, "handler.arch"),
    (None, {"arch": "torchvision.models.resnet9000"}, "handler.arch"),
    (None, {"target_layer": "features.99"}, "target_layer"),
    (None, {"method": "cam"}, "handler.method"),
    (None, {"input_size": [2, 2]}, "handler.input_size"),
    (None, {"std": [0, 1, 1]}, "handler.std"),
    (None, {"outputs": ["heatmap", "jpeg"]}, "handler.outputs"),
    (None, {"num_classes": 10}, "handler.weights"),
    (None, {"labels": "missing.json"}, "handler.labels"),
    (None, {"target_layer": "pool"}, "handler.target_layer"),
    (None, {"taget_layer": "features"}, "taget_layer"),
])
def test_bad_config_fails_initialize_naming_the_key(handler_file, new_context, shapes_config,
                                                    whole, over, needle):
    h = uninitialised(handler_file)
    config = whole if whole is not None else shapes_config(**over)
    with pytest.raises(ConfigError) as ei:
        h.initialize(new_context(config=config))
    assert needle in str(ei.value)
    assert not h.initialized


def test_handle_before_initialize_is_an_error(handler_file):
    with pytest.raises(RuntimeError, match="before initialize"):
        uninitialised(handler_file).handle([{"body": b""}], None)


@pytest.fixture(scope="module")
def limited(handler_file, new_context, shapes_config, png) -> tuple[Any, FakeContext, list[dict]]:
    cfg = shapes_config(max_response_size=5000, max_option_length=64, outputs=["overlay"])
    h = new_handler(handler_file, new_context(config=cfg))
    ctx = new_context(headers=[{"explain": "True"}, {}, {}])
    out = answers(h, ctx, [{"body": png(seed=1, size=(300, 200))}, {"body": png(seed=2)},
                           {"data": png(seed=3), "method": "x" * 65}])
    return h, ctx, out


def test_serving_limits_are_read_from_the_handler_block(limited):
    h, ctx, _ = limited
    assert h.service.limits.max_response_size == 5000
    assert [s for s, _ in ctx.statuses()] == [413, 200, 422]


def test_an_answer_over_max_response_size_is_413_naming_the_output(limited):
    _, _, out = limited
    assert out[0]["type"] == "ResponseTooLarge" and "overlay" in out[0]["message"]


def test_an_option_over_max_option_length_is_422(limited):
    _, _, out = limited
    assert "at most 64" in out[2]["message"]


# -- describe --------------------------------------------------------------------------------------

def test_customized_describe(handler, new_context):
    [desc] = answers(handler, new_context(headers=[{"describe": "True"}]), [{}])
    assert desc["labels"] == LABELS and desc["target_layer"] == "features"
    assert "gradcam" in [m["name"] for m in desc["methods"]] and desc["defaults"]["topk"] == 3


def test_forged_describe_header_on_an_inference_row_is_answered_as_a_request(handler, new_context,
                                                                             png):
    # an inference row always has a parameter ("body"), so it is answered as a request
    [out] = answers(handler, new_context(headers=[{"describe": "True"}]), [{"body": png(seed=1)}])
    assert "predictions" in out


def test_forged_describe_header_on_row_0_of_a_batch_gets_one_answer_per_row(handler, new_context,
                                                                            png):
    ctx = new_context(headers=[{"describe": "True"}, {}, {"explain": "True"}])
    out = answers(handler, ctx, [{"body": png(seed=i)} for i in (1, 2, 3)])
    assert len(out) == 3 and all("predictions" in o for o in out)


@pytest.mark.parametrize("ctype", ["multipart/form-data; boundary=x",
                                   "application/x-www-form-urlencoded"])
def test_an_empty_form_with_describe_header_is_400_not_the_description(handler, new_context,
                                                                       ctype):
    ctx = new_context(headers=[{"describe": "True", "Content-Type": ctype}])
    [out] = answers(handler, ctx, [{}])
    assert out["code"] == 400 and ctx.get_response_status(0)[0] == 400


def test_rows_without_parameters_in_a_batch_are_400_not_the_description(handler, new_context):
    ctx = new_context(headers=[{"describe": "True"}, {"describe": "True"}])
    assert [o["code"] for o in answers(handler, ctx, [{}, {}])] == [400, 400]


def test_describe_header_rule(handler_file, new_context):
    mod = load_module(handler_file)

    def ctx(*headers):
        return new_context(headers=headers)

    assert mod.is_management_describe([{}], ctx({"describe": "True", "Accept": "*/*"}))
    assert not mod.is_management_describe([{}], ctx({"describe": "true"}))
    assert not mod.is_management_describe([{"body": b""}], ctx({"describe": "True"}))
    assert not mod.is_management_describe([{}], ctx({"describe": "True",
                                                     "content-type": "multipart/form-data"}))


def test_explain_flags_come_from_each_row_header(handler_file, new_context):
    mod = load_module(handler_file)
    ctx = new_context(headers=[{"explain": "True"}, {}, {"explain": "false"}])
    assert mod.explain_flags(ctx, 3) == [True, False, False]


# -- the worker's float32 matmul precision ---------------------------------------------------------

PRECISION_SCRIPT = r"""
import json, sys, torch
# pretend to be an Ampere-class GPU host: TorchServe's BaseHandler switches to TF32 on import here
torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda *a: (8, 0)
torch.set_float32_matmul_precision("highest")
from camserve.testing.context import FakeContext
from camserve.testing.handler import load_handler
h = load_handler(sys.argv[1], FakeContext(sys.argv[2], model_file="model.py")).instance
print(json.dumps({"precision": torch.get_float32_matmul_precision(),
                  "base_handler": "ts.torch_handler.base_handler" in sys.modules,
                  "device": str(h.device)}))
"""


def test_handler_leaves_the_matmul_precision_alone(repo_root, handler_file, model_dir):
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", PRECISION_SCRIPT, str(handler_file),
                           str(model_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"precision": "highest", "base_handler": False, "device": "cpu"}
