"""camserve.serving: CamService.handle_batch -> BatchOutcome; per-row isolation, budgets.

No TorchServe here: rows are given as TorchServe presents them (``{"body": ...}``, form fields,
parsed JSON) and the service is built around a small random ShapesNet-like CNN, on each backend
(the PyTorch engine, and onnxruntime over the same net's exported CAM graph): the answers, the
bad-input and the batch-isolation suites hold on both. Request
envelopes, options and the explain stages have their own test files.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from camserve.backends import GRAPH_FILE
from camserve.engine import CamEngine, normalize_maps, to_uint8
from camserve.methods import available_methods
from camserve.models import LoadedModel, ModelSpec
from camserve.options import ServingLimits
from camserve.serving import BatchOutcome, CamService
from camserve.testing.nets import TINY_LABELS, TinyNet, frozen, tiny_spec

LABELS = list(TINY_LABELS)
spec_of = tiny_spec


BACKENDS = ["torch", "onnxruntime"]


def tiny_loaded(model: nn.Module | None = None, spec: ModelSpec | None = None) -> LoadedModel:
    return LoadedModel(model=frozen(model or TinyNet(len(LABELS), seed=0)), spec=spec or spec_of(),
                       labels=list(LABELS), layer="features", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_graph(tmp_path_factory) -> Path:
    """The default TinyNet's CAM graph with every exportable method."""
    from camserve.onnx.export import export_cam_onnx

    path = tmp_path_factory.mktemp("tinygraph") / GRAPH_FILE
    export_cam_onnx(tiny_loaded(), path, methods=available_methods(exportable=True), verify=False)
    return path


def make_service(spec: ModelSpec | None = None, limits: ServingLimits | None = None,
                 model: nn.Module | None = None, backend: str = "torch",
                 graph: Path | None = None) -> CamService:
    """The TinyNet service on ``backend`` (onnxruntime: over ``graph``, the default TinyNet's)."""
    if backend == "onnxruntime":
        from camserve.backends.ort import OnnxBackend

        assert model is None and graph is not None
        return CamService(OnnxBackend(graph, spec=spec or spec_of(), threads=1), limits)
    return CamService(tiny_loaded(model, spec), limits)


@pytest.fixture(scope="module", params=BACKENDS)
def service(request, tiny_graph) -> CamService:
    """The TinyNet service on each backend."""
    return make_service(backend=request.param, graph=tiny_graph)


@pytest.fixture(scope="module")
def reference() -> CamEngine:
    """The PyTorch engine over the same TinyNet: what every backend must answer."""
    return CamEngine(frozen(TinyNet(len(LABELS), seed=0)), "features")


def body_of(res) -> dict:
    return json.loads(res.to_json())


# -- the service --------------------------------------------------------------------------------------
def direct_heatmap(engine: CamEngine, data: bytes, target: int, method: str) -> np.ndarray:
    from camserve.images import decode_image, preprocess
    img = decode_image(data)
    x = preprocess(img, (32, 32), (0.5,) * 3, (0.25,) * 3)[None]
    res = engine(x, targets=[target], method=method)
    return to_uint8(normalize_maps(res.cams[0], (img.height, img.width))).numpy()


