"""Seeds, and a group's rows put together and filled in with NumPy.

:func:`_entity_keys` reads the entity table's keys and when each becomes a seed (what the
dense query's ``seed`` selects). :func:`_assemble` places every column of a group's steps
by pair code (seed time's number x entities + the entity's) onto the active pairs of
seeds; :func:`_fill_in_group` then adds the inactive rows itself, one seed time and slice
of entities at a time, with NumPy scatters into zeroed buffers (:func:`_spread`). At scale
almost every row is inactive (one million customers x 52 weekly seed times: 47 million
rows, 7.6 % active), and hash-joining or sorting that many 30-column rows in DuckDB costs
far more than filling them in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from tve_pipeline.targets.connection import _arrow_table
from tve_pipeline.targets.names import (
    _ENTITY,
    _FIRST_ACTIVITY,
    COUNT_AGGREGATIONS,
    INACTIVE,
    TIMESTAMP,
    quote,
)
from tve_pipeline.targets.plan import _Assembly
from tve_pipeline.targets.sql import _first_activity_sql
from tve_pipeline.traversal import Hop, TargetDef


class _EntityKeys(NamedTuple):
    """The primary keys of the entity table, sorted, with the earliest seed time at which
    each is a seed (``seed_from``: its own time, or its first activity - Δ when the table
    has no time column; NaT: never; None: every entity at every seed time) and the Arrow
    type of the key."""

    keys: np.ndarray
    seed_from: np.ndarray | None
    arrow_type: Any

    def existing_at(self, t) -> np.ndarray:
        """The keys of the seeds at seed time ``t`` (what :func:`_seed_cte` selects)."""
        return self.keys if self.seed_from is None else self.keys[self.seed_from <= t]


def _entity_keys(
    con,
    schema_tables,
    entity_table: str,
    first_hops: Sequence[Hop] = (),
    timedelta: pd.Timedelta | None = None,
) -> _EntityKeys:
    """The entity table's keys and when each becomes a seed (as :func:`_seed_cte`): its own
    time, else its first activity over ``first_hops`` (:func:`_first_activity_sql`) - Δ
    (``timedelta``); without a time column or a first hop, every entity at every seed time."""
    spec = schema_tables[entity_table]
    pkey = quote(spec.pkey)
    if spec.time_col is not None:
        sql = (
            f"SELECT {pkey}, {quote(spec.time_col)} FROM {quote(entity_table)}"
            f" WHERE {pkey} IS NOT NULL ORDER BY 1"
        )
    elif first_hops:
        sql = (
            f"SELECT e.{pkey}, a.{_FIRST_ACTIVITY} FROM {quote(entity_table)} AS e\n"
            f"LEFT JOIN ({_first_activity_sql(schema_tables, first_hops)}) AS a"
            f" ON a.{_ENTITY} = e.{pkey}\nWHERE e.{pkey} IS NOT NULL ORDER BY 1"
        )
    else:
        sql = f"SELECT {pkey} FROM {quote(entity_table)} WHERE {pkey} IS NOT NULL ORDER BY 1"
    arrow = _arrow_table(con.sql(sql))
    keys = arrow.column(0).to_numpy()
    if len(keys) > 1 and not (keys[1:] != keys[:-1]).all():
        raise ValueError(
            f"entity table {entity_table!r}: primary key {spec.pkey!r} has duplicate values"
        )
    if arrow.num_columns == 1:
        return _EntityKeys(keys, None, arrow.schema.field(0).type)
    times = arrow.column(1).to_numpy(zero_copy_only=False)
    if not np.issubdtype(times.dtype, np.datetime64):
        where = (
            f"time column {spec.time_col!r}"
            if spec.time_col is not None
            else f"a first-hop time column ({', '.join(sorted({h.table for h in first_hops}))})"
        )
        raise ValueError(f"entity table {entity_table!r}: {where} is not a timestamp column")
    if spec.time_col is None:
        micros = pd.Timedelta(timedelta) // pd.Timedelta(microseconds=1)
        times = times - np.timedelta64(micros, "us")
    return _EntityKeys(keys, times, arrow.schema.field(0).type)


def _pair_codes(table, seeds: np.ndarray, entities: _EntityKeys) -> tuple[np.ndarray, np.ndarray]:
    """Of each row's (seed time, entity) (its first two columns): the pair's code, seed
    time's number x entities + the entity's, and whether the entity is a seed then (the key
    is the entity table's and its ``seed_from`` is no later)."""
    keys, n = entities.keys, len(entities.keys)
    seed = table.column(0).to_numpy().astype("datetime64[us]")
    ent = table.column(1).to_numpy(zero_copy_only=False)
    if n == 0 or len(ent) == 0:
        return np.zeros(len(ent), dtype=np.int64), np.zeros(len(ent), dtype=bool)
    at = np.minimum(np.searchsorted(keys, ent), n - 1)
    ok = keys[at] == ent
    if entities.seed_from is not None:
        ok &= entities.seed_from[at].astype("datetime64[us]") <= seed
    number = np.searchsorted(seeds, seed)
    if (
        len(seeds) == 0
        or (number >= len(seeds)).any()
        or (seeds[np.minimum(number, len(seeds) - 1)] != seed).any()
    ):
        raise AssertionError("a row at a time that is not a seed time of its group")
    return number.astype(np.int64) * n + at, ok


def _assemble(made: Mapping[str, Any], assembly: _Assembly, entities: _EntityKeys, seeds, defs):
    """The sparse rows of a group of seed times (``seeds``): the active pairs of existing
    entities in (seed time, key) order (the pairs of ``assembly.base``, else of every
    window), then ``inactive`` 0 and each target from its step's table (placed by pair: a
    count is 0 and everything else null for a pair the step has no row of)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    seed_times = np.sort(np.asarray(seeds).astype("datetime64[us]"))
    n = len(entities.keys)
    codes: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def code(name: str):
        if name not in codes:
            codes[name] = _pair_codes(made[name], seed_times, entities)
        return codes[name]

    if assembly.base is not None:
        active = code(assembly.base)[0][code(assembly.base)[1]]
        if len(active) > 1 and not (active[1:] > active[:-1]).all():
            active = np.unique(active)
    else:
        parts = [c[ok] for c, ok in (code(w) for w in assembly.windows)]
        active = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    if n:
        number, at = np.divmod(active, n)
    else:
        number = at = active
    columns = [
        pa.array(entities.keys[at], type=entities.arrow_type),
        pa.array(seed_times[number]),
        pa.array(np.zeros(len(active), dtype=np.int64)),
    ]
    names = ["tve.entity", "tve.seed_time", INACTIVE]
    source = dict(assembly.sources)
    places: dict[str, tuple[np.ndarray, Any]] = {}
    for d in defs:
        name = source[d.name]
        if name not in places:  # where the step's rows go, and which rows
            c, ok = code(name)
            pos = np.searchsorted(active, c[ok])
            if len(pos) and (pos.max() >= len(active) or (active[pos] != c[ok]).any()):
                raise AssertionError(f"{name}: a pair that is not active")
            in_order = len(pos) == len(active) and (len(pos) < 2 or (pos[1:] > pos[:-1]).all())
            places[name] = (None if in_order else pos, None if ok.all() else pa.array(ok))
        pos, keep = places[name]
        values = made[name].column(d.name)
        values = (values if keep is None else values.filter(keep)).combine_chunks()
        count = d.aggregation in COUNT_AGGREGATIONS
        if pos is None:  # every active pair, in order
            columns.append(pc.fill_null(values, 0) if count and values.null_count else values)
        else:
            columns.append(_spread(values, pos, len(active), count))
        names.append(d.name)
    return pa.Table.from_arrays(columns, names=names)


def _spread(values, pos: np.ndarray, n: int, count: bool, active=None):
    """An Arrow column of ``n`` rows with ``values`` at ``pos``: 0 elsewhere for a count,
    else null.

    Fixed-width numbers are scattered with NumPy into a buffer (zeroed for a count; left
    as it is under nulls otherwise, which no reader looks at), with a validity bitmap
    packed from a boolean mask (much cheaper than a ``take`` with null indices, and this
    runs for every column of every slice); ``active``, the bitmap of ``pos`` alone, is
    shared by the columns without nulls. Other types use ``take``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = values.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        out = (np.zeros if count else np.empty)(n, dtype=kind.to_pandas_dtype())
        if values.null_count == 0:
            out[pos] = values.to_numpy()
            if count:
                return pa.array(out, type=kind)
            if active is None:
                active = _bitmap_of(pos, n)
            return pa.Array.from_buffers(
                kind, n, [active, pa.py_buffer(out)], null_count=n - len(pos)
            )
        out[pos] = pc.fill_null(values, 0).to_numpy()
        if count:
            return pa.array(out, type=kind)
        valid = np.zeros(n, dtype=bool)
        valid[pos] = pc.is_valid(values).to_numpy(zero_copy_only=False)
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
        return pa.Array.from_buffers(
            kind, n, [bitmap, pa.py_buffer(out)], null_count=n - int(np.count_nonzero(valid))
        )
    idx = np.full(n, -1, dtype=np.int64)
    idx[pos] = np.arange(len(pos))
    column = values.take(pa.array(idx, mask=idx < 0))
    return pc.fill_null(column, 0) if count else column


def _bitmap_of(pos: np.ndarray, n: int):
    """An Arrow validity bitmap of ``n`` slots, set at ``pos``."""
    import pyarrow as pa

    valid = np.zeros(n, dtype=bool)
    valid[pos] = True
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def _targets_schema(pkey: str, key_type, rows, defs: Sequence[TargetDef]):
    """The Arrow schema of the task vectors: key, seed time, ``inactive``, then the targets
    in the types the query gave them."""
    import pyarrow as pa

    fields = [
        pa.field(pkey, key_type),
        pa.field(TIMESTAMP, pa.timestamp("us")),
        pa.field(INACTIVE, pa.int64()),
    ]
    return pa.schema(fields + [rows.schema.field(d.name) for d in defs])


def _fill_in_group(
    rows, group: pd.DataFrame, entities: _EntityKeys, schema, defs, slice_rows: int
) -> Iterator:
    """The task vectors of a group of seed times, a seed time and slice of existing
    entities at a time, from the group's active rows (in (seed time, pkey) order)."""
    times = rows.column(1).to_numpy()
    used_rows = 0
    for t in group[TIMESTAMP].to_numpy():
        first = np.searchsorted(times, t, side="left")
        last = np.searchsorted(times, t, side="right")
        at_t = rows.slice(first, last - first)
        used_rows += at_t.num_rows
        exist = entities.existing_at(t)
        if at_t.num_rows and len(exist) == 0:
            raise AssertionError("active rows at a seed time at which no entity exists")
        for start in range(0, len(exist), slice_rows):
            chunk = exist[start : start + slice_rows]
            yield _fill_in_slice(at_t, chunk, np.datetime64(t, "us"), entities, schema, defs)
    if used_rows != rows.num_rows:
        raise AssertionError("active rows at a time that is not a seed time")


def _fill_in_slice(at_t, chunk: np.ndarray, when, entities: _EntityKeys, schema, defs):
    """The task vectors of the entities ``chunk`` (sorted keys) at seed time ``when``: the
    active rows of ``at_t`` scattered into place, ``inactive = 1``, counts 0 and every other
    target null elsewhere."""
    import pyarrow as pa

    ent = at_t.column(0).to_numpy()
    lo = int(np.searchsorted(ent, chunk[0], side="left"))
    hi = int(np.searchsorted(ent, chunk[-1], side="right"))
    pos = np.searchsorted(chunk, ent[lo:hi])
    if hi > lo and (pos.max() >= len(chunk) or not (chunk[pos] == ent[lo:hi]).all()):
        raise AssertionError("an active row of an entity that does not exist at its seed time")
    part = at_t.slice(lo, hi - lo)
    inactive = np.ones(len(chunk), dtype=np.int64)
    inactive[pos] = 0
    columns = [
        pa.array(chunk, type=entities.arrow_type),
        pa.array(np.full(len(chunk), when)),
        pa.array(inactive),
    ]
    active = _bitmap_of(pos, len(chunk))
    for d in defs:
        count = d.aggregation in COUNT_AGGREGATIONS
        columns.append(_spread(part.column(d.name), pos, len(chunk), count, active))
    return pa.Table.from_arrays(columns, schema=schema)
