"""Raw task vectors: next-window aggregates of every target of the traversal graph, in DuckDB.

Design. :func:`targets_sql` turns a list of :class:`~tve_pipeline.traversal.TargetDef`
into one set-based DuckDB query over a relation of seed times ``timestamps(timestamp)``
(as in RelBench task SQL), never a query per seed time:

- ``window_<i>``: the rows of first hop ``E <- F`` in the next window of every seed time
  (a range join, ``t < time <= t + Δ``), with the dimension rows that the paths' "out"
  hops reach left-joined on (a fact row references one such row or none, so every path
  ``E <- F -> D ...`` made of "out" hops is read off the window's rows);
- ``per_time_<j>``, ``at_<j>`` and ``agg_<j>`` of a fact->key<-fact path (``E <- F -> K
  <- F'``: rows of ``F'`` with the hop-1 row's key and time in ``(τ - Δ2, τ]`` of the
  hop-1 row's time τ; Δ2 is Δ unless the query says otherwise, as the reference's
  ``t1 <= t0 AND t1 > t0 - Δ``): the rows reached from a hop-1 row depend on its (key, τ)
  only, so ``at_<j>`` aggregates each distinct (key, τ) of every seed time's windows once
  (from ``per_time_<j>``, ``F'`` per (key, time): count, sum, min, max, squared distances)
  and ``agg_<j>`` combines them per (seed time, entity), where joining rows costs (hop-1
  rows of every seed time) x (rows of the key in Δ2); ``counts_<j>_<k>``, ``reach_<j>_<k>``
  and ``best_<j>_<k>`` do the same per (key, value) for modes and distinct counts,
  exactly. These tables read no seed time: :func:`iter_targets` computes them once for
  all its groups of seed times, and makes the lookups (``at_<j>``, ``reach_<j>_<k>``) in
  process from one sorted scan of ``F'`` with the first-hop (key, time) interleaved (each
  lookup's window a range of its key's rows: counts by prefix differences, sums, min and
  max by a segment tree, value counts by runs of (key, value); :func:`_lookups_of_bucket`),
  never materialising ``per_time``, ``counts``, ``reach`` or ``best``; ``--show-sql``'s
  script keeps the SQL of all of them;
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
(what ``show_sql`` prints).

:func:`iter_targets` (behind :func:`compute_targets` and :func:`write_targets`) computes
the sparse rows in process, per group of consecutive seed times on a background thread
(:func:`_in_process`): DuckDB makes each window as a temporary table (the range join, in
an in-memory DuckDB with a memory limit: large inputs spill to a temporary directory
instead of being killed); NumPy aggregates the paths read off a window
(:func:`_aggregate_rows`: one sort by (seed time, entity), ``reduceat`` per pair, modes and
distinct counts from runs of coded values), where DuckDB's hash aggregates, mode CTEs and
their joins cost 4 times the CPU; the fact->key<-fact aggregates (``agg_<j>`` and
``mode_<j>_<k>`` over the lookups) and each ``path_<j>`` (rows that multiply: aggregated
as they stream, ``aggs_<j>``) run as queries of their own; and :func:`_assemble` places
every column by pair code onto the active pairs of seeds. Then it adds the
inactive rows itself, one seed time and slice of entities at a time, with NumPy scatters
into zeroed buffers.
At scale almost every row is inactive (one million customers x 52 weekly seed times: 47
million rows, 7.6 % active), and hash-joining or sorting that many 30-column rows in
DuckDB costs far more than filling them in order. Groups are small (4 million pairs), so
the working set stays small and the next group's rows are computed while the current one
is written; :func:`write_targets` streams the rows into one parquet file (a row group per
slice) on a writer thread, so memory does not grow with the number of seed times or
entities.

What to compute is one value, a :class:`TargetQuery` (the tables, their schema, the
definitions, the entity table, the seed times, Δ, and the DuckDB settings); the four ways
to run it take it whole: :func:`iter_targets` (Arrow slices), :func:`compute_targets` (a
frame), :func:`write_targets` (one parquet file) and :func:`write_targets_by_seed_time`
(a file per seed time).

Every identifier is double-quoted (``"`` doubled), so tables and columns may hold spaces
and quotes. Aggregation semantics: ``count`` counts the rows reached (``column`` null) or
the non-null values; ``count_distinct`` the distinct non-null values; ``sum``, ``mean``,
``min``, ``max`` and ``std`` (sample, null for fewer than two values) are computed on the
values cast to DOUBLE; ``mode`` is the most frequent non-null value, ties broken by the
smallest value, and keeps the column's type. An "out" hop relies on its table's primary
key being unique (RelBench's 0..n-1 keys are; the entity table's is checked).
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from tve_pipeline.common import atomic_path
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
_FIRST_ACTIVITY = '"tve.first_activity"'

#: Up to this many seed times, the window joins are nested loops (see ``_connection``).
_NESTED_LOOP_SEEDS = 128

#: Seed times per run of the query (see :func:`iter_targets`); None runs them all at once.
DEFAULT_SEEDS_PER_QUERY = 16

#: ... and fewer when the entity table is large: a group's rows are held in Arrow while they
#: are aggregated and filled in (and the next group's while they are computed), so a group
#: spans at most this many (entity, seed time) pairs (4 seed times of a million entities:
#: 10M orders' peak RSS 1.0 GB, 1.9 GB at 16 seed times, in the same time; with
#: fact->key<-fact paths too: 2.97 GB against 3.32 GB, 62.0 / 51.7 s against 63.0 / 52.4 s).
_GROUP_PAIRS = 4_000_000

#: Of a query's memory budget (``TargetQuery.memory_limit``), the share DuckDB is given as
#: its own limit; the rest is for what runs in process (the lookup scans, a group's
#: aggregates, the slices being filled in and written). 10M orders, all path kinds, budget
#: 2 GB: 41.9 s and 1.77 GiB peak RSS at this share with quarter-budget scans (DuckDB given
#: all 2 GB: 41.8 s, 2.79 GiB).
_DUCKDB_SHARE = 0.5

#: Bytes of a group's in-process work per (entity, seed time) pair: groups span at most
#: the budget's worth of pairs (and ``_GROUP_PAIRS``): 4M pairs at 2 GB.
_BYTES_PER_PAIR = 500

_UNITS = {"b": 1, "byte": 1, "bytes": 1}
for _i, _prefix in enumerate("kmgt", 1):
    _UNITS |= {_prefix: 1000**_i, f"{_prefix}b": 1000**_i, f"{_prefix}ib": 1024**_i}

#: Entities per output slice of :func:`iter_targets` (one parquet row group each). Up to
#: three are alive at once (built, queued, being written): ~50 MB each at 48 targets; four
#: times larger cost ~0.3 GB more peak at 10M orders for the same time.
DEFAULT_SLICE_ROWS = 1 << 17


def memory_bytes(limit: str, argument: str = "memory_limit") -> int:
    """A memory size as DuckDB reads one, in bytes: ``"2GB"`` (10^9 bytes a GB), ``"4GiB"``
    (2^30 a GiB), ``"1500MB"``, ``"512 MiB"``, or ``"50%"`` of this machine's memory."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(%|[a-z]*)\s*", str(limit).lower())
    if m is None or (m.group(2) != "%" and m.group(2) not in _UNITS) or float(m.group(1)) <= 0:
        raise ValueError(
            f"{argument}: cannot read {limit!r} as a memory size"
            " (such as '2GB', '1500MB', '4GiB' or '50%')"
        )
    if m.group(2) == "%":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total * float(m.group(1)) / 100)
    return int(float(m.group(1)) * _UNITS[m.group(2)])


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


_CTE_NAME = (
    r"(seed|active|vector|(window|path|aggs?|at|per_time|hops_all)_\d+"
    r"|(mode|counts|ranks|reach|best|several)_\d+_\d+)"
)


def _cte_prefix(schema_tables: Mapping[str, TableSpecLike]) -> str:
    """'' unless a table's name would be shadowed by a CTE name (DuckDB names are
    case-insensitive)."""
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


class _Cte(NamedTuple):
    """One common table expression of the query: ``name AS (  -- comment`` body ``)``."""

    name: str
    comment: str
    body: str
    #: computed once per query, as a table, before the groups of seed times: it reads no seed
    #: time (per (key, time) aggregates) or all of them (their lookups), never a group's
    once: bool = False
    #: of an ``at_<j>``: how :func:`iter_targets` makes it (and the ``reach_<j>_<k>``) in
    #: process, from a sorted scan of ``F'``, without the tables it reads here; of an
    #: ``agg_<j>`` in the in-process shape: what :func:`_aggregate_rows` reads
    native: _NativeLookups | _NativeAggregate | None = None
    #: a window in the in-process shape: computed by its own query once per group of seed
    #: times and registered (an Arrow table) under its name for the queries that read it
    fetched: bool = False


class _Group(NamedTuple):
    """Paths aggregated in one ``agg_<j>``: ``rows`` (a window or a ``path_<j>``) grouped by
    (seed time, ``entity``, the entity's key column in ``rows``)."""

    j: int
    rows: str
    entity: str
    paths: list[tuple[Hop, ...]]


