"""`streaming.cluster`: the local supervisor restarts the whole cluster when one process dies,
and the command line of `python -m streaming.features` refuses inconsistent cluster options."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from streaming.cluster import LocalCluster, parse_addresses, parse_args


def test_one_process_dying_restarts_every_process_then_a_clean_end_exits_0(
        tmp_path: Path) -> None:
    cluster = LocalCluster(2, module="tests.unit.streaming.fake_process",
                           env={**os.environ, "FAKE_DIR": str(tmp_path)}, metrics_port=9500,
                           backoff_s=0.1, peer_exit_s=0.5, stop_grace_s=2.0)
    t0 = time.monotonic()
    assert cluster.run() == 0
    assert time.monotonic() - t0 < 30  # the hung peer was killed, not waited for
    starts = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("start-*")}
    assert sorted(starts) == ["start-0-0", "start-0-1", "start-1-0", "start-1-1"]
    for run in (0, 1):  # each run: one address list, process k on metrics port 9500 + k
        a, b = starts[f"start-0-{run}"], starts[f"start-1-{run}"]
        assert a["addresses"] == b["addresses"] and len(parse_addresses(a["addresses"])) == 2
        assert (a["port"], b["port"]) == ("9500", "9501")


def test_a_cluster_failing_at_once_every_time_gives_up(tmp_path: Path) -> None:
    cluster = LocalCluster(1, module="tests.unit.streaming.no_such_module", backoff_s=0.01,
                           max_backoff_s=0.01, restart_limit=2)
    assert cluster.run() == 1


@pytest.mark.parametrize("text", ["", "host", "host:", ":90", "h:0", "h:70000", "a:1;b"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="addresses"):
        parse_addresses(text)


def test_addresses_parse() -> None:
    assert parse_addresses(" a:1; b.example:2 ;") == ["a:1", "b.example:2"]


@pytest.mark.parametrize("argv", [
    ["-i", "0"], ["-a", "a:1;b:2"], ["-i", "2", "-a", "a:1;b:2"], ["-i", "-1", "-a", "a:1"],
    ["-p", "2", "-i", "0", "-a", "a:1;b:2"], ["-p", "0"], ["-a", "a:1;b", "-i", "0"],
])
def test_inconsistent_cluster_options_exit_with_a_message(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, 1)
    assert exc.value.code == 2
    assert "python -m streaming.features: error:" in capsys.readouterr().err


def test_cluster_options() -> None:
    assert parse_args([], 3).processes == 3
    assert parse_args(["-p", "2"], 1).processes == 2
    a = parse_args(["-i", "1", "-a", "h0:2101;h1:2101"], 1)
    assert (a.process_id, a.addresses, a.processes) == (1, ["h0:2101", "h1:2101"], None)
