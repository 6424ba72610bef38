"""The batch job's Ray runner: :func:`run_ray_job` lists the inputs on the driver, streams small
rows ``(id, path, name, abspath)`` through Ray Data to :class:`CamBatchWorker` actors (one
:class:`~camserve.onnx.job.BatchExplainer` each, threads = the CPUs Ray assigned to the actor),
which decode, explain and write the artefacts themselves, and appends the result lines that come
back to DIR/results.jsonl, each image once.

How it runs, fault tolerance, memory and throughput: docs/ray.md; the job itself: docs/batch.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..parsing import short_repr
from .audit import MetricMeans
from .inputs import Decoded, Failed, Item, UsageError, load_item
from .job import (BatchExplainer, Explained, ExplainedBatch, JobConfig, JobPlan, JobStats,
                  finish_stats, list_items, plan_job, progress_bar, start_metrics)
from .outputs import Outputs, encode_line, encode_result

log = logging.getLogger(__name__)

#: retries of a batch whose actor died (the batch is rerun on the replacement actor)
DEFAULT_TASK_RETRIES = 3
#: batches queued per actor (Ray Data's backpressure on the actor pool)
TASKS_IN_FLIGHT_PER_ACTOR = 2
#: how long the pool may wait for its minimum number of actors to start (an autoscaling cluster
#: may need minutes to add a node); then the job fails instead of hanging
WAIT_FOR_MIN_ACTORS_S = 600
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: the ``--ray``/``--actors``/``--cpus-per-actor``/
    ``--gpus-per-actor`` values, validated (:func:`camserve.onnx.cli.ray_options`). ``actors`` is
    ``(min, max)``; ``None`` means "from one actor up to as many as the cluster's CPUs (GPUs)
    hold"."""

    address: str
    actors: Optional[tuple[int, int]] = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    task_retries: int = DEFAULT_TASK_RETRIES


# -- the actor ----------------------------------------------------------------------------------------

def actor_resources() -> tuple[int, bool]:
    """(intra-op threads, has a GPU) of the calling Ray actor: the CPUs Ray assigned to it
    (at least 1) and whether Ray gave it a GPU. Outside Ray: (1, False)."""
    ray = sys.modules.get("ray")  # in an actor ray is loaded; elsewhere do not import it
    if ray is None or not ray.is_initialized():
        return 1, False
    assigned = ray.get_runtime_context().get_assigned_resources()
    return max(1, int(assigned.get("CPU", 1))), bool(ray.get_gpu_ids())


