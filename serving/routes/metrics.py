"""`GET /metrics`: the scorer's Prometheus metrics (text format); under `--workers N`, all
workers' merged (serving/metrics.py), whichever worker answers."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving import metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def prometheus_metrics() -> Response:
    # off the event loop: with workers it reads and merges their files
    return Response(await asyncio.to_thread(metrics.exposition), media_type=CONTENT_TYPE_LATEST)
