"""The velocity step's recovery layout: which step id the live worker's state lives under.

Guarantee: `state_step_id` never hands the flow the snapshots of a layout it left, so a
worker never continues from state older than the online rows written since (it re-seeds from
the online store instead, as after a crash).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

from bytewax.recovery import init_db_dir

LAYOUT_FILE = "velocity_layout.json"


def state_step_id(recovery_dir: Path, shards: int) -> str:
    """The velocity step's id for the state layout `shards`, never one of a stale state.

    Bytewax keeps the snapshots of every step id it has seen in the recovery directory.  A
    layout used, left, and used again would find the snapshots it left behind, older than the
    online rows written since, and continue from them.  So each change of layout starts a new
    generation (`LAYOUT_FILE` in the recovery directory) with step ids of its own; generation
    0 keeps the plain ids ("velocity" is what a recovery directory of the per-user layout from
    before shards holds, and it continues from it).  The marker is replaced atomically.
    """
    layout = f"{shards}shards" if shards else "per-user"
    marker = recovery_dir / LAYOUT_FILE
    generation = 0
    if marker.exists():
        last = json.loads(marker.read_text())
        generation = int(last["generation"]) + (last["layout"] != layout)
    tmp = marker.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the directory
    tmp.write_text(json.dumps({"layout": layout, "generation": generation}))
    tmp.replace(marker)
    return plain_step_id(shards) if generation == 0 else f"velocity_{layout}_g{generation}"


def plain_step_id(shards: int) -> str:
    """The velocity step's id in generation 0 of layout `shards` (see `state_step_id`)."""
    return f"velocity_{shards}shards" if shards else "velocity"


def ensure_recovery_dir(recovery_dir: Path, partitions: int, process_id: int = 0,
                        processes: int = 1) -> None:
    """Create Bytewax's recovery partitions in `recovery_dir` that process `process_id` of
    `processes` owns and that are missing; existing partitions are resumed from, never reset.

    A process owns `part-j` for j = process_id mod processes, of `partitions` partitions (or
    of as many as the partitions already in the directory were created for: their count is
    fixed).  Processes on separate hosts, each with a local directory, then hold the whole
    set between them, as Bytewax requires on resume; processes sharing one directory create
    one share each (or the supervisor of `--processes N` creates them all first), and Bytewax
    gives each partition to one worker.  Each file is created aside and moved in whole.
    """
    recovery_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(recovery_dir.glob("part-*.sqlite3"))
    count = _part_count(existing[0]) if existing else partitions
    missing = [j for j in range(count) if j % processes == process_id
               and not (recovery_dir / f"part-{j}.sqlite3").exists()]
    if not missing:
        return
    with tempfile.TemporaryDirectory(dir=recovery_dir, prefix=".init-") as tmp:
        init_db_dir(Path(tmp), count)
        for j in missing:
            name = f"part-{j}.sqlite3"
            os.replace(Path(tmp) / name, recovery_dir / name)


def _part_count(part: Path) -> int:
    """How many partitions the set `part` belongs to was created with."""
    with closing(sqlite3.connect(f"file:{part}?mode=ro", uri=True)) as db:
        (count,) = db.execute("SELECT part_count FROM parts").fetchone()
    return int(count)


def recovery_partitions(configured: int, workers: int) -> int:
    """Partitions for a new recovery directory: at least one per worker, so each worker
    writes its own snapshots (the count is fixed once created; Bytewax can rescale the
    workers later, but not the partitions)."""
    return max(configured, workers)
