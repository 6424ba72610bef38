"""Request options -> :class:`RequestOptions` (strict), and the serving limits that bound them.

Options: ``explain`` (true/false), ``target`` (class index, label, or a list of them), ``topk``,
``method`` (a CAM method the model allows: ``handler.methods``, default the cheap ones), the
method's options (``aug_smooth``, ``eigen_smooth``, ``max_channels``, ...: docs/methods.md),
``outputs`` (a subset of heatmap, overlay, raw, bbox).
Unknown options, bad values, over-long strings: :class:`camserve.errors.OptionError` (422),
never another exception — except a known method the model's backend does not serve, 400
:class:`camserve.errors.MethodUnavailable`. Integers are parsed strictly (ASCII digits, one optional sign, at most
18 digits: :func:`camserve.parsing.parse_int`); targets are parsed by the one target parser,
:func:`camserve.records.parse_targets`.

Example::

    >>> from camserve.models import ModelSpec
    >>> spec = ModelSpec.from_config({"arch": "x:Net", "topk": 2})
    >>> o = parse_options({"target": "Dog", "topk": "1"}, spec, ["cat", "dog"], explain=True)
    >>> o.explain, o.targets, o.topk, o.method
    (True, (1,), 1, 'gradcam')
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .errors import MethodUnavailable, OptionError
from .methods import MethodError, MethodSpec, available_methods, get_method, method_option_names
from .models import OUTPUT_KINDS, ConfigError, ModelSpec
from .parsing import log_name, parse_choices, parse_int, short_repr
from .tasks import Classification, ClassOptions, Task

#: options every task takes; a task adds its own (:func:`option_keys`)
COMMON_KEYS: tuple[str, ...] = ("explain", "topk", "method", "outputs")
#: the options of a classifier
OPTION_KEYS: tuple[str, ...] = ("explain", "target", "topk", "method", "outputs")
MAX_TARGETS = 16
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", ""})

#: TorchServe's default ``max_response_size`` (config.properties), in bytes
TS_DEFAULT_MAX_RESPONSE_SIZE = 6_553_500
DEFAULT_MAX_OPTION_LENGTH = 4096
#: Long side of the maps made for an explanation (larger images get maps at this side).
DEFAULT_MAX_MAP_SIDE = 2048
#: Work budgets in megapixel-maps (one megapixel of one output of one target): see
#: :func:`camserve.explain.plan_maps`.
DEFAULT_MAX_ROW_WORK = 192
DEFAULT_MAX_BATCH_WORK = 512
#: Method work budgets, in forwards of the model at its input size (a backward counts two forwards
#: of what it runs through): see :func:`camserve.explain.plan_compute`.
DEFAULT_MAX_ROW_FORWARDS = 64
DEFAULT_MAX_BATCH_FORWARDS = 256


@dataclass(frozen=True)
class ServingLimits:
    """Budgets of the serving path.

    ``max_response_size``: bytes of one row's JSON answer (TorchServe's frontend drops a larger
    frame and the worker dies, so a larger answer is refused as 413 ``ResponseTooLarge``);
    ``max_option_length``: characters (or bytes) of one option value as sent;
    ``max_map_side``: the long side of the maps an explanation is made from (pixels);
    ``max_row_work`` / ``max_batch_work``: the work one request / one batch may ask for, in
    megapixel-maps (one megapixel of one map output — heatmap, bbox, overlay (counted 3 times: it
    is RGB) — of one target; see :func:`camserve.explain.plan_maps`).

    Example::

        >>> from camserve.models import ModelSpec
        >>> spec = ModelSpec.from_config({"arch": "x:Y", "max_row_work": 600})
        >>> lim = ServingLimits.from_spec(spec, env={})
        >>> lim.max_map_side, lim.max_row_work, lim.max_batch_work
        (2048, 600, 600)
    """

    max_response_size: int = TS_DEFAULT_MAX_RESPONSE_SIZE
    max_option_length: int = DEFAULT_MAX_OPTION_LENGTH
    max_map_side: int = DEFAULT_MAX_MAP_SIDE
    max_row_work: int = DEFAULT_MAX_ROW_WORK
    max_batch_work: int = DEFAULT_MAX_BATCH_WORK
    #: method work per request / per batch, in forwards (``handler.max_row_forwards`` /
    #: ``handler.max_batch_forwards``)
    max_row_forwards: int = DEFAULT_MAX_ROW_FORWARDS
    max_batch_forwards: int = DEFAULT_MAX_BATCH_FORWARDS

    @classmethod
    def from_spec(cls, spec: Any, env: Optional[Mapping[str, str]] = None) -> "ServingLimits":
        """The limits of a :class:`camserve.models.ModelSpec` (``handler.max_response_size``,
        ``handler.max_option_length``, ``handler.max_map_side``, ``handler.max_row_work``,
        ``handler.max_batch_work``).

        A batch budget below the row budget is a :class:`camserve.models.ConfigError` when both
        are configured; when only the row budget is, the batch budget is raised to it.

        ``max_response_size`` defaults to ``TS_MAX_RESPONSE_SIZE`` from ``env`` when set (the
        frontend's environment, which its workers inherit), else TorchServe's default 6553500.
        """
        env = os.environ if env is None else env
        size = TS_DEFAULT_MAX_RESPONSE_SIZE
        env_size = parse_int(str(env.get("TS_MAX_RESPONSE_SIZE", "")))
        if env_size is not None and env_size > 0:
            size = env_size
        row = getattr(spec, "max_row_work", None)
        batch = getattr(spec, "max_batch_work", None)
        if row is not None and batch is not None and batch < row:
            raise ConfigError(f"invalid value for handler.max_batch_work: {batch} (at least "
                              f"handler.max_row_work, {row})")
        row = row or DEFAULT_MAX_ROW_WORK
        rf = getattr(spec, "max_row_forwards", None) or DEFAULT_MAX_ROW_FORWARDS
        return cls(max_response_size=getattr(spec, "max_response_size", None) or size,
                   max_option_length=getattr(spec, "max_option_length", None)
                   or DEFAULT_MAX_OPTION_LENGTH,
                   max_map_side=getattr(spec, "max_map_side", None) or DEFAULT_MAX_MAP_SIDE,
                   max_row_work=row,
                   max_batch_work=batch or max(row, DEFAULT_MAX_BATCH_WORK),
                   max_row_forwards=rf,
                   max_batch_forwards=max(rf, getattr(spec, "max_batch_forwards", None)
                                          or DEFAULT_MAX_BATCH_FORWARDS))


@dataclass(frozen=True)
class RequestOptions:
    """Validated options of one request. ``targets`` the class targets when the task has them
    (None: the task's default, e.g. the top-1 prediction); ``maps`` at most how many maps the
    request asks for (the work budget's count); ``task`` the task's own parsed options;
    ``answer_maps`` images its answer makes besides the explanations (a segmentation mask),
    counted in the work budget whether it explains or not."""

    explain: bool
    targets: Optional[tuple[int, ...]]
    topk: int
    method: str
    outputs: tuple[str, ...]
    maps: int = 1
    task: Any = None
    answer_maps: int = 0
    #: the method with its options (``method`` and the method options of the request)
    spec: Optional[MethodSpec] = None

    def __post_init__(self) -> None:
        if self.spec is None:
            object.__setattr__(self, "spec", get_method(self.method).spec())
        if self.task is None:  # built by hand for a classifier: its class targets are the task's
            object.__setattr__(self, "task", ClassOptions(self.targets))
            object.__setattr__(self, "maps", max(self.maps, len(self.targets or ())))


def _text(name: str, value: Any, limit: int) -> Any:
    """Bytes as UTF-8 text; strings and bytes over ``limit`` are refused before any parsing."""
    if isinstance(value, (bytes, bytearray, memoryview, str)) and len(value) > limit:
        raise OptionError(f"invalid value for {name}: {len(value)} characters (at most {limit})")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise OptionError(f"invalid value for {name}: not UTF-8 text") from None
    return value


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise OptionError(f"invalid value for explain: {short_repr(value)} (allowed: true, false, 1, "
                      f"0, yes, no)")


def _parse_topk(value: Any, n: int) -> int:
    num = parse_int(value) if isinstance(value, str) else value
    if not isinstance(num, int) or isinstance(num, bool):
        raise OptionError(f"invalid value for topk: {short_repr(value)} (an integer 1..{n})")
    if not 1 <= num <= n:
        raise OptionError(f"invalid value for topk: {short_repr(num)} (allowed: 1..{n})")
    return num


def _parse_method(value: Any, allowed: Sequence[str], served: Optional[Sequence[str]] = None) -> str:
    """A method name: 422 when no such method exists or the model's ``handler.methods`` does not
    allow it (``allowed``), 400 ``MethodUnavailable`` when it is allowed but the model's backend
    does not run it (``served``: default every registered method; an exported graph carries
    some)."""
    key = value.strip().lower() if isinstance(value, str) else None
    usable = [m for m in allowed if served is None or m in served]
    if key not in allowed:
        known = key in available_methods()
        raise OptionError(f"invalid value for method: {short_repr(value)} ("
                          f"{'not allowed for this model; ' if known else ''}allowed: "
                          f"{', '.join(usable)})")
    if key not in usable:
        raise MethodUnavailable(key, usable)  # type: ignore[arg-type]
    return key  # type: ignore[return-value]


def parse_method_spec(method: str, options: Mapping[str, Any]) -> MethodSpec:
    """``method`` with the request's method options (the keys of :func:`method_option_names`
    present in ``options``); 422 naming an option the method does not take or a bad value."""
    given = {k: v for k, v in options.items() if k in method_option_names()}
    try:
        return get_method(method).spec(given)
    except MethodError as exc:
        raise OptionError(str(exc)) from None


def _parse_outputs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise OptionError(f"invalid value for outputs: {short_repr(value)} is not a JSON "
                              f"list") from None
    return parse_choices(value, OUTPUT_KINDS, key="outputs", exc=OptionError)


def option_keys(task: Optional[Task] = None) -> tuple[str, ...]:
    """The option names a request may carry: the common ones and the task's
    (:attr:`camserve.tasks.Task.option_keys`; default: classification's)."""
    extra = task.option_keys if task is not None else ("target",)
    base = COMMON_KEYS[:1] + tuple(k for k in extra if k not in COMMON_KEYS) + COMMON_KEYS[1:]
    return base + tuple(k for k in method_option_names() if k not in base)


def check_keys(options: Mapping[Any, Any], task: Optional[Task] = None) -> None:
    """Refuse unknown option names (422), naming the first one, escaped and cut."""
    keys = option_keys(task)
    unknown = [k for k in options if k not in keys]
    if unknown:
        raise OptionError(f"unknown option {log_name(unknown[0])} (allowed: "
                          f"{', '.join(keys)}; the image goes in 'data' or the body)")


def parse_options(options: Mapping[Any, Any], spec: ModelSpec, labels: Sequence[str], *,
                  explain: bool = False, limits: ServingLimits = ServingLimits(),
                  task: Optional[Task] = None,
                  methods: Optional[Sequence[str]] = None) -> RequestOptions:
    """Validate one request's options against the model; :class:`OptionError` (422) otherwise.

    ``explain``: True forces explaining (TorchServe's ``/explanations`` route, KServe's
    ``:explain``); otherwise the ``explain`` option decides. ``task``: the model's task, which
    parses its own options (targets, thresholds, regions, boxes, references); default:
    classification over ``labels``. ``methods``: the CAM methods the model's backend serves
    (default: every registered one); another known method is 400 ``MethodUnavailable``.
    """
    if task is None:
        task = Classification(labels)
    check_keys(options, task)
    # options that may carry a file are bounded like images (by the task), not as text
    opts = {k: v if k in task.binary_options else _text(k, v, limits.max_option_length)
            for k, v in options.items() if v is not None}
    n = len(labels)
    if not explain and "explain" in opts:
        explain = _parse_bool(opts["explain"])
    parsed = task.parse_options({k: v for k, v in opts.items() if k in task.option_keys},
                                max_targets=MAX_TARGETS)
    topk = _parse_topk(opts["topk"], n) if "topk" in opts else min(spec.topk, n)
    method = (_parse_method(opts["method"], spec.allowed_methods, methods) if "method" in opts
              else spec.method)
    method_spec = parse_method_spec(method, opts)
    outputs = _parse_outputs(opts["outputs"]) if "outputs" in opts else spec.outputs
    maps = task.max_targets(parsed)
    return RequestOptions(explain=explain, targets=getattr(parsed, "targets", None), topk=topk,
                          method=method, outputs=outputs, maps=topk if maps is None else maps,
                          task=parsed, answer_maps=task.answer_maps(parsed),
                          spec=method_spec)
