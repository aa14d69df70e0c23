"""`python -m bench [BENCHMARK ...] [--quick]`: run benchmarks, print a table, write a report.

    python -m bench                 # all of them at realistic sizes -> reports/bench.{md,json}
    python -m bench --quick         # smoke sizes -> reports/bench-quick.{md,json}
    python -m bench scoring stream  # some of them -> reports/bench-scoring-stream.{md,json}

Benchmarks: scoring, materialize, stream, retrieval, batch_score, soak (see docs/benchmarks.md).
Each one runs its own servers, brokers and workers, bounded in time, and stops them all when it
ends, fails or is interrupted.  Nothing is asserted: missed targets are reported with the size
of the miss and a profile.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.config import Sizes, get_settings
from bench.procs import BenchError, python, run_json
from bench.report import Measure, Section, Target

# name -> (title, "module:function" taking (sizes, section))
BENCHMARKS: dict[str, tuple[str, str]] = {
    "scoring": ("scoring latency and throughput", "bench.scoring:run"),
    "materialize": ("materialization into the online store", ":materialize"),  # defined below
    "stream": ("stream throughput and freshness", "bench.stream:run"),
    "retrieval": ("training retrieval (point-in-time join)", "bench.retrieval:run"),
    "batch_score": ("batch scoring", "bench.batch_score:run"),
    "offline_engines": ("the offline tier on Spark vs DuckDB", "bench.offline_engines:run"),
    "soak": ("the scorer at a fixed open-loop rate for minutes", "bench.soak:run"),
    "explain": ("POST /v1/score with and without ?explain=true", "bench.explain:run"),
    "cluster": ("scoring on a 3-master Redis Cluster vs one Redis node", "bench.cluster:run"),
}


MATERIALIZE_TARGET_ENTITIES = 1_000_000
MATERIALIZE_TARGET_RATE = 100_000.0  # entities/s
MATERIALIZE_TARGET_RSS_MIB = 1.5e9 / 2**20  # 1.5 GB = 1,431 MiB


def materialize(sizes: Sizes, section: Section) -> None:
    """bench.materialize.run(entities), written separately, run in a bounded child process."""
    if importlib.util.find_spec("bench.materialize") is None:
        raise BenchError("bench.materialize is not available (module missing)")
    code = ("import json, sys; from bench.materialize import run; "
            "print(json.dumps(run(int(sys.argv[1])), default=str))")
    s = get_settings()
    timeout = 3600.0 if sizes.label == "full" else 600.0
    result = run_json("materialize", python("-c", code, str(sizes.materialize_entities)),
                      dict(os.environ, PYTHONUNBUFFERED="1"), s.run_dir / "logs" /
                      "materialize.log", timeout)
    section.details = result
    section.ours_label = "feature_repo.materialization.FastRedisMaterializationEngine"
    section.stock_label = "Feast's local materialization engine (`batch_engine: local`)"
    section.notes.append(
        f"bench.materialize.run({sizes.materialize_entities:,}) (see its docstring); sample "
        f"of {result.get('sample')} entities read back: raw hashes identical = "
        f"{result.get('identical_raw_hashes')}, get_online_features identical = "
        f"{result.get('identical_online_features')}; load average {result.get('load_average')}.")
    section.measures += _measures_from(result)
    if not section.measures:
        section.notes.append("bench.materialize returned no ours/stock pairs; raw result below.")


def _measures_from(result: dict[str, Any]) -> list[Measure]:
    """Measures from bench.materialize's result: {"stock": {...}, "fast": {...}, ...}.

    Rates are entities / seconds in `materialize`: the result's own `rows_per_s` divides the
    Redis database's key count, which other processes using the same database inflate.
    """
    ours, stock = result.get("fast"), result.get("stock")
    if not isinstance(ours, dict) or not isinstance(stock, dict):
        return []
    entities, stock_entities = result.get("entities"), result.get("stock_entities")
    same = stock_entities == entities

    def rate(n: object, r: dict[str, Any]) -> float | None:
        s = r.get("seconds")
        return float(n) / float(s) if isinstance(n, int) and s else None

    scope = "" if same else f" (stock on {stock_entities:,} entities)"
    # The targets are stated for 1M entities; smaller (--quick) runs report no target.
    at_size = isinstance(entities, int) and entities >= MATERIALIZE_TARGET_ENTITIES
    out = [
        Measure(f"entities/s{scope}", "/s", rate(entities, ours), rate(stock_entities, stock),
                "higher", Target(">=", MATERIALIZE_TARGET_RATE) if at_size else None,
                note=f"{entities:,} entities x {result.get('features')} features, "
                     f"{result.get('rows'):,} rows; keys in the Redis db after the "
                     f"run: ours {ours.get('keys')}, stock {stock.get('keys')}"),
        Measure(f"peak RSS{scope}", "MiB", ours.get("peak_rss_mb"), stock.get("peak_rss_mb"),
                "lower", Target("<=", MATERIALIZE_TARGET_RSS_MIB) if at_size else None),
    ]
    if same:
        out.insert(1, Measure("seconds in materialize", "s", ours.get("seconds"),
                              stock.get("seconds"), "lower"))
    return out


def _resolve(spec: str) -> Callable[[Sizes, Section], None]:
    module, func = spec.split(":")
    owner = importlib.import_module(module) if module else sys.modules[__name__]
    fn: Callable[[Sizes, Section], None] = getattr(owner, func)
    return fn


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every `finally`


def run_one(name: str, sizes: Sizes) -> Section:
    title, spec = BENCHMARKS[name]
    section = Section(name, title)
    section.load_before = os.getloadavg()
    section.probe_before_ms = report.speed_probe_ms()
    t0 = time.perf_counter()
    try:
        _resolve(spec)(sizes, section)
    except KeyboardInterrupt:
        section.error = "interrupted"
        raise
    except BenchError as exc:
        section.error = str(exc)
    except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
        section.error = traceback.format_exc()
    finally:
        section.seconds = time.perf_counter() - t0
        section.load_after = os.getloadavg()
        section.probe_after_ms = report.speed_probe_ms()
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("benchmarks", nargs="*", metavar="BENCHMARK",
                   help=f"any of: {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes, to validate the harness")
    p.add_argument("--workers", type=int, default=None,
                   help="server processes for scoring (ours and feast serve alike)")
    p.add_argument("--out", type=Path, default=None,
                   help="report path without suffix (default reports/bench[-quick][-names])")
    a = p.parse_args(argv)
    unknown = [b for b in a.benchmarks if b not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if a.workers is not None:
        os.environ["BENCH_WORKERS"] = str(a.workers)
        get_settings.cache_clear()
    signal.signal(signal.SIGTERM, _terminate)
    names = a.benchmarks or list(BENCHMARKS)
    sizes = Sizes.quick() if a.quick else Sizes.full()
    s = get_settings()
    stem = a.out or s.reports_dir / "-".join(
        ["bench"] + (["quick"] if a.quick else []) + (a.benchmarks or []))
    machine = report.machine_facts()
    run = {"sizes": sizes.label, "command": report.command_line(), "started": report.now_iso(),
           "benchmarks": names, "workers": s.workers, "sizes_detail": sizes.__dict__}
    t0 = time.perf_counter()
    sections: list[Section] = []
    try:
        for name in names:
            print(f"== {name} ({sizes.label}), load average {_load()}, speed probe "
                  f"{report.speed_probe_ms():.2f} ms", flush=True)
            section = run_one(name, sizes)
            sections.append(section)
            print(report.summary_table([section]), flush=True)
            if section.error:
                print(f"   {name} not run: {section.error.strip().splitlines()[-1]}", flush=True)
            _write(sections, run, machine, stem, t0)
    except KeyboardInterrupt:
        print("interrupted: children stopped; partial report written", file=sys.stderr)
        _write(sections, run, machine, stem, t0)
        return 130
    md, js = _write(sections, run, machine, stem, t0)
    print("\n" + report.summary_table(sections))
    print(f"\nreport: {md} and {js}")
    return 0


def _write(sections: list[Section], run: dict[str, object], machine: dict[str, object],
           stem: Path, t0: float) -> tuple[Path, Path]:
    run = dict(run, finished=report.now_iso(), seconds=time.perf_counter() - t0)
    machine = dict(machine, load_average_at_end=tuple(round(x, 2) for x in os.getloadavg()))
    return report.write(sections, run, machine, stem)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
