"""Hugging Face detectors (tiny random DETR and RT-DETR save_pretrained folders, no download):
loaded as detectors, their layer located, post-processing from the folder's image processor,
per-box Grad-CAM equal to an independent hook on the raw logits."""
from __future__ import annotations

import pytest
import torch

from camserve import CamEngine
from camserve.models import load_model_dir
from camserve.tasks import make_task
from camserve.tasks.detection import detection_targets

transformers = pytest.importorskip("transformers")
SIZE = (64, 96)
ID2LABEL = {0: "cat", 1: "dog", 2: "bird"}


def _detr():
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    bb = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                      layer_type="basic", out_features=["stage4"])
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=bb, use_pretrained_backbone=False,
                     num_queries=10, d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                     decoder_ffn_dim=32, num_labels=3, id2label=ID2LABEL,
                     label2id={v: k for k, v in ID2LABEL.items()})
    return DetrForObjectDetection(cfg), DetrImageProcessor()


def _rtdetr():
    from transformers import (RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor,
                              RTDetrResNetConfig)

    bb = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    cfg = RTDetrConfig(backbone_config=bb, use_pretrained_backbone=False, num_queries=10,
                       d_model=32, encoder_hidden_dim=32, encoder_in_channels=[32, 64, 64],
                       feat_strides=[8, 16, 32], encoder_layers=1, decoder_layers=1,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                       decoder_ffn_dim=32, num_labels=3, decoder_in_channels=[32, 32, 32],
                       num_feature_levels=3, decoder_n_points=2, id2label=ID2LABEL,
                       label2id={v: k for k, v in ID2LABEL.items()})
    return RTDetrForObjectDetection(cfg), RTDetrImageProcessor()


def _folder(tmp_path, build):
    torch.manual_seed(0)
    model, proc = build()
    model.eval().save_pretrained(tmp_path / "hf")
    proc.save_pretrained(tmp_path / "hf")
    (tmp_path / "model-config.yaml").write_text(
        "handler:\n  arch: hf:hf\n  task: detection\n  score_threshold: 0.0\n"
        f"  input_size: [{SIZE[0]}, {SIZE[1]}]\n")
    return load_model_dir(tmp_path)


def _scores_of(kind, logits):
    """The per-(query, class) detection scores, written out independently of transformers."""
    if kind == "detr":
        return torch.softmax(logits, -1)[..., :-1]
    return torch.sigmoid(logits)


@pytest.mark.parametrize("kind,build,layer", [
    ("detr", _detr, "model.input_projection"),
    ("rt_detr", _rtdetr, "model.backbone.model.encoder.stages.3"),
])
def test_hf_detector_folder_layer_labels_and_gradcam_equal_an_independent_hook(tmp_path, kind,
                                                                                build, layer):
    lm = _folder(tmp_path, build)
    assert lm.layer == layer and lm.labels == ["cat", "dog", "bird"] and lm.layout == "nchw"
    model = lm.model.double()
    task = make_task("detection", lm.labels, lm.spec.task_settings)
    eng = CamEngine(model, lm.layer, reshape=lm.reshape, task=task)
    x = torch.rand(1, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = eng.predict(x)[0]
    assert len(out) == 10 and out.boxes.shape == (10, 4)
    assert float(out.boxes[:, 2].max()) <= SIZE[1] and float(out.boxes[:, 3].max()) <= SIZE[0]
    rows = [[(int(out.labels[j]), out.boxes[j].tolist(), "score") for j in (0, 3)]]
    cams = eng(x, targets=detection_targets(rows, dtype=torch.float64), method="gradcam").cams
    acts = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        raw = type(model).__mro__[1].forward(model, x.clone().requires_grad_(True))  # transformers
    finally:
        handle.remove()
    scores = _scores_of(kind, raw.logits[0])
    cx, cy, w, h = raw.pred_boxes[0].unbind(-1)
    boxes = torch.stack([(cx - w / 2) * SIZE[1], (cy - h / 2) * SIZE[0], (cx + w / 2) * SIZE[1],
                         (cy + h / 2) * SIZE[0]], -1)
    for k, j in enumerate((0, 3)):
        q = int(((boxes.detach() - out.boxes[j]).abs().sum(1)).argmin())
        value = scores[q, int(out.labels[j])]
        assert float(value.detach()) == pytest.approx(float(out.scores[j]), rel=1e-9)
        (g,) = torch.autograd.grad(value, acts[0], retain_graph=True)
        ref = torch.relu((g[0].mean(dim=(-2, -1), keepdim=True) * acts[0][0]).sum(0))
        torch.testing.assert_close(cams[0, k], ref.detach(), rtol=1e-6, atol=1e-14)
