"""Auto-located layers per family, their grids (non-square inputs) and Grad-CAM parity with an
independent float64 reference (own hook + autograd, own reshape written from the family's
numbers), per-row targets. The sweeps are marked ``zoo``; a smoke subset runs unmarked."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from camserve.engine import CamEngine
from camserve.families import FamilyError, LayerChoice, locate, probe_layout
from camserve.layouts import TokenGrid
from camserve.sources import build_from_source
from camserve.testing.nets import calibrate_bn

TIMINGS: dict[str, float] = {}


def nchw(t: torch.Tensor) -> torch.Tensor:
    return t


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def tokens(prefix: int, gh: int, gw: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(t: torch.Tensor) -> torch.Tensor:
        assert t.shape[1] == prefix + gh * gw, t.shape
        return t[:, prefix:].reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)
    return f


def reference_gradcam(model: nn.Module, layer: str, reshape: Callable, x: torch.Tensor,
                      targets: list[int]) -> torch.Tensor:
    """Grad-CAM row by row in float64: hook, autograd, relu(sum_c mean_hw(G) * A)."""
    mod = model.get_submodule(layer)
    cams = []
    for i, t in enumerate(targets):
        store: dict[str, torch.Tensor] = {}

        def hook(_m, _i, out):
            store["a"] = out
        h = mod.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                xi = x[i:i + 1].clone().requires_grad_(True)
                out = model(xi)
                logits = out if isinstance(out, torch.Tensor) else out.logits
                (g,) = torch.autograd.grad(logits[0, t], store["a"])
        finally:
            h.remove()
        a, g = reshape(store["a"].detach()), reshape(g)
        w = g.mean(dim=(2, 3), keepdim=True)
        cams.append(torch.relu((w * a).sum(dim=1))[0])
    return torch.stack(cams)


def check_family(model: nn.Module, size: tuple[int, int], layer: str, grid: tuple[int, int],
                 reshape: Callable, name: str) -> LayerChoice:
    t0 = time.perf_counter()
    calibrate_bn(model, size, steps=2, seed=0)
    model = model.double()
    for p in model.parameters():
        p.requires_grad_(False)
    choice = locate(model, size)
    assert choice.name == layer, (name, choice)
    assert choice.grid == grid, (name, choice)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = [0, 2]
    res = CamEngine(model, choice.name, reshape=choice.reshape)(x, targets=targets)
    assert res.cams.shape == (2, *grid)
    assert res.targets.tolist() == targets
    ref = reference_gradcam(model, layer, reshape, x, targets)
    err = float((res.cams - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
    assert err < 1e-9, (name, err)
    assert float(ref.abs().max()) > 0, name
    TIMINGS[name] = time.perf_counter() - t0
    logging.getLogger(__name__).warning("ZOO %s layer=%s grid=%s parity=%.2e time=%.1fs", name,
                                        choice.name, choice.grid, err, TIMINGS[name])
    return choice


# (timm name, arch_args, input size (non-square), expected layer, grid, reference reshape)
TIMM_ZOO: list[tuple[str, dict[str, Any], tuple[int, int], str, tuple[int, int], Callable]] = [
    ("resnet26d", dict(layers=(1, 1, 1, 1)), (64, 96), "layer4", (2, 3), nchw),
    ("convnext_atto", dict(depths=(1, 1, 1, 1)), (64, 96), "stages.3", (2, 3), nchw),
    ("tinynet_e", {}, (64, 96), "bn2", (2, 3), nchw),  # EfficientNet, width 0.51, depth 0.6
    ("regnetx_002", {}, (64, 96), "s4", (2, 3), nchw),
    ("vit_tiny_patch16_224", dict(img_size=(64, 96), depth=2), (64, 96), "blocks.1.norm1", (4, 6),
     tokens(1, 4, 6)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=(64, 96), depth=2), (64, 96),
     "blocks.1.norm1", (4, 6), tokens(2, 4, 6)),
    ("vit_tiny_patch16_224", dict(img_size=(48, 80), depth=1, reg_tokens=4, no_embed_class=True),
     (48, 80), "blocks.0.norm1", (3, 5), tokens(5, 3, 5)),
    ("swin_tiny_patch4_window7_224", dict(img_size=(64, 96), window_size=4, embed_dim=24,
                                          depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
     (64, 96), "layers.3", (2, 3), nhwc),
    ("eva02_tiny_patch14_224", dict(img_size=(56, 84), depth=2), (56, 84), "blocks.1.norm1", (4, 6),
     tokens(1, 4, 6)),
    ("mobilevit_xxs", {}, (64, 96), "final_conv", (2, 3), nchw),
    ("fastvit_t8", dict(layers=(1, 1, 1, 1)), (64, 96), "final_conv", (2, 3), nchw),
    ("efficientvit_b0", {}, (64, 96), "head.in_conv", (2, 3), nchw),
]


def _timm_id(case: tuple) -> str:
    return case[0] + ("_reg" if "reg_tokens" in case[1] else "")


@pytest.mark.zoo
@pytest.mark.parametrize("case", TIMM_ZOO, ids=_timm_id)
def test_timm_family(case) -> None:
    pytest.importorskip("timm")
    name, args, size, layer, grid, reshape = case
    model, _ = build_from_source(f"timm:{name}", num_classes=3, arch_args=args)
    check_family(model, size, layer, grid, reshape, f"timm:{_timm_id(case)}")


# -- Hugging Face: tiny configs, random weights, save_pretrained, loaded back through hf: ---------

def hf_cases() -> list[tuple[str, Callable[[], nn.Module], tuple[int, int], str, tuple[int, int], Callable]]:
    tr = pytest.importorskip("transformers")
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               num_labels=3)
    return [
        ("vit", lambda: tr.ViTForImageClassification(tr.ViTConfig(image_size=(32, 48), patch_size=8, **vit)),
         (32, 48), "vit.layers.1.layernorm_before", (4, 6), tokens(1, 4, 6)),
        ("deit_distilled", lambda: tr.DeiTForImageClassificationWithTeacher(
            tr.DeiTConfig(image_size=(32, 48), patch_size=8, **vit)),
         (32, 48), "deit.layers.1.layernorm_before", (4, 6), tokens(2, 4, 6)),
        ("convnext", lambda: tr.ConvNextForImageClassification(
            tr.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=3)),
         (64, 96), "convnext.encoder.stages.3", (2, 3), nchw),
        ("resnet", lambda: tr.ResNetForImageClassification(
            tr.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                            layer_type="basic", num_labels=3)),
         (64, 96), "resnet.encoder.stages.3", (2, 3), nchw),
        ("swin", lambda: tr.SwinForImageClassification(
            tr.SwinConfig(image_size=(32, 64), patch_size=4, embed_dim=8, depths=[1, 1, 1],
                          num_heads=[1, 1, 1], window_size=2, num_labels=3)),
         (32, 64), "swin.layernorm", (2, 4), tokens(0, 2, 4)),
    ]


HF_IDS = ["vit", "deit_distilled", "convnext", "resnet", "swin"]


def save_hf(model: nn.Module, folder: Path, size: tuple[int, int]) -> None:
    """``save_pretrained`` the model with labels and a preprocessor config into ``folder``."""
    tr = pytest.importorskip("transformers")
    model.config.id2label = {i: f"class{i}" for i in range(3)}
    model.config.label2id = {f"class{i}": i for i in range(3)}
    calibrate_bn(model, size, steps=2, seed=0)
    model.save_pretrained(folder)
    tr.ViTImageProcessor(size={"height": size[0], "width": size[1]}, image_mean=[0.4, 0.45, 0.5],
                         image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)


@pytest.mark.zoo
@pytest.mark.parametrize("idx", range(len(HF_IDS)), ids=HF_IDS)
def test_hf_family(idx: int, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    name, make, size, layer, grid, reshape = hf_cases()[idx]
    torch.manual_seed(0)
    save_hf(make(), tmp_path / "hf", size)
    model, d = build_from_source("hf:hf", model_dir=tmp_path)
    assert d.labels == ["class0", "class1", "class2"] and d.input_size == size
    assert d.mean == (0.4, 0.45, 0.5) and d.std == (0.2, 0.25, 0.3)
    check_family(model, size, layer, grid, reshape, f"hf:{name}")


# -- fast smoke subset (unmarked) ---------------------------------------------------------------

def test_smoke_timm_vit_non_square() -> None:
    pytest.importorskip("timm")
    model, d = build_from_source("timm:vit_tiny_patch16_224", num_classes=3,
                                 arch_args=dict(img_size=(32, 64), depth=1, embed_dim=48, num_heads=2))
    assert d.input_size == (32, 64)
    check_family(model, (32, 64), "blocks.0.norm1", (2, 4), tokens(1, 2, 4), "smoke timm vit")


def test_smoke_hf_vit_distilled(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    name, make, size, layer, grid, reshape = hf_cases()[1]
    torch.manual_seed(0)
    save_hf(make(), tmp_path / "hf", size)
    model, _ = build_from_source("hf:hf", model_dir=tmp_path)
    check_family(model, size, layer, grid, reshape, "smoke hf deit")


def test_smoke_torchvision_resnet_non_square() -> None:
    import torchvision

    model = torchvision.models.resnet18(num_classes=3)
    check_family(model, (96, 64), "layer4", (3, 2), nchw, "smoke tv resnet18")


def tiny_tv_swin() -> nn.Module:
    import torchvision

    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1, 1, 1],
                                              num_heads=[1, 1, 1, 1], window_size=[4, 4],
                                              num_classes=3).eval()


def test_torchvision_swin_and_vit_rules() -> None:
    import torchvision

    swin = tiny_tv_swin()
    c = locate(swin, (64, 96))
    assert (c.name, c.layout, c.grid) == ("features.7", "nhwc", (2, 3))
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=3).eval()
    c = locate(vit, 32)
    assert (c.name, c.layout, c.grid) == ("encoder.layers.encoder_layer_0.ln_1", "tokens", (4, 4))
    assert isinstance(c.reshape, TokenGrid) and c.reshape.prefix == 1


def tiny_tv_maxvit() -> nn.Module:
    """torchvision MaxViT at 64x64 (built for one input size; its grid partition is square)."""
    import torchvision

    return torchvision.models.MaxVit(input_size=(64, 64), stem_channels=8, partition_size=2,
                                     block_channels=[8, 16, 16, 16], block_layers=[1, 1, 1, 1],
                                     head_dim=4, stochastic_depth_prob=0.0, num_classes=3).eval()


def test_torchvision_maxvit_rule() -> None:
    """MaxViT accepts no second input size, yet its blocks are NCHW: the family says so, for the
    located layer (Grad-CAM parity) and for named stem/block/block-layer outputs; an attention
    partition inside a layer (B, windows, tokens, C) still asks for ``layout:``."""
    from camserve.families import choose_layer

    torch.manual_seed(0)
    check_family(tiny_tv_maxvit(), (64, 64), "blocks.3", (2, 2), nchw, "tv maxvit")
    m = tiny_tv_maxvit()
    assert [(c.layout, c.grid) for c in (choose_layer(m, 64, n) for n in
            ("blocks.2", "blocks.3.layers.0", "stem"))] == [("nchw", (4, 4)), ("nchw", (2, 2)),
                                                            ("nchw", (32, 32))]
    with pytest.raises(FamilyError, match="set layout"):
        choose_layer(m, 64, "blocks.3.layers.0.layers.window_attention.partition_op")


def test_square_channels_first_map_is_not_channels_last() -> None:
    """resnet18 layer1 on 256x128 gives (1, 64, 64, 32): channels-first, 64x32 maps."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    assert probe_layout(model, "layer1", (256, 128)) == ("nchw", (64, 32))
    swin = tiny_tv_swin()
    assert probe_layout(swin, "features.1", (64, 64)) == ("nhwc", (16, 16))


