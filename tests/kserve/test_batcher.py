"""camserve.kserve.batcher: concurrent requests share one model call, within rows and work; a
request is never split, never failed by its batch-mates, and a failed call reaches every request."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from camserve.kserve.batcher import MicroBatcher, WorkGate
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


def test_the_work_gate_holds_requests_until_work_is_given_back() -> None:
    async def main() -> list[Any]:
        gate = WorkGate(10)
        await gate.reserve(10)
        waiting = [asyncio.ensure_future(gate.reserve(4)) for _ in range(3)]
        await asyncio.sleep(0.01)
        seen = [sum(w.done() for w in waiting)]
        gate.give_back(7)  # 3 held: one more fits
        await asyncio.sleep(0.01)
        seen.append(sum(w.done() for w in waiting))
        gate.give_back(7)  # nothing held: the other two fit
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
        seen.append(gate.held)
        gate.give_back(8)
        await asyncio.wait_for(gate.reserve(25), 5)  # over the capacity passes when none is held
        seen.append(gate.held)
        return seen

    assert asyncio.run(main()) == [0, 1, 8, 25]


def test_a_cancelled_reservation_holds_nothing() -> None:
    async def main() -> int:
        gate = WorkGate(5)
        await gate.reserve(5)
        waiting = asyncio.ensure_future(gate.reserve(5))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        gate.give_back(5)
        await asyncio.wait_for(gate.reserve(5), 5)  # the cancelled one left no waiter behind
        return gate.held

    assert asyncio.run(main()) == 5
