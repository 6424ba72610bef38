"""camserve.onnx.trace: the task-aware CAM graph — each task's target inputs are graph inputs,
exported, verified against the engine in float64 and run with targets the engine is given too."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from camserve import CamEngine
from camserve.models import ModelSpec, from_module
from camserve.onnx.export import export_cam_onnx
from camserve.onnx.format import GraphMeta
from camserve.onnx.session import ort_session
from camserve.onnx.trace import CamGraph, trace_cam_graph
from camserve.tasks import TargetBatch, make_task
from camserve.tasks.segmentation import box_mask
from camserve.testing.nets import TinyEmbedNet, TinyNet, TinySegNet, calibrate_bn, frozen

SIZE = (40, 24)  # H, W: non-square


def _loaded(task: str) -> Any:
    """A small model of ``task`` as a model folder gives it."""
    net: nn.Module
    settings: dict[str, Any] = {}
    if task == "segmentation":
        net, labels, settings = TinySegNet(4, seed=0), ["bg", "a", "b", "c"], {"background": 0}
    elif task == "embedding":
        net, labels = TinyEmbedNet(6, seed=0), [str(i) for i in range(6)]
    else:
        net, labels = TinyNet(5, seed=0), list("abcde")
    spec = ModelSpec.from_config({"arch": "x:Net", "task": task, "input_size": list(SIZE),
                                  "target_layer": "features", **settings})
    return from_module(frozen(calibrate_bn(net, SIZE)), spec, labels=labels)


TASKS = ["classification", "multilabel", "segmentation", "embedding"]
INPUTS = {"classification": ["input", "target"], "multilabel": ["input", "target"],
          "segmentation": ["input", "target", "region"], "embedding": ["input", "reference"]}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any, Any]]:
    """Each task's graph, exported with two methods and verified (export_cam_onnx raises
    VerificationError when an output is off, in every case: explicit inputs, defaults, the
    optional inputs omitted, a batch of one)."""
    out = tmp_path_factory.mktemp("taskgraphs")
    made = {}
    for task in TASKS:
        lm = _loaded(task)
        info = export_cam_onnx(lm, out / f"{task}.onnx", methods=("gradcam", "layercam"), threads=1)
        made[task] = (info.path, lm, info)
    return made


@pytest.mark.parametrize("task", TASKS)
def test_inputs_outputs_and_metadata(task: str, graphs) -> None:
    path, lm, info = graphs[task]
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input if i.name in INPUTS[task]] == INPUTS[task]
    first = "embedding" if task == "embedding" else "logits"
    assert [o.name for o in proto.graph.output] == [first, "activations", "gradients", "cam",
                                                    "cam_layercam"]
    meta = GraphMeta.from_file(path)
    assert meta.spec.task == task and meta.input_names == INPUTS[task]
    assert set(info.errors) == {"explicit", "-1", "omitted", "batch1"}
    for case in info.errors.values():
        assert all(e < 1e-4 for e in case.values()), case


def test_classification_graph_keeps_its_interface(graphs) -> None:
    """Inputs and outputs of a classifier's graph are those of the graphs written before tasks."""
    meta = GraphMeta.from_file(graphs["classification"][0])
    props = meta.to_props()
    assert props["target"] == "int64 (N,) or (1,); negative = top-1 class; optional, default [-1]"
    proto = onnx.load(str(graphs["classification"][0]))
    target = next(i for i in proto.graph.input if i.name == "target")
    assert [d.dim_param for d in target.type.tensor_type.shape.dim] == ["target_batch"]


def _engine_maps(lm: Any, x: torch.Tensor, targets: TargetBatch) -> np.ndarray:
    task = make_task(lm.spec.task, lm.labels, lm.spec.task_settings)
    eng = CamEngine(lm.model, lm.layer, task=task, reshape=lm.reshape)
    return eng(x, targets=targets, method="gradcam").cams[:, 0].numpy()


def test_segmentation_region_input_equals_the_engine(graphs) -> None:
    path, lm, _ = graphs["segmentation"]
    sess = ort_session(path, threads=1)
    x = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    box = box_mask([2.5, 4, 20, 30], SIZE)
    region = torch.stack([box, torch.full(SIZE, -1.0), box])
    target = torch.tensor([2, 1, -1])
    logits, cam = sess.run(["logits", "cam"], {"input": x.numpy(), "target": target.numpy(),
                                               "region": region.numpy()})
    task = make_task("segmentation", lm.labels, lm.spec.task_settings)
    tb = task.graph_targets(torch.from_numpy(logits), {"target": target, "region": region})
    assert tb.index[:, 0].tolist()[:2] == [2, 1] and tb.index[2, 0] != 0  # -1: not the background
    torch.testing.assert_close(tb.region[0, 0], box)
    np.testing.assert_allclose(cam, _engine_maps(lm, x, tb), rtol=1e-4, atol=1e-5 * np.abs(cam).max())
    # one region for every row, broadcast; the region omitted: each class's predicted mask
    one = sess.run(["cam"], {"input": x.numpy(), "target": target.numpy(), "region": box[None].numpy()})[0]
    np.testing.assert_allclose(one[[0, 2]], cam[[0, 2]], rtol=1e-5, atol=1e-6)


def test_embedding_reference_input_equals_the_engine(graphs) -> None:
    path, lm, _ = graphs["embedding"]
    sess = ort_session(path, threads=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, *SIZE, generator=gen)
    ref = torch.randn(2, 6, generator=gen)
    emb, cam = sess.run(["embedding", "cam"], {"input": x.numpy(), "reference": ref.numpy()})
    task = make_task("embedding", lm.labels)
    np.testing.assert_allclose(emb, lm.model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cam, _engine_maps(lm, x, task.as_targets(ref[:, None], emb)),
                               rtol=1e-4, atol=1e-5 * np.abs(cam).max())
    with pytest.raises(Exception, match="reference"):  # required: no default
        sess.run(["cam"], {"input": x.numpy()})


def test_multilabel_label_input(graphs) -> None:
    path, lm, _ = graphs["multilabel"]
    sess = ort_session(path, threads=1)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    logits, cam = sess.run(["logits", "cam"], {"input": x.numpy(), "target": np.array([4, -1])})
    tb = TargetBatch(torch.tensor([[4], [int(np.argmax(logits[1]))]]), (1, 1))
    np.testing.assert_allclose(cam, _engine_maps(lm, x, tb), rtol=1e-4,
                               atol=1e-5 * np.abs(cam).max())


def test_cam_graph_checks_its_inputs() -> None:
    lm = _loaded("segmentation")
    cg = CamGraph(lm.model, "features", task=make_task("segmentation", lm.labels),
                  input_size=SIZE)
    assert cg.input_names == ["input", "target", "region"]
    with pytest.raises(ValueError, match="1 tensors for the inputs target, region"):
        cg(torch.zeros(1, 3, *SIZE), torch.tensor([-1]))
    task = make_task("segmentation", lm.labels)
    gm = trace_cam_graph(lm.model, None, torch.randn(2, 3, *SIZE), ("gradcam",), task=task)
    assert gm.meta["camserve"]["input_names"] == ["input", "target", "region"]
    # no logits here: the layer is located with the task's probe score
    from camserve.families import choose_layer

    assert gm.meta["camserve"]["layer"] == choose_layer(lm.model, SIZE, score=task.probe_score).name
