"""Tiny networks for tests, BatchNorm calibration of random networks, and model folders.

* :class:`TinyNet`: conv stack -> pool -> fc; target layer ``features`` (8×8 for a 32×32 input).
* :class:`TinySegNet` (``{"out": (B, C, H, W)}``, target ``features``) and
  :class:`TinyEmbedNet` (a vector, or a dict holding it; target ``features``): the dense tasks.
* :class:`TinyBNNet`: with BatchNorm and in-place ReLU; target ``features.3``; its source is
  self-contained (``import torch`` / ``from torch import nn``), so it can be written to a model
  folder's ``model.py`` (:func:`model_source`).
* :class:`WarpNet`: a fixed spatial transformer (``grid_sample``) after its target layer
  ``features``: its forward exports to ONNX, its backward (``grid_sampler_2d_backward``) does not.
* :func:`tiny_spec`: the ModelSpec that serves a six-class TinyNet (labels :data:`TINY_LABELS`).
* :func:`calibrate_bn`: running statistics of random input for freshly initialised BatchNorm layers,
  so deep random nets (MobileNetV3, EfficientNet) give logits of a sane magnitude.
* :func:`write_model_folder`: a model folder laid out like an extracted archive
  (``model-config.yaml``, weights, ``index_to_name.json``, optionally ``model.py``).

Example::

    >>> import torch
    >>> net = frozen(TinyNet(num_classes=4, seed=0))
    >>> net(torch.zeros(2, 3, 32, 32)).shape, net.features(torch.zeros(1, 3, 32, 32)).shape[-2:]
    (torch.Size([2, 4]), torch.Size([8, 8]))
    >>> any(p.requires_grad for p in net.parameters()), net.training
    (False, False)
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from camserve.models import ModelSpec


class TinyNet(nn.Module):
    """conv -> conv (the target, 8×8 for a 32×32 input) -> pool -> fc."""

    def __init__(self, num_classes: int = 6, seed: Optional[int] = None) -> None:
        if seed is not None:
            torch.manual_seed(seed)
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.features(x))).flatten(1))


#: The labels a six-class :class:`TinyNet` serves in tests (:func:`tiny_spec`).
TINY_LABELS = ("circle", "square", "triangle", "star", "cross", "ring")


def tiny_spec(**over: Any) -> "ModelSpec":
    """The :class:`camserve.models.ModelSpec` that serves a six-class :class:`TinyNet`: target
    ``features``, 32×32 input, mean 0.5, std 0.25, topk 3; ``over`` replaces handler keys (and is
    validated like a config file's ``handler:`` block).

    Example::

        >>> spec = tiny_spec(topk=2)
        >>> spec.target_layer, spec.topk, spec.num_classes
        ('features', 2, 6)
    """
    from camserve.models import ModelSpec

    cfg = {"arch": "x:TinyNet", "num_classes": len(TINY_LABELS), "target_layer": "features",
           "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "topk": 3, **over}
    return ModelSpec.from_config(cfg)


class TinyBNNet(nn.Module):
    """A small CNN with BatchNorm and in-place ReLU; target layer ``features.3`` (the pool)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinySegNet(nn.Module):
    """A dense-prediction net shaped like torchvision's: conv ``features`` (target, stride 4) ->
    1×1 ``classifier`` -> bilinear upsampling to the input, returned as ``{"out": logits}``."""

    def __init__(self, num_classes: int = 4, seed: Optional[int] = None) -> None:
        if seed is not None:
            torch.manual_seed(seed)
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1))
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.classifier(torch.relu(self.features(x)))
        return {"out": nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear",
                                                 align_corners=False)}


class TinyEmbedNet(nn.Module):
    """An embedding net: conv ``features`` (target) -> pooled -> linear to ``dim``; returns the
    vector (``named``: ``{"embedding": v, "tokens": ...}``, an output to pick by name)."""

    def __init__(self, dim: int = 8, seed: Optional[int] = None, named: bool = False) -> None:
        if seed is not None:
            torch.manual_seed(seed)
        super().__init__()
        self.named = named
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1))
        self.proj = nn.Linear(16, dim)

    def forward(self, x: torch.Tensor) -> Any:
        f = torch.relu(self.features(x))
        v = self.proj(f.mean(dim=(-2, -1)))
        return {"tokens": f.flatten(2), "embedding": v} if self.named else v


class WarpNet(nn.Module):
    """conv (the target ``features``, H×W) -> a fixed affine warp (``grid_sample``) -> conv ->
    pool -> fc: a model whose CAM graph's backward has no ONNX form."""

    def __init__(self, num_classes: int = 4, seed: Optional[int] = 0) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, num_classes))
        self.register_buffer("theta", torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 0.9, 0.0]]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        grid = nn.functional.affine_grid(self.theta.expand(a.shape[0], 2, 3), list(a.shape),
                                         align_corners=False)
        return self.head(nn.functional.grid_sample(a, grid, align_corners=False))


def small_sequential(num_classes: int = 5, seed: Optional[int] = 0) -> nn.Sequential:
    """An ``nn.Sequential`` CNN (BatchNorm, in-place ReLU); numbered layers, e.g. target ``"3"``."""
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with parameters that do not require grad (a serving copy); returned
    for chaining."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def calibrate_bn(model: nn.Module, size: int | tuple[int, int], steps: int = 3, batch: int = 4,
                 seed: int = 123) -> nn.Module:
    """Give the BatchNorm layers of a randomly initialised ``model`` the running statistics of
    ``steps`` batches of seeded random input of ``size`` (an int or ``(H, W)``): the tests' defaults
    for :func:`camserve.models.recalibrate_batchnorm` (which does the work). Leaves the model in
    eval mode, with or without BatchNorm, and returns it.

    Example::

        >>> net = calibrate_bn(small_sequential(), 16)
        >>> bool(net[1].running_var.ne(1).any()), net.training
        (True, False)
    """
    from camserve.models import recalibrate_batchnorm

    h, w = (size, size) if isinstance(size, int) else size
    return recalibrate_batchnorm(model, (h, w), steps=steps, batch=batch, seed=seed).eval()


def model_source(*classes: type) -> str:
    """The source of a ``model.py`` defining ``classes`` (self-contained nn.Module classes such as
    :class:`TinyBNNet`), with the torch imports they use."""
    return "import torch\nfrom torch import nn\n\n\n" + "\n\n".join(
        inspect.getsource(c) for c in classes)


def write_model_folder(folder: str | Path, model: nn.Module, handler: Mapping[str, Any], *,
                       labels: Optional[Sequence[str]] = None, model_py: Optional[str] = None,
                       config: Optional[Mapping[str, Any]] = None,
                       weights_name: str = "weights.pt") -> Path:
    """Write a model folder laid out like an extracted archive and return its path.

    ``model``'s state_dict goes to ``weights_name``; ``labels`` to ``index_to_name.json``;
    ``model_py`` (source text) to ``model.py``; ``model-config.yaml`` holds ``config`` (top-level
    keys such as ``batchSize``) plus the ``handler`` block as given (nothing is added to it, so a
    test controls exactly which keys the folder has).
    """
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / weights_name)
    if labels is not None:
        (folder / "index_to_name.json").write_text(
            json.dumps({str(i): name for i, name in enumerate(labels)}))
    if model_py is not None:
        (folder / "model.py").write_text(model_py)
    doc = {**dict(config or {}), "handler": dict(handler)}
    (folder / "model-config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder
