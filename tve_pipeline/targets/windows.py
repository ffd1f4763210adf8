"""A group of seed times' windows, and the in-process aggregation of the paths read off one.

:func:`_group_query` runs a group's steps in order: DuckDB makes each window as a
temporary table (the range join, in an in-memory DuckDB with a memory limit), NumPy
aggregates the paths read off it (:func:`_aggregate_rows`: one sort by (seed time,
entity), ``reduceat`` per pair, modes and distinct counts from runs of coded values), where
DuckDB's hash aggregates, mode CTEs and their joins cost 4 times the CPU; the
fact->key<-fact aggregates (``agg_<j>`` and ``mode_<j>_<k>`` over the lookups) and each
``path_<j>`` (rows that multiply: aggregated as they stream, ``aggs_<j>``) run as queries
of their own; and :func:`~.assemble._assemble` places every column by pair code onto the
active pairs of seeds. A window is dropped once no later step reads it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tve_pipeline.targets.assemble import _assemble
from tve_pipeline.targets.connection import _arrow_table
from tve_pipeline.targets.names import TIMESTAMP, quote
from tve_pipeline.targets.plan import _Assembly, _Cte, _NativeAggregate, _step_query


def _group_query(
    con,
    group: pd.DataFrame,
    *,
    views: Sequence[str] = (),
    steps: Sequence[_Cte],
    assembly: _Assembly,
    entities,
    defs,
):
    """The sparse rows of the group of seed times ``group`` (registered on ``con`` as the
    seed-time relation): ``views`` run (statements: the group's files of the tables made
    once), each step made in order (a window as a temporary table under its
    name while a later step reads it; the others as Arrow tables), then
    :func:`_assemble`'d."""
    for view in views:
        con.execute(view)
    texts = [_step_query(step) for step in steps]
    made: dict[str, Any] = {}
    tables: list[str] = []  # windows: DuckDB tables (joins read them 1.7x faster than Arrow)
    keep = set(assembly.windows if assembly.base is None else ()) | {n for _, n in assembly.sources}

    def let_go(later: Sequence[str]) -> None:  # what no later step reads (a window, once
        # aggregated, when the aggregate gives the pairs)
        for name in list(tables):
            if not any(re.search(rf"\b{re.escape(name)}\b", t) for t in later):
                con.execute(f"DROP TABLE {name}")
                tables.remove(name)

    try:
        for i, step in enumerate(steps):
            if step.name in assembly.windows:
                con.execute(f"CREATE OR REPLACE TEMP TABLE {step.name} AS {texts[i]}")
                tables.append(step.name)
                if step.name in keep:  # its pairs: the active ones (several windows)
                    rows = con.sql(f"SELECT * FROM {step.name}")
                    made[step.name] = _arrow_table(rows.select(*map(quote, rows.columns[:2])))
            else:
                table = _arrow_table(con.sql(texts[i]))
                if isinstance(step.native, _NativeAggregate):
                    table = _aggregate_rows(table, step.native)
                made[step.name] = table
                del table
            let_go(texts[i + 1 :])
    finally:
        let_go([])
    return _assemble(made, assembly, entities, group[TIMESTAMP].to_numpy(), defs)


def _aggregate_rows(rows, spec: _NativeAggregate):
    """``spec``'s aggregates of ``rows`` (seed time, entity, then the columns read) per
    (seed time, entity), as an Arrow table: the pairs, then one column per target.

    Rows are sorted by pair (:class:`_PairRuns`), then reduced per run of a pair with NumPy
    (:func:`_aggregate`).
    """
    import pyarrow as pa

    runs = _PairRuns(rows)
    starts = pa.array(runs.starts)
    out = {"tve.seed_time": runs.seed.take(starts), "tve.entity": runs.ent.take(starts)}
    for name, aggregation, c in spec.targets:
        out[name] = _aggregate(runs, aggregation, c)
    return pa.table(out)


