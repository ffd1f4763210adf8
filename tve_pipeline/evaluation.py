"""Predictions of a fine-tuned model and RelBench's evaluator on them.

A task's prediction for a seed is the head's output on the seed's sampled past subgraph:
a probability for binary classification (sigmoid of the logit), a value for regression,
clamped to percentiles of the labels the run trained on (RelBench's RDL clamps to the
2nd-98th). Metrics are RelBench's own (``task.evaluate``); the first one a task reports
chooses the best fine-tuning epoch on the validation table, higher is better for
classification, lower for regression.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from relbench.base import TaskType
from torch_geometric.data import HeteroData

from tve_pipeline.config import Recipe
from tve_pipeline.graph import seed_tensors, to_device
from tve_pipeline.model import RDLModel
from tve_pipeline.sampling import Prefetcher, TemporalNeighborSampler, sampler_for

#: Metrics that grow with quality, and those that shrink (RelBench 3 scores binary
#: classification by ``roc_auc``, regression by ``nmae``, recommendation by ``map``; the
#: others are RelBench 1's, in summaries written before).
HIGHER_IS_BETTER = ("roc_auc", "average_precision", "accuracy", "f1", "r2", "map", "auprc")
LOWER_IS_BETTER = ("nmae", "mae", "rmse", "mse")


def metric_direction(metric: str) -> str:
    """``"higher"`` or ``"lower"``: which way a metric of that name is better."""
    if metric in HIGHER_IS_BETTER:
        return "higher"
    if metric in LOWER_IS_BETTER:
        return "lower"
    raise ValueError(
        f"metric {metric!r}: direction unknown; expected one of "
        f"{', '.join(HIGHER_IS_BETTER + LOWER_IS_BETTER)}"
    )


def higher_is_better(task) -> bool:
    """Whether the task's first metric grows with quality (classification: AUROC)."""
    return task.task_type == TaskType.BINARY_CLASSIFICATION


def task_output(
    task, logits: torch.Tensor, output_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Head outputs as the task's predictions: probabilities, or clamped values."""
    out = logits.view(-1)
    if task.task_type == TaskType.BINARY_CLASSIFICATION:
        out = torch.sigmoid(out)
    elif output_range is not None:
        out = out.clamp(*output_range)
    return out.numpy()


def regression_clamp(
    task, labels: np.ndarray, percentiles: tuple[float, float] | None
) -> tuple[float, float] | None:
    """Where a regression model's predictions are clamped: percentiles of its training
    labels."""
    if task.task_type != TaskType.REGRESSION or percentiles is None or len(labels) == 0:
        return None
    lo, hi = np.percentile(labels, percentiles)
    return float(lo), float(hi)


@torch.no_grad()
def predict(
    model,
    sampler,
    entity_table,
    nodes,
    times,
    batch_size,
    device,
    *,
    seed: int = 0,
    prefetch: bool = True,
) -> torch.Tensor:
    """Head outputs for every seed, in input order (sampling reproducible under ``seed``).

    Batches are sampled one ahead on a worker thread (:class:`Prefetcher`), in order and
    from one generator: the same draws as a plain loop.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    starts = range(0, len(nodes), batch_size)

    def draw(start: int):
        sl = slice(start, start + batch_size)
        return sampler.sample(entity_table, nodes[sl], times[sl], generator=gen)

    outs = [
        model(to_device(batch, device), entity_table).float().cpu()
        for batch in Prefetcher(draw, starts, prefetch)
    ]
    return torch.cat(outs) if outs else torch.empty(0)


def task_metrics(
    model,
    sampler: TemporalNeighborSampler,
    task,
    table,
    labels,
    batch_size: int,
    device,
    *,
    seed: int = 0,
    output_range: tuple[float, float] | None = None,
    prefetch: bool = True,
) -> dict:
    """RelBench's metrics of the model's predictions for the seeds of ``table``, against
    the labels of ``labels`` (the same table, or its unmasked version)."""
    nodes, times = seed_tensors(table.df[task.entity_col], table.df[task.time_col])
    logits = predict(
        model,
        sampler,
        task.entity_table,
        nodes,
        times,
        batch_size,
        device,
        seed=seed,
        prefetch=prefetch,
    )
    return task.evaluate(task_output(task, logits, output_range), labels)


def evaluate(
    data: HeteroData,
    col_stats: dict,
    task,
    tables: dict,
    state_dict: dict,
    recipe: Recipe,
    device,
    *,
    seed: int = 0,
    output_range: tuple[float, float] | None = None,
) -> dict:
    """RelBench's evaluator on val and test for a fine-tuned model state.

    Predictions come from the masked tables; the labels from ``tables["val"]`` and
    ``tables["test_labels"]`` (RelBench's own unmasked test table when absent).
    ``output_range``: the fine-tuning run's clamp for regression outputs (its result's
    ``"output_range"``).
    """
    model = RDLModel(data, col_stats, recipe.backbone, out_channels=1)
    model.load_state_dict(state_dict)
    model.to(device)
    sampler = sampler_for(data, recipe.backbone)
    return {
        split: task_metrics(
            model,
            sampler,
            task,
            tables[split],
            tables[split] if split == "val" else tables.get("test_labels"),
            recipe.finetune.batch_size,
            device,
            seed=seed,
            output_range=output_range,
        )
        for split in ("val", "test")
    }


#: :func:`test_input_ages`' columns (``results/<database>/test_inputs.csv``).
TEST_INPUT_COLUMNS = [
    "task",
    "inputs_until",
    "first_test_seed",
    "last_test_seed",
    "min_age_days",
    "max_age_days",
]


def test_input_ages(dataset, task_names) -> pd.DataFrame:
    """How old the inputs of each task's test seeds are under RelBench's protocol.

    The model's graph is the database cut at the test timestamp (``dataset.get_db()``, as
    RelBench's RDL builds it): a test seed sees the rows up to the cut and none after, so a
    seed ``d`` days after the cut's last row predicts from inputs ``d`` days old, while a val
    seed sees its rows up to its own time. One row per task: the last input row's time, the
    first and last test seed time, and the inputs' age at each, in days."""
    db = dataset.get_db()  # upto_test_timestamp=True: the graph's rows
    times = [
        t.df[t.time_col].max()
        for t in db.table_dict.values()
        if t.time_col is not None and len(t.df)
    ]
    last = pd.Timestamp(max(times)) if times else pd.NaT
    full = dataset.get_db(upto_test_timestamp=False)  # test labels need the rows after the cut
    rows = []
    for name in task_names:
        task = dataset.load_task(name)
        seeds = pd.to_datetime(task.get_table("test", db=full).df[task.time_col])
        first, final = seeds.min(), seeds.max()
        rows.append(
            {
                "task": name,
                "inputs_until": last,
                "first_test_seed": first,
                "last_test_seed": final,
                "min_age_days": (first - last) / pd.Timedelta(days=1),
                "max_age_days": (final - last) / pd.Timedelta(days=1),
            }
        )
    return pd.DataFrame(rows, columns=TEST_INPUT_COLUMNS)