@dataclass(frozen=True)
class _QueryPlan:
    """The names that the CTEs of :func:`targets_sql` share: the paths of the definitions,
    numbered, the window of each first hop, and the seed-time relation and window literal."""

    schema_tables: Mapping[str, TableSpecLike]
    defs: list[TargetDef]
    entity_table: str
    seed_times: str  # the quoted relation of seed times
    next_window: str  # the interval literal of Δ
    #: the interval literal of Δ2: a later "in" hop reaches rows in (τ - Δ2, τ] of the
    #: hop-1 row's time τ
    second_window: str
    second_window_ns: int
    prefix: str  # of every CTE name ('' unless a table's name collides with one)
    paths: list[tuple[Hop, ...]]
    first_hops: list[Hop]

    @property
    def entity(self) -> TableSpecLike:
        return self.schema_tables[self.entity_table]

    def window_of(self, hop: Hop) -> str:
        return f"{self.prefix}window_{self.first_hops.index(hop) + 1}"

    def path_number(self, path: tuple[Hop, ...]) -> int:
        return self.paths.index(path) + 1

    def defs_of(self, path: tuple[Hop, ...]) -> list[TargetDef]:
        return [d for d in self.defs if d.path == path]

    def hop1_time(self, hop: Hop) -> str:
        return self.schema_tables[hop.table].time_col


def _query_plan(
    schema_tables: Mapping[str, TableSpecLike],
    defs: list[TargetDef],
    entity_table: str,
    timedelta: pd.Timedelta,
    timestamps_relation: str,
    second_hop_window: pd.Timedelta | None = None,
) -> _QueryPlan:
    paths = paths_of(defs)
    return _QueryPlan(
        schema_tables=schema_tables,
        defs=defs,
        entity_table=entity_table,
        seed_times=quote(timestamps_relation),
        next_window=interval_sql(timedelta),
        second_window=interval_sql(_second_window(timedelta, second_hop_window)),
        second_window_ns=_second_window(timedelta, second_hop_window).value,
        prefix=_cte_prefix(schema_tables),
        paths=paths,
        first_hops=list(dict.fromkeys(p[0] for p in paths)),
    )


def _second_window(timedelta, second_hop_window) -> pd.Timedelta:
    """Δ2, the window of a later "in" hop: Δ unless given (the reference bounds the second
    fact's rows by the database's Δ)."""
    window = pd.Timedelta(timedelta if second_hop_window is None else second_hop_window)
    if window <= pd.Timedelta(0):
        raise ValueError(f"second_hop_window must be a positive duration, got {window}")
    return window


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
    for p in running:
        j = plan.path_number(p)
        ctes += _running_ctes(plan, p)
        joins.append((ctes[-1].name, f"a{j}"))
        output_of.update(
            {d.name: f"a{j}" for d in plan.defs_of(p) if d.aggregation not in _VALUE_AGGREGATIONS}
        )
        for k, column in enumerate(_running_value_columns(plan, p), 1):
            ctes += _running_mode_ctes(plan, p, k, column)
            joins.append((ctes[-1].name, f"m{j}_{k}"))
            output_of.update({d.name: f"m{j}_{k}" for d in _value_defs(plan, p, column)})
    windows = {plan.window_of(h) for h in plan.first_hops}
    for group in _aggregation_groups(plan, joined):
        group_defs = [d for p in group.paths for d in plan.defs_of(p)]
        if native and group.rows in windows:
            ctes.append(_native_aggregate(plan, group, columns.value_of))
            joins.append((ctes[-1].name, f"a{group.j}"))
            output_of.update({d.name: f"a{group.j}" for d in group_defs})
            continue
        first = len(ctes)
        ctes.append(_agg_cte(plan, group, columns.value_of))
        joins.append((ctes[-1].name, f"a{group.j}"))
        for p in group.paths:
            for d in plan.defs_of(p):
                if d.aggregation not in _VALUE_AGGREGATIONS:
                    output_of[d.name] = f"a{group.j}"
        for k, (path, column) in enumerate(_value_columns(plan, group), 1):
            ctes.append(_value_cte(plan, group, k, path, column, columns.value_of))
            joins.append((ctes[-1].name, f"m{group.j}_{k}"))
            output_of.update({d.name: f"m{group.j}_{k}" for d in _value_defs(plan, path, column)})
        if native:  # a path_<j> (its rows multiply): aggregated by DuckDB as they stream,
            # in one query with its modes, so that the path is joined once
            ctes.append(_together_cte(plan, group, ctes[first:], output_of))
            joins.append((ctes[-1].name, f"t{group.j}"))
            output_of.update({d.name: f"t{group.j}" for d in group_defs})

    if native:  # no vector: :func:`_assemble` puts the sources together in process
        name_of = dict((alias, name) for name, alias in joins)
        out_paths = [p for p in plan.paths if _out_only(p)]
        base = None
        if len(plan.first_hops) == 1 and out_paths:  # its pairs are the window's
            base = f"{plan.prefix}agg_{plan.path_number(out_paths[0])}"
        assembly = _Assembly(
            windows=tuple(plan.window_of(h) for h in plan.first_hops),
            base=base,
            sources=tuple((d.name, name_of[output_of[d.name]]) for d in plan.defs),
        )
        return ctes, [], [], assembly
    active, base, joins = _active_pairs(plan, joins)
    ctes += [active] if active is not None else []
    ctes.append(_vector_cte(plan, base, joins, output_of))
    return (ctes, *_final_select(plan, dense), None)


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


# ------------------------------------------ fact -> key <- fact by per-key lookups of windows


def _running_shape(plan: _QueryPlan, p: tuple[Hop, ...]) -> bool:
    """``E <- F -> K <- F'`` with ``F'`` time-stamped: what :func:`_running_ctes` computes
    without joining each first-hop row to the rows of ``F'`` with its key."""
    return (
        len(p) == 3
        and p[1].direction == "out"
        and p[2].direction == "in"
        and plan.schema_tables[p[2].table].time_col is not None
    )


#: The statistics of a column over a window that each plain aggregation reads (``n``
#: non-null values, ``s`` sum, ``m2`` sum of squared distances from the window's own mean).
_RUNNING_STATS: dict[str, tuple[str, ...]] = {
    "count": ("n",),
    "sum": ("s", "n"),  # n: a sum over no value is null
    "mean": ("s", "n"),
    "min": ("min",),
    "max": ("max",),
    "std": ("n", "s", "m2"),
}


def _key_rows(plan: _QueryPlan, p: tuple[Hop, ...]) -> tuple[str, str, str]:
    """For ``E <- F -> K <- F'``: the rows of ``F'`` (alias ``g``) that reference a row of
    ``K`` and have a time, as (FROM, WHERE, the key and time expressions' select list)."""
    key_table, fact2 = plan.schema_tables[p[1].table], plan.schema_tables[p[2].table]
    key, time = f"g.{quote(p[2].via)}", f"g.{quote(fact2.time_col)}"
    where = (
        f"{key} IN (SELECT {quote(key_table.pkey)} FROM {quote(p[1].table)}) AND {time} IS NOT NULL"
    )
    return f"{quote(p[2].table)} AS g", where, f'{key} AS "tve.key", {time} AS "tve.time"'


def _running_ctes(plan: _QueryPlan, p: tuple[Hop, ...]) -> list[_Cte]:
    """The CTEs of ``E <- F -> K <- F'`` up to ``agg_<j>``, its plain aggregates, from one
    lookup per first-hop (key, time) instead of joining each first-hop row to ``F'``.

    The rows the path reaches from a first-hop row at time τ with key ``k`` are the rows of
    ``F'`` with key ``k`` and time in ``(τ - Δ2, τ]`` (the reference's
    ``t1 <= t0 AND t1 > t0 - Δ``), the same for every first-hop row with that (key, τ),
    whatever its seed time. So ``per_time_<j>`` aggregates ``F'`` per (key, time) once (row
    count, non-null count, sum, min, max, and for ``std`` the squared distances from the
    time's mean); ``at_<j>``
    combines them over each distinct first-hop (key, τ)'s window (a range join of the
    distinct (key, τ) of every seed time's windows, ``hops_all_<j>``, with the key's
    distinct times in the window); ``agg_<j>`` joins each first-hop row of a group's window
    to its (key, τ) and combines them per (seed time, entity): counts and sums add up, min
    of mins, max of maxes, mean = sum / count, std from each part's ``m2`` (squared distances
    from its own mean) and mean, as Chan et al. combine them (:func:`_combined_sql`: no sum
    of squares about a far-away mean to cancel). The mode and
    distinct count of each (key, τ) (``best_<j>_<k>``) come from the count of each value in
    its window (``reach_<j>_<k>``, from per (key, value, time) counts ``counts_<j>_<k>``).
    Cost in SQL: (distinct first-hop (key, τ)) x (distinct times of the key in Δ2), not
    (first-hop rows of every seed time) x (rows of the key). :func:`iter_targets` makes
    ``at_<j>`` and each ``reach_<j>_<k>`` in process instead (:func:`_lookups_of_bucket`).
    """
    stats = _RunningStats.of(plan, p)
    ctes = [_per_time_cte(plan, p, stats)]
    values = _running_value_columns(plan, p)
    for k, column in enumerate(values, 1):
        ctes += _running_value_ctes(plan, p, k, column)
    ctes.append(_all_hops_cte(plan, p))
    for k, column in enumerate(values, 1):
        ctes += _window_value_ctes(plan, p, k, column)
    ctes.append(_at_cte(plan, p, stats))
    return ctes + [_running_agg_cte(plan, p, stats)]


