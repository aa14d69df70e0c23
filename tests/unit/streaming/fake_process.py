"""A stand-in for one dataflow process, run by `test_cluster` under `LocalCluster`.

`python -m tests.unit.streaming.fake_process --process-id K --addresses A` records its start
in `$FAKE_DIR` (process id, pid, metrics port, addresses).  On the first run process 1 exits
with status 3 while process 0 hangs (a peer that does not notice); on later runs both exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--addresses", required=True)
    a = p.parse_args()
    root = Path(os.environ["FAKE_DIR"])
    run = len(list(root.glob(f"start-{a.process_id}-*")))
    (root / f"start-{a.process_id}-{run}").write_text(json.dumps({
        "pid": os.getpid(), "port": os.environ["STREAMING_METRICS_PORT"],
        "addresses": a.addresses}))
    if run == 0:
        if a.process_id == 1:
            time.sleep(0.3)
            raise SystemExit(3)
        time.sleep(60)  # killed by the supervisor
    time.sleep(0.2)


if __name__ == "__main__":
    main()