def assert_maps_close(a: np.ndarray, b: np.ndarray) -> None:
    """uint8 maps equal up to one level (float noise between batch sizes)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def mixed(service, png):
    """Five rows: predict only, a form asking for layercam on "star", a JSON body with targets and
    all outputs (explained by its flag), a predict-only form with topk 2, a raw body explained by
    its flag. Handled once; returns (images, outcome, bodies)."""
    imgs = [png(seed=i, size=(48 + 8 * i, 40)) for i in range(5)]
    rows = [
        {"body": imgs[0]},                                                    # predict only
        {"data": imgs[1], "explain": "true", "target": "star", "method": "layercam"},
        {"body": {"data": base64.b64encode(imgs[2]).decode(), "target": [1, 4],
                  "outputs": "heatmap,raw,bbox,overlay"}},                    # explain via flag
        {"data": imgs[3], "topk": "2"},                                       # predict only
        {"body": imgs[4]},                                                    # explain via flag
    ]
    outcome = service.handle_batch(rows, [False, False, True, False, True])
    return imgs, outcome, [body_of(r) for r in outcome.results]


def test_mixed_batch_rows_are_answered_and_explained_per_row(mixed):
    _, outcome, bodies = mixed
    assert isinstance(outcome, BatchOutcome)
    assert [r.status for r in outcome.results] == [200] * 5
    assert [("explanations" in b) for b in bodies] == [False, True, True, False, True]
    assert len(bodies[3]["predictions"]) == 2 and len(bodies[0]["predictions"]) == 3


def test_predictions_equal_the_models_own_softmax(reference, mixed):
    from camserve.images import decode_image, preprocess

    imgs, _, bodies = mixed
    for data, b in zip(imgs, bodies):
        x = preprocess(decode_image(data), (32, 32), (0.5,) * 3, (0.25,) * 3)[None]
        probs = torch.softmax(reference.predict(x), 1)[0]
        top = torch.topk(probs, len(b["predictions"]))
        assert [p["index"] for p in b["predictions"]] == top.indices.tolist()
        assert [p["score"] for p in b["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert [p["label"] for p in b["predictions"]] == [LABELS[i] for i in top.indices.tolist()]


def test_target_label_and_method_from_form_fields(reference, mixed, decode_png):
    imgs, _, bodies = mixed
    e1 = bodies[1]["explanations"]
    assert [(e["target"], e["label"], e["method"]) for e in e1] == [(3, "star", "layercam")]
    assert set(e1[0]) == {"target", "label", "score", "method", "layer", "width", "height",
                          "heatmap", "bbox"}
    assert_maps_close(decode_png(e1[0]["heatmap"]),
                      direct_heatmap(reference, imgs[1], 3, "layercam"))


def test_json_targets_and_all_outputs(reference, mixed, decode_png):
    imgs, _, bodies = mixed
    e2 = bodies[2]["explanations"]
    assert [(e["target"], e["method"]) for e in e2] == [(1, "gradcam"), (4, "gradcam")]
    for e in e2:
        assert set(e) >= {"heatmap", "overlay", "raw", "bbox"}
        assert e["raw"]["shape"] == [8, 8] and np.asarray(e["raw"]["data"]).shape == (8, 8)
        assert_maps_close(decode_png(e["heatmap"]),
                          direct_heatmap(reference, imgs[2], e["target"], "gradcam"))
        assert decode_png(e["overlay"]).shape[:2] == (40, 64)


def test_forced_explain_explains_the_top1_at_image_size(mixed, decode_png):
    _, _, bodies = mixed
    e4 = bodies[4]["explanations"]
    top1 = bodies[4]["predictions"][0]
    assert [e["target"] for e in e4] == [top1["index"]]
    assert e4[0]["score"] == pytest.approx(top1["score"])
    assert (e4[0]["width"], e4[0]["height"]) == (80, 40) and e4[0]["layer"] == "features"
    assert decode_png(e4[0]["heatmap"]).shape == (40, 80)


def test_mixed_batch_stats(mixed):
    _, outcome, _ = mixed
    assert outcome.stats.explained_rows == 3 and outcome.stats.maps == 4
    assert outcome.stats.error_rows == 0 and outcome.stats.rows == 5


@pytest.mark.parametrize("layout", ["mixed", "predict_only", "k3_beside_k1"])
def test_one_forward_per_batch(png, layout):
    service = make_service()
    model = service.backend.model
    calls = []
    rows = [{"body": png(seed=i)} for i in range(4)]
    flags = [True, False, False, True]
    if layout == "predict_only":
        flags = None
    elif layout == "k3_beside_k1":
        rows[1] = {"data": png(seed=9), "explain": "1", "target": [0, 1, 2]}
    h = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        service.handle_batch(rows, flags)
    finally:
        h.remove()
    assert calls == [4]
    assert not model._forward_pre_hooks and not model.features._forward_hooks


def test_explained_rows_match_a_batch_of_their_own(service, png, decode_png):
    a, b, c = png(seed=11), png(seed=12), png(seed=13)
    mixed = service.handle_batch([{"body": a}, {"body": b}, {"body": c}], [False, True, False]).results
    alone = service.handle_batch([{"body": b}], [True]).results
    m, a1 = body_of(mixed[1]), body_of(alone[0])
    assert [p["index"] for p in m["predictions"]] == [p["index"] for p in a1["predictions"]]
    em, ea = m["explanations"][0], a1["explanations"][0]
    assert (em["target"], em["method"], em["width"]) == (ea["target"], ea["method"], ea["width"])
    assert em["score"] == pytest.approx(ea["score"], abs=1e-5)
    diff = decode_png(em["heatmap"]).astype(int) - decode_png(ea["heatmap"]).astype(int)
    assert np.abs(diff).max() <= 1  # float noise between batch sizes may move a pixel one level


@pytest.fixture(scope="module")
def bad_rows(service, png):
    good = png(seed=3)
    truncated = png(seed=4, size=(64, 64))[:200]
    rows = [
        {"body": good},
        {"body": b"hello world!"},
        {"body": b""},
        {"body": truncated},
        {"data": good, "method": "nope"},
        {"data": good, "target": 99, "explain": "true"},
        {"body": {"data": "@@@"}},
        {"data": good, "explain": "true"},
    ]
    return service.handle_batch(rows)


def test_bad_rows_do_not_harm_batch_mates(bad_rows):
    out = bad_rows.results
    assert [r.status for r in out] == [200, 400, 400, 400, 422, 422, 400, 200]
    assert "explanations" in body_of(out[7]) and "explanations" not in body_of(out[0])
    assert bad_rows.stats.error_rows == 6 and bad_rows.stats.internal_errors == 0


def test_a_bad_image_says_its_size_and_the_allowed_formats(bad_rows):
    out = bad_rows.results
    err = body_of(out[1])
    assert err["code"] == 400 and err["type"] == "InvalidImage"
    assert "12 bytes" in err["message"] and "allowed formats: JPEG, PNG" in err["message"]
    assert out[1].phrase == "Bad Request"


def test_empty_and_truncated_images_are_named(bad_rows):
    out = bad_rows.results
    assert "empty" in body_of(out[2])["message"]
    assert "truncated" in body_of(out[3])["message"] or "corrupt" in body_of(out[3])["message"]


def test_a_bad_option_is_unprocessable(bad_rows):
    assert bad_rows.results[4].phrase == "Unprocessable Entity"


def test_a_batch_of_only_bad_rows(service):
    out = service.handle_batch([{"body": b"x"}, {"nothing": 1}]).results
    assert [r.status for r in out] == [400, 400]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_limit_is_413_before_decoding(png, backend, tiny_graph):
    torch.manual_seed(0)
    svc = make_service(spec_of(max_pixels=100 * 100), backend=backend, graph=tiny_graph)
    out = svc.handle_batch([{"body": png(size=(101, 100))}, {"body": png(size=(100, 100))}]).results
    assert [r.status for r in out] == [413, 200]
    assert body_of(out[0])["type"] == "ImageTooLarge" and "10100" in body_of(out[0])["message"]
    assert out[0].phrase == "Request Entity Too Large" or out[0].phrase == "Content Too Large"


def test_exif_orientation_gives_displayed_size(service, decode_png):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: displayed 30 wide, 50 high
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    [res] = service.handle_batch([{"body": buf.getvalue()}], [True]).results
    e = body_of(res)["explanations"][0]
    assert (e["width"], e["height"]) == (30, 50)
    assert decode_png(e["heatmap"]).shape == (50, 30)


@pytest.mark.parametrize("fmt, kw", [("JPEG", {}), ("WEBP", {}), ("BMP", {}), ("GIF", {}),
                                     ("TIFF", {})])
def test_image_formats(service, fmt, kw, png):
    [res] = service.handle_batch([{"body": png(seed=5, fmt=fmt, **kw)}], [True]).results
    assert res.status == 200 and len(body_of(res)["explanations"]) == 1


@pytest.fixture(scope="module")
def every_method_service() -> CamService:
    return make_service(spec_of(methods="all", max_row_forwards=10**6, max_batch_forwards=10**6))


@pytest.mark.slow
def test_all_methods_in_one_batch(every_method_service, png, decode_png):
    """Every method, one row each, in one batch (input- and layer-resolution maps mixed): each
    row's map is its method's map alone."""
    svc = every_method_service
    data = png(seed=21)
    methods = list(svc.backend.methods)
    assert methods == available_methods(exportable=True if svc.backend.name ==
                                        "onnxruntime" else None)
    rows = [{"data": data, "method": m, "target": 2} for m in methods]
    rows.append({"data": data, "method": "gradcam", "aug_smooth": "true", "target": 2})
    out = svc.handle_batch(rows, [True] * len(rows)).results
    for m, res in zip(methods, out):
        e = body_of(res)["explanations"][0]
        assert e["method"] == m
        assert_maps_close(decode_png(e["heatmap"]), direct_heatmap(svc.backend.engine, data, 2, m))
    assert out[-1].status == 200


def test_method_options_budgets_and_allowed_methods_per_row(png):
    """Bad and over-budget method requests beside good rows in one batch: each bad row gets its
    own 4xx naming what is allowed, the others their 200."""
    svc = make_service(spec_of(methods="all", max_row_forwards=8, max_batch_forwards=40))
    data = png(seed=3)
    rows = [{"data": data, "method": "gradcam"},
            {"data": data, "method": "scorecam"},                      # 16 channels > 8
            {"data": data, "method": "scorecam", "max_channels": "4"},
            {"data": data, "method": "gradcam", "max_channels": "4"},  # not its option
            {"data": data, "method": "eigencam", "sign": "up"},        # bad value
            {"data": data, "method": "layercam", "eigen_smooth": "yes"},
            {"data": data, "method": "nope"}]
    out = svc.handle_batch(rows, [True] * len(rows)).results
    assert [r.status for r in out] == [200, 413, 200, 422, 422, 200, 422]
    msg = error_body(out[1])["message"]
    assert "WorkTooLarge" in error_body(out[1])["type"] or "work too large" in msg
    assert "scorecam costs 16 forwards" in msg and "max_channels <= 8" in msg and "gradcam" in msg
    assert "invalid option 'max_channels' for method 'gradcam'" in error_body(out[3])["message"]
    assert "invalid value for sign" in error_body(out[4])["message"]
    assert "allowed:" in error_body(out[6])["message"]


def test_cheap_methods_by_default_and_describe_lists_costs(service, png):
    [res] = service.handle_batch([{"data": png(seed=1), "method": "scorecam"}], [True]).results
    assert res.status == 422 and "not allowed for this model" in error_body(res)["message"]
    d = service.describe()
    names = [m["name"] for m in d["methods"]]
    assert "gradcam" in names and "scorecam" not in names
    grad = d["methods"][names.index("gradcam")]
    assert grad["cost"] == {"backwards": 1.0} and 0 < grad["forwards"] <= 2
    assert d["max_row_forwards"] >= 1


def test_heatmaps_at_sizes_groups_equal_sizes_without_changing_results():
    from camserve import heatmaps_at_sizes

    cams = torch.rand(5, 6, 6)
    sizes = [(40, 30), (9, 9), (40, 30), (40, 30), (12, 50)]
    out = heatmaps_at_sizes(cams, sizes)
    for c, (h, w), o in zip(cams, sizes, out):
        assert o.shape == (h, w)
        np.testing.assert_array_equal(o, to_uint8(normalize_maps(c, (h, w))).numpy())


# -- hardening: every row is its own transaction --------------------------------------------------
def error_body(res) -> dict:
    body = json.loads(res.to_json())
    assert set(body) == {"code", "type", "message"} and body["code"] == res.status
    assert "\n" not in body["message"] and len(body["message"]) < 600
    return body


def test_poison_rows_beside_good_rows(service, monkeypatch, png):
    import struct

    import camserve.serving as serving

    real_decode = serving.decode_image
    crafted = {b"DDS crafted": NotImplementedError("DDS"), b"TIFF crafted": TypeError("tiff"),
               b"EXIF crafted": struct.error("unpack requires a buffer")}

    def decode(data, **kw):  # stands in for Pillow raising odd types on crafted files
        if bytes(data) in crafted:
            raise crafted[bytes(data)]
        return real_decode(data, **kw)

    monkeypatch.setattr(serving, "decode_image", decode)
    good = png(seed=31)
    deep = b'{"data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    rows = [
        {"data": good, "target": "²", "explain": "true"},                       # 422
        {"body": good},                                                         # 200
        {"data": good, "target": "+-1", "explain": "true"},                     # 422
        {"data": good, "topk": "9" * 5000},                                     # 422
        {"data": good, "explain": "true", "target": "star"},                    # 200
        {"body": deep},                                                         # 400
        {"body": b"DDS crafted"}, {"body": b"TIFF crafted"}, {"body": b"EXIF crafted"},  # 400
        {"data": good, "method": "m" * 21_000_000},                             # 422
        {"data": good, "bad\nINFO forged": "1"},                                # 422
        {"body": {"data": base64.b64encode(good).decode(), "explain": True}},   # 200
    ]
    out = service.handle_batch(rows)
    codes = [r.status for r in out.results]
    assert codes == [422, 200, 422, 422, 200, 400, 400, 400, 400, 422, 422, 200], codes
    for i in (0, 2, 3, 5, 6, 7, 8, 9, 10):
        error_body(out.results[i])
    assert error_body(out.results[6])["type"] == "InvalidImage"
    assert "NotImplementedError" in error_body(out.results[6])["message"]
    assert "nested too deeply" in error_body(out.results[5])["message"]
    assert len(out.results[9].to_json()) < 400  # the 21 MB field is not echoed
    assert "explanations" in body_of(out.results[4]) and "explanations" in body_of(out.results[11])
    assert out.stats.error_rows == 9 and out.stats.internal_errors == 0


@pytest.fixture()
def broken_render(monkeypatch):
    """render_row raises for hirescam rows (a bug) and layercam rows (request data in the
    exception message)."""
    import camserve.serving as serving

    real = serving.render_row

    def render(image, options, *a, **kw):
        if options.method == "hirescam":
            raise ZeroDivisionError("a bug")
        if options.method == "layercam":  # request data in an exception message
            raise KeyError("forged\n2026-11-28 INFO camserve: all good" + "x" * 5000)
        return real(image, options, *a, **kw)

    monkeypatch.setattr(serving, "render_row", render)


def test_a_bug_while_rendering_one_row_is_its_500(service, broken_render, caplog, png):
    rows = [{"data": png(seed=1), "explain": "1"}, {"data": png(seed=2), "explain": "1",
                                                    "method": "hirescam"}, {"body": png(seed=3)}]
    with caplog.at_level("ERROR", logger="camserve.serving"):
        out = service.handle_batch(rows)
    assert [r.status for r in out.results] == [200, 500, 200]
    err = error_body(out.results[1])
    assert err["type"] == "InternalError" and out.results[1].phrase == "Internal Server Error"
    error_id = err["message"].split("(id ")[1].split(")")[0]
    assert len(error_id) == 8
    logged = [r.getMessage() for r in caplog.records if error_id in r.getMessage()]
    assert logged and "ZeroDivisionError: 'a bug'" in logged[0] and "render" in logged[0]
    assert out.stats.internal_errors == 1 and out.stats.error_rows == 1


def test_a_logged_internal_error_cannot_forge_log_lines(service, broken_render, caplog, png):
    with caplog.at_level("ERROR", logger="camserve.serving"):
        out = service.handle_batch([{"data": png(seed=1), "explain": "1", "method": "layercam"}])
    assert out.results[0].status == 500
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "forged" in text and "\n2026-11-28 INFO" not in text and len(text) < 5000


class PoisonNet(TinyNet):
    """Fails a batch that holds an all-white image; fine otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.flatten(1).amin(1) > 1.9).any()):  # white after (x - 0.5) / 0.25
            raise RuntimeError("poisoned batch")
        return super().forward(x)