def _all_hops_cte(plan: _QueryPlan, p: tuple[Hop, ...]) -> _Cte:
    """``hops_all_<j>``: :func:`_hops_sql` of the first-hop rows of every seed time's window
    (what ``at_<j>``, each ``several_<j>_<k>`` and, for its seed times, each group's
    ``mode_<j>_<k>`` read), computed once."""
    windows = _all_windows(plan, p).replace("\n", "\n                ")
    return _Cte(
        f"{plan.prefix}hops_all_{plan.path_number(p)}",
        f"{_describe(plan.entity_table, p)}: first-hop rows per (key, time) of each pair, every"
        " seed time",
        _hops_sql(plan, p, f"({windows})").replace("\n", "\n  "),
        once=True,
    )


def _lookup_keys(plan: _QueryPlan, p: tuple[Hop, ...]) -> str:
    """The distinct first-hop (key, time) of every seed time's window (alias ``k``)."""
    return (
        f'(SELECT DISTINCT "tve.key", "tve.time" FROM {plan.prefix}hops_all_'
        f'{plan.path_number(p)}\n         WHERE "tve.key" IS NOT NULL) AS k'
    )


def _in_second_window(plan: _QueryPlan, alias: str) -> str:
    """The join of rows ``alias`` (key, time) to the lookups ``k``: same key, time in
    ``(τ - Δ2, τ]`` of the lookup's τ."""
    return (
        f'{alias}."tve.key" = k."tve.key" AND {alias}."tve.time" <= k."tve.time"\n'
        f'   AND {alias}."tve.time" > k."tve.time" - {plan.second_window}'
    )


def _at_cte(plan: _QueryPlan, p: tuple[Hop, ...], stats: _RunningStats) -> _Cte:
    """``at_<j>``: per distinct first-hop (key, time τ) of any seed time's window, the
    statistics of ``per_time_<j>`` over ``(τ - Δ2, τ]`` and the mode and distinct count of
    each value column (``best_<j>_<k>``): computed once for all groups of seed times (each
    group's query finds its rows by equality)."""
    j = plan.path_number(p)
    keys = [('k."tve.key"', '"tve.key"'), ('k."tve.time"', '"tve.time"')]
    source = (
        f"FROM {_lookup_keys(plan, p)}\n"
        f"  JOIN {plan.prefix}per_time_{j} AS r\n"
        f"    ON {_in_second_window(plan, 'r')}"
    )
    inner, combined = _combined_sql(stats, keys, source, 'k."tve.key", k."tve.time"')
    items = [('i."tve.key"', None), ('i."tve.time"', None), *combined]
    joins = ""
    for k, _ in enumerate(_running_value_columns(plan, p), 1):
        items += [
            (f'any_value(b{k}."value")', quote(f"tve.mode_{k}")),
            (f'any_value(b{k}."distinct")', quote(f"tve.distinct_{k}")),
        ]
        joins += (
            f"\n  LEFT JOIN {plan.prefix}best_{j}_{k} AS b{k}\n"
            f'    ON b{k}."tve.key" = i."tve.key" AND b{k}."tve.time" = i."tve.time"'
        )
    inner = inner.replace("\n", "\n        ")
    return _Cte(
        f"{plan.prefix}at_{j}",
        f"{_describe(plan.entity_table, p)}: aggregates of each first-hop (key, time)'s window",
        f"SELECT {_select(items, '         ')}\n"
        f"  FROM ({inner}) AS i" + joins + "\n  GROUP BY 1, 2",
        once=True,
        native=_native_lookups(plan, p, stats),
    )


def _combined_sql(
    stats: _RunningStats, keys: list[tuple[str, str]], source: str, partition: str
) -> tuple[str, list[tuple[str, str | None]]]:
    """Window statistics (alias ``r`` in ``source``, a FROM clause) combined per group
    (``keys``, ``partition``): the rows with, per ``std`` column, the mean of their group's
    values, and the select list over them: counts and sums add up, min of mins, max of
    maxes, and ``m2`` as Chan et al. combine parts: the parts' ``m2`` plus each part's
    count x (its mean - the group's mean)^2. A NaN or infinity makes ``m2`` NaN."""
    name = stats.name
    inner = [*keys, ('r."tve.rows"', None)]
    inner += [(f"r.{name(c, s)}", None) for c, s in stats.pairs]
    for c in stats.spread:
        n, total = name(c, "n"), name(c, "s")
        inner.append((f"sum(r.{total}) OVER g / nullif(sum(r.{n}) OVER g, 0)", name(c, "mean")))
    inner_sql = (
        f"SELECT {_select(inner, '       ')}\n{source}\nWINDOW g AS (PARTITION BY {partition})"
    )
    combined: list[tuple[str, str | None]] = [
        (stats.accumulate("rows", '"tve.rows"'), '"tve.rows"')
    ]
    for c, s in stats.pairs:
        if s == "m2":
            n, total, mean = name(c, "n"), name(c, "s"), name(c, "mean")
            spread = f"{n} * ({total} / nullif({n}, 0) - {mean}) ** 2"
            combined.append((f"sum({name(c, 'm2')}) + sum({spread})", name(c, s)))
        else:
            combined.append((stats.accumulate(s, name(c, s)), name(c, s)))
    return inner_sql, combined


def _reach_name(plan: _QueryPlan, p: tuple[Hop, ...], k: int) -> str:
    return f"{plan.prefix}reach_{plan.path_number(p)}_{k}"


@dataclass(frozen=True)
class _NativeLookups:
    """What :func:`_create_lookup_tables` reads to make ``at`` and each ``reach`` of one
    fact->key<-fact path in process (the tables in ``replaces`` are then never made)."""

    at: str
    reach: tuple[str, ...]  # per value column
    ranks: tuple[str, ...]  # per value column: its values in order (made before ``at``)
    replaces: frozenset[str]
    #: rows of ``F'`` ("tve.lookup" false) and first-hop (key, time) ("tve.lookup" true,
    #: "tve.several": of a pair with several): key, time, lookup, several, then per running
    #: column "tve.v_<i>" and per value column "tve.rank_<k>"
    rows_sql: str
    pairs: tuple[tuple[int, str, str], ...]  # (column number, stat, output name)
    window_ns: int  # Δ2 in nanoseconds: a lookup at τ reads the rows in (τ - Δ2, τ]


def _native_lookups(plan: _QueryPlan, p: tuple[Hop, ...], stats: _RunningStats) -> _NativeLookups:
    j = plan.path_number(p)
    from_rows, where, key_time = _key_rows(plan, p)
    hops = f"{plan.prefix}hops_all_{j}"
    values = _running_value_columns(plan, p)
    ranks = tuple(f"{plan.prefix}ranks_{j}_{k}" for k in range(1, len(values) + 1))
    doubles = {c for c, stat in stats.pairs if stat != "n"}
    facts: list[tuple[str, str | None]] = [
        (key_time, None),
        ("false", quote("tve.lookup")),
        ("false", quote("tve.several")),
    ]
    looks: list[tuple[str, str | None]] = [
        ('"tve.key", "tve.time", true, bool_or("keys" > 1)', None)
    ]
    for c, i in stats.number.items():
        cast = f"CAST(g.{quote(c)} AS DOUBLE)" if c in doubles else f"g.{quote(c)} IS NOT NULL"
        facts.append((cast, quote(f"tve.v_{i}")))
        looks.append((f"NULL::{'DOUBLE' if c in doubles else 'BOOLEAN'}", None))
    joins = ""
    for k, (column, name) in enumerate(zip(values, ranks), 1):
        facts.append((f'r{k}."rank"', quote(f"tve.rank_{k}")))
        looks.append(("NULL::BIGINT", None))
        joins += f'\n          LEFT JOIN {name} AS r{k} ON r{k}."value" = g.{quote(column)}'
    rows_sql = (
        f"SELECT {_select(facts, '               ')}\n"
        f"          FROM {from_rows}{joins}\n"
        f"         WHERE {where}\n"
        f"        UNION ALL\n"
        f"        SELECT {_select(looks, '               ')}\n"
        f'          FROM {hops} WHERE "tve.key" IS NOT NULL GROUP BY 1, 2'
    )
    reach = tuple(_reach_name(plan, p, k) for k in range(1, len(values) + 1))
    replaces = {f"{plan.prefix}per_time_{j}", *reach}
    for k in range(1, len(values) + 1):
        replaces |= {f"{plan.prefix}counts_{j}_{k}", f"{plan.prefix}best_{j}_{k}"}
    return _NativeLookups(
        at=f"{plan.prefix}at_{j}",
        reach=reach,
        ranks=ranks,
        replaces=frozenset(replaces),
        rows_sql=rows_sql,
        pairs=tuple((stats.number[c], s, f"tve.{s}_{stats.number[c]}") for c, s in stats.pairs),
        window_ns=plan.second_window_ns,
    )


@dataclass(frozen=True)
class _RunningStats:
    """The statistics of a fact->key<-fact path's windows: (column, stat) pairs in order,
    the columns' numbers (in internal names ``"tve.<stat>_<number>"``) and the columns whose
    values have a ``std``."""

    plain: list[TargetDef]
    pairs: list[tuple[str, str]]
    number: dict[str, int]
    spread: list[str]

    @classmethod
    def of(cls, plan: _QueryPlan, p: tuple[Hop, ...]) -> _RunningStats:
        plain = [d for d in plan.defs_of(p) if d.aggregation not in _VALUE_AGGREGATIONS]
        pairs = list(
            dict.fromkeys(
                (d.column, stat)
                for d in plain
                if d.column is not None
                for stat in _RUNNING_STATS[d.aggregation]
            )
        )
        number = {c: i for i, c in enumerate(dict.fromkeys(c for c, _ in pairs), 1)}
        spread = [c for c, stat in pairs if stat == "m2"]
        return cls(plain, pairs, number, spread)

    def name(self, column: str, stat: str) -> str:
        return quote(f"tve.{stat}_{self.number[column]}")

    @staticmethod
    def accumulate(stat: str, column: str) -> str:
        """Over the (key, time) of a lookup's window, or over the lookups of a pair."""
        total = f"{'min' if stat == 'min' else 'max' if stat == 'max' else 'sum'}({column})"
        return f"CAST({total} AS BIGINT)" if stat in ("rows", "n") else total


