"""Task vectors recomputed in pandas for a few (entity, seed time) pairs: the check on the SQL.

Design. :mod:`tve_pipeline.targets` generates one set-based DuckDB query for every target
of every entity at every seed time; this module computes the same values for a *sample*
of entities at one seed time, from the definitions alone (:class:`TargetDef`, whose
semantics :mod:`tve_pipeline.traversal` states), with nothing shared with the SQL
generator: the first hop keeps the rows that reference a sampled entity with time in the
next window ``(t, t+Δ]`` (the only rows a task vector may read), each later hop follows
the keys with a pandas join ("out": the row the current row references; "in": the rows
that reference the current row with time in ``(τ - Δ2, τ]`` of the hop-1 row's time τ they
were reached from; Δ2 is Δ unless given), and
the values each entity reaches are aggregated one entity at a time. Aggregations are
those of :mod:`tve_pipeline.targets`: ``count`` of the rows (no column) or of the non-null
values, ``count_distinct``, ``sum``/``mean``/``min``/``max`` and the sample ``std`` (null
under two values) of the values as floats, ``mode`` the most frequent non-null value with
ties broken by the smallest; a count over no row is 0, any other aggregate null;
``inactive`` is 1 when no first hop has a next-window row.

:func:`compare_task_vectors` says where two frames of task vectors differ (the file that
``tve_targets`` wrote against the recomputation), within a tolerance scaled to the
magnitude of the values aggregated: a float sum of many values differs in its last bits
with the order of summation, and a ``std`` combined from parts loses digits when
the mean is large.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tve_pipeline.targets import COUNT_AGGREGATIONS, INACTIVE, TIMESTAMP
from tve_pipeline.traversal import Hop, TableSpecLike, TargetDef

_ENTITY = "tve.entity"
_HOP1_TIME = "tve.hop1_time"


def needed_columns(
    schema: Mapping[str, TableSpecLike], defs: Iterable[TargetDef], entity_table: str
) -> dict[str, list[str]]:
    """The columns of each table that the definitions read: keys, times, aggregated columns."""
    cols: dict[str, set[str]] = {entity_table: set()}
    spec = schema[entity_table]
    cols[entity_table] |= {spec.pkey, *([spec.time_col] if spec.time_col else [])}
    for d in defs:
        current = entity_table
        for hop in d.path:
            target = schema[hop.table]
            need = cols.setdefault(hop.table, set())
            if target.time_col:
                need.add(target.time_col)
            if hop.direction == "in":
                need.add(hop.via)
                cols[current].add(schema[current].pkey)
            else:
                cols[current].add(hop.via)
                need.add(target.pkey)
            current = hop.table
        if d.column is not None:
            cols[current].add(d.column)
    return {t: sorted(c) for t, c in cols.items()}


def read_tables(
    files: Mapping[str, str | Path],
    schema: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
) -> dict[str, pd.DataFrame]:
    """The tables the definitions read, as pandas frames of the columns they read only."""
    return {
        table: pd.read_parquet(files[table], columns=columns)
        for table, columns in needed_columns(schema, defs, entity_table).items()
    }


def first_fact_times(
    frames: Mapping[str, pd.DataFrame],
    schema: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
) -> pd.Series:
    """Each entity's first row in a first-hop fact table of ``defs`` (a row that references
    it through that hop's fkey and has a time), by key: what :func:`existing_entities`
    compares with ``t + Δ`` for an entity table without time (the same for every ``t``)."""
    first = pd.concat(
        [
            frames[hop.table]
            .groupby(hop.via)[schema[hop.table].time_col]
            .min()  # NaT (only null-time rows) drops out below
            for hop in dict.fromkeys(d.path[0] for d in defs)
        ]
    )
    return first.groupby(level=0).min()


def existing_entities(
    frames: Mapping[str, pd.DataFrame],
    schema: Mapping[str, TableSpecLike],
    entity_table: str,
    t,
    *,
    defs: Sequence[TargetDef],
    delta: pd.Timedelta,
    first: pd.Series | None = None,
) -> np.ndarray:
    """The keys of the seeds at seed time ``t``, sorted, as the reference's "universal"
    table: with an own time column, the entities whose time is ``<= t`` (a null time never
    exists); without one, those whose first row in a first-hop fact table of ``defs`` (a
    row that references the entity through that hop's fkey and has a time) is ``<= t + Δ``
    (visualization/rel-hm/user-tve-1-hop.ipynb, cell 1, lines 24-49, over seed times a
    step of Δ apart); every row when no definition has a first hop (none can: a target's
    first hop is "in" a time-stamped fact table). ``first``: :func:`first_fact_times` of
    ``defs``, when the caller asks for many seed times."""
    spec = schema[entity_table]
    table = frames[entity_table]
    keys = table[spec.pkey]
    if spec.time_col is not None:
        keys = keys[table[spec.time_col] <= pd.Timestamp(t)]
    elif defs:
        if first is None:
            first = first_fact_times(frames, schema, defs)
        seeds = first.index[(first <= pd.Timestamp(t) + delta).to_numpy()]
        keys = keys[keys.isin(seeds)]
    return np.sort(keys.dropna().to_numpy())


def _join(left_keys: pd.Series, right_keys: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i, j) of every pair with ``left_keys[i] == right_keys[j]``, nulls never equal."""
    left = pd.DataFrame({"k": pd.to_numeric(left_keys.to_numpy()), "i": np.arange(len(left_keys))})
    right = pd.DataFrame(
        {"k": pd.to_numeric(right_keys.to_numpy()), "j": np.arange(len(right_keys))}
    )
    pairs = left.dropna(subset=["k"]).merge(right.dropna(subset=["k"]), on="k")
    return pairs["i"].to_numpy(), pairs["j"].to_numpy()


def _walk(
    frames: Mapping[str, pd.DataFrame],
    schema: Mapping[str, TableSpecLike],
    path: tuple[Hop, ...],
    entities: np.ndarray,
    t: pd.Timestamp,
    delta: pd.Timedelta,
    second: pd.Timedelta,
) -> pd.DataFrame:
    """The rows of the path's last table that each entity reaches, with join multiplicity:
    the last table's columns plus the entity's key (``tve.entity``); a later "in" hop into
    a time-stamped table keeps the rows in ``(τ - second, τ]`` of the hop-1 row's time τ."""
    first = path[0]
    table = frames[first.table]
    time = table[schema[first.table].time_col]
    keep = table[first.via].isin(entities) & (time > t) & (time <= t + delta)
    rows = table.loc[keep].reset_index(drop=True)
    entity = rows[first.via].to_numpy()
    hop1_time = rows[schema[first.table].time_col].to_numpy()
    current = first.table
    for hop in path[1:]:
        spec, nxt = schema[hop.table], frames[hop.table]
        if hop.direction == "out":
            i, j = _join(rows[hop.via], nxt[spec.pkey])
        elif spec.time_col is None:
            i, j = _join(rows[schema[current].pkey], nxt[hop.via])
        else:  # in (τ - Δ2, τ] of the hop-1 row's τ (null: never)
            # only the rows that some hop-1 row's window can keep are joined (rel-flights: a
            # week's flights, not the year's); then each pair is held to its own τ
            times = nxt[spec.time_col]
            near = (
                np.flatnonzero(
                    ((times > hop1_time.min() - second) & (times <= hop1_time.max())).to_numpy()
                )
                if len(rows)
                else np.arange(0)
            )
            i, j = _join(rows[schema[current].pkey], nxt[hop.via].iloc[near])
            j = near[j]
            later = times.to_numpy()[j]
            tau = hop1_time[i]
            ok = ~pd.isna(later) & (later <= tau) & (later > tau - second)
            i, j = i[ok], j[ok]
        rows = nxt.iloc[j].reset_index(drop=True)
        entity, hop1_time = entity[i], hop1_time[i]
        current = hop.table
    return rows.assign(**{_ENTITY: entity})


def _is_null(value) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def aggregate(aggregation: str, values: np.ndarray) -> object:
    """One aggregate of the non-null values one entity reaches."""
    if aggregation == "count":
        return len(values)
    if aggregation == "count_distinct":
        return len(set(values.tolist()))
    if not len(values):
        return None
    if aggregation == "mode":
        counts = Counter(values.tolist())
        best = max(counts.values())
        return min(v for v, n in counts.items() if n == best)
    x = values.astype(float)
    if aggregation == "sum":
        return math.fsum(x)
    if aggregation == "mean":
        return math.fsum(x) / len(x)
    if aggregation == "min":
        return float(x.min())
    if aggregation == "max":
        return float(x.max())
    if aggregation == "std":
        if len(x) < 2:
            return None
        mean = math.fsum(x) / len(x)
        return math.sqrt(math.fsum((x - mean) ** 2) / (len(x) - 1))
    raise ValueError(f"unknown aggregation {aggregation!r}")


def _magnitude(aggregation: str, values: np.ndarray) -> float:
    """The scale a float aggregate's rounding error grows with: the sum of the absolute
    values for a sum, the largest absolute value otherwise."""
    x = np.abs(values.astype(float))
    if not len(x):
        return 0.0
    return math.fsum(x) if aggregation == "sum" else float(x.max())


def _by_entity(rows: pd.DataFrame, column: str) -> dict[object, np.ndarray]:
    """The non-null values of ``column`` in ``rows``, per entity."""
    keep = rows[column].notna().to_numpy()
    entity = rows[_ENTITY].to_numpy()[keep]
    values = rows[column].to_numpy()[keep]
    order = np.argsort(entity, kind="stable")
    entity, values = entity[order], values[order]
    keys, starts = np.unique(entity, return_index=True)
    return dict(zip(keys.tolist(), np.split(values, starts[1:])))


@dataclass
class RecomputedTaskVectors:
    """Recomputed rows (the entity's key, ``timestamp``, ``inactive``, one column per target)
    and, per (target, entity), the magnitude of the values behind each float aggregate."""

    frame: pd.DataFrame
    magnitude: dict[tuple[str, object], float]
    #: (target, entity) not recomputed: the entity's path would join more rows than allowed
    unchecked: set[tuple[str, object]] = field(default_factory=set)


def recompute_task_vectors(
    frames: Mapping[str, pd.DataFrame],
    schema: Mapping[str, TableSpecLike],
    defs: Sequence[TargetDef],
    entity_table: str,
    entities: Sequence,
    seed_time,
    delta: pd.Timedelta,
    *,
    max_joined_rows: int | None = None,
    second_hop_window: pd.Timedelta | None = None,
) -> RecomputedTaskVectors:
    """The raw task vectors of ``entities`` (keys of ``entity_table``) at ``seed_time``, from
    the next-window rows only, in the order of ``entities``. With ``max_joined_rows``, the
    fact->key<-fact targets of the entities past that many joined rows (in order) are left
    out (``unchecked``). ``second_hop_window``: Δ2 of a later "in" hop (None: ``delta``)."""
    t = pd.Timestamp(seed_time)
    second = pd.Timedelta(delta if second_hop_window is None else second_hop_window)
    entities = np.asarray(entities)
    pkey = schema[entity_table].pkey
    first_hops = list(dict.fromkeys(d.path[:1] for d in defs))
    reached, left_out = {}, {}
    for path in dict.fromkeys([*first_hops, *(d.path for d in defs)]):
        some = _within(frames, schema, path, entities, t, delta, max_joined_rows)
        left_out[path] = set(entities.tolist()) - set(some.tolist())
        reached[path] = _walk(frames, schema, path, some, t, delta, second)
    unchecked = {(d.name, e) for d in defs for e in left_out[d.path]}
    active = set().union(*(reached[h][_ENTITY].tolist() for h in first_hops))
    values: dict[tuple, dict] = {}  # (path, column) -> entity -> the values it reaches
    for d in defs:
        rows = reached[d.path]
        column = d.column or _ENTITY  # a row count counts the entity key of each row
        if (d.path, column) not in values:
            values[(d.path, column)] = _by_entity(rows, column)
    empty = np.array([], dtype=object)
    out, magnitude = [], {}
    for e in entities.tolist():
        record = {pkey: e, TIMESTAMP: t, INACTIVE: 0 if e in active else 1}
        for d in defs:
            reached_values = values[(d.path, d.column or _ENTITY)].get(e, empty)
            record[d.name] = aggregate(d.aggregation, reached_values)
            if d.column is not None and d.aggregation not in COUNT_AGGREGATIONS | {"mode"}:
                magnitude[(d.name, e)] = _magnitude(d.aggregation, reached_values)
        out.append(record)
    columns = [pkey, TIMESTAMP, INACTIVE, *[d.name for d in defs]]
    return RecomputedTaskVectors(pd.DataFrame(out, columns=columns), magnitude, unchecked)


def _within(
    frames: Mapping[str, pd.DataFrame],
    schema: Mapping[str, TableSpecLike],
    path: tuple[Hop, ...],
    entities: np.ndarray,
    t: pd.Timestamp,
    delta: pd.Timedelta,
    max_joined_rows: int | None,
) -> np.ndarray:
    """The entities, in order, while the rows that ``E <- F -> K <- F'`` joins for them stay
    within ``max_joined_rows`` (each first-hop row joins every row of ``F'`` with its key:
    through a hub, millions per entity); every entity for other paths or no limit."""
    exploding = len(path) == 3 and path[1].direction == "out" and path[2].direction == "in"
    if max_joined_rows is None or not exploding:
        return entities
    first, table = path[0], frames[path[0].table]
    time = table[schema[first.table].time_col]
    rows = table.loc[table[first.via].isin(entities) & (time > t) & (time <= t + delta)]
    per_key = frames[path[2].table][path[2].via].value_counts()
    cost = rows[path[1].via].map(per_key).fillna(0).groupby(rows[first.via]).sum()
    costs = pd.Series(entities).map(cost).fillna(0).to_numpy()
    return entities[np.cumsum(costs) <= max_joined_rows]


@dataclass(frozen=True)
class Difference:
    """One value of a task vector that differs from its recomputation; ``by`` is the
    absolute difference of two numbers (None when one side is null or not a number)."""

    target: str
    entity: object
    got: object
    want: object
    by: float | None


def _number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _differs(aggregation: str, got, want, tol: float) -> tuple[bool, float | None]:
    if _is_null(got) or _is_null(want):
        return _is_null(got) != _is_null(want), None
    if not (_number(got) and _number(want)):
        return got != want, None
    by = abs(float(got) - float(want))
    if aggregation in COUNT_AGGREGATIONS or aggregation == "mode":
        return by > 1e-12 * max(abs(float(want)), 1.0), by
    return by > tol, by


def compare_task_vectors(
    got: pd.DataFrame,
    want: RecomputedTaskVectors,
    defs: Sequence[TargetDef],
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
) -> list[Difference]:
    """Every value of ``got`` (rows keyed by the entity's key, the first column of
    ``want.frame``) that differs from the recomputation: counts, ``inactive`` and modes
    exactly, float aggregates within ``abs_tol + rel_tol x`` the larger of the value and
    the magnitude of the values aggregated. An entity missing from ``got`` differs in
    every target."""
    key = want.frame.columns[0]
    rows = {r[key]: r for r in got.to_dict("records")}
    checks = [(INACTIVE, "count"), *((d.name, d.aggregation) for d in defs)]
    differences = []
    for record in want.frame.to_dict("records"):
        e = record[key]
        have = rows.get(e)
        for name, aggregation in checks:
            if (name, e) in want.unchecked:
                continue
            g = None if have is None else have.get(name)
            w = record[name]
            tol = abs_tol + rel_tol * max(
                abs(float(w)) if _number(w) else 0.0, want.magnitude.get((name, e), 0.0)
            )
            differs, by = _differs(aggregation, g, w, tol)
            if differs or have is None:
                differences.append(Difference(name, e, g, w, by))
    return differences
