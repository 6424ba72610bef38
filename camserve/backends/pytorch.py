"""The PyTorch backend: :class:`camserve.engine.CamEngine` over a serving copy of the model that
runs faster on the CPU, with the same answers.

What makes PyTorch's CPU forward slower than onnxruntime's on the same graph, and what
:func:`optimize_model` takes from it (measured on ResNet-50, batch 16, 224×224, 2 cores — see
the README's serving benchmark):

* **BatchNorm folded into the convolution before it** (what onnxruntime's graph optimiser does):
  an eval-mode ``BatchNorm2d`` that only reads one ``Conv2d``'s output becomes part of that
  convolution's weights and bias, and an ``nn.Identity`` takes its place. Which pairs qualify is
  read from the autograd graph of one probe forward (the BatchNorm's input is the convolution's
  output and nothing else reads it), so it works on any eager model, not only traceable ones;
  pairs holding the target layer are left alone.
* **channels-last weights** on the CPU: oneDNN's convolutions run in NHWC without reordering
  every activation (from NCHW inputs too).
* predict-only batches run under ``torch.no_grad()`` (the engine's ``predict``; inference mode
  measured no faster and breaks models that cache tensors between calls), and the
  worker's intra-op threads are its share of the cores (:mod:`camserve.backends.threads`; the
  adapters set them), never every core for each of several workers.

The optimised copy is checked against the original model on a random batch (task output and the
target layer's output within a relative 1e-3, :data:`CHECK_TOLERANCE`); should a check fail, or
a model not run in channels-last (a ``view`` that needs NCHW strides), the original model is
served as is and the log says why. ``torch.compile`` is left out: it costs a long compile at
every worker start (``python -m bench.backends --compile`` measures it) and graph-breaks on the
capture hook, which switches autograd on inside the forward.

Example::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    >>> fast, done = optimize_model(net, "2", (16, 16))
    >>> type(fast[1]).__name__, done
    ('Identity', ('batchnorm folded into 1 convolution', 'channels-last'))
    >>> type(net[1]).__name__  # the caller's model is not changed
    'BatchNorm2d'
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..engine import CamEngine
from ..explain import BatchCams, CamRequest
from ..layers import capture_layer
from ..methods import available_methods
from ..models import LoadedModel
from ..tasks import Classification, TargetBatch, Task, make_task
from .base import Backend

log = logging.getLogger(__name__)

#: relative error the optimised copy may show against the original (task output, layer output):
#: float32 rounding through a deep network (ResNet-50's layer4: about 1e-4), far below what a
#: wrong rewrite gives
CHECK_TOLERANCE = 1e-3


class TorchBackend(Backend):
    """The PyTorch engine over ``loaded`` (a :class:`~camserve.models.LoadedModel`).

    Args:
        loaded: the model as the loader gives it; it is not changed.
        task: the task (default: the spec's, over the model's labels).
        optimize: serve the faster copy of :func:`optimize_model` (the original when nothing
            applies or its check fails); default ``handler.optimize`` (true).
    """

    name = "torch"

    def __init__(self, loaded: LoadedModel, *, task: Optional[Task] = None,
                 optimize: Optional[bool] = None) -> None:
        self.spec = loaded.spec
        self.labels = list(loaded.labels)
        self.device = torch.device(loaded.device)
        self.task = task if task is not None else make_task(self.spec.task, self.labels,
                                                             self.spec.task_settings)
        model: nn.Module = loaded.model
        self.optimizations: tuple[str, ...] = ()
        if self.spec.optimize if optimize is None else bool(optimize):
            model, self.optimizations = optimize_model(model, loaded.layer, self.spec.input_size,
                                                       task=self.task)
        self.model = model
        self.engine = CamEngine(model, loaded.layer, layout=self.spec.layout,  # type: ignore[arg-type]
                                reshape=loaded.reshape, task=self.task)
        self.methods = tuple(available_methods())

    @property
    def layer(self) -> str:  # type: ignore[override]
        return self.engine.layer_name or ""

    @property
    def layer_size(self) -> Any:
        return self.engine.layer_size

    @property
    def suffix_share(self) -> float:
        return self.engine.suffix_share

    def measure(self, x: torch.Tensor) -> None:
        self.engine.measure_suffix_share(x)

    def predict(self, x: torch.Tensor) -> Any:
        return self.engine.predict(x)

    def explain(self, x: torch.Tensor, rows: Sequence[int], request: CamRequest) -> BatchCams:
        specs = request.specs
        full = [bool(s.get("aug_smooth") or s.method.input_resolution) for s in specs]
        if any(full) and not all(full):
            # maps at the input's resolution and at the layer's: one call each, so that no map is
            # resized twice (a row's map does not depend on its batch-mates)
            return self._explain_parts(x, rows, request, full)
        res = self.engine(x, targets=lambda out: request.targets(self.task, out),
                          method=list(specs), rows=list(rows))
        cams = res.cams if res.cams.dim() == 4 else res.cams[:, None]
        return BatchCams(cams=cams, targets=res.target_batch.to("cpu"), output=res.output,
                         layer=res.layer)

    def _explain_parts(self, x: torch.Tensor, rows: Sequence[int], request: CamRequest,
                       full: Sequence[bool]) -> BatchCams:
        """:meth:`explain` in two engine calls, the rows whose maps are at the layer's resolution
        and those at the input's; the maps are a list (one (K, h, w) per row)."""
        specs = request.specs
        cams: list[Any] = [None] * len(specs)
        targets: list[Any] = [None] * len(specs)
        first = None
        for part in ([j for j, f in enumerate(full) if not f], [j for j, f in enumerate(full) if f]):
            sub = request.part(part)
            res = self.engine(x, targets=lambda out, sub=sub: sub.targets(self.task, out),
                              method=[specs[j] for j in part], rows=[rows[j] for j in part])
            c = res.cams if res.cams.dim() == 4 else res.cams[:, None]
            for i, j in enumerate(part):
                cams[j] = c[i]
                targets[j] = res.target_batch.select(torch.tensor([i]))
            first = res if first is None else first
        assert first is not None
        return BatchCams(cams=cams, targets=_stack_targets(targets).to("cpu"), output=first.output,
                         layer=first.layer)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "threads": torch.get_num_threads(),
                "optimizations": list(self.optimizations)}


