"""What every group of seed times reads, made once per query, as files per group.

:func:`_once_tables` makes the tables that read no seed time (the per-key lookups of
fact->key<-fact paths) once for all groups: each ``at_<j>`` and ``reach_<j>_<k>`` in
process from one scan of ``F'`` sorted by DuckDB with the first-hop (key, time)
interleaved, streamed in buckets of whole keys (:func:`_create_lookup_tables`,
:mod:`.lookups`), the others in DuckDB. ``at_<j>`` and the tables with a seed-time column
are written as parquet files, a file per group holding the rows that group's queries read
(:class:`_GroupFiles`), so that neither DuckDB's memory nor a group's scans hold the rows of
other groups.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tve_pipeline.targets.connection import _arrow_table, _columns_of, release_arrow_memory
from tve_pipeline.targets.lookups import _lookups_of_bucket
from tve_pipeline.targets.names import _SEED_TIME, TIMESTAMP, _literal, quote
from tve_pipeline.targets.plan import _Cte, _NativeLookups, _step_query

#: The rows of ``F'`` (and first-hop (key, time)) of a fact->key<-fact path are scanned
#: with NumPy this many at a time (whole keys: a key's rows are never split): ~25 columns
#: of 8 bytes, ~400 MB with the intermediate arrays.
_LOOKUP_BUCKET_ROWS = 2_000_000


class _GroupFiles:
    """Parquet files of one table's rows, a file per group of seed times, each holding (at
    least) the rows that group's queries read: read by the group's queries through a view
    under the table's name (:func:`_group_query`), so that neither DuckDB's memory nor a
    group's scans hold the rows of other groups."""

    def __init__(self, directory: str, name: str, groups: int) -> None:
        self.paths = [os.path.join(directory, f"{name}.{g}.parquet") for g in range(groups)]
        self._writers: list[Any] = [None] * groups
        self.schema = None

    def append(self, g: int, table) -> None:
        import pyarrow.parquet as pq

        if self.schema is None:
            self.schema = table.schema
        if self._writers[g] is None:
            self._writers[g] = pq.ParquetWriter(self.paths[g], self.schema)
        self._writers[g].write_table(table.cast(self.schema))

    def close(self) -> None:
        """Close every file (a group without rows gets one without rows)."""
        import pyarrow.parquet as pq

        for g, writer in enumerate(self._writers):
            if writer is None and self.schema is None:  # failed before any row
                continue
            if writer is None:
                writer = pq.ParquetWriter(self.paths[g], self.schema)
            writer.close()
        self._writers = [None] * len(self._writers)

    def view_sql(self, name: str, g: int) -> str:
        return (
            f"CREATE OR REPLACE TEMP VIEW {name} AS"
            f" SELECT * FROM read_parquet({_literal(self.paths[g])})"
        )