class _PairRuns:
    """The rows of a window sorted by (seed time, entity) pair (Arrow's stable multi-key
    sort), each pair a run (``starts``, ``sizes``; ``pair``: each row's pair number), and
    what the aggregates read of each column, computed once per column."""

    def __init__(self, rows) -> None:
        import pyarrow.compute as pc

        n = rows.num_rows
        self.rows = rows
        self.order = pc.sort_indices(
            rows.select([0, 1]),
            sort_keys=[(rows.column_names[0], "ascending"), (rows.column_names[1], "ascending")],
        )
        seed, ent = (rows.column(i).take(self.order).combine_chunks() for i in (0, 1))
        new = np.ones(n, dtype=bool)
        if n > 1:
            same = pc.and_(
                pc.equal(seed.slice(1), seed.slice(0, n - 1)),
                pc.equal(ent.slice(1), ent.slice(0, n - 1)),
            )
            new[1:] = ~same.to_numpy(zero_copy_only=False)
        self.seed, self.ent = seed, ent
        self.starts = np.flatnonzero(new)
        self.m = len(self.starts)
        self.pair = np.cumsum(new) - 1
        self.sizes = np.diff(np.append(self.starts, n))
        self._columns: dict[int, Any] = {}
        self._valids: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._numbers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._values: dict[int, tuple[Any, np.ndarray, np.ndarray]] = {}

    def column(self, c: int):
        """The ``c``-th column read, in pair order."""
        if c not in self._columns:
            self._columns[c] = self.rows.column(2 + c).take(self.order).combine_chunks()
        return self._columns[c]

    def reduce(self, ufunc, x: np.ndarray) -> np.ndarray:
        """``ufunc`` over each pair's run of ``x``."""
        return ufunc.reduceat(x, self.starts) if self.m else x[:0]

    def counted(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(valid; non-null count per pair)"""
        if c not in self._valids:
            valid = self.column(c).is_valid().to_numpy(zero_copy_only=False)
            self._valids[c] = (valid, self.reduce(np.add, valid.astype(np.int64)))
        return self._valids[c]

    def number(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values as double, 0 under nulls; valid; non-null count per pair)"""
        import pyarrow as pa
        import pyarrow.compute as pc

        if c not in self._numbers:
            x = pc.fill_null(pc.cast(self.column(c), pa.float64()), 0.0)
            self._numbers[c] = (x.to_numpy(zero_copy_only=False), *self.counted(c))
        return self._numbers[c]

    def value_runs(self, c: int):
        """(sorted distinct values; per pair: distinct count, code of the mode or -1): values
        coded by their rank in ascending order (Arrow's order: DuckDB's, NaN last; -0.0 read
        as 0.0, as DuckDB groups them), one sort of (pair, code), then per pair the number of
        runs and the run with the largest count, ties to the smallest code."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if c in self._values:
            return self._values[c]
        m, col = self.m, self.column(c)
        valid = self.counted(c)[0]
        if not valid.any():
            self._values[c] = (col.slice(0, 0), np.zeros(m, np.int64), np.full(m, -1, np.int64))
            return self._values[c]
        if pa.types.is_floating(col.type):  # -0.0 is 0.0, as DuckDB groups them
            col = pc.add(col, pa.scalar(0.0, col.type))
        encoded = pc.dictionary_encode(col)
        ranked = np.asarray(pc.sort_indices(encoded.dictionary))
        k = len(ranked)
        rank_of = np.empty(k, dtype=np.int64)
        rank_of[ranked] = np.arange(k)
        code = rank_of[encoded.indices.to_numpy(zero_copy_only=False)[valid].astype(np.int64)]
        key = np.sort(self.pair[valid] * k + code)
        first = np.flatnonzero(np.append(True, key[1:] != key[:-1]))
        run_pair, run_code = np.divmod(key[first], k)
        run_len = np.diff(np.append(first, len(key)))
        distinct = np.bincount(run_pair, minlength=m).astype(np.int64)
        pair_first = np.flatnonzero(np.append(True, run_pair[1:] != run_pair[:-1]))
        best = np.maximum.reduceat(run_len * k + (k - 1 - run_code), pair_first)
        mode = np.full(m, -1, dtype=np.int64)
        mode[run_pair[pair_first]] = k - 1 - best % k
        self._values[c] = (encoded.dictionary.take(pa.array(ranked)), distinct, mode)
        return self._values[c]


def _aggregate(runs: _PairRuns, aggregation: str, c: int | None):
    """One target's column, per pair: counts and sums by ``add.reduceat``, min by ``fmin``
    (NaN only when every value is NaN, as DuckDB's NaN-is-largest ``min``), max by
    ``maximum`` (NaN wins), std in two passes (sample; null under two values); every
    aggregate but a count is null over no values; mode and distinct count from
    :meth:`_PairRuns.value_runs`. Numbers are read cast to double, as the SQL's
    ``CAST(... AS DOUBLE)``; ``c`` None counts the rows."""
    import pyarrow as pa

    if c is None:
        return pa.array(runs.sizes, type=pa.int64())
    if aggregation == "count":
        return pa.array(runs.counted(c)[1], type=pa.int64())
    if aggregation in ("mode", "count_distinct"):
        ordered, distinct, mode = runs.value_runs(c)
        if aggregation == "count_distinct":
            return pa.array(distinct, type=pa.int64())
        return ordered.take(pa.array(mode, mask=mode < 0))
    x, valid, count = runs.number(c)
    some = count > 0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if aggregation == "min":
            return _doubles(runs.reduce(np.fmin, np.where(valid, x, np.nan)), some)
        if aggregation == "max":
            return _doubles(runs.reduce(np.maximum, np.where(valid, x, -np.inf)), some)
        total = runs.reduce(np.add, x)
        if aggregation == "sum":
            return _doubles(total, some)
        if aggregation == "mean":
            return _doubles(total / count, some)
        if aggregation == "std":
            dev = np.where(valid, x - (total / np.maximum(count, 1))[runs.pair], 0.0)
            spread = runs.reduce(np.add, dev * dev) / (count - 1)
            return _doubles(np.sqrt(spread), count > 1)
    raise ValueError(f"unknown aggregation {aggregation!r}")  # pragma: no cover


def _doubles(x: np.ndarray, ok: np.ndarray):
    """A float64 Arrow column of ``x``, null where not ``ok``."""
    import pyarrow as pa

    return pa.array(x, type=pa.float64(), mask=~ok)
