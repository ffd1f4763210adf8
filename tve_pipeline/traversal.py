"""The schema traversal graph of TVE: which next-window aggregates make a task vector.

Design. From an entity table ``E`` the traversal walks the foreign-key graph of the schema
and enumerates *paths* (DESIGN.md section 1, step 1): ``E <- F`` (rows of a time-stamped
fact table ``F`` that reference the entity), ``E <- F -> D`` (the dimension row each such
fact row references through another fkey) and ``E <- F -> K <- F'`` (the other fact rows of
a time-stamped table ``F'`` that reference the same key row ``K`` as the first-hop row, in
the window of Δ2 that ends at its time). Each path ends in a table whose usable columns
(numerical and categorical; never keys, the time column, text or embeddings) are aggregated,
plus one row count per path. Every aggregate is a :class:`TargetDef`: plain data (JSON) that
says the path hop by hop, the column and the aggregation, so that the SQL that computes the
``task_vector`` (:mod:`tve_pipeline.targets`) and any independent re-implementation read the
same definition. The next window ``(t, t+Δ]`` applies to the first hop only.

Path semantics, hop by hop (``Hop``): ``direction="in"`` reaches the rows of ``table`` whose
column ``via`` references the current row's primary key; ``direction="out"`` reaches the row
of ``table`` that the current row's column ``via`` references. Hop 1 is always ``"in"`` into
a time-stamped table and keeps the rows with time in ``(t, t+Δ]``; a later ``"in"`` hop into
a time-stamped table keeps only rows whose time lies in ``(τ - Δ2, τ]``, τ the time of the
hop-1 row they were reached from, as the reference's rel-hm notebooks
(``visualization/rel-hm/user-tve-2-hop.ipynb``, cell 1: ``transactions__1.t_dat <=
transactions__0.t_dat AND transactions__1.t_dat > transactions__0.t_dat - INTERVAL Δ``). Δ2
is Δ unless the recipe says otherwise (``targets.second_hop_window``; the reference's
rel-amazon notebooks bound the second review by ``<=`` alone: a Δ2 longer than the
database's history gives that). The hop-1 row itself is *not* excluded: for
``orders>customers<orders`` the first-hop order is one of its customer's orders in the
window, as a plain join gives. An "out" hop has no time filter (the referenced row is the
row the fact points at). ``F'`` must be time-stamped, like every fact table. Values are
collected with join multiplicity.

Target names. ``<path>.<column>__<aggregation>`` and ``<path>__count`` for the row count
of a path, where ``<path>`` is the hop-1 table followed by ``>table`` for an "out" hop and
``<table`` for an "in" hop: ``orders__count``, ``orders.amount__mean``,
``orders>products.price__mean``, ``orders>customers<orders.amount__sum``. A hop is written
``table[via]`` when the schema allows more than one fkey for that step (two fkeys of
``orders`` to ``customers``: ``orders[buyer_id]`` and ``orders[seller_id]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from tve_pipeline.schema import CATEGORICAL, NUMERICAL

Direction = Literal["in", "out"]

#: Aggregations of a column, by semantic type (DESIGN.md section 1, step 2).
AGGREGATIONS_BY_STYPE: dict[str, tuple[str, ...]] = {
    NUMERICAL: ("mean", "min", "max", "sum", "count", "std"),
    CATEGORICAL: ("mode", "count", "count_distinct"),
}
#: Every aggregation a TargetDef may name.
AGGREGATIONS: tuple[str, ...] = (
    "count",
    "count_distinct",
    "sum",
    "mean",
    "min",
    "max",
    "std",
    "mode",
)
#: Aggregations whose input is cast to a float (the value of a numeric aggregate is a float).
NUMERIC_AGGREGATIONS: frozenset[str] = frozenset({"sum", "mean", "min", "max", "std"})


class TableSpecLike(Protocol):
    """What the traversal reads of a table: relbench.manifest.TableSpec has these."""

    pkey: str | None
    time_col: str | None
    fkeys: dict[str, str]


@dataclass(frozen=True)
class Hop:
    """One step of a path: into ``table`` through its (``in``) or the current row's
    (``out``) column ``via``."""

    table: str
    via: str
    direction: Direction

    def __post_init__(self) -> None:
        if self.direction not in ("in", "out"):
            raise ValueError(f"hop direction must be 'in' or 'out', got {self.direction!r}")

    def to_dict(self) -> dict[str, str]:
        return {"table": self.table, "via": self.via, "direction": self.direction}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Hop:
        return cls(table=d["table"], via=d["via"], direction=d["direction"])


@dataclass(frozen=True)
class TargetDef:
    """One entry of the task vector: ``aggregation`` of ``column`` over the rows a path reaches.

    ``column=None`` means the rows themselves (only ``count`` is meaningful then).
    """

    name: str
    entity_table: str
    path: tuple[Hop, ...]
    column: str | None
    aggregation: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", tuple(self.path))
        if not self.path:
            raise ValueError(f"target {self.name!r}: empty path")
        if self.path[0].direction != "in":
            raise ValueError(
                f"target {self.name!r}: the first hop must be 'in' (next-window fact rows)"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"target {self.name!r}: unknown aggregation {self.aggregation!r}")
        if self.column is None and self.aggregation != "count":
            raise ValueError(
                f"target {self.name!r}: a row target (column null) can only be 'count'"
            )

    @property
    def last_table(self) -> str:
        return self.path[-1].table

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "entity_table": self.entity_table,
            "path": [hop.to_dict() for hop in self.path],
            "column": self.column,
            "aggregation": self.aggregation,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetDef:
        return cls(
            name=d["name"],
            entity_table=d["entity_table"],
            path=tuple(Hop.from_dict(h) for h in d["path"]),
            column=d.get("column"),
            aggregation=d["aggregation"],
        )


def save_targets_json(defs: Iterable[TargetDef], path: str | Path) -> None:
    """Write target definitions as a JSON list of their ``to_dict()``."""
    Path(path).write_text(json.dumps([d.to_dict() for d in defs], indent=2) + "\n")


def load_targets_json(path: str | Path) -> list[TargetDef]:
    return [TargetDef.from_dict(d) for d in json.loads(Path(path).read_text())]


def entity_tables(tables: Mapping[str, TableSpecLike]) -> list[str]:
    """Tables with a primary key referenced by at least one time-stamped fact table."""
    out = []
    for name, spec in tables.items():
        if spec.pkey is not None and _incoming_facts(tables, name):
            out.append(name)
    return out


def _incoming_facts(tables: Mapping[str, TableSpecLike], target: str) -> list[tuple[str, str]]:
    """(fact table, fkey column) pairs of time-stamped tables whose fkey points at ``target``."""
    return [
        (name, col)
        for name, spec in tables.items()
        if spec.time_col is not None
        for col, ref in spec.fkeys.items()
        if ref == target
    ]


def traversal_paths(
    tables: Mapping[str, TableSpecLike],
    entity_table: str,
    *,
    hops: int = 2,
    include_tables: Iterable[str] | None = None,
    exclude_tables: Iterable[str] | None = None,
    fact_key_fact: bool = True,
) -> list[tuple[Hop, ...]]:
    """The paths of the traversal graph from ``entity_table``, in schema order.

    ``hops=1``: ``E <- F``. ``hops=2`` adds ``E <- F -> D`` and ``E <- F -> K <- F'``
    (the key table ``K`` is a pass-through, so this counts as two hops in the method's
    terms although the path lists three steps). ``fact_key_fact=False`` leaves those
    out: through a hub key (an airport, a carrier) they reach most of the fact table.
    """
    if hops not in (1, 2):
        raise ValueError(f"hops must be 1 or 2, got {hops!r}")
    if entity_table not in tables:
        raise ValueError(f"entity table {entity_table!r} is not in the schema")
    included = set(tables) if include_tables is None else set(include_tables) | {entity_table}
    excluded = set(exclude_tables or ())
    if entity_table in excluded:
        raise ValueError(f"entity table {entity_table!r} is excluded")
    allowed = {name for name in tables if name in included and name not in excluded}

    def keyed(name: str) -> bool:  # a table that an "out" hop can land on
        return name in allowed and tables[name].pkey is not None

    if tables[entity_table].pkey is None:
        raise ValueError(f"entity table {entity_table!r} has no primary key")
    first_hops = [(f, c) for f, c in _incoming_facts(tables, entity_table) if f in allowed]
    if not first_hops:
        raise ValueError(
            f"entity table {entity_table!r} has no incoming time-stamped fact table "
            "(no table with a time column has a foreign key to it)"
        )

    paths: list[tuple[Hop, ...]] = []
    for fact, via in first_hops:
        hop1 = Hop(fact, via, "in")
        paths.append((hop1,))
        if hops < 2:
            continue
        for col, ref in tables[fact].fkeys.items():
            if col == via or not keyed(ref):
                continue
            out = Hop(ref, col, "out")
            paths.append((hop1, out))
            if not fact_key_fact:
                continue
            for fact2, via2 in _incoming_facts(tables, ref):
                if fact2 in allowed:
                    paths.append((hop1, out, Hop(fact2, via2, "in")))
    return paths


def _hop_label(tables: Mapping[str, TableSpecLike], current: str, hop: Hop, qualify: bool) -> str:
    """``table`` or ``table[via]`` when more than one fkey could make this step (or forced)."""
    if hop.direction == "in":
        choices = sum(1 for ref in tables[hop.table].fkeys.values() if ref == current)
    else:
        choices = sum(1 for ref in tables[current].fkeys.values() if ref == hop.table)
    return f"{hop.table}[{hop.via}]" if qualify or choices > 1 else hop.table


def path_name(
    tables: Mapping[str, TableSpecLike],
    entity_table: str,
    path: tuple[Hop, ...],
    *,
    qualify: bool = False,
) -> str:
    """The readable name of a path: ``orders``, ``orders>products``, ``orders>customers<orders``."""
    parts, current = [], entity_table
    for i, hop in enumerate(path):
        label = _hop_label(tables, current, hop, qualify)
        parts.append(label if i == 0 else (">" if hop.direction == "out" else "<") + label)
        current = hop.table
    return "".join(parts)


def target_name(path_label: str, column: str | None, aggregation: str) -> str:
    return (
        f"{path_label}__{aggregation}"
        if column is None
        else f"{path_label}.{column}__{aggregation}"
    )


def _usable_columns(
    tables: Mapping[str, TableSpecLike],
    column_types: Mapping[str, Mapping[str, str]],
    table: str,
    exclude_columns: Mapping[str, Iterable[str]],
) -> list[tuple[str, str]]:
    """(column, stype) of a table that are aggregated: numerical/categorical, not keys nor time."""
    spec = tables[table]
    never = {spec.pkey, spec.time_col, *spec.fkeys, *exclude_columns.get(table, ())}
    return [
        (col, stype)
        for col, stype in column_types.get(table, {}).items()
        if col not in never and stype in AGGREGATIONS_BY_STYPE
    ]


def build_traversal_graph(
    tables: Mapping[str, TableSpecLike],
    column_types: Mapping[str, Mapping[str, str]],
    entity_table: str,
    *,
    hops: int = 2,
    include_tables: Iterable[str] | None = None,
    exclude_tables: Iterable[str] | None = None,
    exclude_columns: Mapping[str, Iterable[str]] | None = None,
    fact_key_fact: bool = True,
) -> list[TargetDef]:
    """Every target of the task vector of ``entity_table``: one row count per path, then
    each usable column of the path's last table with the aggregations of its type.

    ``tables``: table name -> TableSpec-like (``pkey``, ``time_col``, ``fkeys``).
    ``column_types``: table -> column -> semantic type; only ``"numerical"`` and
    ``"categorical"`` columns are aggregated. ``exclude_columns``: table -> columns to skip.
    Raises ``ValueError`` (naming the table) when the entity table has no incoming
    time-stamped fact table.
    """
    exclude_columns = exclude_columns or {}
    paths = traversal_paths(
        tables,
        entity_table,
        hops=hops,
        include_tables=include_tables,
        exclude_tables=exclude_tables,
        fact_key_fact=fact_key_fact,
    )
    labels = [path_name(tables, entity_table, p) for p in paths]
    # Names are unique by construction unless table names themselves contain '>', '<' or
    # '[': then qualify the colliding paths fully, and refuse if that is not enough.
    for label in {lb for lb in labels if labels.count(lb) > 1}:
        for i, p in enumerate(paths):
            if labels[i] == label:
                labels[i] = path_name(tables, entity_table, p, qualify=True)
    defs: list[TargetDef] = []
    for path, label in zip(paths, labels):
        defs.append(TargetDef(target_name(label, None, "count"), entity_table, path, None, "count"))
        for col, stype in _usable_columns(tables, column_types, path[-1].table, exclude_columns):
            for agg in AGGREGATIONS_BY_STYPE[stype]:
                defs.append(TargetDef(target_name(label, col, agg), entity_table, path, col, agg))
    names = [d.name for d in defs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"target names collide for entity table {entity_table!r}: {duplicates}")
    return defs


def paths_of(defs: Iterable[TargetDef]) -> list[tuple[Hop, ...]]:
    """The distinct paths of a list of target definitions, in first-seen order."""
    return list(dict.fromkeys(d.path for d in defs))
