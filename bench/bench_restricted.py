"""What a restricted task (``top<k>``) leaves of a database's tasks, and what it costs to
rank them (not a test).

    cd /work/wt-X && PYTHONPATH=$PWD .venv/bin/python bench/bench_restricted.py \\
        --dataset-dir DIR [--tasks driver-dnf,driver-top3] [--k 5,10]
        [--finetune driver-top3:10 --seeds 0,1,2 --threads 1]

Per task: the median number of entities per seed time in train / val / test; per k, the
rows the restricted train / val / test tables keep, the share of positives (binary) in val
and test, and the seconds :func:`tve_pipeline.tasks.restrict_task_tables` takes for the
four tables of a cell (train, val, masked test, labelled test). For a binary task it also
prints how well experience (first-hop rows up to t, the ranking's tie-break) ranks the
labels inside the restricted tables (AUROC per split): a restricted population whose
meaning drifts over time shows there. ``--finetune TASK:K`` adds scratch fine-tuning of
that restricted task with the ``cpu`` preset at its single rate 0.005, one run per seed,
scored on val and test (minutes a seed on one thread).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd


def _tables(task, db, labelled_test: bool = True) -> dict:
    tables = {split: task.get_table(split, db=db) for split in ("train", "val", "test")}
    if labelled_test:
        tables["test_labels"] = task.get_table("test", mask_input_cols=False, db=db)
    return tables


def main() -> None:
    from relbench.base import TaskType
    from sklearn.metrics import roc_auc_score

    from tve_pipeline.database import open_dataset
    from tve_pipeline.tasks import past_activity, restrict_task_tables

    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset-dir", required=True)
    ap.add_argument("--tasks")
    ap.add_argument("--k", default="5,10", help="comma-separated ks")
    ap.add_argument("--finetune", help="TASK:K, scratch fine-tuning of that restricted task")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    ds = open_dataset(args.dataset_dir)
    names = args.tasks.split(",") if args.tasks else list(ds.get_task_names())
    for name in names:
        task = ds.load_task(name)
        db = task.get_db(upto_test_timestamp=False)
        frames = {n: t.df for n, t in db.table_dict.items()}
        full = _tables(task, db)
        per_time = "/".join(
            f"{full[s].df.groupby(task.time_col).size().median():.0f}"
            for s in ("train", "val", "test")
        )
        print(f"{name}: entities per seed time (median, train/val/test) {per_time}")
        binary = task.task_type == TaskType.BINARY_CLASSIFICATION
        for k in ks:
            tables = _tables(task, db)
            t0 = time.perf_counter()
            try:
                restrict_task_tables(tables, frames, ds.manifest.tables, task, k)
            except ValueError as exc:
                print(f"  top{k}: {exc}")
                continue
            seconds = time.perf_counter() - t0
            rows = "/".join(str(len(tables[s].df)) for s in ("train", "val", "test"))
            line = f"  top{k}: rows {rows}, ranked in {seconds:.2f}s"
            if binary:
                y = {
                    s: tables["test_labels" if s == "test" else s].df
                    for s in ("train", "val", "test")
                }
                line += f"; positives val {y['val'][task.target_col].mean():.2f}"
                line += f" test {y['test'][task.target_col].mean():.2f}"
                auroc = []
                for split, df in y.items():
                    history = past_activity(
                        df,
                        frames,
                        ds.manifest.tables,
                        task.entity_table,
                        task.entity_col,
                        task.time_col,
                        None,
                    )
                    labels = df[task.target_col]
                    score = roc_auc_score(labels, history) if labels.nunique() > 1 else float("nan")
                    auroc.append(f"{split} {score:.3f}")
                line += f"; AUROC of experience: {', '.join(auroc)}"
            print(line, flush=True)
    if args.finetune:
        _finetune(ds, args)


def _finetune(ds, args) -> None:
    import torch

    from tve_pipeline import evaluation, training
    from tve_pipeline.config import make_recipe
    from tve_pipeline.graph import graph_for
    from tve_pipeline.summary import summarise_database
    from tve_pipeline.tasks import restrict_task_tables

    torch.set_num_threads(args.threads)
    name, k = args.finetune.split(":")
    recipe = make_recipe("cpu", {"finetune": {"lr_grid": [0.005]}})
    cache = Path(args.dataset_dir) / ".graph-cache"
    column_types = summarise_database(Path(args.dataset_dir)).column_types
    data, col_stats = graph_for(ds.get_db(), column_types, recipe.backbone, cache)
    task = ds.load_task(name)
    db = task.get_db(upto_test_timestamp=False)
    frames = {n: t.df for n, t in db.table_dict.items()}
    tables = restrict_task_tables(_tables(task, db), frames, ds.manifest.tables, task, int(k))
    cpu = torch.device("cpu")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        tuned = training.finetune(data, col_stats, task, tables, recipe, cpu, seed=seed)
        scores = evaluation.evaluate(
            data,
            col_stats,
            task,
            tables,
            tuned["state_dict"],
            recipe,
            cpu,
            seed=seed,
            output_range=tuned["output_range"],
        )
        metric = next(iter(scores["val"]))
        rows.append({"seed": seed, **{s: scores[s][metric] for s in ("val", "test")}})
        print(
            f"{name} top{k} scratch, seed {seed}, {tuned['steps']} steps: "
            f"{time.perf_counter() - t0:.0f}s, val {metric} {scores['val'][metric]:.4f}, "
            f"test {scores['test'][metric]:.4f}",
            flush=True,
        )
    print(pd.DataFrame(rows).describe().loc[["mean", "std"]].to_string())


if __name__ == "__main__":
    main()
