"""The method registry: what a CAM method is, what it needs, what it costs, which options it takes.

A method is registered with :func:`register_method` as a :class:`Method`: its name, what it
``needs`` (:data:`NEEDS`), its :class:`Cost` per explained row as a function of the layer's size,
the row's target count and the options, and the :class:`Option` s it takes. A method that needs at
most activations and gradients is *pure*: ``fn(A, G, **options) -> cam`` with

* ``A`` the target layer's activation, shape ``(..., C, h, w)``;
* ``G`` d score / d A, the same shape as ``A`` or broadcastable against it (the engine passes
  ``A`` as ``(R, 1, C, h, w)`` and ``G`` as ``(R, K, C, h, w)`` for K targets per row);
* the result ``(..., h, w)``: post-ReLU, not normalised.

A pure method registered with ``terms=`` is a channel sum: ``terms(A, G)`` gives the per-channel
contributions ``(..., C, h, w)`` and the map is ``ReLU(sum over C)``; ``eigen_smooth`` then
replaces the sum by the first principal component of the terms. Other methods are functions of a
:class:`camserve.engine.CamContext` (perturbed forwards, suffix forwards, other scores, several
layers) and return ``(R, K or 1, h', w')`` maps.

Every method takes ``aug_smooth`` (the mean over six test-time augmentations, see
:mod:`camserve.methods.smoothing`). A :class:`MethodSpec` is a method with its options resolved:
what the engine takes per row and what a request's ``method=`` plus method options parse into.

Example::

    >>> spec = get_method("scorecam").spec({"max_channels": "64"})
    >>> spec.name, spec.get("max_channels"), spec.get("aug_smooth")
    ('scorecam', 64, False)
    >>> get_method("gradcam").cost(LayerSize(512, 7, 7), 2, {}).to_json()
    {'backwards': 2.0}
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    from ..engine import CamContext

#: What a method may need: the layer's ``activations``; the ``gradients`` of the target scores
#: to them; more ``forward`` passes of the whole model (perturbed inputs); forward passes of the
#: ``suffix`` (the layers after the target layer, on perturbed activations); several ``layers``;
#: Hessian-vector products (``hvp``); ``scores`` of its own (a target score other than the task's).
NEEDS = ("activations", "gradients", "forward", "suffix", "layers", "hvp", "scores")
_PURE = frozenset({"activations", "gradients"})


class MethodError(ValueError):
    """A method name or option that is not allowed; ``key`` the option (``method`` for the name),
    the message names what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


class LayerSize(NamedTuple):
    """The target layer's channels and map size (NCHW), what costs are functions of."""

    channels: int
    height: int
    width: int

    @property
    def positions(self) -> int:
        return int(self.height) * int(self.width)


@dataclass(frozen=True)
class Cost:
    """What a method spends for one explained row (with its K targets) beyond the shared forward
    pass: whole-model ``forwards``, ``suffix`` forwards (the layers after the target layer),
    ``backwards`` to the layer, ``hvp`` Hessian-vector products, ``full_backwards`` (to the
    input, through the whole network). Budgets and ``describe`` read it.

    Example::

        >>> Cost(backwards=1).units(suffix_share=0.5), Cost(forwards=32).units(0.5)
        (1.0, 32.0)
    """

    forwards: float = 0.0
    suffix: float = 0.0
    backwards: float = 0.0
    hvp: float = 0.0
    full_backwards: float = 0.0

    def units(self, suffix_share: float = 1.0) -> float:
        """The cost in whole-forward units: a backward counts as two forwards of what it runs
        through (the suffix, ``suffix_share`` <= 1 of the network, for a backward to the layer;
        the whole network for a full backward), an HVP as four suffix forwards."""
        return float(self.forwards + 2 * self.full_backwards
                     + suffix_share * (self.suffix + 2 * self.backwards + 4 * self.hvp))

    def scaled(self, factor: float) -> "Cost":
        """Every part times ``factor`` (e.g. the six passes of ``aug_smooth``)."""
        return Cost(*(factor * v for v in (self.forwards, self.suffix, self.backwards, self.hvp,
                                           self.full_backwards)))

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.forwards + other.forwards, self.suffix + other.suffix,
                    self.backwards + other.backwards, self.hvp + other.hvp,
                    self.full_backwards + other.full_backwards)

    def to_json(self) -> dict[str, float]:
        """The non-zero parts, for ``describe``."""
        return {k: float(v) for k, v in (
            ("forwards", self.forwards), ("suffix", self.suffix), ("backwards", self.backwards),
            ("hvp", self.hvp), ("full_backwards", self.full_backwards)) if v}


CostFn = Callable[[LayerSize, int, Mapping[str, Any]], Cost]


# -- option parsers: text (a request) or a Python value (the engine) -> the value -----------------

def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError("true or false")


def int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"an integer {lo}..{hi}")
        if isinstance(value, str):
            text = value.strip()
            if not (text.isascii() and text.lstrip("+-").isdigit()) or len(text) > 18:
                raise ValueError(f"an integer {lo}..{hi}")
            value = int(text)
        if not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"an integer {lo}..{hi}")
        return int(value)
    return parse


