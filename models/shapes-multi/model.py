"""ShapesNet: the small CNN of camserve's default model (8 synthetic shape classes, 96×96 RGB).

Standalone on purpose: TorchServe copies this file to the archive root and it is imported by file
path, so it imports torch only (never camserve).

Layout: ``features`` (an ``nn.Sequential``; its output, the last conv map, is the Grad-CAM target
layer) -> ``pool`` (mean of global average and global max pooling) -> ``fc``. Three 2× reductions
(a stride-2 stem, then two max-pools) leave a 12×12 map for a 96×96 input, so each map cell covers
8×8 pixels; the receptive field (53 px) is larger than any shape. No in-place op touches the
target layer's output.

Example::

    >>> import torch
    >>> net = ShapesNet(num_classes=8).eval()
    >>> net(torch.zeros(2, 3, 96, 96)).shape, net.features(torch.zeros(1, 3, 96, 96)).shape
    (torch.Size([2, 8]), torch.Size([1, 128, 12, 12]))
"""
from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3×3 convolution (no bias) + batch norm + ReLU; ``stride`` 2 halves the size."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class AvgMaxPool(nn.Module):
    """Global pooling to (B, C, 1, 1): the mean of global average and global max pooling.

    The max half lets a shape that covers a few cells of the map dominate its channel from the
    start of training (plain averaging dilutes it among the background cells, and training then
    idles for hundreds of steps); the average half keeps background activations in check. Grad-CAM
    is unchanged in form: the spatial mean of d logit / d features is still ``fc.weight / (h*w)``,
    so the map is the classic CAM, sum_k w_ck A_k.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, 1, 1)."""
        return 0.5 * (x.mean(dim=(-2, -1), keepdim=True) + x.amax(dim=(-2, -1), keepdim=True))


class ShapesNet(nn.Module):
    """A five-conv classifier: 96×96 -> 12×12×``width * 4`` features -> ``num_classes`` logits.

    Args:
        num_classes: number of output logits (8 for the shapes dataset).
        width: channels of the first block; later blocks use 2×, 4× and 4×.
    """

    def __init__(self, num_classes: int = 8, width: int = 32) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"invalid value for num_classes: {num_classes!r} (a positive int)")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"invalid value for width: {width!r} (a positive int)")
        w = width
        self.features = nn.Sequential(
            conv_block(3, w // 2, stride=2),  # 48×48
            conv_block(w // 2, w), nn.MaxPool2d(2),  # 24×24
            conv_block(w, 2 * w), nn.MaxPool2d(2),  # 12×12
            conv_block(2 * w, 4 * w),
            conv_block(4 * w, 4 * w),  # the Grad-CAM target: (B, 4w, 12, 12)
        )
        self.pool = AvgMaxPool()
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for a normalised batch (B, 3, H, W)."""
        return self.fc(self.pool(self.features(x)).flatten(1))
