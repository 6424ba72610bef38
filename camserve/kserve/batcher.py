"""Batching across concurrent requests: the prepared images of several requests, one model call.

KServe 0.21's Python server has no request batching of its own (its ``batcher`` is the
InferenceService's agent sidecar, v1 only), so the predictor gathers requests here: those arriving
within ``max_delay_s`` of the first, up to ``max_rows`` rows and ``max_work`` of work, go through
one ``run`` call on one worker thread (the model is used by one thread at a time). A request is
never split; a request whose work would take the batch over ``max_work`` waits for the next batch
(its own work is within the budget: the core refused it otherwise), so a request's batch-mates
never make it fail. The manual: ``docs/kserve.md``.

Requests are prepared (decoded) before they are batched, so :class:`WorkGate` bounds the work
that prepared requests hold until they are answered: a request reserves the most it may take
before it is prepared, keeps what it took, and gives it back once answered; a request waits while
the gate is full (nothing is refused).

Example::

    >>> import asyncio
    >>> b = MicroBatcher(lambda items: [x * 10 for x in items], max_rows=8, max_delay_s=0.01)
    >>> async def two():
    ...     return await asyncio.gather(b.submit(1), b.submit(2))
    >>> asyncio.run(two())
    [10, 20]
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Callable, Generic, Optional, TypeVar

log = logging.getLogger(__name__)

#: threads preparing requests (decoding, resizing) beside the batcher's one model thread
DEFAULT_PREPARE_THREADS = 2

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Job(Generic[T, R]):
    item: T
    rows: int
    work: int
    future: "asyncio.Future[R]"


class MicroBatcher(Generic[T, R]):
    """Gathers the items of concurrent :meth:`submit` calls into one ``run(items)`` call, which
    returns one result per item, in order.

    Args:
        run: the batched call; runs on this batcher's single worker thread.
        max_rows: a batch closes once it holds this many rows (a request is never split: one
            request larger than this is a batch of its own).
        max_delay_s: how long a batch waits for more requests after its first arrived.
        max_work: the work one batch may hold (None: no limit); a request that would take the
            batch over it starts the next batch.
    """

    def __init__(self, run: Callable[[list[T]], list[R]], max_rows: int, max_delay_s: float,
                 max_work: Optional[int] = None) -> None:
        if max_rows < 1:
            raise ValueError(f"invalid value for max_rows: {max_rows} (at least 1)")
        self.run = run
        self.max_rows = max_rows
        self.max_delay_s = max(0.0, max_delay_s)
        self.max_work = max_work
        self._queue: Optional[asyncio.Queue[_Job[T, R]]] = None
        self._held: Optional[_Job[T, R]] = None
        self._task: Optional[asyncio.Task[None]] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    async def submit(self, item: T, rows: int = 1, work: int = 0) -> R:
        """The result of ``item`` (``rows`` rows, ``work`` work) once its batch has run."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._held = None
            self._executor = self._executor or concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="camserve-model")
            self._task = loop.create_task(self._loop(self._queue))
        job: _Job[T, R] = _Job(item, rows, work, loop.create_future())
        await self._queue.put(job)
        return await job.future

    def _fits(self, batch: list[_Job[T, R]], job: _Job[T, R]) -> bool:
        if self.max_work is None:
            return True
        return sum(j.work for j in batch) + job.work <= self.max_work

    async def _next(self, queue: "asyncio.Queue[_Job[T, R]]",
                    deadline: float) -> Optional[_Job[T, R]]:
        """The held-over job, else the next queued one arriving before ``deadline`` (loop time);
        None when the deadline passed."""
        if self._held is not None:
            job, self._held = self._held, None
            return job
        if not queue.empty():
            return queue.get_nowait()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return None
        try:
            return await asyncio.wait_for(queue.get(), left)
        except asyncio.TimeoutError:
            return None

    async def _collect(self, queue: "asyncio.Queue[_Job[T, R]]") -> list[_Job[T, R]]:
        if self._held is not None:
            first, self._held = self._held, None
        else:
            first = await queue.get()
        batch = [first]
        rows = first.rows
        deadline = asyncio.get_running_loop().time() + self.max_delay_s
        while rows < self.max_rows:
            job = await self._next(queue, deadline)
            if job is None:
                break
            if not self._fits(batch, job):
                self._held = job
                break
            batch.append(job)
            rows += job.rows
        return batch

    async def _loop(self, queue: "asyncio.Queue[_Job[T, R]]") -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect(queue)
            try:
                results = await loop.run_in_executor(self._executor, self.run,
                                                     [j.item for j in jobs])
                if len(results) != len(jobs):
                    raise RuntimeError(f"the batched call returned {len(results)} results for "
                                       f"{len(jobs)} requests")
            except Exception as exc:  # an internal error: every waiting request learns of it
                log.exception("camserve: a batch of %d requests failed", len(jobs))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            for j, res in zip(jobs, results):
                if not j.future.done():
                    j.future.set_result(res)



class WorkGate:
    """The work held by requests between being prepared and being answered, bounded by
    ``capacity``: :meth:`reserve` waits until the amount fits (or nothing is held), and
    :meth:`give_back` returns work and wakes the waiting requests. Used from one event loop.

    Example::

        >>> gate = WorkGate(10)
        >>> async def two():
        ...     await gate.reserve(8)
        ...     waiting = asyncio.ensure_future(gate.reserve(8))
        ...     await asyncio.sleep(0)
        ...     before = waiting.done()
        ...     gate.give_back(6)  # the first request took 2 of its 8
        ...     await waiting
        ...     return before, gate.held
        >>> asyncio.run(two())
        (False, 10)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def reserve(self, amount: int) -> None:
        """Hold ``amount`` once it fits beside what is held (at once when nothing is)."""
        while self.held and self.held + amount > self.capacity:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.held += amount

    def give_back(self, amount: int) -> None:
        """Return ``amount`` of held work; the waiting requests try again."""
        self.held -= amount
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
