"""The DuckDB query that specifies the rows: :func:`targets_sql` and :func:`targets_script`.

:func:`targets_sql` turns a list of :class:`~tve_pipeline.traversal.TargetDef` into one
set-based DuckDB query over a relation of seed times ``timestamps(timestamp)`` (as in
RelBench task SQL), never a query per seed time:

- ``window_<i>``: the rows of first hop ``E <- F`` in the next window of every seed time
  (a range join, ``t < time <= t + Δ``), with the dimension rows that the paths' "out"
  hops reach left-joined on (a fact row references one such row or none, so every path
  ``E <- F -> D ...`` made of "out" hops is read off the window's rows);
- the CTEs of a fact->key<-fact path ``E <- F -> K <- F'`` (per-key lookups of windows of
  ``F'``, :mod:`.lookup_sql`);
- ``path_<j>``: any other path with a later "in" hop (hand-written definitions: an "in"
  hop right after the first, a last table without a time column), joined row by row;
- ``agg_<j>``: per (seed time, entity), the row counts and plain aggregates of all the
  paths read off one window (or of one ``path_<j>``), in one ``GROUP BY``;
- ``mode_<j>_<k>``: per column with a mode or distinct count, one count per distinct
  value, then the most frequent (ties: the smallest) and how many;
- ``vector``: the task vectors of the active (seed time, entity) pairs, every aggregate
  left-joined onto the pairs that have a first-hop row.

Two shapes give the same rows. The *dense* one (``dense=True``, the default: printable on
its own and runnable like a RelBench task query) adds ``seed``, the reference's seeds at
each seed time (its "universal" table): with an own time column, the entities whose time
is ``<= t`` (a null time never exists); without one, those whose first row in any
first-hop fact table is ``<= t + Δ`` (:func:`_seed_cte`), and left-joins ``vector`` onto
it: a seed with an empty next window gets counts 0, every other aggregate null and
``inactive = 1``. The *sparse* one (``dense=False``) returns the active pairs of seeds
(every active pair of an entity table without time is one) in (seed time, entity) order
(what ``show_sql`` prints). :func:`_in_process` cuts the sparse one into the steps that
:func:`~tve_pipeline.targets.iter_targets` runs: the tables that read no seed time, made
once; per group of seed times each window by a query of its own, each window's aggregate
by NumPy, each other aggregate by a query; and, instead of ``vector``, an
:class:`~.plan._Assembly` of the steps' tables.

Aggregation semantics: ``count`` counts the rows reached (``column`` null) or the non-null
values; ``count_distinct`` the distinct non-null values; ``sum``, ``mean``, ``min``,
``max`` and ``std`` (sample, null for fewer than two values) are computed on the values
cast to DOUBLE; ``mode`` is the most frequent non-null value, ties broken by the smallest
value, and keeps the column's type. An "out" hop relies on its table's primary key being
unique (RelBench's 0..n-1 keys are; the entity table's is checked).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from tve_pipeline.targets.lookup_sql import (
    _running_ctes,
    _running_mode_ctes,
    _running_shape,
    _running_value_columns,
)
from tve_pipeline.targets.names import (
    _ENTITY,
    _FIRST_ACTIVITY,
    _SEED_TIME,
    COUNT_AGGREGATIONS,
    INACTIVE,
    TIMESTAMP,
    _comment,
    _describe,
    _literal,
    _select,
    quote,
)
from tve_pipeline.targets.plan import (
    _VALUE_AGGREGATIONS,
    _Assembly,
    _Cte,
    _Group,
    _NativeAggregate,
    _out_only,
    _query_plan,
    _QueryPlan,
    _value_defs,
)
from tve_pipeline.targets.query import TargetQuery, _seed_times_frame, validate_targets
from tve_pipeline.traversal import Hop, TableSpecLike, TargetDef


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


def targets_sql(
    schema_tables: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    timedelta: pd.Timedelta,
    *,
    timestamps_relation: str = "timestamps",
    dense: bool = True,
    running_aggregates: bool = True,
    second_hop_window: pd.Timedelta | None = None,
) -> str:
    """The DuckDB query computing the raw task vectors of ``entity_table`` for every seed time.

    It reads each table of the schema as a relation of the same name and the seed times as
    ``timestamps_relation(timestamp)``; output columns: the entity's pkey, ``timestamp``,
    ``inactive``, then one column per target in ``defs`` order, ordered by (timestamp,
    pkey). ``dense=True``: one row per seed (:func:`_seed_cte`); ``dense=False``: only
    the rows with ``inactive = 0`` (the others have counts 0 and everything else null),
    which is what :func:`iter_targets` runs. ``running_aggregates=False`` joins each
    first-hop row of a fact->key<-fact path to every row of its key in the second hop's
    window instead of reading per (key, time) lookups (same rows; the benchmarks'
    straightforward baseline).
    ``second_hop_window``: Δ2, the window ``(τ - Δ2, τ]`` of a hop-1 row's time τ that a
    later "in" hop reads (None: ``timedelta``, as the reference).

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

    Each step below writes one kind of CTE: :func:`_seed_cte`, :func:`_window_cte` (with
    :class:`_WindowColumns`), :func:`_path_cte`, :func:`_agg_cte` and :func:`_value_cte`,
    :func:`_active_pairs`, :func:`_vector_cte`, then :func:`_final_select`.
    """
    ctes, final, from_lines, _ = _targets_ctes(
        schema_tables,
        defs,
        entity_table,
        timedelta,
        timestamps_relation,
        dense,
        running_aggregates,
        second_hop_window=second_hop_window,
    )
    return _with_query(ctes, final, from_lines)


def _split_once(
    schema_tables: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    timedelta: pd.Timedelta,
    *,
    timestamps_relation: str = "timestamps",
    dense: bool = True,
    running_aggregates: bool = True,
    second_hop_window: pd.Timedelta | None = None,
) -> tuple[list[_Cte], str]:
    """:func:`targets_sql` in two parts: each CTE that reads no seed time (the per-key
    lookups of fact->key<-fact paths), to create as a table once, and the query
    over the rest, which reads them by name (what ``show_sql`` prints)."""
    ctes, final, from_lines, _ = _targets_ctes(
        schema_tables,
        defs,
        entity_table,
        timedelta,
        timestamps_relation,
        dense,
        running_aggregates,
        second_hop_window=second_hop_window,
    )
    tables = [cte for cte in ctes if cte.once]
    return tables, _with_query([cte for cte in ctes if not cte.once], final, from_lines)


def _in_process(
    schema_tables: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    timedelta: pd.Timedelta,
    *,
    timestamps_relation: str,
    running_aggregates: bool,
    second_hop_window: pd.Timedelta | None = None,
) -> tuple[list[_Cte], list[_Cte], _Assembly]:
    """What :func:`iter_targets` runs: the tables to create once (as :func:`_split_once`);
    the steps of each group of seed times, in order: each window by its query (a
    temporary table under its name for the queries that read it), each window's aggregate
    by NumPy (:class:`_NativeAggregate`), each other aggregate (of fact->key<-fact paths,
    and each ``aggs_<j>`` of a ``path_<j>``) by a query of its own (``WITH`` what it reads
    ``SELECT *``); and how :func:`_assemble` puts
    the steps' pairs and columns together."""
    ctes, _, _, assembly = _targets_ctes(
        schema_tables,
        defs,
        entity_table,
        timedelta,
        timestamps_relation,
        False,
        running_aggregates,
        native=True,
        second_hop_window=second_hop_window,
    )
    tables = [cte for cte in ctes if cte.once]
    steps = [cte for cte in ctes if cte.fetched or isinstance(cte.native, _NativeAggregate)]
    rest = [cte for cte in ctes if not cte.once and cte not in steps]
    sources = {name for _, name in assembly.sources} - {step.name for step in steps}
    for cte in rest:
        if cte.name in sources:
            body = _with_query(rest, [("*", None)], [f"FROM {cte.name}"], order=False)
            steps.append(cte._replace(body=body, fetched=True))
    return tables, steps, assembly


