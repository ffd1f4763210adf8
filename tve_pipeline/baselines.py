"""Trivial baselines of a task: what any model has to beat, scored as RelBench scores them.

RelBench's ``examples/baseline_entity.py`` scores, per task, predictors that read nothing
but the training labels (lines 37-69, 109-137 at snap-stanford/relbench dd8d6ef):

- regression: ``global_zero`` (0), ``global_mean`` and ``global_median`` (of the training
  labels), ``entity_mean`` and ``entity_median`` (of the entity's own training labels; 0 for
  an entity without any);
- binary classification: ``random`` (uniform scores), ``majority`` (the most frequent
  training label), ``entity_mean`` and ``entity_median``.

Each is fitted on the **training** labels only and scored by the task's own evaluator on
val and test; test labels are read for scoring and nothing else. (RelBench's example fits
the test predictions on train + val; ours are fitted as the models are, on train, so that
the two compare like with like: on rel-flights plane-delay the two fits differ by 0.001 to
0.003 test NMAE.)

**The trivial baseline** of a (task, metric), the one a model is held against in
``results`` and in the ``beats_trivial_baseline`` check, is the best *constant* predictor
(global zero, mean or median; for classification the majority class, AUROC 0.5) by that
metric on **val**, scored on val and test. Which constant is best depends on the metric
(the median minimises absolute error, the mean squared error), so it is chosen on val as
a model's epoch is; the entity predictors are reported beside it, not as it: they read
each entity's past labels, which is already a model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from relbench.base import TaskType

from tve_pipeline.evaluation import metric_direction

REGRESSION = ("global_zero", "global_mean", "global_median", "entity_mean", "entity_median")
CLASSIFICATION = ("random", "majority", "entity_mean", "entity_median")
#: Predictors that give every seed the same value: the candidates for the trivial baseline.
CONSTANT = ("global_zero", "global_mean", "global_median", "majority")
COLUMNS = ["task", "predictor", "split", "metric", "direction", "value", "label_median"]


def predictors(task) -> tuple[str, ...]:
    """RelBench's trivial predictors of the task's type."""
    if task.task_type == TaskType.REGRESSION:
        return REGRESSION
    if task.task_type == TaskType.BINARY_CLASSIFICATION:
        return CLASSIFICATION
    raise ValueError(
        f"task {task.name!r}: no trivial baseline for task type {task.task_type.value}"
    )


def trivial_prediction(
    task, name: str, train: pd.DataFrame, table: pd.DataFrame, seed: int = 0
) -> np.ndarray:
    """Predictor ``name``'s prediction for each row of ``table``, fitted on ``train``'s
    labels (RelBench's ``baseline_entity.py``, ``evaluate``)."""
    labels = train[task.target_col].astype(float)
    n = len(table)
    if name == "global_zero":
        return np.zeros(n)
    if name == "global_mean":
        return np.full(n, float(labels.mean()))
    if name == "global_median":
        return np.full(n, float(np.median(labels.to_numpy())))
    if name == "majority":
        return np.full(n, float(labels.astype(int).mode().iloc[0]))
    if name == "random":
        return np.random.default_rng(seed).random(n)
    if name in ("entity_mean", "entity_median"):
        per_entity = labels.groupby(train[task.entity_col]).agg(name.removeprefix("entity_"))
        return table[task.entity_col].map(per_entity).fillna(0.0).to_numpy(dtype=float)
    known = ", ".join(dict.fromkeys(REGRESSION + CLASSIFICATION))
    raise ValueError(f"unknown trivial predictor {name!r}; expected one of {known}")


def baseline_scores(task, tables: Mapping, seed: int = 0) -> pd.DataFrame:
    """Every trivial predictor of the task on val and test by the task's evaluator: one row
    per (predictor, split, metric), with the split's label median (regression; NaN for
    classification). ``tables``: ``train`` and ``val`` tables, and the
    labelled test table under ``test_labels`` (as ``_task_of(..., with_test_labels=True)``
    gives)."""
    missing = [s for s in ("train", "val", "test_labels") if s not in tables]
    if missing:
        raise ValueError(f"task {task.name!r}: baseline_scores needs tables {missing}")
    train = tables["train"].df
    medians = label_medians(task, tables) or {}
    rows = []
    for name in predictors(task):
        for split, labelled in (("val", tables["val"]), ("test", tables["test_labels"])):
            pred = trivial_prediction(task, name, train, labelled.df, seed)
            for metric, value in task.evaluate(pred, labelled).items():
                rows.append(
                    {
                        "task": task.name,
                        "predictor": name,
                        "split": split,
                        "metric": metric,
                        "direction": metric_direction(metric),
                        "value": float(value),
                        "label_median": medians.get(split, float("nan")),
                    }
                )
    return pd.DataFrame(rows, columns=COLUMNS)


def trivial_baseline(scores: pd.DataFrame) -> pd.DataFrame:
    """The trivial baseline per (task, split, metric): the constant predictor that scores
    best on val by that metric (ties: the first of :data:`CONSTANT`), with its val and test
    scores. Columns: task, split, metric, direction, trivial (the score), trivial_predictor,
    label_median."""
    columns = [
        "task",
        "split",
        "metric",
        "direction",
        "trivial",
        "trivial_predictor",
        "label_median",
    ]
    constant = scores[scores["predictor"].isin(CONSTANT)]
    out = []
    for (task, metric), part in constant.groupby(["task", "metric"], sort=True):
        val = part[part["split"] == "val"].set_index("predictor")["value"]
        if val.empty:
            continue
        sign = 1.0 if metric_direction(metric) == "higher" else -1.0
        ordered = [p for p in CONSTANT if p in val.index]
        chosen = max(ordered, key=lambda p: (sign * val[p], -ordered.index(p)))
        for _, row in part[part["predictor"] == chosen].iterrows():
            out.append(
                {
                    "task": task,
                    "split": row["split"],
                    "metric": metric,
                    "direction": row["direction"],
                    "trivial": row["value"],
                    "trivial_predictor": chosen,
                    "label_median": row["label_median"],
                }
            )
    return pd.DataFrame(out, columns=columns)


def beats(value: float, trivial: float, direction: str) -> bool:
    """Whether ``value`` is strictly better than ``trivial`` in the metric's direction."""
    return bool(value > trivial if direction == "higher" else value < trivial)


def label_medians(task, tables: Mapping) -> dict[str, float] | None:
    """A regression task's label median per split (train, val, test), to tell a shifted
    test window when a model loses to a constant; None for classification. Test labels are
    only described here, never used to fit or choose anything."""
    if task.task_type != TaskType.REGRESSION:
        return None
    return {
        split: float(tables[name].df[task.target_col].astype(float).median())
        for split, name in (("train", "train"), ("val", "val"), ("test", "test_labels"))
        if name in tables
    }
