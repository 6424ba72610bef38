"""Tasks: one small object per kind of model output, in one registry (:func:`get_task`).

Each task says how raw model outputs become predictions, how a target given as data becomes a
differentiable score per (row, target), and which record a row's answer holds; see
:mod:`camserve.tasks.base` for the interface and docs/tasks.md for the per-task request and answer
shapes. A model folder chooses its task with ``handler.task`` (default ``classification``).

Example::

    >>> available_tasks()
    ['classification', 'multilabel', 'segmentation', 'embedding', 'detection']
    >>> make_task("classification", ["cat", "dog"]).name
    'classification'
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ..parsing import short_repr
from .base import GraphInput, Geometry, Shown, TargetBatch, Task, TaskError
from .classification import Classification, ClassOptions
from .detection import Detection, DetectionOptions, Detections, ImageDetections
from .embedding import Embedding
from .multilabel import Multilabel
from .segmentation import Segmentation

__all__ = ["Classification", "ClassOptions", "Detection", "DetectionOptions", "Detections",
           "Embedding", "Geometry", "GraphInput", "ImageDetections", "Multilabel", "Segmentation",
           "Shown", "TargetBatch", "Task", "TaskError", "available_tasks", "get_task", "make_task",
           "register_task", "task_config_keys"]

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Register a :class:`Task` subclass under its ``name`` (a class decorator)."""
    if not cls.name or cls.name in _TASKS:
        raise ValueError(f"invalid value for task name: {cls.name!r} (empty or already registered)")
    _TASKS[cls.name] = cls
    return cls


def available_tasks() -> list[str]:
    """Names of the registered tasks."""
    return list(_TASKS)


def get_task(name: str) -> type[Task]:
    """The task class registered under ``name``; :class:`TaskError` naming the known ones."""
    try:
        return _TASKS[str(name).strip().lower()]
    except KeyError:
        raise TaskError(f"invalid value for task: {short_repr(name)} (known: "
                        f"{', '.join(available_tasks())})") from None


def task_config_keys() -> tuple[str, ...]:
    """Every task's own ``handler:`` keys (each once, in registration order)."""
    return tuple(dict.fromkeys(k for cls in _TASKS.values() for k in cls.config_keys))


def make_task(name: str, labels: Sequence[str] = (),
              settings: Optional[Mapping[str, Any]] = None) -> Task:
    """An instance of task ``name`` for a model with ``labels`` and the task's ``settings``
    (its ``handler:`` keys)."""
    return get_task(name)(labels, settings)


for _cls in (Classification, Multilabel, Segmentation, Embedding, Detection):
    register_task(_cls)
