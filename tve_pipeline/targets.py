"""Raw task vectors: next-window aggregates of every target of the traversal graph, in DuckDB.

Design. :func:`targets_sql` turns a list of :class:`~tve_pipeline.traversal.TargetDef`
into one set-based DuckDB query over a relation of seed times ``timestamps(timestamp)``
(as in RelBench task SQL), never a query per seed time:

- ``window_<i>``: the rows of first hop ``E <- F`` in the next window of every seed time
  (a range join, ``t < time <= t + Δ``), with the dimension rows that the paths' "out"
  hops reach left-joined on (a fact row references one such row or none, so every path
  ``E <- F -> D ...`` made of "out" hops is read off the window's rows);
- ``path_<j>``: a path with a later "in" hop (``E <- F -> K <- F'``: rows of ``F'`` no
  later than the hop-1 row), which multiplies rows and so gets rows of its own;
- ``agg_<j>``: per (seed time, entity), the row counts and plain aggregates of all the
  paths read off one window (or of one ``path_<j>``), in one ``GROUP BY``;
- ``mode_<j>_<k>``: per column with a mode or distinct count, one count per distinct
  value, then the most frequent (ties: the smallest) and how many;
- ``vector``: the task vectors of the active (seed time, entity) pairs, every aggregate
  left-joined onto the pairs that have a first-hop row.

Two shapes give the same rows. The *dense* one (``dense=True``, the default: printable on
its own and runnable like a RelBench task query) adds ``seed``, the entities that exist at
each seed time (own time column ``<= t``, so a null time never exists; every row when the
table has no time column), and left-joins ``vector`` onto it: an entity with an empty
next window gets counts 0, every other aggregate null and ``inactive = 1``. The *sparse*
one (``dense=False``) returns the active pairs of existing entities in (seed time,
entity) order; it is what :func:`iter_targets` (behind :func:`compute_targets` and
:func:`write_targets`) runs, adding the inactive rows itself, one seed time and slice of
entities at a time, with NumPy scatters into zeroed buffers. At scale almost every row is
inactive (one million customers x 52 weekly seed times: 47 million rows, 7.6 % active),
and hash-joining or sorting that many 30-column rows in DuckDB costs far more than
filling them in order. The query runs in an in-memory DuckDB with a memory limit (large
inputs spill to a temporary directory instead of being killed), once per group of
``seeds_per_query`` consecutive seed times on a background thread, so that DuckDB's
working set stays small and the next group's query overlaps writing the current one;
:func:`write_targets` streams the rows into one parquet file (a row group per slice) on a
writer thread, so memory does not grow with the number of seed times or entities.

Every identifier is double-quoted (``"`` doubled), so tables and columns may hold spaces
and quotes. Aggregation semantics: ``count`` counts the rows reached (``column`` null) or
the non-null values; ``count_distinct`` the distinct non-null values; ``sum``, ``mean``,
``min``, ``max`` and ``std`` (sample, null for fewer than two values) are computed on the
values cast to DOUBLE; ``mode`` is the most frequent non-null value, ties broken by the
smallest value, and keeps the column's type. An "out" hop relies on its table's primary
key being unique (RelBench's 0..n-1 keys are; the entity table's is checked).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tve_pipeline.traversal import NUMERIC_AGGREGATIONS, Hop, TableSpecLike, TargetDef, paths_of

#: Column that marks an (entity, seed time) with no next-window row on any path.
INACTIVE = "inactive"
#: Column of the seed time in the result (and of the registered seed-time relation).
TIMESTAMP = "timestamp"
#: Aggregations that are 0 (not null) over no values.
COUNT_AGGREGATIONS = frozenset({"count", "count_distinct"})

# Internal column names of the generated CTEs; dotted so that no real column is mistaken for them.
_SEED_TIME = '"tve.seed_time"'
_ENTITY = '"tve.entity"'

#: Up to this many seed times, the window joins are nested loops (see ``_connection``).
_NESTED_LOOP_SEEDS = 128

#: Seed times per run of the query (see :func:`iter_targets`); None runs them all at once.
DEFAULT_SEEDS_PER_QUERY = 16

#: Entities per output slice of :func:`iter_targets` (one parquet row group each).
DEFAULT_SLICE_ROWS = 1 << 19


def quote(identifier: str) -> str:
    """A DuckDB identifier, double-quoted, with embedded double quotes doubled."""
    return '"' + str(identifier).replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _comment(text: str) -> str:
    """A one-line SQL comment that no identifier can break out of."""
    return "-- " + re.sub(r"[\x00-\x1f\x7f]", " ", text)


def interval_sql(timedelta: pd.Timedelta) -> str:
    """Δ as a DuckDB interval literal: ``INTERVAL '7 days'`` or ``INTERVAL '90 microseconds'``."""
    td = pd.Timedelta(timedelta)
    if td <= pd.Timedelta(0):
        raise ValueError(f"the next window needs a positive timedelta, got {td}")
    if td.value % 1000:
        raise ValueError(f"timedelta {td} is finer than a microsecond (DuckDB's resolution)")
    if td.value % (86_400 * 10**9) == 0:
        days = td.days
        return f"INTERVAL '{days} day{'s' if days != 1 else ''}'"
    return f"INTERVAL '{td.value // 1000} microseconds'"


def _select(items: Sequence[tuple[str, str | None]], indent: str) -> str:
    """A select list with the ``AS`` aliases aligned."""
    width = max((len(expr) for expr, alias in items if alias is not None), default=0)
    lines = [expr if alias is None else f"{expr.ljust(width)} AS {alias}" for expr, alias in items]
    return (",\n" + indent).join(lines)


def _describe(entity_table: str, path: tuple[Hop, ...]) -> str:
    parts = [entity_table]
    for hop in path:
        arrow = "<-" if hop.direction == "in" else "->"
        parts.append(f"{arrow} {hop.table}[{hop.via}]")
    return " ".join(parts)


def validate_targets(
    schema_tables: Mapping[str, TableSpecLike], defs: Sequence[TargetDef], entity_table: str
) -> None:
    """Raise ``ValueError`` unless every definition is a walkable path of the schema."""
    if not defs:
        raise ValueError(f"no target definitions for {entity_table!r}")
    if entity_table not in schema_tables or schema_tables[entity_table].pkey is None:
        raise ValueError(
            f"entity table {entity_table!r} is not in the schema or has no primary key"
        )
    names = [d.name for d in defs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"duplicate target names: {sorted({n for n in names if names.count(n) > 1})}"
        )
    reserved = {schema_tables[entity_table].pkey, TIMESTAMP, INACTIVE}
    if reserved & set(names):
        raise ValueError(f"target names clash with output columns: {sorted(reserved & set(names))}")
    if len(reserved) < 3:
        raise ValueError(
            f"the primary key of {entity_table!r} may not be named {TIMESTAMP!r} or {INACTIVE!r}"
        )
    for d in defs:
        if d.entity_table != entity_table:
            raise ValueError(f"target {d.name!r} is for {d.entity_table!r}, not {entity_table!r}")
        current = entity_table
        for i, hop in enumerate(d.path):
            if hop.table not in schema_tables:
                raise ValueError(f"target {d.name!r}: unknown table {hop.table!r}")
            spec = schema_tables[hop.table]
            if hop.direction == "in":
                if spec.fkeys.get(hop.via) != current or schema_tables[current].pkey is None:
                    raise ValueError(
                        f"target {d.name!r}: {hop.table}.{hop.via} does not reference {current!r}"
                    )
                if i == 0 and spec.time_col is None:
                    raise ValueError(
                        f"target {d.name!r}: first-hop table {hop.table!r} has no time column"
                    )
            else:
                if schema_tables[current].fkeys.get(hop.via) != hop.table or spec.pkey is None:
                    raise ValueError(
                        f"target {d.name!r}: {current}.{hop.via} does not reference {hop.table!r}"
                    )
            current = hop.table
        if d.column is not None and d.column.startswith("tve."):
            raise ValueError(f"target {d.name!r}: column names starting with 'tve.' are reserved")


_CTE_NAME = r"(seed|active|vector|(window|path|agg)_\d+|mode_\d+_\d+)"


def _cte_prefix(schema_tables: Mapping[str, TableSpecLike]) -> str:
    """'' unless a table's name would be shadowed by a CTE name (DuckDB names are case-insensitive)."""
    for prefix in ("", "tve_"):
        pattern = re.compile(re.escape(prefix) + _CTE_NAME, re.IGNORECASE)
        if not any(pattern.fullmatch(str(t)) for t in schema_tables):
            return prefix
    raise ValueError(f"table names {list(schema_tables)} collide with the query's CTE names")


