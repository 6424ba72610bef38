"""camserve.kserve.batcher: concurrent requests share one model call, within rows and work; a
request is never split, never failed by its batch-mates, and a failed call reaches every request."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from camserve.kserve.batcher import MicroBatcher
from camserve.serving import RowResult

Item = tuple[list[Any], list[bool]]  # a request's rows and explain flags


def _recording_run(calls: list[list[Any]]) -> Any:
    def run(items: list[Item]) -> list[list[RowResult]]:
        calls.append([r for rows, _ in items for r in rows])
        return [[RowResult(200, {"row": r, "explain": f}) for r, f in zip(rows, flags)]
                for rows, flags in items]
    return run


def test_microbatcher_joins_concurrent_requests_and_splits_answers() -> None:
    calls: list[list[Any]] = []

    async def main() -> list[list[RowResult]]:
        b = MicroBatcher(_recording_run(calls), max_rows=8, max_delay_s=0.2)
        return await asyncio.gather(b.submit(([1, 2], [False, False]), rows=2),
                                    b.submit(([3], [True]), rows=1),
                                    b.submit(([4, 5, 6], [False] * 3), rows=3))

    answers = asyncio.run(main())
    assert [[r.body["row"] for r in a] for a in answers] == [[1, 2], [3], [4, 5, 6]]
    assert answers[1][0].body["explain"] is True
    assert calls == [[1, 2, 3, 4, 5, 6]]


def test_microbatcher_reports_a_failed_batch_to_every_request() -> None:
    def run(items: list[Any]) -> list[Any]:
        raise RuntimeError("boom")

    async def main() -> list[Any]:
        b = MicroBatcher(run, max_rows=8, max_delay_s=0.05)
        return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)

    assert [str(e) for e in asyncio.run(main())] == ["boom", "boom"]


def test_a_wrong_number_of_results_fails_every_request() -> None:
    async def main() -> list[Any]:
        b = MicroBatcher(lambda items: items[:1], max_rows=8, max_delay_s=0.05)
        return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)

    assert all("2 requests" in str(e) for e in asyncio.run(main()))


def test_rows_close_a_batch_but_never_split_a_request() -> None:
    calls: list[list[Any]] = []

    async def main() -> list[list[RowResult]]:
        b = MicroBatcher(_recording_run(calls), max_rows=2, max_delay_s=0.2)
        return await asyncio.gather(b.submit((["a"], [False])), b.submit((["b", "c"], [False] * 2),
                                                                          rows=2),
                                    b.submit((["d"], [False])))

    answers = asyncio.run(main())
    assert [[r.body["row"] for r in a] for a in answers] == [["a"], ["b", "c"], ["d"]]
    assert calls == [["a", "b", "c"], ["d"]]  # a batch takes a whole request, then closes


def test_work_closes_a_batch_and_the_next_request_waits_instead_of_failing() -> None:
    calls: list[list[Any]] = []

    async def main() -> list[list[RowResult]]:
        b = MicroBatcher(_recording_run(calls), max_rows=8, max_delay_s=0.2, max_work=10)
        return await asyncio.gather(*(b.submit(([name], [True]), work=w)
                                      for name, w in (("a", 6), ("b", 6), ("c", 3), ("big", 25))))

    answers = asyncio.run(main())
    assert [a[0].status for a in answers] == [200] * 4  # no request failed for its batch-mates
    assert calls == [["a"], ["b", "c"], ["big"]]  # a request over the budget alone still runs


def test_max_rows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        MicroBatcher(lambda items: items, max_rows=0, max_delay_s=0.0)
