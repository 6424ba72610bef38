"""The offline batch job on a Ray cluster: Ray Data streams the images through onnxruntime actors.

    python -m export.batch_cam --model model_store/shapes.cam.onnx photos/ --out cams/ \\
        --ray ADDRESS [--actors N|MIN,MAX] [--cpus-per-actor C] [--gpus-per-actor G]

ADDRESS is ``local`` (a private Ray on this machine, bound to 127.0.0.1, stopped at the end),
``auto`` (the cluster this machine belongs to, as ``ray start`` left it), ``HOST:PORT`` (a cluster's
GCS address) or ``ray://HOST:PORT`` (Ray Client). Everything else is the local job's
(:mod:`camserve.onnx.batch`): the same inputs, the same names, the same ``results.jsonl`` lines (in
completion order), ``errors.jsonl``, ``--resume``, exit statuses and summary line.

The pipeline
------------
1. The driver lists the inputs with the local job's own code (:func:`camserve.onnx.inputs.iter_inputs`,
   the same :class:`~camserve.onnx.inputs.Item` paths and output names, the same ``--resume`` skip
   list) and makes a dataset of small rows ``(id, path, name, abspath)``, one block per batch
   (:func:`build_dataset`): the images themselves never travel through the object store.
2. ``map_batches`` runs :class:`CamBatchWorker`, a callable class in an actor pool. Each actor
   holds one onnxruntime session with ``intra_op_num_threads`` equal to the CPUs Ray assigned to
   the actor (never the machine's core count: several actors on one node do not oversubscribe it),
   on the CUDA provider when Ray gave the actor a GPU. Per batch it reads and decodes the files
   with camserve's own code (:func:`camserve.images.load_image_file`: EXIF orientation, pixel
   limit; a bad file becomes an error row, never an exception), runs the session once, and writes
   the heatmaps, overlays and raw maps to DIR itself (DIR must be a folder every node sees at the
   same path, e.g. NFS or a mounted bucket; so must the inputs and the graph).
3. Only small rows come back: ``(id, ok, line)`` where ``line`` is the ``results.jsonl`` line or
   the ``errors.jsonl`` line. The driver consumes the stream with ``iter_batches`` (no
   ``materialize``) and appends each block's lines to DIR/results.jsonl as it arrives, flushed per
   block; a row whose ``id`` was already written is dropped, so a retried batch never duplicates a
   line.
4. ``--metrics``: the actor scores its batch after the CAM run, through its own session, with the
   local job's code (:func:`camserve.onnx.batch.audit_lines`: the same ``"metrics"`` in the
   lines); each row also carries the unrounded values, and the driver averages those of the lines
   it writes with the local job's :class:`~camserve.onnx.audit.MetricMeans` for the summary line.

Fault tolerance: the actor pool is created with ``max_restarts=-1`` (a dead actor process is
replaced, on any node) and ``max_task_retries`` (default 3: the batches it held are run again on
the replacement; a batch that kills its actor four times fails the job instead of looping). A
retried batch rewrites the same files. Ctrl-C stops the pipeline: results.jsonl holds whole lines
only, each image at most once, and ``--resume`` continues with the rest.

Memory: Ray Data streams; the input blocks are paths (about 200 bytes per image), the output
blocks are JSON lines; at most ``max_tasks_in_flight_per_actor`` (2) batches are queued per actor,
so a worker holds at most one batch of decoded images. The settings used are listed in
:func:`configure_data_context`.

Example::

    >>> parse_actors("4"), parse_actors("1,8")
    ((4, 4), (1, 8))
    >>> check_address("ray://head.example:10001")
    'ray://head.example:10001'
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..parsing import short_repr
from .audit import MetricMeans
from .batch import (JobConfig, JobPlan, JobStats, audit_lines, check_session, end_metrics,
                    plan_job, session_inputs, start_metrics)
from .inputs import Decoded, Failed, Item, UsageError, _load, _unique, iter_inputs
from .outputs import Outputs, encode_line, finish_image, result_lines
from .session import ort_session

log = logging.getLogger(__name__)

#: retries of a batch whose actor died (the batch is rerun on the replacement actor)
DEFAULT_TASK_RETRIES = 3
#: batches queued per actor (Ray Data's backpressure on the actor pool)
TASKS_IN_FLIGHT_PER_ACTOR = 2
#: how long the pool may wait for its minimum number of actors to start (an autoscaling cluster
#: may need minutes to add a node); then the job fails instead of hanging
WAIT_FOR_MIN_ACTORS_S = 600
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"



# -- options ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: the ``--ray``/``--actors``/``--cpus-per-actor``/
    ``--gpus-per-actor`` values, validated. ``actors`` is ``(min, max)``; ``None`` means "from one
    actor up to as many as the cluster's CPUs (GPUs) hold"."""

    address: str
    actors: Optional[tuple[int, int]] = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    task_retries: int = DEFAULT_TASK_RETRIES


