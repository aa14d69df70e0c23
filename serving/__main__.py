"""`python -m serving [--host H] [--port P] [--workers N]`: run the scorer with uvicorn."""

from __future__ import annotations

import os

# One OpenMP thread per process, set before numpy/sklearn load their runtime: a request scores
# a handful of rows, where thread fan-out only adds latency (replicas and workers scale out).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse

import uvicorn
from fastapi import FastAPI

from serving import logs
from serving.app import create_app
from serving.config import get_settings


def main(argv: list[str] | None = None) -> None:
    s = get_settings()
    p = argparse.ArgumentParser(description="fraudstream scorer")
    p.add_argument("--host", default=s.host)
    p.add_argument("--port", type=int, default=s.port)
    p.add_argument("--workers", type=int, default=s.workers)
    a = p.parse_args(argv)
    logs.configure(s.log_level)
    if a.workers > 1:
        uvicorn.run("serving.__main__:app_factory", factory=True, host=a.host, port=a.port,
                    workers=a.workers, access_log=False, log_config=None)
    else:
        uvicorn.run(create_app(s), host=a.host, port=a.port, access_log=False, log_config=None)


def app_factory() -> FastAPI:
    logs.configure(get_settings().log_level)
    return create_app(get_settings())


if __name__ == "__main__":
    main()