def _per_time_cte(plan: _QueryPlan, p: tuple[Hop, ...], stats: _RunningStats) -> _Cte:
    """``per_time_<j>``: the statistics of ``F'`` per (key of ``K``, time)."""
    from_rows, where, key_time = _key_rows(plan, p)
    name = stats.name

    def value(column: str) -> str:
        return f"CAST(g.{quote(column)} AS DOUBLE)"

    per_time = {
        "n": lambda c: f"count(g.{quote(c)})",
        "s": lambda c: f"sum({value(c)})",
        "m2": lambda c: f"var_pop({value(c)}) * count(g.{quote(c)})",
        "min": lambda c: f"min({value(c)})",
        "max": lambda c: f"max({value(c)})",
    }
    items = [("count(*)", '"tve.rows"')] + [(per_time[s](c), name(c, s)) for c, s in stats.pairs]
    return _Cte(
        f"{plan.prefix}per_time_{plan.path_number(p)}",
        f"{p[2].table} rows per {p[1].table} key and time",
        f"SELECT {key_time},\n         {_select(items, '         ')}\n"
        f"  FROM {from_rows}\n"
        f"  WHERE {where}\n"
        f"  GROUP BY 1, 2",
        once=True,
    )


def _running_agg_cte(plan: _QueryPlan, p: tuple[Hop, ...], stats: _RunningStats) -> _Cte:
    """``agg_<j>``: each first-hop row's window aggregates (``at_<j>``, by (key, time)),
    combined per (seed time, entity) into the path's plain aggregates."""
    j, hop1, name = plan.path_number(p), p[0], stats.name
    time1 = f"w.{quote(plan.hop1_time(hop1))}"
    keys = [(f"w.{_SEED_TIME}", _SEED_TIME), (f"w.{quote(hop1.via)}", _ENTITY)]
    source = (
        f"FROM {plan.window_of(hop1)} AS w\n"
        f"  JOIN {plan.prefix}at_{j} AS r\n"
        f'    ON r."tve.key" = w.{quote(p[1].via)} AND r."tve.time" = {time1}'
    )
    inner, combined = _combined_sql(stats, keys, source, f"w.{_SEED_TIME}, w.{quote(hop1.via)}")
    inner = inner.replace("\n", "\n                ")
    items = [(_SEED_TIME, None), (_ENTITY, None), *combined]
    final = [(_SEED_TIME, None), (_ENTITY, None)]
    final += [(_running_target(d, name), quote(d.name)) for d in stats.plain]
    return _Cte(
        f"{plan.prefix}agg_{j}",
        f"aggregates of {_describe(plan.entity_table, p)}, from each first-hop row's window",
        f"SELECT {_select(final, '         ')}\n"
        f"  FROM (SELECT {_select(items, '               ')}\n"
        f"          FROM ({inner})\n"
        f"         GROUP BY 1, 2)",
    )


def _running_target(d: TargetDef, name: Callable[[str, str], str]) -> str:
    """One plain aggregate of ``E <- F -> K <- F'`` from the combined window statistics."""
    if d.column is None:
        return '"tve.rows"'
    c = d.column
    n = name(c, "n")
    if d.aggregation == "sum":  # null over no value, whatever a running sum holds then
        return f"CASE WHEN {n} > 0 THEN {name(c, 's')} END"
    if d.aggregation in ("count", "min", "max"):
        return name(c, {"count": "n"}.get(d.aggregation, d.aggregation))
    if d.aggregation == "mean":
        return f"{name(c, 's')} / nullif({n}, 0)"
    m2 = name(c, "m2")
    return (  # an infinity or NaN among the values: NaN, as DuckDB's stddev_samp
        f"CASE WHEN {n} < 2 THEN NULL WHEN NOT isfinite({m2}) THEN CAST('nan' AS DOUBLE)"
        f" ELSE sqrt(greatest({m2}, 0.0) / ({n} - 1)) END"
    )


def _running_value_columns(plan: _QueryPlan, p: tuple[Hop, ...]) -> list[str]:
    """The columns of ``E <- F -> K <- F'`` with a mode or distinct count, in order."""
    return list(
        dict.fromkeys(d.column for d in plan.defs_of(p) if d.aggregation in _VALUE_AGGREGATIONS)
    )


def _all_windows(plan: _QueryPlan, p: tuple[Hop, ...]) -> str:
    """The first-hop rows of ``E <- F -> K <- F'`` in the window of every seed time (the
    columns a ``window_<i>`` keeps of them), for the tables computed once per query."""
    hop1 = p[0]
    time, t = f"f.{quote(plan.hop1_time(hop1))}", f"ts.{quote(TIMESTAMP)}"
    columns = ", ".join(
        f"f.{quote(c)}" for c in dict.fromkeys((hop1.via, p[1].via, plan.hop1_time(hop1)))
    )
    return (
        f"SELECT {t} AS {_SEED_TIME}, {columns}\n"
        f"  FROM {plan.seed_times} AS ts\n"
        f"  JOIN {quote(hop1.table)} AS f\n"
        f"    ON {time} >  {t}\n"
        f"   AND {time} <= {t} + {plan.next_window}\n"
        f"  WHERE f.{quote(hop1.via)} IS NOT NULL"
    )


def _hops_sql(plan: _QueryPlan, p: tuple[Hop, ...], rows: str) -> str:
    """Of first-hop rows (``rows``: a window), the number per (seed time, entity, key, time)
    and the number of (key, time) of their (seed time, entity)."""
    hop1 = p[0]
    return (
        f'SELECT {_SEED_TIME}, {_ENTITY}, "tve.key", "tve.time", "n",\n'
        f'       count(*) OVER (PARTITION BY {_SEED_TIME}, {_ENTITY}) AS "keys"\n'
        f"  FROM (SELECT {_SEED_TIME}, {quote(hop1.via)} AS {_ENTITY},"
        f' {quote(p[1].via)} AS "tve.key",\n'
        f'               {quote(plan.hop1_time(hop1))} AS "tve.time", count(*) AS "n"\n'
        f"          FROM {rows}\n"
        f"         GROUP BY 1, 2, 3, 4)"
    )


def _running_value_ctes(plan: _QueryPlan, p: tuple[Hop, ...], k: int, column: str) -> list[_Cte]:
    """``counts_<j>_<k>`` and ``ranks_<j>_<k>`` of ``E <- F -> K <- F'``: the rows of one
    value column per (key, value, time), and its values in order (what the in-process
    lookups code values by)."""
    j = plan.path_number(p)
    from_rows, where, key_time = _key_rows(plan, p)
    col = f"g.{quote(column)}"
    counts = _Cte(
        f"{plan.prefix}counts_{j}_{k}",
        f"{_describe(plan.entity_table, p)}, column {column}: rows per key, value and time",
        f'SELECT {key_time}, {col} AS "value", count(*) AS "n"\n'
        f"  FROM {from_rows}\n"
        f"  WHERE {where} AND {col} IS NOT NULL\n"
        f"  GROUP BY 1, 2, 3",
        once=True,
    )
    ranks = _Cte(
        f"{plan.prefix}ranks_{j}_{k}",
        f"{_describe(plan.entity_table, p)}, column {column}: the values in order",
        f'SELECT "value", dense_rank() OVER (ORDER BY "value") AS "rank",\n'
        f'         count(*) OVER () AS "size"\n'
        f'  FROM (SELECT DISTINCT {col} AS "value" FROM {from_rows}\n'
        f"         WHERE {where} AND {col} IS NOT NULL)",
        once=True,
    )
    return [counts, ranks]


def _window_value_ctes(plan: _QueryPlan, p: tuple[Hop, ...], k: int, column: str) -> list[_Cte]:
    """``reach_<j>_<k>`` and ``best_<j>_<k>``: per distinct first-hop (key, time τ) of any
    seed time's window, the count of each value of the ``k``-th value column in ``(τ - Δ2,
    τ]`` (a range join of the (key, τ) with the key's (value, time) counts), and from them
    the most frequent value (ties: the smallest) and the number of values. Pairs that reach
    ``K`` from one (key, τ) read their mode and distinct count off ``at_<j>``; the others
    sum the counts of every (key, τ) they reach (:func:`_running_mode_ctes`)."""
    j = plan.path_number(p)
    reach = _Cte(
        _reach_name(plan, p, k),
        f"{_describe(plan.entity_table, p)}, column {column}: the count of each value in each"
        " first-hop (key, time)'s window",
        f'SELECT k."tve.key", k."tve.time", c."value", CAST(sum(c."n") AS BIGINT) AS "n"\n'
        f"  FROM {_lookup_keys(plan, p)}\n"
        f"  JOIN {plan.prefix}counts_{j}_{k} AS c\n"
        f"    ON {_in_second_window(plan, 'c')}\n"
        f"  GROUP BY 1, 2, 3",
        once=True,
    )
    best = _Cte(
        f"{plan.prefix}best_{j}_{k}",
        f"{_describe(plan.entity_table, p)}, column {column}: mode and distinct count of each"
        " first-hop (key, time)'s window",
        f'SELECT "tve.key", "tve.time", first("value" ORDER BY "n" DESC, "value" ASC) AS "value",\n'
        f'         count(*) AS "distinct"\n'
        f"  FROM {reach.name}\n"
        f"  GROUP BY 1, 2",
        once=True,
    )
    return [reach, best]


