"""Soak: our scorer under a fixed open-loop rate for minutes, with its memory watched.

`python -m bench soak` (10 min at 1,000 requests/s; `--quick`: 30 s at 200/s).  The scorer
(`python -m serving`, the scoring benchmark's data set, model and request templates) answers
`POST /v1/score` at `soak_rate` requests/s open loop (bench.loadgen, latency from the scheduled
send time) while a sampler thread reads the server's RSS (all its processes) every
`SAMPLE_S` seconds.  Bounded: the run stops by itself after the duration plus a short drain.

Reported: errors (any answer other than 200, broken connections, requests not answered by the
end), latency per window and overall, and memory: RSS after the first window (warm: model,
registry and pools loaded) against RSS at the end, and the least-squares slope of RSS after the
first window.  "Flat" means growth <= FLAT_GROWTH_PCT between those two points.  A plot of RSS
and per-window p99 goes to reports/soak.png (`--quick`: soak-quick.png).
There is no stock alternative: this is a hardening check, not a comparison.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen, scoring
from bench.config import Sizes, get_settings
from bench.data import scoring_dataset, with_loadable_model
from bench.procs import free_port, running, wait_http
from bench.report import Measure, Section, Target

SAMPLE_S = 2.0
FLAT_GROWTH_PCT = 5.0
WINDOWS = 10


class RssSampler(threading.Thread):
    """RSS of a process tree every `every` seconds, with a progress line per window."""

    def __init__(self, pid: int, every: float, progress_every: float, total_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.progress_every, self.total_s = pid, every, progress_every, total_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        t0 = time.perf_counter()
        next_progress = self.progress_every
        while not self._done.is_set():
            t = time.perf_counter() - t0
            try:
                root = psutil.Process(self.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                break
            self.samples.append((t, rss / 2**20))
            if t >= next_progress:
                print(f"   soak: {t:5.0f}/{self.total_s:.0f} s, server RSS {rss / 2**20:.0f} MiB",
                      flush=True)
                next_progress += self.progress_every
            self._done.wait(self.every)

    def stop(self) -> list[tuple[float, float]]:
        self._done.set()
        self.join(10)
        return self.samples


def windows(run: loadgen.LoadResult, n_windows: int) -> list[dict[str, Any]]:
    """Per window of scheduled send times: requests, errors and latency percentiles (ms)."""
    n = len(run.latency)
    rate = run.rate or 1.0
    edges = np.linspace(0, n, n_windows + 1).astype(int)
    out = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        lat = np.where(np.isnan(run.latency[a:b]), np.inf, run.latency[a:b]) * 1000
        codes = run.codes[a:b]
        out.append({
            "from_s": round(a / rate, 1), "to_s": round(b / rate, 1), "requests": int(b - a),
            "errors": int(np.count_nonzero(codes != 200)),
            "p50_ms": float(np.percentile(lat, 50, method="higher")) if b > a else None,
            "p99_ms": float(np.percentile(lat, 99, method="higher")) if b > a else None,
            "max_ms": float(lat.max()) if b > a else None,
        })
    return out


def memory(samples: list[tuple[float, float]], warm_s: float) -> dict[str, float]:
    """RSS once warm vs at the end, and the slope after warm-up (MiB per minute)."""
    ts = np.array([t for t, _ in samples])
    mb = np.array([m for _, m in samples])
    warm = ts >= warm_s
    if warm.sum() < 2:
        warm = np.ones(len(ts), bool)
    slope = float(np.polyfit(ts[warm], mb[warm], 1)[0] * 60) if warm.sum() >= 2 else 0.0
    start, end = float(mb[warm][0]), float(mb[-1])
    return {"rss_start_mb": float(mb[0]), "rss_warm_mb": start, "rss_end_mb": end,
            "rss_peak_mb": float(mb.max()), "growth_pct": (end - start) / start * 100,
            "slope_mb_per_min": slope}


def plot(samples: list[tuple[float, float]], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a1.plot([t for t, _ in samples], [m for _, m in samples])
    a1.set_ylabel("server RSS (MiB)")
    a1.set_ylim(bottom=0)
    mids = [(r["from_s"] + r["to_s"]) / 2 for r in rows]
    a2.plot(mids, [r["p99_ms"] for r in rows], marker="o", label="p99")
    a2.plot(mids, [r["p50_ms"] for r in rows], marker="o", label="p50")
    a2.set_ylabel("latency (ms)")
    a2.set_xlabel("seconds into the soak (scheduled send time)")
    a2.set_yscale("log")
    a2.legend()
    fig.suptitle("soak: POST /v1/score, open loop")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(sizes: Sizes, section: Section) -> None:
    s = get_settings()
    dataset, model_note = with_loadable_model(scoring_dataset())
    if model_note:
        section.notes.append(model_note)
    pool = scoring.request_pool(dataset)
    port = free_port()
    server = scoring.ours_server(pool, port, s.workers)
    rate, duration = sizes.soak_rate, sizes.soak_duration_s
    section.ours_label = f"`python -m serving --workers {s.workers}` POST /v1/score"
    section.stock_label = "none (a hardening check)"
    log = s.run_dir / "logs" / "soak-server.log"
    with running("soak server", server.argv, dataset.env(SERVING_LOG_LEVEL="WARNING"),
                 log) as child:
        wait_http(f"http://{scoring.HOST}:{port}/ready", child, s.server_start_timeout_s)
        make = scoring.request_factory(server, port)
        sampler = RssSampler(child.pid, SAMPLE_S, duration / WINDOWS, duration)
        sampler.start()
        load = loadgen.open_loop(scoring.HOST, port, make, rate, duration,
                                 sizes.score_connections, drain_s=5)
        samples = sampler.stop()
        alive = child.alive()
    rows = windows(load, WINDOWS)
    mem = memory(samples, warm_s=duration / WINDOWS)
    summary = load.summary()
    errors = int(np.count_nonzero(load.codes != 200))
    png = s.reports_dir / ("soak.png" if sizes.label == "full" else f"soak-{sizes.label}.png")
    plot(samples, rows, png)
    section.details = {"load": summary, "windows": rows, "memory": mem, "rss_samples": samples,
                       "server_alive_at_end": alive, "plot": str(png)}
    lat: dict[str, float] = summary["latency_s"]  # type: ignore[assignment]
    section.measures += [
        Measure(f"errors in {duration:.0f} s @{rate:,.0f}/s", "", errors, None, "lower",
                Target("<=", 0), note=f"statuses {summary['statuses']}, broken connections "
                f"{load.errors}, unanswered {load.incomplete}; server alive at the end: {alive}",
                stock_missing="-"),
        Measure("RSS growth after warm-up", "%", mem["growth_pct"], None, "lower",
                Target("<=", FLAT_GROWTH_PCT), stock_missing="-",
                note=f"{mem['rss_warm_mb']:.0f} MiB after the first window -> "
                     f"{mem['rss_end_mb']:.0f} MiB at the end; slope "
                     f"{mem['slope_mb_per_min']:+.2f} MiB/min"),
        Measure("completed", "/s", load.throughput, None, "higher", stock_missing="-"),
        *[Measure(f"latency {q} (whole soak)", "ms", lat.get(q, float("nan")) * 1000, None,
                  "lower", stock_missing="-") for q in ("p50", "p99", "p99.9", "max")],
    ]
    section.notes.append(
        f"{rate:,.0f} requests/s open loop for {duration:.0f} s over {sizes.score_connections} "
        f"connections; data: {dataset.describe()}; RSS sampled every {SAMPLE_S:.0f} s; plot: "
        f"{png}.")
    section.notes.append("Per window (scheduled send time):\n\n" + _table(rows))


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| window (s) | requests | errors | p50 ms | p99 ms | max ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['from_s']:.0f}-{r['to_s']:.0f} | {r['requests']:,} | {r['errors']} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} |")
    return "\n".join(lines)
