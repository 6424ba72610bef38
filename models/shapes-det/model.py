"""ShapesDet: a small one-stage detector (CenterNet/FCOS-style) for the synthetic shapes scenes.

A plain CNN backbone brings a 96×96 image to a 12×12 grid (stride 8); the head predicts per cell
one logit per class (its sigmoid is the detection score at that cell) and the box as distances
``l, t, r, b`` from the cell centre (log-space, in strides). Decoding keeps the cells that are the
maximum of their 3×3 neighbourhood, above ``score_thresh``, then class-wise greedy NMS
(``nms_thresh``) and the best ``detections_per_img``. ``fixed_detections`` does it with tensor
operations only (a fixed number of detections per image, padded), so that the whole decoding,
NMS included, can be traced into an ONNX graph with exact per-box gradients; ``forward`` returns
its valid rows as torchvision-style ``[{"boxes", "scores", "labels"}]`` in input pixels. The
scores keep their autograd history, so a detection's score is differentiable back to the
backbone (the target layer, ``head``). Self-contained: torch only.
"""
import torch
import torch.nn.functional as F
from torch import nn


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

    def fixed_detections(self, x):
        """``{"boxes": (B, M, 4), "scores": (B, M), "labels": (B, M)}``, M = ``detections_per_img``,
        best first; entries past an image's detections have score 0, label -1 and a zero box.

        Greedy NMS as M picks: the best remaining peak above ``score_thresh``, then every peak of
        its class whose box overlaps it by IoU > ``nms_thresh`` is removed (what
        ``torchvision.ops.batched_nms`` keeps, in its order)."""
        logits, reg = self.raw(x)
        scores = torch.sigmoid(logits)
        b, c, h, w = scores.shape
        n = c * h * w
        with torch.no_grad():
            peak = scores == F.max_pool2d(scores, 3, 1, 1)
        cells = self.boxes(reg, x.shape[-2:]).reshape(b, 1, h * w, 4)
        boxes = cells.expand(b, c, h * w, 4).reshape(b, n, 4)
        flat = scores.reshape(b, n)
        label_of = torch.arange(n, device=x.device) // (h * w)
        position = torch.arange(n, device=x.device)
        with torch.no_grad():
            live = peak.reshape(b, n) & (flat > self.score_thresh)
            bx = boxes.detach()
            area = (bx[..., 2] - bx[..., 0]) * (bx[..., 3] - bx[..., 1])
            picks, oks = [], []
            for _ in range(int(self.detections_per_img)):
                idx = torch.where(live, flat, torch.full_like(flat, -1.0)).argmax(dim=1)
                ok = live.gather(1, idx[:, None])[:, 0]
                top = bx.gather(1, idx[:, None, None].expand(b, 1, 4))  # (B, 1, 4)
                lt = torch.maximum(top[..., :2], bx[..., :2])
                rb = torch.minimum(top[..., 2:], bx[..., 2:])
                wh = (rb - lt).clamp(min=0)
                inter = wh[..., 0] * wh[..., 1]
                iou = inter / (area.gather(1, idx[:, None]) + area - inter)
                same = label_of[None, :] == label_of[idx][:, None]
                live = live & ~((iou > self.nms_thresh) & same) & (position[None, :] != idx[:, None])
                picks.append(idx)
                oks.append(ok)
            idx = torch.stack(picks, dim=1)  # (B, M)
            ok = torch.stack(oks, dim=1)
        score = torch.where(ok, flat.gather(1, idx), torch.zeros_like(flat[:, :1]))
        box = torch.where(ok[..., None], boxes.gather(1, idx[..., None].expand(*idx.shape, 4)),
                          torch.zeros_like(boxes[:, :1]))
        label = torch.where(ok, label_of[idx], torch.full_like(idx, -1))
        return {"boxes": box, "scores": score, "labels": label}

    def forward(self, x):
        d = self.fixed_detections(x)
        out = []
        for i in range(x.shape[0]):
            keep = d["labels"][i] >= 0
            out.append({"boxes": d["boxes"][i][keep], "scores": d["scores"][i][keep],
                        "labels": d["labels"][i][keep]})
        return out