def _aggregate_sql(d: TargetDef, values: str) -> str:
    """A plain aggregate of one path's rows, reading the column as ``values`` (``mode`` and
    ``count_distinct`` are in ``mode_<j>_<k>``); ``values`` is ``*`` for the rows themselves."""
    if d.column is None:
        return f"count({values})"
    as_double = f"CAST({values} AS DOUBLE)"
    return {
        "count": f"count({values})",
        "sum": f"sum({as_double})",
        "mean": f"avg({as_double})",
        "min": f"min({as_double})",
        "max": f"max({as_double})",
        "std": f"stddev_samp({as_double})",
    }[d.aggregation]


#: Aggregations computed from one count per distinct value (``mode_<j>_<k>`` CTEs).
_VALUE_AGGREGATIONS = frozenset({"mode", "count_distinct"})


def _out_only(path: tuple[Hop, ...]) -> bool:
    """A path whose hops after the first all go "out": one row (or none) per first-hop row."""
    return all(hop.direction == "out" for hop in path[1:])


def targets_sql(
    schema_tables: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    timedelta: pd.Timedelta,
    *,
    timestamps_relation: str = "timestamps",
    dense: bool = True,
) -> str:
    """The DuckDB query computing the raw task vectors of ``entity_table`` for every seed time.

    It reads each table of the schema as a relation of the same name and the seed times as
    ``timestamps_relation(timestamp)``; output columns: the entity's pkey, ``timestamp``,
    ``inactive``, then one column per target in ``defs`` order, ordered by (timestamp,
    pkey). ``dense=True``: one row per existing (entity, seed time); ``dense=False``: only
    the rows with ``inactive = 0`` (the others have counts 0 and everything else null),
    which is what :func:`iter_targets` runs.

    Shape: ``window_<i>`` holds the next-window rows of first hop ``i`` and, left-joined
    onto each, the rows that the "out" hops of its paths reach (a fact row references one
    dimension row or none, so every path made of "out" hops after the first is read off
    the window's rows: ``count`` of the dimension's key is the path's row count, and nulls
    drop out of every other aggregate). ``agg_<j>`` aggregates all those paths in one
    ``GROUP BY`` (``j`` is the first such path's number). A path with a later "in" hop
    (``E <- F -> K <- F'``) multiplies rows, so it gets its own ``path_<j>`` and ``agg_<j>``.
    ``mode_<j>_<k>`` counts the values of the ``k``-th column with a mode or distinct count
    among the paths of ``agg_<j>`` and derives both from those counts. An "out" hop relies
    on the primary key of its table being unique (RelBench's 0..n-1 keys are), as a join on
    it does.
    """
    defs = list(defs)
    validate_targets(schema_tables, defs, entity_table)
    entity = schema_tables[entity_table]
    next_window = interval_sql(timedelta)
    ts = quote(timestamps_relation)

    paths = paths_of(defs)
    first_hops = list(dict.fromkeys(p[0] for p in paths))
    prefix = _cte_prefix(schema_tables)
    window_of = {hop: f"{prefix}window_{i}" for i, hop in enumerate(first_hops, 1)}
    path_of = {p: j for j, p in enumerate(paths, 1)}
    defs_of = {p: [d for d in defs if d.path == p] for p in paths}
    hop1_time = {h: schema_tables[h.table].time_col for h in first_hops}

    # What each window selects: (expression, alias or None); and where each path's values are.
    window_items: dict[Hop, list[tuple[str, str | None]]] = {
        h: [
            (f"ts.{quote(TIMESTAMP)}", _SEED_TIME),
            (f"f.{quote(h.via)}", None),
            (f"f.{quote(hop1_time[h])}", None),
        ]
        for h in first_hops
    }
    window_joins: dict[Hop, list[str]] = {h: [] for h in first_hops}
    dim_alias: dict[Hop, dict[tuple[Hop, ...], str]] = {h: {} for h in first_hops}
    value_of: dict[
        tuple[tuple[Hop, ...], str | None], str
    ] = {}  # (path, column or None) -> column of its rows

    def keep(hop: Hop, expr: str, alias: str | None = None) -> None:
        if (expr, alias) not in window_items[hop]:
            window_items[hop].append((expr, alias))

    for p in paths:
        h, j = p[0], path_of[p]
        if len(p) == 1:
            value_of[(p, None)] = "*"
            for d in defs_of[p]:
                if d.column is not None:
                    keep(h, f"f.{quote(d.column)}")
                    value_of[(p, d.column)] = quote(d.column)
        elif _out_only(p):
            # LEFT JOIN the dimension rows of this path onto the window (once per chain of hops).
            prev = "f"
            for k in range(2, len(p) + 1):
                hop, chain = p[k - 1], p[1:k]
                if chain not in dim_alias[h]:
                    alias, spec = f"h{j}_{k}", schema_tables[hop.table]
                    dim_alias[h][chain] = alias
                    window_joins[h].append(
                        f"LEFT JOIN {quote(hop.table)} AS {alias}  {_comment(_describe(entity_table, p[:k]))}\n"
                        f"    ON {alias}.{quote(spec.pkey)} = {prev}.{quote(hop.via)}"
                    )
                prev = dim_alias[h][chain]
            last_pkey = schema_tables[p[-1].table].pkey
            row_col = quote(f"tve.path_{j}")
            keep(h, f"{prev}.{quote(last_pkey)}", row_col)
            value_of[(p, None)] = row_col
            for d in defs_of[p]:
                if d.column is not None and (p, d.column) not in value_of:
                    col = quote(f"tve.path_{j}.{d.column}")
                    keep(h, f"{prev}.{quote(d.column)}", col)
                    value_of[(p, d.column)] = col
        else:
            # Read by its path CTE: the key that the second hop starts from.
            keep(
                h, f"f.{quote(schema_tables[h.table].pkey if p[1].direction == 'in' else p[1].via)}"
            )
            value_of[(p, None)] = "*"
            for d in defs_of[p]:
                if d.column is not None:
                    value_of[(p, d.column)] = quote(d.column)

    ctes: list[tuple[str, str, str]] = []  # (name, comment, body)

    # seed: the entities that exist at each seed time (dense shape only).
    if dense:
        e_items = [(f"ts.{quote(TIMESTAMP)}", _SEED_TIME), (f"e.{quote(entity.pkey)}", _ENTITY)]
        if entity.time_col is None:
            seed_from = f"FROM {ts} AS ts\n  CROSS JOIN {quote(entity_table)} AS e"
        else:
            seed_from = (
                f"FROM {ts} AS ts\n  JOIN {quote(entity_table)} AS e"
                f" ON e.{quote(entity.time_col)} <= ts.{quote(TIMESTAMP)}"
            )
        ctes.append(
            (
                f"{prefix}seed",
                f"{entity_table} rows that exist at each seed time",
                f"SELECT {_select(e_items, '         ')}\n  {seed_from}\n"
                f"  WHERE e.{quote(entity.pkey)} IS NOT NULL",
            )
        )

    # window_<i>: first-hop fact rows in the next window (t, t + Δ] of each seed time,
    # with the rows their "out" paths reach.
    for hop, name in window_of.items():
        time = f"f.{quote(hop1_time[hop])}"
        body = (
            f"SELECT {_select(window_items[hop], '         ')}\n"
            f"  FROM {ts} AS ts\n"
            f"  JOIN {quote(hop.table)} AS f\n"
            f"    ON {time} >  ts.{quote(TIMESTAMP)}\n"
            f"   AND {time} <= ts.{quote(TIMESTAMP)} + {next_window}\n"
            + "".join(f"  {line}\n" for line in window_joins[hop])
            + f"  WHERE f.{quote(hop.via)} IS NOT NULL"
        )
        ctes.append((name, f"next window: {hop.table} rows via {hop.table}.{hop.via}", body))

    # Groups of paths aggregated together: per first hop, the paths read off its window;
    # then each path with a later "in" hop on its own.
    groups: list[
        tuple[int, str, str, list[tuple[Hop, ...]]]
    ] = []  # (j, rows relation, entity column, paths)
    for h in first_hops:
        member = [p for p in paths if p[0] == h and _out_only(p)]
        if member:
            groups.append((path_of[member[0]], window_of[h], quote(h.via), member))
    for p in paths:
        if _out_only(p):
            continue
        j, last = path_of[p], f"h{len(p)}"
        values = list(dict.fromkeys(d.column for d in defs_of[p] if d.column is not None))
        items = [(f"h1.{_SEED_TIME}", _SEED_TIME), (f"h1.{quote(p[0].via)}", _ENTITY)]
        items += [(f"{last}.{quote(c)}", None) for c in values]
        lines = [f"FROM {window_of[p[0]]} AS h1"]
        time1 = f"h1.{quote(hop1_time[p[0]])}"
        for k, hop in enumerate(p[1:], 2):
            prev, cur, spec = f"h{k - 1}", f"h{k}", schema_tables[hop.table]
            if hop.direction == "out":
                cond = f"{cur}.{quote(spec.pkey)} = {prev}.{quote(hop.via)}"
            else:
                prev_table = p[k - 2].table
                cond = f"{cur}.{quote(hop.via)} = {prev}.{quote(schema_tables[prev_table].pkey)}"
                if spec.time_col is not None:
                    cond += f"\n   AND {cur}.{quote(spec.time_col)} <= {time1}"
            lines.append(f"JOIN {quote(hop.table)} AS {cur}\n    ON {cond}")
        ctes.append(
            (
                f"{prefix}path_{j}",
                _describe(entity_table, p),
                f"SELECT {_select(items, '         ')}\n  " + "\n  ".join(lines),
            )
        )
        groups.append((j, f"{prefix}path_{j}", _ENTITY, [p]))

    # agg_<j> and mode_<j>_<k> per group; remember which CTE holds each target.
    output_of: dict[str, str] = {}  # target name -> alias of the CTE that holds it
    joins: list[tuple[str, str]] = []  # (cte name, alias) joined onto the active pairs
    first_hop_aggs: list[str] = []  # agg CTEs whose groups are exactly a first hop's active pairs
    for j, rows, ent, members in groups:
        agg_items = [(_SEED_TIME, None), (ent, None if ent == _ENTITY else _ENTITY)]
        for p in members:
            for d in defs_of[p]:
                if d.aggregation not in _VALUE_AGGREGATIONS:
                    agg_items.append((_aggregate_sql(d, value_of[(p, d.column)]), quote(d.name)))
        describe = ", ".join(_describe(entity_table, p) for p in members)
        ctes.append(
            (
                f"{prefix}agg_{j}",
                f"aggregates of {describe}",
                f"SELECT {_select(agg_items, '         ')}\n"
                f"  FROM {rows}\n  GROUP BY {_SEED_TIME}, {ent}",
            )
        )
        joins.append((f"{prefix}agg_{j}", f"a{j}"))
        if rows in window_of.values():
            first_hop_aggs.append(f"{prefix}agg_{j}")
        value_defs: dict[tuple[tuple[Hop, ...], str], list[TargetDef]] = {}
        for p in members:
            for d in defs_of[p]:
                if d.aggregation in _VALUE_AGGREGATIONS:
                    value_defs.setdefault((p, d.column), []).append(d)
                else:
                    output_of[d.name] = f"a{j}"
        for k, ((p, column), cdefs) in enumerate(value_defs.items(), 1):
            # One count per distinct value of the column, then the most frequent and how many.
            # (One CTE per column: folding them into one GROUPING SETS pass keeps every
            # column's states alive at once and spills far more under the memory limit.)
            col = value_of[(p, column)]
            value_items = [(_SEED_TIME, None), (_ENTITY, None)]
            for d in cdefs:
                if d.aggregation == "mode":
                    value_items.append(
                        ('first("value" ORDER BY "n" DESC, "value" ASC)', quote(d.name))
                    )
                else:
                    value_items.append(("count(*)", quote(d.name)))
                output_of[d.name] = f"m{j}_{k}"
            body = (
                f"SELECT {_select(value_items, '         ')}\n"
                f'  FROM (SELECT {_SEED_TIME}, {ent} AS {_ENTITY}, {col} AS "value", count(*) AS "n"\n'
                f"        FROM {rows} WHERE {col} IS NOT NULL\n"
                f"        GROUP BY {_SEED_TIME}, {ent}, {col})\n"
                f"  GROUP BY {_SEED_TIME}, {_ENTITY}"
            )
            what = " and ".join(
                "most frequent value (ties -> smallest)"
                if d.aggregation == "mode"
                else "distinct values"
                for d in cdefs
            )
            ctes.append(
                (
                    f"{prefix}mode_{j}_{k}",
                    f"{_describe(entity_table, p)}, column {column}: {what}",
                    body,
                )
            )
            joins.append((f"{prefix}mode_{j}_{k}", f"m{j}_{k}"))

    # The active pairs: those of the one first hop's aggregate when that says it all, else
    # the distinct pairs of every window.
    on = "{a}." + _SEED_TIME + " = {b}." + _SEED_TIME + " AND {a}." + _ENTITY + " = {b}." + _ENTITY
    if len(first_hops) == 1 and first_hop_aggs:
        base_name, base_alias = (
            first_hop_aggs[0],
            joins[[n for n, _ in joins].index(first_hop_aggs[0])][1],
        )
        joins = [(n, a) for n, a in joins if n != base_name]
    else:
        active_parts = [
            f"SELECT {_SEED_TIME}, {quote(h.via)} AS {_ENTITY} FROM {window_of[h]}"
            for h in first_hops
        ]
        ctes.append(
            (
                f"{prefix}active",
                "entities with any next-window row",
                "SELECT DISTINCT * FROM (\n    "
                + "\n    UNION ALL\n    ".join(active_parts)
                + "\n  )",
            )
        )
        base_name, base_alias = f"{prefix}active", "act"

    # vector: the task vector of every active (seed time, entity) pair.
    v_items = [(f"{base_alias}.{_SEED_TIME}", _SEED_TIME), (f"{base_alias}.{_ENTITY}", _ENTITY)]
    for d in defs:
        src = f"{output_of[d.name]}.{quote(d.name)}"
        v_items.append(
            (f"coalesce({src}, 0)" if d.aggregation in COUNT_AGGREGATIONS else src, quote(d.name))
        )
    v_from = [f"FROM {base_name} AS {base_alias}"]
    v_from += [
        f"LEFT JOIN {name} AS {alias}\n    ON {on.format(a=alias, b=base_alias)}"
        for name, alias in joins
    ]
    ctes.append(
        (
            f"{prefix}vector",
            "task vectors of the active pairs",
            f"SELECT {_select(v_items, '         ')}\n  " + "\n  ".join(v_from),
        )
    )

    # Which CTEs are read more than once: materialise those (computed once, not inlined).
    def readers(name: str) -> int:
        return sum(len(re.findall(rf"\b{re.escape(name)}\b", body)) for _, _, body in ctes)

    if dense:
        final = [
            (f"s.{_ENTITY}", quote(entity.pkey)),
            (f"s.{_SEED_TIME}", quote(TIMESTAMP)),
            (f"CASE WHEN v.{_ENTITY} IS NULL THEN 1 ELSE 0 END", quote(INACTIVE)),
        ]
        for d in defs:
            src = f"v.{quote(d.name)}"
            final.append(
                (
                    f"coalesce({src}, 0)" if d.aggregation in COUNT_AGGREGATIONS else src,
                    quote(d.name),
                )
            )
        from_lines = [
            f"FROM {prefix}seed AS s",
            f"LEFT JOIN {prefix}vector AS v ON {on.format(a='v', b='s')}",
        ]
    else:
        final = [
            (f"v.{_ENTITY}", quote(entity.pkey)),
            (f"v.{_SEED_TIME}", quote(TIMESTAMP)),
            ("0", quote(INACTIVE)),
        ]
        final += [(f"v.{quote(d.name)}", quote(d.name)) for d in defs]
        exists = f"e.{quote(entity.pkey)} = v.{_ENTITY}"
        if entity.time_col is not None:
            exists += f" AND e.{quote(entity.time_col)} <= v.{_SEED_TIME}"
        from_lines = [
            f"FROM {prefix}vector AS v",
            f"JOIN {quote(entity_table)} AS e ON {exists}  {_comment('entities that exist at the seed time')}",
        ]

    blocks = []
    for name, comment, body in ctes:
        materialized = " MATERIALIZED" if readers(name) > 1 else ""
        blocks.append(f"{name} AS{materialized} (  {_comment(comment)}\n  {body}\n)")
    return (
        "WITH\n" + ",\n".join(blocks) + "\n"
        f"SELECT {_select(final, '       ')}\n" + "\n".join(from_lines) + "\nORDER BY 2, 1\n"
    )