def test_no_feature_map_lists_candidates() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.body(x))

    with pytest.raises(FamilyError, match="no 4-D feature map"):
        locate(Flat(), 8)


def test_attention_shaped_tensor_is_not_a_feature_map() -> None:
    """A 4-D tensor whose dims do not follow the input (B, heads, N, d) is never chosen."""
    class Att(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.split = nn.Unflatten(2, (2, 4))   # (B, N, 8) -> (B, N, 2, 4): heads-like
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)            # (B, N, 8)
            h = self.split(t).transpose(1, 2)                       # (B, 2, N, 4)
            return self.fc(h.transpose(1, 2).flatten(2).mean(1))

    c = locate(Att().eval(), (16, 24))
    assert (c.name, c.layout, c.grid) == ("conv", "nchw", (16, 24))


def test_fixed_size_model_without_conv_asks_for_layout() -> None:
    class Fixed(nn.Module):
        """Accepts one input size only; its map comes from a non-conv module."""

        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            if x.shape[-2:] != (8, 8):
                raise ValueError("fixed input size")
            return self.fc(self.mix(x).mean(dim=(1, 2)))

    with pytest.raises(FamilyError, match="layout"):
        locate(Fixed().eval(), 8)


def test_choose_layer_for_named_layers() -> None:
    """A named layer gets its layout from the config, the probe or the family, never the shape."""
    import torchvision

    from camserve.families import choose_layer

    res = torchvision.models.resnet18(num_classes=2).eval()
    c = choose_layer(res, (256, 128), "layer1")
    assert (c.layout, c.grid) == ("nchw", (64, 32))
    assert choose_layer(res, (64, 64)).name == "layer4"
    swin = tiny_tv_swin()
    assert choose_layer(swin, (64, 64), "features.3", "nhwc").grid == (8, 8)
    with pytest.raises(FamilyError, match="not a 4-D map"):
        choose_layer(res, (64, 64), "fc", "nchw")
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=3).eval()
    c = choose_layer(vit, 32, "encoder.layers.encoder_layer_0")
    assert (c.layout, c.grid, c.reshape.prefix) == ("tokens", (4, 4), 1)

    class Tok(nn.Module):
        """Tokens of an unknown family: 17 = 1 + 4x4 or 17 = 17x1 - ambiguous."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 8, stride=8)
            self.mix = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([t.mean(1, keepdim=True), t], dim=1)
            return self.fc(self.mix(t)[:, 0])

    with pytest.raises(FamilyError, match="set layout"):
        choose_layer(Tok().eval(), 32, "mix")
    c = choose_layer(Tok().eval(), 32, "mix", "tokens")
    assert (c.grid, c.reshape.prefix) == ((4, 4), 1)


def test_probes_leave_the_model_as_it_was() -> None:
    import torchvision

    from camserve.families import choose_layer

    model = torchvision.models.resnet18(num_classes=2).train()
    model.layer2.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choose_layer(model, (64, 64))
    choose_layer(model, (64, 64), "layer1")
    assert model.training and not model.layer2.training and model.layer3.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
