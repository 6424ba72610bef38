"""End to end: a real ``torchserve --start`` serving models/shapes through the camserve handler.

One server for the module, on free loopback ports, with token authorization on, started from a
temporary directory (its key_file.json, logs, pid file and worker sockets stay there: TMPDIR, TEMP,
LOG_LOCATION and METRICS_LOCATION point into it), and stopped at the end (``torchserve --stop``,
then a kill of its process group if it is still alive). Skipped only when Java is missing.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from camserve.backends import GRAPH_FILE
from camserve.client import ClientError
from camserve.testing.equality import compare_answers
from camserve.testing.torchserve import LocalTorchServe, archive
from camserve.serving import CamService
from scripts.archive import build_archive

BATCH_LOG = "camserve: batch of"
POISON_MODEL = "shapes_poison"
POISON_BATCH = 8
ORT = "_ort"  # the same models on the onnxruntime backend: shapes_ort, shapes_poison_ort
TOLERANCE = 3  # px around a ground-truth box that still counts as inside (camserve.shapes)

pytestmark = pytest.mark.torchserve


@dataclass
class Server:
    url: str
    management: str
    metrics: str
    token: str
    management_token: str
    home: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def post(self, route: str, **kw: Any) -> requests.Response:
        headers = {**self.headers(), **kw.pop("headers", {})}
        return requests.post(f"{self.url}/{route}", headers=headers, timeout=120, **kw)

    def log_lines(self, needle: str) -> list[str]:
        """Lines of the worker log (model_log.log) that contain ``needle``."""
        text = (self.home / "logs" / "model_log.log").read_text(errors="replace")
        return [ln for ln in text.splitlines() if needle in ln]

    def settled(self, needle: str = BATCH_LOG, quiet: float = 0.5, timeout: float = 10.0) -> int:
        """How many log lines hold ``needle`` once the count has not moved for ``quiet`` seconds
        (the log of earlier requests may lag behind their answers)."""
        deadline = time.monotonic() + timeout
        count = len(self.log_lines(needle))
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = len(self.log_lines(needle))
            if now == count:
                break
            count = now
        return count

    def batch_sizes(self, start: int, rows: int, timeout: float = 20.0) -> list[int]:
        """Sizes of the batches logged after the first ``start`` ones, polled until they cover
        ``rows`` rows (the worker logs each batch before answering; the log file may lag)."""
        deadline = time.monotonic() + timeout
        while True:
            sizes = [int(m.group(1)) for ln in self.log_lines(BATCH_LOG)[start:]
                     if (m := re.search(r"batch of (\d+) rows", ln))]
            if sum(sizes) >= rows or time.monotonic() > deadline:
                return sizes
            time.sleep(0.05)


@pytest.fixture(scope="module")
def model_dir(shapes_dir) -> Path:
    """The served model folder: models/shapes, or ``CAMSERVE_E2E_model_dir``."""
    return Path(os.environ.get("CAMSERVE_E2E_model_dir", shapes_dir))


@pytest.fixture(scope="module")
def samples(model_dir) -> Path:
    return model_dir / "samples"


@pytest.fixture(scope="module")
def sample_bytes(samples):
    """``sample_bytes(name)``: the bytes of one committed sample image."""
    return lambda name: (samples / name).read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir, handler_file, start_torchserve) -> Iterator[Server]:
    missing = [str(model_dir / f) for f in ("weights.pt", "index_to_name.json", "model.py",
                                            "model-config.yaml", "samples/boxes.json")
               if not (model_dir / f).is_file()]
    if missing:
        pytest.fail(f"the default model is incomplete: missing {', '.join(missing)} (make train, "
                    f"make samples)")
    home = tmp_path_factory.mktemp("torchserve")
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    config.update(batchSize=8, maxBatchDelay=100)  # let 16 concurrent requests form batches
    archive(home / "store", "shapes", str(handler_file),
            model_dir / "weights.pt", config, model_dir / "model.py",
            [model_dir / "index_to_name.json"])
    # the same model with a long batch delay: POISON_BATCH concurrent requests share one batch
    config.update(batchSize=POISON_BATCH, maxBatchDelay=5000)
    archive(home / "store", POISON_MODEL, str(handler_file),
            model_dir / "weights.pt", config, model_dir / "model.py",
            [model_dir / "index_to_name.json"])
    # both again on the onnxruntime backend, archived as `make archive BACKEND=onnxruntime` does:
    # the graph exported from a copy of the folder, no model code in the archive
    src = home / "ort_src"
    shutil.copytree(model_dir, src, ignore=shutil.ignore_patterns("samples", GRAPH_FILE))
    for name, batch, delay in (("shapes" + ORT, 8, 100), (POISON_MODEL + ORT, POISON_BATCH, 5000)):
        cfg = yaml.safe_load((model_dir / "model-config.yaml").read_text())
        cfg.update(batchSize=batch, maxBatchDelay=delay)
        (src / "model-config.yaml").write_text(yaml.safe_dump(cfg))
        build_archive(src, name, home / "store", handler=handler_file, backend="onnxruntime")
    ts = LocalTorchServe(home, ["shapes", POISON_MODEL, "shapes" + ORT, POISON_MODEL + ORT],
                         ready_timeout=300,
                         properties={"max_request_size": 20971520, "max_response_size": 52428800,
                                     "model_metrics_auto_detect": "true"})
    with start_torchserve(ts):
        yield Server(url=ts.url, management=ts.management, metrics=ts.metrics, token=ts.token,
                     management_token=ts.management_token, home=home)


@pytest.fixture(params=["shapes", "shapes" + ORT])
def model(request) -> str:
    """The shapes model on each backend."""
    return request.param


@pytest.fixture(params=[POISON_MODEL, POISON_MODEL + ORT])
def poison_model(request) -> str:
    """The long-batch-delay shapes model on each backend."""
    return request.param


@pytest.fixture(scope="module")
def boxes(samples) -> dict[str, dict]:
    return json.loads((samples / "boxes.json").read_text())


@pytest.fixture(scope="module")
def local(model_dir) -> CamService:
    """The same model, in this process: the reference the server's answers must match."""
    return CamService.from_model_dir(model_dir)