def _running_mode_ctes(plan: _QueryPlan, p: tuple[Hop, ...], k: int, column: str) -> list[_Cte]:
    """``several_<j>_<k>`` and ``mode_<j>_<k>``: per (seed time, entity), the mode and
    distinct count of the ``k``-th value column of ``E <- F -> K <- F'`` (see
    :func:`_window_value_ctes`). Pairs with one first-hop (key, time) read them off
    ``at_<j>``; pairs with several sum the counts of every value reached from each
    (``reach_<j>_<k>``): ``several`` sums them per pair, once for all seed times."""
    j, defs = plan.path_number(p), _value_defs(plan, p, column)
    hops = f"{plan.prefix}hops_all_{j}"  # every seed time's: a group reads its own
    group_seeds = f"(SELECT {quote(TIMESTAMP)} FROM {plan.seed_times})"
    values = (
        f'SELECT h.{_SEED_TIME}, h.{_ENTITY}, r."value", sum(h."n" * r."n") AS "n"\n'
        f"          FROM {hops} AS h\n"
        f"          JOIN {_reach_name(plan, p, k)} AS r\n"
        f'            ON r."tve.key" = h."tve.key" AND r."tve.time" = h."tve.time"\n'
        f'         WHERE h."keys" > 1\n'
        f"         GROUP BY 1, 2, 3"
    )
    single: list[tuple[str, str | None]] = [(f"h.{_SEED_TIME}", None), (f"h.{_ENTITY}", None)]
    several: list[tuple[str, str | None]] = [(_SEED_TIME, None), (_ENTITY, None)]
    for d in defs:
        if d.aggregation == "mode":
            single.append((f"b.{quote(f'tve.mode_{k}')}", quote(d.name)))
            several.append(('first("value" ORDER BY "n" DESC, "value" ASC)', quote(d.name)))
        else:
            single.append((f"b.{quote(f'tve.distinct_{k}')}", quote(d.name)))
            several.append(("count(*)", quote(d.name)))
    what = " and ".join(
        "most frequent value (ties -> smallest)" if d.aggregation == "mode" else "distinct values"
        for d in defs
    )
    several_cte = _Cte(
        f"{plan.prefix}several_{j}_{k}",
        f"{_describe(plan.entity_table, p)}, column {column}: {what} of the pairs with several"
        " first-hop (key, time), every seed time",
        f"SELECT {_select(several, '         ')}\n  FROM ({values})\n  GROUP BY 1, 2",
        once=True,
    )
    mode = _Cte(
        f"{plan.prefix}mode_{j}_{k}",
        f"{_describe(plan.entity_table, p)}, column {column}: {what}",
        f"SELECT {_select(single, '         ')}\n"
        f"  FROM {hops} AS h\n"
        f"  JOIN {plan.prefix}at_{j} AS b\n"
        f'    ON b."tve.key" = h."tve.key" AND b."tve.time" = h."tve.time"\n'
        f'  WHERE h."keys" = 1 AND h.{_SEED_TIME} IN {group_seeds}\n'
        f"UNION ALL\n"
        f"SELECT * FROM {several_cte.name}\n"
        f" WHERE {_SEED_TIME} IN {group_seeds}",
    )
    return [several_cte, mode]


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


@dataclass(frozen=True)
class _NativeAggregate:
    """What :func:`_aggregate_rows` reads to make one ``agg_<j>`` (with what its
    ``mode_<j>_<k>`` hold) in process: ``rows_sql`` selects the group's rows as (seed time,
    entity, then each column read); ``targets`` are (name, aggregation, column number in
    those columns, None for the rows themselves), every target of the group's paths."""

    rows_sql: str
    targets: tuple[tuple[str, str, int | None], ...]


@dataclass(frozen=True)
class _Assembly:
    """How :func:`_assemble` makes a group's sparse rows from its steps' tables: the active
    pairs are those of ``base`` (the one window's aggregate), else of every window; each
    target's column comes from the table of its step in ``sources`` (target, step)."""

    windows: tuple[str, ...]
    base: str | None
    sources: tuple[tuple[str, str], ...]


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


def _value_defs(plan: _QueryPlan, path: tuple[Hop, ...], column: str) -> list[TargetDef]:
    return [
        d for d in plan.defs_of(path) if d.column == column and d.aggregation in _VALUE_AGGREGATIONS
    ]


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


# --------------------------------------------------------------------------- running it


@dataclass(frozen=True, eq=False)
class TargetQuery:
    """The raw task vectors to compute, and how: what :func:`iter_targets`,
    :func:`compute_targets`, :func:`write_targets` and :func:`write_targets_by_seed_time` run.

    ``tables`` maps a table name to a pandas frame, an Arrow table or a parquet file path;
    ``schema_tables`` gives each table's keys and time column (a RelBench manifest's
    ``tables``); ``defs`` are the targets of ``entity_table``; ``timestamps`` the seed times
    and ``timedelta`` Δ, the length of the next window. The rest only changes how the query
    runs, never its rows: ``memory_limit`` is the memory budget of the whole computation
    (as DuckDB writes sizes: ``"2GB"``, ``"4GiB"``, ``"50%"``): DuckDB is given half of it as
    its limit (beyond it, operators spill to ``temp_directory``, a fresh temporary folder by
    default) and the work in process is sized to the rest; ``threads`` None keeps
    DuckDB's default; ``seeds_per_query`` groups consecutive seed times per run of the
    query (None: all at once; and never more than 4 million (entity, seed time) pairs a
    group: fewer seed times per query past 250,000 entities); ``show_sql`` prints the
    query; ``running_aggregates=False`` computes fact->key<-fact paths by joining rows (see
    :func:`targets_sql`). ``second_hop_window`` is Δ2, the window ``(τ - Δ2, τ]`` of the
    hop-1 row's time τ that a later "in" hop reads (None: Δ, as the reference).

    >>> query = TargetQuery(frames, manifest.tables, defs, "customers", seeds, Δ)  # doctest: +SKIP
    >>> compute_targets(query)  # or write_targets(query, "targets.parquet")  # doctest: +SKIP
    """

    tables: Mapping[str, Any]
    schema_tables: Mapping[str, TableSpecLike]
    defs: Sequence[TargetDef]
    entity_table: str
    timestamps: Iterable
    timedelta: pd.Timedelta
    memory_limit: str = "4GB"
    threads: int | None = None
    temp_directory: str | None = None
    seeds_per_query: int | None = DEFAULT_SEEDS_PER_QUERY
    show_sql: bool = False
    running_aggregates: bool = True
    second_hop_window: pd.Timedelta | None = None

    def __post_init__(self) -> None:
        # Read once, so that a generator of seed times or definitions can be run again.
        object.__setattr__(self, "defs", tuple(self.defs))
        object.__setattr__(self, "timestamps", tuple(self.timestamps))
        memory_bytes(self.memory_limit)  # a clear error now, not in DuckDB
        if self.second_hop_window is not None:
            _second_window(self.timedelta, self.second_hop_window)

    @property
    def budget(self) -> int:
        """``memory_limit`` in bytes."""
        return memory_bytes(self.memory_limit)


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


def _step_query(step: _Cte) -> str:
    """The query of a step of :func:`_in_process` (of an aggregate: its rows)."""
    return step.native.rows_sql if isinstance(step.native, _NativeAggregate) else step.body


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


