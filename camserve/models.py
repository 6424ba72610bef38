"""Build a classifier from a model folder's config and load its weights (``weights_only=True``).

A model folder (and a TorchServe archive, once extracted) holds ``model-config.yaml`` whose
``handler:`` block describes the model::

    handler:
      arch: model:ShapesNet          # FILE:Class (FILE.py in the folder), package.module:Class,
                                     # a torchvision builder (torchvision.models.resnet50),
                                     # timm:<name> or hf:<subfolder> (see camserve.sources)
      arch_args: {}                  # keyword arguments for the constructor (optional)
      num_classes: 8
      weights: weights.pt            # a state_dict (.pt/.pth/.safetensors); optional (random init)
      labels: index_to_name.json     # {"0": "circle", ...}; optional
      target_layer: features         # dotted name; null = auto-locate
      input_size: [96, 96]           # H, W (an int means square)
      mean: [0.5, 0.5, 0.5]
      std: [0.25, 0.25, 0.25]
      interpolation: bilinear        # resize filter: nearest, bilinear, bicubic (optional)
      crop: 0.875                    # the model's centre-crop fraction, recorded for reference: camserve
                                     # explains the whole image (no crop), so maps cover all of it
      method: gradcam
      topk: 3
      max_pixels: 40000000
      outputs: [heatmap, bbox]
      backend: torch                 # or onnxruntime: serve from the folder's model.cam.onnx
      optimize: true                 # torch: serve a faster copy (BatchNorm folded, channels-last)

Mean, std, input size, interpolation and crop default to what the model knows itself (timm's
``pretrained_cfg``, a Hugging Face ``preprocessor_config.json``) where the ``handler:`` block does
not set them.

Example::

    >>> spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "num_classes": 4,
    ...                               "target_layer": "layer4", "input_size": 64})
    >>> model = build_model(spec, model_dir=".")
    >>> spec.input_size
    (64, 64)
"""
from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .images import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, check_formats
from .layouts import LAYOUTS
from .methods import available_methods
from .parsing import MAX_INPUT_SIDE, MIN_INPUT_SIDE, parse_choices, short_repr
from .tasks import TaskError, available_tasks, get_task, make_task, task_config_keys

if TYPE_CHECKING:
    from .sources import SourceDefaults

log = logging.getLogger(__name__)

OUTPUT_KINDS: tuple[str, ...] = ("heatmap", "overlay", "raw", "bbox")
#: What runs a served batch (:mod:`camserve.backends`): the PyTorch engine, or an onnxruntime
#: session over the folder's exported CAM graph.
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime")
LABELS_FILE = "index_to_name.json"
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
    if not (MIN_INPUT_SIDE <= h <= MAX_INPUT_SIDE and MIN_INPUT_SIDE <= w <= MAX_INPUT_SIDE):
        raise ConfigError(f"invalid value for handler.input_size: {short_repr(value)} (allowed: "
                          f"{MIN_INPUT_SIDE}..{MAX_INPUT_SIDE} per side)")
    return h, w


