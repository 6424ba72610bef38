"""Build a classifier from a model folder's config and load its weights (``weights_only=True``).

A model folder (and a TorchServe archive, once extracted) holds ``model-config.yaml`` whose
``handler:`` block describes the model::

    handler:
      arch: model:ShapesNet          # FILE:Class (FILE.py in the folder), package.module:Class,
                                     # or a torchvision builder: torchvision.models.resnet50
      num_classes: 8
      weights: weights.pt            # a state_dict; optional (random init when absent)
      labels: index_to_name.json     # {"0": "circle", ...}; optional
      target_layer: features         # dotted name; null = auto-locate
      input_size: [96, 96]           # H, W (an int means square)
      mean: [0.5, 0.5, 0.5]
      std: [0.25, 0.25, 0.25]
      method: gradcam
      topk: 3
      max_pixels: 40000000
      outputs: [heatmap, bbox]

Example::

    >>> spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "num_classes": 4,
    ...                               "target_layer": "layer4", "input_size": 64})
    >>> model = build_model(spec, model_dir=".")
    >>> spec.input_size
    (64, 64)
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .images import DEFAULT_MAX_PIXELS
from .methods import available_methods

OUTPUT_KINDS: tuple[str, ...] = ("heatmap", "overlay", "raw", "bbox")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A model config value that is missing or not allowed; the message names the key."""


def _triple(key: str, value: Any) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value for handler.{key}: {value!r} (expected 3 numbers)") from None
    if len(vals) != 3:
        raise ConfigError(f"invalid value for handler.{key}: {value!r} (expected 3 numbers)")
    if key == "std" and any(v <= 0 for v in vals):
        raise ConfigError(f"invalid value for handler.std: {value!r} (must be > 0)")
    return vals  # type: ignore[return-value]


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value for handler.input_size: {value!r} "
                          f"(expected an int or [H, W])") from None
    if h < 8 or w < 8 or h > 4096 or w > 4096:
        raise ConfigError(f"invalid value for handler.input_size: {value!r} (allowed: 8..4096)")
    return h, w