class PoisonSession:
    """An onnxruntime session that fails a run holding an all-white image, like PoisonNet."""

    def __init__(self, session) -> None:
        self.session = session

    def run(self, fetch, feed):
        if bool((feed["input"].reshape(len(feed["input"]), -1).min(1) > 1.9).any()):
            raise RuntimeError("poisoned batch")
        return self.session.run(fetch, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_batched_pass_is_retried_row_by_row(png, backend, tiny_graph):
    if backend == "torch":
        svc = make_service(model=PoisonNet(len(LABELS), seed=0))
    else:
        svc = make_service(backend=backend, graph=tiny_graph)
        svc.backend.cam_session = PoisonSession(svc.backend.cam_session)
        svc.backend.forward_session = PoisonSession(svc.backend.forward_session)
    white = png(color=(255, 255, 255))
    rows = [{"data": png(seed=1), "explain": "1"}, {"body": white}, {"body": png(seed=2)},
            {"data": white, "explain": "1"}, {"data": png(seed=4), "explain": "1", "target": "2,3"}]
    out = svc.handle_batch(rows)
    assert [r.status for r in out.results] == [200, 500, 200, 500, 200]
    assert out.stats.failed_batches == 1 and out.stats.internal_errors == 2
    alone = svc.handle_batch([{"data": png(seed=4), "explain": "1", "target": "2,3"}]).results[0]
    a, b = body_of(out.results[4]), body_of(alone)
    assert [e["target"] for e in a["explanations"]] == [e["target"] for e in b["explanations"]] == [2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_answer_over_the_response_limit_is_413_naming_what_to_drop(png, backend, tiny_graph):
    svc = make_service(limits=ServingLimits(max_response_size=60_000), backend=backend,
                       graph=tiny_graph)
    big = png(seed=7, size=(200, 150))
    rows = [{"data": big, "explain": "1", "outputs": "overlay,heatmap,raw", "target": "0,1,2"},
            {"data": big, "explain": "1", "outputs": "bbox"}, {"body": big}]
    out = svc.handle_batch(rows)
    assert [r.status for r in out.results] == [413, 200, 200]
    err = error_body(out.results[0])
    assert err["type"] == "ResponseTooLarge" and "60000" in err["message"]
    for word in ("overlay", "raw", "heatmap", "targets"):
        assert word in err["message"]
    assert all(len(r.to_json()) <= 60_000 for r in out.results)
    assert svc.describe()["max_response_size"] == 60_000


def test_force_explain_needs_one_flag_per_row(service, png):
    with pytest.raises(ValueError, match="force_explain"):
        service.handle_batch([{"body": png()}], [True, False])


def tiny_folder_with(model_folder, **handler_keys):
    """A TinyBNNet model folder (target ``features.3``) with ``handler_keys`` added to its block."""
    import yaml

    folder = model_folder()
    cfg = yaml.safe_load((folder / "model-config.yaml").read_text())
    cfg["handler"].update(handler_keys)
    (folder / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def test_from_model_dir_reads_the_serving_limits(model_folder, monkeypatch):
    folder = tiny_folder_with(model_folder)
    monkeypatch.delenv("TS_MAX_RESPONSE_SIZE", raising=False)
    svc = CamService.from_model_dir(folder)
    assert svc.limits == ServingLimits() and svc.layer == "features.3"
    svc = CamService.from_model_dir(folder, overrides={"max_response_size": 1234})
    assert svc.limits.max_response_size == 1234 and svc.spec.max_response_size == 1234



# -- work budget ------------------------------------------------------------------------------------
def gif(size: tuple[int, int]) -> bytes:
    """A one-colour GIF: a few hundred bytes whatever the size it declares."""
    buf = io.BytesIO()
    Image.new("P", size, 1).save(buf, "GIF")
    return buf.getvalue()


ALL_OUTPUTS = "heatmap,overlay,raw,bbox"


def test_work_over_the_row_budget_is_413_before_decoding(service, monkeypatch, png):
    data = gif((6000, 6000))
    assert len(data) < 30_000
    rows = [{"data": data, "explain": "1", "outputs": ALL_OUTPUTS, "target": list(range(6)) * 2},
            {"data": png(), "explain": "1"}]
    decoded = []  # the sizes of the images whose pixels are decoded from here on
    real = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im.size) or real(im))
    out = service.handle_batch(rows)
    assert [r.status for r in out.results] == [413, 200]
    err = error_body(out.results[0])
    assert err["type"] == "WorkTooLarge" and "handler.max_row_work" in err["message"]
    assert "fewer targets" in err["message"] and "12 targets x (heatmap + 3 x overlay + bbox)" in err["message"]
    assert (6000, 6000) not in decoded and decoded  # the 36 MP GIF was never decoded


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_image_is_explained_at_the_capped_side_and_says_so(png, decode_png, backend,
                                                                  tiny_graph):
    svc = make_service(limits=ServingLimits(max_map_side=256, max_row_work=1), backend=backend,
                       graph=tiny_graph)
    data = png(size=(1200, 600), color=(20, 200, 20))
    rows = [{"data": data, "explain": "1", "outputs": ALL_OUTPUTS, "target": "0,1"},
            {"data": data, "explain": "1", "outputs": "heatmap,bbox"}]  # 0.72 + 0.03 MP: full
    out = svc.handle_batch(rows)
    assert [r.status for r in out.results] == [200, 200]
    scaled = body_of(out.results[0])["explanations"]
    for e in scaled:
        assert (e["width"], e["height"]) == (1200, 600)
        assert (e["scaled"], e["map_width"], e["map_height"]) == (True, 256, 128)
        assert decode_png(e["heatmap"]).shape == (128, 256)
        assert decode_png(e["overlay"]).shape == (128, 256, 3)
        x0, y0, x1, y1 = e["bbox"]
        assert 0 <= x0 < x1 <= 1200 and 0 <= y0 < y1 <= 600
    full = body_of(out.results[1])["explanations"][0]
    assert "scaled" not in full and "map_width" not in full
    assert decode_png(full["heatmap"]).shape == (600, 1200)
    small = body_of(svc.handle_batch([{"data": png(), "explain": "1",
                                       "outputs": ALL_OUTPUTS}]).results[0])
    assert set(small["explanations"][0]) == {"target", "label", "score", "method", "layer",
                                             "width", "height", "bbox", "heatmap", "overlay",
                                             "raw"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_budget_scales_then_refuses_later_rows(png, backend, tiny_graph):
    svc = make_service(limits=ServingLimits(max_map_side=500, max_row_work=1, max_batch_work=2),
                       backend=backend, graph=tiny_graph)
    data = png(size=(1200, 600), color=(20, 20, 200))
    row = {"data": data, "explain": "1", "outputs": "heatmap,bbox"}  # full .845, capped .25 MP
    out = svc.handle_batch([dict(row) for _ in range(5)] + [{"body": data}])
    codes = [r.status for r in out.results]
    assert codes == [200, 200, 200, 413, 413, 200], codes  # .845 + .845 + .25 (scaled)
    scaled = [body_of(r)["explanations"][0].get("scaled", False) for r in out.results[:3]]
    assert scaled == [False, False, True]
    err = error_body(out.results[3])
    assert err["type"] == "WorkTooLarge" and "handler.max_batch_work" in err["message"]
    assert "send it again" in err["message"]
    alone = svc.handle_batch([row]).results[0]  # the same request alone fits
    assert alone.status == 200 and "scaled" not in body_of(alone)["explanations"][0]


@pytest.fixture()
def budget_folder(model_folder):
    return tiny_folder_with(model_folder, max_map_side=1024, max_row_work=64)


def test_budget_keys_are_read_from_the_handler_block(budget_folder):
    svc = CamService.from_model_dir(budget_folder)
    assert (svc.limits.max_map_side, svc.limits.max_row_work, svc.limits.max_batch_work) == \
        (1024, 64, 512)
    d = svc.describe()
    assert (d["max_map_side"], d["max_row_work"], d["max_batch_work"]) == (1024, 64, 512)


@pytest.mark.parametrize("over, needle", [
    ({"max_batch_work": 32}, "handler.max_batch_work"),
    ({"max_map_side": 0}, "handler.max_map_side"),
    ({"max_row_wrok": 3}, "did you mean 'max_row_work'"),
])
def test_bad_budget_keys_are_refused(budget_folder, over, needle):
    from camserve.models import ConfigError

    with pytest.raises(ConfigError, match=needle):
        CamService.from_model_dir(budget_folder, overrides=over)


poison_rows = st.one_of(
    st.binary(max_size=64).map(lambda b: {"body": b}),
    st.text(max_size=64).map(lambda t: {"body": t}),
    st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=30), st.binary(max_size=30),
                                                   st.integers()), max_size=4),
    st.sampled_from([{"body": b'{"data": ' + b"[" * 30_000 + b"}"}, {"data": b"\x89PNG\r\n\x1a\n"},
                     {"body": {"instances": "x"}}, {"body": {"inputs": [{"data": [1, 2]}]}}]),
    st.fixed_dictionaries({"data": st.just(b"GOOD"), "target": st.text(max_size=20),
                           "topk": st.text(max_size=8), "method": st.text(max_size=8)}),
)


