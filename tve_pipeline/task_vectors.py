"""Pre-training seeds and their normalised task vectors, held compactly.

Design. Pre-training reads, for every seed (entity, seed time) of the training seed
times, the normalised task vector that its head predicts (DESIGN.md section 1, steps 3
and 4), and those of the validation seed times, on which it chooses its checkpoint. At
scale almost every seed is inactive (one user's database: 21k entities x 59 seed times =
1.25 million seeds x 472 targets, 94 % inactive), and an inactive seed's vector is all
zeros with ``inactive = 1``. So :class:`SeedTaskVectors` keeps, per seed,
its entity (int64), its seed time and an index into a float32 matrix of the *active*
seeds' normalised vectors only, and builds a batch's dense ``y`` when the batch is drawn.
(Concatenating the windows into one frame, 4.7 GB of float64, and its copies and dense
float32 vectors peaked at 20.9 GB there; ``bench/bench_pretrain_input.py`` measures both.)

Raw task vectors (the rows of :func:`tve_pipeline.targets.compute_targets`: the entity's
pkey column, ``timestamp``, ``inactive``, one column per target) come as one pandas frame
or as parquet files, one per window, in any order; the training windows' and the
validation windows' come apart. Both are read as one sequence of chunks (slices of the
frame, batches of a file's rows) in three passes, so that memory holds one chunk of raw
rows at a time:

1. *seeds*: entity, seed time and ``inactive`` of every row. Seeds are ordered by seed
   time (a stable sort: the rows of one seed time keep their input order, files in the
   order given): the order of the concatenated frame.
2. *fit*: the normaliser's statistics (each numeric target's min and max, the counts of
   each mode's categories, the MCA's sums) on the active rows of the *training* windows
   only, summed over chunks into the :class:`~tve_pipeline.normalise.TaskVectorNormaliser`
   that ``fit`` on the whole training frame returns.
3. *vectors*: each chunk's active rows normalised into their rows of the matrix; the
   validation windows' with the training statistics, as the reference scales its val
   split with the training scalers (visualization/rel-hm/user-tve-2-hop.ipynb, cell 3:
   ``transform_features(..., std_scalers=std_scalers, is_train=False)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tve_pipeline.normalise import ModeStatistics, TaskVectorNormaliser
from tve_pipeline.targets import INACTIVE, TIMESTAMP

#: Rows of raw task vectors read at once (472 float64 targets: about 120 MB).
CHUNK_ROWS = 32_768

RawTaskVectors = pd.DataFrame | Sequence[str | os.PathLike]


class RawTaskVectorChunks:
    """Raw task vectors (a frame, or parquet files) read as consecutive chunks of rows.

    A row's position is its index in the concatenation of the inputs, in the order given.
    Every file's columns are checked on opening: a file that lacks the entity column or a
    target (written for another entity table or traversal graph) is named in a ValueError.
    """

    def __init__(self, raw: RawTaskVectors, columns: Sequence[str], chunk_rows: int = CHUNK_ROWS):
        import pyarrow.parquet as pq

        self.chunk_rows = max(int(chunk_rows), 1)
        if isinstance(raw, pd.DataFrame):
            self.frame, self.paths = raw, []
            _check_columns("the raw task vector frame", raw.columns, columns)
            self.sizes = [len(raw)]
        else:
            raw = [raw] if isinstance(raw, (str, os.PathLike)) else raw
            self.frame, self.paths = None, [Path(p) for p in raw]
            self.sizes = []
            for path in self.paths:
                meta = pq.ParquetFile(path).metadata
                _check_columns(str(path), meta.schema.names, columns)
                self.sizes.append(meta.num_rows)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def chunks(
        self, columns: Sequence[str], wanted: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
        """``(positions, rows)`` chunk after chunk: the ``wanted`` rows (all when None) and
        their columns.

        Rows are dropped before they become pandas (at scale nearly all of a chunk is
        inactive); a part (file) with no wanted row is not read.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys(columns))
        if self.frame is not None:
            at = self.frame.columns.get_indexer(columns)
            for start in range(0, len(self.frame), self.chunk_rows):
                rows = np.arange(start, min(start + self.chunk_rows, len(self.frame)))
                rows = rows if wanted is None else rows[wanted[rows]]
                if len(rows):
                    yield rows, self.frame.iloc[rows, at]
            return
        for path, start, stop in zip(self.paths, self.offsets[:-1], self.offsets[1:]):
            if wanted is not None and not wanted[start:stop].any():
                continue
            for batch in pq.ParquetFile(path).iter_batches(
                batch_size=self.chunk_rows, columns=columns
            ):
                rows = np.arange(start, start + batch.num_rows)
                start += batch.num_rows
                if wanted is not None:
                    keep = wanted[rows]
                    rows, batch = rows[keep], batch.filter(pa.array(keep))
                if len(rows):
                    yield rows, batch.to_pandas()