@dataclass
class ModelSpec:
    """The ``handler:`` block of a model config, validated."""

    arch: str
    num_classes: Optional[int] = None
    weights: Optional[str] = None
    labels: Optional[str] = None
    target_layer: Optional[str] = None
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    method: str = "gradcam"
    topk: int = 5
    max_pixels: int = DEFAULT_MAX_PIXELS
    outputs: tuple[str, ...] = ("heatmap", "bbox")
    layout: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    KEYS = ("arch", "num_classes", "weights", "labels", "target_layer", "input_size", "mean", "std",
            "method", "topk", "max_pixels", "outputs", "layout")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "ModelSpec":
        """Validate a ``handler:`` mapping; :class:`ConfigError` names the offending key."""
        if not isinstance(cfg, Mapping):
            raise ConfigError("missing handler block in model-config.yaml (expected a mapping "
                              "with at least 'arch')")
        arch = cfg.get("arch")
        if not isinstance(arch, str) or not arch.strip():
            raise ConfigError(f"invalid value for handler.arch: {arch!r} (expected 'file:Class', "
                              f"'package.module:Class' or 'torchvision.models.<name>')")
        spec = cls(arch=arch.strip())
        if cfg.get("num_classes") is not None:
            n = cfg["num_classes"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigError(f"invalid value for handler.num_classes: {n!r} (a positive int)")
            spec.num_classes = n
        for key in ("weights", "labels", "target_layer", "layout"):
            v = cfg.get(key)
            if v is not None:
                if not isinstance(v, str) or not v:
                    raise ConfigError(f"invalid value for handler.{key}: {v!r} (expected a string)")
                setattr(spec, key, v)
        if spec.layout is not None and spec.layout not in ("nchw", "nhwc", "tokens"):
            raise ConfigError(f"invalid value for handler.layout: {spec.layout!r} "
                              f"(known: nchw, nhwc, tokens)")
        if "input_size" in cfg:
            spec.input_size = _size(cfg["input_size"])
        if "mean" in cfg:
            spec.mean = _triple("mean", cfg["mean"])
        if "std" in cfg:
            spec.std = _triple("std", cfg["std"])
        if "method" in cfg:
            m = str(cfg["method"]).lower()
            if m not in available_methods():
                raise ConfigError(f"invalid value for handler.method: {cfg['method']!r} "
                                  f"(known: {', '.join(available_methods())})")
            spec.method = m
        if "topk" in cfg:
            k = cfg["topk"]
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ConfigError(f"invalid value for handler.topk: {k!r} (a positive int)")
            spec.topk = k
        if "max_pixels" in cfg:
            p = cfg["max_pixels"]
            if not isinstance(p, int) or isinstance(p, bool) or p < 1:
                raise ConfigError(f"invalid value for handler.max_pixels: {p!r} (a positive int)")
            spec.max_pixels = p
        if "outputs" in cfg:
            spec.outputs = parse_outputs(cfg["outputs"], key="handler.outputs", exc=ConfigError)
        spec.extra = {k: v for k, v in cfg.items() if k not in cls.KEYS}
        return spec


def parse_outputs(value: Any, key: str = "outputs", exc: type[Exception] = ValueError) -> tuple[str, ...]:
    """``"heatmap,bbox"`` or a list -> a tuple of known output kinds (order kept, no repeats)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise exc(f"invalid value for {key}: {value!r} (allowed: {', '.join(OUTPUT_KINDS)})")
    out: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        if name not in OUTPUT_KINDS:
            raise exc(f"invalid value for {key}: {item!r} (allowed: {', '.join(OUTPUT_KINDS)})")
        if name not in out:
            out.append(name)
    if not out:
        raise exc(f"invalid value for {key}: {value!r} is empty (allowed: {', '.join(OUTPUT_KINDS)})")
    return tuple(out)


def load_model_config(model_dir: str | Path, name: str = "model-config.yaml") -> dict[str, Any]:
    """Read ``model-config.yaml`` of a model folder (the whole document)."""
    import yaml

    path = Path(model_dir) / name
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {name} in {model_dir}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping with a 'handler' block")
    return doc


def _import_class(arch: str, model_dir: Path) -> Any:
    mod_name, _, attr = arch.partition(":")
    file = model_dir / (mod_name.replace(".", "/") + ".py")
    if file.is_file():
        unique = f"camserve_model_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(unique, file)
        if spec is None or spec.loader is None:
            raise ConfigError(f"invalid value for handler.arch: {arch!r} (cannot load {file})")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ConfigError(f"invalid value for handler.arch: {arch!r} (no file {file.name} in "
                              f"{model_dir} and no importable module {mod_name!r}: {e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"invalid value for handler.arch: {arch!r} ({mod_name} has no "
                          f"{attr!r})") from None


def _torchvision_builder(arch: str) -> Any:
    import torchvision.models as tvm

    name = arch.rsplit(".", 1)[-1]
    try:
        return tvm.get_model_builder(name)
    except ValueError:
        known = ", ".join(sorted(tvm.list_models(module=tvm))[:8])
        raise ConfigError(f"invalid value for handler.arch: {arch!r} (unknown torchvision model "
                          f"{name!r}; e.g. {known}, ...)") from None


def build_model(spec: ModelSpec, model_dir: str | Path, device: str | torch.device = "cpu",
                weights: Optional[str | Path] = None) -> nn.Module:
    """Instantiate ``spec.arch``, load the state_dict (``weights_only=True``), move to ``device``,
    and return it in eval mode with parameters that do not require grad (a serving copy)."""
    model_dir = Path(model_dir)
    kwargs: dict[str, Any] = {}
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if ":" in spec.arch:
        ctor = _import_class(spec.arch, model_dir)
    elif spec.arch.startswith("torchvision.models.") or "." not in spec.arch:
        ctor = _torchvision_builder(spec.arch)
        kwargs["weights"] = None
    else:
        raise ConfigError(f"invalid value for handler.arch: {spec.arch!r} (expected 'file:Class', "
                          f"'package.module:Class' or 'torchvision.models.<name>')")
    try:
        model = ctor(**kwargs)
    except TypeError as e:
        raise ConfigError(f"invalid value for handler.arch: {spec.arch!r} cannot be built with "
                          f"{kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"invalid value for handler.arch: {spec.arch!r} did not build an nn.Module")
    wpath = Path(weights) if weights is not None else (model_dir / spec.weights if spec.weights else None)
    if wpath is not None:
        if not wpath.is_file():
            raise ConfigError(f"invalid value for handler.weights: {str(wpath)!r} does not exist")
        state = torch.load(wpath, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"invalid value for handler.weights: {wpath.name} does not fit "
                              f"{spec.arch}: {str(e).splitlines()[0]}") from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_labels(spec: ModelSpec, model_dir: str | Path, num_classes: int) -> list[str]:
    """Class labels from ``index_to_name.json`` (``{"0": "circle", ...}``); indices as strings
    where the file or an entry is missing."""
    labels = [str(i) for i in range(num_classes)]
    if spec.labels:
        path = Path(model_dir) / spec.labels
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"invalid value for handler.labels: {str(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid value for handler.labels: {path.name} is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid value for handler.labels: {path.name} must map index to name")
        for k, v in raw.items():
            try:
                i = int(k)
            except ValueError:
                raise ConfigError(f"invalid value for handler.labels: key {k!r} is not an index") from None
            if 0 <= i < num_classes:
                labels[i] = v[-1] if isinstance(v, list) else str(v)
    return labels
