"""Which targets make the task vector: chosen by hand or from the schema, then the null and
constant ones left out.

Design. The traversal graph (:mod:`tve_pipeline.traversal`) is built from the schema alone,
so it holds targets that carry nothing: a path that is empty by construction (every
rel-flights flight leaves New York, so from a plane's flights
``flights>airports[dest_id]<flights[origin_id]`` reaches no row, nor
``flights>airports[dest_id]<weather``: weather is recorded at the New York airports only),
a column that is constant on the rows a path reaches (the origin airport's time zone). The
normaliser is
fitted on the *active training rows* (DESIGN.md section 1, step 3) and maps such a target
to the same value on every one of them (missing -> 0; min-max of a constant -> 0), so it
adds width and nothing to predict. :func:`select_targets` leaves it out:

    a target is kept iff some active training row (``inactive = 0`` at a training seed
    time) has a value for it, and its values there are not all the same.

"The same" compares the non-null values: a target with one distinct value and nulls
elsewhere is left out too (numeric: min-max maps it to 0 everywhere; a mode: its one
category says only that the path reached a non-null value, which the column's ``count``
on the same path says already).

How it is decided: by the targets engine itself. :func:`profile_targets` runs
:func:`tve_pipeline.targets.iter_targets` over every training seed time and streams, per
target, over the active rows only: how many there are, how many have a value, and the
smallest and largest value (Arrow's ``min_max``; for a mode of a text column the order of
the strings). A target is constant iff its smallest and largest non-null values are equal.
That is exact (the very rows the normaliser is fitted on, computed by the code that writes
them), and stays so whatever the engine's path semantics become (bounded second hops,
which entities are seeds): nothing here re-implements a path. It costs one run of the
engine over the training seed times, once per traversal graph: measured
(``bench/bench_target_selection.py``) 0.5x a ``tve_targets`` backfill of the same seed
times on rel-f1 drivers (38 s), 1.0x on rel-flights planes (17 s), the statistics
themselves under a second. A cheaper exact test would have to re-derive, per aggregation,
when the values a path reaches are all equal, i.e. re-implement the engine's semantics,
and drift from them as they change.

Hand-picked target sets (:class:`TargetPick`, the recipe's ``targets.select``) name paths
as the traversal names them (``results>constructors<results``), a subset of the last
table's columns and of the aggregations, as the reference's notebooks pick theirs
(``generate_task_vector_clauses(path, cols=..., exclude_mode_cols=...)`` in
``src/helpers/task_vector_generation_helper.py``); a bad name fails in one line that names
the entity table, the path or the column. Picked targets are pruned like the others.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tve_pipeline.config import TargetPick
from tve_pipeline.targets import INACTIVE, TargetQuery, iter_targets
from tve_pipeline.traversal import (
    AGGREGATIONS_BY_STYPE,
    TableSpecLike,
    TargetDef,
    build_traversal_graph,
    path_name,
)

#: Why a target is left out when no active training row has a value for it.
NULL_EVERYWHERE = "null in every active training row"


@dataclass
class TargetProfile:
    """A target over the active training rows: how many, how many with a value, the range."""

    name: str
    aggregation: str
    active_rows: int = 0
    non_null: int = 0
    low: Any = None
    high: Any = None

    def add(self, low: Any, high: Any, non_null: int, rows: int) -> None:
        self.active_rows += rows
        self.non_null += non_null
        if non_null:
            self.low = low if self.low is None or low < self.low else self.low
            self.high = high if self.high is None or high > self.high else self.high

    @property
    def reason(self) -> str | None:
        """Why the target is left out, or None when it is kept."""
        if self.non_null == 0:
            return NULL_EVERYWHERE if self.active_rows else "no active training row"
        if self.low == self.high:
            nulls = self.active_rows - self.non_null
            rest = f" (null in the other {nulls:,})" if nulls else ""
            return f"constant {_shown(self.low)} over {self.non_null:,} active training rows{rest}"
        return None


def _shown(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return repr(value) if isinstance(value, str) else str(value)


def profile_targets(query: TargetQuery) -> list[TargetProfile]:
    """Every target of ``query`` over the active rows of its seed times, in definition order,
    streamed from :func:`~tve_pipeline.targets.iter_targets` (one Arrow slice at a time)."""
    import pyarrow.compute as pc

    profiles = [TargetProfile(d.name, d.aggregation) for d in query.defs]
    for table in iter_targets(query):
        active = table.filter(pc.equal(table.column(INACTIVE), 0))
        if active.num_rows == 0:
            continue
        for p in profiles:
            column = active.column(p.name)
            non_null = active.num_rows - column.null_count
            if non_null:
                span = pc.min_max(column)
                p.add(span["min"].as_py(), span["max"].as_py(), non_null, active.num_rows)
            else:
                p.add(None, None, 0, active.num_rows)
    return profiles


@dataclass
class TargetSelection:
    """The targets kept, those left out (with the reason), and what deciding it cost."""

    kept: list[TargetDef]
    left_out: list[dict] = field(default_factory=list)  # target, aggregation, reason
    profiles: list[TargetProfile] = field(default_factory=list)
    seconds: float = 0.0


def select_targets(query: TargetQuery) -> TargetSelection:
    """``query.defs`` less the targets null or constant on the active rows of
    ``query.timestamps`` (the training seed times): see the module docstring."""
    start = time.perf_counter()
    profiles = profile_targets(query)
    kept, left_out = [], []
    for d, p in zip(query.defs, profiles):
        if p.reason is None:
            kept.append(d)
        else:
            left_out.append({"target": d.name, "aggregation": d.aggregation, "reason": p.reason})
    return TargetSelection(kept, left_out, profiles, time.perf_counter() - start)


# --------------------------------------------------------------------------- by hand


def picked_targets(
    tables: Mapping[str, TableSpecLike],
    column_types: Mapping[str, Mapping[str, str]],
    entity_table: str,
    picks: Sequence[TargetPick],
) -> list[TargetDef]:
    """The targets of ``picks``, in the order picked, from the full two-hop traversal graph
    of ``entity_table`` (every path kind; the recipe's ``hops`` and ``fact_key_fact`` bound
    only the generated graph). A name that is not there fails in one line."""
    every = build_traversal_graph(tables, column_types, entity_table, hops=2, fact_key_fact=True)
    by_path: dict[str, list[TargetDef]] = {}
    for d in every:
        by_path.setdefault(path_name(tables, entity_table, d.path), []).append(d)
    # a path may also be named fully qualified (table[via] at every hop)
    qualified = {
        path_name(tables, entity_table, defs[0].path, qualify=True): label
        for label, defs in by_path.items()
    }
    chosen: list[TargetDef] = []
    for pick in picks:
        label = pick.path if pick.path in by_path else qualified.get(pick.path)
        if label is None:
            raise ValueError(
                f"entity table {entity_table!r}: no path {pick.path!r} in its traversal graph "
                f"(paths: {', '.join(by_path)})"
            )
        defs = by_path[label]
        last = defs[0].last_table
        usable = {d.column: column_types[last][d.column] for d in defs if d.column is not None}
        for column in pick.columns or ():
            if column not in usable:
                raise ValueError(
                    f"entity table {entity_table!r}, path {label!r}: table {last!r} has no "
                    f"usable column {column!r} (usable: {', '.join(usable) or 'none'})"
                )
        columns = list(usable) if pick.columns is None else list(dict.fromkeys(pick.columns))
        for agg in pick.aggregations or ():
            if not any(agg in AGGREGATIONS_BY_STYPE[usable[c]] for c in columns):
                raise ValueError(
                    f"entity table {entity_table!r}, path {label!r}: aggregation {agg!r} fits "
                    f"no picked column of {last!r} ("
                    + ", ".join(f"{c}: {usable[c]}" for c in columns)
                    + ")"
                )
        if pick.count:
            chosen += [d for d in defs if d.column is None]
        for column in columns:
            wanted = AGGREGATIONS_BY_STYPE[usable[column]]
            if pick.aggregations is not None:
                wanted = tuple(a for a in wanted if a in pick.aggregations)
            chosen += [d for d in defs if d.column == column and d.aggregation in wanted]
    names = [d.name for d in chosen]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"entity table {entity_table!r}: targets picked twice: {twice[:5]}")
    return chosen


def check_picked_entities(picked: Iterable[str], entity_tables: Sequence[str]) -> None:
    """Every entity table named in a hand-picked target set is one the database pre-trains."""
    for entity in picked:
        if entity not in entity_tables:
            raise ValueError(
                f"targets.select names entity table {entity!r}, which no task of the database "
                f"has (entity tables: {', '.join(entity_tables) or 'none'})"
            )


def traversal_targets(
    tables: Mapping[str, TableSpecLike],
    column_types: Mapping[str, Mapping[str, str]],
    entity_table: str,
    config,
) -> list[TargetDef]:
    """The targets of ``entity_table`` before pruning: the recipe's hand-picked set
    (``config.select``, a :class:`~tve_pipeline.config.TargetConfig`) when it names the
    entity table, else the schema's traversal graph at ``config.hops``."""
    picks = (config.select or {}).get(entity_table)
    if picks is not None:
        return picked_targets(tables, column_types, entity_table, picks)
    return build_traversal_graph(
        tables,
        column_types,
        entity_table,
        hops=config.hops,
        fact_key_fact=config.fact_key_fact,
    )
