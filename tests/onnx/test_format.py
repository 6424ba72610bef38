"""camserve.onnx.format: the graph metadata is the model description, written and read back."""
from __future__ import annotations

import json

import pytest

from camserve.models import ModelSpec
from camserve.onnx.format import (
    KEYS,
    NOT_WRITTEN,
    REQUIRED,
    SPEC_KEYS,
    GraphFormatError,
    GraphMeta,
    check_methods,
)


def _meta(**spec) -> GraphMeta:
    base = dict(arch="model:Net", target_layer="features.3", input_size=(40, 32),
                mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25), method="hirescam", topk=2,
                max_pixels=123456, outputs=("overlay", "bbox"), layout="nhwc")
    base.update(spec)
    return GraphMeta(ModelSpec(**base), labels=("circle", "Square", "star"),
                     methods=("hirescam", "GradCAM++"))


def test_round_trip() -> None:
    meta = _meta()
    props = meta.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert GraphMeta.from_props(props) == meta
    back = GraphMeta.from_props(props)
    assert back.spec.topk == 2 and back.spec.layout == "nhwc" and back.spec.outputs == ("overlay", "bbox")
    assert back.methods == ("hirescam", "gradcam++") and back.labels == ("circle", "Square", "star")
    assert back.spec.num_classes == 3 and back.spec.weights is None and back.spec.labels is None
    assert back.output_for("GradCAM++") == "cam_gradcampp" and back.output_for("hirescam") == "cam"
    # defaults come from ModelSpec (spelled once there)
    minimal = GraphMeta(ModelSpec(arch="a:B", target_layer="x"), labels=("a",), methods=("gradcam",))
    assert GraphMeta.from_props(minimal.to_props()) == minimal
    assert GraphMeta.from_props(minimal.to_props()).topk == ModelSpec(arch="a:B").topk


def test_every_key_is_written_once_and_named_in_the_tables() -> None:
    props = _meta().to_props()
    assert set(props) == set(SPEC_KEYS.values()) | set(KEYS.values())
    assert set(REQUIRED) <= set(props)


def test_every_model_spec_field_is_written_or_listed_as_not_written() -> None:
    """A field added to ModelSpec must be given a metadata key (or be listed as not written)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    assert fields == set(SPEC_KEYS) | set(NOT_WRITTEN)
    assert not set(SPEC_KEYS) & set(NOT_WRITTEN)


def test_existing_graph_keys_are_read() -> None:
    """The metadata of graphs written before the schema had a class (no method/outputs/layout/
    max_pixels keys) still reads, with ModelSpec's defaults."""
    old = {"camserve_version": "0.1.0", "arch": "torchvision.models.resnet18", "layer": "layer3",
           "methods": '["gradcam", "layercam"]',
           "cam_outputs": '{"gradcam": "cam", "layercam": "cam_layercam"}',
           "labels": '["a", "b"]', "num_classes": "2", "mean": "[0.5, 0.4, 0.3]",
           "std": "[0.25, 0.3, 0.2]", "input_size": "[64, 64]", "topk": "3",
           "target": "int64 (N,) or (1,); negative = top-1 class; optional, default [-1]"}
    meta = GraphMeta.from_props(old)
    assert meta.layer == "layer3" and meta.topk == 3 and meta.input_size == (64, 64)
    assert meta.max_pixels == ModelSpec(arch="x").max_pixels


@pytest.mark.parametrize("change,match", [
    ({"labels": None}, "metadata key 'labels' is missing"),
    ({"layer": None}, "metadata key 'layer' is missing"),
    ({"input_size": "[64]"}, "input_size"),
    ({"mean": "oops"}, "invalid metadata 'mean'"),
    ({"topk": "0"}, "topk"),
    ({"num_classes": "7"}, "3 labels for 7 classes"),
    ({"methods": '["nocam"]'}, "known: gradcam"),
    ({"cam_outputs": '{"hirescam": "cam"}'}, "does not fit 'methods'"),
])
def test_invalid_metadata_names_the_key(change: dict, match: str) -> None:
    props = _meta().to_props()
    for k, v in change.items():
        if v is None:
            del props[k]
        else:
            props[k] = v
    with pytest.raises(GraphFormatError, match=match) as exc:
        GraphMeta.from_props(props)
    assert str(exc.value).startswith("not a camserve CAM graph")


def test_check_methods() -> None:
    assert check_methods(["GradCAM", "gradcam", " layercam "]) == ("gradcam", "layercam")
    with pytest.raises(ValueError, match="empty"):
        check_methods([""])
    assert json.loads(_meta().to_props()["methods"]) == ["hirescam", "gradcam++"]


@pytest.mark.parametrize("task,settings,inputs,first", [
    ("classification", {}, ["target"], "logits"),
    ("multilabel", {"threshold": 0.3}, ["target"], "logits"),
    ("segmentation", {"background": 0}, ["target", "region"], "logits"),
    ("embedding", {"embedding_output": "pooler_output"}, ["reference"], "embedding"),
])
def test_task_inputs_and_outputs_are_recorded(task: str, settings: dict, inputs: list,
                                              first: str) -> None:
    meta = _meta(task=task, task_settings=settings)
    props = meta.to_props()
    assert list(json.loads(props[KEYS["inputs"]])) == inputs
    assert ("target" in props) == ("target" in inputs)
    back = GraphMeta.from_props(props)
    assert back == meta and back.spec.task_settings == settings
    assert back.input_names == ["input", *inputs] and back.output_names[0] == first
    assert back.task.name == task
    if task == "segmentation":
        assert back.inputs[1].shape == (40, 32)  # the region at the input size
    if task == "embedding":
        assert back.inputs[0].shape == (3,) and not back.inputs[0].optional  # D = the labels


def test_inputs_that_do_not_fit_the_task_are_refused() -> None:
    props = _meta(task="segmentation").to_props()
    props[KEYS["inputs"]] = json.dumps({"target": "x"})
    with pytest.raises(GraphFormatError, match="invalid metadata 'inputs' .the segmentation task's "
                                               "graph takes target, region"):
        GraphMeta.from_props(props)
    props[KEYS["inputs"]] = "{"
    with pytest.raises(GraphFormatError, match="'inputs'"):
        GraphMeta.from_props(props)
