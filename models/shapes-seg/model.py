"""ShapesSegNet: the small segmentation net of camserve's shapes-seg model (9 classes: background
and 8 synthetic shapes, 96×96 RGB).

Standalone on purpose: TorchServe copies this file to the archive root and it is imported by file
path, so it imports torch only (never camserve).

Layout, like torchvision's segmentation models: ``stem`` (stride 2, 48×48) -> ``encoder`` (two
2× reductions: its output, 12×12, is the encoder's last stage and the Grad-CAM target layer) ->
``decoder`` (the encoder's features upsampled to 48×48 and fused with the stem's) ->
``classifier`` (1×1) -> bilinear upsampling to the input. Returns the per-pixel logits
(B, 9, H, W).

Example::

    >>> import torch
    >>> net = ShapesSegNet().eval()
    >>> net(torch.zeros(2, 3, 96, 96)).shape, net.encoder(net.stem(torch.zeros(1, 3, 96, 96))).shape
    (torch.Size([2, 9, 96, 96]), torch.Size([1, 96, 12, 12]))
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_block(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    """Convolution (no bias) + batch norm + ReLU; ``stride`` 2 halves the size."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class ShapesSegNet(nn.Module):
    """Encoder-decoder: 96×96 -> 12×12×``4 * width`` -> 48×48 fused -> ``num_classes`` logits per
    pixel at the input size.

    Args:
        num_classes: output classes (9: background and the 8 shapes).
        width: channels of the stem; the encoder's stages use 1×, 2×, 4× and 4×.
    """

    def __init__(self, num_classes: int = 9, width: int = 24) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"invalid value for num_classes: {num_classes!r} (a positive int)")
        w = width
        self.stem = conv_block(3, w, stride=2)  # 48×48
        self.encoder = nn.Sequential(
            conv_block(w, w), nn.MaxPool2d(2),  # 24×24
            conv_block(w, 2 * w), nn.MaxPool2d(2),  # 12×12
            conv_block(2 * w, 4 * w),
            conv_block(4 * w, 4 * w),  # the Grad-CAM target: (B, 4w, 12, 12)
        )
        self.reduce = conv_block(4 * w, w, kernel=1)
        self.decoder = conv_block(2 * w, w)
        self.classifier = nn.Conv2d(w, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits (B, num_classes, H, W) for a normalised batch (B, 3, H, W)."""
        s = self.stem(x)
        e = self.reduce(self.encoder(s))
        up = F.interpolate(e, size=s.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.decoder(torch.cat([up, s], dim=1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
