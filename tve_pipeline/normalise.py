"""Normalise raw task vectors into the vector the pre-training head predicts.

Fitted on *active training rows only* (DESIGN.md section 1, step 3): every numeric
aggregate is min-max scaled with the training range, missing values become 0, and inactive
rows are all zeros with ``inactive = 1``. The fitted statistics are plain JSON so that they
travel with the pre-trained checkpoint and fine-tuning or inference reuse exactly the same
transform.

Modes, as the reference encodes them (``transform_features`` in its
``src/helpers/task_vector_generation_helper.py``, lines 150-209): a one-hot over every
category seen in training (scikit-learn's ``OneHotEncoder(handle_unknown='ignore')``: an
unseen category is all zeros), or, where the modes have many categories, one multiple
correspondence analysis (MCA) of all mode targets together with 64 components
(``prince.MCA(n_components=64, ...)`` fitted on the training frame's mode columns, its row
coordinates the encoding; ``mca_num_components = 64`` in
``visualization/rel-hm/user-tve-2-hop.ipynb``, cell 0, the one notebook whose modes are
many: twelve article columns). The reference sets no threshold (a notebook either passes
``mca_num_components`` or not); ours (``mode_encoding="auto"``) uses the MCA where the
one-hot would be wider than its components. Where the reference keeps a missing mode as a
category of its own, ours gives zeros (DESIGN.md: missing -> 0).

The MCA is the correspondence analysis of the indicator matrix ``Z`` (a row per active
training row, a column per (mode target, category), one 1 per non-null mode), as prince
computes it (``prince/ca.py``: ``S = D_r^-1/2 (P - r c^T) D_c^-1/2`` with ``P = Z / sum Z``,
row and column masses ``r``, ``c``; SVD ``S = U s V^T``; a row's coordinates are its
profile ``z / sum z`` times ``D_c^-1/2 V``). prince runs a randomised SVD of the whole
``S``; ours takes the same ``V`` and ``s^2`` exactly, from the eigenvectors of
``S^T S = D_c^-1/2 (Z^T D_s^-1 Z / N - c c^T) D_c^-1/2`` (``s`` the rows' sums, ``N`` their
total), a ``J x J`` matrix of categories summed chunk by chunk, so the rows are never held
together. A row with no mode value (every one null or unseen) is left out of the fit (prince
would divide by its zero mass) and encoded as zeros; an unseen category counts for nothing
in its row's profile, as prince's ``row_coordinates`` drops the columns it was not fitted on.

A mode's category is named by its value, not by the dtype pandas gave the column
(:func:`category_key`): a mode of an integer column reads as int64 from a window whose
rows all have one, as float64 from a window with a null, and the two must be the same
category whichever way the windows are read (one frame, file by file, or in batches).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from tve_pipeline.targets import INACTIVE


def category_key(value) -> str:
    """The name of a mode's category: ``str(value)``, with a whole float named as its
    integer (3.0 -> "3")."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


@dataclass
class TargetScaler:
    name: str
    kind: str  # "minmax", "onehot", or "mca" (encoded together in the normaliser's ModeMCA)
    low: float = 0.0
    high: float = 0.0
    categories: list = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.categories) if self.kind == "onehot" else 1 if self.kind == "minmax" else 0


@dataclass
class ModeMCA:
    """One MCA of the mode targets ``names``: ``categories[t]`` the training categories of
    target ``t`` (the indicator columns, in order), ``loadings`` ``[J, k]`` the rows of
    ``D_c^-1/2 V`` (a row's coordinates are the mean of its categories' loadings),
    ``eigenvalues`` the principal inertias ``s^2``."""

    names: list[str]
    categories: list[list[str]]
    loadings: list[list[float]]
    eigenvalues: list[float]

    @property
    def width(self) -> int:
        return len(self.eigenvalues)

    def transform(self, raw: pd.DataFrame) -> np.ndarray:
        """``[n, width]`` float32 row coordinates of the rows of ``raw`` (zeros for a row with
        no known category)."""
        loadings = np.asarray(self.loadings, dtype=np.float64).reshape(-1, self.width)
        total = np.zeros((len(raw), self.width))
        known = np.zeros(len(raw))
        offset = 0
        for name, cats in zip(self.names, self.categories):
            codes = _codes(raw[name], {c: i for i, c in enumerate(cats)})
            hit = codes >= 0
            total[hit] += loadings[offset + codes[hit]]
            known += hit
            offset += len(cats)
        out = np.divide(total, known[:, None], out=np.zeros_like(total), where=known[:, None] > 0)
        return out.astype(np.float32)

    @classmethod
    def from_dict(cls, d: dict) -> ModeMCA:
        return cls(**d)