def _targets_ctes(
    schema_tables: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    timedelta: pd.Timedelta,
    timestamps_relation: str,
    dense: bool,
    running_aggregates: bool,
    native: bool = False,
    second_hop_window: pd.Timedelta | None = None,
) -> tuple[list[_Cte], list[tuple[str, str | None]], list[str], _Assembly | None]:
    """The CTEs of :func:`targets_sql`, its output columns and its ``FROM`` lines.

    ``native``: the in-process shape of :func:`iter_targets`: windows ``fetched`` (made by a
    query of their own per group of seed times), the ``agg_<j>`` of a window with its
    ``mode_<j>_<k>`` replaced by one :class:`_NativeAggregate` (NumPy, per group), that of
    a ``path_<j>`` joined to its modes in one ``aggs_<j>``, and no ``vector`` or output
    columns: an :class:`_Assembly` instead."""
    defs = list(defs)
    validate_targets(schema_tables, defs, entity_table)
    plan = _query_plan(
        schema_tables, defs, entity_table, timedelta, timestamps_relation, second_hop_window
    )
    columns = _WindowColumns.of(plan)

    ctes = [_seed_cte(plan)] if dense else []
    ctes += [_window_cte(plan, hop, columns)._replace(fetched=native) for hop in plan.first_hops]
    later_in = [p for p in plan.paths if not _out_only(p)]
    running = [p for p in later_in if running_aggregates and _running_shape(plan, p)]
    joined = [p for p in later_in if p not in running]
    ctes += [_path_cte(plan, p) for p in joined]

    output_of: dict[str, str] = {}  # target name -> alias of the CTE that holds it
    joins: list[tuple[str, str]] = []  # (CTE name, alias) joined onto the active pairs
    windows = {plan.window_of(h) for h in plan.first_hops}
    parts = [_running_parts(plan, p) for p in running]
    parts += [
        _group_parts(plan, group, columns.value_of, native, windows)
        for group in _aggregation_groups(plan, joined)
    ]
    for more, more_joins, more_outputs in parts:
        ctes += more
        joins += more_joins
        output_of.update(more_outputs)

    if native:  # no vector: :func:`_assemble` puts the sources together in process
        return ctes, [], [], _native_assembly(plan, joins, output_of)
    active, base, joins = _active_pairs(plan, joins)
    ctes += [active] if active is not None else []
    ctes.append(_vector_cte(plan, base, joins, output_of))
    return (ctes, *_final_select(plan, dense), None)


