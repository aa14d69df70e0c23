"""The scorer's model runs on one native thread, in the event loop and in its worker threads."""

from __future__ import annotations

import asyncio
import os

import pytest
import sklearn  # noqa: F401 - loads the OpenMP runtime threadpoolctl reports on
from threadpoolctl import threadpool_info

from serving.app import limit_native_threads


def _openmp_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "openmp"]


@pytest.mark.skipif(os.cpu_count() == 1, reason="one core: OpenMP runs one thread anyway")
def test_worker_threads_of_the_loop_run_one_openmp_thread() -> None:
    async def main() -> tuple[list[int], list[int]]:
        before = await asyncio.to_thread(_openmp_threads)  # the loop's stock executor
        limit_native_threads()
        return before, await asyncio.to_thread(_openmp_threads)

    before, after = asyncio.run(main())
    if os.environ.get("OMP_NUM_THREADS") is None:
        assert before and max(before) > 1  # the default: one thread per core
    assert after and set(after) == {1}
