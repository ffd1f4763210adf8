"""The rows in parquet: :func:`write_targets` (one file) and :func:`write_targets_by_seed_time`.

:func:`write_targets` streams :func:`~.compute.iter_targets`' slices into one parquet file
(a row group per slice) on a writer thread, so memory does not grow with the number of
seed times or entities; :func:`write_targets_by_seed_time` writes a file per seed time
from the same stream. Every file is moved into place atomically, with encodings and
statistics chosen for task vectors (:func:`_parquet_options`).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from tve_pipeline.common import atomic_path
from tve_pipeline.targets.compute import iter_targets
from tve_pipeline.targets.names import INACTIVE, TIMESTAMP
from tve_pipeline.targets.query import DEFAULT_SLICE_ROWS, TargetQuery


def _parquet_options(schema, compression: str) -> dict[str, Any]:
    """Plain-encoded numbers (a dictionary costs a hash per value and task vectors are
    mostly zeros and nulls, which snappy shrinks anyway), dictionaries for text (modes), an
    integer key delta-encoded (sorted within a row group: half the encoding time of plain);
    statistics only for the key, the seed time and ``inactive`` (what a reader filters
    on; those of 30 target columns cost ~15 % of the writer's time); values handed to the
    encoder 64k at a time."""
    import pyarrow as pa

    text = [
        f.name
        for f in schema
        if not (
            pa.types.is_integer(f.type)
            or pa.types.is_floating(f.type)
            or pa.types.is_timestamp(f.type)
        )
    ]
    options = {
        "compression": compression,
        "use_dictionary": text,
        "write_statistics": list(schema.names[:3]),
        "write_batch_size": 1 << 16,
    }
    if pa.types.is_integer(schema.field(0).type):
        options["column_encoding"] = {schema.names[0]: "DELTA_BINARY_PACKED"}
    return options


def _count_rows(stats: dict[str, int], table) -> None:
    stats["rows"] += table.num_rows
    if table.num_rows:
        stats["inactive"] += int(table.column(INACTIVE).to_numpy().sum())


def write_targets(
    query: TargetQuery,
    out_path: str | os.PathLike,
    *,
    slice_rows: int = DEFAULT_SLICE_ROWS,
    compression: str = "snappy",
) -> dict[str, int]:
    """:func:`compute_targets`' rows streamed into one parquet file at ``out_path``, atomically.

    The file is written next to ``out_path`` under a temporary name and moved into place
    when complete (:func:`tve_pipeline.common.atomic_path`: a reader sees the previous file
    or the new one, never a partial one). Rows are in (timestamp, pkey) order, one row
    group per seed time and slice of ``slice_rows`` entities; a writer thread encodes one
    slice while the next is built. Returns ``{"rows": ..., "inactive": ...}``.
    """
    import pyarrow.parquet as pq

    stats = {"rows": 0, "inactive": 0}
    handoff: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def write(tmp: Path) -> None:
        writer = None
        try:
            while (table := handoff.get()) is not None:
                if writer is None:
                    writer = pq.ParquetWriter(
                        tmp, table.schema, **_parquet_options(table.schema, compression)
                    )
                if table.num_rows:
                    writer.write_table(table, row_group_size=max(table.num_rows, 1))
        except BaseException as exc:  # handed back to the producer
            failure.append(exc)
            while handoff.get() is not None:  # drain so the producer never blocks
                pass
        finally:
            if writer is not None:
                writer.close()

    with atomic_path(out_path) as tmp:
        thread = threading.Thread(target=write, args=(tmp,), name="tve-targets-writer", daemon=True)
        thread.start()
        try:
            for table in iter_targets(query, slice_rows=slice_rows):
                if failure:
                    break
                _count_rows(stats, table)
                handoff.put(table)
        finally:
            handoff.put(None)
            thread.join()
        if failure:
            raise failure[0]
    return stats


def write_targets_by_seed_time(
    query: TargetQuery,
    out_path_of: Callable[[pd.Timestamp], str | os.PathLike],
    *,
    compression: str = "snappy",
) -> dict[pd.Timestamp, dict[str, int]]:
    """:func:`compute_targets`' rows of each seed time in a parquet file of its own
    (``out_path_of(seed_time)``), from one streamed query over all of them.

    The rows come in seed-time order, so each file is written from start to end and moved
    into place, atomically, before the next begins; a failure leaves earlier files whole
    and the one being written absent. A seed time without seeds gets a file
    without rows. Returns ``{seed_time: {"rows": ..., "inactive": ...}}``.
    """
    times = [pd.Timestamp(t) for t in query.timestamps]
    stats: dict[pd.Timestamp, dict[str, int]] = {}
    schema = None

    def rows() -> Iterator:
        nonlocal schema
        for table in iter_targets(replace(query, timestamps=times)):
            if schema is None:
                schema = table.schema
            if table.num_rows:
                yield table

    def seed_time(table) -> pd.Timestamp:
        return pd.Timestamp(table.column(TIMESTAMP)[0].as_py())

    for t, tables in itertools.groupby(rows(), key=seed_time):
        stats[t] = _write_parquet(out_path_of(t), tables, schema, compression)
    for t in times:
        if t not in stats:  # no seed yet
            stats[t] = _write_parquet(out_path_of(t), [], schema, compression)
    return stats


def _write_parquet(
    path: str | os.PathLike, tables: Iterable, schema, compression: str
) -> dict[str, int]:
    """``tables`` (of ``schema``) in one parquet file at ``path``, a row group each,
    atomically; returns ``{"rows": ..., "inactive": ...}``."""
    import pyarrow.parquet as pq

    stats = {"rows": 0, "inactive": 0}
    options = _parquet_options(schema, compression)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, **options) as writer:
        for table in tables:
            writer.write_table(table, row_group_size=table.num_rows)
            _count_rows(stats, table)
    return stats