#: The CTEs of some paths, the (CTE name, alias) of each that joins onto the active pairs,
#: and the alias of the CTE that holds each of their targets.
_Parts = tuple[list[_Cte], list[tuple[str, str]], dict[str, str]]


def _running_parts(plan: _QueryPlan, p: tuple[Hop, ...]) -> _Parts:
    """The parts of a fact->key<-fact path by lookups: :func:`_running_ctes` up to its
    ``agg_<j>``, then per value column :func:`_running_mode_ctes` up to its
    ``mode_<j>_<k>``."""
    j = plan.path_number(p)
    ctes = _running_ctes(plan, p)
    joins = [(ctes[-1].name, f"a{j}")]
    output_of = {
        d.name: f"a{j}" for d in plan.defs_of(p) if d.aggregation not in _VALUE_AGGREGATIONS
    }
    for k, column in enumerate(_running_value_columns(plan, p), 1):
        ctes += _running_mode_ctes(plan, p, k, column)
        joins.append((ctes[-1].name, f"m{j}_{k}"))
        output_of.update({d.name: f"m{j}_{k}" for d in _value_defs(plan, p, column)})
    return ctes, joins, output_of


def _group_parts(
    plan: _QueryPlan,
    group: _Group,
    value_of: Mapping[tuple[tuple[Hop, ...], str | None], str],
    native: bool,
    windows: set[str],
) -> _Parts:
    """The parts of the paths aggregated together (:func:`_aggregation_groups`): their
    ``agg_<j>`` and a ``mode_<j>_<k>`` per value column; in the in-process shape
    (``native``), a window's one :class:`~.plan._NativeAggregate` instead, and a
    ``path_<j>``'s also joined to its modes in one ``aggs_<j>``."""
    group_defs = [d for p in group.paths for d in plan.defs_of(p)]
    if native and group.rows in windows:
        cte = _native_aggregate(plan, group, value_of)
        return [cte], [(cte.name, f"a{group.j}")], {d.name: f"a{group.j}" for d in group_defs}
    ctes = [_agg_cte(plan, group, value_of)]
    joins = [(ctes[-1].name, f"a{group.j}")]
    output_of = {}
    for p in group.paths:
        for d in plan.defs_of(p):
            if d.aggregation not in _VALUE_AGGREGATIONS:
                output_of[d.name] = f"a{group.j}"
    for k, (path, column) in enumerate(_value_columns(plan, group), 1):
        ctes.append(_value_cte(plan, group, k, path, column, value_of))
        joins.append((ctes[-1].name, f"m{group.j}_{k}"))
        output_of.update({d.name: f"m{group.j}_{k}" for d in _value_defs(plan, path, column)})
    if native:  # a path_<j> (its rows multiply): aggregated by DuckDB as they stream,
        # in one query with its modes, so that the path is joined once
        together = _together_cte(plan, group, ctes, output_of)
        ctes.append(together)
        joins.append((together.name, f"t{group.j}"))
        output_of.update({d.name: f"t{group.j}" for d in group_defs})
    return ctes, joins, output_of


def _native_assembly(
    plan: _QueryPlan, joins: list[tuple[str, str]], output_of: Mapping[str, str]
) -> _Assembly:
    """How :func:`~.assemble._assemble` puts the in-process shape's steps together (it has
    no ``vector``): the active pairs are those of the one first hop's aggregate when it
    says it all, else of every window; each target comes from the CTE that holds it."""
    name_of = dict((alias, name) for name, alias in joins)
    out_paths = [p for p in plan.paths if _out_only(p)]
    base = None
    if len(plan.first_hops) == 1 and out_paths:  # its pairs are the window's
        base = f"{plan.prefix}agg_{plan.path_number(out_paths[0])}"
    return _Assembly(
        windows=tuple(plan.window_of(h) for h in plan.first_hops),
        base=base,
        sources=tuple((d.name, name_of[output_of[d.name]]) for d in plan.defs),
    )


