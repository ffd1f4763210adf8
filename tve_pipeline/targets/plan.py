"""The plan the SQL is written from, and what it hands to the in-process engine.

:class:`_QueryPlan` holds the names that every CTE shares (the definitions' paths,
numbered; each first hop's window; the seed-time relation; the literals of Δ and Δ2; a
prefix of every CTE name when a table's name would collide with one). Each CTE is a
:class:`_Cte`; one that :func:`~tve_pipeline.targets.iter_targets` computes in process
carries what the engine reads instead of its SQL: :class:`_NativeAggregate` (the
aggregates of a window, :mod:`.windows`) or :class:`_NativeLookups` (the lookups of a
fact->key<-fact path, :mod:`.lookups`); :class:`_Assembly` says how a group's tables become
its rows (:mod:`.assemble`). The SQL modules write these; the engine modules only read them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd

from tve_pipeline.targets.names import interval_sql, quote
from tve_pipeline.targets.query import _second_window
from tve_pipeline.traversal import Hop, TableSpecLike, TargetDef, paths_of

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


def _value_defs(plan: _QueryPlan, path: tuple[Hop, ...], column: str) -> list[TargetDef]:
    return [
        d for d in plan.defs_of(path) if d.column == column and d.aggregation in _VALUE_AGGREGATIONS
    ]


def _step_query(step: _Cte) -> str:
    """The query of a step of :func:`_in_process` (of an aggregate: its rows)."""
    return step.native.rows_sql if isinstance(step.native, _NativeAggregate) else step.body
