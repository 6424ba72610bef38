"""ShapesDet: a small one-stage detector (CenterNet/FCOS-style) for the synthetic shapes scenes.

A plain CNN backbone brings a 96×96 image to a 12×12 grid (stride 8); the head predicts per cell
one logit per class (its sigmoid is the detection score at that cell) and the box as distances
``l, t, r, b`` from the cell centre (log-space, in strides). Decoding keeps the cells that are the
maximum of their 3×3 neighbourhood, above ``score_thresh``, then class-wise NMS
(``nms_thresh``) and the best ``detections_per_img``. ``forward`` returns torchvision-style
``[{"boxes", "scores", "labels"}]`` in input pixels; the scores keep their autograd history, so a
detection's score is differentiable back to the backbone (the target layer, ``backbone``).
Self-contained: torch and torchvision only.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ShapesDet(nn.Module):
    stride = 8

    def __init__(self, num_classes=8, width=32, score_thresh=0.3, nms_thresh=0.5,
                 detections_per_img=20):
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.backbone = nn.Sequential(
            _block(3, w // 2, 2), _block(w // 2, w, 2), _block(w, w, 1),
            _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1), _block(2 * w, 2 * w, 1))
        self.head = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(inplace=True))
        self.cls = nn.Conv2d(2 * w, num_classes, 1)
        self.reg = nn.Conv2d(2 * w, 4, 1)
        nn.init.constant_(self.cls.bias, -4.6)  # prior 0.01: focal-loss training starts stable

    def raw(self, x):
        """Class logits (B, C, h, w) and log box distances (B, 4, h, w)."""
        f = self.head(self.backbone(x))
        return self.cls(f), self.reg(f)

    def boxes(self, reg, size):
        """Boxes (B, h, w, 4) in input pixels from log distances (B, 4, h, w)."""
        b, _, h, w = reg.shape
        s = float(self.stride)
        ys = (torch.arange(h, device=reg.device, dtype=reg.dtype) + 0.5) * s
        xs = (torch.arange(w, device=reg.device, dtype=reg.dtype) + 0.5) * s
        d = reg.clamp(max=6.0).exp() * s
        x0 = xs[None, None, :] - d[:, 0]
        y0 = ys[None, :, None] - d[:, 1]
        x1 = xs[None, None, :] + d[:, 2]
        y1 = ys[None, :, None] + d[:, 3]
        out = torch.stack([x0, y0, x1, y1], dim=-1)
        hi = torch.tensor([size[1], size[0], size[1], size[0]], dtype=reg.dtype, device=reg.device)
        return torch.minimum(out.clamp(min=0), hi)

    def forward(self, x):
        logits, reg = self.raw(x)
        scores = torch.sigmoid(logits)
        with torch.no_grad():
            peak = scores == F.max_pool2d(scores, 3, 1, 1)
        boxes = self.boxes(reg, x.shape[-2:])
        b, c, h, w = scores.shape
        out = []
        for i in range(b):
            flat = scores[i].reshape(-1)
            keep = (peak[i].reshape(-1) & (flat.detach() > self.score_thresh)).nonzero()[:, 0]
            keep = keep[flat.detach()[keep].argsort(descending=True)][:1000]
            labels = keep // (h * w)
            bx = boxes[i].reshape(-1, 4)[keep % (h * w)]
            kept = batched_nms(bx.detach().float(), flat.detach()[keep].float(), labels,
                               self.nms_thresh)[:self.detections_per_img]
            out.append({"boxes": bx[kept], "scores": flat[keep[kept]], "labels": labels[kept]})
        return out