class _WindowColumns:
    """What each ``window_<i>`` selects and left-joins, and where each path's values are.

    ``items[hop]``: (expression, alias or None) of window ``hop``; ``joins[hop]``: its
    LEFT JOINs of dimension rows, one per chain of "out" hops; ``value_of[(path, column)]``:
    the column of the path's rows holding ``column`` (``None``: the rows themselves, read
    as ``*`` or as the key of the last table, null when the chain reaches no row).
    """

    def __init__(self, plan: _QueryPlan) -> None:
        self.items: dict[Hop, list[tuple[str, str | None]]] = {
            h: [
                (f"ts.{quote(TIMESTAMP)}", _SEED_TIME),
                (f"f.{quote(h.via)}", None),
                (f"f.{quote(plan.hop1_time(h))}", None),
            ]
            for h in plan.first_hops
        }
        self.joins: dict[Hop, list[str]] = {h: [] for h in plan.first_hops}
        self.value_of: dict[tuple[tuple[Hop, ...], str | None], str] = {}
        self._dim_alias: dict[Hop, dict[tuple[Hop, ...], str]] = {h: {} for h in plan.first_hops}

    @classmethod
    def of(cls, plan: _QueryPlan) -> _WindowColumns:
        columns = cls(plan)
        for p in plan.paths:
            if len(p) == 1:
                columns._first_hop_path(plan, p)
            elif _out_only(p):
                columns._out_path(plan, p)
            else:
                columns._later_in_path(plan, p)
        return columns

    def _keep(self, hop: Hop, expr: str, alias: str | None = None) -> None:
        if (expr, alias) not in self.items[hop]:
            self.items[hop].append((expr, alias))

    def _first_hop_path(self, plan: _QueryPlan, p: tuple[Hop, ...]) -> None:
        """``E <- F``: the window's own rows and columns."""
        self.value_of[(p, None)] = "*"
        for d in plan.defs_of(p):
            if d.column is not None:
                self._keep(p[0], f"f.{quote(d.column)}")
                self.value_of[(p, d.column)] = quote(d.column)

    def _out_path(self, plan: _QueryPlan, p: tuple[Hop, ...]) -> None:
        """``E <- F -> D ...``: LEFT JOIN the dimension rows of the path onto the window
        (once per chain of hops), and select their key and the columns it aggregates."""
        h, j = p[0], plan.path_number(p)
        prev = "f"
        for k in range(2, len(p) + 1):
            hop, chain = p[k - 1], p[1:k]
            if chain not in self._dim_alias[h]:
                alias, spec = f"h{j}_{k}", plan.schema_tables[hop.table]
                self._dim_alias[h][chain] = alias
                self.joins[h].append(
                    f"LEFT JOIN {quote(hop.table)} AS {alias}"
                    f"  {_comment(_describe(plan.entity_table, p[:k]))}\n"
                    f"    ON {alias}.{quote(spec.pkey)} = {prev}.{quote(hop.via)}"
                )
            prev = self._dim_alias[h][chain]
        last_pkey = plan.schema_tables[p[-1].table].pkey
        row_col = quote(f"tve.path_{j}")
        self._keep(h, f"{prev}.{quote(last_pkey)}", row_col)
        self.value_of[(p, None)] = row_col
        for d in plan.defs_of(p):
            if d.column is not None and (p, d.column) not in self.value_of:
                col = quote(f"tve.path_{j}.{d.column}")
                self._keep(h, f"{prev}.{quote(d.column)}", col)
                self.value_of[(p, d.column)] = col

    def _later_in_path(self, plan: _QueryPlan, p: tuple[Hop, ...]) -> None:
        """``E <- F -> K <- F'``: read by its ``path_<j>``, from the key that hop 2 starts at."""
        h = p[0]
        start = plan.schema_tables[h.table].pkey if p[1].direction == "in" else p[1].via
        self._keep(h, f"f.{quote(start)}")
        self.value_of[(p, None)] = "*"
        for d in plan.defs_of(p):
            if d.column is not None:
                self.value_of[(p, d.column)] = quote(d.column)


def _first_activity_sql(
    schema_tables: Mapping[str, TableSpecLike], first_hops: Sequence[Hop], indent: str = ""
) -> str:
    """Each entity's first activity: the time of its earliest row in any first-hop fact
    table (a row that references it through that hop's fkey; a null time is no activity),
    as ``("tve.entity", "tve.first_activity")``, one row per entity that has one. The
    reference's ``MIN(t_dat) AS first_purchase ... GROUP BY customer_id`` over its one
    fact table (visualization/rel-hm/user-tve-1-hop.ipynb, cell 1, lines 30-34), over
    every first hop of the traversal."""
    parts = [
        f"SELECT {quote(hop.via)} AS {_ENTITY}, min({quote(schema_tables[hop.table].time_col)})"
        f" AS {_FIRST_ACTIVITY}\n{indent}    FROM {quote(hop.table)}"
        f" WHERE {quote(hop.via)} IS NOT NULL GROUP BY 1"
        for hop in dict.fromkeys(first_hops)
    ]
    union = f"\n{indent}    UNION ALL\n{indent}    ".join(parts)
    return (
        f"SELECT {_ENTITY}, min({_FIRST_ACTIVITY}) AS {_FIRST_ACTIVITY}\n"
        f"{indent}FROM (\n{indent}    {union}\n{indent}) GROUP BY 1"
    )


