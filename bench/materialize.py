"""Benchmark: `materialize` of N entities x 11 features into Redis, stock engine vs ours.

    python -m bench.materialize --entities 1000000 [--stock-entities 200000]

Generates a parquet feature table (a few rows per entity, ties on the event timestamp broken by
the created timestamp, nulls, NaNs, lists) in a temporary directory, then materializes it in two
fresh subprocesses, each with its own temporary SQLite registry, into the same flushed Redis
database (`--redis-db`, default 13): first with Feast's stock local engine
(`batch_engine: local`), then with this repo's `FastRedisMaterializationEngine`.  Each worker
reports the wall time of `FeatureStore.materialize` and its own peak RSS up to the end of it
(VmHWM: the whole process, Python, Arrow and DuckDB, Feast's start-up included).  Every entity
has a row in the window, so each run must leave exactly one key per entity.  A random sample of entities is read back after each run,
both raw (every field of the Redis hash) and through stock `get_online_features`, and compared.

rows/s = keys written to Redis / seconds in `materialize`.  `--stock-entities` runs the stock
engine on the first M entities only (same rows), when the full size would take too long; the
comparison then uses entities of that subset.  `run(entities)` returns the results as a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PROJECT = Path(__file__).resolve().parents[1]
ENGINES = {"stock": "local", "fast": "feature_repo.materialization.FastRedisMaterializationEngine"}
START = datetime(2000, 1, 1, tzinfo=UTC)
END = datetime(2030, 1, 1, tzinfo=UTC)
BASE_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
INT_FEATURES = ["count_0", "count_1", "count_2"]
FLOAT_FEATURES = ["amount_0", "amount_1", "amount_2", "amount_3"]
STRING_FEATURES = ["label_0", "label_1"]
LIST_FEATURES = {"recent_ints": "int", "recent_amounts": "float"}
FEATURES = INT_FEATURES + FLOAT_FEATURES + STRING_FEATURES + list(LIST_FEATURES)


def entity_id(i: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise("user_", pc.utf8_lpad(pc.cast(pa.array(i), pa.string()),
                                                             8, "0"), "")


def generate(path: Path, entities: int, rows_per_entity: int = 3, seed: int = 7) -> int:
    """Write the feature table (rows shuffled); returns its row count."""
    rng = np.random.default_rng(seed)
    n = entities * rows_per_entity
    ent = np.repeat(np.arange(entities, dtype=np.int64), rows_per_entity)
    j = np.tile(np.arange(rows_per_entity, dtype=np.int64), entities)
    ts = BASE_US + rng.integers(0, 30 * 86_400, n) * 1_000_000 + rng.integers(0, 1_000_000, n)
    tie = np.repeat(rng.random(entities) < 0.1, rows_per_entity) & (j == rows_per_entity - 1)
    ts[tie] = ts[np.flatnonzero(tie) - 1]  # 10% of entities: two rows at the same event time
    created = ts + rng.integers(0, 10**6, n) * rows_per_entity + j  # distinct within an entity

    def nulls(p: float) -> np.ndarray:
        return rng.random(n) < p

    cols: dict[str, pa.Array] = {
        "entity_id": entity_id(ent),
        "event_timestamp": pa.array(ts, pa.timestamp("us", "UTC")),
        "created_timestamp": pa.array(created, pa.timestamp("us", "UTC")),
    }
    for name in INT_FEATURES:
        cols[name] = pa.array(rng.integers(-10**6, 10**12, n), mask=nulls(0.02))
    for name in FLOAT_FEATURES:
        v = rng.normal(0, 100, n)
        v[nulls(0.01)] = np.nan
        cols[name] = pa.array(v, mask=nulls(0.01))
    for name in STRING_FEATURES:
        labels = pc.binary_join_element_wise(
            "m_é_", pc.cast(pa.array(rng.integers(0, 5000, n)), pa.string()), "")
        cols[name] = pc.if_else(pa.array(nulls(0.02)), pa.scalar(None, pa.string()), labels)
    lengths = rng.integers(0, 6, n)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    null_lists = pa.array(nulls(0.01))
    cols["recent_ints"] = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(rng.integers(-10**9, 10**9, offsets[-1])), mask=null_lists)
    cols["recent_amounts"] = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(rng.normal(0, 50, offsets[-1])), mask=null_lists)
    table = pa.table(cols).take(pa.array(rng.permutation(n)))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=200_000)
    del table, cols
    pa.default_memory_pool().release_unused()
    return n


def subset(src: Path, dst: Path, entities: int) -> None:
    """The rows of the first `entities` entities of `src`."""
    table = pq.read_table(src)
    keep = pc.less(table["entity_id"], entity_id(np.array([entities]))[0])
    pq.write_table(table.filter(keep), dst, row_group_size=200_000)


# --- worker: one materialization in its own process ------------------------------------------

def _store(workdir: Path, engine: str, source: Path, redis_db: int) -> Any:
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig, ValueType
    from feast.data_format import ParquetFormat
    from feast.types import Array, Float64, Int64, String

    from feature_repo.config import DEFAULT_REDIS_URL, redis_connection_string

    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL).rsplit("/", 1)[0] + f"/{redis_db}"
    workdir.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(
        project="bench",
        provider="local",
        registry={"registry_type": "sql", "path": f"sqlite:///{workdir / 'registry.db'}"},
        online_store={"type": "feature_repo.online_store.FraudRedisOnlineStore",
                      "connection_string": redis_connection_string(url)},
        offline_store={"type": "feature_repo.offline_store.AsofDuckDBOfflineStore"},
        batch_engine={"type": ENGINES[engine]},
        entity_key_serialization_version=3,
        repo_path=str(workdir),
    )
    store = FeatureStore(config=config)
    entity = Entity(name="entity", join_keys=["entity_id"], value_type=ValueType.STRING)
    dtypes: dict[str, Any] = {
        **dict.fromkeys(INT_FEATURES, Int64), **dict.fromkeys(FLOAT_FEATURES, Float64),
        **dict.fromkeys(STRING_FEATURES, String),
        "recent_ints": Array(Int64), "recent_amounts": Array(Float64),
    }
    view = FeatureView(
        name="bench_fv", entities=[entity], ttl=timedelta(days=3650), online=True,
        schema=[Field(name=f, dtype=dtypes[f]) for f in FEATURES],
        source=FileSource(name="bench_source", path=str(source), file_format=ParquetFormat(),
                          timestamp_field="event_timestamp",
                          created_timestamp_column="created_timestamp"),
    )
    store.apply([entity, view])
    return store, view


def read_back(store: Any, view: Any, ids: list[str]) -> dict[str, Any]:
    """Raw Redis hashes and stock `get_online_features` output for `ids`."""
    import redis
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    conn = store.config.online_store.connection_string.split(",")
    host, port = conn[0].split(":")
    db = int(next(c for c in conn if c.startswith("db=")).split("=")[1])
    client = redis.Redis(host=host, port=int(port), db=db)
    pipe = client.pipeline(transaction=False)
    for i in ids:
        key = EntityKey(join_keys=["entity_id"], entity_values=[Value(string_val=i)])
        redis_key: Any = serialize_entity_key(key, entity_key_serialization_version=3) + b"bench"
        pipe.hgetall(redis_key)
    raw = pipe.execute()
    online = store.get_online_features(
        features=[f"{view.name}:{f}" for f in FEATURES],
        entity_rows=[{"entity_id": i} for i in ids],
    ).to_dict(include_event_timestamps=True)
    return {"raw": raw, "online": online, "dbsize": client.dbsize()}


def worker(args: argparse.Namespace) -> None:
    store, view = _store(Path(args.workdir), args.engine, Path(args.source), args.redis_db)
    t0 = time.perf_counter()
    store.materialize(start_date=START, end_date=END)
    seconds = time.perf_counter() - t0
    peak_mb = peak_rss_mb()  # before the read-back
    ids = json.loads(Path(args.sample).read_text())
    result = {"seconds": seconds, "peak_rss_mb": peak_mb, **read_back(store, view, ids)}
    Path(args.out).write_bytes(pickle.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB.

    VmHWM, the high-water mark of the current address space: `ru_maxrss` would also count the
    parent's RSS inherited across fork + exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- driver ---------------------------------------------------------------------------------

def _flush(redis_db: int) -> None:
    import redis

    from feature_repo.config import DEFAULT_REDIS_URL

    base = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL).rsplit("/", 1)[0]
    redis.Redis.from_url(f"{base}/{redis_db}").flushdb()


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _run_worker(engine: str, workdir: Path, source: Path, redis_db: int, sample: Path,
                keys: int) -> dict[str, Any]:
    _flush(redis_db)
    out = workdir / f"{engine}.pickle"
    print(f"[{engine}] materializing {source.name} (load average {_load()}) ...", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.materialize", "--worker", "--engine", engine,
         "--workdir", str(workdir / engine), "--source", str(source),
         "--redis-db", str(redis_db), "--sample", str(sample), "--out", str(out)],
        cwd=PROJECT, capture_output=True, text=True, check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = pickle.loads(out.read_bytes())
    if result["dbsize"] != keys:
        raise RuntimeError(f"{engine}: Redis db {redis_db} holds {result['dbsize']:,} keys after "
                           f"materializing, expected {keys:,}: is another process using it?")
    print(f"[{engine}] {result['dbsize']:,} keys in {result['seconds']:.1f}s, "
          f"peak RSS {result['peak_rss_mb']:,.0f} MB (load average {_load()})", flush=True)
    return result


def run(entities: int, stock_entities: int | None = None, rows_per_entity: int = 3,
        redis_db: int = 13, sample_size: int = 20_000, seed: int = 7) -> dict[str, Any]:
    """Generate, materialize with both engines, compare a sample; returns the results."""
    stock_entities = min(stock_entities or entities, entities)
    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-bench-materialize-"))
    try:
        full = workdir / "data" / "features.parquet"
        t0 = time.perf_counter()
        rows = generate(full, entities, rows_per_entity, seed)
        print(f"generated {rows:,} rows for {entities:,} entities x {len(FEATURES)} features "
              f"in {time.perf_counter() - t0:.0f}s ({full.stat().st_size / 2**20:,.0f} MB parquet)",
              flush=True)
        stock_source = full
        if stock_entities < entities:
            stock_source = workdir / "data" / "features_stock.parquet"
            subset(full, stock_source, stock_entities)
            print(f"stock engine runs on the first {stock_entities:,} entities only", flush=True)
        rng = np.random.default_rng(seed)
        picked = rng.choice(stock_entities, min(sample_size, stock_entities), replace=False)
        ids = entity_id(np.sort(picked)).to_pylist() + ["user_missing"]
        sample = workdir / "sample.json"
        sample.write_text(json.dumps(ids))

        stock = _run_worker("stock", workdir, stock_source, redis_db, sample, stock_entities)
        fast = _run_worker("fast", workdir, full, redis_db, sample, entities)
        _flush(redis_db)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    identical_raw = stock["raw"] == fast["raw"]
    identical_online = _same(stock["online"], fast["online"])
    stock_rps = stock["dbsize"] / stock["seconds"]
    fast_rps = fast["dbsize"] / fast["seconds"]
    results = {
        "entities": entities,
        "stock_entities": stock_entities,
        "rows": rows,
        "features": len(FEATURES),
        "stock": {"keys": stock["dbsize"], "seconds": round(stock["seconds"], 2),
                  "rows_per_s": round(stock_rps), "peak_rss_mb": round(stock["peak_rss_mb"])},
        "fast": {"keys": fast["dbsize"], "seconds": round(fast["seconds"], 2),
                 "rows_per_s": round(fast_rps), "peak_rss_mb": round(fast["peak_rss_mb"])},
        "speedup": round(fast_rps / stock_rps, 1),
        "rss_ratio": round(stock["peak_rss_mb"] / fast["peak_rss_mb"], 1),
        "sample": len(ids),
        "identical_raw_hashes": identical_raw,
        "identical_online_features": identical_online,
        "load_average": _load(),
    }
    _report(results)
    return results


def _same(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> bool:
    """Equal dicts of columns, NaN equal to NaN (pickled floats)."""
    if a.keys() != b.keys():
        return False
    return all(pickle.dumps(a[k]) == pickle.dumps(b[k]) for k in a)


def _report(r: dict[str, Any]) -> None:
    note = "" if r["stock_entities"] == r["entities"] else \
        f"  (stock measured on {r['stock_entities']:,} entities)"
    print(f"\nmaterialize {r['entities']:,} entities x {r['features']} features "
          f"({r['rows']:,} source rows){note}")
    print(f"{'engine':<8}{'keys':>12}{'seconds':>10}{'rows/s':>12}{'peak RSS MB':>14}")
    for name in ("stock", "fast"):
        e = r[name]
        print(f"{name:<8}{e['keys']:>12,}{e['seconds']:>10.1f}{e['rows_per_s']:>12,}"
              f"{e['peak_rss_mb']:>14,}")
    print(f"speed-up x{r['speedup']}, peak RSS / {r['rss_ratio']}; sample of {r['sample']:,} "
          f"entities: raw hashes identical={r['identical_raw_hashes']}, "
          f"get_online_features identical={r['identical_online_features']}; "
          f"load average {r['load_average']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--stock-entities", type=int, default=None,
                        help="run the stock engine on the first M entities only")
    parser.add_argument("--rows-per-entity", type=int, default=3)
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--sample", default="20000")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=list(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    run(args.entities, args.stock_entities, args.rows_per_entity, args.redis_db,
        int(args.sample))


if __name__ == "__main__":
    main()