def _codes(column: pd.Series, index: dict[str, int]) -> np.ndarray:
    """Each value's position in ``index`` (by :func:`category_key`), -1 for a null or
    unseen one."""
    codes = np.full(len(column), -1, dtype=np.int64)
    present = column.notna().to_numpy()
    if present.any() and index:
        keys = column[present].map(category_key)
        codes[present] = pd.Index(list(index)).get_indexer(keys)
    return codes


class ModeStatistics:
    """What the mode encodings are fitted from, summed over chunks of active training rows:
    each target's category counts and (unless only a one-hot is wanted) the MCA's weighted
    Burt matrix ``sum_i z_i z_i^T / s_i`` over the (target, category) columns, numbered in
    order of first sight."""

    def __init__(self, names: list[str], burt: bool = True) -> None:
        from collections import Counter

        self.names = names
        self.counts = {name: Counter() for name in names}
        self.burt = burt
        self.column: dict[tuple[int, str], int] = {}
        self.parts: list = []  # sparse J x J pieces, summed on finishing
        self.mass = 0.0  # N: the number of mode values in the fitted rows
        self.rows = 0  # the fitted rows: those with a mode value

    def add(self, chunk: pd.DataFrame) -> None:
        """Count the modes of ``chunk`` (active training rows) in."""
        rows, cols = [], []
        for t, name in enumerate(self.names):
            present = chunk[name].notna().to_numpy()
            if not present.any():
                continue
            keys = chunk[name][present].map(category_key)
            self.counts[name].update(keys.value_counts().to_dict())
            if self.burt:
                codes, uniques = pd.factorize(keys)
                ids = np.array([self.column.setdefault((t, u), len(self.column)) for u in uniques])
                rows.append(np.flatnonzero(present))
                cols.append(ids[codes])
        if not rows:
            return
        import scipy.sparse as sp

        rows, cols = np.concatenate(rows), np.concatenate(cols)
        size = np.bincount(rows, minlength=len(chunk)).astype(np.float64)
        z = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(chunk), len(self.column)))
        weight = sp.diags(np.divide(1.0, size, out=np.zeros_like(size), where=size > 0))
        self.parts.append((z.T @ weight @ z).tocoo())
        if len(self.parts) >= 16:  # bounded memory: one sum of the pieces so far
            width = len(self.column)
            self.parts = [
                sp.coo_matrix(
                    (
                        np.concatenate([q.data for q in self.parts]),
                        (
                            np.concatenate([q.row for q in self.parts]),
                            np.concatenate([q.col for q in self.parts]),
                        ),
                    ),
                    shape=(width, width),
                )
                .tocsr()
                .tocoo()  # duplicates summed
            ]
        self.mass += float(size.sum())
        self.rows += int((size > 0).sum())

    def onehot_categories(self, name: str) -> list[str]:
        """A target's training categories, most frequent first (ties by name)."""
        return [c for c, _ in sorted(self.counts[name].items(), key=lambda kv: (-kv[1], kv[0]))]

    def mca(self, components: int) -> ModeMCA:
        """The MCA of every mode target together: ``min(components, J - 1, rows - 1)``
        dimensions (prince's ``min(n_components, min(X.shape) - 1)``)."""
        order = sorted(self.column)  # the indicator columns by target, then category
        size = len(order)
        at = np.array([self.column[tc] for tc in order], dtype=np.int64)
        burt = np.zeros((len(self.column), len(self.column)))
        for part in self.parts:  # a sparse product's COO holds each entry once
            burt[part.row, part.col] += part.data
        burt = burt[np.ix_(at, at)]
        n = self.mass
        # column masses c_j = (rows with category j) / N: the counts, not diag(burt), which
        # is sum_i z_ij / s_i
        col_mass = np.array([self.counts[self.names[t]][c] for t, c in order], dtype=np.float64)
        col_mass = col_mass / n if size else col_mass
        scale = 1.0 / np.sqrt(col_mass)
        # S^T S = D_c^-1/2 (Z^T D_s^-1 Z / N - c c^T) D_c^-1/2: its eigenvectors are S's V
        m = scale[:, None] * (burt / max(n, 1.0) - np.outer(col_mass, col_mass)) * scale
        k = max(0, min(components, size - 1, self.rows - 1))
        values, vectors = np.linalg.eigh(m)
        top = np.argsort(values, kind="stable")[::-1][:k]
        values, vectors = np.clip(values[top], 0.0, None), vectors[:, top]
        # one sign per component, as scikit-learn's svd_flip: the largest entry positive
        big = np.argmax(np.abs(vectors), axis=0)
        vectors = vectors * np.where(vectors[big, np.arange(k)] < 0, -1.0, 1.0)
        categories = [[c for t2, c in order if t2 == t] for t in range(len(self.names))]
        loadings = scale[:, None] * vectors
        return ModeMCA(list(self.names), categories, loadings.tolist(), values.tolist())


