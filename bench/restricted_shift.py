"""What a restricted task (`top<k>`) selects, split by split (not a test).

    .venv/bin/python bench/restricted_shift.py runs/rel-f1/datasets/rel-f1 driver-top3 10

The restricted task keeps, per seed time, the k entities with the most first-hop rows in
the task's window before the seed time, ties broken by the whole history up to it
(``tve_pipeline.tasks.restrict_task_tables``). For each split this prints its rows, seed
times and positive rate (binary tasks), and how well each of the two ranking counts alone
scores the labels (AUROC for a binary task, Spearman's rho otherwise): a count that ranks
the labels one way in training and the other way on val/test makes the restricted task's
test score fall below chance whatever the model.
"""

from __future__ import annotations

import argparse

import pandas as pd
from relbench.base import TaskType
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from tve_pipeline.database import open_dataset
from tve_pipeline.tasks import past_activity, restrict_task_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="a dataset folder (manifest.yaml, db/, tasks/)")
    parser.add_argument("task")
    parser.add_argument("k", type=int)
    args = parser.parse_args()
    dataset = open_dataset(args.dataset)
    db = dataset.get_db()
    frames = {name: t.df for name, t in db.table_dict.items()}
    task = dataset.load_task(args.task)
    tables = {s: task.get_table(s, mask_input_cols=False) for s in ("train", "val", "test")}
    restrict_task_tables(tables, frames, dataset.manifest.tables, task, args.k)
    binary = task.task_type == TaskType.BINARY_CLASSIFICATION
    score = roc_auc_score if binary else (lambda y, x: spearmanr(y, x).statistic)
    name = "AUROC" if binary else "rho"
    rows = []
    for split, table in tables.items():
        df, y = table.df, table.df[task.target_col]
        args = (frames, dataset.manifest.tables, task.entity_table, task.entity_col, task.time_col)
        counts = {
            "history": past_activity(df, *args, None),
            "window": past_activity(df, *args, task.timedelta),
        }
        rows.append(
            {
                "split": split,
                "first": df[task.time_col].min().date(),
                "last": df[task.time_col].max().date(),
                "rows": len(df),
                "seed_times": df[task.time_col].nunique(),
                "positive_rate": round(float(y.mean()), 3) if binary else None,
                **{
                    f"{name}_{k}": (round(float(score(y, c)), 3) if c.nunique() > 1 else "constant")
                    for k, c in counts.items()
                },
            }
        )
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
