"""A closed-loop load generator for the serving benchmarks: ``clients`` threads, each with its own
HTTP session, send ``total`` requests in all, each waiting for its answer before the next.

Example::

    >>> seconds, latencies, errors = closed_loop(6, 2, lambda session, i: i % 3 != 0)
    >>> len(latencies), errors
    (6, 2)
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


def closed_loop(total: int, clients: int, send: Callable[[Any, int], bool],
                session_factory: Callable[[], Any] = lambda: None) -> tuple[float, list[float], int]:
    """Run ``send(session, i)`` for i in 0..total-1 from ``clients`` threads; ``send`` returns
    whether the answer was right. Returns (seconds from the moment every thread is ready, the
    latency of each request in seconds, the number of wrong answers)."""
    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0
    ready = threading.Barrier(clients + 1)

    def worker() -> None:
        nonlocal errors
        session = session_factory()
        ready.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            ok = send(session, i)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                errors += not ok

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker) for _ in range(clients)]
        ready.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
    return time.perf_counter() - t0, latencies, errors
