"""Raw task vectors: next-window aggregates of every target of the traversal graph, in DuckDB.

Design. :func:`targets_sql` turns a list of :class:`~tve_pipeline.traversal.TargetDef`
into one set-based DuckDB query over *all* seed times at once: the seed times are a
relation ``timestamps(timestamp)`` (as in RelBench task SQL); each distinct first hop
``E <- F`` is a ``window_<i>`` CTE that range-joins the fact rows to the seed times
(``t < time <= t + Δ``, the next window); each distinct path is a ``path_<j>`` CTE that
follows the remaining hops with plain joins (so values keep their join multiplicity; a
later "in" hop into a time-stamped table keeps rows no later than the hop-1 row), and an
``agg_<j>`` CTE (plus one ``mode_<j>_<k>`` CTE per categorical mode) aggregates it per
(seed time, entity). The ``seed`` CTE lists the entities that exist at each seed time
(their own time column ``<= t``, so a null time never exists; every row when the table has
no time column); the result
left-joins every aggregate onto it, so an entity with an empty next window gets counts 0,
every other aggregate null and ``inactive = 1``. :func:`compute_targets` runs the query in
an in-memory DuckDB with a memory limit (large inputs spill to a temporary directory
instead of being killed) and returns one row per (entity, seed time) with the raw values;
normalisation is :mod:`tve_pipeline.normalise`'s job.

Every identifier is double-quoted (``"`` doubled), so tables and columns may hold spaces
and quotes. Aggregation semantics: ``count`` counts the rows reached (``column`` null) or
the non-null values; ``count_distinct`` the distinct non-null values; ``sum``, ``mean``,
``min``, ``max`` and ``std`` (sample, null for fewer than two values) are computed on the
values cast to DOUBLE; ``mode`` is the most frequent non-null value, ties broken by the
smallest value, and keeps the column's type.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from tve_pipeline.traversal import NUMERIC_AGGREGATIONS, Hop, TableSpecLike, TargetDef, paths_of

#: Column that marks an (entity, seed time) with no next-window row on any path.
INACTIVE = "inactive"
#: Column of the seed time in the result (and of the registered seed-time relation).
TIMESTAMP = "timestamp"

# Internal column names of the generated CTEs; dotted so that no real column is mistaken for them.
_SEED_TIME = '"tve.seed_time"'
_ENTITY = '"tve.entity"'


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
        raise ValueError(f"entity table {entity_table!r} is not in the schema or has no primary key")
    names = [d.name for d in defs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate target names: {sorted({n for n in names if names.count(n) > 1})}")
    reserved = {schema_tables[entity_table].pkey, TIMESTAMP, INACTIVE}
    if reserved & set(names):
        raise ValueError(f"target names clash with output columns: {sorted(reserved & set(names))}")
    if len(reserved) < 3:
        raise ValueError(f"the primary key of {entity_table!r} may not be named {TIMESTAMP!r} or {INACTIVE!r}")
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
                    raise ValueError(f"target {d.name!r}: {hop.table}.{hop.via} does not reference {current!r}")
                if i == 0 and spec.time_col is None:
                    raise ValueError(f"target {d.name!r}: first-hop table {hop.table!r} has no time column")
            else:
                if schema_tables[current].fkeys.get(hop.via) != hop.table or spec.pkey is None:
                    raise ValueError(f"target {d.name!r}: {current}.{hop.via} does not reference {hop.table!r}")
            current = hop.table
        if d.column is not None and d.column.startswith("tve."):
            raise ValueError(f"target {d.name!r}: column names starting with 'tve.' are reserved")


_CTE_NAME = r"(seed|active|(window|path|agg)_\d+|mode_\d+_\d+)"


def _cte_prefix(schema_tables: Mapping[str, TableSpecLike]) -> str:
    """'' unless a table's name would be shadowed by a CTE name (DuckDB names are case-insensitive)."""
    for prefix in ("", "tve_"):
        pattern = re.compile(re.escape(prefix) + _CTE_NAME, re.IGNORECASE)
        if not any(pattern.fullmatch(str(t)) for t in schema_tables):
            return prefix
    raise ValueError(f"table names {list(schema_tables)} collide with the query's CTE names")


