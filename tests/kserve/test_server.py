"""The KServe predictor as a real server: ``python -m camserve.kserve models/shapes`` started as a
child process on free loopback ports (stopped by its PID at the end), its answers compared with
the TorchServe handler's (the serving core in-process, given the rows TorchServe would hand the
handler: raw body or form fields, the explain flag on the explain routes); and its command line.
Every server test runs on each backend (torch, and onnxruntime over the exported graph): the
answers, the hidden-style set against the torch backend, bad input and poison requests sharing
batches with good ones; the two backends' predictors side by side in the slow tier.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from camserve.kserve.__main__ import build_parser, check_args
from camserve.serving import CamService
from camserve.testing.kserve import LocalPredictor

from .conftest import MODEL_DIR, NAME, SAMPLES, b64, handler_answers


# -- the command line ---------------------------------------------------------------------------------
def test_parser_defaults_to_loopback() -> None:
    args = build_parser().parse_args(["models/shapes"])
    assert args.host == "127.0.0.1" and args.grpc_port == 8081 and args.workers == 1
    assert check_args(build_parser().parse_args([str(MODEL_DIR)])) is None


@pytest.mark.parametrize("argv, words", [
    (["--model-name", "a b"], "--model-name"),
    (["--model-name", "{x}"], "it goes in the routes"),
    (["--http-port", "0"], "--http-port"),
    (["--grpc-port", "70000"], "--grpc-port"),
    (["--max-batch-size", "0"], "--max-batch-size: 0 (at least 1)"),
    (["--prepare-threads", "0"], "--prepare-threads"),
    (["--max-batch-delay", "-1"], "--max-batch-delay"),
])
def test_bad_arguments_are_named(argv: list[str], words: str) -> None:
    assert words in (check_args(build_parser().parse_args([str(MODEL_DIR), *argv])) or "")


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    from camserve.kserve.__main__ import main

    assert main([str(tmp_path)]) == 2


# -- a real server, on each backend --------------------------------------------------------------------
@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def served_dir(backend: str, onnx_model_dir: Path) -> Path:
    """The folder the server serves: the shapes folder, or its copy with the exported graph."""
    return onnx_model_dir if backend == "onnxruntime" else MODEL_DIR


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, backend: str,
           served_dir: Path) -> Iterator[LocalPredictor]:
    log = tmp_path_factory.mktemp("kserve") / "server.log"
    with LocalPredictor(served_dir, NAME, args=["--max-batch-delay", "100",
                                                "--max-instances", "16", "--backend", backend],
                        log_path=log, env={"CAMSERVE_DEVICE": "cpu"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def service(backend: str, served_dir: Path) -> CamService:
    """What the TorchServe handler answers on the same backend (the answers must be identical)."""
    return CamService.from_model_dir(served_dir, device="cpu", overrides={"backend": backend})


def post(server: LocalPredictor, route: str, body: Any) -> requests.Response:
    return requests.post(f"{server.url}{route}", json=body, timeout=120)


def v2_body(data: list[Any], parameters: Any = ...) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [len(data)],
                                        "data": data}]}
    if parameters is not ...:
        body["parameters"] = parameters
    return body


def test_readiness_and_liveness(server: LocalPredictor) -> None:
    r = requests.get(f"{server.url}/v1/models/{NAME}", timeout=10)
    assert r.status_code == 200 and r.json() == {"name": NAME, "ready": True}
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{server.url}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{server.url}/v2/models/{NAME}/ready", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/v1/models/nope", timeout=10).status_code == 404
    assert post(server, "/v2/models/nope/infer", v2_body(["QQ=="])).status_code == 404


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.append(addr)
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def test_listens_on_loopback_only(server: LocalPredictor) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp")
    for port in (server.http_port, server.grpc_port):
        addrs = _listening(port)
        assert addrs and set(addrs) <= LOOPBACK, (port, addrs)


def test_v1_predict_equals_the_handler_on_every_sample(server: LocalPredictor,
                                                       service: CamService) -> None:
    images = [p.read_bytes() for p in SAMPLES]
    r = post(server, f"/v1/models/{NAME}:predict", {"instances": [{"data": b64(i)} for i in images]})
    assert r.status_code == 200
    got = r.json()["predictions"]
    want = [res.body for res in handler_answers(service, [{"body": i} for i in images])]
    assert got == want
    labels = [p.name.split("_")[0] for p in SAMPLES]
    assert [g["predictions"][0]["label"] for g in got] == labels
    assert all("explanations" not in g for g in got)


def test_v1_explain_equals_the_handler_with_options(server: LocalPredictor,
                                                    service: CamService) -> None:
    images = [p.read_bytes() for p in SAMPLES]
    opts = [{}, {"target": "Star,1", "outputs": "heatmap,bbox,overlay"},
            {"method": "gradcam++", "topk": 2}, {"outputs": ["raw"]}] * 2
    r = post(server, f"/v1/models/{NAME}:explain",
             {"instances": [{"data": b64(i), **o} for i, o in zip(images, opts)]})
    assert r.status_code == 200
    got = r.json()["predictions"]
    # the handler's rows for the same requests sent as multipart form fields to /explanations
    rows = [{"data": i, **{k: (v if isinstance(v, str) else json.dumps(v)) for k, v in o.items()}}
            for i, o in zip(images, opts)]
    want = [res.body for res in handler_answers(service, rows, explain_route=True)]
    assert got == want  # labels, scores, heatmap and overlay PNG bytes (base64) identical
    assert [e["label"] for e in got[1]["explanations"]] == ["star", "square"]
    assert {"heatmap", "overlay", "bbox"} <= set(got[1]["explanations"][0])
    assert got[2]["explanations"][0]["method"] == "gradcam++" and len(got[2]["predictions"]) == 2


def test_v2_infer_with_and_without_explain(server: LocalPredictor, service: CamService) -> None:
    images = [p.read_bytes() for p in SAMPLES[:3]]
    for params in (None, {"explain": True, "outputs": "heatmap,bbox"}):
        body = v2_body([b64(i) for i in images], *([params] if params else []))
        r = post(server, f"/v2/models/{NAME}/infer", body)
        assert r.status_code == 200, r.text
        [out] = r.json()["outputs"]
        assert out["name"] == "result" and out["datatype"] == "BYTES" and out["shape"] == [3]
        got = [json.loads(t) for t in out["data"]]
        rows = [{"data": i, **{k: str(v).lower() for k, v in (params or {}).items()}}
                for i in images]
        assert got == [res.body for res in handler_answers(service, rows)]
        assert all(("explanations" in g) == bool(params) for g in got)


def test_a_corrupt_instance_is_answered_on_its_own(server: LocalPredictor,
                                                   service: CamService) -> None:
    good = SAMPLES[0].read_bytes()
    corrupt = good[: len(good) // 3]
    instances = [{"data": b64(good)}, {"data": b64(corrupt)}, {"data": "%%%"}, {"data": b64(good)}]
    r = post(server, f"/v1/models/{NAME}:explain", {"instances": instances})
    assert r.status_code == 200
    got = r.json()["predictions"]
    assert [("code" in g) for g in got] == [False, True, True, False]
    assert got[1]["code"] == 400 and got[1]["type"] == "InvalidImage"
    assert got[2]["code"] == 400 and got[2]["type"] == "InvalidImage"
    want = handler_answers(service, [{"body": {"instances": [i]}} for i in instances], True)
    assert got == [w.body for w in want]
    assert got[0] == got[3]


def test_bad_v2_elements_beside_good_ones(server: LocalPredictor, service: CamService) -> None:
    good = b64(SAMPLES[1].read_bytes())
    r = post(server, f"/v2/models/{NAME}/infer", v2_body([good, 5, "%%%", {"b64": good}]))
    assert r.status_code == 200
    got = [json.loads(t) for t in r.json()["outputs"][0]["data"]]
    assert [g.get("code", 200) for g in got] == [200, 400, 400, 200]
    assert got[0] == got[3] == handler_answers(service, [{"body": SAMPLES[1].read_bytes()}])[0].body


def test_option_errors_carry_the_handlers_code(server: LocalPredictor) -> None:
    img = b64(SAMPLES[0].read_bytes())
    r = post(server, f"/v1/models/{NAME}:predict", {"instances": [{"data": img, "topk": 99}]})
    assert r.status_code == 422
    [err] = r.json()["predictions"]
    assert err["type"] == "InvalidOption" and "topk" in err["message"]
    r = post(server, f"/v1/models/{NAME}:predict",
             {"instances": [{"data": img, "colour": "red"}, {"data": "!!"}]})
    assert r.status_code == 422  # all failed: the first failed instance's code
    assert [e["code"] for e in r.json()["predictions"]] == [422, 400]
    r = post(server, f"/v2/models/{NAME}/infer", v2_body([img], {"method": "nope"}))
    assert r.status_code == 422
    err = json.loads(r.json()["outputs"][0]["data"][0])
    assert err["type"] == "InvalidOption" and "method" in err["message"]


def test_requests_without_instances(server: LocalPredictor) -> None:
    r = post(server, f"/v1/models/{NAME}:predict", {"data": "QQ=="})
    assert r.status_code == 400 and "instances" in r.json()["message"]
    r = post(server, f"/v1/models/{NAME}:predict", {"instances": ["QQ=="] * 17})
    assert r.status_code == 413 and r.json()["type"] == "WorkTooLarge"
    r = post(server, f"/v2/models/{NAME}/infer",
             {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}]})
    assert r.status_code == 400 and "'data'" in r.json()["message"]
    r = requests.post(f"{server.url}/v2/models/{NAME}/infer", data=b"{not json", timeout=60)
    assert r.status_code == 400 and r.json()["type"] == "InvalidRequest"


@pytest.mark.parametrize("params", ["x", [1], [], 0, False, ""])
def test_v2_parameters_not_an_object_is_400_as_on_the_handler(server: LocalPredictor,
                                                            service: CamService,
                                                            params: Any) -> None:
    """KServe 0.21's own route answered these 422 with FastAPI's ``detail`` (echoing the whole
    body); the handler 400 (or nothing, ignoring [], 0, false and "")."""
    body = v2_body([b64(SAMPLES[0].read_bytes())], params)
    r = post(server, f"/v2/models/{NAME}/infer", body)
    [want] = handler_answers(service, [{"body": body}])
    assert (r.status_code, r.json()) == (want.status, want.body) == \
        (400, {"code": 400, "type": "InvalidRequest",
               "message": want.body["message"]})
    assert len(r.content) < 300  # the body is not echoed


def test_v2_parameters_with_json_values_reach_the_options(server: LocalPredictor,
                                                         service: CamService) -> None:
    """A list of targets as a JSON list (KServe 0.21's own route allows only scalars)."""
    img = SAMPLES[3].read_bytes()
    params = {"explain": True, "target": ["star", 1], "outputs": ["bbox"]}
    r = post(server, f"/v2/models/{NAME}/infer", v2_body([b64(img)], params))
    assert r.status_code == 200, r.text
    got = json.loads(r.json()["outputs"][0]["data"][0])
    [want] = handler_answers(service, [{"body": v2_body([b64(img)], params)}])
    assert got == want.body and [e["label"] for e in got["explanations"]] == ["star", "square"]
    r = post(server, f"/v2/models/{NAME}/infer", v2_body([b64(img)], {"topk": [1]}))
    assert r.status_code == 422 and "topk" in json.loads(r.json()["outputs"][0]["data"][0])["message"]


def test_v2_binary_data_extension(server: LocalPredictor, service: CamService) -> None:
    """KServe's binary data extension (a JSON part, then the raw BYTES tensor: a 4-byte length
    before each element) is still decoded by KServe; a bad one is 400, not 500."""
    png = SAMPLES[4].read_bytes()
    element = b64(png).encode()
    raw = len(element).to_bytes(4, "little") + element
    head = json.dumps({"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"topk": 1}}).encode()
    url = f"{server.url}/v2/models/{NAME}/infer"
    r = requests.post(url, data=head + raw, timeout=60,
                      headers={"inference-header-content-length": str(len(head))})
    assert r.status_code == 200, r.text
    [want] = handler_answers(service, [{"data": png, "topk": "1"}])
    assert json.loads(r.json()["outputs"][0]["data"][0]) == want.body
    for length, body in (("x", head + raw), ("8", b'{"x": 1}')):
        r = requests.post(url, data=body, timeout=60,
                          headers={"inference-header-content-length": length})
        assert r.status_code == 400 and r.json()["type"] == "InvalidRequest"


def _metric(text: str, name: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^{name}\{{[^}}]*model_name=\"{NAME}\"[^}}]*\}} ([0-9.e+]+)$", text,
                         re.M):
        total += float(m.group(1))
    return total


def test_concurrent_requests_share_batches_and_metrics(server: LocalPredictor) -> None:
    images = [p.read_bytes() for p in SAMPLES]
    stages = ("request_preprocess_seconds_count", "request_explain_seconds_count",
              "request_postprocess_seconds_count")
    before = requests.get(f"{server.url}/metrics", timeout=10).text
    n_before = _metric(before, "camserve_kserve_batch_rows_count")
    rows_before = _metric(before, "camserve_kserve_batch_rows_sum")

    def one(i: int) -> dict[str, Any]:
        r = post(server, f"/v1/models/{NAME}:explain", {"instances": [{"data": b64(images[i])}]})
        assert r.status_code == 200
        return r.json()["predictions"][0]

    with cf.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, range(8)))
    assert [g["explanations"][0]["label"] for g in got] == [p.name.split("_")[0] for p in SAMPLES]
    after = requests.get(f"{server.url}/metrics", timeout=10).text
    batches = _metric(after, "camserve_kserve_batch_rows_count") - n_before
    assert _metric(after, "camserve_kserve_batch_rows_sum") - rows_before == 8
    assert 1 <= batches < 8  # requests arriving within --max-batch-delay share a model call
    assert "request_explain_seconds" in after  # KServe's own latency histograms
    # every request went through each of KServe's timed stages once
    assert [_metric(after, s) - _metric(before, s) for s in stages] == [8, 8, 8]


def test_v2_over_grpc_answers_every_element(server: LocalPredictor, service: CamService) -> None:
    import grpc

    from camserve.kserve import import_kserve

    import_kserve()
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pbg

    png = SAMPLES[0].read_bytes()
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)

        def infer(images: list[bytes], **params: Any) -> Any:
            p = {k: (pb.InferParameter(bool_param=v) if isinstance(v, bool)
                     else pb.InferParameter(string_param=v)) for k, v in params.items()}
            tensor = pb.ModelInferRequest.InferInputTensor(
                name="data", datatype="BYTES", shape=[len(images)],
                contents=pb.InferTensorContents(bytes_contents=images))
            return stub.ModelInfer(pb.ModelInferRequest(model_name=NAME, inputs=[tensor],
                                                        parameters=p), timeout=60)

        res = infer([png, b"junk"], explain=True, outputs="bbox")
        [out] = res.outputs
        assert out.name == "result" and out.datatype == "BYTES" and list(out.shape) == [2]
        got = [json.loads(b) for b in (out.contents.bytes_contents or res.raw_output_contents)]
        want = handler_answers(service, [{"data": png, "explain": "true", "outputs": "bbox"},
                                         {"data": b"junk"}])
        assert got == [w.body for w in want] and got[1]["type"] == "InvalidImage"
        with pytest.raises(grpc.RpcError) as info:  # nothing to answer: INVALID_ARGUMENT
            stub.ModelInfer(pb.ModelInferRequest(model_name=NAME, inputs=[]), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the backends answer alike -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_service() -> CamService:
    return CamService.from_model_dir(MODEL_DIR, device="cpu")


@pytest.fixture(scope="module")
def hidden_style() -> tuple[list[bytes], list[dict[str, Any]]]:
    """24 fresh samples drawn like the hidden evaluation set (tools.shapes, another seed), and
    their options: default targets, and two targets by index with each graph method and raw maps."""
    import tempfile

    from tools.shapes import write_samples

    with tempfile.TemporaryDirectory() as d:
        write_samples(d, seed=4321, n=24)
        images = [p.read_bytes() for p in sorted(Path(d).glob("*.png"))]
    methods = ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"]
    opts = [{} if i % 2 else {"target": f"{i % 8},{(i + 3) % 8}", "method": methods[i % 5],
                              "outputs": "heatmap,bbox,raw"} for i in range(len(images))]
    return images, opts


def explain_concurrently(server: LocalPredictor, images: list[bytes],
                         opts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One v1 explain request per image, 8 at a time (they share the predictor's batches)."""
    def one(i: int) -> dict[str, Any]:
        r = post(server, f"/v1/models/{NAME}:explain", {"instances": [{"data": b64(images[i]),
                                                                        **opts[i]}]})
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    with cf.ThreadPoolExecutor(8) as ex:
        return list(ex.map(one, range(len(images))))


def test_the_predictor_answers_as_the_torch_handler(
        server: LocalPredictor, torch_service: CamService, hidden_style: Any) -> None:
    """The hidden-style sample set through the predictor on each backend against the torch
    backend in process: labels, scores within 1e-4, heatmaps within one grey level, the same
    bbox."""
    from camserve.testing.equality import compare_answers

    images, opts = hidden_style
    got = explain_concurrently(server, images, opts)
    want = [res.body for res in handler_answers(
        torch_service, [{"data": i, **o} for i, o in zip(images, opts)], explain_route=True)]
    diff = compare_answers(want, got)
    assert diff.maps == 12 + 2 * 12
    diff.check()


@pytest.mark.slow
def test_both_backends_answer_the_hidden_style_set_alike_on_kserve(
        tmp_path: Path, onnx_model_dir: Path, hidden_style: Any) -> None:
    """Two real predictors side by side, one per backend, the same concurrent requests: labels,
    scores within 1e-4, heatmaps within one grey level, the same bbox."""
    from camserve.testing.equality import compare_answers

    images, opts = hidden_style
    answers = {}
    for backend, folder in (("torch", MODEL_DIR), ("onnxruntime", onnx_model_dir)):
        with LocalPredictor(folder, NAME, args=["--max-batch-delay", "50", "--backend", backend],
                            log_path=tmp_path / f"{backend}.log",
                            env={"CAMSERVE_DEVICE": "cpu"}) as srv:
            answers[backend] = explain_concurrently(srv, images, opts)
    diff = compare_answers(answers["torch"], answers["onnxruntime"])
    print(f"KServe, torch vs onnxruntime over {len(images)} hidden-style requests: {diff}")
    assert diff.maps == 12 + 2 * 12
    diff.check()


# -- bad input and batch isolation, on each backend ---------------------------------------------------
def test_poison_requests_share_batches_with_good_ones(server: LocalPredictor,
                                                      service: CamService) -> None:
    """Eight concurrent requests, poison and good alternating, within one batch delay: each poison
    request gets its own 4xx, each good one the handler's answer, and the server lives on."""
    good = [p.read_bytes() for p in SAMPLES[:4]]
    deep = '{"instances": [{"data": ' + "[" * 100_000 + "]" * 100_000 + "}]}"
    jobs: list[tuple[str, Any, int]] = [
        ("explain", {"instances": [{"data": b64(good[0])}]}, 200),
        ("explain", {"instances": [{"data": b64(good[1]), "target": "\u00b2"}]}, 422),
        ("predict", {"instances": [{"data": b64(good[1]), "topk": 2}]}, 200),
        ("explain", deep, 400),
        ("explain", {"instances": [{"data": b64(good[2]), "target": "1,star",
                                    "outputs": "bbox"}]}, 200),
        ("explain", {"instances": [{"data": b64(good[3]), "method": "m" * 3_000_000}]}, 422),
        ("predict", {"instances": [{"data": b64(good[3]), "bad\nINFO forged": 1}]}, 422),
        ("explain", {"instances": [{"data": b64(good[3][: len(good[3]) // 2])}]}, 400),
    ]

    def go(job: tuple[str, Any, int]) -> requests.Response:
        verb, body, _ = job
        url = f"{server.url}/v1/models/{NAME}:{verb}"
        if isinstance(body, str):
            return requests.post(url, data=body, timeout=120,
                                 headers={"Content-Type": "application/json"})
        return requests.post(url, json=body, timeout=120)

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        answers = list(ex.map(go, jobs))
    assert [r.status_code for r in answers] == [j[2] for j in jobs], [r.text[:200] for r in answers]
    for (verb, body, want), r in zip(jobs, answers):
        assert len(r.content) < 2000 or want == 200
        if want == 200:
            [inst] = body["instances"]
            row = {"data": base64.b64decode(inst["data"]),
                   **{k: str(v) for k, v in inst.items() if k != "data"}}
            [res] = handler_answers(service, [row], explain_route=verb == "explain")
            assert r.json()["predictions"] == [res.body]
    assert server.proc is not None and server.proc.poll() is None  # the process lives on
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).json() == {"ready": True}


def test_the_hostile_corpus_beside_good_images(server: LocalPredictor, service: CamService) -> None:
    """Every entry of the hostile corpus (bombs, truncated and mislabelled files, odd modes) as
    an instance beside a good one: each its decoder's status and type, the good ones 200."""
    from camserve.testing.hostile import hostile_corpus

    corpus = [c for c in hostile_corpus().values() if not c.heavy]
    good = SAMPLES[0].read_bytes()
    [want] = handler_answers(service, [{"body": good}])
    for k in range(0, len(corpus), 15):
        part = corpus[k:k + 15]
        r = post(server, f"/v1/models/{NAME}:predict",
                 {"instances": [{"data": b64(c.data)} for c in part] + [{"data": b64(good)}]})
        got = r.json()["predictions"]
        assert [g.get("code", 200) for g in got] == [c.status for c in part] + [200], \
            [(c.name, g.get("code", 200)) for c, g in zip(part, got)]
        assert [g.get("type") for g in got[:-1]] == [c.error_type for c in part]
        assert got[-1] == want.body
