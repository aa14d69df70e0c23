"""The offline history tables: Delta Lake tables (`deltalake`), one directory each.

A history table (today `user_velocity_fv`'s, `paths.velocity_history_dir`) is a Delta Lake table
partitioned by `origin`, who wrote the rows (`stream` for the live dataflow, `backfill` for the
velocity backfill).  Its transaction log (`_delta_log/`) says which parquet files hold its rows;
the directory also holds files that are no longer part of the table (replaced by a compaction
or a backfill, kept until `vacuum` deletes them after `DELETED_FILE_RETENTION`) and files of
writes that never committed.  So nothing reads the directory by listing it:

* the project's readers (the offline store's ASOF join, the materialization engine, a
  distributed engine) read `live_files(directory)`, the files of the table's latest version;
* any stock reader reads the same rows: `deltalake.DeltaTable(directory).to_pyarrow_table()`,
  or DuckDB over `DeltaTable(directory).to_pyarrow_dataset()` (no DuckDB extension needed).

Writes are Delta commits, atomic and safe from several processes at once (each commit is a new
log entry created only if absent; appends never conflict and are retried on a version race):
`append` adds rows in one commit, `replace` swaps all rows of one origin for new ones in one
commit; a `StagedFile` is written first (row groups as they come, not yet in the table) and
added later by `commit_staged` in one commit, so a writer can do the writing off its critical
path and keep only the commit on it.  Compaction and vacuum are the format's own (`training.compact_history`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import AddAction

log = logging.getLogger(__name__)

ORIGIN = "origin"
STREAM = "stream"
BACKFILL = "backfill"
REPLACE_ATTEMPTS = 3
DELETED_FILE_RETENTION = "interval 1 hours"
"""How long a file a commit removed (compaction, backfill) stays on disk for readers that
listed it before: `vacuum` deletes it only after this (the table's
`delta.deletedFileRetentionDuration`)."""
TABLE_CONFIGURATION: dict[str, str | None] = {
    "delta.deletedFileRetentionDuration": DELETED_FILE_RETENTION,
    # a stream commits every few seconds: keep two days of log entries, not Delta's 30
    "delta.logRetentionDuration": "interval 2 days",
}


def is_table(directory: Path) -> bool:
    """Whether `directory` holds a Delta table."""
    return DeltaTable.is_deltatable(str(directory))


def live_files(directory: Path) -> list[Path]:
    """The parquet files holding the rows of the source at `directory`: for a Delta table, the
    files of its latest version (from its log, never the directory listing); for a plain
    directory of parquet files, all of them."""
    if is_table(directory):  # URIs, percent-encoded
        return [Path(unquote(uri.removeprefix("file://")))
                for uri in DeltaTable(str(directory)).file_uris()]
    return sorted(directory.glob("**/*.parquet"))


def read(directory: Path, columns: list[str] | None = None) -> pa.Table:
    """The table's rows as a stock reader sees them (with the `origin` column); empty if no
    table was written yet."""
    if not is_table(directory):
        _refuse_plain_files(directory)
        return pa.table({})
    return DeltaTable(str(directory)).to_pyarrow_table(columns=columns)


def _with_origin(table: pa.Table, origin: str) -> pa.Table:
    return table.append_column(ORIGIN, pa.array([origin] * table.num_rows, pa.string()))


def _create(directory: Path, schema: pa.Schema) -> None:
    """Create the table (partitioned by origin) unless it exists; several processes may race."""
    if is_table(directory):
        return
    _refuse_plain_files(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        DeltaTable.create(str(directory), schema, mode="ignore", partition_by=[ORIGIN],
                          configuration=TABLE_CONFIGURATION)
    except DeltaError:
        if not is_table(directory):  # not a lost race with another creator
            raise


def _refuse_plain_files(directory: Path) -> None:
    """A history directory of plain parquet files (written before the history became a Delta
    table) is not silently shadowed by a new table: its rows would vanish from every read."""
    if directory.is_dir() and next(directory.glob("*.parquet"), None) is not None:
        raise RuntimeError(
            f"{directory} holds parquet files but no Delta table: a history written before "
            "the history became a Delta table (feature_repo.history). Move the directory "
            "away and rebuild it with `make backfill` (python -m streaming.backfill).")


def append(directory: Path, table: pa.Table, origin: str) -> None:
    """Add `table`'s rows to the history at `directory` as rows of `origin`, in one commit
    (the table is created at the first append).  Raises if the schema differs from the
    table's; nothing is added then."""
    if not table.num_rows:
        return
    data = _with_origin(table, _checked(origin))
    _create(directory, data.schema)
    write_deltalake(str(directory), data, mode="append")