def local_answer(local: CamService, data: bytes, explain: bool = True, **opts: Any) -> dict:
    [res] = local.handle_batch([{"data": data, **opts}], [explain]).results
    return res.body


def assert_same_predictions(a: dict, b: dict) -> None:
    assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
    assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
    assert [p["score"] for p in a["predictions"]] == pytest.approx(
        [p["score"] for p in b["predictions"]], abs=1e-4)


def test_predictions_match_the_engine(server, model, boxes, local, sample_bytes):
    for name in sorted(boxes):
        data = sample_bytes(name)
        r = server.post(f"predictions/{model}", data=data)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert "explanations" not in body
        assert_same_predictions(body, local_answer(local, data, explain=False))


def test_explanations_point_into_the_true_boxes(server, model, boxes, local, decode_png,
                                                 sample_bytes):
    inside = 0
    for name, info in sorted(boxes.items()):
        data = sample_bytes(name)
        r = server.post(f"explanations/{model}", data=data)
        assert r.status_code == 200, r.text
        body = r.json()
        [e] = body["explanations"]
        ref = local_answer(local, data)
        assert_same_predictions(body, ref)
        assert e["target"] == body["predictions"][0]["index"]
        assert set(e) == {"target", "label", "score", "method", "layer", "width", "height",
                          "heatmap", "bbox"}  # the config's default outputs: heatmap, bbox
        hm = decode_png(e["heatmap"])
        img = Image.open(io.BytesIO(data))
        assert hm.shape == (img.height, img.width) == (e["height"], e["width"])
        assert np.abs(hm.astype(int) - decode_png(ref["explanations"][0]["heatmap"]).astype(int)).max() <= 1
        y, x = np.unravel_index(int(hm.argmax()), hm.shape)
        x0, y0, x1, y1 = info["box"]
        if body["predictions"][0]["label"] == info["label"]:
            inside += (x0 - TOLERANCE <= x < x1 + TOLERANCE) and (y0 - TOLERANCE <= y < y1 + TOLERANCE)
        else:
            pytest.fail(f"{name}: predicted {body['predictions'][0]['label']}, true {info['label']}")
    assert inside == len(boxes), f"heatmap peak inside the true box for {inside}/{len(boxes)} samples"