@dataclass
class ModelSpec:
    """The ``handler:`` block of a model config, validated."""

    @property
    def allowed_methods(self) -> tuple[str, ...]:
        """The methods requests may ask for: ``handler.methods``, else the cheap ones (and the
        default ``method``)."""
        if self.methods is not None:
            return tuple(self.methods)
        cheap = available_methods(cheap=True)
        return tuple(cheap + ([self.method] if self.method not in cheap else []))

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
    formats: tuple[str, ...] = DEFAULT_FORMATS
    max_response_size: Optional[int] = None
    max_option_length: Optional[int] = None
    max_map_side: Optional[int] = None
    max_row_work: Optional[int] = None
    max_batch_work: Optional[int] = None
    #: the CAM methods requests may ask for (None: the cheap ones, :func:`default_methods`)
    methods: Optional[tuple[str, ...]] = None
    #: method work per request / per batch, in forwards at the input size (explain.plan_compute)
    max_row_forwards: Optional[int] = None
    max_batch_forwards: Optional[int] = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    interpolation: Optional[str] = None
    crop: Optional[float] = None
    #: what the output means (:mod:`camserve.tasks`)
    task: str = "classification"
    #: the task's own ``handler:`` keys (e.g. ``threshold``), validated by the task
    task_settings: dict[str, Any] = field(default_factory=dict)
    #: what runs a served batch (:data:`BACKENDS`)
    backend: str = "torch"
    #: the torch backend serves a faster copy of the model (:mod:`camserve.backends.pytorch`)
    optimize: bool = True
    #: the keys the config set (the model's own preprocessing defaults fill in the others)
    given: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)

    BASE_KEYS = ("arch", "num_classes", "weights", "labels", "target_layer", "input_size", "mean",
                 "std", "method", "topk", "max_pixels", "outputs", "layout", "formats",
                 "max_response_size", "max_option_length", "max_map_side", "max_row_work",
                 "max_batch_work", "arch_args", "interpolation", "crop", "task", "methods",
                 "max_row_forwards", "max_batch_forwards", "backend", "optimize")
    KEYS = BASE_KEYS + task_config_keys()
    INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "ModelSpec":
        """Validate a ``handler:`` mapping; :class:`ConfigError` names the offending key.

        Unknown keys are refused (a typo such as ``taget_layer`` must not silently become
        auto-locate)::

            >>> ModelSpec.from_config({"arch": "x:Y", "taget_layer": "layer4"})
            Traceback (most recent call last):
            ...
            camserve.models.ConfigError: unknown key handler.taget_layer (did you mean 'target_layer'? known: arch, num_classes, weights, labels, target_layer, ...)
        """
        if not isinstance(cfg, Mapping):
            raise ConfigError("missing handler block in model-config.yaml (expected a mapping "
                              "with at least 'arch')")
        for key in cfg:
            if key not in cls.KEYS:
                raise ConfigError(unknown_key_message(f"handler.{str(key)[:100]}", str(key), cls.KEYS))
        arch = cfg.get("arch")
        if not isinstance(arch, str) or not arch.strip():
            raise ConfigError(f"invalid value for handler.arch: {short_repr(arch)} (expected "
                              f"'timm:<name>', 'hf:<subfolder>', 'torchvision.models.<name>', "
                              f"'file:Class' or 'package.module:Class')")
        spec = cls(arch=arch.strip(), given=frozenset(str(k) for k in cfg if cfg[k] is not None))
        if cfg.get("task") is not None:
            try:
                task_cls = get_task(cfg["task"]) if isinstance(cfg["task"], str) else get_task("")
            except TaskError:
                raise ConfigError(f"invalid value for handler.task: {short_repr(cfg['task'])} "
                                  f"(known: {', '.join(available_tasks())})") from None
            spec.task = task_cls.name
        own = get_task(spec.task).config_keys
        for key in task_config_keys():
            if cfg.get(key) is not None:
                if key not in own:
                    raise ConfigError(f"invalid value for handler.{key}: it is a key of another task "
                                      f"(task {spec.task} takes: {', '.join(own) or 'none'})")
                spec.task_settings[key] = cfg[key]
        try:
            make_task(spec.task, (), spec.task_settings)  # the task validates its own keys
        except TaskError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.get("backend") is not None:
            b = cfg["backend"]
            if not isinstance(b, str) or b.strip().lower() not in BACKENDS:
                raise ConfigError(f"invalid value for handler.backend: {short_repr(b)} (known: "
                                  f"{', '.join(BACKENDS)})")
            spec.backend = b.strip().lower()
        if cfg.get("optimize") is not None:
            if not isinstance(cfg["optimize"], bool):
                raise ConfigError(f"invalid value for handler.optimize: "
                                  f"{short_repr(cfg['optimize'])} (true or false)")
            spec.optimize = cfg["optimize"]
        if cfg.get("arch_args") is not None:
            aa = cfg["arch_args"]
            if not isinstance(aa, Mapping) or not all(isinstance(k, str) for k in aa):
                raise ConfigError(f"invalid value for handler.arch_args: {short_repr(aa)} (expected a "
                                  f"mapping of constructor keyword arguments)")
            spec.arch_args = dict(aa)
        if cfg.get("interpolation") is not None:
            it = str(cfg["interpolation"]).lower()
            if it not in cls.INTERPOLATIONS:
                raise ConfigError(f"invalid value for handler.interpolation: "
                                  f"{short_repr(cfg['interpolation'])} (known: "
                                  f"{', '.join(cls.INTERPOLATIONS)})")
            spec.interpolation = it
        if cfg.get("crop") is not None:
            c = cfg["crop"]
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
                raise ConfigError(f"invalid value for handler.crop: {short_repr(c)} (a fraction in "
                                  f"(0, 1])")
            spec.crop = float(c)
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
        if spec.layout is not None and spec.layout not in LAYOUTS:
            raise ConfigError(f"invalid value for handler.layout: {spec.layout!r} "
                              f"(known: {', '.join(LAYOUTS)})")
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
        if cfg.get("methods") is not None:
            spec.methods = parse_choices(cfg["methods"], tuple(available_methods()),
                                         key="handler.methods", exc=ConfigError,
                                         groups={"all": tuple(available_methods()),
                                                 "cheap": tuple(available_methods(cheap=True))})
        if spec.methods is not None and spec.method not in spec.methods:
            raise ConfigError(f"invalid value for handler.method: {spec.method!r} is not in "
                              f"handler.methods ({', '.join(spec.methods)})")
        for key in ("max_pixels", "max_response_size", "max_option_length", "max_map_side",
                    "max_row_work", "max_batch_work", "max_row_forwards", "max_batch_forwards"):
            if cfg.get(key) is not None:
                p = cfg[key]
                if not isinstance(p, int) or isinstance(p, bool) or p < 1:
                    raise ConfigError(f"invalid value for handler.{key}: {short_repr(p)} (a positive int)")
                setattr(spec, key, p)
        if cfg.get("formats") is not None:
            try:
                spec.formats = check_formats(cfg["formats"])
            except ValueError as exc:
                raise ConfigError(f"invalid value for handler.formats: {exc}") from None
        if "outputs" in cfg:
            spec.outputs = parse_choices(cfg["outputs"], OUTPUT_KINDS, key="handler.outputs",
                                         exc=ConfigError)
        return spec



