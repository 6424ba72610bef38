"""Scaffold a model folder from a checkpoint: the ``camserve-scaffold`` command.

Owns :func:`scaffold`: write ``DIR/model-config.yaml`` (copying the weights, the labels and, for
``hf:``, the saved folder or, for ``path/to/file.py:Class``, the model file into ``DIR``), load the
folder, explain one synthetic image, and report the chosen layer, the map grid, the labels found
and the next commands. The walk-through, the options and what each family gets:
docs/byom.md.

Example::

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> main([d + "/m", "--arch", "torchvision.models.resnet18", "--num-classes", "3",
    ...       "--input-size", "64", "--quiet"])
    0
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from torch import nn

from .families import FamilyError, LayerChoice, choose_layer
from .layouts import LAYOUTS
from .parsing import MAX_INPUT_SIDE, MIN_INPUT_SIDE
from .sources import SourceError, build_from_source, load_state, logits_of
from .tasks import available_tasks

log = logging.getLogger(__name__)

CONFIG = "model-config.yaml"
LABELS_FILE = "index_to_name.json"


class ScaffoldError(ValueError):
    """A scaffolding input that cannot be used (exit status 2)."""


@dataclass
class Scaffolded:
    """What the scaffolded folder gave: the model, its layer choice, labels, input size and the
    explanation of the synthetic image (top class, raw map)."""

    model: nn.Module
    choice: LayerChoice
    labels: list[str]
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    top: int
    cam: torch.Tensor


def _parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise ScaffoldError(f"--input-size {text[:40]!r}: expected H or H,W (integers)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(MIN_INPUT_SIDE <= p <= MAX_INPUT_SIDE for p in parts):
        raise ScaffoldError(f"--input-size {text[:40]!r}: expected H or H,W within "
                            f"{MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}")
    return parts[0], parts[1]


def read_labels(path: Path) -> list[str]:
    """Labels from ``index_to_name.json`` (index -> name, or a list) or one label per line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ScaffoldError(f"--labels {str(path)[:100]!r} cannot be read: {e}") from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScaffoldError(f"--labels {path.name} is not JSON: {e}") from None
        if isinstance(raw, list):
            return [str(v) for v in raw]
        if not isinstance(raw, dict):
            raise ScaffoldError(f"--labels {path.name} must map index to name")
        try:
            items = sorted((int(k), v) for k, v in raw.items())
        except ValueError:
            raise ScaffoldError(f"--labels {path.name}: keys must be indices 0..N-1") from None
        if [i for i, _ in items] != list(range(len(items))):
            raise ScaffoldError(f"--labels {path.name}: indices must be 0..{len(items) - 1} without gaps")
        return [str(v[-1]) if isinstance(v, list) and v else str(v) for _, v in items]
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ScaffoldError(f"--labels {path.name} holds no labels (one per line)")
    return labels


def _copy_into(src: Path, folder: Path) -> str:
    """Copy a file or folder into ``folder`` (unless it is there already); its name there."""
    dst = folder / src.name
    if src.resolve() == dst.resolve():
        return src.name
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)
    return src.name


def _arch_in_folder(arch: str, folder: Path) -> str:
    """Rewrite ``arch`` so it refers to files inside ``folder``, copying them there."""
    if arch.startswith("yolo:"):
        src = Path(arch[5:])
        if (folder / src).is_file() and not src.is_absolute():
            return arch
        if not src.is_file():
            raise ScaffoldError(f"--arch {arch[:100]!r}: no model .yaml or .pt there")
        return "yolo:" + _copy_into(src, folder)
    if arch.startswith("hf:"):
        src = Path(arch[3:])
        if (folder / src).is_dir() and not src.is_absolute():
            return arch
        if not (src / "config.json").is_file():
            raise ScaffoldError(f"--arch {arch[:100]!r}: no save_pretrained folder (config.json) there")
        return "hf:" + _copy_into(src, folder)
    head, sep, cls = arch.rpartition(":")
    if sep and head.endswith(".py"):
        src = Path(head)
        if not src.is_file():
            raise ScaffoldError(f"--arch {arch[:100]!r}: no file {head[:80]!r}")
        return f"{Path(_copy_into(src, folder)).stem}:{cls}"
    return arch