def test_json_and_multipart_explain_on_predictions(server, model, boxes, local, decode_png,
                                                   sample_bytes):
    name, info = sorted(boxes.items())[0]
    data = sample_bytes(name)
    doc = {"data": base64.b64encode(data).decode(), "explain": True, "target": info["label"],
           "method": "gradcam++", "outputs": ["overlay", "bbox", "raw"], "topk": 2}
    r = server.post(f"predictions/{model}", json=doc)
    assert r.status_code == 200, r.text
    body = r.json()
    [e] = body["explanations"]
    assert len(body["predictions"]) == 2
    assert (e["label"], e["method"]) == (info["label"], "gradcam++")
    assert "heatmap" not in e and len(e["bbox"]) == 4 and e["raw"]["shape"] == [12, 12]
    overlay = Image.open(io.BytesIO(base64.b64decode(e["overlay"])))
    assert overlay.mode == "RGB" and overlay.size == (e["width"], e["height"])

    targets = "0,square"
    r = server.post(f"predictions/{model}", files={"data": (name, data, "image/png"),
                                                "explain": (None, "yes"),
                                                "target": (None, targets),
                                                "method": (None, "layercam")})
    assert r.status_code == 200, r.text
    ex = r.json()["explanations"]
    assert [(x["target"], x["label"], x["method"]) for x in ex] == [
        (0, local.labels[0], "layercam"), (local.labels.index("square"), "square", "layercam")]
    ref = local_answer(local, data, target=targets, method="layercam")
    for got, want in zip(ex, ref["explanations"]):
        assert np.abs(decode_png(got["heatmap"]).astype(int)
                      - decode_png(want["heatmap"]).astype(int)).max() <= 1


def test_query_string_is_dropped_on_predictions(server, boxes, sample_bytes):
    """TorchServe's frontend drops the query string of /predictions: use /explanations instead."""
    r = server.post("predictions/shapes?explain=true", data=sample_bytes(sorted(boxes)[0]))
    assert r.status_code == 200 and "explanations" not in r.json()