def unknown_key_message(where: str, key: str, known: Sequence[str]) -> str:
    """``unknown key WHERE (did you mean 'x'? known: ...)`` for a key that is not allowed."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {where} ({hint}known: {', '.join(known)})"


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


def build_model_and_defaults(spec: ModelSpec, model_dir: str | Path,
                             device: str | torch.device = "cpu",
                             weights: Optional[str | Path] = None) -> tuple[nn.Module, "SourceDefaults"]:
    """Instantiate ``spec.arch`` through :func:`camserve.sources.build_from_source` (timm, hf,
    torchvision, own classes; ``arch_args``), load the checkpoint (``weights_only=True``,
    :func:`camserve.sources.load_state`) and move it to ``device``: eval mode, parameters frozen
    (a serving copy). Also returns the preprocessing and labels the model knows itself."""
    from .sources import SourceError, build_from_source, load_state

    model_dir = Path(model_dir)
    wpath = Path(weights) if weights is not None else (model_dir / spec.weights if spec.weights else None)
    try:
        model, defaults = build_from_source(spec.arch, num_classes=spec.num_classes,
                                            arch_args=spec.arch_args, model_dir=model_dir,
                                            task=spec.task)
        if wpath is not None:
            load_state(model, wpath, spec.arch)
    except SourceError as e:
        raise ConfigError(str(e)) from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, defaults


def build_model(spec: ModelSpec, model_dir: str | Path, device: str | torch.device = "cpu",
                weights: Optional[str | Path] = None) -> nn.Module:
    """Instantiate ``spec.arch``, load the state_dict (``weights_only=True``), move to ``device``,
    and return it in eval mode with parameters that do not require grad (a serving copy); see
    :func:`build_model_and_defaults`."""
    return build_model_and_defaults(spec, model_dir, device=device, weights=weights)[0]


def apply_source_defaults(spec: ModelSpec, defaults: "SourceDefaults") -> ModelSpec:
    """``spec`` with the model's own mean/std/input size/interpolation/crop where the config does
    not set them (the ``handler:`` block overrides the model).

    Example::

        >>> from camserve.sources import SourceDefaults
        >>> spec = ModelSpec.from_config({"arch": "timm:resnet18", "input_size": 64})
        >>> s = apply_source_defaults(spec, SourceDefaults(mean=(0.5,) * 3, input_size=(224, 224)))
        >>> s.input_size, s.mean
        ((64, 64), (0.5, 0.5, 0.5))
    """
    changes = {k: v for k, v in (("mean", defaults.mean), ("std", defaults.std),
                                 ("input_size", defaults.input_size),
                                 ("interpolation", defaults.interpolation), ("crop", defaults.crop))
               if v is not None and k not in spec.given}
    if "interpolation" in changes and changes["interpolation"] not in ModelSpec.INTERPOLATIONS:
        del changes["interpolation"]  # e.g. timm's "random": keep the default filter
    return replace(spec, **changes) if changes else spec


def load_labels(spec: ModelSpec, model_dir: str | Path, num_classes: int,
                model_labels: Optional[Sequence[str]] = None) -> list[str]:
    """Class labels from ``handler.labels`` or, when the config names none, from the folder's
    ``index_to_name.json`` (``{"0": "circle", ...}``), else the model's own (``model_labels``, e.g.
    a Hugging Face ``id2label``); indices as strings where there is none or an entry is missing.
    The one rule for the server, the exporter and the batch job."""
    labels = [str(i) for i in range(num_classes)]
    if model_labels and len(model_labels) == num_classes:
        labels = [str(v) for v in model_labels]
    name = spec.labels
    if name is None and (Path(model_dir) / LABELS_FILE).is_file():
        name = LABELS_FILE
    if name:
        path = Path(model_dir) / name
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"invalid value for handler.labels: {str(path)!r} does not exist") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"invalid value for handler.labels: {path.name} is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid value for handler.labels: {path.name} must map index to name")
        for k, v in raw.items():
            try:
                i = int(k)
            except ValueError:
                raise ConfigError(f"invalid value for handler.labels: key {short_repr(k)} is not an "
                                  f"index") from None
            if 0 <= i < num_classes:
                labels[i] = str(v[-1]) if isinstance(v, list) and v else str(v)
    return labels


@dataclass
class LoadedModel:
    """A model ready to explain: the serving copy of the network (eval mode, parameters frozen, on
    ``device``), its validated :class:`ModelSpec`, its class ``labels`` (one per output), the
    dotted name of its target ``layer`` (from the config, or located automatically), the
    ``reshape`` of that layer's output to ``(B, C, h, w)`` with its ``layout`` (``nchw``, ``nhwc``,
    ``tokens``) and the map ``grid`` (h, w) at the input size
    (:func:`camserve.families.choose_layer`)."""

    model: nn.Module
    spec: ModelSpec
    labels: list[str]
    layer: str
    device: torch.device
    reshape: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    grid: Optional[tuple[int, int]] = None
    layout: Optional[str] = None

    @property
    def num_classes(self) -> int:
        """Number of classes (the width of the logits)."""
        return len(self.labels)


def count_classes(model: nn.Module, spec: ModelSpec, device: torch.device | str = "cpu") -> int:
    """Width of the logits of ``model`` on a blank input of ``spec.input_size`` (for tasks whose
    output is not one logit vector per row, the task counts its labels:
    :meth:`camserve.tasks.Task.count_labels`). A classifier whose output is not a tensor (a
    tuple, a mapping, an output object with ``logits``) is made to return its logits from now on
    (:func:`camserve.sources.ensure_logits`), for every consumer."""
    from .sources import ensure_logits, logits_of

    task = make_task(spec.task, (), spec.task_settings)
    with torch.no_grad():  # not inference mode: see CamEngine.predict
        out = model(torch.zeros(1, 3, *spec.input_size, device=device))
    if not task.logits_output:
        try:
            return int(task.count_labels(model, out))
        except TaskError as exc:
            raise ConfigError(f"invalid value for handler.arch: {short_repr(spec.arch)}: {exc}") from None
    if not isinstance(out, torch.Tensor):
        try:
            out = logits_of(out)
        except TypeError as e:
            raise ConfigError(f"invalid value for handler.arch: {short_repr(spec.arch)}: {e}") from None
        ensure_logits(model, force=True)
    if out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"invalid value for handler.arch: {spec.arch!r} must return logits "
                          f"(N, classes); got {shape}")
    return int(out.shape[1])


def recalibrate_batchnorm(model: nn.Module, input_size: Sequence[int], steps: int = 4,
                          batch: int = 8, seed: int = 0) -> nn.Module:
    """Recompute BatchNorm running statistics of a randomly initialised ``model`` on random normal
    input (cumulative averages, ``momentum=None``), then put it back in eval mode.

    Freshly initialised MobileNetV3/EfficientNet have running stats (0, 1) that do not match their
    activations, so their logits come out around 1e-10; with calibrated statistics every layer
    sees unit-scale activations and numerical comparisons are meaningful.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> bn = recalibrate_batchnorm(net, (16, 16))[1]
        >>> net.training, bool(bn.running_var.ne(1).all()), bn.momentum
        (False, True, 0.1)
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [(m, m.momentum) for m in bns]
    gen = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(steps):
                x = torch.randn(batch, 3, *[int(s) for s in input_size], generator=gen)
                model(x.to(device))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.eval()
    return model


