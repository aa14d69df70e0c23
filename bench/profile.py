"""Profiles that explain a missed target: py-spy samples of a running process, or cProfile.

`record(pid, seconds)` samples a live process (and its children) with py-spy, without pausing
it (`--nonblocking`), and summarises the samples as the functions where time is spent: *self*
(the function was running) and *total* (the function was on the stack).  py-spy comes with
the `dev` extra (`make setup`); without it the caller falls back to cProfile or reports no
profile.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_SITE = re.compile(r".*/site-packages/")


def py_spy() -> str | None:
    """Path of the py-spy executable (the venv's first), or None."""
    venv = Path(sys.executable).parent / "py-spy"
    return str(venv) if venv.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = 100) -> str:
    """Sample `pid` and its subprocesses for `seconds`; return a text summary (or why not)."""
    exe = py_spy()
    if exe is None:
        return "py-spy is not installed (`make setup` installs it): no profile"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(rate), "--format", "raw", "--nonblocking", "--subprocesses",
            "--output", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode or not out.exists():
        return f"py-spy failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return summarise_collapsed(out.read_text(), source=f"py-spy, {rate} Hz, {seconds:.0f} s")


def _frame(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (to/file.py)' without the line number."""
    frame = _SITE.sub("", frame)
    return re.sub(r":\d+\)$", ")", frame)


def summarise_collapsed(text: str, top: int = 20, source: str = "") -> str:
    """Self and total shares per function from collapsed stacks ('a;b;c count' lines)."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        count = int(m.group(2))
        frames = [_frame(f) for f in m.group(1).split(";") if f]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:  # only the process frame: running native code (Rust, C) or idle
            frames = ["<native code, no Python frame>"]
        samples += count
        self_c[frames[-1]] += count
        for f in set(frames):
            total_c[f] += count
    if not samples:
        return "no samples (the process was idle or exited)"
    out = [f"{samples} samples{f' ({source})' if source else ''}",
           "", f"top {top} by self time (where the CPU was):"]
    out += [f"  {n / samples:6.1%}  {f}" for f, n in self_c.most_common(top)]
    out += ["", f"top {top} by total time (on the stack):"]
    out += [f"  {n / samples:6.1%}  {f}" for f, n in total_c.most_common(top)]
    out += ["", "(Self time of a Python function that calls into native code, e.g. bytewax's "
            "engine under its run call, is the native code's time.)"]
    return "\n".join(out)


def cprofile_summary(profiler: cProfile.Profile, top: int = 25) -> str:
    """The `top` functions by cumulative time, then by own time."""
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    stats.strip_dirs().sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return re.sub(r"\n{3,}", "\n\n", buf.getvalue())