class StagedFile:
    """A parquet file of rows of one origin in the table's directory, written row group by row
    group (`write`) and not part of the table until `commit_staged` adds it.  Laid out as
    Delta's own writer lays out a file (`origin=<origin>/part-<uuid>-c000.snappy.parquet`,
    without the partition column).  A file never committed (a crash) is not in the table and
    is deleted by `vacuum`, as a failed `append` leaves one."""

    def __init__(self, directory: Path, schema: pa.Schema, origin: str) -> None:
        self.origin = _checked(origin)
        _create(directory, pa.schema([*schema, pa.field(ORIGIN, pa.string())]))
        table = pa.schema(DeltaTable(str(directory)).schema().to_arrow())
        expected = table.remove(table.get_field_index(ORIGIN))
        if not expected.equals(schema):  # `append` refuses such rows too; nothing is written
            raise ValueError(f"history {directory}: rows of schema {schema} do not match the "
                             f"table's schema {expected}")
        self.relative = f"{ORIGIN}={origin}/part-00000-{uuid.uuid4()}-c000.snappy.parquet"
        self.path = directory / self.relative
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self._writer = pq.ParquetWriter(self.path, schema, compression="snappy",
                                        use_dictionary=_string_columns(schema))

    def write(self, table: pa.Table) -> None:
        """Rows in the file's schema (without `origin`), as one or more row groups."""
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> AddAction:
        """Finish the file; the action that adds it to the table.  Raises if the file is gone
        (a vacuum deletes files outside the table once they are older than its retention: a
        writer stalled for that long), so a commit never adds a missing file."""
        self._writer.close()
        st = self.path.stat()
        return AddAction(self.relative, st.st_size, {ORIGIN: self.origin},
                         int(st.st_mtime * 1000), True, json.dumps({"numRecords": self.rows}))


    def discard(self) -> None:
        """Close and delete the file without adding it (after a failed write)."""
        with contextlib.suppress(Exception):
            self._writer.close()
        self.path.unlink(missing_ok=True)


def _string_columns(schema: pa.Schema) -> list[str]:
    """The Parquet column paths of `schema`'s strings and lists of strings: dictionary-encoded
    in a `StagedFile`, the other columns plain.  Times and amounts are nearly all distinct, so
    a dictionary for them is built and then abandoned (the writer falls back to plain): about
    a third of the history thread's CPU per row for a larger file (docs/benchmarks.md,
    issue 20).  Which encoding a column has changes no value read back."""
    paths = []
    for f in schema:
        if pa.types.is_string(f.type):
            paths.append(f.name)
        elif pa.types.is_list(f.type) and pa.types.is_string(f.type.value_type):
            paths.append(f"{f.name}.list.element")
    return paths


def commit_staged(directory: Path, actions: list[AddAction]) -> None:
    """Add closed `StagedFile`s to the table at `directory` in one commit (a blind append,
    like `append`'s: it commits beside other appends and compactions)."""
    if not actions:
        return
    table = DeltaTable(str(directory))
    table.create_write_transaction(actions, mode="append", schema=table.schema(),
                                   partition_by=[ORIGIN])


def replace(directory: Path, source: Path, origin: str) -> int:
    """Make the rows of the history table at `source` the only rows of `origin` in the table at
    `directory`, in one commit (an overwrite whose predicate is the origin; no source table:
    a delete of the origin's rows); rows of other origins are kept, and appends to them may
    go on meanwhile.  Streams `source` batch by batch; if a compaction of the origin's files
    commits first, writes again (`REPLACE_ATTEMPTS` in all).  Returns the number of rows."""
    predicate = f"{ORIGIN} = '{_checked(origin)}'"
    if not is_table(source):
        if is_table(directory):
            DeltaTable(str(directory)).delete(predicate)
        return 0
    data = DeltaTable(str(source)).to_pyarrow_dataset()
    columns = [f for f in data.schema if f.name != ORIGIN]
    schema = pa.schema([*columns, pa.field(ORIGIN, pa.string())])
    _create(directory, schema)

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in data.to_batches(columns=[f.name for f in columns]):
            yield pa.RecordBatch.from_arrays(
                [*batch.columns, pa.array([origin] * batch.num_rows, pa.string())],
                schema=schema)

    for attempt in range(1, REPLACE_ATTEMPTS + 1):
        try:
            write_deltalake(str(directory), pa.RecordBatchReader.from_batches(schema, batches()),
                            mode="overwrite", predicate=predicate)
            break
        except CommitFailedError:  # a compaction rewrote this origin's files meanwhile
            if attempt == REPLACE_ATTEMPTS:
                raise
            log.warning("history %s: %s rows changed while being replaced; writing again",
                        directory, origin)
    return int(data.count_rows())


def _checked(origin: str) -> str:
    if not origin or not all(c.isalnum() or c in "-_" for c in origin):
        raise ValueError(f"history origin must be letters, digits, '-' or '_': {origin!r}")
    return origin


def dataset(directory: Path) -> ds.Dataset:
    """The table's latest version as a pyarrow dataset (DuckDB scans it as it is)."""
    return DeltaTable(str(directory)).to_pyarrow_dataset()
