"""Why does the demo's regression lose to a constant? (not a test)

On one regression task (default: rel-flights plane-delay, the demo's), prints

- the labels per split (count, mean, median, std, 2nd / 98th percentiles, skew);
- RelBench's trivial predictors (``tve_pipeline.baselines``: fitted on the training labels,
  scored by RelBench's evaluator on val and test) and the trivial baseline chosen on val;
- a fine-tuning run from scratch under the recipe profile (default ``demo``) with optional
  overrides: val and test by RelBench's evaluator, the validation curve, and percentiles of
  the model's predictions (test scored for this diagnosis only; the protocol chooses on val).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_regression_baseline.py \\
        --dataset /tmp/prof/rel-flights [--task plane-delay] [--seeds 0] \\
        [--overrides '{"finetune": {"min_steps": 400}}'] [--no-finetune]
(``--dataset``: a folder written by ``tve import flights`` or ``build_flights``.)
"""

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from tve_pipeline import baselines, evaluation, training
from tve_pipeline.config import make_recipe
from tve_pipeline.database import column_types, open_dataset
from tve_pipeline.graph import graph_for, seed_tensors
from tve_pipeline.model import RDLModel
from tve_pipeline.sampling import sampler_for


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--task", default="plane-delay")
    p.add_argument("--profile", default="demo")
    p.add_argument("--overrides", default="{}", help="recipe overrides, JSON")
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-finetune", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ds = open_dataset(a.dataset)
    task = ds.load_task(a.task)
    full = task.get_db(upto_test_timestamp=False)
    tabs = {s: task.get_table(s, db=full) for s in ("train", "val", "test")}
    tabs["test_labels"] = task.get_table("test", mask_input_cols=False, db=full)

    stats = {}
    for split, name in (("train", "train"), ("val", "val"), ("test", "test_labels")):
        y = tabs[name].df[task.target_col].astype(float)
        lo, hi = np.percentile(y, [2, 98])
        stats[split] = {
            "n": len(y),
            "mean": y.mean(),
            "median": y.median(),
            "std": y.std(ddof=1),
            "p2": lo,
            "p98": hi,
            "skew": y.skew(),
        }
    print(f"{a.task} labels per split:\n{pd.DataFrame(stats).T.round(3).to_string()}\n")
    scores = baselines.baseline_scores(task, tabs)
    table = scores.pivot_table(index="predictor", columns="split", values="value")
    print(f"RelBench's trivial predictors (training labels):\n{table.round(4).to_string()}\n")
    chosen = baselines.trivial_baseline(scores)
    print(f"trivial baseline (best constant on val):\n{chosen.round(4).to_string(index=False)}\n")
    if a.no_finetune:
        return

    db = ds.get_db()
    types = column_types({n: t.df for n, t in db.table_dict.items()}, ds.manifest, ds.dataset_dir)
    recipe = make_recipe(a.profile, json.loads(a.overrides))
    data, col_stats = graph_for(db, types, recipe.backbone)
    device = torch.device("cpu")
    for seed in [int(s) for s in a.seeds.split(",")]:
        t0 = time.perf_counter()
        res = training.finetune(data, col_stats, task, tabs, recipe, device, seed=seed)
        seconds = time.perf_counter() - t0
        clamp = res["output_range"]
        metrics = evaluation.evaluate(
            data, col_stats, task, tabs, res["state_dict"], recipe, device, seed=seed,
            output_range=clamp,
        )  # fmt: skip
        model = RDLModel(data, col_stats, recipe.backbone, out_channels=1)
        model.load_state_dict(res["state_dict"])
        sampler = sampler_for(data, recipe.backbone)
        spread = {}
        for split in ("val", "test"):
            nodes, times = seed_tensors(
                tabs[split].df[task.entity_col], tabs[split].df[task.time_col]
            )
            out = evaluation.predict(
                model, sampler, task.entity_table, nodes, times, recipe.finetune.batch_size, device
            )
            pred = evaluation.task_output(task, out, clamp)
            spread[split] = np.percentile(pred, [2, 50, 98]).round(2).tolist()
        row = {
            "seed": seed,
            "seconds": round(seconds, 1),
            "lr": res["lr"],
            "steps": res["steps"],
            "best_step": res["best_step"],
            "clamp": clamp,
            "val": metrics["val"],
            "test": metrics["test"],
            "val_curve": [round(next(iter(h_val(h))), 4) for h in res["history"]],
            "prediction_p2_p50_p98": spread,
        }
        print(json.dumps(row), flush=True)


def h_val(history_row: dict):
    """The validation metric of one evaluation of the fine-tuning curve."""
    return (v for k, v in history_row.items() if k.startswith("val_"))


if __name__ == "__main__":
    main()
