"""camserve.tasks.segmentation: a class summed over a region, over every segmentation family
(parity with pytorch-grad-cam's SemanticSegmentationTarget in float64, non-square inputs), the
layer each family gets, regions from boxes and mask PNGs, hostile masks beside good rows, and the
class-mask answer."""
from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from camserve import CamEngine
from camserve.errors import OptionError, RequestError
from camserve.models import LoadedModel, ModelSpec, load_model, load_model_dir
from camserve.serving import CamService
from camserve.tasks import Geometry, Segmentation, TargetBatch, TaskError
from camserve.tasks.segmentation import box_mask, nearest_resize, parse_region
from camserve.testing.hostile import hostile_corpus
from camserve.testing.nets import TinySegNet, frozen, write_model_folder

SIZE = (72, 56)  # H, W: non-square
LABELS = ["background", "cat", "dog", "bird"]


def _hf_folder(root: Path, kind: str) -> str:
    """A tiny random Hugging Face segmentation folder (save_pretrained), no download."""
    from transformers import (ConvNextConfig, SegformerConfig, SegformerForSemanticSegmentation,
                              UperNetConfig, UperNetForSemanticSegmentation)

    torch.manual_seed(0)
    if kind == "segformer":
        model = SegformerForSemanticSegmentation(SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
            num_attention_heads=[1, 1], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
            decoder_hidden_size=16, num_labels=5))
    else:
        model = UperNetForSemanticSegmentation(UperNetConfig(
            backbone_config=ConvNextConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                           out_features=["stage1", "stage2", "stage3", "stage4"]),
            hidden_size=16, pool_scales=[1, 2], use_auxiliary_head=False, num_labels=5))
    model.eval().save_pretrained(root / kind)
    return f"hf:{kind}"


#: family -> (arch, the layer located automatically)
FAMILIES = {
    "deeplabv3_resnet50": ("torchvision.models.deeplabv3_resnet50", "backbone.layer4"),
    "fcn_resnet50": ("torchvision.models.fcn_resnet50", "backbone.layer4"),
    "deeplabv3_mobilenet_v3_large": ("torchvision.models.deeplabv3_mobilenet_v3_large", "backbone.16"),
    "lraspp_mobilenet_v3_large": ("torchvision.models.lraspp_mobilenet_v3_large", "backbone.16"),
    "segformer": ("hf", "segformer.stages.1"),
    "upernet": ("hf", "backbone.hidden_states_norms.stage4"),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], LoadedModel]:
    root = tmp_path_factory.mktemp("segfamilies")
    cache: dict[str, LoadedModel] = {}

    def load(name: str) -> LoadedModel:
        if name not in cache:
            arch, _ = FAMILIES[name]
            cfg = {"arch": arch, "task": "segmentation", "input_size": list(SIZE)}
            if arch == "hf":
                cfg["arch"] = _hf_folder(root, name)
            else:
                cfg["num_classes"] = 5
            cache[name] = load_model(ModelSpec.from_config(cfg), root, calibrate=True)
        return cache[name]

    return load