def float_in(lo: float, hi: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"a number {lo:g}..{hi:g}")
        try:
            num = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ValueError(f"a number {lo:g}..{hi:g}") from None
        if not (math.isfinite(num) and lo <= num <= hi):
            raise ValueError(f"a number {lo:g}..{hi:g}")
        return num
    return parse


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        key = value.strip().lower() if isinstance(value, str) else None
        if key not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return key  # type: ignore[return-value]
    return parse


@dataclass(frozen=True)
class Option:
    """A method option: its ``name``, ``default``, ``parse`` (a value or its text -> the value;
    ValueError whose text says what is allowed) and one line of ``doc``."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str = ""


AUG_SMOOTH = Option("aug_smooth", False, parse_bool,
                    "mean map over horizontal flip x brightness 0.9/1/1.1 (six passes)")
EIGEN_SMOOTH = Option("eigen_smooth", False, parse_bool,
                      "first principal component of the channel terms instead of their sum")
SIGN = Option("sign", "max", one_of("max", "svd"),
              "sign of a principal component: max (|max| >= |min|) or svd (the decomposition's)")
#: At most how many channels a perturbation method scores (the most varied; the others weigh 0).
MAX_CHANNELS = Option("max_channels", 0, int_in(0, 1 << 20),
                      "score at most this many channels (the most varied); 0: all")


def _one_backward(size: LayerSize, k: int, options: Mapping[str, Any]) -> Cost:
    return Cost(backwards=float(k))


def free(size: LayerSize, k: int, options: Mapping[str, Any]) -> Cost:
    """No work beyond the shared forward (activation-only methods)."""
    return Cost()


@dataclass(frozen=True)
class MethodSpec:
    """A method with its options resolved (defaults filled in): hashable, so rows sharing a
    spec share their work. ``options`` (name, value) pairs in the method's option order."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str) -> Any:
        for k, v in self.options:
            if k == key:
                return v
        raise KeyError(key)

    @property
    def method(self) -> "Method":
        return get_method(self.name)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.options)

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults."""
        defaults = {o.name: o.default for o in self.method.options}
        return {k: v for k, v in self.options if defaults.get(k) != v}

    def without(self, key: str) -> "MethodSpec":
        """The same spec with ``key`` back at its default."""
        default = {o.name: o.default for o in self.method.options}[key]
        return MethodSpec(self.name, tuple((k, default if k == key else v) for k, v in self.options))

    def cost(self, size: LayerSize, k: int = 1) -> Cost:
        """What this spec costs for one row with ``k`` targets on a layer of ``size``."""
        m = self.method
        base = m.cost(size, k, self.as_dict())
        if self.get("aug_smooth"):
            from .smoothing import AUGMENTATIONS
            return (base + Cost(forwards=1.0)).scaled(len(AUGMENTATIONS))
        return base

    def __str__(self) -> str:
        extra = self.given()
        return self.name if not extra else \
            f"{self.name}({', '.join(f'{k}={v}' for k, v in extra.items())})"


@dataclass(frozen=True)
class Method:
    """A registered CAM method: its ``name``, what it ``needs`` (a subset of :data:`NEEDS`), its
    ``cost(size, k, options)`` per explained row, its ``options``, and its function: ``fn(A, G,
    **options) -> cam`` when pure (a function the ONNX exporter can trace), else ``fn(ctx)`` over
    a :class:`camserve.engine.CamContext`. ``terms``: the channel terms of a channel-sum method
    (``eigen_smooth``). ``doc``: one line for ``describe``; ``cheap``: allowed by default when
    a model folder does not list its methods."""

    name: str
    fn: Callable[..., torch.Tensor]
    needs: frozenset[str]
    cost: CostFn = _one_backward
    doc: str = ""
    #: the ONNX exporter can trace it into the CAM graph
    exportable: bool = True
    options: tuple[Option, ...] = (AUG_SMOOTH,)
    terms: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    cheap: bool = True
    #: the map is at the input's resolution rather than the layer's (several layers)
    input_resolution: bool = False

    @property
    def pure(self) -> bool:
        """A function of (activations, gradients) only: traceable into the ONNX graph."""
        return self.needs <= _PURE

    @property
    def gradients(self) -> bool:
        """Needs the gradients of the target scores (a backward pass)."""
        return "gradients" in self.needs

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def __call__(self, A: torch.Tensor, G: Optional[torch.Tensor] = None, **options: Any) -> torch.Tensor:
        if not self.pure:
            raise TypeError(f"method {self.name!r} needs {', '.join(sorted(self.needs))}; run it "
                            f"through CamEngine, not as f(A, G)")
        return self.apply(A, G, options)

    def apply(self, A: torch.Tensor, G: Optional[torch.Tensor], options: Mapping[str, Any]) -> torch.Tensor:
        """The pure method's map with ``options`` (``aug_smooth`` is the engine's business)."""
        opts = {k: v for k, v in options.items() if k != "aug_smooth"}
        if self.terms is not None:
            smooth, sign = opts.pop("eigen_smooth", False), opts.pop("sign", "max")
            if smooth:
                from .projection import principal_projection
                return torch.relu(principal_projection(self.terms(A, G, **opts), sign))
        return self.fn(A, G, **opts)

    def spec(self, options: Optional[Mapping[str, Any]] = None) -> MethodSpec:
        """This method with ``options`` parsed and validated (defaults for the rest); a
        :class:`MethodError` names an option it does not take or a value it does not allow."""
        given = dict(options or {})
        known = {o.name: o for o in self.options}
        for key in given:
            if key not in known:
                raise MethodError(str(key)[:40], f"invalid option {str(key)[:40]!r} for method "
                                  f"{self.name!r} (its options: {', '.join(known)})")
        values = []
        for o in self.options:
            if o.name in given and given[o.name] is not None:
                try:
                    values.append((o.name, o.parse(given[o.name])))
                except ValueError as exc:
                    from ..parsing import short_repr
                    raise MethodError(o.name, f"invalid value for {o.name}: "
                                      f"{short_repr(given[o.name])} ({exc})") from None
            else:
                values.append((o.name, o.default))
        return MethodSpec(self.name, tuple(values))

    def describe(self, size: Optional[LayerSize] = None,
                 options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """``{"name", "needs", "options", "exportable", "doc"}`` and, for a layer ``size``, the
        ``cost`` of one target with the default (or given) options and its ``units`` (forwards)."""
        out: dict[str, Any] = {"name": self.name, "needs": sorted(self.needs),
                               "options": {o.name: o.default for o in self.options},
                               "exportable": self.exportable, "doc": self.doc}
        if size is not None:
            spec = self.spec(options)
            cost = spec.cost(LayerSize(*size), 1)
            out["cost"] = cost.to_json()
        return out


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, *, needs: tuple[str, ...] = ("activations", "gradients"),
                    cost: CostFn = _one_backward, doc: str = "", exportable: Optional[bool] = None,
                    options: Sequence[Option] = (), terms: Optional[Callable[..., torch.Tensor]] = None,
                    cheap: Optional[bool] = None, input_resolution: bool = False
                    ) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register ``fn`` under ``name`` (lower case) with what it ``needs``, its
    ``cost``, its ``options`` (``aug_smooth`` always; ``eigen_smooth`` and ``sign`` with
    ``terms``), and whether the ONNX graph can carry it (default: when it is pure). ``cheap``
    (default: a cost of at most a few backwards): allowed when a folder lists no methods. The
    function itself is returned unchanged."""
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise ValueError(f"invalid value for needs: {bad[0]!r} (allowed: {', '.join(NEEDS)})")

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"invalid value for name: {name!r} is already registered")
        first = (fn.__doc__ or "").strip().splitlines()
        pure = frozenset(needs) <= _PURE
        opts: list[Option] = [AUG_SMOOTH]
        if terms is not None:
            opts += [EIGEN_SMOOTH, SIGN]
        names = {o.name for o in opts}
        opts += [o for o in options if o.name not in names]
        is_cheap = cheap if cheap is not None else \
            cost(LayerSize(2048, 7, 7), 1, {o.name: o.default for o in opts}).units(1.0) <= 8
        _REGISTRY[key] = Method(key, fn, frozenset(needs), cost, doc or (first[0] if first else ""),
                                pure if exportable is None else bool(exportable),
                                tuple(opts), terms, is_cheap, input_resolution)
        return fn

    return deco