# --------------------------------------------------------------------------- running it


def _seed_times_frame(timestamps: Iterable) -> pd.DataFrame:
    seed_times = pd.to_datetime(pd.Series(list(timestamps), dtype=object))
    if seed_times.isna().any():
        raise ValueError("seed times may not be null")
    seed_times = seed_times.drop_duplicates().sort_values(ignore_index=True)
    return pd.DataFrame({TIMESTAMP: seed_times.astype("datetime64[us]")})


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
def _connection(
    tables: Mapping[str, Any],
    used: Iterable[str],
    seed_times: pd.DataFrame,
    relation: str,
    *,
    memory_limit: str,
    threads: int | None,
    temp_directory: str | None,
):
    """An in-memory DuckDB with the used tables (frames, Arrow tables or parquet files) and the seed times."""
    import duckdb

    own_temp = temp_directory is None
    temp_dir = tempfile.mkdtemp(prefix="tve-duckdb-") if own_temp else temp_directory
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = {_literal(memory_limit)}")
        con.execute(f"SET temp_directory = {_literal(temp_dir)}")
        con.execute("SET preserve_insertion_order = false")  # the query orders its result itself
        if threads is not None:
            con.execute(f"SET threads = {int(threads)}")
        for name in used:
            source = tables[name]
            if isinstance(source, (str, os.PathLike)):
                path = Path(source)
                if not path.exists():
                    raise ValueError(f"table {name!r}: no file {path}")
                con.execute(
                    f"CREATE VIEW {quote(name)} AS SELECT * FROM read_parquet({_literal(str(path))})"
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
    """A DuckDB relation as an Arrow table (``to_arrow_table`` since DuckDB 1.4, ``arrow`` before)."""
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


def _entity_keys(
    con, schema_tables, entity_table: str
) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """(pkeys sorted, their times or None, the Arrow type of the pkey) of the entity table."""
    spec = schema_tables[entity_table]
    cols = quote(spec.pkey) + ("" if spec.time_col is None else f", {quote(spec.time_col)}")
    arrow = _arrow_table(
        con.sql(
            f"SELECT {cols} FROM {quote(entity_table)} WHERE {quote(spec.pkey)} IS NOT NULL ORDER BY 1"
        )
    )
    keys = arrow.column(0).to_numpy()
    if len(keys) > 1 and not (keys[1:] != keys[:-1]).all():
        raise ValueError(
            f"entity table {entity_table!r}: primary key {spec.pkey!r} has duplicate values"
        )
    times = None
    if spec.time_col is not None:
        times = arrow.column(1).to_numpy(zero_copy_only=False)
        if not np.issubdtype(times.dtype, np.datetime64):
            raise ValueError(
                f"entity table {entity_table!r}: time column {spec.time_col!r} is not a timestamp column"
            )
    return keys, times, arrow.schema.field(0).type


def _chunks(seed_times: pd.DataFrame, per_query: int | None) -> list[pd.DataFrame]:
    """Consecutive groups of seed times, as even as possible, at most ``per_query`` each."""
    n = len(seed_times)
    if n == 0:
        return []
    k = 1 if not per_query or per_query >= n else -(-n // per_query)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [
        seed_times.iloc[lo:hi].reset_index(drop=True)
        for lo, hi in zip(bounds, bounds[1:])
        if hi > lo
    ]


def _prefetch(con, sql: str, relation: str, chunks: list[pd.DataFrame], depth: int = 1) -> Iterator:
    """Run ``sql`` once per group of seed times on a background thread, one group ahead.

    Yields each group's result as an Arrow table while the next one is being computed
    (DuckDB releases the GIL), so the caller's work on a group overlaps the query of the
    next. The connection is only ever used by that thread while the iterator runs.
    """
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for chunk in chunks:
                con.register(relation, chunk)
                if not put(_arrow_table(con.sql(sql))):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=work, name="tve-targets-query", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _spread(values, pos: np.ndarray, n: int, count: bool):
    """An Arrow column of ``n`` rows with ``values`` at ``pos``: 0 elsewhere for a count, else null.

    Fixed-width numbers are scattered with NumPy into a zeroed buffer, with a validity
    bitmap packed from a boolean mask (much cheaper than a ``take`` with null indices, and
    this runs for every column of every slice); other types use ``take``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = values.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        out = np.zeros(n, dtype=kind.to_pandas_dtype())
        if values.null_count == 0:
            out[pos] = values.to_numpy()
            if count:
                return pa.array(out, type=kind)
            valid = np.zeros(n, dtype=bool)
            valid[pos] = True
        else:
            out[pos] = pc.fill_null(values, 0).to_numpy()
            if count:
                return pa.array(out, type=kind)
            valid = np.zeros(n, dtype=bool)
            valid[pos] = pc.is_valid(values).to_numpy(zero_copy_only=False)
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
        return pa.Array.from_buffers(
            kind, n, [bitmap, pa.py_buffer(out)], null_count=n - int(valid.sum())
        )
    idx = np.full(n, -1, dtype=np.int64)
    idx[pos] = np.arange(len(pos))
    column = values.take(pa.array(idx, mask=idx < 0))
    return pc.fill_null(column, 0) if count else column


def iter_targets(
    tables: Mapping[str, Any],
    schema_tables: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    timestamps: Iterable,
    timedelta: pd.Timedelta,
    *,
    memory_limit: str = "4GB",
    threads: int | None = None,
    temp_directory: str | None = None,
    show_sql: bool = False,
    slice_rows: int = DEFAULT_SLICE_ROWS,
    seeds_per_query: int | None = DEFAULT_SEEDS_PER_QUERY,
) -> Iterator:
    """The raw task vectors as Arrow tables, in (timestamp, pkey) order, a slice at a time.

    Yields one ``pyarrow.Table`` per seed time and slice of at most ``slice_rows``
    existing entities (none for a seed time at which no entity exists); together they are
    :func:`compute_targets`' rows. The first one yielded carries the full schema; when
    there is no row at all, a single empty table with that schema is yielded.
    ``tables`` maps a table name to a pandas frame, an Arrow table or a parquet file path.

    The (sparse) query runs once per group of at most ``seeds_per_query`` consecutive seed
    times (None: all in one), set-based within each group, on a background thread one
    group ahead: DuckDB's working set (the active pairs of a group) stays well inside its
    memory limit instead of spilling, and filling in and writing one group's rows
    overlaps computing the next. At 10 million orders x 52 weekly seed times, four groups
    take about two thirds of the time of one.
    """
    import pyarrow as pa

    defs = list(defs)
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be positive, got {slice_rows}")
    seed_times = _seed_times_frame(timestamps)
    relation = "timestamps" if "timestamps" not in schema_tables else "tve.timestamps"
    sql = targets_sql(
        schema_tables, defs, entity_table, timedelta, timestamps_relation=relation, dense=False
    )
    if show_sql:
        print(sql)
    used = {entity_table} | {hop.table for d in defs for hop in d.path}
    missing = sorted(used - set(tables))
    if missing:
        raise ValueError(f"no data for tables {missing}")
    pkey = schema_tables[entity_table].pkey
    counts = {d.name for d in defs if d.aggregation in COUNT_AGGREGATIONS}

    with _connection(
        tables,
        used,
        seed_times,
        relation,
        memory_limit=memory_limit,
        threads=threads,
        temp_directory=temp_directory,
    ) as con:
        _check_inputs(con, tables, defs, used)
        keys, key_times, key_type = _entity_keys(con, schema_tables, entity_table)
        groups = _chunks(seed_times, seeds_per_query) or [
            seed_times
        ]  # no seed time: still one query, for the schema
        results = _prefetch(con, sql, relation, groups)
        schema = None
        empty = True
        try:
            for group, rows in zip(groups, results):
                if schema is None:
                    fields = [
                        pa.field(pkey, key_type),
                        pa.field(TIMESTAMP, pa.timestamp("us")),
                        pa.field(INACTIVE, pa.int64()),
                    ]
                    schema = pa.schema(fields + [rows.schema.field(d.name) for d in defs])
                times = rows.column(1).to_numpy()
                used_rows = 0
                for t in group[TIMESTAMP].to_numpy():
                    first, last = (
                        np.searchsorted(times, t, side="left"),
                        np.searchsorted(times, t, side="right"),
                    )
                    at_t = rows.slice(first, last - first)
                    used_rows += at_t.num_rows
                    exist = keys if key_times is None else keys[key_times <= t]
                    ent = at_t.column(0).to_numpy()
                    when = np.datetime64(t, "us")
                    if at_t.num_rows and len(exist) == 0:
                        raise AssertionError("active rows at a seed time at which no entity exists")
                    for start in range(0, len(exist), slice_rows):
                        chunk = exist[start : start + slice_rows]
                        lo = int(np.searchsorted(ent, chunk[0], side="left"))
                        hi = int(np.searchsorted(ent, chunk[-1], side="right"))
                        pos = np.searchsorted(chunk, ent[lo:hi])
                        if hi > lo and (
                            pos.max() >= len(chunk) or not (chunk[pos] == ent[lo:hi]).all()
                        ):
                            raise AssertionError(
                                "an active row of an entity that does not exist at its seed time"
                            )
                        part = at_t.slice(lo, hi - lo)
                        inactive = np.ones(len(chunk), dtype=np.int64)
                        inactive[pos] = 0
                        columns = [
                            pa.array(chunk, type=key_type),
                            pa.array(np.full(len(chunk), when)),
                            pa.array(inactive),
                        ]
                        for d in defs:
                            columns.append(
                                _spread(part.column(d.name), pos, len(chunk), d.name in counts)
                            )
                        empty = False
                        yield pa.Table.from_arrays(columns, schema=schema)
                if used_rows != rows.num_rows:
                    raise AssertionError("active rows at a time that is not a seed time")
        finally:
            results.close()
        if empty:
            yield schema.empty_table()


def _to_frame(table, defs: Sequence[TargetDef]) -> pd.DataFrame:
    """Arrow rows -> pandas: counts int64, numeric aggregates float64, a text (or all-null) mode object.

    A mode of a text column is ``object`` whether or not a value was seen (DuckDB types an
    all-null object column as NULL, one with strings as VARCHAR), so that the dtype of a
    target never depends on rows its definition does not read.
    """
    import pyarrow as pa

    out = table.to_pandas()
    out[INACTIVE] = out[INACTIVE].astype("int64")
    for d in defs:
        if d.aggregation in COUNT_AGGREGATIONS:
            out[d.name] = out[d.name].astype("int64")
        elif d.aggregation in NUMERIC_AGGREGATIONS:
            out[d.name] = out[d.name].astype("float64")
        else:
            kind = table.schema.field(d.name).type
            if pa.types.is_null(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
                out[d.name] = out[d.name].astype(object).where(out[d.name].notna(), None)
    return out


def compute_targets(
    tables: Mapping[str, Any],
    schema_tables: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    timestamps: Iterable,
    timedelta: pd.Timedelta,
    *,
    memory_limit: str = "4GB",
    threads: int | None = None,
    temp_directory: str | None = None,
    show_sql: bool = False,
    seeds_per_query: int | None = DEFAULT_SEEDS_PER_QUERY,
) -> pd.DataFrame:
    """The raw task vectors of ``entity_table`` at every seed time in ``timestamps``.

    One row per (entity, seed time) for each entity that exists at the seed time, sorted
    by (timestamp, pkey): the pkey column, ``timestamp``, ``inactive`` (int, 1 when no
    path has a next-window row) and one column per target (counts int, numeric aggregates
    float, a mode in the column's own type). ``tables`` maps a table name to a pandas
    frame, an Arrow table or a parquet file path. ``memory_limit`` caps DuckDB's memory
    (beyond it, operators spill to ``temp_directory``, a fresh temporary folder by
    default); ``threads`` None keeps DuckDB's default. For more rows than fit in memory,
    use :func:`write_targets`.
    """
    import pyarrow as pa

    defs = list(defs)
    parts = list(
        iter_targets(
            tables,
            schema_tables,
            defs,
            entity_table,
            timestamps,
            timedelta,
            memory_limit=memory_limit,
            threads=threads,
            temp_directory=temp_directory,
            show_sql=show_sql,
            seeds_per_query=seeds_per_query,
        )
    )
    return _to_frame(pa.concat_tables(parts), defs)


def _parquet_options(schema, compression: str) -> dict[str, Any]:
    """Plain-encoded numbers (a dictionary costs a hash per value and task vectors are mostly
    zeros and nulls, which snappy shrinks anyway), dictionaries for text (modes)."""
    import pyarrow as pa

    text = [
        f.name
        for f in schema
        if not (
            pa.types.is_integer(f.type)
            or pa.types.is_floating(f.type)
            or pa.types.is_timestamp(f.type)
        )
    ]
    return {"compression": compression, "use_dictionary": text}


def write_targets(
    out_path: str | os.PathLike,
    tables: Mapping[str, Any],
    schema_tables: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    timestamps: Iterable,
    timedelta: pd.Timedelta,
    *,
    memory_limit: str = "4GB",
    threads: int | None = None,
    temp_directory: str | None = None,
    show_sql: bool = False,
    slice_rows: int = DEFAULT_SLICE_ROWS,
    seeds_per_query: int | None = DEFAULT_SEEDS_PER_QUERY,
    compression: str = "snappy",
) -> dict[str, int]:
    """:func:`compute_targets`' rows streamed into one parquet file at ``out_path``, atomically.

    The file is written next to ``out_path`` under a temporary name and moved into place
    when complete (a reader sees the previous file or the new one, never a partial one).
    Rows are in (timestamp, pkey) order, one row group per seed time and slice of
    ``slice_rows`` entities; a writer thread encodes one slice while the next is built.
    Returns ``{"rows": ..., "inactive": ...}``.
    """
    import pyarrow.parquet as pq

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    stats = {"rows": 0, "inactive": 0}
    handoff: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def write() -> None:
        writer = None
        try:
            while (table := handoff.get()) is not None:
                if writer is None:
                    writer = pq.ParquetWriter(
                        tmp, table.schema, **_parquet_options(table.schema, compression)
                    )
                if table.num_rows:
                    writer.write_table(table, row_group_size=max(table.num_rows, 1))
        except BaseException as exc:  # handed back to the producer
            failure.append(exc)
            while handoff.get() is not None:  # drain so the producer never blocks
                pass
        finally:
            if writer is not None:
                writer.close()

    thread = threading.Thread(target=write, name="tve-targets-writer", daemon=True)
    thread.start()
    try:
        try:
            for table in iter_targets(
                tables,
                schema_tables,
                defs,
                entity_table,
                timestamps,
                timedelta,
                memory_limit=memory_limit,
                threads=threads,
                temp_directory=temp_directory,
                show_sql=show_sql,
                slice_rows=slice_rows,
                seeds_per_query=seeds_per_query,
            ):
                if failure:
                    break
                stats["rows"] += table.num_rows
                if table.num_rows:
                    stats["inactive"] += int(table.column(INACTIVE).to_numpy().sum())
                handoff.put(table)
        finally:
            handoff.put(None)
            thread.join()
        if failure:
            raise failure[0]
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return stats


def write_targets_by_seed_time(
    out_path_of: Callable[[pd.Timestamp], str | os.PathLike],
    tables: Mapping[str, Any],
    schema_tables: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    timestamps: Iterable,
    timedelta: pd.Timedelta,
    *,
    memory_limit: str = "4GB",
    compression: str = "snappy",
) -> dict[pd.Timestamp, dict[str, int]]:
    """:func:`compute_targets`' rows of each seed time in a parquet file of its own
    (``out_path_of(seed_time)``), from one streamed query over all of them.

    The rows come in seed-time order, so each file is written from start to end and moved
    into place, atomically, before the next begins; a failure leaves earlier files whole
    and the one being written absent. A seed time at which no entity exists gets a file
    without rows. Returns ``{seed_time: {"rows": ..., "inactive": ...}}``.
    """
    import pyarrow.parquet as pq

    stats: dict[pd.Timestamp, dict[str, int]] = {}
    state: dict[str, Any] = {"time": None, "writer": None, "tmp": None, "path": None}

    def close() -> None:
        if state["writer"] is not None:
            state["writer"].close()
            os.replace(state["tmp"], state["path"])
        state.update(time=None, writer=None, tmp=None, path=None)

    def start(t: pd.Timestamp, schema) -> None:
        path = Path(out_path_of(t))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        state.update(
            time=t,
            path=path,
            tmp=tmp,
            writer=pq.ParquetWriter(tmp, schema, **_parquet_options(schema, compression)),
        )
        stats[t] = {"rows": 0, "inactive": 0}

    times = [pd.Timestamp(t) for t in timestamps]
    schema = None
    try:
        for table in iter_targets(
            tables, schema_tables, defs, entity_table, times, timedelta, memory_limit=memory_limit
        ):
            schema = schema or table.schema
            if not table.num_rows:
                continue
            t = pd.Timestamp(table.column(TIMESTAMP)[0].as_py())
            if t != state["time"]:
                close()
                start(t, table.schema)
            state["writer"].write_table(table, row_group_size=table.num_rows)
            stats[t]["rows"] += table.num_rows
            stats[t]["inactive"] += int(table.column(INACTIVE).to_numpy().sum())
        close()
        for t in times:
            if t not in stats:  # no entity existed yet
                start(t, schema)
                close()
    except BaseException:
        if state["writer"] is not None:
            state["writer"].close()
            Path(state["tmp"]).unlink(missing_ok=True)
        raise
    return stats


def task_vector_aggregations(defs: Iterable[TargetDef]) -> dict[str, str]:
    """target name -> aggregation: what :class:`tve_pipeline.normalise.TaskVectorNormaliser` fits on."""
    return {d.name: d.aggregation for d in defs}