def from_module(model: nn.Module, spec: ModelSpec, model_dir: Optional[str | Path] = None, *,
                labels: Optional[Sequence[str]] = None,
                device: Optional[str | torch.device] = None,
                model_labels: Optional[Sequence[str]] = None) -> LoadedModel:
    """A :class:`LoadedModel` of a network already built: count its classes, take ``labels`` (or
    the folder's, see :func:`load_labels`; indices as strings without ``model_dir``) and choose
    the target layer and its reshape (:func:`camserve.families.choose_layer`: ``spec.target_layer``
    with ``spec.layout``, or located). Layer problems are :class:`ConfigError` naming
    ``handler.target_layer``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 2)).eval()
        >>> lm = from_module(net, ModelSpec(arch="tiny", input_size=(16, 16)), labels=["a", "b"])
        >>> lm.layer, lm.num_classes
        ('1', 2)
    """
    from .families import FamilyError, choose_layer
    from .layers import LayerError, resolve_layer

    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    get_task(spec.task).prepare_model(model, spec)
    n_cls = count_classes(model, spec, device)
    if labels is not None:
        if len(labels) != n_cls:
            raise ConfigError(f"invalid value for handler.labels: {len(labels)} labels for a model "
                              f"with {n_cls} classes")
        names = [str(v) for v in labels]
    elif model_dir is not None:
        names = load_labels(spec, model_dir, n_cls, model_labels)
    elif model_labels and len(model_labels) == n_cls:
        names = [str(v) for v in model_labels]
    else:
        names = [str(i) for i in range(n_cls)]
    try:
        if spec.target_layer is not None:
            resolve_layer(model, spec.target_layer)  # names the missing part and the known ones
        choice = choose_layer(model, spec.input_size, spec.target_layer, spec.layout,
                              score=make_task(spec.task, names, spec.task_settings).probe_score)
    except LayerError as exc:
        raise ConfigError(exc.message_for("handler.target_layer")) from None
    except FamilyError as exc:
        raise ConfigError(LayerError(spec.target_layer, str(exc)).message_for(
            "handler.target_layer")) from None
    return LoadedModel(model=model, spec=spec, labels=names, layer=choice.name, device=device,
                       reshape=choice.reshape, grid=choice.grid, layout=choice.layout)