def _good_rows_stay_200(service, good, layout, forced) -> None:
    rows = [{"body": good} if r is None else
            ({**r, "data": good} if r.get("data") == b"GOOD" else r) for r in layout]
    out = service.handle_batch(rows, forced[:len(rows)])
    assert len(out.results) == len(rows)
    for r, res in zip(layout, out.results):
        if r is None:
            assert res.status == 200 and "predictions" in body_of(res)
        elif res.status != 200:
            assert 400 <= res.status < 500, res.to_json()[:300]
            error_body(res)


PROPERTY_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.function_scoped_fixture])
POISON_LAYOUTS = (st.lists(st.one_of(st.just(None), poison_rows), min_size=1, max_size=6),
                  st.lists(st.booleans(), min_size=6, max_size=6))


@settings(max_examples=8, **PROPERTY_SETTINGS)
@given(*POISON_LAYOUTS)
def test_property_good_rows_stay_200_beside_any_poison(service, png, layout, forced):
    _good_rows_stay_200(service, png(seed=40), layout, forced)


@pytest.mark.slow
@settings(max_examples=25, **PROPERTY_SETTINGS)
@given(*POISON_LAYOUTS)
def test_property_good_rows_stay_200_beside_any_poison_many(service, png, layout, forced):
    _good_rows_stay_200(service, png(seed=40), layout, forced)


