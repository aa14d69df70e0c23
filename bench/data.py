"""The data a benchmark runs on: the demo data if it is there, else a set prepared here.

`make demo` leaves a complete system under `$FRAUD_DATA_DIR` (log, labels, feature tables,
registry, Redis materialised, model under artifacts/models).  When something is missing, or a
benchmark needs more rows than the demo has (training retrieval of 1M labelled transactions),
the benchmark prepares its own set under `.run/bench/data-<name>` with the project's own jobs
(simulate -> batch features -> velocity backfill -> feast apply [-> materialize -> train]),
with its own SQLite registry, model directory and Redis database (`BENCH_PREPARED_REDIS_DB`),
so it never touches the demo.  A prepared set is reused by later runs (`ready.json`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bench.config import get_settings
from bench.procs import BenchError, python, run_step
from feature_repo.config import PROJECT_DIR, data_dir

SIM_TXNS_PER_USER_DAY = 1.5  # training.simulate's default rate


@dataclass(frozen=True)
class Dataset:
    """Where one benchmark's data, registry, online store and model are."""

    name: str
    origin: str  # how it came to be, for the report
    root: Path  # FRAUD_DATA_DIR
    registry_url: str
    redis_url: str
    model_dir: Path
    transactions: int
    labelled: int

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a child process working on this data set."""
        env = dict(os.environ)
        env.update(
            FRAUD_DATA_DIR=str(self.root), FEAST_REGISTRY_URL=self.registry_url,
            REDIS_URL=self.redis_url, SERVING_MODEL_DIR=str(self.model_dir),
            TRAINING_MODEL_DIR=str(self.model_dir), PYTHONUNBUFFERED="1",
            PYTHONPATH=str(PROJECT_DIR),
        )
        env.update(extra)
        return env

    def describe(self) -> str:
        return (f"{self.origin}: {self.transactions:,} transactions, {self.labelled:,} labelled "
                f"({self.root})")


def _counts(root: Path) -> tuple[int, int]:
    tx = ds.dataset(root / "transactions", format="parquet", partitioning="hive").count_rows()
    labels = pq.ParquetFile(root / "labels.parquet").metadata.num_rows
    return tx, labels


def _with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


def demo_dataset(need_online: bool) -> Dataset | None:
    """The data `make demo` left under $FRAUD_DATA_DIR, or None if it is incomplete."""
    root = data_dir()
    registry = os.environ.get("FEAST_REGISTRY_URL", f"sqlite:///{root / 'registry.db'}")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    model_dir = PROJECT_DIR / "artifacts" / "models"
    if registry.startswith("sqlite:///") and not Path(registry[len("sqlite:///"):]).exists():
        return None
    if not (root / "labels.parquet").exists() or not any((root / "transactions").glob("*/*.parquet")):
        return None
    if not (root / "features" / "user_profile.parquet").exists():
        return None
    if need_online:
        if not any(model_dir.glob("*/metadata.json")) or not _redis_has_keys(redis_url):
            return None
    tx, labelled = _counts(root)
    return Dataset("demo", "demo data ($FRAUD_DATA_DIR, `make demo`)", root, registry,
                   redis_url, model_dir, tx, labelled)


def _redis_has_keys(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        return int(client.dbsize()) > 0  # type: ignore[arg-type]
    except redis.RedisError:
        return False


def prepared_dataset(name: str, users: int, days: int, *, online: bool) -> Dataset:
    """A data set prepared by the benchmark with the project's own jobs (reused if complete)."""
    s = get_settings()
    root = s.run_dir / f"data-{name}"
    marker = root / "ready.json"
    redis_url = _with_db(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                         s.prepared_redis_db)
    ds_ = Dataset(name, f"prepared by the benchmark ({users:,} users x {days} days, "
                  f"simulate/batch_features/backfill/apply{'/materialize/train' if online else ''})",
                  root, f"sqlite:///{root / 'registry.db'}", redis_url, root / "models", 0, 0)
    # layout 2: the velocity history is a Delta table, the model registry is MLflow's; a set
    # prepared before is prepared again
    wanted = {"users": users, "days": days, "online": online, "layout": 2}
    if marker.exists():
        meta = json.loads(marker.read_text())
        if {k: meta.get(k) for k in wanted} == wanted and (
            not online or _redis_has_keys(redis_url)
        ):
            tx, labelled = _counts(root)
            return _replace_counts(ds_, tx, labelled)
    _prepare(ds_, users, days, online)
    tx, labelled = _counts(root)
    marker.write_text(json.dumps({**wanted, "prepared_at": datetime.now(UTC).isoformat(),
                                  "transactions": tx, "labelled": labelled}))
    return _replace_counts(ds_, tx, labelled)


