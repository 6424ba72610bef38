"""Model sources for ``handler.arch``: timm, Hugging Face, torchvision and your own classes.

One front door, :func:`build_from_source`, turns an ``arch`` string (plus ``num_classes`` and an
``arch_args`` mapping) into an ``nn.Module`` and the preprocessing the model itself knows
(:class:`SourceDefaults`); :func:`load_state` loads a checkpoint into it.

=============================  ===========================================================
``timm:<name>``                ``timm.create_model(name, pretrained=False, num_classes=..., **arch_args)``;
                               mean/std/input size/interpolation/crop from its ``pretrained_cfg``
``hf:<subfolder>``             a ``save_pretrained`` image classifier (or object detector)
                               inside the model folder
                               (``config.json`` + ``model.safetensors``), local files only;
                               labels from ``id2label``, mean/std/size from
                               ``preprocessor_config.json``
``torchvision.models.<name>``  ``torchvision.models.get_model_builder(name)(weights=None, ...)``
``FILE:Class``                 ``Class`` from ``FILE.py`` in the model folder
``package.module:Class``       an importable class
``yolo:<file>``                an Ultralytics YOLO detector from a model ``.yaml`` or ``.pt`` in the
                               folder (``camserve[yolo]``; :mod:`camserve.tasks.detectors.yolo`)
=============================  ===========================================================

Models that do not return a tensor (Hugging Face output objects, tuples, dicts) are given a
``forward`` that returns the logits (:func:`ensure_logits`) without changing their module names or
``state_dict`` keys, so every consumer (engine, layer search, handler, exporter, batch job) sees
``(B, classes)``.

Example::

    >>> model, d = build_from_source("torchvision.models.resnet18", num_classes=3, model_dir=".")
    >>> type(model).__name__, d.mean
    ('ResNet', None)
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .parsing import short_repr

log = logging.getLogger(__name__)

ARCH_FORMS = ("'timm:<name>'", "'hf:<subfolder>'", "'torchvision.models.<name>'", "'file:Class'",
              "'package.module:Class'", "'yolo:<file.yaml or .pt>'")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class SourceError(ValueError):
    """A model source that cannot be built or a checkpoint that does not fit; names the key.

    The message starts with ``invalid value for handler.<key>`` (``arch``, ``arch_args`` or
    ``weights``); :attr:`key` holds the key. ``camserve.models`` re-raises it as ``ConfigError``.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"invalid value for handler.{key}: {message}")
        self.key = key



@dataclass
class SourceDefaults:
    """Preprocessing and labels the model knows itself; ``None`` where it does not say.

    ``input_size`` (H, W); ``interpolation`` e.g. ``"bicubic"``; ``crop`` the centre-crop fraction
    (timm ``crop_pct``); ``labels`` one name per class (Hugging Face ``id2label``). The ``handler:``
    block overrides every field.
    """

    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    input_size: Optional[tuple[int, int]] = None
    interpolation: Optional[str] = None
    crop: Optional[float] = None
    labels: Optional[list[str]] = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- outputs -> logits --------------------------------------------------------------------------

