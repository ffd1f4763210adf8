"""The CTEs of a fact->key<-fact path ``E <- F -> K <- F'``: per-key lookups of windows.

The rows of ``F'`` that a first-hop row reaches are those with its key and a time in
``(τ - Δ2, τ]`` of the hop-1 row's time τ (Δ2 is Δ unless the query says otherwise, as
the reference's ``t1 <= t0 AND t1 > t0 - Δ``): they depend on the row's (key, τ) only, so
``at_<j>`` aggregates each distinct (key, τ) of every seed time's windows once (from
``per_time_<j>``, ``F'`` per (key, time): count, sum, min, max, squared distances) and
``agg_<j>`` combines them per (seed time, entity), where joining rows costs (hop-1 rows of
every seed time) x (rows of the key in Δ2); ``counts_<j>_<k>``, ``reach_<j>_<k>`` and
``best_<j>_<k>`` do the same per (key, value) for modes and distinct counts, exactly.
These tables read no seed time: :func:`~tve_pipeline.targets.iter_targets` computes them
once for all its groups of seed times, and makes the lookups (``at_<j>``,
``reach_<j>_<k>``) in process (:mod:`.lookups`, from the :class:`~.plan._NativeLookups`
that :func:`_native_lookups` writes), never materialising ``per_time``, ``counts``,
``reach`` or ``best``; ``--show-sql``'s script keeps the SQL of all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tve_pipeline.targets.names import _ENTITY, _SEED_TIME, TIMESTAMP, _describe, _select, quote
from tve_pipeline.targets.plan import (
    _VALUE_AGGREGATIONS,
    _Cte,
    _NativeLookups,
    _QueryPlan,
    _value_defs,
)
from tve_pipeline.traversal import Hop, TargetDef


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
