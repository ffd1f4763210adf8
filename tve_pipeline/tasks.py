"""Downstream task variants: restricted tasks for the low-data setting.

The reference implementation's "low-data" settings are restricted tasks, e.g. churn of
the 50 most active users per seed time. Activity is measured only in the past — the
first-hop rows (rows of time-stamped tables that reference the entity) in the window
``(t - Δ, t]`` — so the restriction itself reads nothing after the seed time.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from tve_pipeline.common import naive_timestamps
from tve_pipeline.targets import quote


def past_activity(
    labels: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    schema_tables,
    entity_table: str,
    entity_col: str,
    time_col: str,
    window: pd.Timedelta,
) -> pd.Series:
    """Number of first-hop rows of each (entity, seed time) row of ``labels`` in
    ``(t - Δ, t]``."""
    facts = [
        (name, col)
        for name, spec in schema_tables.items()
        if spec.time_col is not None
        for col, ref in spec.fkeys.items()
        if ref == entity_table
    ]
    if not facts:
        raise ValueError(
            f"entity table {entity_table!r} has no incoming time-stamped fact table "
            "to measure activity"
        )
    con = duckdb.connect()
    try:
        keys = labels[[entity_col, time_col]].reset_index(drop=True).copy()
        keys[time_col] = naive_timestamps(keys[time_col]).astype("datetime64[us]")
        keys["tve_row"] = range(len(keys))
        con.register("tve_labels", keys)
        counts = []
        seconds = int(window.total_seconds())
        for i, (fact, col) in enumerate(facts):
            ftime = schema_tables[fact].time_col
            con.register(f"tve_fact_{i}", tables[fact][[col, ftime]])
            counts.append(
                f"""(SELECT count(*) FROM "tve_fact_{i}" f
                     WHERE f.{quote(col)} = l.{quote(entity_col)}
                       AND f.{quote(ftime)} > l.{quote(time_col)} - INTERVAL '{seconds} seconds'
                       AND f.{quote(ftime)} <= l.{quote(time_col)})"""
            )
        sql = (
            f"SELECT l.tve_row, {' + '.join(counts)} AS activity "
            "FROM tve_labels l ORDER BY l.tve_row"
        )
        out = con.sql(sql).df()
    finally:
        con.close()
    return pd.Series(out["activity"].to_numpy(), index=labels.index, name="activity")


def restrict_to_most_active(
    labels: pd.DataFrame, activity: pd.Series, entity_col: str, time_col: str, k: int
) -> pd.DataFrame:
    """The rows of the k most active entities per seed time (ties: smaller entity id), in order."""
    ranked = labels.assign(_activity=activity.to_numpy())
    ranked = ranked.sort_values(
        [time_col, "_activity", entity_col], ascending=[True, False, True], kind="stable"
    )
    keep = ranked.groupby(time_col, sort=False).head(k).index
    return labels.loc[labels.index.isin(keep)]