@pytest.mark.slow
@pytest.mark.parametrize("case", [0, 2])
def test_worst_allowed_requests_in_a_fresh_process_within_memory_and_time(case):
    """bench/worst_request.py's cases (36 MP x 8 targets x all outputs, scaled; 40 MP x 1 target x
    all outputs, full size) in a fresh process on models/shapes: under 1.5 GB above idle, 30 s."""
    from bench import worst_request

    name, size, kind, targets, outputs, rows = worst_request.CASES[case][:6]
    r = worst_request.run_case(size, kind, targets, outputs, rows)
    assert r["statuses"] == [200], r
    assert r["peak_above_idle_mb"] < 1536 and r["wall_s"] < 30, r
    assert r["scaled"] == (case == 0), r


def test_rows_render_on_the_workers_threads_with_the_same_answers(png, broken_render):
    """threads=3: explain rows render side by side; answers, order and each row's own 500 are
    those of the one-thread service."""
    import threading

    seen = set()
    real = Image.Image.save

    def save(im, *a, **kw):  # the PNG encoder runs on the render threads
        seen.add(threading.current_thread().name.split("_")[0])
        return real(im, *a, **kw)

    rows = [{"data": png(seed=i, size=(40 + 4 * i, 36)), "explain": "1",
             "method": "hirescam" if i == 2 else "gradcam", "target": str(i % 6)}
            for i in range(6)] + [{"body": png(seed=9)}]
    one = make_service().handle_batch(rows)
    Image.Image.save = save
    try:
        three = CamService(tiny_loaded(), threads=3).handle_batch(rows)
    finally:
        Image.Image.save = real
    assert [r.status for r in three.results] == [r.status for r in one.results] == \
        [200, 200, 500, 200, 200, 200, 200]
    ok = [i for i, r in enumerate(one.results) if r.status == 200]
    assert [three.results[i].text for i in ok] == [one.results[i].text for i in ok]
    assert "camserve-render" in seen
