"""Which parquet files of a directory source are live: the compaction's manifests.

`training.compact_history` merges small files into one and writes, next to it, a manifest
(`.compaction-*.json`: {"output": name, "sources": [names], ...}, names in the manifest's
directory).  Once the merged file is in place its sources are replaced: they stay on disk for a
grace period, for readers that listed them before the merge, and are then deleted.  The
project's readers of a directory source (the offline store, the materialization engine) list
it through `live_files`, so they never list a replaced file.
"""

from __future__ import annotations

import json
from pathlib import Path

COMPACTION_MANIFESTS = ".compaction-*.json"


def live_files(directory: Path) -> list[Path]:
    """The parquet files under `directory`, without those a compaction has replaced by a
    merged file that is in place: those are deleted once the compaction's grace period is
    over, so only readers that listed them before the merge may read them."""
    files = sorted(directory.glob("**/*.parquet"))
    listed = set(files)
    replaced: set[Path] = set()
    for manifest in directory.glob(f"**/{COMPACTION_MANIFESTS}"):
        try:
            m = json.loads(manifest.read_text())
            if manifest.parent / m["output"] in listed:
                replaced.update(manifest.parent / name for name in m["sources"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone meanwhile, or unreadable: read everything (duplicates are harmless)
    return [f for f in files if f not in replaced]