def _time_ns(column) -> np.ndarray | None:
    """A tz-naive timestamp (or date) column as int64 nanoseconds; None for other types."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if not (pa.types.is_date(t) or (pa.types.is_timestamp(t) and t.tz is None)):
        return None
    ns = pc.cast(pc.cast(column, pa.timestamp("ns")), pa.int64())
    # (a null time: before every window, so in no group's)
    return pc.fill_null(ns, np.iinfo(np.int64).min).to_numpy(zero_copy_only=False)


def _group_windows(groups: Sequence[pd.DataFrame], timedelta: pd.Timedelta) -> np.ndarray:
    """Per group of seed times, the (low, high] nanoseconds its next windows cover: from
    its first seed time to its last plus Δ."""
    out = np.empty((len(groups), 2), dtype=np.int64)
    for g, group in enumerate(groups):
        seeds = group[TIMESTAMP].to_numpy().astype("datetime64[ns]").astype(np.int64)
        if len(seeds) == 0:  # (no seed time at all: one group, for the schema)
            out[g] = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        else:
            out[g] = seeds.min(), seeds.max() + pd.Timedelta(timedelta).value
    return out


def _bucket_rows(spec: _NativeLookups, budget: int) -> int:
    """Rows per lookup scan (at most ``_LOOKUP_BUCKET_ROWS``; whole keys, so a key with more
    rows makes a larger one): an eighth of the memory budget at ~16 bytes per column of
    ``at`` and 160 of intermediate arrays a row (21 columns: 0.5M rows at 2 GB; 10M orders:
    1.59 GiB peak, half of it DuckDB's; at a quarter 1.77 GiB, the same time)."""
    width = 3 + len(spec.pairs) + 2 * len(spec.ranks)
    return min(_LOOKUP_BUCKET_ROWS, max(1_000, budget // 8 // (16 * width + 160)))


def _create_lookup_tables(
    con, spec: _NativeLookups, files: _GroupFiles, windows: np.ndarray, bucket_rows: int
) -> None:
    """Write ``at_<j>`` of one fact->key<-fact path to ``files`` (a group's file: the rows
    at its first-hop times, ``windows``) and create each ``reach_<j>_<k>`` (what their CTEs
    compute from ``per_time``, ``counts`` and ``best``) from the rows of ``F'`` and the first-hop
    (key, time) sorted once by DuckDB by (key, time, rows of ``F'`` before lookups) and
    streamed: each run of whole keys of about ``bucket_rows`` rows is scanned with
    NumPy (:func:`_lookups_of_bucket`) and appended to the files and, through a second
    connection to the same database (the stream holds the first), to tables that DuckDB
    keeps under its memory limit. The sort spills to disk past the limit."""
    import pyarrow as pa

    values = [
        _arrow_table(con.sql(f'SELECT "value" FROM {r} ORDER BY "rank"')).column(0).combine_chunks()
        for r in spec.ranks
    ]
    sizes = [len(v) for v in values]
    out = con.cursor()
    made: set[str] = set()

    def scan(table) -> None:
        at, reach = _lookups_of_bucket(table, spec, sizes)
        for k, column in enumerate(values, 1):  # ranks -> values (dense ranks from 1)
            i = at.schema.get_field_index(f"tve.rank_{k}")
            at = at.set_column(i, f"tve.mode_{k}", _value_of_rank(column, at.column(i)))
        reach = [
            r.set_column(2, "value", _value_of_rank(column, r.column(2)))
            for r, column in zip(reach, values)
        ]
        when = _time_ns(at.column("tve.time"))
        for g, (low, high) in enumerate(windows):
            # (a time that is not a tz-naive timestamp: every row in every group's file)
            keep = None if when is None else pa.array((when > low) & (when <= high))
            part = at if keep is None else at.filter(keep)
            if part.num_rows or g == 0:
                files.append(g, part)
        for name, chunk in zip(spec.reach, reach):
            out.register("tve_chunk", chunk)
            verb = f"INSERT INTO {name}" if name in made else f"CREATE TABLE {name} AS"
            out.execute(f"{verb} SELECT * FROM tve_chunk")
            out.unregister("tve_chunk")
            made.add(name)

    sql = f"SELECT * FROM (\n        {spec.rows_sql})\n ORDER BY 1, 2, 3"
    try:
        reader = con.sql(sql).fetch_record_batch(1 << 17)
        pending, rows = [], 0
        for batch in reader:
            pending.append(batch)
            rows += batch.num_rows
            if rows >= bucket_rows:
                table = pa.Table.from_batches(pending)
                cut = _last_key_start(table.column(0))
                if cut > 0:  # else one key holds them all: read on
                    scan(table.slice(0, cut))
                    rest = table.slice(cut)
                    pending, rows = rest.to_batches(), rest.num_rows
                    del table, rest
                    release_arrow_memory()
        scan(pa.Table.from_batches(pending, schema=reader.schema))
    finally:
        out.close()
        files.close()


def _last_key_start(key) -> int:
    """The position where the last run of equal keys of a sorted column starts."""
    import pyarrow.compute as pc

    last = pc.equal(key, key[len(key) - 1]).to_numpy(zero_copy_only=False)
    return len(last) - int(np.argmin(last[::-1])) if not last.all() else 0


def _value_of_rank(values, rank):
    """The values of dense ranks (from 1; null stays null)."""
    import pyarrow.compute as pc

    return values.take(pc.subtract(rank, 1))


def _once_tables(
    con,
    tables: Sequence[_Cte],
    steps: Sequence[_Cte],
    groups,
    timedelta,
    directory: str,
    budget: int,
) -> dict[str, _GroupFiles]:
    """Make what every group's steps read, computed once: DuckDB tables, and each
    fact->key<-fact path's ``at_<j>`` (in process) as files of each group's rows
    (:class:`_GroupFiles`, in ``directory``); tables no step reads (only read to make
    the others, such as ``ranks_<j>_<k>``) are dropped, and those with a seed-time column
    are split into files per group too. Returns the files by name."""
    made = []
    files: dict[str, _GroupFiles] = {}
    windows = _group_windows(groups, timedelta)
    replaced = {name for t in tables if t.native for name in t.native.replaces}
    for table in tables:
        if table.native is not None:
            others = [t.body for t in tables if t is not table and t.name not in replaced]
            if any(re.search(rf"\b{re.escape(table.name)}\b", body) for body in others):
                raise AssertionError(f"{table.name} is read by a table made once")
            files[table.name] = _GroupFiles(directory, table.name, len(groups))
            rows = _bucket_rows(table.native, budget)
            _create_lookup_tables(con, table.native, files[table.name], windows, rows)
            made += table.native.reach
        elif table.name not in replaced:
            con.execute(f"CREATE TEMP TABLE {table.name} AS {table.body}")
            made.append(table.name)
    read = "\n".join(_step_query(step) for step in steps)
    for name in made:
        if not re.search(rf"\b{re.escape(name)}\b", read):
            con.execute(f"DROP TABLE {name}")
        elif _SEED_TIME.strip('"') in _columns_of(con, name):
            files[name] = _split_by_seed_time(con, name, groups, directory)
            con.execute(f"DROP TABLE {name}")
    return files


def _split_by_seed_time(con, name: str, groups, directory: str) -> _GroupFiles:
    """The rows of table ``name`` of each group's seed times, as :class:`_GroupFiles`."""
    files = _GroupFiles(directory, name, len(groups))
    try:
        for g, group in enumerate(groups):
            con.register("tve.group", group)
            con.execute(
                f"COPY (SELECT * FROM {name} WHERE {_SEED_TIME} IN"
                f' (SELECT {quote(TIMESTAMP)} FROM "tve.group"))'
                f" TO {_literal(files.paths[g])} (FORMAT parquet)"
            )
    finally:
        con.unregister("tve.group")
    return files