def load_model(spec: ModelSpec, model_dir: str | Path = ".", *, weights: Optional[str | Path] = None,
               device: str | torch.device = "cpu", calibrate: bool = False) -> LoadedModel:
    """Build ``spec``'s model (see :func:`build_model`), count its classes, load its labels and
    resolve or locate its target layer (:func:`from_module`). ``calibrate``: when no weights are
    loaded (random init), recompute the BatchNorm statistics first
    (:func:`recalibrate_batchnorm`), as tests, benchmarks and ``--arch`` exports want.

    Example::

        >>> spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "num_classes": 3,
        ...                               "input_size": 64})
        >>> lm = load_model(spec)
        >>> lm.layer, lm.labels
        ('layer4', ['0', '1', '2'])
    """
    device = torch.device(device)
    model, defaults = build_model_and_defaults(spec, model_dir, device=device, weights=weights)
    spec = apply_source_defaults(spec, defaults)
    if calibrate and weights is None and spec.weights is None:
        recalibrate_batchnorm(model, spec.input_size)
    return from_module(model, spec, model_dir, device=device, model_labels=defaults.labels)


def load_model_dir(model_dir: str | Path, *, weights: Optional[str | Path] = None,
                   overrides: Optional[Mapping[str, Any]] = None,
                   device: str | torch.device = "cpu") -> LoadedModel:
    """The one loader: a model folder (``model-config.yaml`` with a ``handler:`` block, model file,
    weights, labels) as a :class:`LoadedModel`. Used by the TorchServe handler, the exporter, the
    batch tooling and the shapes tooling alike.

    ``weights``: a state_dict file that replaces ``handler.weights`` (TorchServe passes the
    archive's serialized file here). ``overrides``: ``handler:`` keys that replace the config's
    (validated like the file's; ``None`` values are ignored), e.g. ``{"target_layer": "layer3"}``.
    """
    return load_model(spec_of_dir(model_dir, overrides), model_dir, weights=weights, device=device)


def spec_of_dir(model_dir: str | Path, overrides: Optional[Mapping[str, Any]] = None) -> ModelSpec:
    """The :class:`ModelSpec` of a model folder's ``handler:`` block, with ``overrides`` (see
    :func:`load_model_dir`) applied."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"invalid value for model folder: {short_repr(model_dir)} is not a folder")
    cfg = load_model_config(model_dir).get("handler")
    if overrides:
        if not isinstance(cfg, Mapping):
            cfg = {}
        cfg = {**cfg, **{k: v for k, v in overrides.items() if v is not None}}
    return ModelSpec.from_config(cfg)
