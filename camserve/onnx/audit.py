"""Faithfulness metrics of a CAM graph's maps, computed through onnxruntime: offline audits of a
batch job's explanations need the exported graph only, no PyTorch model.

:func:`session_model_fn` turns a session into the ``model_fn`` of :mod:`camserve.metrics` (it runs
the graph with its ``input`` and reads ``logits``); :func:`audit_batch` scores one batch of maps
with the per-image keys (:data:`camserve.metrics.PER_IMAGE_KEYS`) and returns one
``{key: value}`` dict per image, the ``"metrics"`` object of a ``results.jsonl`` line;
:func:`mean_metrics` averages them for the job's summary. Every perturbation step is one session
run over the whole batch: :func:`camserve.metrics.cost` gives the runs per image (onnxruntime runs
the whole CAM graph for ``logits``, in-graph backward included, so a step costs about one CAM
request of the batch job).

Example (a stand-in session whose class 0 reads the red of the image's top half)::

    >>> import numpy as np, torch
    >>> class Session:
    ...     def run(self, fetch, feed):
    ...         red_top = feed["input"][:, 0, :4].mean(axis=(1, 2))
    ...         return [np.stack([20 * (red_top - 0.75), 0 * red_top], axis=1)]
    >>> x = torch.zeros(2, 3, 8, 8); x[:, 0, :4] = 1.0          # the top half is red
    >>> right = torch.zeros(2, 4, 4); right[:, :2] = 1.0          # a map pointing at it
    >>> rows = audit_batch(Session(), x, right, [0, 0], ("deletion", "avg_drop"), steps=4)
    >>> wrong = audit_batch(Session(), x, 1 - right, [0, 0], ("deletion", "avg_drop"), steps=4)
    >>> list(rows[0]), rows[0]["deletion"] < wrong[0]["deletion"]
    (['deletion', 'avg_drop'], True)
    >>> mean_metrics(rows) == rows[0]
    True
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .. import metrics as M
from ..parsing import parse_choices, short_repr
from .format import BASE_OUTPUTS, INPUT_NAMES

log = logging.getLogger(__name__)

#: What the batch job's ``--metrics`` accepts: the keys that need only the model, the images and
#: the maps.
AUDIT_KEYS: tuple[str, ...] = M.PER_IMAGE_KEYS
#: Perturbation substrates: each image's mean colour, or a Gaussian blur of it.
BASELINES: tuple[str, ...] = ("mean", "blur")



def parse_metric_keys(text: str) -> tuple[str, ...]:
    """``--metrics`` (comma-separated keys of :data:`AUDIT_KEYS`, or ``all``) as a tuple in the
    order given, repeats dropped; ValueError naming the allowed keys otherwise.

    Example::

        >>> parse_metric_keys("deletion, road_morf,deletion")
        ('deletion', 'road_morf')
        >>> parse_metric_keys("pointing_game")
        Traceback (most recent call last):
        ...
        ValueError: invalid value for --metrics: 'pointing_game' (allowed: deletion, insertion, road_morf, road_lerf, avg_drop, avg_increase, all)
    """
    return parse_choices(str(text), AUDIT_KEYS, key="--metrics", groups={"all": AUDIT_KEYS})


def runs_per_image(keys: Iterable[str], steps: int = M.DEFAULT_STEPS) -> int:
    """Session runs per image that :func:`audit_batch` spends for ``keys`` (the sum of
    :func:`camserve.metrics.cost`, its one shared reference run included).

    Example::

        >>> runs_per_image(("deletion", "insertion", "road_morf", "avg_drop"))
        111
    """
    return sum(M.cost(tuple(keys), steps=steps).values())


def session_model_fn(session: Any, *, input_name: str = INPUT_NAMES[0],
                     output: str = BASE_OUTPUTS[0]) -> M.ModelFn:
    """``x (B, 3, H, W) -> logits (B, C)`` through ``session`` (anything with onnxruntime's
    ``run(fetch, feed)``): the graph runs with ``input_name`` (float32, on the CPU) and its
    ``output`` comes back as a tensor on ``x``'s device. A CAM graph's optional ``target`` input
    keeps its default; the logits do not depend on it.

    Example::

        >>> class Session:
        ...     def run(self, fetch, feed):
        ...         return [feed["input"].sum(axis=(1, 2, 3))[:, None].repeat(2, axis=1)]
        >>> session_model_fn(Session())(torch.ones(2, 3, 2, 2)).tolist()
        [[12.0, 12.0], [12.0, 12.0]]
    """
    def model_fn(x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (logits,) = session.run([output], {input_name: arr})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)).to(x.device)

    return model_fn


def audit_batch(session: Any, x: torch.Tensor, cams: Any, targets: Sequence[int] | torch.Tensor,
                keys: Sequence[str], *, steps: int = M.DEFAULT_STEPS, baseline: str = "mean",
                seed: int = 0, model_for: Optional[Callable[[slice], M.ModelFn]] = None
                ) -> list[Optional[dict[str, float]]]:
    """Per-image metrics of one batch: ``x`` the preprocessed batch (B, 3, H, W) the graph ran on,
    ``cams`` its raw maps (B, h, w) (an array or tensor, any scale: the metrics upsample them
    bilinearly to (H, W)), ``targets`` the explained class of each image, ``keys`` of
    :data:`AUDIT_KEYS`. Returns one ``{key: float}`` per image, in ``keys``' order.

    Protocols (:mod:`camserve.metrics`): deletion/insertion over ``steps`` steps with removed
    pixels replaced by ``baseline`` (``"mean"``: each image's mean colour, ``"blur"``); ROAD at
    percentiles 10..90 with its noise drawn from a generator seeded by ``seed`` (the same seed
    gives the same numbers); avg_drop in percent, avg_increase 0/1. ``model_for(rows)``: the model the metrics score for the images ``rows`` (a slice) of the
    batch (``x -> logits``, run on perturbed copies of those images in the same order); default:
    :func:`session_model_fn` of ``session`` for every slice.

    Each image is its own transaction: when the batch fails (a map with NaN, a session error),
    the images are retried one by one and an image that still fails gets ``None`` (logged).
    """
    keys = tuple(keys)
    bad = [k for k in keys if k not in AUDIT_KEYS]
    if bad or not keys:
        raise ValueError(f"invalid value for keys: {short_repr(bad[0] if bad else keys)} "
                         f"(allowed: {', '.join(AUDIT_KEYS)})")
    if baseline not in BASELINES:
        raise ValueError(f"invalid value for baseline: {short_repr(baseline)} (allowed: {', '.join(BASELINES)})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"invalid value for steps: {short_repr(steps)} (an int >= 1)")
    if model_for is None:
        plain = session_model_fn(session)
        model_for = lambda sl: plain  # noqa: E731 - the same model for every slice
    maps = torch.as_tensor(np.asarray(cams) if not isinstance(cams, torch.Tensor) else cams)
    maps = maps.to(torch.float32)
    t = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    b = x.shape[0]

    def score(sl: slice) -> list[dict[str, float]]:
        out = M.compute_metrics(model_for(sl), x[sl], maps[sl], t[sl], keys=keys, steps=steps,
                                baseline=baseline, generator=torch.Generator().manual_seed(seed))
        n = x[sl].shape[0]
        return [{k: float(v[i]) for k, v in out.items()} for i in range(n)]

    try:
        return list(score(slice(0, b)))
    except Exception as exc:  # noqa: BLE001 - retried image by image below; each failure is logged
        if b == 1:
            log.warning("metrics failed for an image: %s: %s", type(exc).__name__, short_repr(str(exc)))
            return [None]
        log.warning("metrics failed for a batch of %d (%s: %s); retrying image by image", b,
                    type(exc).__name__, short_repr(str(exc)))
    rows: list[Optional[dict[str, float]]] = []
    for i in range(b):
        try:
            rows.append(score(slice(i, i + 1))[0])
        except Exception as exc:  # noqa: BLE001 - this image gets no metrics; the others go on
            log.warning("metrics failed for image %d of the batch: %s: %s", i, type(exc).__name__,
                        short_repr(str(exc)))
            rows.append(None)
    return rows


class MetricMeans:
    """Running means of per-image metric dicts (``None`` rows, images without metrics, are left
    out), in constant memory however many images a job has.

    Example::

        >>> acc = MetricMeans()
        >>> acc.add([{"deletion": 0.25}, None]); acc.add([{"deletion": 0.75}])
        >>> acc.means(), acc.images
        ({'deletion': 0.5}, 2)
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.images = 0

    def add(self, rows: Iterable[Optional[dict[str, float]]]) -> None:
        """Count the rows' values."""
        for row in rows:
            if row is None:
                continue
            self.images += 1
            for k, v in row.items():
                self._sums[k] = self._sums.get(k, 0.0) + float(v)
                self._counts[k] = self._counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        """``{key: mean}`` over the rows counted; ``{}`` before any."""
        return {k: self._sums[k] / self._counts[k] for k in self._sums}


def mean_metrics(rows: Iterable[Optional[dict[str, float]]]) -> dict[str, float]:
    """Mean of each key over the rows that have metrics (``None`` rows are left out); ``{}`` when
    none has. ``avg_increase``'s mean is the share of images whose confidence increased.

    Example::

        >>> mean_metrics([{"deletion": 0.25}, None, {"deletion": 0.75}])
        {'deletion': 0.5}
    """
    acc = MetricMeans()
    acc.add(rows)
    return acc.means()


def format_means(means: dict[str, float]) -> str:
    """``key=value`` pairs for a summary line (avg_drop, a percentage, with 2 decimals).

    Example::

        >>> format_means({"deletion": 0.123456, "avg_drop": 41.2345})
        'deletion=0.1235 avg_drop=41.23'
    """
    return " ".join(f"{k}={v:.2f}" if k == "avg_drop" else f"{k}={v:.4f}" for k, v in means.items())


def cost_help(steps: int = M.DEFAULT_STEPS) -> str:
    """The cost of each key in session runs per image, for ``--help``.

    Example::

        >>> cost_help(50)
        '1 shared reference run, deletion 50, insertion 50, road_morf 9, road_lerf 9, avg_drop and avg_increase 1 together'
    """
    c = M.cost(AUDIT_KEYS, steps=steps)
    return (f"{c['reference']} shared reference run, deletion {c['deletion']}, insertion "
            f"{c['insertion']}, road_morf {c['road_morf']}, road_lerf {c['road_lerf']}, avg_drop and "
            f"avg_increase {c['avg_drop'] + c['avg_increase']} together")