class CamBatchWorker:
    """The callable class of ``map_batches``: one :class:`~camserve.onnx.job.BatchExplainer` (one
    onnxruntime session, checked against the graph before any image) per actor.

    A batch is a dict of numpy columns ``id``, ``path``, ``name``, ``abspath`` (the file-system
    bytes of each name, ``os.fsencode``: names that are not UTF-8 travel losslessly); the answer
    has one row per input row: ``id``, ``ok`` (bool), ``line`` (the JSON text of its results.jsonl
    or errors.jsonl line, :func:`camserve.onnx.outputs.encode_line`), ``provider`` (the session's),
    ``seconds`` (its share of the batch's time in the actor), ``metrics`` (with ``plan.metrics``:
    the JSON text of the line's unrounded metrics, ``null`` where they failed; ``""`` for error rows
    and without ``--metrics``) and ``metrics_seconds`` (its share of the batch's metrics time).
    Files go to ``plan.out`` from here, not through the driver.
    """

    def __init__(self, plan: JobPlan) -> None:
        import torch

        self.plan = plan
        self.threads, gpu = actor_resources()
        torch.set_num_threads(self.threads)  # heatmaps: the actor's CPUs, not the node's
        self.explainer = BatchExplainer.open(plan, device="cuda" if gpu else "cpu",
                                             threads=self.threads)
        self.provider = self.explainer.providers[0]
        self.keep_image = "overlay" in plan.save
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="cam_actor")
        log.info("actor pid %d: %d threads, %s", os.getpid(), self.threads, self.provider)

    def _load(self, item: Item, abspath: str) -> Decoded | Failed:
        out = load_item(Item(abspath, item.name), self.plan.meta, self.keep_image,
                        self.plan.max_pixels, self.plan.max_file_size)
        return dataclasses.replace(out, item=item)  # the path as listed, in every record

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        ids = [int(v) for v in batch["id"]]
        items = [Item(_text(p), _text(n)) for p, n in zip(batch["path"], batch["name"])]
        outcomes = list(self.pool.map(self._load, items, [_text(a) for a in batch["abspath"]]))
        decoded = [o for o in outcomes if isinstance(o, Decoded)]
        done = self.explainer.explain(decoded, self.pool.submit) if decoded else ExplainedBatch([])
        explained = iter(done.rows)
        lines, ok, raw = self._encode([next(explained) if isinstance(o, Decoded) else o
                                       for o in outcomes])
        n = max(1, len(ids))
        return {"id": np.asarray(ids, dtype=np.int64), "ok": ok,
                "line": np.asarray(lines, dtype=object),
                "provider": np.asarray([self.provider] * len(ids), dtype=object),
                "seconds": np.full(len(ids), (time.perf_counter() - t0) / n),
                "metrics": np.asarray(raw, dtype=object),
                "metrics_seconds": np.full(len(ids), done.metrics_seconds / n)}

    def _encode(self, rows: Sequence[Union[Explained, Failed]]
                ) -> tuple[list[str], np.ndarray, list[str]]:
        """Each row's ``line`` (once its files are done), ``ok`` and ``metrics`` columns."""
        lines: list[str] = []
        raw: list[str] = []
        ok = np.zeros(len(rows), dtype=bool)
        for j, row in enumerate(rows):
            line = row.result() if isinstance(row, Explained) else row
            text = encode_result(line) if isinstance(line, dict) else line
            if isinstance(text, Failed):
                lines.append(encode_line(text.record()))
                raw.append("")
                continue
            lines.append(text)
            ok[j] = True
            raw.append(json.dumps(row.metrics) if self.plan.metrics else "")
        return lines, ok, raw


def _text(value: Any) -> str:
    """A name column's value as the job's string: bytes through ``os.fsdecode``."""
    return os.fsdecode(value) if isinstance(value, (bytes, np.bytes_)) else str(value)


# -- the driver ---------------------------------------------------------------------------------------

