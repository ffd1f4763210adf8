"""What the raw task vectors hold, target by target: one DuckDB pass over their files.

A target that is null on every active row, or constant, pre-trains nothing; a user looks
for those before spending GPU hours. For the task-vector files of one entity table (one
parquet file per window, :func:`tve_pipeline.targets.write_targets_by_seed_time`) this
gives, per target in definition order: how many active rows (``inactive = 0``) have a
value, and the mean, minimum and maximum of those values (a mode of a text column has a
minimum and maximum, no mean). Inactive rows are left out: their targets are counts of 0
and nulls by definition. DuckDB reads the files, so no window goes through pandas.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tve_pipeline.targets import quote

_NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "FLOAT", "DOUBLE", "DECIMAL")


def summarise_targets(files: Sequence[str | Path], names: Sequence[str]) -> list[dict]:
    """One dict per target of ``names``: ``target``, ``active_rows``, ``non_null``, ``mean``
    (None for a text target or without a value), ``min`` and ``max`` (None without a value)."""
    import duckdb

    if not files:
        return [
            dict(target=n, active_rows=0, non_null=0, mean=None, min=None, max=None) for n in names
        ]
    con = duckdb.connect()
    source = "read_parquet([{}])".format(
        ", ".join("'" + str(Path(f).resolve()).replace("'", "''") + "'" for f in files)
    )
    types = {row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    missing = [n for n in names if n not in types]
    if missing:
        raise ValueError(f"task-vector files have no column {missing[0]!r} ({files[0]})")
    items = ["count(*)"]
    for name in names:
        col = quote(name)
        numeric = types[name].upper().startswith(_NUMERIC)
        items += [
            f"count({col})",
            f"avg({col})" if numeric else "NULL",
            f"min({col})",
            f"max({col})",
        ]
    row = con.execute(f"SELECT {', '.join(items)} FROM {source} WHERE inactive = 0").fetchone()
    con.close()
    out = []
    for i, name in enumerate(names):
        non_null, mean, low, high = row[1 + 4 * i : 5 + 4 * i]
        out.append(
            dict(target=name, active_rows=row[0], non_null=non_null, mean=mean, min=low, max=high)
        )
    return out
