"""camserve.onnx.job: the plan of a job, the graph checked against bounds and its session, the
results lines, and the BatchExplainer both runners share."""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from camserve.models import ModelSpec
from camserve.onnx.cli import main
from camserve.onnx.format import GraphMeta
from camserve.onnx.inputs import Decoded, Failed, Item, UsageError
from camserve.onnx.job import (EXIT_USAGE, BatchExplainer, Explained, JobConfig, JobPlan,
                               check_meta, check_session, plan_job, result_lines)
from camserve.onnx.outputs import Outputs

from .conftest import LABELS, LAYER, MEAN, SIZE, STD

JsonLines = Callable[[Path], list[dict]]


def test_metadata_is_enough(graph: Path) -> None:
    meta = GraphMeta.from_file(graph)
    assert meta.labels == tuple(LABELS) and meta.layer == LAYER
    assert meta.input_size == SIZE and meta.mean == MEAN and meta.std == STD
    assert meta.methods == ("gradcam", "layercam")
    assert meta.output_for("layercam") == "cam_layercam" and meta.output_for("GradCAM") == "cam"


def _meta(**spec: object) -> GraphMeta:
    base = dict(arch="torchvision.models.resnet18", input_size=SIZE, mean=MEAN, std=STD,
                target_layer=LAYER)
    base.update(spec)
    return GraphMeta(ModelSpec(**base), labels=tuple(LABELS), methods=("gradcam", "layercam"))


class _Arg:
    def __init__(self, name: str, shape: list) -> None:
        self.name, self.shape = name, shape


def test_metadata_checked_against_bounds_and_session(graph: Path) -> None:
    check_meta(_meta())
    for bad, key in ((dict(std=(0.2, float("nan"), 0.2)), "std"), (dict(std=(0.2, 0.0, 0.2)), "std"),
                     (dict(mean=(float("inf"), 0, 0)), "mean")):
        with pytest.raises(UsageError, match=f"'{key}'"):
            check_meta(_meta(**bad))
    ins = [_Arg("input", ["batch", 3, 64, 64]), _Arg("target", [1])]
    outs = [_Arg("logits", ["batch", 5]), _Arg("cam", ["batch", 4, 4]),
            _Arg("cam_layercam", ["batch", 4, 4])]
    check_session(_meta(), ins, outs, target=-1)
    with pytest.raises(UsageError, match="input_size"):
        check_session(_meta(input_size=(96, 96)), ins, outs, -1)
    with pytest.raises(UsageError, match="5 labels for 6 logits"):
        check_session(_meta(), ins, [_Arg("logits", ["batch", 6]), *outs[1:]], -1)
    with pytest.raises(UsageError, match="no output for method layercam"):
        check_session(_meta(), ins, outs[:2], -1)
    with pytest.raises(UsageError, match="'target'"):
        check_session(_meta(), ins[:1], outs, 2)


