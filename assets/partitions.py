"""Partitions: databases are registered (dynamic); windows are calendar months; tasks are registered.

Multi-partition keys read ``database|window`` and ``database|task`` (Dagster orders the
dimensions by name).
"""

import warnings

import dagster as dg
import pandas as pd

database_partitions = dg.DynamicPartitionsDefinition(name="database")
task_partitions = dg.DynamicPartitionsDefinition(name="task")
# Monthly windows from 1950 (rel-f1's first race) onwards: ~900 keys per database.
window_partitions = dg.TimeWindowPartitionsDefinition(cron_schedule="0 0 1 * *", start="1950-01-01", fmt="%Y-%m-%d")
database_window_partitions = dg.MultiPartitionsDefinition({"database": database_partitions, "window": window_partitions})
database_task_partitions = dg.MultiPartitionsDefinition({"database": database_partitions, "task": task_partitions})

with warnings.catch_warnings():  # beta since 1.x, and exactly what this mapping is for
    warnings.simplefilter("ignore", dg.BetaWarning)
    by_database = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="database")


def window_key(timestamp) -> str:
    """The window partition a seed time falls into (its calendar month)."""
    return pd.Timestamp(timestamp).strftime("%Y-%m-01")


def window_bounds(window: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    start = pd.Timestamp(window)
    return start, start + pd.offsets.MonthBegin(1)