def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor as is; the first item of a tuple/list; ``logits``
    of a mapping or of an output object (Hugging Face ``ImageClassifierOutput``).

    Example::

        >>> logits_of((torch.ones(1, 2), "aux")).shape
        torch.Size([1, 2])
        >>> logits_of({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output and isinstance(output["logits"], torch.Tensor):
            return output["logits"]
        raise TypeError(f"model output is a mapping without a 'logits' tensor (keys: "
                        f"{short_repr(list(output)[:8])})")
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"model output of type {type(output).__name__} holds no logits (expected a "
                    f"tensor, a tuple/list starting with one, or a mapping/object with 'logits')")


_LOGITS_CLASSES: dict[type, type] = {}


def _logits_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``forward`` returns :func:`logits_of` of the original (cached)."""
    sub = _LOGITS_CLASSES.get(cls)
    if sub is None:
        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return logits_of(cls.forward(self, *args, **kwargs))

        sub = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__,
                                           "_camserve_logits": True})
        _LOGITS_CLASSES[cls] = sub
    return sub


def ensure_logits(model: nn.Module, probe: Optional[torch.Tensor] = None, *,
                  force: bool = False) -> nn.Module:
    """Make ``model(x)`` return the logits tensor, in place, keeping every module name and
    ``state_dict`` key: the model's class is swapped for a subclass whose ``forward`` applies
    :func:`logits_of`. Done only when needed: ``force`` (Hugging Face models), or when ``probe``
    gives a non-tensor output. Returns ``model``.

    Unlike a wrapper module, this adds no ``model.`` prefix to layer names and no module to
    ``named_modules()``; hooks, ``deepcopy``, ``.to()`` and tracing (``make_fx``) see the same
    model. (The swapped class is created at run time, so such a model cannot be pickled whole;
    save its ``state_dict``.)

    Example::

        >>> class Two(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.fc = nn.Linear(3, 2)
        ...     def forward(self, x):
        ...         return {"logits": self.fc(x)}
        >>> m = ensure_logits(Two(), torch.zeros(1, 3))
        >>> m(torch.zeros(4, 3)).shape, list(m.state_dict())
        (torch.Size([4, 2]), ['fc.weight', 'fc.bias'])
    """
    if getattr(type(model), "_camserve_logits", False):
        return model
    if not force:
        if probe is None:
            return model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(probe)
        finally:
            model.train(was_training)
        if isinstance(out, torch.Tensor):
            return model
        logits_of(out)  # raises a TypeError saying what came back when there are no logits
    model.__class__ = _logits_class(type(model))
    return model


# -- dense outputs (segmentation) ---------------------------------------------------------------

def dense_of(output: Any) -> torch.Tensor:
    """The per-pixel class logits (B, C, h, w) in a segmentation model's output: a tensor as is;
    ``out`` of a mapping (torchvision FCN / DeepLabV3 / LR-ASPP); ``logits`` of a mapping or an
    output object (Hugging Face ``SemanticSegmenterOutput``); the first item of a tuple/list.

    Example::

        >>> dense_of({"out": torch.zeros(1, 3, 8, 8), "aux": torch.zeros(1, 3, 8, 8)}).shape
        torch.Size([1, 3, 8, 8])
    """
    if isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
        out = output["out"]
    else:
        try:
            out = logits_of(output)
        except TypeError:
            raise TypeError(f"model output of type {type(output).__name__} holds no per-pixel "
                            f"logits (expected a tensor, a mapping with 'out' or 'logits', or an "
                            f"output object with 'logits')") from None
    if out.dim() != 4:
        raise TypeError(f"per-pixel logits must be (B, classes, H, W); the model gives "
                        f"{tuple(out.shape)}")
    return out


_DENSE_CLASSES: dict[type, type] = {}


def _dense_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``forward`` returns :func:`dense_of` of the original,
    upsampled to the input's size (cached)."""
    sub = _DENSE_CLASSES.get(cls)
    if sub is None:
        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = dense_of(cls.forward(self, x, *args, **kwargs))
            if tuple(out.shape[-2:]) != tuple(x.shape[-2:]):
                out = torch.nn.functional.interpolate(out, size=tuple(x.shape[-2:]),
                                                      mode="bilinear", align_corners=False)
            return out

        sub = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__,
                                           "_camserve_dense": True})
        _DENSE_CLASSES[cls] = sub
    return sub


def ensure_dense(model: nn.Module) -> nn.Module:
    """Make ``model(x)`` return per-pixel class logits (B, C, H, W) at the input's size ``H, W``,
    in place, keeping every module name and ``state_dict`` key (the class swap of
    :func:`ensure_logits`): the output is read by :func:`dense_of` and, when smaller than the
    input (Hugging Face SegFormer and UperNet predict at a quarter of it), upsampled bilinearly
    with ``align_corners=False``, as their image processors' ``post_process_semantic_segmentation``
    do. Every consumer (engine, ONNX graph, batch job) then sees the same logits. Returns
    ``model``.

    Example::

        >>> class Quarter(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.head = nn.Conv2d(3, 5, 4, stride=4)
        ...     def forward(self, x):
        ...         return {"logits": self.head(x)}
        >>> ensure_dense(Quarter())(torch.zeros(2, 3, 32, 24)).shape
        torch.Size([2, 5, 32, 24])
    """
    if not getattr(type(model), "_camserve_dense", False):
        model.__class__ = _dense_class(type(model))
    return model