def _seed_cte(plan: _QueryPlan) -> _Cte:
    """``seed``: the entities that are seeds at each seed time (dense shape only), as the
    reference's "universal" table: an entity table with its own time column keeps an entity
    at ``t`` when that time is ``<= t`` (a null time never); one without keeps it when its
    first activity (:func:`_first_activity_sql`) is ``<= t + Δ``: the reference's EXISTS
    over the windows that start at or before ``t``, plus every entity active before the
    first one (visualization/rel-hm/user-tve-1-hop.ipynb, cell 1, lines 36-49), which over
    seed times a step of Δ apart, as ours are, is ``first activity <= t + Δ``. So an entity
    is a seed from the window of its first row on, never before, and an entity no first
    hop ever reaches is never one. (Every target's first hop is "in" a time-stamped fact
    table and a query has at least one target, so there is always a first hop; without
    one, every row would be a seed, as :func:`_entity_keys` says.)"""
    entity, ts = plan.entity, plan.seed_times
    items = [(f"ts.{quote(TIMESTAMP)}", _SEED_TIME), (f"e.{quote(entity.pkey)}", _ENTITY)]
    if entity.time_col is not None:
        seed_from = (
            f"FROM {ts} AS ts\n  JOIN {quote(plan.entity_table)} AS e"
            f" ON e.{quote(entity.time_col)} <= ts.{quote(TIMESTAMP)}"
        )
        comment = f"{plan.entity_table} rows that exist at each seed time"
    elif plan.first_hops:
        first = _first_activity_sql(plan.schema_tables, plan.first_hops, "    ")
        why = _comment("each entity's first row in a first-hop fact table")
        seed_from = (
            f"FROM {ts} AS ts\n"
            f"  JOIN (  {why}\n"
            f"    {first}\n  ) AS a\n"
            f"    ON a.{_FIRST_ACTIVITY} <= ts.{quote(TIMESTAMP)} + {plan.next_window}\n"
            f"  JOIN {quote(plan.entity_table)} AS e ON e.{quote(entity.pkey)} = a.{_ENTITY}"
        )
        comment = f"{plan.entity_table} rows first active by the end of each next window"
    else:
        seed_from = f"FROM {ts} AS ts\n  CROSS JOIN {quote(plan.entity_table)} AS e"
        comment = f"every {plan.entity_table} row at each seed time"
    return _Cte(
        f"{plan.prefix}seed",
        comment,
        f"SELECT {_select(items, '         ')}\n  {seed_from}\n"
        f"  WHERE e.{quote(entity.pkey)} IS NOT NULL",
    )


def _window_cte(plan: _QueryPlan, hop: Hop, columns: _WindowColumns) -> _Cte:
    """``window_<i>``: first-hop fact rows in the next window (t, t + Δ] of each seed time,
    with the rows their "out" paths reach."""
    time, t = f"f.{quote(plan.hop1_time(hop))}", f"ts.{quote(TIMESTAMP)}"
    body = (
        f"SELECT {_select(columns.items[hop], '         ')}\n"
        f"  FROM {plan.seed_times} AS ts\n"
        f"  JOIN {quote(hop.table)} AS f\n"
        f"    ON {time} >  {t}\n"
        f"   AND {time} <= {t} + {plan.next_window}\n"
        + "".join(f"  {line}\n" for line in columns.joins[hop])
        + f"  WHERE f.{quote(hop.via)} IS NOT NULL"
    )
    return _Cte(
        plan.window_of(hop), f"next window: {hop.table} rows via {hop.table}.{hop.via}", body
    )


def _path_cte(plan: _QueryPlan, p: tuple[Hop, ...]) -> _Cte:
    """``path_<j>``: the rows of a path with a later "in" hop, one join per hop from its
    window; the rows of an "in" hop are those in ``(τ - Δ2, τ]`` of the hop-1 row's time τ."""
    j, last = plan.path_number(p), f"h{len(p)}"
    values = list(dict.fromkeys(d.column for d in plan.defs_of(p) if d.column is not None))
    items = [(f"h1.{_SEED_TIME}", _SEED_TIME), (f"h1.{quote(p[0].via)}", _ENTITY)]
    items += [(f"{last}.{quote(c)}", None) for c in values]
    lines = [f"FROM {plan.window_of(p[0])} AS h1"]
    time1 = f"h1.{quote(plan.hop1_time(p[0]))}"
    for k, hop in enumerate(p[1:], 2):
        prev, cur, spec = f"h{k - 1}", f"h{k}", plan.schema_tables[hop.table]
        if hop.direction == "out":
            cond = f"{cur}.{quote(spec.pkey)} = {prev}.{quote(hop.via)}"
        else:
            prev_pkey = plan.schema_tables[p[k - 2].table].pkey
            cond = f"{cur}.{quote(hop.via)} = {prev}.{quote(prev_pkey)}"
            if spec.time_col is not None:  # in (τ - Δ2, τ] of the hop-1 row's time τ
                cond += (
                    f"\n   AND {cur}.{quote(spec.time_col)} <= {time1}"
                    f"\n   AND {cur}.{quote(spec.time_col)} > {time1} - {plan.second_window}"
                )
        lines.append(f"JOIN {quote(hop.table)} AS {cur}\n    ON {cond}")
    return _Cte(
        f"{plan.prefix}path_{j}",
        _describe(plan.entity_table, p),
        f"SELECT {_select(items, '         ')}\n  " + "\n  ".join(lines),
    )


