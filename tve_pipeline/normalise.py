"""Normalise raw task vectors into the vector the pre-training head predicts.

Fitted on *active training rows only* (DESIGN.md section 1, step 3): every numeric
aggregate is min-max scaled with the training range, a categorical MODE becomes a one-hot
over its most frequent training values (the rest share an 'other' slot), missing values
become 0, and inactive rows are all zeros with ``inactive = 1``. The fitted statistics are
plain JSON so that they travel with the pre-trained checkpoint and fine-tuning or
inference reuse exactly the same transform.

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
    kind: str  # "minmax" or "onehot"
    low: float = 0.0
    high: float = 0.0
    categories: list = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.categories) + 1 if self.kind == "onehot" else 1


@dataclass
class TaskVectorNormaliser:
    scalers: list[TargetScaler]

    @classmethod
    def fit(cls, raw: pd.DataFrame, aggregations: dict[str, str], *, max_mode_categories: int = 10):
        """Fit on the active rows of a raw target frame (training seed times only)."""
        active = raw[raw[INACTIVE] == 0]
        scalers = []
        for name, aggregation in aggregations.items():
            col = active[name]
            if aggregation == "mode":
                counts = col.dropna().map(category_key).value_counts()
                # Most frequent first; ties broken by value so the fit is deterministic.
                ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                cats = [value for value, _ in ordered[:max_mode_categories]]
                scalers.append(TargetScaler(name, "onehot", categories=cats))
            else:
                values = pd.to_numeric(col, errors="coerce").dropna()
                low = float(values.min()) if len(values) else 0.0
                high = float(values.max()) if len(values) else 0.0
                scalers.append(TargetScaler(name, "minmax", low=low, high=high))
        return cls(scalers)

    @property
    def width(self) -> int:
        return 1 + sum(s.width for s in self.scalers)

    def transform(self, raw: pd.DataFrame) -> np.ndarray:
        """``[n, width]`` float32: column 0 is ``inactive``, then each target's slots."""
        n = len(raw)
        inactive = raw[INACTIVE].to_numpy(dtype=np.float32)
        blocks = [inactive[:, None]]
        for s in self.scalers:
            col = raw[s.name]
            if s.kind == "onehot":
                block = np.zeros((n, s.width), dtype=np.float32)
                values = col.astype(object).where(col.notna(), None)
                index = {c: i for i, c in enumerate(s.categories)}
                for row, value in enumerate(values):
                    if value is not None:
                        block[row, index.get(category_key(value), len(s.categories))] = 1.0
            else:
                x = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
                span = s.high - s.low
                scaled = (x - s.low) / span if span > 0 else np.zeros_like(x)
                block = np.nan_to_num(scaled, nan=0.0).astype(np.float32)[:, None]
            blocks.append(block)
        out = np.concatenate(blocks, axis=1)
        out[inactive == 1, 1:] = 0.0
        return out

    def to_dict(self) -> dict:
        return {"scalers": [asdict(s) for s in self.scalers]}

    @classmethod
    def from_dict(cls, d: dict) -> TaskVectorNormaliser:
        return cls([TargetScaler(**s) for s in d["scalers"]])
