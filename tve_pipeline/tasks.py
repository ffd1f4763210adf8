"""Downstream task variants: restricted tasks for the low-data setting.

The reference implementation's "low-data" settings are restricted tasks, e.g. churn of
the 100 highest-spending customers per seed time (src/tasks/amazon.py:560-633,
``UserChurnTop100SpendingTask``: spending in ``(t - Δ, t]``, rank per timestamp, keep
``rank <= k``; its train, val and test tables all hold only those customers). Here the
ranking is the task's own activity, measured only in the past — the first-hop rows (rows of
time-stamped tables that reference the entity) in the window ``(t - Δ, t]`` — so the
restriction itself reads nothing after the seed time. Ties (on rel-f1 every full-time
driver has the same count: one result, standing and qualifying row per race) go to the
entity with more first-hop rows in its whole history up to ``t`` (still the past), then
to the smaller entity id. Not to the id first: ids need not be in time order (rel-f1's
drivers 0-21 are the 2008 grid, which Ergast entered first), so at a 1990s seed time the id
would pick the drivers still racing in 2008, a fact from the future.

A *label setting* names the training labels of an experiment cell: a label fraction of the
task's training table (``0.1``: a float) or the restricted task ``top<k>`` (a string: every
row of the train, val and test tables restricted to the k most active entities per seed
time). :func:`label_setting` parses one, :func:`restricted_label_set` writes one.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from tve_pipeline.common import naive_timestamps
from tve_pipeline.targets import quote

RESTRICTED = "top"


def restricted_label_set(k: int) -> str:
    """The label setting of the task restricted to the k most active entities: ``top10``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"restricted k must be a positive integer, got {k!r}")
    return f"{RESTRICTED}{k}"


def label_setting(text: str | float) -> float | str:
    """A label setting from its text: a fraction in (0, 1] as a float, or ``top<k>`` as is."""
    if isinstance(text, str) and text.startswith(RESTRICTED):
        digits = text.removeprefix(RESTRICTED)
        if digits.isdigit() and int(digits) >= 1:
            return restricted_label_set(int(digits))
        raise ValueError(f"label setting {text!r} is not 'top<k>' with a positive k")
    try:
        fraction = float(text)
    except (TypeError, ValueError):
        raise ValueError(
            f"label setting {text!r} is neither a label fraction nor 'top<k>'"
        ) from None
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    return fraction


def restricted_k(label_set: str | float) -> int | None:
    """k of a restricted label setting (``top10`` -> 10); None for a label fraction."""
    setting = label_setting(label_set)
    return int(setting.removeprefix(RESTRICTED)) if isinstance(setting, str) else None


def label_set_name(label_set: str | float) -> str:
    """The label setting as text: ``0.1``, ``1``, ``top10``."""
    setting = label_setting(label_set)
    return setting if isinstance(setting, str) else f"{setting:g}"


def past_activity(
    labels: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    schema_tables,
    entity_table: str,
    entity_col: str,
    time_col: str,
    window: pd.Timedelta | None,
) -> pd.Series:
    """Number of first-hop rows of each (entity, seed time) row of ``labels`` in
    ``(t - Δ, t]`` (``window`` None: in the whole history up to ``t``)."""
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
        for i, (fact, col) in enumerate(facts):
            ftime = schema_tables[fact].time_col
            con.register(f"tve_fact_{i}", tables[fact][[col, ftime]])
            since = (
                ""
                if window is None
                else f"AND f.{quote(ftime)} > l.{quote(time_col)} "
                f"- INTERVAL '{int(window.total_seconds())} seconds'"
            )
            counts.append(
                f"""(SELECT count(*) FROM "tve_fact_{i}" f
                     WHERE f.{quote(col)} = l.{quote(entity_col)}
                       {since}
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
    labels: pd.DataFrame,
    activity: pd.Series,
    entity_col: str,
    time_col: str,
    k: int,
    history: pd.Series | None = None,
) -> pd.DataFrame:
    """The rows of the k most active entities per seed time, in order (ties: more
    ``history``, when given, then the smaller entity id)."""
    if history is None:
        history = pd.Series(0, index=labels.index)
    ranked = labels.assign(_activity=activity.to_numpy(), _history=history.to_numpy())
    ranked = ranked.sort_values(
        [time_col, "_activity", "_history", entity_col],
        ascending=[True, False, False, True],
        kind="stable",
    )
    keep = ranked.groupby(time_col, sort=False).head(k).index
    return labels.loc[labels.index.isin(keep)]


def restrict_task_tables(tables: dict, frames: dict, schema_tables, task, k: int) -> dict:
    """Every table of a task (``"train"``, ``"val"``, ``"test"``, ``"test_labels"``: RelBench
    ``Table``s) restricted to the k most active entities per seed time, in place and returned.

    Each table is ranked on its own rows (the masked test table and the labelled one hold
    the same entities and seed times, so they keep the same rows); the ranking reads the
    database's first-hop rows up to each seed time only. The (entity, seed time) pairs of
    all the tables are counted in one pass each for the window and the history (most of a
    count's cost is handing the fact tables to DuckDB). A binary task restricted to one
    class in val or test cannot be scored: that, or an empty table, fails here, naming k.
    """
    restricted_label_set(k)  # a bad k fails here, in one line
    entity, time = task.entity_col, task.time_col
    pairs = pd.concat([t.df[[entity, time]] for t in tables.values()]).drop_duplicates()
    pairs = pairs.reset_index(drop=True)
    args = (frames, schema_tables, task.entity_table, entity, time)
    pairs["_activity"] = past_activity(pairs, *args, task.timedelta).to_numpy()
    pairs["_history"] = past_activity(pairs, *args, None).to_numpy()
    for name, table in tables.items():
        counted = table.df[[entity, time]].merge(pairs, on=[entity, time], how="left")
        table.df = restrict_to_most_active(
            table.df,
            counted["_activity"],
            entity,
            time,
            k,
            counted["_history"],
        ).reset_index(drop=True)
        _check_restricted(task, name, table.df, k)
    return tables


def _check_restricted(task, split: str, df: pd.DataFrame, k: int) -> None:
    from relbench.base import TaskType

    if df.empty:
        raise ValueError(f"task {task.name!r} restricted to top{k} has no {split} row")
    if (
        split != "train"
        and task.task_type == TaskType.BINARY_CLASSIFICATION
        and task.target_col in df
        and df[task.target_col].nunique() < 2
    ):
        raise ValueError(
            f"task {task.name!r} restricted to top{k} has one class only in {split} "
            f"({len(df)} rows), so it cannot be scored: choose a larger k (--restricted)"
        )
