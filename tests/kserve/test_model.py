"""camserve.kserve.model: KServe's stage hooks over the serving core, in-process (no server).

Each hook does its stage: an image that cannot be decoded, or an option that is not allowed, is
answered by preprocess already; predict joins the batch and runs the model; postprocess writes
the answer and its status. The model survives KServe's pickling into worker processes, and the
predictor's modules import nothing of camserve.testing.
"""
from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
from typing import Any, Iterator

import pytest

from camserve.kserve import import_kserve
from camserve.serving import CamService, RowResult

from .conftest import MODEL_DIR, NAME, ROOT, SAMPLES, b64, handler_answers

import_kserve()

from kserve.errors import InvalidInput  # noqa: E402
from kserve.model import InferenceVerb  # noqa: E402
from kserve.protocol.infer_type import InferInput, InferRequest  # noqa: E402

from camserve.kserve.model import Answered, CamModel, Incoming, Staged  # noqa: E402
from camserve.kserve.server import AnswerError, V2Body  # noqa: E402


@pytest.fixture(scope="module")
def model() -> Iterator[CamModel]:
    m = CamModel(NAME, MODEL_DIR, device="cpu", max_batch_delay_ms=1.0)
    m.load()
    yield m


def call(model: CamModel, body: Any, verb: InferenceVerb = InferenceVerb.PREDICT) -> Any:
    """KServe's call of the model (preprocess, predict/explain, postprocess), as its routes do;
    whatever the call's end, the work it held is given back."""
    try:
        response, _ = asyncio.run(model(body, verb=verb))
    finally:
        assert model.gate.held == 0
    return response


def test_each_hook_does_its_stage(model: CamModel, service: CamService) -> None:
    good = SAMPLES[0].read_bytes()
    instances = [{"data": b64(good)}, {"data": b64(good[:200])}, {"data": b64(good), "topk": 99}]

    async def stages() -> tuple[Staged, Answered, Any]:
        staged = await model.preprocess(Incoming({"instances": instances}, explain=True))
        answered = await model.predict(staged)
        return staged, answered, await model.postprocess(answered)

    staged, answered, body = asyncio.run(stages())
    # preprocess: decoded, budgeted, and the bad image and the bad option answered already
    items = staged.prepared.items
    assert not isinstance(items[0], RowResult) and staged.prepared.work > 0
    assert [(r.status, r.body["type"]) for r in items[1:]] == [(400, "InvalidImage"),
                                                              (422, "InvalidOption")]
    # predict: the model pass answers the decoded row; the others keep their answers
    assert [r.status for r in answered.results] == [200, 400, 422]
    assert "explanations" in answered.results[0].body
    # postprocess: the v1 body, 200 since one image succeeded
    want = handler_answers(service, [{"body": {"instances": [i]}} for i in instances], True)
    assert body == {"predictions": [w.body for w in want]}


def test_the_route_decides_explaining(model: CamModel) -> None:
    body = {"instances": [{"data": b64(SAMPLES[1].read_bytes())}]}
    [explained] = call(model, body, InferenceVerb.EXPLAIN)["predictions"]
    [predicted] = call(model, body)["predictions"]
    assert "explanations" in explained and "explanations" not in predicted
    assert explained["predictions"] == predicted["predictions"]


def test_a_request_where_every_image_failed_carries_the_first_code(model: CamModel) -> None:
    with pytest.raises(AnswerError) as info:
        call(model, {"instances": [{"data": "%%%"}, {"data": "QQ==", "topk": 0}]})
    assert info.value.status == 400
    assert [p["code"] for p in info.value.body["predictions"]] == [400, 422]
    v2 = b'{"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}]}'
    with pytest.raises(AnswerError) as info:
        call(model, V2Body(v2))
    assert info.value.status == 400 and info.value.body["outputs"][0]["name"] == "result"


def test_nothing_to_answer_is_refused_before_any_model_work(model: CamModel) -> None:
    with pytest.raises(AnswerError) as info:
        call(model, V2Body(b'{"inputs": [], "parameters": [1]}'))
    assert info.value.status == 400 and info.value.body["type"] == "InvalidRequest"
    grpc = InferRequest(model_name=NAME, infer_inputs=[], from_grpc=True)
    with pytest.raises(InvalidInput, match="InvalidRequest"):  # gRPC: INVALID_ARGUMENT
        call(model, grpc)


def test_an_infer_request_over_grpc_gets_an_infer_response(model: CamModel,
                                                          service: CamService) -> None:
    png = SAMPLES[2].read_bytes()
    inp = InferInput(name="data", shape=[2], datatype="BYTES", data=[png, b"junk"])
    response = call(model, InferRequest(model_name=NAME, infer_inputs=[inp], from_grpc=True,
                                        request_id="r1", parameters={"topk": 1}))
    assert response.id == "r1" and response.outputs[0].shape == [2]
    got = [json.loads(t) for t in response.outputs[0].data]
    want = handler_answers(service, [{"data": png, "topk": "1"}, {"data": b"junk"}])
    assert got == [w.body for w in want]


def test_model_survives_pickling_for_multiprocess_workers(model: CamModel) -> None:
    """KServe's --workers > 1 server pickles the registered model into spawned processes: the
    copy loads its own model (on a thread) and answers like the original."""
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is CamModel and clone.ready and clone.name == NAME
    body = {"instances": [{"data": b64(p.read_bytes()), "explain": e}
                          for p, e in zip(SAMPLES[:2], (True, False))]}
    got = call(clone, body)
    assert got == call(model, body) and "explanations" in got["predictions"][0]
    assert clone.service is not model.service


@pytest.mark.slow  # a fresh interpreter imports torch and kserve (the AST check: tests/test_testing.py)
def test_the_predictor_imports_nothing_of_camserve_testing() -> None:
    code = ("import sys, camserve.kserve, camserve.kserve.wire, camserve.kserve.batcher, "
            "camserve.kserve.model, camserve.kserve.server, camserve.kserve.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('camserve.testing')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_prepared_requests_hold_work_until_answered(model: CamModel) -> None:
    """A request reserves the most it may take before it is prepared, keeps what it took while it
    waits for the model, and gives it back when answered."""
    body = {"instances": [{"data": b64(SAMPLES[0].read_bytes()), "outputs": "heatmap,overlay"}]}
    seen: list[int] = []
    predict = model.predict

    async def watching(payload: Staged, *args: Any) -> Answered:
        seen.append(model.gate.held)
        return await predict(payload, *args)

    model.predict = watching  # type: ignore[method-assign]
    try:
        call(model, body, InferenceVerb.EXPLAIN)
    finally:
        del model.predict
    assert model.gate.capacity == 2 * 512 * 10**6
    assert seen == [96 * 96 * 4]  # one target: heatmap (1) + overlay (3) at 96x96


def test_each_server_process_gets_its_share_of_the_cores(onnx_model_dir) -> None:
    """``--workers 2``: each process's onnxruntime sessions (and torch) get half the cores."""
    import torch

    from camserve.onnx.session import available_cpus

    threads = torch.get_num_threads()
    try:
        m = CamModel(NAME, onnx_model_dir, device="cpu", backend="onnxruntime", workers=2)
        m.load()
        share = max(1, available_cpus() // 2)
        assert m.threads == share and torch.get_num_threads() == share
        backend = m.service.backend
        assert backend.name == "onnxruntime" and backend.threads == share
        assert backend.cam_session.get_session_options().intra_op_num_threads == share
        assert CamModel(NAME, MODEL_DIR, device="cpu", workers=1).threads == available_cpus()
    finally:
        torch.set_num_threads(threads)
