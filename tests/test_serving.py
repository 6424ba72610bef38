"""camserve.serving: request parsing, option validation, and the batched explain path.

No TorchServe here: rows are given as TorchServe presents them (``{"body": ...}``, form fields,
parsed JSON) and the service is built around a small random ShapesNet-like CNN.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camserve import CamEngine
from camserve.engine import normalize_maps, to_uint8
from camserve.methods import available_methods
from camserve.models import ModelSpec
from camserve.serving import (MAX_TARGETS, CamService, OptionError, RequestError, extract_request,
                              parse_options)

LABELS = ["circle", "square", "triangle", "star", "cross", "ring"]


class TinyNet(nn.Module):
    """conv -> conv (the target, 8×8 for a 32×32 input) -> pool -> fc."""

    def __init__(self, num_classes: int = len(LABELS)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.features(x))).flatten(1))


def png(color=(200, 30, 30), size=(48, 40), fmt: str = "PNG", seed: int | None = None, **kw) -> bytes:
    if seed is not None:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB")
    else:
        img = Image.new("RGB", size, color)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def spec_of(**over) -> ModelSpec:
    cfg = {"arch": "x:TinyNet", "num_classes": len(LABELS), "target_layer": "features",
           "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "topk": 3}
    cfg.update(over)
    return ModelSpec.from_config(cfg)


@pytest.fixture(scope="module")
def service() -> CamService:
    torch.manual_seed(0)
    model = TinyNet().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return CamService(model, spec_of(), labels=LABELS)


def body_of(res) -> dict:
    return json.loads(res.to_json())


# -- request parsing --------------------------------------------------------------------------------
def test_raw_body_is_the_image():
    data = png()
    req = extract_request({"body": data})
    assert req.data == data and req.options == {}
    assert extract_request(bytearray(data)).data == data


def test_multipart_fields_are_options():
    data = png()
    req = extract_request({"data": data, "explain": "true", "target": b"2"})
    assert req.data == data
    assert req.options == {"explain": "true", "target": b"2"}


def test_json_body_with_base64():
    data = png()
    doc = {"data": base64.b64encode(data).decode(), "explain": True, "topk": 2}
    req = extract_request({"body": doc})
    assert req.data == data and req.options == {"explain": True, "topk": 2}
    # JSON that TorchServe did not parse (TS_DECODE_INPUT_REQUEST=false) or sent as text
    assert extract_request({"body": json.dumps(doc).encode()}).options["topk"] == 2
    assert extract_request({"body": json.dumps(doc)}).data == data


def test_base64_variants():
    data = png()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert extract_request({"body": {"data": url}}).data == data
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert extract_request({"body": {"data": urlsafe}}).data == data
    wrapped = "\n".join(base64.b64encode(data).decode()[i:i + 60] for i in range(0, 400, 60))
    assert extract_request({"body": {"data": wrapped}}).data == data[:300]


@pytest.mark.parametrize("doc, code, needle", [
    ({"data": "###not base64###"}, 400, "not valid base64"),
    ({"data": ""}, 400, "empty"),
    ({"data": 12}, 400, "expected a base64 string"),
    ({"image": "abcd"}, 400, "missing field 'data'"),
    ({"instances": [{"data": "aGk="}, {"data": "aGk="}]}, 400, "exactly one instance"),
])
def test_bad_json_requests(doc, code, needle):
    with pytest.raises(RequestError) as ei:
        extract_request({"body": doc})
    assert ei.value.code == code and needle in ei.value.message
    body = ei.value.to_body()
    assert set(body) == {"code", "type", "message"} and body["code"] == code


def test_invalid_json_text_and_lists():
    with pytest.raises(RequestError, match="invalid JSON body"):
        extract_request({"body": b'{"data": '})
    with pytest.raises(RequestError, match="got a list"):
        extract_request({"body": [1, 2]})
    with pytest.raises(RequestError, match="missing image") as ei:
        extract_request({"explain": "true"})
    assert ei.value.code == 400


def test_kserve_v1_and_v2_bodies():
    data = png()
    b = base64.b64encode(data).decode()
    v1 = extract_request({"body": {"instances": [{"data": b, "target": 1}]}})
    assert v1.data == data and v1.options == {"target": 1}
    assert extract_request({"body": {"instances": [{"b64": b}]}}).data == data
    v2 = extract_request({"body": {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                               "data": [b]}], "parameters": {"method": "hirescam"}}})
    assert v2.data == data and v2.options == {"method": "hirescam"}


# -- option validation ------------------------------------------------------------------------------
def test_defaults_come_from_the_spec():
    spec = spec_of(method="layercam", topk=10, outputs=["overlay"])
    o = parse_options({}, spec, LABELS)
    assert (o.explain, o.targets, o.topk, o.method, o.outputs) == (False, None, len(LABELS),
                                                                   "layercam", ("overlay",))


@pytest.mark.parametrize("header, option, expected", [
    ("True", None, True), ("True", "false", True), ("False", None, False), (None, None, False),
    ("False", "true", True), (None, "1", True), (None, "yes", True), (None, True, True),
    (None, "no", False), (None, 0, False), (None, b"TRUE", True),
])
def test_explain_from_header_or_option(header, option, expected):
    opts = {} if option is None else {"explain": option}
    assert parse_options(opts, spec_of(), LABELS, header).explain is expected


@pytest.mark.parametrize("value, expected", [
    (2, (2,)), ("2", (2,)), ("triangle", (2,)), ("Triangle", (2,)), (["star", 0], (3, 0)),
    ("square, 5", (1, 5)), ("[1, \"ring\"]", (1, 5)), (None, None), ("", None),
])
def test_target_forms(value, expected):
    assert parse_options({"target": value}, spec_of(), LABELS).targets == expected


@pytest.mark.parametrize("opts, needle", [
    ({"target": 6}, "out of range (allowed: 0..5)"),
    ({"target": -1}, "out of range"),
    ({"target": "hexagon"}, "unknown label 'hexagon' (known: circle, square"),
    ({"target": []}, "empty list"),
    ({"target": 1.5}, "a class index"),
    ({"target": list(range(MAX_TARGETS + 1))}, f"at most {MAX_TARGETS}"),
    ({"topk": 0}, "topk: 0 (allowed: 1..6)"),
    ({"topk": 7}, "allowed: 1..6"),
    ({"topk": "three"}, "an integer"),
    ({"topk": True}, "an integer"),
    ({"method": "gradcam9"}, "allowed: " + ", ".join(available_methods())),
    ({"outputs": "heatmap,png"}, "allowed: heatmap, overlay, raw, bbox"),
    ({"outputs": ""}, "empty"),
    ({"explain": "maybe"}, "allowed: true, false"),
    ({"traget": 1}, "unknown option 'traget' (allowed: explain, target, topk, method, outputs"),
])
def test_bad_options_are_422(opts, needle):
    with pytest.raises(OptionError) as ei:
        parse_options(opts, spec_of(), LABELS)
    assert ei.value.code == 422 and ei.value.type == "InvalidOption"
    assert needle in ei.value.message


def test_method_and_outputs_are_normalised():
    o = parse_options({"method": "GradCAM++", "outputs": "RAW, bbox,raw"}, spec_of(), LABELS)
    assert o.method == "gradcam++" and o.outputs == ("raw", "bbox")
    assert parse_options({"outputs": '["overlay"]'}, spec_of(), LABELS).outputs == ("overlay",)


# -- the engine's rows= and callable targets (used by the service) ---------------------------------
def test_engine_rows_match_a_sub_batch():
    torch.manual_seed(1)
    model = TinyNet().eval()
    eng = CamEngine(model, "features")
    x = torch.randn(5, 3, 32, 32)
    sub = eng(x[[1, 4]], targets=torch.tensor([[2, 3], [0, 5]]), method="gradcam++")
    full = eng(x, targets=torch.tensor([[2, 3], [0, 5]]), method="gradcam++", rows=[1, 4])
    assert full.logits.shape == (5, len(LABELS)) and full.cams.shape == sub.cams.shape
    torch.testing.assert_close(full.cams, sub.cams, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full.gradients, sub.gradients, rtol=1e-4, atol=1e-7)
    top = eng(x, targets=lambda logits: logits.argmax(1), rows=[3])
    assert top.targets.tolist() == [int(full.logits[3].argmax())]
    with pytest.raises(ValueError, match="rows"):
        eng(x, rows=[5])
    with pytest.raises(ValueError, match="rows"):
        eng(x, rows=[])
    assert not model.features._forward_hooks


# -- the service --------------------------------------------------------------------------------------
def direct_heatmap(svc: CamService, data: bytes, target: int, method: str) -> np.ndarray:
    from camserve.images import decode_image, preprocess
    img = decode_image(data)
    x = preprocess(img, svc.spec.input_size, svc.spec.mean, svc.spec.std)[None]
    res = svc.engine(x, targets=[target], method=method)
    return to_uint8(normalize_maps(res.cams[0], (img.height, img.width))).numpy()


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def assert_maps_close(a: np.ndarray, b: np.ndarray) -> None:
    """uint8 maps equal up to one level (float noise between batch sizes)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_mixed_batch_per_row_explain_targets_methods(service):
    imgs = [png(seed=i, size=(48 + 8 * i, 40)) for i in range(5)]
    rows = [
        {"body": imgs[0]},                                                    # predict only
        {"data": imgs[1], "explain": "true", "target": "star", "method": "layercam"},
        {"body": {"data": base64.b64encode(imgs[2]).decode(), "target": [1, 4],
                  "outputs": "heatmap,raw,bbox,overlay"}},                    # explain via header
        {"data": imgs[3], "topk": "2"},                                       # predict only
        {"body": imgs[4]},                                                    # explain via header
    ]
    headers = ["False", "False", "True", None, "True"]
    out = service.handle_batch(rows, headers)
    assert [r.status for r in out] == [200] * 5
    bodies = [body_of(r) for r in out]
    assert [("explanations" in b) for b in bodies] == [False, True, True, False, True]
    assert len(bodies[3]["predictions"]) == 2 and len(bodies[0]["predictions"]) == 3

    # predictions equal the model's own softmax, row by row
    from camserve.images import decode_image, preprocess
    for data, b in zip(imgs, bodies):
        x = preprocess(decode_image(data), (32, 32), (0.5,) * 3, (0.25,) * 3)[None]
        probs = torch.softmax(service.engine.predict(x), 1)[0]
        top = torch.topk(probs, len(b["predictions"]))
        assert [p["index"] for p in b["predictions"]] == top.indices.tolist()
        assert [p["score"] for p in b["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert [p["label"] for p in b["predictions"]] == [LABELS[i] for i in top.indices.tolist()]

    e1 = bodies[1]["explanations"]
    assert [(e["target"], e["label"], e["method"]) for e in e1] == [(3, "star", "layercam")]
    assert set(e1[0]) == {"target", "label", "score", "method", "layer", "width", "height",
                          "heatmap", "bbox"}
    assert_maps_close(decode_png(e1[0]["heatmap"]),
                                  direct_heatmap(service, imgs[1], 3, "layercam"))
    e2 = bodies[2]["explanations"]
    assert [(e["target"], e["method"]) for e in e2] == [(1, "gradcam"), (4, "gradcam")]
    for e in e2:
        assert set(e) >= {"heatmap", "overlay", "raw", "bbox"}
        assert e["raw"]["shape"] == [8, 8] and np.asarray(e["raw"]["data"]).shape == (8, 8)
        assert_maps_close(decode_png(e["heatmap"]),
                                      direct_heatmap(service, imgs[2], e["target"], "gradcam"))
        assert Image.open(io.BytesIO(base64.b64decode(e["overlay"]))).size == (64, 40)
    e4 = bodies[4]["explanations"]
    top1 = bodies[4]["predictions"][0]
    assert [e["target"] for e in e4] == [top1["index"]]
    assert e4[0]["score"] == pytest.approx(top1["score"])
    assert (e4[0]["width"], e4[0]["height"]) == (80, 40) and e4[0]["layer"] == "features"
    assert decode_png(e4[0]["heatmap"]).shape == (40, 80)
    assert service.last_stats.explained_rows == 3 and service.last_stats.maps == 4


def test_one_forward_per_batch(service):
    calls = []
    h = service.model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        rows = [{"body": png(seed=i)} for i in range(4)]
        service.handle_batch(rows, ["True", None, "False", "True"])
        assert calls == [4]
        calls.clear()
        service.handle_batch(rows, [None] * 4)  # predict-only batch
        assert calls == [4]
        calls.clear()
        rows[1] = {"data": png(seed=9), "explain": "1", "target": [0, 1, 2]}
        service.handle_batch(rows, ["True", None, None, "True"])  # K = 3 and K = 1 together
        assert calls == [4]
    finally:
        h.remove()
    assert not service.model._forward_pre_hooks and not service.model.features._forward_hooks


def test_explained_rows_match_a_batch_of_their_own(service):
    a, b, c = png(seed=11), png(seed=12), png(seed=13)
    mixed = service.handle_batch([{"body": a}, {"body": b}, {"body": c}], ["False", "True", "False"])
    alone = service.handle_batch([{"body": b}], ["True"])
    m, a1 = body_of(mixed[1]), body_of(alone[0])
    assert [p["index"] for p in m["predictions"]] == [p["index"] for p in a1["predictions"]]
    em, ea = m["explanations"][0], a1["explanations"][0]
    assert (em["target"], em["method"], em["width"]) == (ea["target"], ea["method"], ea["width"])
    assert em["score"] == pytest.approx(ea["score"], abs=1e-5)
    diff = decode_png(em["heatmap"]).astype(int) - decode_png(ea["heatmap"]).astype(int)
    assert np.abs(diff).max() <= 1  # float noise between batch sizes may move a pixel one level


def test_bad_rows_do_not_harm_batch_mates(service):
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
    out = service.handle_batch(rows, [None] * len(rows))
    assert [r.status for r in out] == [200, 400, 400, 400, 422, 422, 400, 200]
    err = body_of(out[1])
    assert err == {"code": 400, "type": "InvalidImage",
                   "message": "not an image: cannot identify image data (12 bytes)"}
    assert "empty" in body_of(out[2])["message"]
    assert "truncated" in body_of(out[3])["message"] or "corrupt" in body_of(out[3])["message"]
    assert out[4].phrase == "Unprocessable Entity" and out[1].phrase == "Bad Request"
    assert "explanations" in body_of(out[7]) and "explanations" not in body_of(out[0])
    assert service.last_stats.error_rows == 6
    # a batch of only bad rows
    assert [r.status for r in service.handle_batch([{"body": b"x"}, {"nothing": 1}])] == [400, 400]


def test_pixel_limit_is_413_before_decoding():
    torch.manual_seed(0)
    svc = CamService(TinyNet().eval(), spec_of(max_pixels=100 * 100), labels=LABELS)
    out = svc.handle_batch([{"body": png(size=(101, 100))}, {"body": png(size=(100, 100))}])
    assert [r.status for r in out] == [413, 200]
    assert body_of(out[0])["type"] == "ImageTooLarge" and "10100" in body_of(out[0])["message"]
    assert out[0].phrase == "Request Entity Too Large" or out[0].phrase == "Content Too Large"


def test_exif_orientation_gives_displayed_size(service):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: displayed 30 wide, 50 high
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    [res] = service.handle_batch([{"body": buf.getvalue()}], ["True"])
    e = body_of(res)["explanations"][0]
    assert (e["width"], e["height"]) == (30, 50)
    assert decode_png(e["heatmap"]).shape == (50, 30)


@pytest.mark.parametrize("fmt, kw", [("JPEG", {}), ("WEBP", {}), ("BMP", {}), ("GIF", {}),
                                     ("TIFF", {})])
def test_image_formats(service, fmt, kw):
    [res] = service.handle_batch([{"body": png(seed=5, fmt=fmt, **kw)}], ["True"])
    assert res.status == 200 and len(body_of(res)["explanations"]) == 1


def test_all_methods_in_one_batch(service):
    data = png(seed=21)
    methods = available_methods()
    rows = [{"data": data, "method": m, "target": 2} for m in methods]
    out = service.handle_batch(rows, ["True"] * len(rows))
    for m, res in zip(methods, out):
        e = body_of(res)["explanations"][0]
        assert e["method"] == m
        assert_maps_close(decode_png(e["heatmap"]), direct_heatmap(service, data, 2, m))


def test_heatmaps_at_sizes_groups_equal_sizes_without_changing_results():
    from camserve import heatmaps_at_sizes

    cams = torch.rand(5, 6, 6)
    sizes = [(40, 30), (9, 9), (40, 30), (40, 30), (12, 50)]
    out = heatmaps_at_sizes(cams, sizes)
    for c, (h, w), o in zip(cams, sizes, out):
        assert o.shape == (h, w)
        np.testing.assert_array_equal(o, to_uint8(normalize_maps(c, (h, w))).numpy())