# -- building -----------------------------------------------------------------------------------

def _import_class(arch: str, model_dir: Path) -> Any:
    mod_name, _, attr = arch.partition(":")
    file = model_dir / (mod_name.replace(".", "/") + ".py")
    if file.is_file():
        unique = f"camserve_model_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(unique, file)
        if spec is None or spec.loader is None:
            raise SourceError("arch", f"{short_repr(arch)} (cannot load {file})")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise SourceError("arch", f"{short_repr(arch)} (no file {file.name} in {model_dir} and no "
                                      f"importable module {mod_name!r}: {e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SourceError("arch", f"{short_repr(arch)} ({mod_name} has no {attr!r})") from None


def _size_pair(value: Any) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, int):
        return int(value), int(value)
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
        return None
    vals = [int(v) for v in value]
    return (vals[-2], vals[-1]) if len(vals) >= 2 else (vals[0], vals[0])


def _triple(value: Any) -> Optional[tuple[float, float, float]]:
    if value is None:
        return None
    vals = tuple(float(v) for v in value)
    return vals if len(vals) == 3 else None  # type: ignore[return-value]


def _build_timm(name: str, num_classes: Optional[int], arch_args: Mapping[str, Any]
                ) -> tuple[nn.Module, SourceDefaults]:
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise SourceError("arch", f"'timm:{name[:80]}' needs timm (pip install 'camserve[timm]')") from None
    kwargs = dict(arch_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise SourceError("arch", f"'timm:{name[:80]}' is not a timm model ({str(e)[:100]}; e.g. "
                                  f"{', '.join(close) or 'resnet50, vit_base_patch16_224'})") from None
    except TypeError as e:
        raise SourceError("arch_args", f"timm model {name[:80]!r} cannot be built with "
                                       f"{short_repr(dict(kwargs))}: {str(e)[:160]}") from None
    cfg = resolve_data_config({}, model=model)
    size = _size_pair(cfg.get("input_size"))
    img = arch_args.get("img_size")  # the size the model was built for wins over pretrained_cfg's
    if img is not None:
        size = _size_pair(img)
    defaults = SourceDefaults(mean=_triple(cfg.get("mean")), std=_triple(cfg.get("std")),
                              input_size=size, interpolation=cfg.get("interpolation"),
                              crop=float(cfg["crop_pct"]) if cfg.get("crop_pct") else None)
    return model, defaults


def _hf_labels(config: Any) -> Optional[list[str]]:
    id2label = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", len(id2label)) or 0)
    if not id2label or n < 1:
        return None
    labels = [str(i) for i in range(n)]
    for k, v in id2label.items():
        if 0 <= int(k) < n:
            labels[int(k)] = str(v)
    # transformers' default names (LABEL_0, ...) say nothing; keep indices then
    return None if all(lab == f"LABEL_{i}" for i, lab in enumerate(labels)) else labels


def _task(name: str) -> Any:
    """The task class of ``handler.task`` (imported here: the tasks read model outputs with this
    module's helpers)."""
    from .tasks import get_task

    return get_task(name)


def _build_hf(sub: str, num_classes: Optional[int], arch_args: Mapping[str, Any], model_dir: Path,
              task: str = "classification") -> tuple[nn.Module, SourceDefaults]:
    folder = (model_dir / sub) if sub else model_dir
    if not (folder / "config.json").is_file():
        raise SourceError("arch", f"'hf:{sub[:80]}' needs a save_pretrained folder with config.json "
                                  f"at {str(folder)[:120]!r}")
    try:
        import transformers
    except ImportError:
        raise SourceError("arch", f"'hf:{sub[:80]}' needs transformers and safetensors "
                                  f"(pip install 'camserve[hf]')") from None
    task_cls = _task(task)
    kwargs = dict(arch_args)
    detector = task_cls.name == "detection" or _hf_detector(folder)
    auto = getattr(transformers, "AutoModelForObjectDetection" if detector else task_cls.hf_auto_class)
    try:
        model = auto.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise SourceError("arch", f"'hf:{sub[:80]}' cannot be loaded from {str(folder)[:120]!r}: "
                                  f"{str(e).splitlines()[0][:200]}") from None
    n = int(getattr(model.config, "num_labels", 0) or 0) if task_cls.hf_labels else 0
    if num_classes is not None and n and num_classes != n:
        raise SourceError("num_classes", f"{num_classes} but hf:{sub[:80]} has {n} labels "
                                         f"(config.json num_labels/id2label)")
    defaults = SourceDefaults(labels=_hf_labels(model.config) if task_cls.hf_labels else None)
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        try:
            pre = json.loads(pp.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError("arch", f"{pp.name} in hf:{sub[:80]} is not JSON: {e}") from None
        defaults.mean = _triple(pre.get("image_mean"))
        defaults.std = _triple(pre.get("image_std"))
        defaults.input_size = _size_pair(pre.get("crop_size") if pre.get("do_center_crop")
                                         else pre.get("size"))
        resample = pre.get("resample")
        defaults.interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(resample)
        if pre.get("crop_pct"):
            defaults.crop = float(pre["crop_pct"])
    if defaults.input_size is None:
        defaults.input_size = _size_pair(getattr(model.config, "image_size", None))
    if detector:
        _hf_detections(model, folder, sub)
    elif task_cls.logits_output:
        ensure_logits(model, force=True)
    return model, defaults


def _hf_detector(folder: Path) -> bool:
    """The folder's ``config.json`` names an object-detection architecture."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # from_pretrained says what is wrong
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    return isinstance(archs, list) and any(str(a).endswith("ForObjectDetection") for a in archs)


def _hf_detections(model: nn.Module, folder: Path, sub: str) -> None:
    """A Hugging Face detector returns detections through its folder's image processor (see
    :mod:`camserve.tasks.detectors.hf`); without a ``preprocessor_config.json``, the processor
    class of its model type with its defaults."""
    from transformers import AutoImageProcessor

    from .tasks.detectors.hf import ensure_detections

    try:
        if (folder / "preprocessor_config.json").is_file():
            proc = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        else:
            import transformers

            from .tasks.detectors.hf import PROCESSORS

            name = PROCESSORS.get(str(model.config.model_type), "")  # type: ignore[attr-defined]
            proc = getattr(transformers, name)()
        ensure_detections(model, proc)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise SourceError("arch", f"'hf:{sub[:80]}': no image processor with "
                                  f"post_process_object_detection ({str(e).splitlines()[0][:160]})") from None


def _torchvision_builder(arch: str) -> Any:
    import torchvision.models as tvm

    name = arch.rsplit(".", 1)[-1]
    try:
        return tvm.get_model_builder(name)
    except ValueError:
        known = ", ".join(sorted(tvm.list_models(module=tvm))[:8])
        raise SourceError("arch", f"{short_repr(arch)} (unknown torchvision model {name[:60]!r}; e.g. "
                                  f"{known}, ...)") from None


def _takes(ctor: Any, name: str) -> bool:
    """``ctor`` has a parameter ``name``."""
    try:
        return name in inspect.signature(ctor).parameters
    except (TypeError, ValueError):
        return False


def build_from_source(arch: str, *, num_classes: Optional[int] = None,
                      arch_args: Optional[Mapping[str, Any]] = None,
                      model_dir: str | Path = ".",
                      input_size: Optional[Sequence[int]] = None,
                      task: str = "classification") -> tuple[nn.Module, SourceDefaults]:
    """Build ``arch`` (see the module docstring) with random or config weights; no checkpoint is
    loaded here (:func:`load_state`). Returns the model in eval mode and the defaults it knows.

    ``task`` (``handler.task``) picks the Hugging Face auto class (the task's
    ``hf_auto_class``) and whether the output is made a logits tensor (tasks with
    ``logits_output``; a segmentation model's output is made dense by its task:
    :func:`ensure_dense`).

    ``input_size`` (H, W), when given, is used for one probe forward that decides whether the
    output needs :func:`ensure_logits` (Hugging Face models always get it; without a size the
    caller does it, e.g. where it counts the classes).

    Example::

        >>> m, d = build_from_source("timm:resnet10t", num_classes=4)
        >>> d.input_size, d.interpolation, m(torch.zeros(1, 3, 64, 64)).shape
        ((176, 176), 'bicubic', torch.Size([1, 4]))
    """
    if not isinstance(arch, str) or not arch.strip():
        raise SourceError("arch", f"{short_repr(arch)} (expected {', '.join(ARCH_FORMS)})")
    arch = arch.strip()
    model_dir = Path(model_dir)
    arch_args = dict(arch_args or {})
    if any(not isinstance(k, str) for k in arch_args):
        raise SourceError("arch_args", "keys must be strings (constructor keyword arguments)")
    if arch.startswith("timm:"):
        model, defaults = _build_timm(arch[5:], num_classes, arch_args)
    elif arch.startswith("hf:"):
        model, defaults = _build_hf(arch[3:].strip("/"), num_classes, arch_args, model_dir, task)
    elif arch.startswith("yolo:"):
        from .tasks.detectors.yolo import build_yolo  # imports ultralytics (AGPL) for yolo: only

        model, defaults = build_yolo(arch[5:].strip("/"), num_classes, arch_args, model_dir)
    else:
        kwargs: dict[str, Any] = dict(arch_args)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if ":" in arch:
            ctor = _import_class(arch, model_dir)
        elif arch.startswith("torchvision.models.") or "." not in arch:
            ctor = _torchvision_builder(arch)
            kwargs.setdefault("weights", None)
            if _takes(ctor, "weights_backbone"):  # detectors: no pretrained backbone download
                kwargs.setdefault("weights_backbone", None)
        else:
            raise SourceError("arch", f"{short_repr(arch)} (expected {', '.join(ARCH_FORMS)})")
        try:
            model = ctor(**kwargs)
        except TypeError as e:
            raise SourceError("arch_args", f"{short_repr(arch)} cannot be built with {short_repr(kwargs)}: "
                                           f"{str(e)[:160]}") from None
        defaults = SourceDefaults()
        if isinstance(model, nn.Module):
            from .tasks.detectors.torchvision import source_defaults

            defaults = source_defaults(model) or defaults
    if not isinstance(model, nn.Module):
        raise SourceError("arch", f"{short_repr(arch)} did not build an nn.Module")
    model.eval()
    from .tasks.detectors import known_family

    if input_size is not None and not arch.startswith(("hf:", "yolo:")) and \
            _task(task).logits_output and known_family(model) is None:
        ensure_logits(model, torch.zeros(1, 3, *(int(v) for v in input_size)))
    return model, defaults


# -- weights ------------------------------------------------------------------------------------

def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a ``torch.save`` file read with ``weights_only=True``;
    unwraps ``{"state_dict": ...}``, ``{"model": ...}`` (also ``model_state_dict``/``state``) and
    strips DDP's ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise SourceError("weights", f"{str(path)[:120]!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SourceError("weights", f"{path.name} needs safetensors (pip install "
                                         f"'camserve[hf]')") from None
        try:
            state: Any = load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise SourceError("weights", f"{path.name} is not a safetensors file: {str(e)[:120]}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
            raise SourceError("weights", f"{path.name} cannot be read as a state_dict with "
                                         f"weights_only=True (save model.state_dict(), not the "
                                         f"model): {str(e).splitlines()[0][:160]}") from None
    for _ in range(2):  # {"model": {"state_dict": ...}} happens
        if isinstance(state, Mapping):
            for key in ("state_dict", "model", "model_state_dict", "state"):
                inner = state.get(key)
                if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                    state = inner
                    break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError("weights", f"{path.name} holds no state_dict (a mapping of names to "
                                     f"tensors; also accepted wrapped as {{'state_dict': ...}} or "
                                     f"{{'model': ...}})")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _first(keys: Sequence[str], n: int = 5) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(k[:80] for k in keys[:n]) + more


def load_state(model: nn.Module, path: str | Path, arch: str = "the model") -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (strict); a mismatch is a
    :class:`SourceError` naming the first missing/unexpected/mis-shaped keys and ``arch``.

    Example::

        >>> import tempfile, os
        >>> m = nn.Linear(2, 2); p = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, p)
        >>> load_state(nn.Linear(2, 2), p, "linear").weight.shape
        torch.Size([2, 2])
    """
    state = read_state(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {_first(shapes, 3)}")
        raise SourceError("weights", f"{Path(path).name} does not fit {str(arch)[:100]} "
                                     f"({'; '.join(parts)})")
    model.load_state_dict(state)
    return model