def _check_columns(name: str, have, need: Sequence[str]) -> None:
    have = set(have)
    missing = [c for c in need if c not in have]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(
            f"raw task vectors {name} lack column(s) {shown}: "
            "computed for another entity table or traversal graph?"
        )


@dataclass
class SeedTaskVectors:
    """Seeds (entity, seed time) and their normalised task vectors, active ones stored.

    ``vector_row[i]`` is seed ``i``'s row of ``vectors`` (float32 ``[#active, width]``),
    -1 for an inactive seed.
    """

    entity: np.ndarray  # int64 [n]
    seed_time: np.ndarray  # datetime64[ns] [n]
    vector_row: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [#active, width]

    def __len__(self) -> int:
        return len(self.entity)

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    def task_vectors(self, index) -> torch.Tensor:
        """Dense ``[len(index), width]`` float32 ``y`` of the seeds at ``index`` (a tensor,
        array or slice)."""
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        rows = self.vector_row[index]
        y = np.zeros((len(rows), self.width), dtype=np.float32)
        active = rows >= 0
        y[active] = self.vectors[rows[active]]
        y[~active, 0] = 1.0  # inactive: all zeros but the flag
        return torch.from_numpy(y)


@dataclass
class PretrainingTaskVectors:
    """What pre-training reads: the normaliser, the training seeds and the validation seeds."""

    normaliser: TaskVectorNormaliser
    train: SeedTaskVectors
    val: SeedTaskVectors
    inactive_rate: float  # over all seeds, training and validation


def pretraining_task_vectors(
    raw: RawTaskVectors,
    entity_col: str,
    aggregations: dict[str, str],
    *,
    val: RawTaskVectors | None = None,
    mode_encoding: str = "auto",
    mca_components: int = 64,
    chunk_rows: int = CHUNK_ROWS,
) -> PretrainingTaskVectors:
    """Read raw task vectors (a frame or parquet files) into the compact seeds of pre-training.

    ``raw`` holds the training windows, ``val`` the validation windows (none: no validation
    seeds). The training seeds equal, in the order of, concatenating ``raw`` and
    stable-sorting by ``timestamp``; the normaliser is :meth:`TaskVectorNormaliser.fit` on
    them alone, and transforms the training and validation rows alike, without ever
    holding more than ``chunk_rows`` raw rows. Validation seed times must all be later than
    every training seed time (a validation window read as training would be a leak).
    """
    columns = [entity_col, TIMESTAMP, INACTIVE, *aggregations]
    source = RawTaskVectorChunks(raw, columns, chunk_rows)
    entity, seed_time, inactive = _read_seeds(source, entity_col)
    normaliser = fit_normaliser(source, aggregations, inactive == 0, mode_encoding, mca_components)
    train = _seeds(source, normaliser, entity, seed_time, inactive)
    if val is None:
        val = pd.DataFrame(columns=columns)
    val_source = RawTaskVectorChunks(val, columns, chunk_rows)
    val_entity, val_time, val_inactive = _read_seeds(val_source, entity_col)
    if len(val_time) and len(seed_time) and val_time.min() <= seed_time.max():
        raise ValueError(
            f"validation task vectors at seed time {pd.Timestamp(val_time.min())} are not "
            f"later than the training ones (latest {pd.Timestamp(seed_time.max())}): "
            "a training window passed as validation, or the other way round?"
        )
    both = np.concatenate([inactive, val_inactive])
    return PretrainingTaskVectors(
        normaliser,
        train,
        _seeds(val_source, normaliser, val_entity, val_time, val_inactive),
        float(both.mean()) if len(both) else float("nan"),
    )


def _seeds(
    source: RawTaskVectorChunks,
    normaliser: TaskVectorNormaliser,
    entity: np.ndarray,
    seed_time: np.ndarray,
    inactive: np.ndarray,
) -> SeedTaskVectors:
    """Pass 3 for one source: its seeds in seed-time order, active ones' vectors stored."""
    # Like TaskVectorNormaliser.transform, every row not flagged inactive keeps its vector.
    stored = inactive != 1
    vector_row = np.where(stored, np.cumsum(stored) - 1, -1)
    vectors = _normalised_rows(source, normaliser, vector_row)
    at = np.argsort(seed_time, kind="stable")
    return SeedTaskVectors(entity[at], seed_time[at], vector_row[at], vectors)


def _read_seeds(
    source: RawTaskVectorChunks, entity_col: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1: entity (int64), seed time (datetime64[ns]) and ``inactive`` of every row."""
    entity = np.empty(len(source), dtype=np.int64)
    seed_time = np.empty(len(source), dtype="datetime64[ns]")
    inactive = np.empty(len(source), dtype=np.int64)
    for at, chunk in source.chunks([entity_col, TIMESTAMP, INACTIVE]):
        entity[at] = chunk[entity_col].to_numpy(dtype=np.int64)
        seed_time[at] = pd.to_datetime(chunk[TIMESTAMP]).to_numpy(dtype="datetime64[ns]")
        inactive[at] = chunk[INACTIVE].to_numpy(dtype=np.int64)
    return entity, seed_time, inactive


def fit_normaliser(
    source: RawTaskVectorChunks,
    aggregations: dict[str, str],
    fit_rows: np.ndarray,
    mode_encoding: str = "auto",
    mca_components: int = 64,
) -> TaskVectorNormaliser:
    """Pass 2: :meth:`TaskVectorNormaliser.fit` on the rows where ``fit_rows``, chunk by chunk.

    Min and max of the chunks' min and max, and the modes' category counts and MCA sums
    (:class:`~tve_pipeline.normalise.ModeStatistics`) added over the chunks, are those of
    the rows together; the normaliser is built from them by the same rules.
    """
    modes = [name for name, agg in aggregations.items() if agg == "mode"]
    numeric = [name for name, agg in aggregations.items() if agg != "mode"]
    stats = ModeStatistics(modes, burt=mode_encoding != "onehot")
    low = np.full(len(numeric), np.nan)
    high = np.full(len(numeric), np.nan)
    for _, chunk in source.chunks([*aggregations], wanted=fit_rows):
        stats.add(chunk)
        values = _numeric_values(chunk, numeric)
        # fmin / fmax skip NaN (missing); a target with no value anywhere stays NaN -> 0
        low = np.fmin(low, np.fmin.reduce(values, axis=0, initial=np.nan))
        high = np.fmax(high, np.fmax.reduce(values, axis=0, initial=np.nan))
    low = np.where(np.isnan(low), 0.0, low).tolist()
    high = np.where(np.isnan(high), 0.0, high).tolist()
    ranges = {name: (lo, hi) for name, lo, hi in zip(numeric, low, high)}
    return TaskVectorNormaliser.of(aggregations, ranges, stats, mode_encoding, mca_components)


def _normalised_rows(
    source: RawTaskVectorChunks, normaliser: TaskVectorNormaliser, vector_row: np.ndarray
) -> np.ndarray:
    """Pass 3: ``normaliser.transform`` of every row with a ``vector_row`` (>= 0), into that
    row (float32)."""
    out = np.empty((int((vector_row >= 0).sum()), normaliser.width), dtype=np.float32)
    for at, chunk in source.chunks(
        [INACTIVE, *(s.name for s in normaliser.scalers)], wanted=vector_row >= 0
    ):
        out[vector_row[at]] = normaliser.transform(chunk)
    return out


def _numeric_values(chunk: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """``[rows, len(names)]`` float64 of numeric targets, non-numbers as NaN
    (``pd.to_numeric``'s coercion)."""
    block = chunk[list(names)]
    if all(dtype.kind in "biuf" for dtype in block.dtypes):  # what compute_targets writes: one copy
        return block.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.column_stack(
        [
            pd.to_numeric(block[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            for c in names
        ]
    )
