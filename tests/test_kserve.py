"""The native KServe predictor (camserve.kserve): request splitting, batching, and a real server.

The server tests start ``python -m camserve.kserve models/shapes`` as a child process on free
loopback ports (stopped by its PID at the end) and compare its answers with the TorchServe
handler's, computed in-process by the serving core from the rows TorchServe would hand the
handler (raw body or form fields, ``explain`` header on the explain routes).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import requests

from camserve import kserve as ks
from camserve.serving import RowResult

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "shapes"
SAMPLES = sorted((MODEL_DIR / "samples").glob("*.png"))
NAME = "shapes"
JSON = {"Content-Type": "application/json"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- pure functions -----------------------------------------------------------------------------------
def test_rows_from_v1_one_row_per_instance_in_order() -> None:
    rows = ks.rows_from_v1({"instances": [{"data": "QQ==", "topk": 1}, "Qg==", {"b64": "Qw=="}]})
    assert rows == [{"body": {"instances": [{"data": "QQ==", "topk": 1}]}},
                    {"body": {"instances": ["Qg=="]}}, {"body": {"instances": [{"b64": "Qw=="}]}}]
    assert ks.rows_from_v1(b'{"instances": ["QQ=="]}') == [{"body": {"instances": ["QQ=="]}}]


@pytest.mark.parametrize("payload, code, words", [
    ({"data": "QQ=="}, 400, "missing field 'instances'"),
    ({"instances": "QQ=="}, 400, "expected a list"),
    ({"instances": []}, 400, "empty"),
    ({"instances": ["QQ=="] * 5}, 413, "at most 4"),
    (b"{not json", 400, "invalid JSON body"),
])
def test_rows_from_v1_refuses_requests_without_instances(payload: Any, code: int, words: str) -> None:
    with pytest.raises(ks.AnswerError) as info:
        ks.rows_from_v1(payload, max_instances=4)
    assert info.value.status == code
    assert info.value.body["code"] == code and words in info.value.body["message"]


def _v2(inputs: list[Any], parameters: Any = None) -> Any:
    return SimpleNamespace(inputs=inputs, parameters=parameters)


def test_rows_from_v2_applies_parameters_to_every_element() -> None:
    inp = SimpleNamespace(name="data", datatype="BYTES", data=["QQ==", b"raw"])
    rows = ks.rows_from_v2(_v2([inp], {"explain": True, "topk": 2}))
    assert [r["body"]["inputs"][0]["data"] for r in rows] == [["QQ=="], [b"raw"]]
    assert all(r["body"]["parameters"] == {"explain": True, "topk": 2} for r in rows)


@pytest.mark.parametrize("inputs, words", [
    ([SimpleNamespace(name="image", datatype="BYTES", data=["QQ=="])], "named 'data'"),
    ([SimpleNamespace(name="data", datatype="FP32", data=[1.0])], "allowed: BYTES"),
    ([], "named 'data'"),
])
def test_rows_from_v2_refuses_other_inputs(inputs: list[Any], words: str) -> None:
    with pytest.raises(ks.AnswerError) as info:
        ks.rows_from_v2(_v2(inputs))
    assert info.value.status == 400 and words in info.value.body["message"]


def test_overall_status() -> None:
    assert ks.overall_status([200]) == 200
    assert ks.overall_status([413, 200, 400]) == 200
    assert ks.overall_status([422, 400]) == 422


def test_microbatcher_joins_concurrent_requests_and_splits_answers() -> None:
    calls: list[list[Any]] = []

    def run(rows: list[Any], flags: list[bool]) -> list[RowResult]:
        calls.append(list(rows))
        return [RowResult(200, {"row": r, "explain": f}) for r, f in zip(rows, flags)]

    async def main() -> list[list[RowResult]]:
        b = ks.MicroBatcher(run, max_rows=8, max_delay_s=0.2)
        return await asyncio.gather(b.submit([1, 2], [False, False]), b.submit([3], [True]),
                                    b.submit([4, 5, 6], [False] * 3))

    answers = asyncio.run(main())
    assert [[r.body["row"] for r in a] for a in answers] == [[1, 2], [3], [4, 5, 6]]
    assert answers[1][0].body["explain"] is True
    assert calls == [[1, 2, 3, 4, 5, 6]]


def test_microbatcher_reports_a_failed_batch_to_every_request() -> None:
    def run(rows: list[Any], flags: list[bool]) -> list[RowResult]:
        raise RuntimeError("boom")

    async def main() -> list[Any]:
        b = ks.MicroBatcher(run, max_rows=8, max_delay_s=0.05)
        return await asyncio.gather(b.submit([1], [False]), b.submit([2], [False]),
                                    return_exceptions=True)

    assert [str(e) for e in asyncio.run(main())] == ["boom", "boom"]


def test_parser_defaults_to_loopback() -> None:
    args = ks.build_parser().parse_args(["models/shapes"])
    assert args.host == "127.0.0.1" and args.grpc_port == 8081 and args.workers == 1


# -- a real server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ks.LocalPredictor]:
    log = tmp_path_factory.mktemp("kserve") / "server.log"
    with ks.LocalPredictor(MODEL_DIR, NAME, args=["--max-batch-delay", "100",
                                                  "--max-instances", "16"], log_path=log,
                           env={"CAMSERVE_DEVICE": "cpu"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def service() -> Any:
    return ks._build_service(MODEL_DIR, "cpu")


def handler_answers(service: Any, rows: list[Any], explain_route: bool = False) -> list[RowResult]:
    """What the TorchServe handler answers for these rows (one batch)."""
    results, _ = ks._run_rows(service, rows, [explain_route] * len(rows))
    return results


def post(server: ks.LocalPredictor, route: str, body: Any) -> requests.Response:
    return requests.post(f"{server.url}{route}", json=body, timeout=120)


def test_readiness_and_liveness(server: ks.LocalPredictor) -> None:
    r = requests.get(f"{server.url}/v1/models/{NAME}", timeout=10)
    assert r.status_code == 200 and r.json() == {"name": NAME, "ready": True}
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{server.url}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{server.url}/v2/models/{NAME}/ready", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/v1/models/nope", timeout=10).status_code == 404


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


def test_listens_on_loopback_only(server: ks.LocalPredictor) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp")
    for port in (server.http_port, server.grpc_port):
        addrs = _listening(port)
        assert addrs and set(addrs) <= LOOPBACK, (port, addrs)


def test_v1_predict_equals_the_handler_on_every_sample(server: ks.LocalPredictor,
                                                       service: Any) -> None:
    images = [p.read_bytes() for p in SAMPLES]
    r = post(server, f"/v1/models/{NAME}:predict", {"instances": [{"data": b64(i)} for i in images]})
    assert r.status_code == 200
    got = r.json()["predictions"]
    want = [res.body for res in handler_answers(service, [{"body": i} for i in images])]
    assert got == want
    labels = [p.name.split("_")[0] for p in SAMPLES]
    assert [g["predictions"][0]["label"] for g in got] == labels
    assert all("explanations" not in g for g in got)


def test_v1_explain_equals_the_handler_with_options(server: ks.LocalPredictor, service: Any) -> None:
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


def test_v2_infer_with_and_without_explain(server: ks.LocalPredictor, service: Any) -> None:
    images = [p.read_bytes() for p in SAMPLES[:3]]
    for params in (None, {"explain": True, "outputs": "heatmap,bbox"}):
        body: dict[str, Any] = {"inputs": [{"name": "data", "datatype": "BYTES",
                                            "shape": [len(images)], "data": [b64(i) for i in images]}]}
        if params:
            body["parameters"] = params
        r = post(server, f"/v2/models/{NAME}/infer", body)
        assert r.status_code == 200, r.text
        [out] = r.json()["outputs"]
        assert out["name"] == "result" and out["datatype"] == "BYTES" and out["shape"] == [3]
        got = [json.loads(t) for t in out["data"]]
        rows = [{"data": i, **{k: str(v).lower() for k, v in (params or {}).items()}}
                for i in images]
        assert got == [res.body for res in handler_answers(service, rows)]
        assert all(("explanations" in g) == bool(params) for g in got)


def test_a_corrupt_instance_is_answered_on_its_own(server: ks.LocalPredictor, service: Any) -> None:
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


def test_option_errors_carry_the_handlers_code(server: ks.LocalPredictor) -> None:
    img = b64(SAMPLES[0].read_bytes())
    r = post(server, f"/v1/models/{NAME}:predict", {"instances": [{"data": img, "topk": 99}]})
    assert r.status_code == 422
    [err] = r.json()["predictions"]
    assert err["type"] == "InvalidOption" and "topk" in err["message"]
    r = post(server, f"/v1/models/{NAME}:predict",
             {"instances": [{"data": img, "colour": "red"}, {"data": "!!"}]})
    assert r.status_code == 422  # all failed: the first failed instance's code
    assert [e["code"] for e in r.json()["predictions"]] == [422, 400]
    r = post(server, f"/v2/models/{NAME}/infer",
             {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1], "data": [img]}],
              "parameters": {"method": "nope"}})
    assert r.status_code == 422
    err = json.loads(r.json()["outputs"][0]["data"][0])
    assert err["type"] == "InvalidOption" and "method" in err["message"]


def test_requests_without_instances(server: ks.LocalPredictor) -> None:
    r = post(server, f"/v1/models/{NAME}:predict", {"data": "QQ=="})
    assert r.status_code == 400 and "instances" in r.json()["message"]
    r = post(server, f"/v1/models/{NAME}:predict", {"instances": ["QQ=="] * 17})
    assert r.status_code == 413 and r.json()["type"] == "WorkTooLarge"
    r = post(server, f"/v2/models/{NAME}/infer",
             {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}]})
    assert r.status_code == 400 and "'data'" in r.json()["message"]


def _metric(text: str, name: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^{name}\{{[^}}]*model_name=\"{NAME}\"[^}}]*\}} ([0-9.e+]+)$", text,
                         re.M):
        total += float(m.group(1))
    return total


def test_concurrent_requests_share_batches_and_metrics(server: ks.LocalPredictor) -> None:
    images = [p.read_bytes() for p in SAMPLES]
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


def test_model_survives_pickling_for_multiprocess_workers(service: Any) -> None:
    """KServe's --workers > 1 server pickles the registered model into spawned processes: the
    copy loads its own model (on a thread) and answers like the original."""
    import pickle

    model = ks.CamModel(NAME, MODEL_DIR, device="cpu")
    model.load()
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is ks.CamModel and clone.ready and clone.name == NAME
    rows = [{"body": p.read_bytes()} for p in SAMPLES[:2]]
    got = [r.body for r in clone._run(rows, [True, False])]
    want = [r.body for r in model._run(rows, [True, False])]
    assert got == want and clone.service is not model.service


def test_v2_over_grpc_answers_every_element(server: ks.LocalPredictor, service: Any) -> None:
    import grpc

    ks._import_kserve()
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
