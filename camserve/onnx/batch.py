"""The batch job's local runner: :func:`run_job` explains every input image on this machine with
one onnxruntime session (:class:`camserve.onnx.job.BatchExplainer`) and a thread pool that reads,
decodes and writes, at most a few batches and ``--window-bytes`` of decoded data ahead of the
session. When the session leaves CPUs free (``--device cuda``, or ``--threads`` below the CPU
count) the pool works while onnxruntime runs; when the session uses every CPU, between its runs.

The job's manual (inputs, outputs, exit statuses, limits): docs/batch.md.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Iterator

import numpy as np

from .audit import MetricMeans
from .inputs import ByteBudget, Decoded, Failed, Outcome, decoded_stream
from .job import (BatchExplainer, Explained, JobConfig, JobPlan, JobStats, finish_stats,
                  list_items, plan_job, progress_bar, start_metrics)
from .outputs import Outputs
from .session import available_cpus

log = logging.getLogger(__name__)


def run_job(cfg: JobConfig) -> JobStats:
    """Explain every input image; see docs/batch.md. UsageError for bad options and for graph
    metadata that does not fit; KeyboardInterrupt (Ctrl-C) after writing whole lines only
    (queued work is cancelled, ``--resume`` continues)."""
    plan = plan_job(cfg)
    cpus = available_cpus()
    threads = cfg.threads or cpus
    explainer = BatchExplainer.open(plan, device=cfg.device, threads=threads)
    outputs = Outputs(cfg.out, cfg.resume)  # after everything that can fail on bad options
    # Overlap decoding with the session when the session leaves CPUs free (a GPU, or fewer
    # threads than CPUs). When it uses every CPU, decoding alongside it only makes its threads
    # wait for preempted ones: decode, heatmaps and files then run between session runs, on
    # every CPU, and the session runs alone.
    overlap = cfg.overlap if cfg.overlap is not None else (cfg.device == "cuda" or threads < cpus)
    workers = cfg.workers or min(8, max(2, cpus))
    return LocalRun(cfg, plan, explainer, outputs, workers=workers, overlap=overlap).run()


class LocalRun:
    """One run of the local job: the pool that decodes and writes, the byte budget of what it
    holds, and the batches whose files are still being written (their lines go out in order,
    flushed per batch)."""

    def __init__(self, cfg: JobConfig, plan: JobPlan, explainer: BatchExplainer,
                 outputs: Outputs, *, workers: int, overlap: bool) -> None:
        self.cfg, self.plan, self.explainer, self.outputs = cfg, plan, explainer, outputs
        self.workers, self.overlap = workers, overlap
        self.stats = JobStats(providers=list(explainer.providers), malformed=outputs.malformed)
        self.means = MetricMeans()
        self.counts: dict[str, int] = {}
        self.budget = ByteBudget(plan.window_bytes)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch_cam")
        self.decoding: deque[Future[Outcome]] = deque()   # reads and decodes in flight
        self.writing: deque[list[Explained]] = deque()    # batches whose files are being made
        self.bar = progress_bar(cfg.progress)

    def run(self) -> JobStats:
        """Stream, explain and write every item; the pool is shut down and the outputs closed
        whatever happens."""
        start_metrics(self.plan, self.stats)
        t0 = time.perf_counter()
        try:
            batch: list[Decoded] = []
            for outcome in self._stream():
                if isinstance(outcome, Failed):
                    self.outputs.error(outcome)
                    self.bar.update(1)
                    continue
                batch.append(outcome)
                if len(batch) >= self.cfg.batch_size or self.budget.over():
                    self._explain(batch)
                    batch = []
            if batch:
                self._explain(batch)
            self._write_lines(keep=0)
        except BaseException:
            # Ctrl-C or a failure: queued decodes and writes are cancelled, running ones end on
            # their own; only lines already complete are written
            self.pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            self.pool.shutdown(wait=True)
            self.bar.close()
            self.outputs.close()
        self.stats.skipped = self.counts.get("skipped", 0)
        self.stats.peak_window_bytes = self.budget.peak
        return finish_stats(self.plan, self.stats, self.outputs, self.means, t0)

    def _stream(self) -> Iterator[Outcome]:
        return decoded_stream(list_items(self.cfg, self.outputs, self.counts), self.pool,
                              window=2 * self.cfg.batch_size + self.workers, meta=self.plan.meta,
                              keep_image="overlay" in self.plan.save,
                              max_pixels=self.plan.max_pixels, pending=self.decoding,
                              budget=self.budget, max_file_size=self.plan.max_file_size)

    def _explain(self, batch: list[Decoded]) -> None:
        """One batch through the explainer; its lines wait for their files in :attr:`writing`."""
        if not self.overlap or self.budget.over():  # the CPU phase ends before the session runs
            if not self.overlap:
                futures_wait(list(self.decoding))
            self._write_lines(keep=0)
        done = self.explainer.explain(batch, self._submit)
        self.stats.session_seconds += done.session_seconds
        self.stats.metrics_seconds += done.metrics_seconds
        explained: list[Explained] = []
        for d, row in zip(batch, done.rows):
            if isinstance(row, Failed):
                self.budget.release(d.nbytes)
                self.outputs.error(row)
            else:
                explained.append(row)
        self.means.add(e.metrics for e in explained)
        self.writing.append(explained)
        self.bar.update(len(batch))
        if self.overlap:
            self._write_lines(keep=1)  # the previous batch's lines, while this one's files are made

    def _submit(self, fn: Callable[[Decoded, np.ndarray], Any], d: Decoded,
                cam: np.ndarray) -> Future[Any]:
        """The explainer's artefacts of ``d`` made in the pool, its bytes released when done."""
        return self.pool.submit(self._release_after, fn, d, cam)

    def _release_after(self, fn: Callable[[Decoded, np.ndarray], Any], d: Decoded,
                       cam: np.ndarray) -> Any:
        try:
            return fn(d, cam)
        finally:
            self.budget.release(d.nbytes)

    def _write_lines(self, keep: int) -> None:
        """Write the lines of the oldest batches, each once its files are done, until ``keep``
        batches are left; flushed per batch."""
        while len(self.writing) > keep:
            for e in self.writing.popleft():
                line = e.result()
                if isinstance(line, Failed):
                    self.outputs.error(line)
                else:
                    self.outputs.result(line)
            self.outputs.flush()