def available_methods(*, exportable: Optional[bool] = None, gradients: Optional[bool] = None,
                      cheap: Optional[bool] = None) -> list[str]:
    """Names of the registered CAM methods, in registration order; ``exportable`` /
    ``gradients`` / ``cheap``: only those the ONNX graph can (or cannot) carry, that need (or do
    not need) gradients, that are (or are not) cheap."""
    return [n for n, m in _REGISTRY.items()
            if (exportable is None or m.exportable == exportable)
            and (gradients is None or m.gradients == gradients)
            and (cheap is None or m.cheap == cheap)]


def method_option_names() -> tuple[str, ...]:
    """Every option name some registered method takes (the request keys of method options)."""
    out: dict[str, None] = {}
    for m in _REGISTRY.values():
        out.update(dict.fromkeys(m.option_names))
    return tuple(out)


def get_method(name: Union[str, Method, MethodSpec]) -> Method:
    """The method registered under ``name``; a :class:`MethodError` listing the known names
    otherwise."""
    if isinstance(name, Method):
        return name
    if isinstance(name, MethodSpec):
        name = name.name
    key = str(name).lower()
    try:
        return _REGISTRY[key]
    except KeyError:
        from ..parsing import short_repr
        raise MethodError("method", f"invalid value for method: {short_repr(name)} (known: "
                          f"{', '.join(available_methods())})") from None


def as_spec(method: Union[str, Method, MethodSpec],
            options: Optional[Mapping[str, Any]] = None) -> MethodSpec:
    """A method name, :class:`Method` or :class:`MethodSpec` (+ ``options`` for a name) as a
    :class:`MethodSpec`."""
    if isinstance(method, MethodSpec):
        if options:
            return get_method(method).spec({**method.as_dict(), **dict(options)})
        return method
    return get_method(method).spec(options)