def _stack_targets(parts: Sequence[TargetBatch]) -> TargetBatch:
    """One row's TargetBatch each -> one (padded to the largest K, with each row's first)."""
    k = max(p.k for p in parts)

    def pad(t: torch.Tensor) -> torch.Tensor:
        if t.shape[1] == k:
            return t
        return torch.cat([t, t[:, :1].expand(t.shape[0], k - t.shape[1], *t.shape[2:])], dim=1)
    first = parts[0]
    fields = {}
    for name in ("region", "box", "reference"):
        if getattr(first, name) is not None:
            fields[name] = torch.cat([pad(getattr(p, name).cpu()) for p in parts])
    return TargetBatch(torch.cat([pad(p.index.cpu()) for p in parts]),
                       tuple(c for p in parts for c in p.count), mode=first.mode, **fields)


# -- the faster serving copy ------------------------------------------------------------------------

def optimize_model(model: nn.Module, layer: str, input_size: Sequence[int], *,
                   task: Optional[Task] = None, seed: int = 0) -> tuple[nn.Module, tuple[str, ...]]:
    """A faster copy of ``model`` (eval mode, on its device) for serving, and what was done to it
    (see the module docstring); ``model`` itself, and ``()``, when nothing applies or the copy
    does not answer like the original. ``layer``: the target layer (its output must not
    change)."""
    if model.training:
        return model, ()
    task = task if task is not None else Classification()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *[int(s) for s in input_size], generator=gen).to(device)
    fast = copy.deepcopy(model)
    done = []
    folded = fold_batchnorm(fast, x[:1], keep=(layer,))
    if folded:
        done.append(f"batchnorm folded into {folded} convolution{'s' if folded > 1 else ''}")
    if device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in fast.modules()):
        fast = fast.to(memory_format=torch.channels_last)
        done.append("channels-last")
    if not done:
        return model, ()
    try:
        why = _differs(model, fast, layer, x, task)
    except Exception as exc:  # e.g. a view() that needs NCHW strides
        why = f"it fails ({type(exc).__name__}: {str(exc)[:200]})"
    if why:
        log.warning("camserve: serving the model unoptimised: the optimised copy (%s) %s",
                    ", ".join(done), why)
        return model, ()
    log.info("camserve: serving an optimised copy of the model: %s", ", ".join(done))
    return fast, tuple(done)


