"""Results of a benchmark run: measures next to their stock alternative, machine facts, files.

Every `Measure` holds our number and the stock alternative's number from the same run; the
ratio is always ours/stock, and "advantage" says how many times better ours is in the measure's
own direction (lower latency, higher throughput).  A target is checked against our value or the
ratio; a missed target is reported with the size of the miss, never asserted.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from feature_repo.config import PROJECT_DIR

PACKAGES = ("feast", "bytewax", "fastapi", "uvicorn", "redis", "duckdb", "pandas", "pyarrow",
            "numpy", "scikit-learn", "confluent-kafka", "dask", "httpx", "py-spy")


@dataclass
class Target:
    op: Literal["<=", ">="]
    value: float
    on: Literal["ours", "ratio"] = "ours"  # checked against our value or ours/stock

    def text(self, unit: str) -> str:
        return f"{self.op} {_fmt(self.value, 'x' if self.on == 'ratio' else unit)}" + (
            " ours/stock" if self.on == "ratio" else "")


@dataclass
class Measure:
    metric: str
    unit: str  # "ms", "s", "/s", "rows", "MiB", "x", ""
    ours: float | None
    stock: float | None
    better: Literal["lower", "higher"]
    target: Target | None = None
    note: str = ""
    stock_missing: str = ""  # shown instead of the stock value when there is none (why)

    @property
    def ratio(self) -> float | None:
        """ours / stock (None when either is missing, zero, infinite or NaN)."""
        if self.ours is None or self.stock is None:
            return None
        if not (math.isfinite(self.ours) and math.isfinite(self.stock)) or self.stock == 0:
            return None
        return self.ours / self.stock

    @property
    def advantage(self) -> float | None:
        """How many times better ours is (> 1 better, < 1 worse)."""
        r = self.ratio
        if r is None or r == 0:
            return None
        return 1 / r if self.better == "lower" else r

    def verdict(self) -> str:
        """'' (no target), 'met', or 'MISSED ...' with the size of the miss."""
        t = self.target
        if t is None:
            return ""
        value = self.ratio if t.on == "ratio" else self.ours
        unit = "x" if t.on == "ratio" else self.unit
        if value is None or math.isnan(value):
            return "not measured"
        ok = value <= t.value if t.op == "<=" else value >= t.value
        if ok:
            return "met"
        if value in (float("inf"), float("-inf")):
            return "MISSED (incomplete requests)"
        gap = abs(value - t.value)
        word = "over" if t.op == "<=" else "short"
        if not t.value:
            return f"MISSED by {_fmt(gap, unit)}"
        return f"MISSED by {_fmt(gap, unit)} ({gap / t.value * 100:.0f}% {word})"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ratio=self.ratio, advantage=self.advantage, verdict=self.verdict())
        return d


@dataclass
class Section:
    name: str
    title: str
    ours_label: str = "ours"
    stock_label: str = "stock"
    measures: list[Measure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None
    probe_before_ms: float | None = None
    probe_after_ms: float | None = None

    def missed(self) -> list[Measure]:
        return [m for m in self.measures if m.verdict().startswith("MISSED")]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["measures"] = [m.as_dict() for m in self.measures]
        return d


PROBE_NOTE = (
    "Speed probe: the median time of a fixed pure-Python loop (`speed_probe_ms`), taken before "
    "and after each benchmark. It does not depend on this project: when it is higher, the host "
    "gave this machine less CPU (other tenants), and every number of that benchmark is slower "
    "for it. On the development VM it read from 3.2 to 8.4 ms in one day, changing by 2x "
    "within minutes while the machine was otherwise idle.")


def speed_probe_ms(rounds: int = 9) -> float:
    """Median wall time in ms of a fixed CPU-bound loop (sum of squares of 0..99,999)."""
    import statistics

    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        sum(i * i for i in range(100_000))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _fmt(v: float | None, unit: str) -> str:
    if v is None or math.isnan(v):
        return "-"
    if v == float("inf"):
        return "inf (incomplete)"
    if unit == "ms":
        return f"{v:.2f} ms" if v < 100 else f"{v:,.0f} ms"
    if unit == "s":
        return f"{v:.2f} s" if v < 100 else f"{v:,.0f} s"
    if unit == "/s":
        return f"{v:,.0f}/s" if v >= 100 else f"{v:.1f}/s"
    if unit == "x":
        return f"{v:.2f}x"
    if unit in ("rows", ""):
        return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.3g}"
    return f"{v:,.1f} {unit}"


def _advantage(m: Measure) -> str:
    a = m.advantage
    if a is None:
        return "-"
    if a >= 1:
        return f"{a:.2f}x better"
    return f"{1 / a:.2f}x worse"


# --- machine facts -------------------------------------------------------------------------

def machine_facts() -> dict[str, Any]:
    """Cores, memory, load, OS and the versions of everything measured."""
    import psutil

    facts: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cgroup_cpu_max": _read("/sys/fs/cgroup/cpu.max"),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "memory_available_gib": round(psutil.virtual_memory().available / 2**30, 1),
        "load_average": tuple(round(x, 2) for x in os.getloadavg()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "redis_server": _redis_version(),
        "wrk": _tool_version(["wrk", "--version"]),
        "git_commit": _git(["rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_git(["status", "--porcelain"])),
    }
    return facts


def _cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _redis_version() -> str | None:
    import redis

    try:
        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        info: dict[str, Any] = redis.Redis.from_url(url, socket_timeout=2).info("server")  # type: ignore[assignment]
        return str(info["redis_version"])
    except redis.RedisError:
        return None


def _tool_version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    out = (proc.stdout or proc.stderr).strip().splitlines()
    return out[0] if out else None


def _git(args: list[str]) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# --- rendering -----------------------------------------------------------------------------

def summary_table(sections: list[Section]) -> str:
    head = ("| benchmark | metric | ours | stock | ours/stock | ours vs stock | target | result |\n"
            "| --- | --- | ---: | ---: | ---: | --- | --- | --- |")
    rows = [head]
    for s in sections:
        if s.error:
            rows.append(f"| {s.name} | (not run) | - | - | - | - | - | {s.error.splitlines()[0]} |")
            continue
        for m in s.measures:
            ratio = "-" if m.ratio is None else f"{m.ratio:.3g}"
            rows.append(
                f"| {s.name} | {m.metric} | {_fmt(m.ours, m.unit)} | "
                f"{m.stock_missing if m.stock is None and m.stock_missing else _fmt(m.stock, m.unit)} | "
                f"{ratio} | {_advantage(m)} | {m.target.text(m.unit) if m.target else ''} | "
                f"{m.verdict()} |"
            )
    return "\n".join(rows)


def render_markdown(sections: list[Section], run: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = [f"# fraudstream benchmarks ({run['sizes']})", ""]
    if run["sizes"] != "full":
        lines += ["> **Smoke-run sizes (`--quick`)**: these numbers validate the harness; they "
                  "are not the benchmark.", ""]
    lines += [
        f"Run {run['started']} - {run['finished']} ({run['seconds']:.0f} s): `{run['command']}`.",
        "Every number is measured in this run; *stock* is the stock Feast (or stock tool) "
        "alternative measured in the same run on the same data and machine. *ours/stock* is the "
        "raw ratio; *ours vs stock* says how many times better ours is in the metric's own "
        "direction. Benchmarks are not tests: nothing here is asserted.", "",
        "## Machine", "",
        "| fact | value |", "| --- | --- |",
    ]
    for k, v in machine.items():
        if k == "packages":
            v = ", ".join(f"{p} {ver}" for p, ver in v.items() if ver)
        lines.append(f"| {k} | {v} |")
    lines += ["", PROBE_NOTE, "", "## Summary", "", summary_table(sections), ""]
    for s in sections:
        lines += [f"## {s.name}: {s.title}", ""]
        lines.append(f"*ours*: {s.ours_label}; *stock*: {s.stock_label}. Took {s.seconds:.0f} s; "
                     f"load average before {_load(s.load_before)}, after {_load(s.load_after)}; "
                     f"speed probe before {_fmt(s.probe_before_ms, 'ms')}, after "
                     f"{_fmt(s.probe_after_ms, 'ms')} (see Machine).")
        lines.append("")
        if s.error:
            lines += ["**Not run:**", "", "```text", s.error, "```", ""]
        for n in s.notes:
            lines.append(f"* {n}")
        for m in s.measures:
            if m.note:
                lines.append(f"* {m.metric}: {m.note}")
        lines.append("")
        missed = s.missed()
        if missed:
            lines += ["**Targets missed:** " + "; ".join(
                f"{m.metric}: {m.verdict()} (ours {_fmt(m.ours, m.unit)}, target "
                f"{m.target.text(m.unit) if m.target else ''})" for m in missed), ""]
        for name, text in s.profiles.items():
            lines += [f"### Profile: {name}", "", "```text", text.rstrip(), "```", ""]
        if s.details:
            lines += ["<details><summary>raw results</summary>", "", "```json",
                      json.dumps(s.details, indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(lines)


def _load(v: tuple[float, float, float] | None) -> str:
    return "-" if v is None else " / ".join(f"{x:.2f}" for x in v)


def write(sections: list[Section], run: dict[str, Any], machine: dict[str, Any],
          stem: Path) -> tuple[Path, Path]:
    """Write `<stem>.md` and `<stem>.json`; return both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    md.write_text(render_markdown(sections, run, machine))
    js.write_text(json.dumps({"run": run, "machine": machine,
                              "sections": [s.as_dict() for s in sections]},
                             indent=1, default=str))
    return md, js


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def command_line() -> str:
    return "python -m bench " + " ".join(sys.argv[1:])