def _aggregation_groups(plan: _QueryPlan, later_in: list[tuple[Hop, ...]]) -> list[_Group]:
    """The paths aggregated together: per first hop, the paths read off its window; then
    each path with a later "in" hop on its own."""
    groups = []
    for h in plan.first_hops:
        member = [p for p in plan.paths if p[0] == h and _out_only(p)]
        if member:
            groups.append(
                _Group(plan.path_number(member[0]), plan.window_of(h), quote(h.via), member)
            )
    for p in later_in:
        j = plan.path_number(p)
        groups.append(_Group(j, f"{plan.prefix}path_{j}", _ENTITY, [p]))
    return groups


def _agg_cte(
    plan: _QueryPlan, group: _Group, value_of: Mapping[tuple[tuple[Hop, ...], str | None], str]
) -> _Cte:
    """``agg_<j>``: per (seed time, entity), the row counts and plain aggregates of the
    group's paths, in one ``GROUP BY``."""
    ent = group.entity
    items = [(_SEED_TIME, None), (ent, None if ent == _ENTITY else _ENTITY)]
    for p in group.paths:
        for d in plan.defs_of(p):
            if d.aggregation not in _VALUE_AGGREGATIONS:
                items.append((_aggregate_sql(d, value_of[(p, d.column)]), quote(d.name)))
    describe = ", ".join(_describe(plan.entity_table, p) for p in group.paths)
    return _Cte(
        f"{plan.prefix}agg_{group.j}",
        f"aggregates of {describe}",
        f"SELECT {_select(items, '         ')}\n"
        f"  FROM {group.rows}\n  GROUP BY {_SEED_TIME}, {ent}",
    )


def _together_cte(
    plan: _QueryPlan, group: _Group, made: Sequence[_Cte], output_of: Mapping[str, str]
) -> _Cte:
    """``aggs_<j>`` (in-process shape): ``agg_<j>`` with the columns of its ``mode_<j>_<k>``
    (whose pairs are among its own), for one query per group of seed times."""
    agg, modes = made[0], made[1:]
    items: list[tuple[str, str | None]] = [("a.*", None)]
    lines = [f"FROM {agg.name} AS a"]
    for k, mode in enumerate(modes, 1):
        alias = f"m{group.j}_{k}"
        items += [
            (f"{alias}.{quote(d.name)}", None) for d in plan.defs if output_of.get(d.name) == alias
        ]
        lines.append(f"LEFT JOIN {mode.name} AS {alias}\n    ON {_same_pair(alias, 'a')}")
    return _Cte(
        f"{plan.prefix}aggs_{group.j}",
        f"{agg.comment}, with its modes",
        f"SELECT {_select(items, '         ')}\n  " + "\n  ".join(lines),
    )


def _native_aggregate(
    plan: _QueryPlan,
    group: _Group,
    value_of: Mapping[tuple[tuple[Hop, ...], str | None], str],
) -> _Cte:
    """``agg_<j>`` of the in-process shape: the rows of a window, read once per group of
    seed times, aggregated by NumPy."""
    columns: list[str] = []
    targets = []
    for p in group.paths:
        for d in plan.defs_of(p):
            expr = value_of[(p, d.column)]
            if expr == "*":
                targets.append((d.name, "count", None))
                continue
            if expr not in columns:
                columns.append(expr)
            aggregation = "count" if d.column is None else d.aggregation
            targets.append((d.name, aggregation, columns.index(expr)))
    ent = group.entity
    items = [(_SEED_TIME, None), (ent, None if ent == _ENTITY else _ENTITY)]
    items += [(c, None) for c in columns]
    rows_sql = f"SELECT {_select(items, '       ')}\nFROM {group.rows}"
    describe = ", ".join(_describe(plan.entity_table, p) for p in group.paths)
    return _Cte(
        f"{plan.prefix}agg_{group.j}",
        f"aggregates of {describe} (in process)",
        "",
        native=_NativeAggregate(rows_sql, tuple(targets)),
    )


def _value_columns(plan: _QueryPlan, group: _Group) -> list[tuple[tuple[Hop, ...], str]]:
    """The (path, column) pairs of the group with a mode or distinct count, in order."""
    pairs = [
        (p, d.column)
        for p in group.paths
        for d in plan.defs_of(p)
        if d.aggregation in _VALUE_AGGREGATIONS
    ]
    return list(dict.fromkeys(pairs))


