"""What to compute and within what memory: :class:`TargetQuery`.

A query is one value (the tables, their schema, the definitions, the entity table, the seed
times, Δ and Δ2 of a later "in" hop, and the DuckDB settings) that every way to run it takes
whole; :func:`validate_targets` checks that its definitions are walkable paths of the schema.
Only the memory budget (``memory_limit``) and the other settings change how a query runs,
never its rows: DuckDB is given a share of the budget as its own limit (it spills to disk
beyond it; ``_DUCKDB_SHARE`` in :mod:`.connection`), and the rest sizes the work in
process: a group of seed times spans at most the budget's worth of (entity, seed time)
pairs (``_BYTES_PER_PAIR`` in :mod:`.compute`), so memory does not grow with the number of
seed times or entities.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tve_pipeline.targets.names import INACTIVE, TIMESTAMP
from tve_pipeline.traversal import TableSpecLike, TargetDef

#: Seed times per run of the query (see :func:`iter_targets`); None runs them all at once.
DEFAULT_SEEDS_PER_QUERY = 16

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


def _second_window(timedelta, second_hop_window) -> pd.Timedelta:
    """Δ2, the window of a later "in" hop: Δ unless given (the reference bounds the second
    fact's rows by the database's Δ)."""
    window = pd.Timedelta(timedelta if second_hop_window is None else second_hop_window)
    if window <= pd.Timedelta(0):
        raise ValueError(f"second_hop_window must be a positive duration, got {window}")
    return window


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


def _seed_times_frame(timestamps: Iterable) -> pd.DataFrame:
    seed_times = pd.to_datetime(pd.Series(list(timestamps), dtype=object))
    if seed_times.isna().any():
        raise ValueError("seed times may not be null")
    seed_times = seed_times.drop_duplicates().sort_values(ignore_index=True)
    return pd.DataFrame({TIMESTAMP: seed_times.astype("datetime64[us]")})


def task_vector_aggregations(defs: Iterable[TargetDef]) -> dict[str, str]:
    """target name -> aggregation: what :class:`tve_pipeline.normalise.TaskVectorNormaliser`
    fits on."""
    return {d.name: d.aggregation for d in defs}