def _aggregate_sql(d: TargetDef) -> str:
    if d.column is None:
        return "count(*)"
    col = quote(d.column)
    as_double = f"CAST({col} AS DOUBLE)"
    return {
        "count": f"count({col})",
        "count_distinct": f"count(DISTINCT {col})",
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
) -> str:
    """The DuckDB query computing the raw task vectors of ``entity_table`` for every seed time.

    It reads each table of the schema as a relation of the same name and the seed times as
    ``timestamps_relation(timestamp)``; output columns: the entity's pkey, ``timestamp``,
    ``inactive``, then one column per target in ``defs`` order.
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
    path_of = {p: i for i, p in enumerate(paths, 1)}

    # Columns each window keeps of its fact rows: entity fkey, time, whatever later hops read.
    window_cols: dict[Hop, list[str]] = {h: [h.via, schema_tables[h.table].time_col] for h in first_hops}
    for p in paths:
        keep = window_cols[p[0]]
        if len(p) > 1:
            keep.append(schema_tables[p[0].table].pkey if p[1].direction == "in" else p[1].via)
        else:
            keep.extend(d.column for d in defs if d.path == p and d.column is not None)
    ctes: list[tuple[str, str, str]] = []  # (name, comment, body)

    # seed: the entities that exist at each seed time.
    e_items = [(f"ts.{quote(TIMESTAMP)}", _SEED_TIME), (f"e.{quote(entity.pkey)}", _ENTITY)]
    if entity.time_col is None:
        seed_from = f"FROM {ts} AS ts\n  CROSS JOIN {quote(entity_table)} AS e"
    else:
        seed_from = (
            f"FROM {ts} AS ts\n  JOIN {quote(entity_table)} AS e"
            f" ON e.{quote(entity.time_col)} <= ts.{quote(TIMESTAMP)}"
        )
    ctes.append((f"{prefix}seed", f"{entity_table} rows that exist at each seed time",
                 f"SELECT {_select(e_items, '         ')}\n  {seed_from}"))

    # window_<i>: first-hop fact rows in the next window (t, t + Δ] of each seed time.
    for hop, name in window_of.items():
        fact = schema_tables[hop.table]
        time = f"f.{quote(fact.time_col)}"
        items = [(f"ts.{quote(TIMESTAMP)}", _SEED_TIME)]
        items += [(f"f.{quote(c)}", None) for c in dict.fromkeys(window_cols[hop])]
        body = (
            f"SELECT {_select(items, '         ')}\n"
            f"  FROM {ts} AS ts\n"
            f"  JOIN {quote(hop.table)} AS f\n"
            f"    ON {time} >  ts.{quote(TIMESTAMP)}\n"
            f"   AND {time} <= ts.{quote(TIMESTAMP)} + {next_window}\n"
            f"  WHERE f.{quote(hop.via)} IS NOT NULL"
        )
        ctes.append((name, f"next window: {hop.table} rows via {hop.table}.{hop.via}", body))

    # active: (seed time, entity) pairs with at least one first-hop row on any path.
    active_parts = [
        f"SELECT {_SEED_TIME}, {quote(h.via)} AS {_ENTITY} FROM {window_of[h]}" for h in first_hops
    ]
    ctes.append((f"{prefix}active", "entities with any next-window row",
                 "SELECT DISTINCT * FROM (\n    " + "\n    UNION ALL\n    ".join(active_parts) + "\n  )"))

    # path_<j>, agg_<j>, mode_<j>_<k>: the rows each path reaches and their aggregates.
    outputs: list[tuple[str, str]] = []  # (source alias, target name) in defs order
    joins: list[tuple[str, str]] = []  # (cte name, alias)
    output_of: dict[str, str] = {}
    projections: set[str] = set()  # 1-hop paths: a projection of their window, not worth materialising
    for p, j in path_of.items():
        pdefs = [d for d in defs if d.path == p]
        last = f"h{len(p)}"
        values = list(dict.fromkeys(d.column for d in pdefs if d.column is not None))
        items = [(f"h1.{_SEED_TIME}", _SEED_TIME), (f"h1.{quote(p[0].via)}", _ENTITY)]
        items += [(f"{last}.{quote(c)}", None) for c in values]
        lines = [f"FROM {window_of[p[0]]} AS h1"]
        hop1_time = f"h1.{quote(schema_tables[p[0].table].time_col)}"
        for k, hop in enumerate(p[1:], 2):
            prev, cur, spec = f"h{k - 1}", f"h{k}", schema_tables[hop.table]
            if hop.direction == "out":
                cond = f"{cur}.{quote(spec.pkey)} = {prev}.{quote(hop.via)}"
            else:
                prev_table = p[k - 2].table
                cond = f"{cur}.{quote(hop.via)} = {prev}.{quote(schema_tables[prev_table].pkey)}"
                if spec.time_col is not None:
                    cond += f"\n   AND {cur}.{quote(spec.time_col)} <= {hop1_time}"
            lines.append(f"JOIN {quote(hop.table)} AS {cur}\n    ON {cond}")
        path_cte = f"{prefix}path_{j}"
        if len(p) == 1:
            projections.add(path_cte)
        ctes.append((path_cte, _describe(entity_table, p),
                     f"SELECT {_select(items, '         ')}\n  " + "\n  ".join(lines)))

        plain = [d for d in pdefs if d.aggregation != "mode"]
        if plain:
            agg_items = [(_SEED_TIME, None), (_ENTITY, None)]
            agg_items += [(_aggregate_sql(d), quote(d.name)) for d in plain]
            ctes.append((f"{prefix}agg_{j}", f"aggregates of {path_cte}",
                         f"SELECT {_select(agg_items, '         ')}\n"
                         f"  FROM {path_cte}\n  GROUP BY {_SEED_TIME}, {_ENTITY}"))
            joins.append((f"{prefix}agg_{j}", f"a{j}"))
            for d in plain:
                output_of[d.name] = f"a{j}"
        for k, d in enumerate((d for d in pdefs if d.aggregation == "mode"), 1):
            col = quote(d.column)
            body = (
                f"SELECT {_SEED_TIME}, {_ENTITY},\n"
                f'         first("value" ORDER BY "n" DESC, "value" ASC) AS {quote(d.name)}\n'
                f"  FROM (SELECT {_SEED_TIME}, {_ENTITY}, {col} AS \"value\", count(*) AS \"n\"\n"
                f"        FROM {path_cte} WHERE {col} IS NOT NULL\n"
                f"        GROUP BY {_SEED_TIME}, {_ENTITY}, {col})\n"
                f"  GROUP BY {_SEED_TIME}, {_ENTITY}"
            )
            ctes.append((f"{prefix}mode_{j}_{k}", f"{d.name}: most frequent value, ties -> smallest", body))
            joins.append((f"{prefix}mode_{j}_{k}", f"m{j}_{k}"))
            output_of[d.name] = f"m{j}_{k}"

    # Which CTEs are read more than once: materialise those (computed once, not inlined).
    def readers(name: str) -> int:
        return sum(len(re.findall(rf"\b{re.escape(name)}\b", body)) for _, _, body in ctes)

    final = [(f"s.{_ENTITY}", quote(entity.pkey)), (f"s.{_SEED_TIME}", quote(TIMESTAMP)),
             (f"CASE WHEN act.{_ENTITY} IS NULL THEN 1 ELSE 0 END", quote(INACTIVE))]
    for d in defs:
        src = f"{output_of[d.name]}.{quote(d.name)}"
        final.append((f"coalesce({src}, 0)" if d.aggregation in ("count", "count_distinct") else src, quote(d.name)))
    on = "{a}." + _SEED_TIME + " = s." + _SEED_TIME + " AND {a}." + _ENTITY + " = s." + _ENTITY
    from_lines = [f"FROM {prefix}seed AS s", f"LEFT JOIN {prefix}active AS act ON {on.format(a='act')}"]
    from_lines += [f"LEFT JOIN {name} AS {alias} ON {on.format(a=alias)}" for name, alias in joins]

    blocks = []
    for name, comment, body in ctes:
        materialized = " MATERIALIZED" if readers(name) > 1 and name not in projections else ""
        blocks.append(f"{name} AS{materialized} (  {_comment(comment)}\n  {body}\n)")
    return (
        "WITH\n" + ",\n".join(blocks) + "\n"
        f"SELECT {_select(final, '       ')}\n" + "\n".join(from_lines) + "\nORDER BY 2, 1\n"
    )


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


def compute_targets(
    tables: Mapping[str, pd.DataFrame],
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
) -> pd.DataFrame:
    """The raw task vectors of ``entity_table`` at every seed time in ``timestamps``.

    One row per (entity, seed time) for each entity that exists at the seed time, sorted
    by (timestamp, pkey): the pkey column, ``timestamp``, ``inactive`` (int, 1 when no
    path has a next-window row) and one column per target (counts int, numeric aggregates
    float, a mode in the column's own type). ``memory_limit`` caps DuckDB's memory
    (beyond it, operators spill to ``temp_directory``, a fresh temporary folder by
    default); ``threads`` None keeps DuckDB's default.
    """
    import duckdb

    defs = list(defs)
    seed_times = _seed_times_frame(timestamps)
    relation = "timestamps" if "timestamps" not in schema_tables else "tve.timestamps"
    sql = targets_sql(schema_tables, defs, entity_table, timedelta, timestamps_relation=relation)
    if show_sql:
        print(sql)
    used = {entity_table} | {hop.table for d in defs for hop in d.path}
    missing = sorted(used - set(tables))
    if missing:
        raise ValueError(f"no data for tables {missing}")
    for d in defs:
        if d.column is not None and d.column not in tables[d.last_table].columns:
            raise ValueError(f"target {d.name!r}: table {d.last_table!r} has no column {d.column!r}")

    own_temp = temp_directory is None
    temp_dir = tempfile.mkdtemp(prefix="tve-duckdb-") if own_temp else temp_directory
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = {_literal(memory_limit)}")
        con.execute(f"SET temp_directory = {_literal(temp_dir)}")
        if threads is not None:
            con.execute(f"SET threads = {int(threads)}")
        for name in used:
            con.register(name, _duckdb_ready(tables[name]))
        con.register(relation, seed_times)
        out = con.execute(sql).df()
    finally:
        con.close()
        if own_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)

    out[INACTIVE] = out[INACTIVE].astype("int64")
    for d in defs:
        if d.aggregation in ("count", "count_distinct"):
            out[d.name] = out[d.name].astype("int64")
        elif d.aggregation in NUMERIC_AGGREGATIONS:
            out[d.name] = out[d.name].astype("float64")
    return out


def task_vector_aggregations(defs: Iterable[TargetDef]) -> dict[str, str]:
    """target name -> aggregation: what :class:`tve_pipeline.normalise.TaskVectorNormaliser` fits on."""
    return {d.name: d.aggregation for d in defs}