def test_kserve_explain_routes(server, model, boxes, sample_bytes):
    b64 = base64.b64encode(sample_bytes(sorted(boxes)[0])).decode()
    r = server.post(f"v1/models/{model}:explain", json={"instances": [{"data": b64}]})
    assert r.status_code == 200, r.text
    assert len(r.json()["explanations"]) == 1
    r = server.post(f"v2/models/{model}/explain",
                    json={"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                      "data": [b64]}]})
    assert r.status_code == 200, r.text
    assert len(r.json()["explanations"]) == 1


def _concurrently(server: Server, jobs: list[tuple[str, dict]]) -> list[requests.Response]:
    """Send ``jobs`` (route, requests kwargs) at once, one thread each; answers in job order."""
    barrier = threading.Barrier(len(jobs))

    def go(job: tuple[str, dict]) -> requests.Response:
        route, kw = job
        barrier.wait(timeout=30)
        return server.post(route, **kw)

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        return list(ex.map(go, jobs))


def test_16_concurrent_requests_are_batched_and_answered_in_order(server, model, boxes, local,
                                                                  decode_png, sample_bytes):
    names = sorted(boxes)
    order = sorted(range(len(names)), key=lambda i: (boxes[names[i]]["label"], i))
    picked = [names[i] for i in order]
    picked = (picked * (16 // len(picked) + 1))[:16]
    jobs = []
    for i, name in enumerate(picked):
        route = f"explanations/{model}" if i % 2 else f"predictions/{model}"
        jobs.append((route, {"data": sample_bytes(name)}))
    before = server.settled()
    answers = _concurrently(server, jobs)
    assert [r.status_code for r in answers] == [200] * 16
    for i, (name, r) in enumerate(zip(picked, answers)):
        body = r.json()
        assert body["predictions"][0]["label"] == boxes[name]["label"], name
        ref = local_answer(local, sample_bytes(name), explain=bool(i % 2))
        assert_same_predictions(body, ref)
        assert ("explanations" in body) == bool(i % 2)
        if i % 2:
            got = decode_png(body["explanations"][0]["heatmap"]).astype(int)
            want = decode_png(ref["explanations"][0]["heatmap"]).astype(int)
            assert np.abs(got - want).max() <= 1, name
    sizes = server.batch_sizes(before, 16)
    assert sum(sizes) == 16 and max(sizes) <= 8, sizes
    assert len(sizes) < 16, f"16 concurrent requests ran one by one: batches {sizes}"


def test_a_corrupt_image_fails_alone_and_the_server_lives_on(server, model, boxes, sample_bytes):
    names = sorted(boxes)[:7]
    good = [(f"explanations/{model}", {"data": sample_bytes(n)}) for n in names]
    corrupt = sample_bytes(names[0])[:150]  # a truncated PNG
    jobs = good[:3] + [(f"explanations/{model}", {"data": corrupt})] + good[3:]
    before = server.settled()
    answers = _concurrently(server, jobs)
    codes = [r.status_code for r in answers]
    assert codes == [200, 200, 200, 400, 200, 200, 200, 200], codes
    # the corrupt image shared its batch with good ones
    server.batch_sizes(before, len(jobs))  # waits until the log covers the 8 requests
    batches = server.log_lines(BATCH_LOG)[before:]
    assert any("1 rejected" in ln and "batch of 1 rows" not in ln for ln in batches), batches
    err = answers[3].json()
    assert err["code"] == 400 and err["type"] == "InvalidImage" and err["message"]
    assert answers[3].headers["content-type"].startswith("application/json")
    for name, r in zip(names, answers[:3] + answers[4:]):
        assert r.json()["predictions"][0]["label"] == boxes[name]["label"]
    # still serving
    r = server.post(f"predictions/{model}", data=b"\x00" * 64)
    assert r.status_code == 400 and r.json()["type"] == "InvalidImage"
    r = server.post(f"predictions/{model}", data=b"")
    assert r.status_code == 400
    r = server.post(f"predictions/{model}", data=sample_bytes(names[1]))
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == boxes[names[1]]["label"]


def test_token_is_required(server, boxes, sample_bytes):
    data = sample_bytes(sorted(boxes)[0])
    for headers in ({}, {"Authorization": "Bearer not-the-key"},
                    {"Authorization": f"Bearer {server.management_token}"}):
        r = requests.post(f"{server.url}/predictions/shapes", data=data, headers=headers, timeout=30)
        # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException
        assert r.status_code in (400, 401), r.status_code
        assert "Token Authorization failed" in r.json()["message"]
    r = requests.get(f"{server.management}/models/shapes", timeout=30)
    assert r.status_code in (400, 401)


def test_oversize_image_is_413(server, model):
    img = Image.new("1", (7000, 6000))  # 42 MP > the 40 MP limit; a few KB as PNG
    buf = io.BytesIO()
    img.save(buf, "PNG")
    r = server.post(f"explanations/{model}", data=buf.getvalue())
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["code"] == 413 and body["type"] == "ImageTooLarge" and "42000000" in body["message"]


@pytest.mark.parametrize("opts, needle", [
    ({"method": "nope"}, "invalid value for method"),
    ({"target": "dodecahedron"}, "unknown label"),
    ({"target": "99"}, "out of range"),
    ({"topk": "0"}, "invalid value for topk"),
    ({"outputs": "heatmap,svg"}, "invalid value for outputs"),
])
def test_bad_options_are_422(server, model, boxes, opts, needle, sample_bytes):
    data = sample_bytes(sorted(boxes)[0])
    files = {"data": ("x.png", data, "image/png"), **{k: (None, v) for k, v in opts.items()}}
    r = server.post(f"explanations/{model}", files=files)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == 422 and body["type"] == "InvalidOption" and needle in body["message"]


def test_custom_metrics_reach_prometheus(server, boxes, sample_bytes):
    server.post("explanations/shapes", data=sample_bytes(sorted(boxes)[0]))
    text = requests.get(f"{server.metrics}/metrics", timeout=30).text
    for name in ("CamTime", "CamExplainedRows", "CamRequestErrors", "HandlerTime",
                 "CamInternalErrors", "CamFailedBatches"):
        assert f"\n{name}{{" in text, f"{name} not on /metrics"


def test_customized_describe_on_the_management_api(server, model, local):
    r = requests.get(f"{server.management}/models/{model}?customized=true", timeout=60,
                     headers={"Authorization": f"Bearer {server.management_token}"})
    assert r.status_code == 200, r.text
    meta = r.json()[0]["customizedMetadata"]
    desc = json.loads(meta) if isinstance(meta, str) else meta
    assert desc["labels"] == local.labels and desc["target_layer"] == local.layer


def test_body_over_max_request_size_is_refused_by_the_frontend(server):
    body = b"\0" * (20 * 1024 * 1024 + 1)  # the test server's max_request_size is 20 MiB
    try:
        r = server.post("predictions/shapes", data=body,
                        headers={"Content-Type": "application/octet-stream"})
    except requests.ConnectionError:
        return  # the frontend may close the connection before the body is sent
    assert r.status_code == 413


def test_client_cli_writes_the_overlay(server, boxes, samples, tmp_path, capsys):
    from camserve.client import main as client_main

    name, info = sorted(boxes.items())[0]
    out = tmp_path / "overlay.png"
    rc = client_main([str(samples / name), "--explain", "--target", info["label"], "--out", str(out),
                      "--url", server.url, "--key-file", str(server.home / "key_file.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"({info['label']}," in printed and "wrote" in printed
    img = Image.open(out)
    assert img.mode == "RGB" and img.size == Image.open(samples / name).size
    rc = client_main([str(samples / name), "--method", "bogus", "--url", server.url,
                      "--key-file", str(server.home / "key_file.json")])
    assert rc == 1 and "HTTP 422" in capsys.readouterr().err


# -- hardening: poison rows share a batch with good rows; the worker lives on ---------------------
def worker_pids(server: Server, model: str) -> list[int]:
    r = requests.get(f"{server.management}/models/{model}", timeout=60,
                     headers={"Authorization": f"Bearer {server.management_token}"})
    assert r.status_code == 200, r.text
    return sorted(int(w["pid"]) for w in r.json()[0]["workers"])


def _poison_jobs(good: list[bytes],
                 model: str) -> tuple[list[tuple[str, dict]], list[int | None]]:
    """Eight requests, good and poison alternating; expected status per request (None: 200)."""
    route = f"predictions/{model}"
    deep = b'{"data": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    b64 = base64.b64encode(good[0]).decode()
    jobs = [
        (route, {"data": good[0]}),
        (route, {"files": {"data": ("a.png", good[1], "image/png"), "target": (None, "\u00b2"),
                           "explain": (None, "true")}}),
        (route, {"data": good[2], "headers": {"describe": "True"}}),  # a forged describe header
        (route, {"data": deep, "headers": {"Content-Type": "application/json"}}),
        (f"explanations/{model}", {"files": {"data": ("b.png", good[3], "image/png"),
                                                     "target": (None, "1,star")}}),
        (route, {"files": {"data": ("c.png", good[1], "image/png"), "topk": (None, "+-1")}}),
        (route, {"json": {"data": b64, "explain": True, "outputs": ["bbox"]}}),
        (route, {"json": {"data": b64, "bad\nINFO forged log line": 1, "method": "m" * 3_000_000}}),
    ]
    return jobs, [None, 422, None, 400, None, 422, None, 422]


def test_poison_rows_share_a_batch_with_good_rows(server, poison_model, boxes, sample_bytes):
    names = sorted(boxes)
    good = [sample_bytes(n) for n in names[:4]]
    pids = worker_pids(server, poison_model)
    jobs, expected = _poison_jobs(good, poison_model)
    before = server.settled()
    answers = _concurrently(server, jobs)
    codes = [r.status_code for r in answers]
    assert codes == [e or 200 for e in expected], [(c, r.text[:200]) for c, r in zip(codes, answers)]
    for want, r in zip(expected, answers):
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        if want is None:
            assert "predictions" in body
        else:
            assert set(body) == {"code", "type", "message"} and body["code"] == want
            assert len(r.content) < 1000 and "\n" not in body["message"]
    assert "explanations" in answers[4].json() and "explanations" in answers[6].json()
    sizes = server.batch_sizes(before, len(jobs))
    assert max(sizes) > 1, f"the poison rows never shared a batch: {sizes}"
    assert worker_pids(server, poison_model) == pids


def test_an_oversized_answer_is_413_and_the_worker_lives(server, poison_model, boxes, png,
                                                         sample_bytes):
    pids = worker_pids(server, poison_model)
    big = png(seed=0, size=(1400, 1400), compress_level=1)  # 8 overlays + heatmaps of ~2 MP noise: ~70 MB of JSON
    every = ",".join(str(i) for i in range(8))
    jobs = [(f"explanations/{poison_model}", {"files": {
                "data": ("big.png", big, "image/png"), "target": (None, every),
                "outputs": (None, "overlay,heatmap")}}),
            (f"predictions/{poison_model}", {"data": sample_bytes(sorted(boxes)[0])})]
    answers = _concurrently(server, jobs)
    assert [r.status_code for r in answers] == [413, 200], [r.text[:300] for r in answers]
    err = answers[0].json()
    assert err["type"] == "ResponseTooLarge" and "overlay" in err["message"]
    assert "targets" in err["message"]
    assert worker_pids(server, poison_model) == pids
    r = server.post(f"explanations/{poison_model}", data=sample_bytes(sorted(boxes)[1]))
    assert r.status_code == 200 and len(r.json()["explanations"]) == 1


def test_forged_describe_header_on_the_inference_api(server, boxes, sample_bytes):
    r = server.post("predictions/shapes", data=sample_bytes(sorted(boxes)[0]),
                    headers={"describe": "True"})
    assert r.status_code == 200 and "predictions" in r.json() and "labels" not in r.json()
    r = server.post("predictions/shapes", files={"x": (None, "")}, headers={"describe": "True"})
    assert r.status_code == 400 and r.json()["type"] == "InvalidRequest"


# -- the two backends answer alike ----------------------------------------------------------------
@pytest.fixture(scope="module")
def hidden_style_set(tmp_path_factory) -> list[bytes]:
    """24 fresh samples drawn like the hidden evaluation set (tools.shapes, another seed)."""
    from tools.shapes import write_samples

    out = tmp_path_factory.mktemp("hidden_style")
    write_samples(out, seed=4321, n=24)
    return [p.read_bytes() for p in sorted(out.glob("*.png"))]


def test_both_backends_answer_the_hidden_style_set_alike(server, hidden_style_set):
    """Labels, scores within 1e-4, heatmaps within one grey level, the same bbox: the torch and
    the onnxruntime models of one server, the same requests (sent 8 at a time, so they batch)."""
    methods = ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"]
    jobs = []
    for i, data in enumerate(hidden_style_set):
        if i % 3 == 0:
            jobs.append(("predictions", {"data": data}))
        elif i % 3 == 1:
            jobs.append(("explanations", {"data": data}))
        else:
            jobs.append(("predictions", {"files": {
                "data": ("x.png", data, "image/png"), "explain": (None, "true"),
                "target": (None, f"{i % 8},{(i + 3) % 8}"), "method": (None, methods[i % 5]),
                "outputs": (None, "heatmap,bbox,raw")}}))
    answers = {}
    for model in ("shapes", "shapes" + ORT):
        got = []
        for k in range(0, len(jobs), 8):
            got += _concurrently(server, [(f"{route}/{model}", kw) for route, kw in jobs[k:k + 8]])
        answers[model] = got
    a, b = answers["shapes"], answers["shapes" + ORT]
    diff = compare_answers([r.json() for r in a], [r.json() for r in b],
                           ([r.status_code for r in a], [r.status_code for r in b]))
    print(f"torch vs onnxruntime over {len(jobs)} hidden-style requests: {diff}")
    assert [r.status_code for r in a] == [200] * len(jobs)
    assert diff.maps == 8 + 2 * 8
    diff.check()