def _replace_counts(d: Dataset, tx: int, labelled: int) -> Dataset:
    return Dataset(d.name, d.origin, d.root, d.registry_url, d.redis_url, d.model_dir, tx,
                   labelled)


def _prepare(d: Dataset, users: int, days: int, online: bool) -> None:
    log = d.root / "prepare.log"
    shutil.rmtree(d.root, ignore_errors=True)  # nothing of an earlier set (or layout) stays
    d.root.mkdir(parents=True)
    env = d.env()
    feast = [str(Path(sys.executable).parent / "feast"), "-c", "feature_repo"]
    today = datetime.now(UTC).date().isoformat()
    steps: list[tuple[str, list[str]]] = [
        ("simulate", python("-m", "training.simulate", "--users", str(users), "--days",
                            str(days), "--end", today)),
        ("batch features", python("-m", "training.batch_features")),
        ("velocity backfill", python("-m", "streaming.backfill")),
        ("feast apply", [*feast, "apply"]),
    ]
    if online:
        import redis

        redis.Redis.from_url(d.redis_url).flushdb()  # our own database (BENCH_PREPARED_REDIS_DB)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        steps += [("feast materialize", [*feast, "materialize-incremental", now]),
                  ("train", python("-m", "training.train"))]
    for label, argv in steps:
        print(f"  preparing {d.name}: {label} ...", file=sys.stderr, flush=True)
        seconds = run_step(label, argv, env, log, timeout_s=3600)
        print(f"  preparing {d.name}: {label} done in {seconds:.0f}s", file=sys.stderr, flush=True)


def scoring_dataset() -> Dataset:
    """Demo data if complete (served from its Redis database), else a demo-sized prepared set."""
    return demo_dataset(need_online=True) or prepared_dataset("demo", 2000, 60, online=True)


def retrieval_dataset(min_labelled: int) -> Dataset:
    """A set with at least `min_labelled` labelled transactions (demo data if big enough)."""
    demo = demo_dataset(need_online=False)
    if demo is not None and demo.labelled >= min_labelled:
        return demo
    days = 60
    # a fifth of the simulated accounts open during the period (fewer active days): the log
    # holds ~1.38 transactions per user-day, not 1.5; 1.2 leaves room for that and the noise
    users = math.ceil(min_labelled * 1.2 / (SIM_TXNS_PER_USER_DAY * days) / 500) * 500
    d = prepared_dataset(f"{users}u{days}d", users, days, online=False)
    if d.labelled < min_labelled:
        raise BenchError(f"prepared {d.labelled:,} labelled transactions, need {min_labelled:,}")
    return d


def with_loadable_model(d: Dataset) -> tuple[Dataset, str | None]:
    """`d` with a model directory whose newest artifact loads with the current code.

    The demo's model may predate the current training code (a pickled pipeline refers to the
    functions it was trained with); then a model is trained on the same data into
    `.run/bench/models-<name>` (reused while it loads).  Returns the data set and a note saying
    so, or None.
    """
    import dataclasses

    log = get_settings().run_dir / "logs" / "model.log"
    if _model_loads(d, d.model_dir, log):
        return d, None
    own = get_settings().run_dir / f"models-{d.name}"
    if not _model_loads(d, own, log):
        import shutil

        shutil.rmtree(own, ignore_errors=True)
        run_step("train", python("-m", "training.train"),
                 d.env(TRAINING_MODEL_DIR=str(own)), log, timeout_s=3600)
    note = (f"The model under {d.model_dir} does not load with the current code (see {log}); "
            f"the benchmark trained one on the same data into {own}.")
    return dataclasses.replace(d, model_dir=own), note


def newest_model(model_dir: Path) -> Path | None:
    metas = sorted(model_dir.glob("*/metadata.json"))
    return metas[-1].parent if metas else None


def _model_loads(d: Dataset, model_dir: Path, log: Path) -> bool:
    path = newest_model(model_dir)
    if path is None:
        return False
    code = ("import sys, pathlib; from scoring.artifact import load_artifact; "
            "load_artifact(pathlib.Path(sys.argv[1]))")
    try:
        run_step("load model", python("-c", code, str(path)), d.env(), log, timeout_s=300)
    except BenchError:
        return False
    return True