def check_address(text: str) -> str:
    """``local``, ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; UsageError otherwise."""
    value = text.strip()
    if value in ("local", "auto"):
        return value
    rest = value[len("ray://"):] if value.startswith("ray://") else value
    host, sep, port = rest.rpartition(":")
    if sep and host and "/" not in host and port.isdigit() and 0 < int(port) < 65536:
        return value
    raise UsageError(f"invalid value for --ray: {short_repr(text)} (allowed: local, auto, HOST:PORT or "
                     f"ray://HOST:PORT)")


def parse_actors(text: str) -> tuple[int, int]:
    """``N`` (a fixed pool) or ``MIN,MAX`` (an autoscaling pool) -> (min, max); UsageError
    otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or nums[0] < 1 or nums[1] < nums[0]:
        raise UsageError(f"invalid value for --actors: {short_repr(text)} (allowed: N or MIN,MAX with "
                         f"1 <= MIN <= MAX)")
    return nums[0], nums[1]


def ray_options(args: argparse.Namespace) -> Optional[RayOptions]:
    """The Ray options of a parsed command line, or None without ``--ray``. UsageError for a Ray
    option without ``--ray`` and for local-job options that do not apply to actors."""
    ray_only = [f"--{name.replace('_', '-')}" for name in ("actors", "cpus_per_actor",
                                                           "gpus_per_actor")
                if getattr(args, name, None) is not None]
    if getattr(args, "ray", None) is None:
        if ray_only:
            raise UsageError(f"invalid option {ray_only[0]}: it needs --ray ADDRESS")
        return None
    for name in ("threads", "workers", "overlap"):
        if getattr(args, name, None) is not None:
            raise UsageError(f"invalid option --{name} with --ray: each actor uses the CPUs Ray "
                             f"assigns it (set them with --cpus-per-actor)")
    cpus = 1.0 if args.cpus_per_actor is None else float(args.cpus_per_actor)
    gpus = args.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if getattr(args, "device", "cpu") == "cuda" else 0.0
    if not (cpus > 0 and math.isfinite(cpus)):
        raise UsageError(f"invalid value for --cpus-per-actor: {cpus:g} (allowed: more than 0)")
    if not (gpus >= 0 and math.isfinite(gpus)):
        raise UsageError(f"invalid value for --gpus-per-actor: {gpus:g} (allowed: 0 or more)")
    actors = None if args.actors is None else parse_actors(args.actors)
    return RayOptions(address=check_address(args.ray), actors=actors, cpus_per_actor=cpus,
                      gpus_per_actor=float(gpus))


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
    """The callable class of ``map_batches``: one onnxruntime session per actor.

    A batch is a dict of numpy columns ``id``, ``path``, ``name``, ``abspath`` (the file-system
    bytes of each name, ``os.fsencode``: names that are not UTF-8 travel losslessly); the answer
    has one row per input row: ``id``, ``ok`` (bool), ``line`` (the JSON text of its results.jsonl
    or errors.jsonl line, :func:`camserve.onnx.outputs.encode_line`), ``provider`` (the session's),
    ``seconds`` (its share of the batch's time in the actor), ``metrics`` (with ``plan.metrics``:
    the JSON text of the line's unrounded metrics, ``null`` where they failed; ``""`` for error rows
    and without ``--metrics``) and ``metrics_seconds`` (its share of the batch's metrics time).
    Files go to ``plan.out`` from
    here, not through the driver. The graph is checked against the session
    (:func:`camserve.onnx.batch.check_session`) before any image.
    """

    def __init__(self, plan: JobPlan) -> None:
        import torch

        self.plan = plan
        self.threads, gpu = actor_resources()
        torch.set_num_threads(self.threads)  # heatmaps: the actor's CPUs, not the node's
        # no spinning: the decode/write threads need the CPUs between session runs
        self.sess = ort_session(plan.model, device="cuda" if gpu else "cpu", threads=self.threads,
                                spinning=False)
        check_session(plan.meta, session_inputs(self.sess), self.sess.get_outputs(),
                      plan.target)
        self.provider = self.sess.get_providers()[0]
        self.in_name = self.sess.get_inputs()[0].name
        self.fetch = ["logits", plan.cam_output]
        self.keep_image = "overlay" in plan.save
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="cam_actor")
        log.info("actor pid %d: %d threads, %s", os.getpid(), self.threads, self.provider)

    def _load(self, item: Item, abspath: str) -> Decoded | Failed:
        out = _load(Item(abspath, item.name), self.plan.meta, self.keep_image,
                    self.plan.max_pixels, self.plan.max_file_size)
        return dataclasses.replace(out, item=item)  # the path as listed, in every record

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        plan = self.plan
        ids = [int(v) for v in batch["id"]]
        items = [Item(_text(p), _text(n)) for p, n in zip(batch["path"], batch["name"])]
        outcomes = list(self.pool.map(self._load, items, [_text(a) for a in batch["abspath"]]))
        lines: list[str] = [""] * len(ids)
        raw: list[str] = [""] * len(ids)
        audit_s = 0.0
        ok = np.zeros(len(ids), dtype=bool)
        good = [j for j, o in enumerate(outcomes) if isinstance(o, Decoded)]
        if good:
            decoded: list[Decoded] = [outcomes[j] for j in good]  # type: ignore[misc]
            x = np.stack([d.tensor.numpy() for d in decoded])
            feed = {self.in_name: x}
            if plan.target >= 0:
                feed["target"] = np.full((len(decoded),), plan.target, dtype=np.int64)
            logits, cams = self.sess.run(self.fetch, feed)
            base = result_lines([d.item for d in decoded], [d.size for d in decoded], logits, cams,
                                plan.target, plan.topk, plan.meta, plan.method)
            todo = [k for k, line in enumerate(base) if not isinstance(line, Failed)]
            rows: dict[int, Any] = {}
            if plan.metrics and todo:  # the local job's audit, through this actor's session
                ta = time.perf_counter()
                rows = dict(zip(todo, audit_lines(
                    self.sess, x[todo], cams[todo], [base[k] for k in todo], plan.metrics,
                    steps=plan.metrics_steps, baseline=plan.metrics_baseline)))
                audit_s = time.perf_counter() - ta
            finished = dict(zip(todo, self.pool.map(
                lambda k: finish_image(Path(plan.out), decoded[k], cams[k], plan.save), todo)))
            for k, j in enumerate(good):
                line = base[k]
                done = finished.get(k)
                if isinstance(line, Failed) or isinstance(done, Failed):
                    outcomes[j] = line if isinstance(line, Failed) else done  # type: ignore[assignment]
                    continue
                line["files"], line["bbox"] = done
                try:
                    lines[j], ok[j] = encode_line(line), True
                    if k in rows:
                        raw[j] = json.dumps(rows[k])
                except ValueError as exc:
                    outcomes[j] = Failed(_line_item(line), "InvalidOutput",
                                         f"the result is not valid JSON: {str(exc)[:100]}")
        for j, o in enumerate(outcomes):
            if isinstance(o, Failed):
                lines[j] = encode_line({"path": o.item.path, "type": o.type, "reason": o.reason})
        busy = (time.perf_counter() - t0) / max(1, len(ids))
        return {"id": np.asarray(ids, dtype=np.int64), "ok": ok,
                "line": np.asarray(lines, dtype=object),
                "provider": np.asarray([self.provider] * len(ids), dtype=object),
                "seconds": np.full(len(ids), busy),
                "metrics": np.asarray(raw, dtype=object),
                "metrics_seconds": np.full(len(ids), audit_s / max(1, len(ids)))}


def _line_item(line: dict[str, Any]) -> Item:
    return Item(str(line.get("path")), str(line.get("name")))


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
    """Explain every input image on Ray; the local job's contract (see the module docstring).

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
        items = []
        for it in _unique(iter_inputs(cfg.inputs, exclude=cfg.out), outputs.done, counts,
                          reserved=outputs.names):
            if it.error is not None:  # refused while listing: its error line, written here
                outputs.error(Failed(it, *it.error))
            else:
                items.append(it)
        outputs.flush()
        stats.skipped = counts.get("skipped", 0)
        stats.malformed = outputs.malformed
        if items:
            started = connect(opts.address, verbose)
            if timings is not None:
                timings["connect"] = time.perf_counter() - t0
            import ray
            from tqdm import tqdm

            actors = pool_size(opts, ray.cluster_resources())
            configure_data_context(verbose)
            log.info("%d images on Ray at %s: %d..%d actors of %g CPU, %g GPU", len(items),
                     opts.address, actors[0], actors[1], opts.cpus_per_actor, opts.gpus_per_actor)
            ds = build_dataset(items, plan, opts, cfg.batch_size, actors)
            show = (os.isatty(2) if cfg.progress is None else cfg.progress)
            bar = tqdm(total=len(items), unit="img", disable=not show, dynamic_ncols=True,
                       smoothing=0.1)
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
    stats.ok, stats.failed = outputs.ok, outputs.failed
    stats.seconds = time.perf_counter() - t0
    end_metrics(plan, stats, means)
    return stats


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