def _value_cte(
    plan: _QueryPlan,
    group: _Group,
    k: int,
    path: tuple[Hop, ...],
    column: str,
    value_of: Mapping[tuple[tuple[Hop, ...], str | None], str],
) -> _Cte:
    """``mode_<j>_<k>``: one count per distinct value of the column, then the most frequent
    (ties: the smallest) and how many.

    One CTE per column: folding them into one GROUPING SETS pass keeps every column's
    states alive at once and spills far more under the memory limit.
    """
    col, ent, rows = value_of[(path, column)], group.entity, group.rows
    defs = _value_defs(plan, path, column)
    items: list[tuple[str, str | None]] = [(_SEED_TIME, None), (_ENTITY, None)]
    for d in defs:
        if d.aggregation == "mode":
            items.append(('first("value" ORDER BY "n" DESC, "value" ASC)', quote(d.name)))
        else:
            items.append(("count(*)", quote(d.name)))
    body = (
        f"SELECT {_select(items, '         ')}\n"
        f'  FROM (SELECT {_SEED_TIME}, {ent} AS {_ENTITY}, {col} AS "value",'
        f' count(*) AS "n"\n'
        f"        FROM {rows} WHERE {col} IS NOT NULL\n"
        f"        GROUP BY {_SEED_TIME}, {ent}, {col})\n"
        f"  GROUP BY {_SEED_TIME}, {_ENTITY}"
    )
    what = " and ".join(
        "most frequent value (ties -> smallest)" if d.aggregation == "mode" else "distinct values"
        for d in defs
    )
    return _Cte(
        f"{plan.prefix}mode_{group.j}_{k}",
        f"{_describe(plan.entity_table, path)}, column {column}: {what}",
        body,
    )


def _same_pair(a: str, b: str) -> str:
    """The join condition of two relations keyed by (seed time, entity)."""
    return f"{a}.{_SEED_TIME} = {b}.{_SEED_TIME} AND {a}.{_ENTITY} = {b}.{_ENTITY}"


def _active_pairs(
    plan: _QueryPlan, joins: list[tuple[str, str]]
) -> tuple[_Cte | None, tuple[str, str], list[tuple[str, str]]]:
    """The active (seed time, entity) pairs, as (their ``active`` CTE or None, (relation,
    alias), the joins left to make): those of the one first hop's aggregate when it says it
    all, else the distinct pairs of every window."""
    out_paths = [p for p in plan.paths if _out_only(p)]
    if len(plan.first_hops) == 1 and out_paths:
        name = f"{plan.prefix}agg_{plan.path_number(out_paths[0])}"
        base = next(join for join in joins if join[0] == name)
        return None, base, [join for join in joins if join != base]
    parts = [
        f"SELECT {_SEED_TIME}, {quote(h.via)} AS {_ENTITY} FROM {plan.window_of(h)}"
        for h in plan.first_hops
    ]
    active = _Cte(
        f"{plan.prefix}active",
        "entities with any next-window row",
        "SELECT DISTINCT * FROM (\n    " + "\n    UNION ALL\n    ".join(parts) + "\n  )",
    )
    return active, (active.name, "act"), joins


def _vector_cte(
    plan: _QueryPlan,
    base: tuple[str, str],
    joins: list[tuple[str, str]],
    output_of: Mapping[str, str],
) -> _Cte:
    """``vector``: the task vector of every active (seed time, entity) pair, every
    aggregate left-joined onto the pairs (a count with no row is 0)."""
    base_name, base_alias = base
    items = [(f"{base_alias}.{_SEED_TIME}", _SEED_TIME), (f"{base_alias}.{_ENTITY}", _ENTITY)]
    for d in plan.defs:
        src = f"{output_of[d.name]}.{quote(d.name)}"
        items.append(
            (f"coalesce({src}, 0)" if d.aggregation in COUNT_AGGREGATIONS else src, quote(d.name))
        )
    lines = [f"FROM {base_name} AS {base_alias}"]
    lines += [
        f"LEFT JOIN {name} AS {alias}\n    ON {_same_pair(alias, base_alias)}"
        for name, alias in joins
    ]
    return _Cte(
        f"{plan.prefix}vector",
        "task vectors of the active pairs",
        f"SELECT {_select(items, '         ')}\n  " + "\n  ".join(lines),
    )


