"""feature_repo.progress: a bar on a terminal, silence elsewhere, one INFO line at the end."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import select
import struct
import termios
from typing import Any

import pytest

from feature_repo.progress import progress


def run_job(file: Any, n: int = 250) -> int:
    with progress("test job", total=n, unit="row", file=file) as p:
        for _ in range(n):
            p.update()
        p.step("done")
    return p.count


def test_the_summary_carries_a_note(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="progress"):
        with progress("train", total=2, unit="step", file=io.StringIO()) as p:
            p.update(2)
            p.note = "(1,234 rows)"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "progress"]
    assert line.startswith("train: 2 step in ") and line.endswith(" s (1,234 rows)")


def test_silent_when_not_a_tty(caplog: pytest.LogCaptureFixture) -> None:
    buf = io.StringIO()  # isatty() is False, like a pipe or a CI log
    with caplog.at_level(logging.INFO, logger="progress"):
        assert run_job(buf) == 250
    assert buf.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "progress"]
    assert len(lines) == 1
    assert lines[0].startswith("test job: 250 row in ") and lines[0].endswith(" s")


def test_silent_on_a_pipe() -> None:
    r, w = os.pipe()
    with os.fdopen(w, "w") as out:
        assert not out.isatty()
        run_job(out)
    with os.fdopen(r) as inp:
        assert inp.read() == ""


def test_a_bar_on_a_terminal() -> None:
    """The same job on a pseudo-terminal draws its bar (the silence above is not a no-op)."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    tty = os.fdopen(follower, "w")
    try:
        assert tty.isatty()
        run_job(tty)
        tty.flush()
        chunks = []  # read before the follower closes
        while select.select([leader], [], [], 0.2)[0]:
            chunks.append(os.read(leader, 65536))
        written = b"".join(chunks).decode(errors="replace")
    finally:
        tty.close()
        os.close(leader)
    assert "test job" in written and "250/250" in written


def test_no_summary_when_the_job_fails(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="progress"), pytest.raises(RuntimeError):
        with progress("failing job", total=3, file=io.StringIO()) as p:
            p.update()
            raise RuntimeError("boom")
    assert not [r for r in caplog.records if r.name == "progress"]
