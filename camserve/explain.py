"""Batched explanation in stages with plain data between them.

1. :func:`target_table` — each explain row's targets as one (R, K) table (``-1``: the row's top-1
   class; shorter lists padded with their first entry) plus the real count per row;
2. :func:`batch_cams` — one forward over the whole batch, gradients only for the explain rows,
   the most common method from the engine and the other methods recomputed from the same
   activations and gradients -> :class:`BatchCams`;
3. :func:`batch_heatmaps` — the uint8 maps the rows need, at each image's size, with one
   device-to-host copy;
4. :func:`render_row` — one row's :class:`camserve.records.Explanation` records, complete (score
   included), with the outputs it asked for (bbox, heatmap PNG, overlay PNG, raw CAM).

Example::

    >>> import torch
    >>> from camserve.options import RequestOptions
    >>> o = RequestOptions(explain=True, targets=(2, 0), topk=1, method="gradcam",
    ...                    outputs=("bbox",))
    >>> t = target_table([o, RequestOptions(True, None, 1, "gradcam", ("bbox",))])
    >>> t.table.tolist(), t.counts
    ([[2, 0], [-1, -1]], (2, 1))
    >>> t.resolve(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])).tolist()
    [[2, 0], [0, 0]]
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .engine import CamEngine, heatmaps_at_sizes
from .methods import get_method
from .options import RequestOptions
from .records import Explanation
from .render import b64, bbox_from_heatmap, heatmap_png, overlay_png

MAP_OUTPUTS = frozenset({"heatmap", "overlay", "bbox"})


@dataclass(frozen=True)
class TargetTable:
    """Targets of the explain rows: ``table`` (R, K) long, ``-1`` = top-1; ``counts`` per row."""

    table: torch.Tensor
    counts: tuple[int, ...]

    @property
    def k(self) -> int:
        """Targets per row in the table (the largest count)."""
        return int(self.table.shape[1])

    def resolve(self, logits: torch.Tensor) -> torch.Tensor:
        """The table with ``-1`` replaced by each row's top-1 class (``logits``: (R, classes))."""
        top1 = logits.argmax(dim=1, keepdim=True).expand(-1, self.k)
        t = self.table.to(logits.device)
        return torch.where(t < 0, top1, t)


def target_table(options: Sequence[RequestOptions]) -> TargetTable:
    """One row per explain request (see the module docstring)."""
    lists = [list(o.targets) if o.targets else [-1] for o in options]
    k = max(len(t) for t in lists)
    rows = [t + [t[0]] * (k - len(t)) for t in lists]
    return TargetTable(torch.tensor(rows, dtype=torch.long), tuple(len(t) for t in lists))


@dataclass(frozen=True)
class BatchCams:
    """CAMs of the explain rows: ``cams`` (R, K, h, w) raw, ``targets`` (R, K) on the host,
    ``logits`` of the whole batch (B, classes), the target ``layer``."""

    cams: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    layer: str


def _recompute_methods(cams: torch.Tensor, A: torch.Tensor, G: torch.Tensor,
                       methods: Sequence[str], main: str) -> torch.Tensor:
    """Rows whose method is not ``main`` get their CAMs from their own method (same A and G)."""
    if all(m == main for m in methods):
        return cams
    cams = cams.clone()
    for m in set(methods) - {main}:
        sel = torch.tensor([i for i, mm in enumerate(methods) if mm == m], device=cams.device)
        cams[sel] = get_method(m)(A[sel], G[sel]).to(cams.dtype)
    return cams


def batch_cams(engine: CamEngine, x: torch.Tensor, rows: Sequence[int],
               options: Sequence[RequestOptions], table: TargetTable) -> BatchCams:
    """One engine call over batch ``x`` explaining ``rows`` (their ``options`` and ``table``)."""
    methods = [o.method for o in options]
    main = Counter(methods).most_common(1)[0][0]
    k = table.k
    res = engine(x, targets=lambda lg: table.resolve(lg) if k > 1 else table.resolve(lg)[:, 0],
                 method=main, rows=list(rows))
    cams = res.cams if k > 1 else res.cams[:, None]
    G = res.gradients if k > 1 else res.gradients[:, None]
    cams = _recompute_methods(cams, res.activations[:, None], G, methods, main)
    targets = (res.targets if k > 1 else res.targets[:, None]).cpu()
    return BatchCams(cams=cams, targets=targets, logits=res.logits, layer=res.layer)


def batch_heatmaps(cams: BatchCams, counts: Sequence[int], options: Sequence[RequestOptions],
                   images: Sequence[Image.Image]) -> dict[tuple[int, int], np.ndarray]:
    """uint8 maps at each image's size for the rows that asked for a heatmap, overlay or bbox,
    keyed by (explain row, target slot); one device-to-host copy."""
    need = [(i, q) for i, o in enumerate(options) if MAP_OUTPUTS.intersection(o.outputs)
            for q in range(counts[i])]
    if not need:
        return {}
    sel = torch.stack([cams.cams[i, q] for i, q in need])
    sizes = [(images[i].height, images[i].width) for i, _ in need]
    return dict(zip(need, heatmaps_at_sizes(sel, sizes)))


def _raw(cam: torch.Tensor) -> dict:
    arr = cam.float().cpu().numpy()
    return {"shape": [int(arr.shape[0]), int(arr.shape[1])], "data": arr.tolist()}


def render_row(image: Image.Image, options: RequestOptions, cams: torch.Tensor,
               targets: Sequence[int], maps: Sequence[Optional[np.ndarray]],
               probs: torch.Tensor, labels: Sequence[str], layer: str) -> list[Explanation]:
    """One row's explanations: ``cams`` (K, h, w) raw, ``targets`` and ``maps`` (uint8 at the
    image size, or None) per target, ``probs`` the row's class probabilities."""
    outs = options.outputs
    records = []
    for cam, cls, hm in zip(cams, targets, maps):
        cls = int(cls)
        records.append(Explanation(
            target=cls, label=labels[cls], score=float(probs[cls]), method=options.method,
            layer=layer, width=image.width, height=image.height,
            bbox=bbox_from_heatmap(hm) if "bbox" in outs and hm is not None else None,
            heatmap=b64(heatmap_png(hm)) if "heatmap" in outs and hm is not None else None,
            overlay=b64(overlay_png(image, hm)) if "overlay" in outs and hm is not None else None,
            raw=_raw(cam) if "raw" in outs else None,
            with_bbox="bbox" in outs))
    return records