def configure_data_context(verbose: bool = False) -> Any:
    """The Ray Data settings of the job, on the current :class:`ray.data.DataContext`:

    * ``execution_options.preserve_order = False``: lines are written as batches finish;
    * ``wait_for_min_actors_s`` = 600: a pool that cannot start fails instead of hanging;
    * ``actor_task_retry_on_errors = False``: an exception in the worker is a bug, not retried
      (a dead actor process is, see ``max_task_retries``);
    * ``enable_progress_bars = False`` unless ``verbose`` (the job has its own bar).

    Backpressure is Ray Data's default streaming executor's (resource-based: the output queue of
    the map operator is bounded by the object store budget), plus ``max_tasks_in_flight_per_actor``
    on the actor pool.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.wait_for_min_actors_s = WAIT_FOR_MIN_ACTORS_S
    ctx.actor_task_retry_on_errors = False
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_auto_log_stats = False
    if not verbose:  # Ray Data's info lines and its note that its own bars are off
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return ctx


def pool_size(opts: RayOptions, resources: dict[str, float]) -> tuple[int, int]:
    """(min, max) actors: ``opts.actors`` checked against the cluster's resources, or one actor up
    to what the cluster holds. UsageError when even the minimum does not fit."""
    fits = int(resources.get("CPU", 0) // opts.cpus_per_actor)
    if opts.gpus_per_actor > 0:
        fits = min(fits, int(resources.get("GPU", 0) // opts.gpus_per_actor))
    if opts.actors is None:
        if fits < 1:
            raise UsageError(f"invalid value for --cpus-per-actor/--gpus-per-actor: one actor needs "
                             f"{opts.cpus_per_actor:g} CPU and {opts.gpus_per_actor:g} GPU, the "
                             f"cluster has {resources.get('CPU', 0):g} CPU and "
                             f"{resources.get('GPU', 0):g} GPU")
        return 1, fits
    lo, hi = opts.actors
    if lo > fits:
        raise UsageError(f"invalid value for --actors: {lo} actors of {opts.cpus_per_actor:g} CPU "
                         f"and {opts.gpus_per_actor:g} GPU do not fit the cluster "
                         f"({resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU): "
                         f"allowed at most {fits}")
    return lo, hi


def build_dataset(items: Sequence[Item], plan: JobPlan, opts: RayOptions, batch_size: int,
                  actors: tuple[int, int]) -> Any:
    """The Ray Dataset of the job: rows ``(id, path, name, abspath)``, one block per batch, mapped
    by :class:`CamBatchWorker` in an actor pool of ``actors`` = (min, max) actors."""
    import pyarrow as pa
    import ray.data

    table = pa.table({
        "id": pa.array(range(len(items)), type=pa.int64()),
        "path": pa.array([os.fsencode(it.path) for it in items], type=pa.binary()),
        "name": pa.array([os.fsencode(it.name) for it in items], type=pa.binary()),
        "abspath": pa.array([os.fsencode(os.path.abspath(it.path)) for it in items],
                            type=pa.binary()),
    })
    blocks = [table.slice(i, batch_size) for i in range(0, len(items), batch_size)]
    # start the whole pool at once (a pool growing from its minimum loses the first batches'
    # time on one actor); Ray Data shrinks it towards the minimum when actors idle
    strategy = ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1],
                                          initial_size=actors[1],
                                          max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR)
    with warnings.catch_warnings():
        # Ray 2.60 names max_restarts/max_task_retries "deprecated" extra remote args, yet they
        # are the only way to set them on a map_batches actor pool
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.data.from_arrow(blocks).map_batches(
            CamBatchWorker, fn_constructor_kwargs={"plan": plan}, batch_size=batch_size,
            batch_format="numpy", compute=strategy, num_cpus=opts.cpus_per_actor,
            num_gpus=opts.gpus_per_actor or None,
            max_restarts=-1, max_task_retries=opts.task_retries)


def connect(address: str, verbose: bool = False) -> bool:
    """Connect to (or for ``local`` start) Ray; True when this call started or connected it (and
    :func:`disconnect` should end it), False when the process was already connected."""
    if address == "local":
        # a private single-node Ray listens on loopback only (read when ray is first imported)
        os.environ.setdefault(_LOOPBACK_ENV, "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.WARNING,
                              "log_to_driver": verbose}
    if address == "local":
        kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayJobError(f"cannot connect to the Ray cluster at {short_repr(address)}: "
                          f"{short_repr(str(exc), 300)}") from None
    return True


class RayJobError(RuntimeError):
    """The Ray side of the job failed (no cluster at the address, the pipeline failed)."""


def run_ray_job(cfg: JobConfig, opts: RayOptions, verbose: bool = False,
                timings: Optional[dict[str, float]] = None) -> JobStats:
    """Explain every input image on Ray; the local job's contract (docs/batch.md, docs/ray.md).

    UsageError for bad options, RayJobError when Ray fails; KeyboardInterrupt after closing
    results.jsonl on whole lines (``--resume`` continues). ``timings``, when given, receives
    ``connect`` (seconds to reach Ray), ``first`` (seconds from the job's start to the first result
    block: listing, actor start-up, first batch) and ``actor_seconds`` (the time the actors spent
    on the written rows, summed over actors: ``stats.ok / actor_seconds`` is one actor's rate)."""
    plan = plan_job(cfg)
    outputs = Outputs(cfg.out, cfg.resume)  # after everything that can fail on bad options
    counts: dict[str, int] = {}
    stats = JobStats()
    means = MetricMeans()
    start_metrics(plan, stats)
    t0 = time.perf_counter()
    started = False
    bar = None
    try:
        items = _listed(cfg, outputs, counts)
        stats.skipped = counts.get("skipped", 0)
        stats.malformed = outputs.malformed
        if items:
            started = connect(opts.address, verbose)
            if timings is not None:
                timings["connect"] = time.perf_counter() - t0
            import ray

            actors = pool_size(opts, ray.cluster_resources())
            configure_data_context(verbose)
            log.info("%d images on Ray at %s: %d..%d actors of %g CPU, %g GPU", len(items),
                     opts.address, actors[0], actors[1], opts.cpus_per_actor, opts.gpus_per_actor)
            ds = build_dataset(items, plan, opts, cfg.batch_size, actors)
            bar = progress_bar(cfg.progress, total=len(items))
            stats.providers = _drain(ds, items, outputs, bar, t0, timings, stats, means)
    except KeyboardInterrupt:
        log.warning("interrupted: %d images written to %s; run again with --resume to continue",
                    outputs.ok, outputs.out_dir / "results.jsonl")
        raise
    except UsageError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("ray"):
            raise RayJobError(f"the Ray pipeline failed: {type(exc).__name__}: "
                              f"{short_repr(str(exc), 500)}") from exc
        raise
    finally:
        if bar is not None:
            bar.close()
        outputs.close()
        if started:
            disconnect()
    return finish_stats(plan, stats, outputs, means, t0)


def _listed(cfg: JobConfig, outputs: Outputs, counts: dict[str, int]) -> list[Item]:
    """The job's items (:func:`camserve.onnx.job.list_items`); those refused while listing get
    their error lines here, on the driver."""
    items = []
    for it in list_items(cfg, outputs, counts):
        if it.error is not None:
            outputs.error(Failed(it, *it.error))
        else:
            items.append(it)
    outputs.flush()
    return items


def _drain(ds: Any, items: Sequence[Item], outputs: Outputs, bar: Any, t0: float,
           timings: Optional[dict[str, float]], stats: JobStats, means: MetricMeans) -> list[str]:
    """Append the result rows of ``ds`` as they stream in, each id once; the providers seen.
    The metrics of each written line go to ``means`` (the local job's accumulator) and their
    actor time to ``stats.metrics_seconds``."""
    written: set[int] = set()
    providers: list[str] = []
    duplicates = 0
    for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        new = 0
        busy = 0.0
        for i, ok, text, provider, seconds, raw, audit_s in zip(
                block["id"], block["ok"], block["line"], block["provider"], block["seconds"],
                block["metrics"], block["metrics_seconds"]):
            i = int(i)
            if i in written:
                duplicates += 1
                continue
            written.add(i)
            new += 1
            busy += float(seconds)
            if provider not in providers:
                providers.append(str(provider))
            stats.metrics_seconds += float(audit_s)
            if ok:
                if outputs.result(json.loads(text)) and raw:
                    means.add([json.loads(raw)])
            else:
                err = json.loads(text)
                outputs.error(Failed(items[i], str(err["type"]), str(err["reason"])))
        outputs.flush()
        bar.update(new)
        if timings is not None:
            timings.setdefault("first", time.perf_counter() - t0)
            timings["actor_seconds"] = timings.get("actor_seconds", 0.0) + busy
    if duplicates:
        log.info("dropped %d rows of retried batches (already written)", duplicates)
    missing = len(items) - len(written)
    if missing:
        raise RayJobError(f"the Ray pipeline ended with {missing} of {len(items)} images "
                          f"unanswered; run again with --resume")
    return providers


def disconnect() -> None:
    """End this process's Ray connection (for ``local``, stop the private Ray)."""
    import ray

    ray.shutdown()
