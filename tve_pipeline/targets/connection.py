"""The in-memory DuckDB a query runs in, and its rows as Arrow tables.

:func:`_connection` registers the tables a query uses (frames, Arrow tables or parquet
files) and its seed times, under DuckDB's share of the memory budget (large inputs spill
to a temporary directory instead of being killed), the query's threads and temporary
folder, and picks the window joins' algorithm by the number of seed times;
:func:`_check_inputs` fails in one line naming the table and column a target lacks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from tve_pipeline.targets.names import _literal, quote
from tve_pipeline.targets.query import TargetQuery
from tve_pipeline.traversal import TargetDef

#: Up to this many seed times, the window joins are nested loops (see ``_connection``).
_NESTED_LOOP_SEEDS = 128

#: Of a query's memory budget (``TargetQuery.memory_limit``), the share DuckDB is given as
#: its own limit; the rest is for what runs in process (the lookup scans, a group's
#: aggregates, the slices being filled in and written). 10M orders, all path kinds, budget
#: 2 GB: 41.9 s and 1.77 GiB peak RSS at this share with quarter-budget scans (DuckDB given
#: all 2 GB: 41.8 s, 2.79 GiB).
_DUCKDB_SHARE = 0.5


def _duckdb_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """Pandas categoricals become plain values (DuckDB would order an ENUM by code, not value)."""
    cats = [c for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)]
    if not cats:
        return frame
    frame = frame.copy(deep=False)
    for c in cats:
        try:
            frame[c] = frame[c].astype(frame[c].cat.categories.dtype)
        except (TypeError, ValueError):
            frame[c] = frame[c].astype(object)
    return frame


def _columns_of(con, name: str) -> list[str]:
    return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {quote(name)}").fetchall()]


@contextmanager
def _connection(query: TargetQuery, used: Iterable[str], seed_times: pd.DataFrame, relation: str):
    """An in-memory DuckDB with the used tables (frames, Arrow tables or parquet files) and
    the seed times, under the query's memory limit, threads and temporary folder."""
    import duckdb

    own_temp = query.temp_directory is None
    temp_dir = tempfile.mkdtemp(prefix="tve-duckdb-") if own_temp else query.temp_directory
    con = duckdb.connect()
    try:
        duckdb_limit = int(query.budget * _DUCKDB_SHARE)
        con.execute(f"SET memory_limit = '{duckdb_limit}B'")
        con.execute(f"SET temp_directory = {_literal(temp_dir)}")
        con.execute("SET preserve_insertion_order = false")  # the query orders its result itself
        if query.threads is not None:
            con.execute(f"SET threads = {int(query.threads)}")
        for name in used:
            source = query.tables[name]
            if isinstance(source, (str, os.PathLike)):
                path = Path(source)
                if not path.exists():
                    raise ValueError(f"table {name!r}: no file {path}")
                con.execute(
                    f"CREATE VIEW {quote(name)} AS"
                    f" SELECT * FROM read_parquet({_literal(str(path))})"
                )
            elif isinstance(source, pd.DataFrame):
                con.register(name, _duckdb_ready(source))
            else:  # an Arrow table or anything else DuckDB can scan
                con.register(name, source)
        con.register(relation, seed_times)
        # The windows join every fact row to the seed times with two inequalities. Against a
        # few dozen seed times a nested loop (one vectorised comparison per seed time) beats
        # DuckDB's default sort-based range joins several times over; past a few hundred,
        # sorting wins. Equality joins are hash joins either way.
        if len(seed_times) <= _NESTED_LOOP_SEEDS:
            con.execute(f"SET nested_loop_join_threshold = {len(seed_times) + 1}")
        yield con
    finally:
        con.close()
        if own_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _check_inputs(
    con, tables: Mapping[str, Any], defs: Sequence[TargetDef], used: set[str]
) -> None:
    missing = sorted(used - set(tables))
    if missing:
        raise ValueError(f"no data for tables {missing}")
    columns: dict[str, list[str]] = {}
    for d in defs:
        if d.column is None:
            continue
        if d.last_table not in columns:
            columns[d.last_table] = _columns_of(con, d.last_table)
        if d.column not in columns[d.last_table]:
            raise ValueError(
                f"target {d.name!r}: table {d.last_table!r} has no column {d.column!r}"
            )


def _arrow_table(relation):
    """A DuckDB relation as an Arrow table (``to_arrow_table`` since DuckDB 1.4, ``arrow``
    before)."""
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


def release_arrow_memory() -> None:
    """Give what Arrow's memory pool holds free back to the system: its default pool
    (mimalloc) keeps freed buffers for reuse, which at 10M rows left ~700 MB of RSS behind
    after reading a table's columns once."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
