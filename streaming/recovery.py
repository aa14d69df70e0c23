"""The velocity step's recovery layout: which step id the live worker's state lives under.

Guarantee: `state_step_id` never hands the flow the snapshots of a layout it left, so a
worker never continues from state older than the online rows written since (it re-seeds from
the online store instead, as after a crash).
"""

from __future__ import annotations

import json
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
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"layout": layout, "generation": generation}))
    tmp.replace(marker)
    return plain_step_id(shards) if generation == 0 else f"velocity_{layout}_g{generation}"


def plain_step_id(shards: int) -> str:
    """The velocity step's id in generation 0 of layout `shards` (see `state_step_id`)."""
    return f"velocity_{shards}shards" if shards else "velocity"


def ensure_recovery_dir(recovery_dir: Path, partitions: int) -> None:
    """Create Bytewax's recovery partitions in `recovery_dir` unless it already holds some
    (an existing directory is resumed from, never reset)."""
    if not any(recovery_dir.glob("part-*.sqlite3")):
        recovery_dir.mkdir(parents=True, exist_ok=True)
        init_db_dir(recovery_dir, partitions)