def write_folder(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Create ``folder`` with its config and copied files; returns the ``handler:`` block."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / CONFIG).exists() and not args.force:
        raise ScaffoldError(f"{folder / CONFIG} exists; pass --force to overwrite it")
    handler: dict[str, Any] = {"arch": _arch_in_folder(args.arch, folder)}
    if args.task != "classification":
        handler["task"] = args.task
    if args.score_threshold is not None:
        if args.task != "detection":
            raise ScaffoldError("--score-threshold is a key of the detection task (--task detection)")
        handler["score_threshold"] = args.score_threshold
    if args.arch_arg:
        arch_args: dict[str, Any] = {}
        for item in args.arch_arg:
            key, eq, value = item.partition("=")
            if not eq or not key.isidentifier():
                raise ScaffoldError(f"--arch-arg {item[:60]!r}: expected KEY=VALUE")
            arch_args[key] = yaml.safe_load(value)
        handler["arch_args"] = arch_args
    labels = read_labels(Path(args.labels)) if args.labels else None
    if args.num_classes is not None:
        if labels is not None and len(labels) != args.num_classes:
            raise ScaffoldError(f"--num-classes {args.num_classes} but --labels has {len(labels)}")
        handler["num_classes"] = args.num_classes
    elif labels is not None and not handler["arch"].startswith("hf:"):
        handler["num_classes"] = len(labels)
    if args.weights:
        w = Path(args.weights)
        if not w.is_file():
            raise ScaffoldError(f"--weights {args.weights[:100]!r} does not exist")
        handler["weights"] = _copy_into(w, folder)
    if labels is not None:
        (folder / LABELS_FILE).write_text(json.dumps({str(i): n for i, n in enumerate(labels)},
                                                     indent=1) + "\n")
        handler["labels"] = LABELS_FILE
    if args.layer and args.layer != "auto":
        handler["target_layer"] = args.layer
    if args.layout:
        if "target_layer" not in handler:
            raise ScaffoldError(f"--layout {args.layout} describes a named layer: pass --layer too")
        handler["layout"] = args.layout
    if args.input_size:
        handler["input_size"] = list(_parse_size(args.input_size))
    head = ("# written by `python -m camserve.scaffold`; keys: see camserve.models. Mean, std and\n"
            "# input size default to what the model knows (timm pretrained_cfg, Hugging Face\n"
            "# preprocessor_config.json); set them here to override.\n")
    (folder / CONFIG).write_text(head + yaml.safe_dump({"handler": handler}, sort_keys=False))
    return handler


def synthetic_image(size: tuple[int, int]) -> torch.Tensor:
    """A (3, H, W) float image in [0, 1]: a bright disc off centre on a soft gradient."""
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    disc = (((yy - 0.35) ** 2 + (xx - 0.6) ** 2) < 0.04).float()
    return torch.stack([0.3 + 0.4 * xx + 0.3 * disc, 0.3 + 0.4 * yy, 0.5 - 0.3 * disc]).clamp(0, 1)


def load_folder(folder: Path) -> tuple[nn.Module, LayerChoice, list[str], tuple[int, int],
                                       tuple[float, float, float], tuple[float, float, float]]:
    """Load a scaffolded folder: the model, its layer choice, labels, input size, mean, std.

    Goes through :func:`camserve.models.load_model_dir` when that knows ``arch_args`` (model
    sources wired in); otherwise builds through :mod:`camserve.sources` directly."""
    from . import models

    doc = yaml.safe_load((folder / CONFIG).read_text()) or {}
    handler = dict(doc.get("handler") or {})
    if "arch_args" in getattr(models.ModelSpec, "KEYS", ()):  # model sources wired into models
        lm = models.load_model_dir(folder)  # logs the layer choice once
        size = tuple(lm.spec.input_size)
        fam_log = logging.getLogger("camserve.families")
        level = fam_log.level
        fam_log.setLevel(logging.WARNING)  # the same choice again, for its reason: not logged twice
        try:
            choice = choose_layer(lm.model, size, lm.spec.target_layer, lm.spec.layout)
        finally:
            fam_log.setLevel(level)
        return (lm.model, choice, list(lm.labels), size, tuple(lm.spec.mean),  # type: ignore[return-value]
                tuple(lm.spec.std))
    raw = handler.get("input_size")
    size = (raw, raw) if isinstance(raw, int) else (int(raw[0]), int(raw[1])) if raw else None
    model, d = build_from_source(handler["arch"], num_classes=handler.get("num_classes"),
                                 arch_args=handler.get("arch_args"), model_dir=folder,
                                 input_size=size)
    if handler.get("weights"):
        load_state(model, folder / handler["weights"], handler["arch"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    size = size or d.input_size or (224, 224)
    mean = tuple(handler.get("mean") or d.mean or models.IMAGENET_MEAN)
    std = tuple(handler.get("std") or d.std or models.IMAGENET_STD)
    with torch.no_grad():
        n = int(logits_of(model(torch.zeros(1, 3, *size))).shape[1])
    labels = [str(i) for i in range(n)]
    if (folder / LABELS_FILE).is_file():
        for k, v in json.loads((folder / LABELS_FILE).read_text()).items():
            if 0 <= int(k) < n:
                labels[int(k)] = str(v)
    elif d.labels:
        labels = list(d.labels)[:n]
    choice = choose_layer(model, size, handler.get("target_layer"), handler.get("layout"))
    return model, choice, labels, size, mean, std  # type: ignore[return-value]


def scaffold(folder: Path, args: argparse.Namespace) -> Scaffolded:
    """Write the folder, load it and explain one synthetic image."""
    from .engine import CamEngine

    write_folder(folder, args)
    model, choice, labels, size, mean, std = load_folder(folder)
    from .models import ModelSpec
    from .tasks import make_task

    spec = ModelSpec.from_config((yaml.safe_load((folder / CONFIG).read_text()) or {}).get("handler"))
    task = make_task(spec.task, labels, spec.task_settings)
    img = synthetic_image(size)
    x = ((img - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]
    res = CamEngine(model, choice.name, reshape=choice.reshape, task=task)(x)
    found = res.target_batch.count[0] > 0
    top = int(res.target_batch.index[0, 0]) if found else -1
    cam = res.cams[0] if res.cams.dim() == 3 else res.cams[0, 0]
    return Scaffolded(model, choice, labels, size, mean, std, top, cam)


def _report(folder: Path, s: Scaffolded) -> str:
    shown = ", ".join(s.labels[:8]) + (f", ... ({len(s.labels)} in all)" if len(s.labels) > 8 else "")
    name = folder.name
    return (f"wrote {folder / CONFIG}\n"
            f"layer:  {s.choice.name} ({s.choice.layout}, {s.choice.reason})\n"
            f"grid:   {s.cam.shape[0]}x{s.cam.shape[1]} at input {s.input_size[0]}x{s.input_size[1]}\n"
            f"labels: {shown}\n"
            + (f"synthetic image: top class {s.top} ({s.labels[s.top]}), map max "
               f"{float(s.cam.max()):.3g}\n" if s.top >= 0 else
               "synthetic image: nothing detected above the score threshold (random weights? "
               "lower --score-threshold)\n") +
            f"next:\n"
            f"  make archive MODEL={folder}            # model_store/{name}.mar\n"
            f"  make serve MODEL={folder}\n"
            f"  python -m export.onnx_export {folder} --out model_store/{name}.cam.onnx\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camserve-scaffold",
                                description="Scaffold a camserve model folder from a checkpoint.")
    p.add_argument("dir", help="the model folder to write")
    p.add_argument("--arch", required=True, help="timm:<name>, hf:<save_pretrained folder>, "
                   "torchvision.models.<name>, path/file.py:Class, package.module:Class or "
                   "yolo:<model .yaml or .pt>")
    p.add_argument("--task", default="classification", choices=available_tasks(),
                   help="what the model's output means (default: classification)")
    p.add_argument("--score-threshold", type=float, help="detection: the score a detection needs")
    p.add_argument("--weights", help="state_dict (.pt/.pth/.safetensors), copied into DIR")
    p.add_argument("--labels", help="index_to_name.json or a text file with one label per line")
    p.add_argument("--num-classes", type=int, help="classes (default: from --labels or the model)")
    p.add_argument("--layer", default="auto", help="target layer (dotted name) or auto")
    p.add_argument("--layout", choices=LAYOUTS, help="how the --layer output maps to (B, C, h, w) "
                   "where camserve cannot tell (default: probed or from the family)")
    p.add_argument("--input-size", help="H or H,W (default: what the model knows, else 224)")
    p.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor argument (VALUE read as YAML); repeatable")
    p.add_argument("--force", action="store_true", help="overwrite an existing model-config.yaml")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``camserve-scaffold``; returns the exit status (0 done, 2 usage, 1 the folder does not load or
    explain)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the layer chosen, as the report
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.num_classes is not None and args.num_classes < 1:
        print("error: --num-classes must be a positive integer", file=sys.stderr)
        return 2
    folder = Path(args.dir)
    try:
        result = scaffold(folder, args)
    except ScaffoldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (SourceError, FamilyError, ValueError, TypeError, OSError, KeyError) as e:
        print(f"error: {folder} does not load or explain: {str(e)[:500]}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(_report(folder, result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