def _differs(model: nn.Module, fast: nn.Module, layer: str, x: torch.Tensor,
             task: Task) -> Optional[str]:
    """Why ``fast`` does not answer like ``model`` on ``x`` (None when it does)."""
    outs = []
    for m in (model, fast):
        with torch.no_grad(), capture_layer(m, layer, "record") as cap:
            out = task.output(m(x))
        outs.append((list(_tensors(out)), cap.output))
    (ref, ref_a), (got, got_a) = outs
    if len(ref) != len(got):
        return "gives another output structure"
    for what, a, b in [("its output", r, g) for r, g in zip(ref, got)] + [
            (f"the output of layer {layer!r}", ref_a, got_a)]:
        if a.shape != b.shape:
            return f"changes the shape of {what}"
        err = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
        scale = float(a.float().abs().max()) if a.numel() else 0.0
        if err > CHECK_TOLERANCE * max(scale, 1e-12):
            return f"changes {what} by {err:.3g} (relative {err / max(scale, 1e-12):.3g})"
    return None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors of a task output (a tensor, or sequences and mappings of them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def fold_batchnorm(model: nn.Module, x: torch.Tensor, keep: Sequence[str] = ()) -> int:
    """Fold, in place, every eval-mode ``nn.BatchNorm2d`` whose input is the output of an
    ``nn.Conv2d`` that nothing else reads into that convolution (an ``nn.Identity`` takes the
    BatchNorm's place); returns the number of pairs folded.

    The pairs come from one forward of ``x`` (a small batch) with autograd on: the BatchNorm's
    input must be the convolution's output (same autograd node) and that node must have no other
    consumer; each module must run once and the convolution's weight must not be shared. Pairs
    where either module is, or holds, a layer of ``keep`` (the target layer) are left alone.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> _ = net(torch.randn(4, 3, 8, 8))
        >>> x = torch.randn(1, 3, 8, 8)
        >>> ref = net(x)
        >>> fold_batchnorm(net, x), type(net[1]).__name__
        (1, 'Identity')
        >>> bool(torch.allclose(net(x), ref, atol=1e-5))
        True
    """
    names: dict[int, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.Conv2d) or type(mod) is nn.BatchNorm2d:
            if id(mod) in names:  # the same module under two names
                names[id(mod)] = ""
            else:
                names[id(mod)] = name
    calls: Counter[str] = Counter()
    conv_node: dict[str, Any] = {}
    bn_input: dict[str, Any] = {}

    def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        name = names.get(id(mod), "")
        calls[name] += 1
        if isinstance(mod, nn.Conv2d) and isinstance(out, torch.Tensor):
            conv_node[name] = out.grad_fn
        elif inp and isinstance(inp[0], torch.Tensor):
            bn_input[name] = inp[0].grad_fn

    mods = [m for m in model.modules() if id(m) in names]
    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        with torch.enable_grad():
            out = model(x.detach().clone().requires_grad_())
    finally:
        for h in handles:
            h.remove()
    consumers = _consumers([t.grad_fn for t in _tensors(out) if t.grad_fn is not None])
    shared = {id(p) for p, n in Counter(
        id(p) for _, p in model.named_parameters(remove_duplicate=False)).items() if n > 1}
    by_node = {node: name for name, node in conv_node.items() if node is not None}

    def held(name: str) -> bool:
        return any(k == name or k.startswith(name + ".") for k in keep)

    pairs = []
    for bn_name, node in bn_input.items():
        conv_name = by_node.get(node)
        if not conv_name or not bn_name or held(conv_name) or held(bn_name):
            continue
        if calls[conv_name] != 1 or calls[bn_name] != 1 or consumers.get(node, 0) != 1:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if conv.training or bn.training or bn.running_mean is None or bn.running_var is None:
            continue
        if any(id(p) in shared for p in conv.parameters()):
            continue
        pairs.append((conv_name, bn_name))
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv, bn)
        for p in fused.parameters():
            p.requires_grad_(conv.weight.requires_grad)
        _replace(model, conv_name, fused)
        _replace(model, bn_name, nn.Identity())
    return len(pairs)


def _consumers(roots: Sequence[Any]) -> dict[Any, int]:
    """How many times each autograd node of the graph below ``roots`` is read by another."""
    count: Counter[Any] = Counter()
    seen = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                count[child] += 1
                todo.append(child)
    return count


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
