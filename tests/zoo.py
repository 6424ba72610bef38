"""The architecture list the contract tests run over: torchvision classifiers with fixed-seed random
weights, two target layers each (the last stage and an earlier one), small inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torchvision.models as tvm
from torch import nn

from camserve.testing.nets import calibrate_bn

NUM_CLASSES = 10


@dataclass(frozen=True)
class Arch:
    name: str
    layers: tuple[str, str]
    size: int = 64
    layout: Optional[str] = None  # None: NCHW conv maps
    kwargs: tuple = ()

    def build(self, dtype: torch.dtype = torch.float64) -> nn.Module:
        torch.manual_seed(0)
        model = tvm.get_model(self.name, weights=None, num_classes=NUM_CLASSES, **dict(self.kwargs))
        for m in model.modules():  # ViT zero-initialises its head: every gradient would be 0
            if isinstance(m, nn.Linear) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.02)
        calibrate_bn(model, self.size)  # 3 batches of 4, seed 123
        return model.to(dtype).eval()

    def input(self, batch: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.size, self.size, generator=g).to(dtype)


ARCHS: list[Arch] = [
    Arch("resnet18", ("layer4", "layer3")),
    Arch("resnet50", ("layer4", "layer3")),
    Arch("vgg11_bn", ("features.27", "features.14")),
    Arch("densenet121", ("features.denseblock4", "features.denseblock3")),
    Arch("mobilenet_v2", ("features.18", "features.14")),
    Arch("mobilenet_v3_small", ("features.12", "features.8")),
    Arch("efficientnet_b0", ("features.8", "features.5")),
    Arch("regnet_y_400mf", ("trunk_output.block4", "trunk_output.block3")),
    Arch("convnext_tiny", ("features.7", "features.5")),
    Arch("shufflenet_v2_x1_0", ("conv5", "stage3")),
    Arch("googlenet", ("inception5b", "inception4e"),
         kwargs=(("aux_logits", False), ("init_weights", True))),
    Arch("mnasnet0_5", ("layers.16", "layers.11")),
    Arch("vit_b_16", ("encoder.layers.encoder_layer_11.ln_1", "encoder.layers.encoder_layer_8.ln_1"),
         layout="tokens", kwargs=(("image_size", 64),)),
    Arch("swin_t", ("features.7", "features.5"), layout="nhwc"),
]

ARCH_BY_NAME = {a.name: a for a in ARCHS}


def reshape_for_reference(layout: Optional[str]):
    """The reshape_transform pytorch-grad-cam needs for the layout (None for NCHW)."""
    if layout == "tokens":
        def tokens(t: torch.Tensor) -> torch.Tensor:
            b, n, c = t.shape
            side = int((n - 1) ** 0.5)
            return t[:, 1:, :].reshape(b, side, side, c).permute(0, 3, 1, 2)
        return tokens
    if layout == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    return None
