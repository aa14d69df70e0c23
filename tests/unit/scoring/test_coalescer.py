"""`scoring.features._Coalescer`: concurrent lookups share a round trip, each gets its own rows.

The read function stands in for Redis here (the real round trip is covered by the skew and API
tests): it records every call and answers, per "reader", each row's own id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from scoring.features import _Coalescer


class Source:
    """Two readers (user, merchant); answers each row's ids, records every call."""

    def __init__(self, fail: Exception | None = None, delay_s: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.delay_s = delay_s

    async def read(self, rows: Sequence[dict[str, Any]]) -> Any:
        self.calls.append([r["id"] for r in rows])
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [[[f"u:{r['id']}"] for r in rows], [[f"m:{r['id']}"] for r in rows]]


def _rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}"} for i in range(n)]


def _expected(rows: list[dict[str, Any]]) -> Any:
    return [[[f"u:{r['id']}"] for r in rows], [[f"m:{r['id']}"] for r in rows]]


def test_requests_in_one_turn_share_one_read_and_get_their_own_rows() -> None:
    src = Source()
    co = _Coalescer(src.read, max_rows=64)
    requests = [_rows(f"r{k}-", k + 1) for k in range(5)]

    async def main() -> list[Any]:
        return await asyncio.gather(*(co.read(rows) for rows in requests))

    answers = asyncio.run(main())
    assert len(src.calls) == 1 and len(src.calls[0]) == sum(len(r) for r in requests)
    assert answers == [_expected(rows) for rows in requests]


def test_large_requests_read_alone_and_shared_reads_stay_under_the_cap() -> None:
    src = Source()
    co = _Coalescer(src.read, max_rows=10)
    big, smalls = _rows("big", 10), [_rows(f"s{k}-", 4) for k in range(5)]

    async def main() -> list[Any]:
        return await asyncio.gather(co.read(big), *(co.read(rows) for rows in smalls))

    answers = asyncio.run(main())
    assert answers == [_expected(big), *(_expected(rows) for rows in smalls)]
    assert [c for c in src.calls if c[0].startswith("big")] == [[r["id"] for r in big]]
    shared = [c for c in src.calls if not c[0].startswith("big")]
    assert len(shared) == 3 and all(len(c) <= 10 for c in shared)  # 4+4, 4+4, 4


def test_an_error_fails_that_round_trip_only() -> None:
    src = Source(fail=ConnectionError("redis down"))
    co = _Coalescer(src.read)

    async def main() -> list[Any]:
        return await asyncio.gather(*(co.read(_rows(f"e{k}-", 2)) for k in range(3)),
                                    return_exceptions=True)

    answers = asyncio.run(main())
    assert len(src.calls) == 1
    assert all(isinstance(a, ConnectionError) for a in answers)
    src.fail = None
    assert asyncio.run(co.read(_rows("ok", 2))) == _expected(_rows("ok", 2))


def test_a_request_that_gives_up_leaves_the_shared_read_to_the_others() -> None:
    src = Source(delay_s=0.2)
    co = _Coalescer(src.read)

    async def impatient() -> Any:
        async with asyncio.timeout(0.05):
            return await co.read(_rows("late", 1))

    async def main() -> tuple[Any, Any]:
        return await asyncio.gather(impatient(), co.read(_rows("patient", 2)),
                                    return_exceptions=True)

    gave_up, served = asyncio.run(main())
    assert isinstance(gave_up, TimeoutError)
    assert served == _expected(_rows("patient", 2))
    assert len(src.calls) == 1


def test_a_loop_closed_before_its_flush_does_not_strand_later_callers() -> None:
    src = Source()
    co = _Coalescer(src.read)
    loop = asyncio.new_event_loop()
    task = loop.create_task(co.read(_rows("lost", 1)))
    loop.call_soon(loop.stop)  # runs before the flush the task's first step schedules
    loop.run_forever()
    assert src.calls == []  # queued, never sent
    task.cancel()
    loop.close()  # the flush it scheduled never runs
    answer = asyncio.run(asyncio.wait_for(co.read(_rows("next", 1)), 2))
    assert answer == _expected(_rows("next", 1))
    assert src.calls == [["next0"]]