def test_edited_graph_metadata_is_refused_before_any_image(graph: Path, images: dict[str, Path],
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    proto = onnx.load(str(graph))
    props = {p.key: p.value for p in proto.metadata_props}

    def edited(name: str, **changes: str) -> Path:
        del proto.metadata_props[:]
        for k, v in {**props, **changes}.items():
            proto.metadata_props.add(key=k, value=v)
        path = tmp_path / name
        onnx.save(proto, str(path))
        return path

    few = edited("few.onnx", labels=json.dumps(LABELS[:3]), num_classes="3")
    out = tmp_path / "out"
    assert main(["--model", str(few), str(images["a"]), "--out", str(out)]) == EXIT_USAGE
    assert "3 labels for 5 logits" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()  # refused before any output
    wrong = edited("size.onnx", input_size="[96, 96]")
    assert main(["--model", str(wrong), str(images["a"]), "--out", str(out)]) == EXIT_USAGE
    assert "input_size" in capsys.readouterr().err
    huge = edited("huge.onnx", max_pixels=str(10**12))
    plan = plan_job(JobConfig(model=huge, inputs=[str(images["a"])], out=out))
    assert plan.max_pixels == 40_000_000  # capped at camserve.images' default
    plan = plan_job(JobConfig(model=huge, inputs=[str(images["a"])], out=out,
                                        max_pixels=50_000_000))
    assert plan.max_pixels == 50_000_000  # unless the command line raises it


def test_non_finite_scores_are_error_records(tmp_path: Path, json_lines: JsonLines) -> None:
    meta = _meta()
    items = [Item("a.png", "a.png"), Item("b.png", "b.png")]
    logits = np.array([[1, 2, 3, 4, 5], [np.nan, 0, 0, 0, 0]], np.float32)
    cams = np.ones((2, 4, 4), np.float32)
    good, bad = result_lines(items, [(10, 10)] * 2, logits, cams, -1, 3, meta, "gradcam")
    assert isinstance(good, dict) and isinstance(bad, Failed)
    assert bad.type == "InvalidOutput"
    outputs = Outputs(tmp_path, resume=False)
    assert outputs.result({**good, "score": float("nan")}) is False  # never a bare NaN
    outputs.close()
    [err] = json_lines(tmp_path / "errors.jsonl")
    assert err["type"] == "InvalidOutput" and (tmp_path / "results.jsonl").read_bytes() == b""



# -- BatchExplainer -----------------------------------------------------------------------------------

class _Session:
    """A stand-in onnxruntime session with the CAM graph's inputs and outputs: the logits given
    (row i of the batch gets row i), maps with a bright top-left corner. Records what it is fed."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits
        self.feeds: list[dict[str, np.ndarray]] = []

    def get_inputs(self) -> list[_Arg]:
        return [_Arg("input", ["batch", 3, *SIZE])]

    def get_overridable_initializers(self) -> list[_Arg]:
        return [_Arg("target", ["batch"])]

    def get_outputs(self) -> list[_Arg]:
        return [_Arg("logits", ["batch", None]), _Arg("cam", ["batch", 4, 4]),
                _Arg("cam_layercam", ["batch", 4, 4])]

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]

    def run(self, fetch: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append(feed)
        n = len(feed["input"])
        cams = np.zeros((n, 4, 4), np.float32)
        cams[:, :2, :2] = 1.0
        return [self.logits[:n], cams]


def _plan(out: Path, **over: Any) -> JobPlan:
    base = dict(model="r18.cam.onnx", out=str(out), cam_output="cam", method="gradcam", target=-1,
                topk=3, save=("npy",), max_pixels=10**6, meta=_meta())
    base.update(over)
    return JobPlan(**base)


def _decoded(name: str, size: tuple[int, int] = (20, 30)) -> Decoded:
    return Decoded(Item(f"in/{name}", name), torch.zeros(3, *SIZE), size, nbytes=3 * 64 * 64 * 4)


def test_explainer_one_row_per_image_and_a_bad_row_alone(tmp_path: Path) -> None:
    """One session run per batch; an image with non-finite scores is its own InvalidOutput record
    and gets no artefacts; its batch-mates get their lines, files and bbox."""
    logits = np.array([[5, 1, 0, 0, 0], [np.nan] * 5, [0, 0, 0, 1, 4]], np.float32)
    sess = _Session(logits)
    explainer = BatchExplainer(_plan(tmp_path), sess)
    submitted: list[str] = []

    def submit(fn: Callable[..., Any], d: Decoded, cam: np.ndarray) -> Future[Any]:
        submitted.append(d.item.name)
        done: Future[Any] = Future()
        done.set_result(fn(d, cam))
        return done

    batch = [_decoded("a.png"), _decoded("b.png"), _decoded("c.png", (40, 10))]
    out = explainer.explain(batch, submit)
    assert len(sess.feeds) == 1 and sess.feeds[0]["input"].shape == (3, 3, *SIZE)
    assert "target" not in sess.feeds[0]  # -1: each image's top-1, the graph's default
    assert submitted == ["a.png", "c.png"]
    a, b, c = out.rows
    assert isinstance(b, Failed) and b.type == "InvalidOutput" and b.item.name == "b.png"
    assert isinstance(a, Explained) and isinstance(c, Explained)
    line = c.result()
    assert (line["label"], line["width"], line["height"]) == ("eel", 10, 40)
    assert line["files"] == {"npy": "c.png.cam.npy"} and line["bbox"] is not None
    assert np.load(tmp_path / "c.png.cam.npy").shape == (4, 4)
    assert out.session_seconds >= 0 and out.metrics_seconds == 0 and a.metrics is None


def _no_artefacts(*args: Any) -> Future[Any]:
    raise AssertionError("no artefacts were expected")


def test_explainer_feeds_a_fixed_target_and_checks_the_logits(tmp_path: Path) -> None:
    sess = _Session(np.zeros((2, 5), np.float32))
    with ThreadPoolExecutor(2) as pool:
        out = BatchExplainer(_plan(tmp_path, target=4, save=()), sess).explain(
            [_decoded("a.png"), _decoded("b.png")], pool.submit)
        assert [r.result()["target"] for r in out.rows] == [4, 4]
    assert sess.feeds[0]["target"].tolist() == [4, 4]
    wide = _Session(np.zeros((1, 6), np.float32))  # a dynamic width the labels do not fit
    with pytest.raises(UsageError, match="logits of shape \\[1, 6\\] for 5 labels"):
        BatchExplainer(_plan(tmp_path), wide).explain([_decoded("a.png")], _no_artefacts)


def test_explainer_refuses_a_session_that_does_not_fit(tmp_path: Path) -> None:
    sess = _Session(np.zeros((1, 5), np.float32))
    sess.get_overridable_initializers = lambda: []  # no "target" input
    with pytest.raises(UsageError, match="'target'"):
        BatchExplainer(_plan(tmp_path, target=2), sess)


def test_explainer_metrics_through_its_own_session(graph: Path, images: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """``--metrics``: each line gets its rounded metrics, each row its unrounded ones, scored
    through the explainer's session."""
    from camserve.onnx.inputs import load_item

    plan = plan_job(JobConfig(model=graph, inputs=[str(images["root"])], out=tmp_path, save=(),
                              metrics=("deletion", "avg_drop"), metrics_steps=3))
    explainer = BatchExplainer.open(plan, device="cpu", threads=1)
    batch = [load_item(Item(str(images[k]), k), plan.meta, False, plan.max_pixels) for k in "abc"]
    with ThreadPoolExecutor(2) as pool:
        out = explainer.explain(batch, pool.submit)
        lines = [r.result() for r in out.rows]
    assert out.metrics_seconds > 0
    for r, line in zip(out.rows, lines):
        assert list(r.metrics) == ["deletion", "avg_drop"]
        assert line["metrics"] == {k: round(v, 6) for k, v in r.metrics.items()}
        json.dumps(line, allow_nan=False)