def _aggregate_rows(rows, spec: _NativeAggregate):
    """``spec``'s aggregates of ``rows`` (seed time, entity, then the columns read) per
    (seed time, entity), as an Arrow table: the pairs, then one column per target.

    Rows are sorted by pair (Arrow's stable multi-key sort), then reduced per run of a pair
    with NumPy: counts and sums by ``add.reduceat``, min by ``fmin`` (NaN only when every
    value is NaN, as DuckDB's NaN-is-largest ``min``), max by ``maximum`` (NaN wins), std
    in two passes (sample; null under two values); every aggregate but a count is null
    over no values. Mode and distinct count per column: values coded by their rank in
    ascending order (Arrow's order: DuckDB's, NaN last; -0.0 read as 0.0, as DuckDB groups
    them), one sort of (pair, code), then per pair the number of runs and the run with the
    largest count, ties to the smallest code. Numbers are read cast to double, as the SQL's
    ``CAST(... AS DOUBLE)``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    n = rows.num_rows
    order = pc.sort_indices(
        rows.select([0, 1]),
        sort_keys=[(rows.column_names[0], "ascending"), (rows.column_names[1], "ascending")],
    )
    seed, ent = (rows.column(i).take(order).combine_chunks() for i in (0, 1))
    new = np.ones(n, dtype=bool)
    if n > 1:
        same = pc.and_(
            pc.equal(seed.slice(1), seed.slice(0, n - 1)),
            pc.equal(ent.slice(1), ent.slice(0, n - 1)),
        )
        new[1:] = ~same.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(new)
    m = len(starts)
    pair = np.cumsum(new) - 1
    sizes = np.diff(np.append(starts, n))
    out = {"tve.seed_time": seed.take(pa.array(starts)), "tve.entity": ent.take(pa.array(starts))}
    columns: dict[int, Any] = {}
    valids: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    numbers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    values: dict[int, tuple[Any, np.ndarray, np.ndarray]] = {}

    def column(c: int):
        if c not in columns:
            columns[c] = rows.column(2 + c).take(order).combine_chunks()
        return columns[c]

    def reduce(ufunc, x: np.ndarray) -> np.ndarray:
        return ufunc.reduceat(x, starts) if m else x[:0]

    def counted(c: int) -> tuple[np.ndarray, np.ndarray]:
        """(valid; non-null count per pair)"""
        if c not in valids:
            valid = column(c).is_valid().to_numpy(zero_copy_only=False)
            valids[c] = (valid, reduce(np.add, valid.astype(np.int64)))
        return valids[c]

    def number(c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values as double, 0 under nulls; valid; non-null count per pair)"""
        if c not in numbers:
            x = pc.fill_null(pc.cast(column(c), pa.float64()), 0.0)
            numbers[c] = (x.to_numpy(zero_copy_only=False), *counted(c))
        return numbers[c]

    def value_runs(c: int):
        """(sorted distinct values; per pair: distinct count, code of the mode or -1)"""
        if c not in values:
            col = column(c)
            valid = counted(c)[0]
            if not valid.any():
                values[c] = (col.slice(0, 0), np.zeros(m, np.int64), np.full(m, -1, np.int64))
                return values[c]
            if pa.types.is_floating(col.type):  # -0.0 is 0.0, as DuckDB groups them
                col = pc.add(col, pa.scalar(0.0, col.type))
            encoded = pc.dictionary_encode(col)
            ranked = np.asarray(pc.sort_indices(encoded.dictionary))
            k = len(ranked)
            rank_of = np.empty(k, dtype=np.int64)
            rank_of[ranked] = np.arange(k)
            code = rank_of[encoded.indices.to_numpy(zero_copy_only=False)[valid].astype(np.int64)]
            key = np.sort(pair[valid] * k + code)
            first = np.flatnonzero(np.append(True, key[1:] != key[:-1]))
            run_pair, run_code = np.divmod(key[first], k)
            run_len = np.diff(np.append(first, len(key)))
            distinct = np.bincount(run_pair, minlength=m).astype(np.int64)
            pair_first = np.flatnonzero(np.append(True, run_pair[1:] != run_pair[:-1]))
            best = np.maximum.reduceat(run_len * k + (k - 1 - run_code), pair_first)
            mode = np.full(m, -1, dtype=np.int64)
            mode[run_pair[pair_first]] = k - 1 - best % k
            values[c] = (encoded.dictionary.take(pa.array(ranked)), distinct, mode)
        return values[c]

    def doubles(x: np.ndarray, ok: np.ndarray):
        return pa.array(x, type=pa.float64(), mask=~ok)

    for name, aggregation, c in spec.targets:
        if c is None:
            out[name] = pa.array(sizes, type=pa.int64())
        elif aggregation == "count":
            out[name] = pa.array(counted(c)[1], type=pa.int64())
        elif aggregation in ("mode", "count_distinct"):
            ordered, distinct, mode = value_runs(c)
            if aggregation == "count_distinct":
                out[name] = pa.array(distinct, type=pa.int64())
            else:
                out[name] = ordered.take(pa.array(mode, mask=mode < 0))
        else:
            x, valid, count = number(c)
            some = count > 0
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                if aggregation == "min":
                    out[name] = doubles(reduce(np.fmin, np.where(valid, x, np.nan)), some)
                elif aggregation == "max":
                    out[name] = doubles(reduce(np.maximum, np.where(valid, x, -np.inf)), some)
                else:
                    total = reduce(np.add, x)
                    if aggregation == "sum":
                        out[name] = doubles(total, some)
                    elif aggregation == "mean":
                        out[name] = doubles(total / count, some)
                    elif aggregation == "std":
                        dev = np.where(valid, x - (total / np.maximum(count, 1))[pair], 0.0)
                        spread = reduce(np.add, dev * dev) / (count - 1)
                        out[name] = doubles(np.sqrt(spread), count > 1)
                    else:  # pragma: no cover
                        raise ValueError(f"unknown aggregation {aggregation!r}")
    return pa.table(out)


def _prefetch(
    con, run: Callable, relation: str, chunks: list[pd.DataFrame], depth: int = 1
) -> Iterator:
    """Run ``run(con, group)`` once per group of seed times (registered as ``relation``) on
    a background thread, one group ahead.

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
                if not put(run(con, chunk)):
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


#: The rows of ``F'`` (and first-hop (key, time)) of a fact->key<-fact path are scanned
#: with NumPy this many at a time (whole keys: a key's rows are never split): ~25 columns
#: of 8 bytes, ~400 MB with the intermediate arrays.
_LOOKUP_BUCKET_ROWS = 2_000_000


def release_arrow_memory() -> None:
    """Give what Arrow's memory pool holds free back to the system: its default pool
    (mimalloc) keeps freed buffers for reuse, which at 10M rows left ~700 MB of RSS behind
    after reading a table's columns once."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


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


def _window_starts(segment, facts, looks, time, window_ns: int) -> np.ndarray:
    """Of each lookup (positions ``looks``, time τ), the number of rows of ``F'`` (positions
    ``facts``) before its window: rows of earlier keys (``segment``: the key's number) and
    of its key with time <= τ - Δ2. The times are ranked among the bucket's (a row: 1 + the
    times before it; a bound: the times at or before it, so that a row is within a bound
    exactly when its rank is) so that (key, rank) is one int64, in the facts' order, that
    ``searchsorted`` reads (key x time in nanoseconds would overflow)."""
    fact_time = time[facts]
    ordered = np.sort(fact_time)  # (np.unique: 3x the time, for nothing)
    width = len(ordered) + 1
    code = segment[facts] * width + np.searchsorted(ordered, fact_time) + 1
    bound = time[looks] - window_ns
    query = segment[looks] * width + np.searchsorted(ordered, bound, "right")
    return np.searchsorted(code, query, "right")


def _scan_time_ns(column) -> np.ndarray:
    """The scan's times as int64 nanoseconds (a timestamp, with or without a time zone, or a
    date); anything else cannot bound a window of Δ2."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if not (pa.types.is_timestamp(kind) or pa.types.is_date(kind)):
        raise ValueError(f"a fact->key<-fact lookup needs timestamps, got time column type {kind}")
    if pa.types.is_timestamp(kind) and kind.tz is not None:
        column = pc.cast(column, pa.timestamp(kind.unit))
    ns = pc.cast(pc.cast(column, pa.timestamp("ns")), pa.int64())
    return pc.fill_null(ns, np.iinfo(np.int64).min).to_numpy(zero_copy_only=False)


def _window_reduce(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, ufunc, identity):
    """``ufunc`` (add, minimum, maximum) over the rows ``[lo, hi)`` of ``values`` (rows x
    columns) for each window, exactly as a reduction of those rows, without a pass over
    each window's rows: a bottom-up segment tree built one level at a time (only the
    current level is kept, so memory stays that of ``values``). At each level, a window
    whose start is odd takes that node and one whose end is odd the node before it; both
    then halve, and a window is done when its bounds meet. A window of w rows reads at
    most 2 log2(w) nodes; sums are pairwise (error of order log(w) eps of its absolute
    sum, where a difference of prefix sums loses the key's whole history's magnitude)."""
    out = np.full((len(lo), values.shape[1]), identity, dtype=values.dtype)
    idx = np.flatnonzero(lo < hi)
    lo, hi, level = lo[idx], hi[idx], values
    while len(idx):
        take = (lo & 1).astype(bool)
        out[idx[take]] = ufunc(out[idx[take]], level[lo[take]])
        lo = lo + take
        take = (hi & 1).astype(bool) & (lo < hi)
        hi = hi - take
        out[idx[take]] = ufunc(out[idx[take]], level[hi[take]])
        lo, hi = lo >> 1, hi >> 1
        more = lo < hi
        idx, lo, hi = idx[more], lo[more], hi[more]
        if len(idx):
            if len(level) % 2:
                pad = np.full((1, level.shape[1]), identity, dtype=level.dtype)
                level = np.concatenate([level, pad])
            level = ufunc(level[0::2], level[1::2])
    return out


def _window_m2(x: np.ndarray, ok: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Of the values ``x[ok]`` in each ``[lo, hi)``, the sum of squared distances from their
    mean, by the segment tree of :func:`_window_reduce` with (count, sum, m2) per node and
    Chan et al.'s combination (m2 = m2a + m2b + (mean b - mean a)^2 na nb / n): no sum of
    squares about another mean, so the window's own spread keeps its digits."""
    count, total = ok.astype(np.float64), np.where(ok, x, 0.0)
    level = (count, total, np.zeros(len(x)))

    def combine(a, b):
        (na, sa, ma), (nb, sb, mb) = a, b
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = np.where(
                (na > 0) & (nb > 0), sb / np.maximum(nb, 1) - sa / np.maximum(na, 1), 0
            )
            return n, sa + sb, ma + mb + delta * delta * na * nb / np.maximum(n, 1)

    out = (np.zeros(len(lo)), np.zeros(len(lo)), np.zeros(len(lo)))
    idx = np.flatnonzero(lo < hi)
    lo, hi = lo[idx], hi[idx]

    def take(at, where):
        part = combine(tuple(o[idx[where]] for o in out), tuple(v[at] for v in level))
        for o, v in zip(out, part):
            o[idx[where]] = v

    while len(idx):
        left = (lo & 1).astype(bool)
        take(lo[left], left)
        lo = lo + left
        right = (hi & 1).astype(bool) & (lo < hi)
        hi = hi - right
        take(hi[right], right)
        lo, hi = lo >> 1, hi >> 1
        more = lo < hi
        idx, lo, hi = idx[more], lo[more], hi[more]
        if len(idx):
            if len(level[0]) % 2:
                level = tuple(np.append(v, 0.0) for v in level)
            level = combine(tuple(v[0::2] for v in level), tuple(v[1::2] for v in level))
    return out[2]


