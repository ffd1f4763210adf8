"""Partitions that fit the data: every database has its own assets, windows and tasks.

A Dagster partitions definition belongs to an asset, and the only partition mappings the
web server and the daemon understand are the built-in ones; a ``database x window`` grid
offers every window of every database to every other database (and a shared ``task``
dimension, tasks a database does not have). So each registered database gets its own
seven assets under its own key prefix and asset group (``rel_flights/tve_targets``), and:

- its **windows** are a dynamic partitions definition of its own
  (``"<database>.windows"``), one key per *training seed time* ``t`` (the window is the
  next window ``(t, t+Δ]`` whose rows make the task vectors at ``t``), registered from the
  database's seed schedule when it is registered and extended when the data grows;
- its **tasks** are a static partitions definition of exactly the tasks in its folder.

Window keys are the seed time's date (``2013-03-04``), with the time of day when it has
one (``2013-03-04T12:00:00``).
"""

import re

import dagster as dg
import pandas as pd


def asset_prefix(database: str) -> str:
    """The key prefix and group name of a database's assets: ``rel-flights`` -> ``rel_flights``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", database)


def windows_name(database: str) -> str:
    """The name of a database's dynamic window partitions."""
    return f"{database}.windows"


def window_partitions(database: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=windows_name(database))


def task_partitions(tasks) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(sorted(tasks))


def window_key(seed_time) -> str:
    """The window partition key of a training seed time."""
    ts = pd.Timestamp(seed_time)
    return ts.strftime("%Y-%m-%d") if ts == ts.normalize() else ts.strftime("%Y-%m-%dT%H:%M:%S")


def window_seed_time(key: str) -> pd.Timestamp:
    """The seed time of a window partition key (the inverse of :func:`window_key`)."""
    try:
        return pd.Timestamp(key)
    except ValueError as exc:
        raise ValueError(f"window key {key!r} is not a seed time (expected YYYY-MM-DD)") from exc


def contiguous_ranges(keys: list[str], order: list[str]) -> list[tuple[str, str]]:
    """``keys`` as (first, last) runs of consecutive keys in ``order`` (a partition range
    over dynamic partitions follows their registration order)."""
    position = {k: i for i, k in enumerate(order)}
    ranges: list[tuple[str, str]] = []
    for key in sorted(keys, key=position.__getitem__):
        if ranges and position[key] == position[ranges[-1][1]] + 1:
            ranges[-1] = (ranges[-1][0], key)
        else:
            ranges.append((key, key))
    return ranges