def _final_select(plan: _QueryPlan, dense: bool) -> tuple[list[tuple[str, str | None]], list[str]]:
    """The output columns and FROM lines: dense, every seed (``seed``) with its task vector
    or counts 0 and ``inactive = 1``; sparse, the active pairs of entities that exist at
    their seed time (own time ``<= t``; an entity of a table without time, active at ``t``,
    is first active by ``t + Δ``, so a seed)."""
    entity, prefix = plan.entity, plan.prefix
    if dense:
        final = [
            (f"s.{_ENTITY}", quote(entity.pkey)),
            (f"s.{_SEED_TIME}", quote(TIMESTAMP)),
            (f"CASE WHEN v.{_ENTITY} IS NULL THEN 1 ELSE 0 END", quote(INACTIVE)),
        ]
        for d in plan.defs:
            src = f"v.{quote(d.name)}"
            count = d.aggregation in COUNT_AGGREGATIONS
            final.append((f"coalesce({src}, 0)" if count else src, quote(d.name)))
        return final, [
            f"FROM {prefix}seed AS s",
            f"LEFT JOIN {prefix}vector AS v ON {_same_pair('v', 's')}",
        ]
    final = [
        (f"v.{_ENTITY}", quote(entity.pkey)),
        (f"v.{_SEED_TIME}", quote(TIMESTAMP)),
        ("0", quote(INACTIVE)),
    ]
    final += [(f"v.{quote(d.name)}", quote(d.name)) for d in plan.defs]
    exists = f"e.{quote(entity.pkey)} = v.{_ENTITY}"
    if entity.time_col is not None:
        exists += f" AND e.{quote(entity.time_col)} <= v.{_SEED_TIME}"
    return final, [
        f"FROM {prefix}vector AS v",
        f"JOIN {quote(plan.entity_table)} AS e ON {exists}"
        f"  {_comment('entities that exist at the seed time')}",
    ]


def _with_query(
    ctes: list[_Cte],
    final: list[tuple[str, str | None]],
    from_lines: list[str],
    *,
    order: bool = True,
) -> str:
    """``WITH`` the CTEs ``SELECT`` the output (ordered by (timestamp, pkey) unless not
    ``order``); a CTE read more than once is materialised (computed once, not inlined into
    each reader)."""

    def reads(text: str, name: str) -> int:
        return len(re.findall(rf"\b{re.escape(name)}\b", text))

    def readers(name: str) -> int:
        return sum(reads(cte.body, name) for cte in ctes)

    # only what the output reads, directly or not (the in-process shape leaves CTEs that
    # only a native aggregate read)
    needed = "\n".join([*(c for c, _ in final), *from_lines])
    for cte in reversed(ctes):
        if reads(needed, cte.name):
            needed += "\n" + cte.body
    ctes = [cte for cte in ctes if reads(needed, cte.name)]

    blocks = []
    for cte in ctes:
        materialized = " MATERIALIZED" if readers(cte.name) > 1 else ""
        blocks.append(f"{cte.name} AS{materialized} (  {_comment(cte.comment)}\n  {cte.body}\n)")
    return (
        "WITH\n" + ",\n".join(blocks) + "\n"
        f"SELECT {_select(final, '       ')}\n"
        + "\n".join(from_lines)
        + "\n"
        + ("ORDER BY 2, 1\n" if order else "")
    )


def targets_script(query: TargetQuery) -> str:
    """The task vectors of ``query`` as a DuckDB script that runs as it is (``duckdb <
    script.sql``, or one ``execute`` on a fresh connection): a view per table over its
    parquet file, the seed times as a table, then :func:`targets_sql`'s dense query. Its
    rows are :func:`compute_targets`' rows, so the computation can move to an engine with
    more memory (MotherDuck runs DuckDB SQL as it is; a warehouse needs the ``read_parquet``
    views and DuckDB's interval arithmetic translated). Every table of the
    query must be a parquet file path."""
    used = {query.entity_table} | {hop.table for d in query.defs for hop in d.path}
    relation = "timestamps" if "timestamps" not in query.schema_tables else "tve.timestamps"
    lines = [
        _comment(
            f"tve targets: raw task vectors of {query.entity_table}, "
            f"{len(set(query.timestamps))} seed times, next window {pd.Timedelta(query.timedelta)}"
        )
    ]
    for name in sorted(used):
        source = query.tables.get(name)
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError(
                f"table {name!r}: the script reads parquet files, not in-memory tables"
            )
        lines.append(
            f"CREATE OR REPLACE TEMP VIEW {quote(name)} AS"
            f" SELECT * FROM read_parquet({_literal(str(Path(source).resolve()))});"
        )
    seeds = _seed_times_frame(query.timestamps)[TIMESTAMP]
    values = ",\n  ".join(f"(TIMESTAMP {_literal(t.isoformat(sep=' '))})" for t in seeds)
    select = (
        f"SELECT * FROM (VALUES\n  {values}\n) AS t({quote(TIMESTAMP)})"
        if len(seeds)
        else f"SELECT CAST(NULL AS TIMESTAMP) AS {quote(TIMESTAMP)} WHERE false"
    )
    lines.append(f"CREATE OR REPLACE TEMP TABLE {quote(relation)} AS {select};")
    sql = targets_sql(
        query.schema_tables,
        query.defs,
        query.entity_table,
        query.timedelta,
        timestamps_relation=relation,
        running_aggregates=query.running_aggregates,
        second_hop_window=query.second_hop_window,
    )
    return "\n".join(lines) + "\n" + sql.rstrip() + ";\n"