def _window_counts(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """How many of ``mask`` are set in each ``[lo, hi)``: a difference of prefix counts."""
    prefix = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return prefix[hi] - prefix[lo]


def _lookups_of_bucket(table, spec: _NativeLookups, sizes: list[int]):
    """The ``at`` rows and ``reach`` rows per value column of a run of whole keys (a
    "bucket"), as Arrow tables.

    ``table``: rows of ``F'`` and lookups sorted by (key, time, lookup), so the rows of
    ``F'`` before a lookup in its key's segment are those with time <= τ; its window
    ``(τ - Δ2, τ]`` is the range ``[lo, hi)`` of the rows of ``F'`` in that order (``lo``
    by :func:`_window_starts`). Over each window: counts (rows, non-null values, NaN and
    infinities) are differences of prefix counts, exact; sums (of the finite values, and
    ``std``'s ``m2``, the squared distances from the window's mean, by :func:`_window_m2`)
    and min and max
    (of the values that are not NaN) come from :func:`_window_reduce`. Special values are
    applied as DuckDB's aggregates over the rows do: a sum is +inf / -inf when one is
    reached, NaN with both or a NaN; NaN is the max once reached and the min when every
    value reached is NaN.

    Per value column, the window's count of each value of its key: the rows with a value,
    sorted by (key, value) then position (runs), give each (lookup, run of its key) the
    number of the run's positions in ``[lo, hi)`` (two ``searchsorted``); the mode is the
    largest count x size + size - rank (most rows, then smallest value), the distinct count
    the number of runs with rows in the window. ``reach``: those counts for each lookup of
    a pair with several. Cost: the lookups x the distinct values of their key.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    key = table.column(0).combine_chunks()
    starts = np.ones(n, dtype=bool)
    if n > 1:
        same = pc.equal(key.slice(1), key.slice(0, n - 1))
        starts[1:] = ~pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    segment = np.cumsum(starts) - 1
    lookup = table.column(2).to_numpy(zero_copy_only=False).astype(bool)
    facts = np.flatnonzero(~lookup)
    nf = len(facts)
    looks = np.flatnonzero(lookup)
    hi = np.cumsum(~lookup)[looks]  # rows of F' up to each lookup: its key's time <= τ
    lo = _window_starts(segment, facts, looks, _scan_time_ns(table.column(1)), spec.window_ns)
    reached = hi > lo
    looks, lo, hi = looks[reached], lo[reached], hi[reached]
    take = pa.array(looks)
    at = {"tve.key": key.take(take), "tve.time": table.column(1).take(take), "tve.rows": hi - lo}

    def column(name: str):
        values = table.column(name).combine_chunks().take(pa.array(facts))
        if pa.types.is_boolean(values.type):  # "IS NOT NULL" of a column only counted
            return None, pc.fill_null(values, False).to_numpy(zero_copy_only=False)
        return values.to_numpy(zero_copy_only=False), values.is_valid().to_numpy(
            zero_copy_only=False
        )

    summed: dict[str, np.ndarray] = {}  # output name -> values to sum (before special values)
    lowest: dict[str, np.ndarray] = {}
    highest: dict[str, np.ndarray] = {}
    masks = {}  # output name -> (null, NaN) of a min or max
    for i in dict.fromkeys(number for number, _, _ in spec.pairs):
        x, valid = column(f"tve.v_{i}")
        stats = {s: out for number, s, out in spec.pairs if number == i}
        if "n" in stats:
            at[stats["n"]] = _window_counts(valid, lo, hi)
        if "s" in stats:
            summed[stats["s"]] = np.where(valid, x, 0.0)
        if "m2" in stats:  # NaN when an infinity or NaN is in the window, as stddev_samp
            finite = valid & np.isfinite(x)
            m2 = _window_m2(np.where(finite, x, 0.0).astype(np.float64), finite, lo, hi)
            m2[_window_counts(valid & ~finite, lo, hi) > 0] = np.nan
            at[stats["m2"]] = m2
        if "min" in stats or "max" in stats:  # NaN as DuckDB orders it: above every value
            nan = valid & np.isnan(x)
            ok = valid & ~nan
            none = _window_counts(ok, lo, hi) == 0
            nans = _window_counts(nan, lo, hi) > 0
            if "min" in stats:
                lowest[stats["min"]] = np.where(ok, x, np.inf)
                masks[stats["min"]] = (none & ~nans, nans & none)  # NaN only when all are
            if "max" in stats:
                highest[stats["max"]] = np.where(ok, x, -np.inf)
                masks[stats["max"]] = (none & ~nans, nans)  # NaN once one is reached
    special = {}  # sums over infinities or NaN: what DuckDB's sum gives
    for name, y in summed.items():
        finite = np.isfinite(y)
        if not finite.all():
            up, down, nan = (
                _window_counts(kind, lo, hi) > 0
                for kind in (y == np.inf, y == -np.inf, np.isnan(y))
            )
            special[name] = (up, down, nan | (up & down))
            summed[name] = np.where(finite, y, 0.0)
    for columns, ufunc, identity in (
        (summed, np.add, 0.0),
        (lowest, np.minimum, np.inf),
        (highest, np.maximum, -np.inf),
    ):
        if not columns:
            continue
        names = list(columns)
        stacked = np.column_stack([columns[name].astype(np.float64) for name in names])
        reduced = _window_reduce(stacked, lo, hi, ufunc, identity)
        del stacked
        for c, name in enumerate(names):
            values = reduced[:, c]
            if name in special:
                up, down, nan = special[name]
                values = np.where(up, np.inf, np.where(down, -np.inf, values))
                values[nan] = np.nan
            if name in masks:
                null, nan = masks[name]
                values = pa.array(np.where(nan, np.nan, values), mask=null)
            at[name] = values
    reach = []
    several = table.column(3).to_numpy(zero_copy_only=False).astype(bool)[looks]
    fact_segment = segment[facts]
    for k, size in enumerate(sizes, 1):
        rank = table.column(f"tve.rank_{k}").combine_chunks().take(pa.array(facts))
        rank = pc.fill_null(rank, 0).to_numpy().astype(np.int64)
        counts = _window_value_counts(rank, fact_segment, segment[looks], lo, hi, size, nf)
        which, value, count = counts
        distinct = np.bincount(which, minlength=len(looks)).astype(np.int64)
        best = np.zeros(len(looks), dtype=np.int64)
        if len(which):
            first = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])
            best[which[first]] = np.maximum.reduceat(count * size + size - value, first)
        at[f"tve.rank_{k}"] = pa.array(size - best % size if size else best, mask=best <= 0)
        at[f"tve.distinct_{k}"] = pa.array(distinct, mask=distinct <= 0)
        keep = several[which]
        rows = pa.array(looks[which[keep]])
        reach.append(
            pa.table(
                {
                    "tve.key": key.take(rows),
                    "tve.time": table.column(1).take(rows),
                    "rank": value[keep],
                    "n": count[keep],
                }
            )
        )
    return pa.table(at), reach


#: Up to this many values, a value column's counts per window come from one prefix count
#: per value (a (rows x values) int32 array: 2M rows x 16 values = 136 MB at most).
_DENSE_VALUES = 16


def _window_value_counts(rank, fact_segment, look_segment, lo, hi, size: int, nf: int):
    """For each lookup (key number ``look_segment``, window ``[lo, hi)`` of the rows of
    ``F'``) and each value of its key (``rank`` per row of ``F'``, 0 for null; keys
    ``fact_segment``), the rows of that value in the window, where there are any: (lookup,
    rank, count), by lookup then rank.

    Few values (``_DENSE_VALUES``): a prefix count per value, differenced at each window's
    bounds (lookups x values). Otherwise each lookup meets each value of its key: the rows
    with a value sorted by (key, value) then position (runs), and the run's positions in
    ``[lo, hi)`` counted by two ``searchsorted`` (lookups x the values of their key)."""
    if 0 < size <= _DENSE_VALUES:
        one_hot = np.zeros((len(rank) + 1, size + 1), dtype=np.int32)
        one_hot[np.arange(1, len(rank) + 1), rank] = 1
        prefix = np.cumsum(one_hot, axis=0, out=one_hot)[:, 1:]
        which, value = np.nonzero(prefix[hi] - prefix[lo])
        count = (prefix[hi[which], value] - prefix[lo[which], value]).astype(np.int64)
        return which, value.astype(np.int64) + 1, count
    has = np.flatnonzero(rank > 0)  # rows of F' with a value (positions among facts)
    ids = fact_segment[has] * (size + 1) + rank[has]
    order = np.argsort(ids, kind="stable")  # by (key, value), then position
    ids_sorted = ids[order]
    first = np.r_[True, ids_sorted[1:] != ids_sorted[:-1]] if len(ids) else np.ones(0, bool)
    run_start = np.flatnonzero(first)
    run_ids = ids_sorted[run_start]
    run_segment = run_ids // (size + 1)
    low = np.searchsorted(run_segment, look_segment, "left")
    per = np.searchsorted(run_segment, look_segment, "right") - low
    which = np.repeat(np.arange(len(look_segment)), per)
    runs = low[which] + np.arange(len(which)) - np.repeat(np.cumsum(per) - per, per)
    run_of = np.repeat(np.arange(len(run_start)), np.diff(np.r_[run_start, len(ids_sorted)]))
    composite = run_of * max(nf, 1) + has[order]  # sorted: by run, then position among facts
    base = runs * max(nf, 1)
    count = np.searchsorted(composite, base + hi[which], "left") - np.searchsorted(
        composite, base + lo[which], "left"
    )
    keep = count > 0
    return which[keep], run_ids[runs[keep]] % (size + 1), count[keep]


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


def iter_targets(query: TargetQuery, *, slice_rows: int = DEFAULT_SLICE_ROWS) -> Iterator:
    """The raw task vectors as Arrow tables, in (timestamp, pkey) order, a slice at a time.

    Yields one ``pyarrow.Table`` per seed time and slice of at most ``slice_rows``
    seeds (none for a seed time without seeds; :func:`_seed_cte` says which); together they are
    :func:`compute_targets`' rows. The first one yielded carries the full schema; when
    there is no row at all, a single empty table with that schema is yielded.

    The sparse rows are computed (:func:`_group_query`) once per group of at most
    ``query.seeds_per_query`` consecutive seed times (None: all in one) and 4 million
    (entity, seed time) pairs, set-based within each group, on a background thread one
    group ahead: the working set stays small, and filling in and writing one group's rows
    overlaps computing the next.
    """
    defs, entity_table = list(query.defs), query.entity_table
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be positive, got {slice_rows}")
    seed_times = _seed_times_frame(query.timestamps)
    relation = "timestamps" if "timestamps" not in query.schema_tables else "tve.timestamps"
    shape = dict(
        timestamps_relation=relation,
        running_aggregates=query.running_aggregates,
        second_hop_window=query.second_hop_window,
    )
    if query.show_sql:  # the all-SQL shape (the same rows)
        tables, sql = _split_once(
            query.schema_tables, defs, entity_table, query.timedelta, dense=False, **shape
        )
        print("".join(f"CREATE TEMP TABLE {t.name} AS\n{t.body};\n" for t in tables) + sql)
    tables, steps, assembly = _in_process(
        query.schema_tables, defs, entity_table, query.timedelta, **shape
    )
    used = {entity_table} | {hop.table for d in defs for hop in d.path}
    missing = sorted(used - set(query.tables))
    if missing:
        raise ValueError(f"no data for tables {missing}")

    with _connection(query, used, seed_times, relation) as con:
        _check_inputs(con, query.tables, defs, used)
        first_hops = list(dict.fromkeys(d.path[0] for d in defs))
        entities = _entity_keys(con, query.schema_tables, entity_table, first_hops, query.timedelta)
        pkey = query.schema_tables[entity_table].pkey
        # no seed time: still one query, for the schema
        pairs = min(_GROUP_PAIRS, query.budget // _BYTES_PER_PAIR)
        per_query = max(1, pairs // max(len(entities.keys), 1))
        if query.seeds_per_query is not None:
            per_query = min(per_query, query.seeds_per_query)
        groups = _chunks(seed_times, per_query) or [seed_times]
        spill = con.execute("SELECT current_setting('temp_directory')").fetchall()[0][0]
        os.makedirs(spill, exist_ok=True)
        directory = tempfile.mkdtemp(prefix="tve-groups-", dir=spill)
        try:
            files = _once_tables(
                con, tables, steps, groups, query.timedelta, directory, query.budget
            )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        number = {id(group): g for g, group in enumerate(groups)}

        def run(con, group):
            views = [f.view_sql(name, number[id(group)]) for name, f in files.items()]
            return _group_query(
                con,
                group,
                views=views,
                steps=steps,
                assembly=assembly,
                entities=entities,
                defs=defs,
            )

        results = _prefetch(con, run, relation, groups)
        schema = None
        empty = True
        try:
            for group, rows in zip(groups, results):
                if schema is None:
                    schema = _targets_schema(pkey, entities.arrow_type, rows, defs)
                rows = rows.rename_columns(schema.names)
                for table in _fill_in_group(rows, group, entities, schema, defs, slice_rows):
                    empty = False
                    yield table
                del rows
                release_arrow_memory()
        finally:
            results.close()
            shutil.rmtree(directory, ignore_errors=True)
        if empty:
            yield schema.empty_table()


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


def _to_frame(table, defs: Sequence[TargetDef]) -> pd.DataFrame:
    """Arrow rows -> pandas: counts int64, numeric aggregates float64, a text (or all-null)
    mode object.

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


def compute_targets(query: TargetQuery) -> pd.DataFrame:
    """The raw task vectors of ``query.entity_table`` at every seed time of the query.

    One row per (entity, seed time) for each seed at the seed time (:func:`_seed_cte`),
    sorted by (timestamp, pkey): the pkey column, ``timestamp``, ``inactive`` (int, 1 when no
    path has a next-window row) and one column per target (counts int, numeric aggregates
    float, a mode in the column's own type). For more rows than fit in memory, use
    :func:`write_targets`.
    """
    import pyarrow as pa

    return _to_frame(pa.concat_tables(list(iter_targets(query))), list(query.defs))


def _parquet_options(schema, compression: str) -> dict[str, Any]:
    """Plain-encoded numbers (a dictionary costs a hash per value and task vectors are
    mostly zeros and nulls, which snappy shrinks anyway), dictionaries for text (modes), an
    integer key delta-encoded (sorted within a row group: half the encoding time of plain);
    statistics only for the key, the seed time and ``inactive`` (what a reader filters
    on; those of 30 target columns cost ~15 % of the writer's time); values handed to the
    encoder 64k at a time."""
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
    options = {
        "compression": compression,
        "use_dictionary": text,
        "write_statistics": list(schema.names[:3]),
        "write_batch_size": 1 << 16,
    }
    if pa.types.is_integer(schema.field(0).type):
        options["column_encoding"] = {schema.names[0]: "DELTA_BINARY_PACKED"}
    return options


def _count_rows(stats: dict[str, int], table) -> None:
    stats["rows"] += table.num_rows
    if table.num_rows:
        stats["inactive"] += int(table.column(INACTIVE).to_numpy().sum())


def write_targets(
    query: TargetQuery,
    out_path: str | os.PathLike,
    *,
    slice_rows: int = DEFAULT_SLICE_ROWS,
    compression: str = "snappy",
) -> dict[str, int]:
    """:func:`compute_targets`' rows streamed into one parquet file at ``out_path``, atomically.

    The file is written next to ``out_path`` under a temporary name and moved into place
    when complete (:func:`tve_pipeline.common.atomic_path`: a reader sees the previous file
    or the new one, never a partial one). Rows are in (timestamp, pkey) order, one row
    group per seed time and slice of ``slice_rows`` entities; a writer thread encodes one
    slice while the next is built. Returns ``{"rows": ..., "inactive": ...}``.
    """
    import pyarrow.parquet as pq

    stats = {"rows": 0, "inactive": 0}
    handoff: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def write(tmp: Path) -> None:
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

    with atomic_path(out_path) as tmp:
        thread = threading.Thread(target=write, args=(tmp,), name="tve-targets-writer", daemon=True)
        thread.start()
        try:
            for table in iter_targets(query, slice_rows=slice_rows):
                if failure:
                    break
                _count_rows(stats, table)
                handoff.put(table)
        finally:
            handoff.put(None)
            thread.join()
        if failure:
            raise failure[0]
    return stats


def write_targets_by_seed_time(
    query: TargetQuery,
    out_path_of: Callable[[pd.Timestamp], str | os.PathLike],
    *,
    compression: str = "snappy",
) -> dict[pd.Timestamp, dict[str, int]]:
    """:func:`compute_targets`' rows of each seed time in a parquet file of its own
    (``out_path_of(seed_time)``), from one streamed query over all of them.

    The rows come in seed-time order, so each file is written from start to end and moved
    into place, atomically, before the next begins; a failure leaves earlier files whole
    and the one being written absent. A seed time without seeds gets a file
    without rows. Returns ``{seed_time: {"rows": ..., "inactive": ...}}``.
    """
    times = [pd.Timestamp(t) for t in query.timestamps]
    stats: dict[pd.Timestamp, dict[str, int]] = {}
    schema = None

    def rows() -> Iterator:
        nonlocal schema
        for table in iter_targets(replace(query, timestamps=times)):
            if schema is None:
                schema = table.schema
            if table.num_rows:
                yield table

    def seed_time(table) -> pd.Timestamp:
        return pd.Timestamp(table.column(TIMESTAMP)[0].as_py())

    for t, tables in itertools.groupby(rows(), key=seed_time):
        stats[t] = _write_parquet(out_path_of(t), tables, schema, compression)
    for t in times:
        if t not in stats:  # no seed yet
            stats[t] = _write_parquet(out_path_of(t), [], schema, compression)
    return stats


def _write_parquet(
    path: str | os.PathLike, tables: Iterable, schema, compression: str
) -> dict[str, int]:
    """``tables`` (of ``schema``) in one parquet file at ``path``, a row group each,
    atomically; returns ``{"rows": ..., "inactive": ...}``."""
    import pyarrow.parquet as pq

    stats = {"rows": 0, "inactive": 0}
    options = _parquet_options(schema, compression)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, **options) as writer:
        for table in tables:
            writer.write_table(table, row_group_size=table.num_rows)
            _count_rows(stats, table)
    return stats


def task_vector_aggregations(defs: Iterable[TargetDef]) -> dict[str, str]:
    """target name -> aggregation: what :class:`tve_pipeline.normalise.TaskVectorNormaliser`
    fits on."""
    return {d.name: d.aggregation for d in defs}