@dataclass
class TaskVectorNormaliser:
    """Column 0 ``inactive``, then each target's slots in order (a min-max target one, a
    one-hot mode one per training category, an MCA mode none), then the MCA's components."""

    scalers: list[TargetScaler]
    mca: ModeMCA | None = None

    @classmethod
    def fit(
        cls,
        raw: pd.DataFrame,
        aggregations: dict[str, str],
        *,
        mode_encoding: str = "auto",
        mca_components: int = 64,
    ):
        """Fit on the active rows of a raw target frame (training seed times only)."""
        active = raw[raw[INACTIVE] == 0]
        modes = [name for name, agg in aggregations.items() if agg == "mode"]
        stats = ModeStatistics(modes, burt=mode_encoding != "onehot")
        stats.add(active)
        ranges = {}
        for name, aggregation in aggregations.items():
            if aggregation != "mode":
                values = pd.to_numeric(active[name], errors="coerce").dropna()
                ranges[name] = (
                    (float(values.min()), float(values.max())) if len(values) else (0.0, 0.0)
                )
        return cls.of(aggregations, ranges, stats, mode_encoding, mca_components)

    @classmethod
    def of(
        cls,
        aggregations: dict[str, str],
        ranges: dict[str, tuple[float, float]],
        stats: ModeStatistics,
        mode_encoding: str,
        mca_components: int,
    ) -> TaskVectorNormaliser:
        """The normaliser of fitted statistics: each numeric target's (min, max), the modes'."""
        if mode_encoding not in ("auto", "onehot", "mca"):
            raise ValueError(f"mode_encoding must be auto, onehot or mca, got {mode_encoding!r}")
        width = sum(len(stats.counts[name]) for name in stats.names)
        use_mca = bool(stats.names) and (
            mode_encoding == "mca" or (mode_encoding == "auto" and width > mca_components)
        )
        scalers = []
        for name, aggregation in aggregations.items():
            if aggregation != "mode":
                low, high = ranges[name]
                scalers.append(TargetScaler(name, "minmax", low=low, high=high))
            elif use_mca:
                scalers.append(TargetScaler(name, "mca"))
            else:
                scalers.append(
                    TargetScaler(name, "onehot", categories=stats.onehot_categories(name))
                )
        return cls(scalers, stats.mca(mca_components) if use_mca else None)

    @property
    def width(self) -> int:
        return 1 + sum(s.width for s in self.scalers) + (self.mca.width if self.mca else 0)

    def transform(self, raw: pd.DataFrame) -> np.ndarray:
        """``[n, width]`` float32: column 0 is ``inactive``, then each target's slots."""
        n = len(raw)
        inactive = raw[INACTIVE].to_numpy(dtype=np.float32)
        blocks = [inactive[:, None]]
        for s in self.scalers:
            col = raw[s.name]
            if s.kind == "onehot":
                block = np.zeros((n, s.width), dtype=np.float32)
                codes = _codes(col, {c: i for i, c in enumerate(s.categories)})
                hit = codes >= 0  # an unseen category, like a missing one, is all zeros
                block[np.flatnonzero(hit), codes[hit]] = 1.0
            elif s.kind == "minmax":
                x = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
                span = s.high - s.low
                scaled = (x - s.low) / span if span > 0 else np.zeros_like(x)
                block = np.nan_to_num(scaled, nan=0.0).astype(np.float32)[:, None]
            else:
                continue
            blocks.append(block)
        if self.mca is not None:
            blocks.append(self.mca.transform(raw))
        out = np.concatenate(blocks, axis=1)
        out[inactive == 1, 1:] = 0.0
        return out

    def to_dict(self) -> dict:
        return {
            "scalers": [asdict(s) for s in self.scalers],
            "mca": asdict(self.mca) if self.mca else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TaskVectorNormaliser:
        mca = d.get("mca")
        return cls(
            [TargetScaler(**s) for s in d["scalers"]], ModeMCA.from_dict(mca) if mca else None
        )
