"""Windows: the seed times the method trains at, and the key each one goes by.

A *seed time* ``t`` opens the next window ``(t, t+Δ]``, whose rows make the task vectors
at ``t``. RelBench lays seed times out per split: ``train`` seeds step back from
``val - Δ`` by Δ to the first timestamp (so every training window ends at or before the
validation timestamp and pre-training never reads a row past it); ``val`` and ``test``
seeds start at their timestamps and step forward, as long as their windows stay before
the next split (or the end of the data).

Each training or validation seed time is one window of the pipeline (pre-training trains
on the first and chooses its checkpoint on the second), named by its *window key*: the
seed time's date (``2013-03-04``), with the time of day when it has one
(``2013-03-04T12:00:00``). The key is plain text here; the Dagster layer
(``assets/partitions.py``) registers one dynamic partition per key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from tve_pipeline.database import DatabaseSummary


def training_seed_times(val_timestamp, min_timestamp, timedelta: pd.Timedelta) -> pd.DatetimeIndex:
    """RelBench's training seed times: from ``val - Δ`` back to the first timestamp by Δ.

    Every window ``(t, t+Δ]`` ends at or before the validation timestamp, so pre-training
    never reads a row past it.
    """
    return pd.date_range(
        start=pd.Timestamp(val_timestamp) - timedelta,
        end=pd.Timestamp(min_timestamp),
        freq=-timedelta,
    ).sort_values()


def seed_schedule(
    summary: DatabaseSummary, timedelta: pd.Timedelta, num_eval_timestamps: int = 1
) -> pd.DataFrame:
    """Every seed time of a database with its split, as RelBench's task splits lay them out.

    ``train`` seeds step back from ``val - Δ`` by Δ (their windows end by ``val``); ``val``
    and ``test`` seeds start at their timestamps and step forward, as long as their
    windows stay before the next split (or the end of the data).
    """
    val, test = pd.Timestamp(summary.val_timestamp), pd.Timestamp(summary.test_timestamp)
    k = max(num_eval_timestamps - 1, 0)
    train = training_seed_times(val, summary.min_timestamp, timedelta)
    val_seeds = pd.date_range(val, min(val + timedelta * k, test - timedelta), freq=timedelta)
    test_seeds = pd.date_range(
        test,
        min(test + timedelta * k, pd.Timestamp(summary.max_timestamp) - timedelta),
        freq=timedelta,
    )
    frames = [
        pd.DataFrame({"timestamp": ts, "split": split})
        for ts, split in ((train, "train"), (val_seeds, "val"), (test_seeds, "test"))
    ]
    return (
        pd.concat(frames, ignore_index=True)
        .sort_values("timestamp", kind="stable")
        .reset_index(drop=True)
    )


def window_key(seed_time) -> str:
    """The window key of a seed time: ``YYYY-MM-DD``, or with ``THH:MM:SS`` when
    the seed time has a time of day."""
    ts = pd.Timestamp(seed_time)
    return ts.strftime("%Y-%m-%d") if ts == ts.normalize() else ts.strftime("%Y-%m-%dT%H:%M:%S")


def window_seed_time(key: str) -> pd.Timestamp:
    """The seed time of a window key (the inverse of :func:`window_key`)."""
    try:
        return pd.Timestamp(key)
    except ValueError as exc:
        raise ValueError(f"window key {key!r} is not a seed time (expected YYYY-MM-DD)") from exc
