"""The names the package's SQL and tables share, and how its SQL text is written.

The output columns (:data:`INACTIVE`, :data:`TIMESTAMP`), the aggregations that are 0 over
no values, and the internal column names of the generated CTEs (dotted, so that no real
column is mistaken for them). Every identifier is double-quoted (``"`` doubled), so tables
and columns may hold spaces and quotes; a literal has its ``'`` doubled, a comment no
control character to break out of a line with, and Δ is an interval literal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from tve_pipeline.traversal import Hop

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
