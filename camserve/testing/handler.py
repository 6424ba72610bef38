"""Load a TorchServe handler file the way TorchServe 0.12's model loader does, without TorchServe.

A TorchServe worker imports the archive's handler file as a top-level module named after the file
(``gradcam_handler.py`` -> ``import gradcam_handler``, the extracted archive's folder being on
``sys.path``). ``ts.model_loader.TsModelLoader`` then takes, in this order: a module-level function
named after ``:function`` in the handler string (default ``handle``) when the module has one; else
the one class *defined* in the module (classes imported into it do not count; zero or several is an
error), instantiated without arguments, which must have ``handle``; it calls
``initialize(context)`` once and ``handle(data, context)`` per batch. :func:`load_handler` follows
those rules, so a handler that loads here loads in a worker.

Example::

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "echo_handler.py").write_text(
    ...     "class Echo:\\n"
    ...     "    def initialize(self, context):\\n        self.ready = True\\n"
    ...     "    def handle(self, data, context):\\n        return [len(data)]\\n")
    >>> entry = load_handler(folder / "echo_handler.py", context=None)
    >>> entry.instance.ready, entry.handle(["a", "b"], None)
    (True, [2])
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional


class HandlerLoadError(ValueError):
    """A handler file that TorchServe would refuse to load; the message says why."""


def load_handler_module(path: str | Path, name: Optional[str] = None) -> ModuleType:
    """Import ``path`` as the top-level module ``name`` (default: the file's stem, as TorchServe
    names it), registered in ``sys.modules``; a fresh import on every call."""
    path = Path(path)
    if not path.is_file():
        raise HandlerLoadError(f"invalid value for handler: {str(path)[:100]!r} is not a file")
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise HandlerLoadError(f"invalid value for handler: {str(path)[:100]!r} is not a "
                               f"Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def handler_classes(module: ModuleType) -> list[type]:
    """The classes defined in ``module`` (``ts.utils.util.list_classes_from_module``: by name,
    those whose ``__module__`` is the module; imported classes do not count)."""
    return [obj for _, obj in inspect.getmembers(
        module, lambda m: inspect.isclass(m) and m.__module__ == module.__name__)]


@dataclass
class HandlerEntry:
    """What a worker calls: ``handle(data, context)``; ``instance`` is the handler object (None
    for a function entry point) and ``module`` the imported handler module."""

    handle: Callable[[Any, Any], Any]
    initialize: Callable[[Any], Any]
    instance: Any
    module: ModuleType


def entry_point(module: ModuleType, function_name: Optional[str] = None) -> HandlerEntry:
    """The entry point TorchServe takes from a loaded handler module (see the module docstring)."""
    fn_name = function_name or "handle"
    if hasattr(module, fn_name):
        fn = getattr(module, fn_name)
        return HandlerEntry(handle=fn, initialize=lambda ctx: fn(None, ctx), instance=None,
                            module=module)
    if function_name is not None:
        raise HandlerLoadError(f"invalid value for handler: {module.__name__} has no function "
                               f"{function_name[:100]!r}")
    classes = handler_classes(module)
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise HandlerLoadError(f"invalid value for handler: {module.__name__} must define exactly "
                               f"one class or a function 'handle' (TorchServe's rule); classes "
                               f"defined: {names[:100]}")
    instance = classes[0]()
    if not hasattr(instance, "handle"):
        raise HandlerLoadError(f"invalid value for handler: class {classes[0].__name__} has no "
                               f"handle method")
    initialize = getattr(instance, "initialize", None)
    if initialize is None:
        raise HandlerLoadError(f"invalid value for handler: class {classes[0].__name__} has no "
                               f"initialize method")
    return HandlerEntry(handle=instance.handle, initialize=initialize, instance=instance,
                        module=module)


def load_handler(path: str | Path, context: Any = None, function_name: Optional[str] = None,
                 *, initialize: bool = True) -> HandlerEntry:
    """Import the handler file ``path``, take its entry point and, when ``initialize`` is true
    (the default), call ``initialize(context)`` as the worker does when the model loads."""
    entry = entry_point(load_handler_module(path), function_name)
    if initialize:
        entry.initialize(context)
    return entry