#: ResNet-50 backbones take half a minute each on two shared cores: the slow tier
HEAVY = {"deeplabv3_resnet50", "fcn_resnet50"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in FAMILIES])
def test_family_layer_output_and_parity_with_pytorch_grad_cam(name: str, family) -> None:
    """The layer is located as a practitioner would choose it; the output is (B, C, H, W) at the
    input size; the maps of a predicted-mask target and of a box region equal pytorch-grad-cam's
    SemanticSegmentationTarget in float64."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    lm = family(name)
    assert lm.layer == FAMILIES[name][1] and lm.num_classes == 5
    model64 = copy.deepcopy(lm.model).double()
    for p in model64.parameters():  # pytorch-grad-cam backpropagates through the parameters
        p.requires_grad_(True)
    task = Segmentation(lm.labels)
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model64(x)
    assert out.shape == (2, 5, *SIZE)
    pred = out.argmax(1)
    default = task.default_targets(out)
    classes = default.index[:, 0].tolist()
    box = box_mask([5.5, 10, 40, 50], SIZE)
    region = torch.stack([default.region[:, 0], box[None].expand(2, *SIZE)], dim=1)
    targets = TargetBatch(torch.tensor([[c, c] for c in classes]), (2, 2), region=region)
    eng = CamEngine(model64, lm.layer, task=task, reshape=lm.reshape)
    ours = eng(x, targets=targets, method="gradcam").heatmaps(SIZE)
    module = model64.get_submodule(lm.layer)
    for k, masks in enumerate(([(pred[r] == classes[r]).numpy() for r in range(2)],
                               [box.numpy()] * 2)):
        refs = [SemanticSegmentationTarget(classes[r], masks[r].astype(np.float64)) for r in range(2)]
        with GradCAM(model=model64, target_layers=[module]) as cam:
            ref = cam(input_tensor=x, targets=refs)
        for r in range(2):
            if float(ours[r, k].max()) == 0.0 and float(ref[r].max()) == 0.0:
                continue
            np.testing.assert_allclose(ours[r, k].numpy(), ref[r], atol=1e-6, rtol=0)


def test_layer_override_and_config_keys(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "seg", frozen(TinySegNet(4, seed=0)), {
        "arch": "model:TinySegNet", "num_classes": 4, "input_size": [40, 24], "task": "segmentation",
        "target_layer": "features.2", "background": 0}, labels=LABELS,
        model_py="from camserve.testing.nets import TinySegNet\n")
    lm = load_model_dir(folder)
    assert lm.layer == "features.2" and lm.spec.task_settings == {"background": 0}
    assert lm.model(torch.zeros(1, 3, 40, 24)).shape == (1, 4, 40, 24)  # the dict's "out"
    for bad in (-1, "x", True):
        with pytest.raises(Exception, match="handler.background"):
            ModelSpec.from_config({"arch": "x:Y", "task": "segmentation", "background": bad})
    with pytest.raises(TaskError, match="handler.background"):
        Segmentation(LABELS, {"background": 9})


def test_targets_scores_and_shares() -> None:
    task = Segmentation(LABELS, {"background": 0})
    logits = torch.zeros(2, 4, 4, 6)
    logits[0, 1, :2] = 3.0
    logits[0, 2, 2:, :2] = 2.0
    logits[1, 0] = 1.0
    assert task.shares(logits[0]) == [(1, 0.5), (0, 1 / 3), (2, 1 / 6)]
    o = task.parse_options({}, max_targets=16)
    tb = task.request_targets(logits, [o, o], [Geometry((6, 4), (4, 6))] * 2, [1, 3])
    assert tb.index[0].tolist() == [1] and tb.count == (1, 0)  # row 1: background only
    assert task.scores(logits, tb)[0, 0].item() == pytest.approx(36.0)
    named = task.parse_options({"target": "dog, cat"}, max_targets=16)
    tb = task.request_targets(logits[:1], [named], [Geometry((6, 4), (4, 6))], [1])
    assert tb.index.tolist() == [[2, 1]] and task.scores(logits[:1], tb).tolist() == [[8.0, 36.0]]
    # a region without target: the class predicted most inside it
    bound = task.bind(task.parse_options({"region": [0, 3, 2, 4]}, max_targets=16),
                      Geometry((6, 4), (4, 6)))
    tb = task.request_targets(logits[:1], [bound], [Geometry((6, 4), (4, 6))], [3])
    assert tb.index.tolist() == [[2]] and tb.box[0, 0].tolist() == [0.0, 3.0, 2.0, 4.0]
    shown = task.shown(logits[0], tb, 0, Geometry((60, 40), (4, 6)))
    assert shown[0].label == "dog" and shown[0].box == (0.0, 30.0, 20.0, 40.0)
    # the engine's classic forms: classes over their predicted masks; -1 the default class
    tb = task.as_targets([2, -1], logits)
    assert tb.index.tolist() == [[2], [1]] and tb.count == (1, 1)


def test_graph_targets_resolve_like_the_request_targets() -> None:
    task = Segmentation(LABELS, {"background": 0})
    logits = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    tb = task.graph_targets(logits, {"target": torch.tensor([-1]), "region": torch.full((1, 1, 1), -1.0)})
    o = task.parse_options({}, max_targets=16)
    req = task.request_targets(logits, [o] * 3, [Geometry((7, 5), (5, 7))] * 3, [1] * 3)
    assert tb.index[:, 0].tolist() == req.index[:, 0].tolist()
    torch.testing.assert_close(tb.region[:, 0], req.region[:, 0])


def test_box_mask_and_nearest_resize() -> None:
    m = box_mask([0.25, 0.5, 2.5, 2.0], (3, 3))
    assert m.sum().item() == pytest.approx(2.25 * 1.5)
    assert m[0].tolist() == [0.375, 0.5, 0.25]
    mask = np.arange(6).reshape(2, 3)
    assert nearest_resize(mask, (3, 2)) is mask
    assert nearest_resize(mask, (6, 4))[3].tolist() == [3, 3, 4, 4, 5, 5]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("value,match", [
    ("[1, 2, 3]", "a box"), ([1, 2, 1, 4], "x0 < x1"), ([0, 0, float("nan"), 1], "a box"),
    ([True, 0, 1, 1], "a box"), ("[[[[", "not a JSON list"), ("hello", "not valid base64"),
    (b"\xff\xfe", "not UTF-8"), (b"GIF89a" + bytes(400), "not a PNG"),
    (base64.b64encode(b"GIF89a" + bytes(40)).decode(), "not a PNG"), ({"x": 1}, "region"),
])
def test_bad_regions_are_refused_naming_the_option(value, match: str) -> None:
    with pytest.raises(OptionError, match=match) as info:
        parse_region(value)
    assert str(info.value).startswith("invalid value for region") and len(str(info.value)) < 300


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.lists(st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=3)),
                          max_size=6)))
def test_region_parser_never_crashes(value) -> None:
    try:
        parse_region(value)
    except RequestError as exc:
        assert exc.code in (400, 413, 422)


def test_mask_regions_bound_to_the_image() -> None:
    task = Segmentation(LABELS)
    geo = Geometry((40, 20), (10, 20))  # image W x H = 40 x 20, input 10 x 20
    mask = Image.new("L", (40, 20), 0)
    mask.paste(255, (0, 0, 20, 10))
    bound = task.bind(task.parse_options({"region": _png(mask)}, max_targets=16), geo)
    assert bound.mask.shape == (10, 20) and bound.mask.sum().item() == pytest.approx(50.0)
    wrong = task.parse_options({"region": _png(Image.new("L", (39, 20)))}, max_targets=16)
    with pytest.raises(OptionError, match="the mask is 39x20 pixels, the image 40x20"):
        task.bind(wrong, geo)
    with pytest.raises(OptionError, match="lies outside the 40x20 image"):
        task.bind(task.parse_options({"region": "[50, 0, 60, 5]"}, max_targets=16), geo)


def _image(seed: int, size: tuple[int, int] = (48, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    return _png(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def service() -> CamService:
    spec = ModelSpec.from_config({"arch": "x:TinySegNet", "num_classes": 4, "task": "segmentation",
                                  "background": 0, "input_size": [32, 32], "mean": [0.5] * 3,
                                  "std": [0.25] * 3, "topk": 2, "target_layer": "features"})
    net = frozen(TinySegNet(4, seed=1))
    from camserve.sources import ensure_dense

    ensure_dense(net)
    return CamService(LoadedModel(model=net, spec=spec, labels=LABELS, layer="features",
                                  device=torch.device("cpu")))


def test_served_rows_with_hostile_masks_beside_good_ones(service: CamService) -> None:
    corpus = hostile_corpus()
    half = Image.new("L", (48, 30), 0)
    half.paste(255, (0, 0, 24, 30))
    rows = [
        {"data": _image(1), "explain": "true", "outputs": "heatmap,overlay,bbox"},
        {"data": _image(2), "explain": "true", "region": "[0, 0, 24, 15]"},
        {"data": _image(3), "explain": "true", "region": base64.b64encode(_png(half)).decode(),
         "target": "dog"},
        {"data": _image(4), "explain": "true", "region": _png(half)},  # a form file
        {"data": _image(5), "region": _png(Image.new("L", (47, 30)))},  # wrong size
        {"data": _image(6), "region": corpus["png_declares_65535"].data},  # huge
        {"data": _image(7), "region": corpus["png_bomb_10000"].data},  # a bomb of another size
        {"data": _image(8, (64, 64)), "region": corpus["png_truncated_half"].data},  # corrupt
        {"data": _image(9), "region": _image(9)[:30] + b"\x00" * 10},
        {"data": _image(10), "region": "not base64 at all!"},
        {"data": _image(11), "region": [0, 0, 1e9, "x"]},
        {"data": _image(12)},  # predict only: the mask, no maps
    ]
    out = service.handle_batch(rows)
    status = [r.status for r in out.results]
    assert status == [200, 200, 200, 200, 422, 413, 422, 422, 422, 422, 422, 200], status
    for r in out.results[4:11]:
        assert "region" in r.body["message"] and len(r.body["message"]) < 400
    first = out.results[0].body
    seg = first["segmentation"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(seg["mask"]))))
    assert mask.shape == (30, 48) and set(np.unique(mask)) <= set(range(4))
    assert seg["width"] == 48 and sum(c["share"] for c in seg["classes"]) == pytest.approx(1, abs=1e-5)
    predicted = [c["index"] for c in seg["classes"] if c["index"] != 0][:2]
    assert [e["target"] for e in first["explanations"]] == predicted
    assert len(out.results[1].body["explanations"]) == 1
    third = out.results[2].body["explanations"]
    assert [e["target"] for e in third] == [2] and 0 <= third[0]["score"] <= 1
    assert "explanations" not in out.results[11].body and "segmentation" in out.results[11].body
    assert service.describe()["task"] == "segmentation" and "region" in service.describe()["options"]


def test_the_mask_counts_in_the_work_budget(service: CamService) -> None:
    """A predict-only request still makes a mask: over the budget at the full size it is made at
    the capped map size (and says so); the JSON stays parseable."""
    from camserve.options import ServingLimits

    svc = copy.copy(service)
    svc.limits = ServingLimits(max_map_side=32, max_row_work=1, max_batch_work=1)
    big = _image(1, (1200, 1000))
    out = svc.handle_batch([{"data": big}])
    seg = json.loads(out.results[0].to_json())["segmentation"]
    assert out.results[0].status == 200 and seg["scaled"] is True
    assert (seg["mask_width"], seg["mask_height"]) == (32, 27) and seg["width"] == 1200
