"""Do fine-tuned models score lower on test because its inputs stop at the cut? (not a test)

RelBench builds the model's graph from ``dataset.get_db()``, the database cut at the test
timestamp, and so does the pipeline: every test seed sees the rows up to the cut and none
after it, while a val seed sees every row up to its own time. On rel-f1 (test seeds 2010-03
to 2013-03, the cut after the last race of 2009) a model predicts test from inputs 4
months to 3 years old, and val from current ones; on rel-flights test from inputs 0-14
days old. This reloads the fine-tuned models of a run folder (the ``finetuned_models``
values: nothing is retrained) and scores them with the column statistics they were trained
with:

- ``val`` and ``test``: as the ``metrics`` asset does (the graph cut at the test timestamp);
- ``test_fresh``: on the graph of the whole database, so that each test seed sees its rows
  up to its own time as a val seed does (the sampler still drops every row later than the
  seed time: nothing leaks);
- ``test_fresh_rescaled`` (where a numerical column's name contains ``--rescale``'s word):
  the same with those columns multiplied by its factor in the rows at or after the test
  timestamp. rel-f1's default, ``points:0.4``: Formula 1 gave 25 points for a win from 2010,
  10 before, so the test period's fresh rows are on another scale than training's.

Scores are signed so that + is better (NMAE and MAE negated); the last table is each
method's paired gain over the first (scratch) on each.

    PYTHONPATH=$PWD .venv/bin/python bench/stale_test_inputs.py /work/runs/rel-f1 \\
        [--database rel-f1] [--tasks driver-dnf,driver-top3,driver-position] \\
        [--label-sets 0.1,1,top10] [--methods scratch,tve@4000] [--seeds 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch_frame
from scipy import stats

from assets.commands import Runner
from assets.training_assets import _cached_graph, _task_of
from tve_pipeline import evaluation
from tve_pipeline.database import open_dataset
from tve_pipeline.graph import graph_for
from tve_pipeline.tasks import label_setting


def fresh_graph(dataset, summary, recipe, col_stats):
    """The graph of the whole database, its tensor frames materialised with the column
    statistics the models were trained with (``col_stats``: table -> column -> stats), so
    that a category keeps its index and a number its normalisation."""
    original = torch_frame.data.Dataset.materialize
    db = dataset.get_db(upto_test_timestamp=False)
    # relbench's make_pkey_fkey_graph materialises the tables in the database's order
    order = iter(db.table_dict)

    def with_trained_stats(self, device=None, path=None, **kw):
        table = next(order)
        if set(self.col_to_stype) != set(col_stats[table]):
            raise ValueError(f"table {table!r}: its columns differ from the trained graph's")
        return original(self, device=device, path=None, col_stats=col_stats[table])

    torch_frame.data.Dataset.materialize = with_trained_stats
    try:
        data, _ = graph_for(db, summary.column_types, recipe.backbone)
    finally:
        torch_frame.data.Dataset.materialize = original
    return data


def rescaled(data, test_seconds: float, scale: float, word: str):
    """A copy of the graph with every numerical column named like ``word`` multiplied by
    ``scale`` in the rows timed at or after ``test_seconds``; returns (graph, what changed)."""
    out = copy.copy(data)
    changed = []
    for nt in data.node_types:
        store = data[nt]
        if "tf" not in store or "time" not in store:
            continue
        tf = store.tf
        names = tf.col_names_dict.get(torch_frame.numerical, [])
        cols = [i for i, n in enumerate(names) if word in n.lower()]
        if not cols:
            continue
        rows = store.time >= test_seconds
        feat = tf.feat_dict[torch_frame.numerical].clone()
        for i in cols:
            feat[rows, i] = feat[rows, i] * scale
        new_tf = copy.copy(tf)
        new_tf.feat_dict = {**tf.feat_dict, torch_frame.numerical: feat}
        out[nt].tf = new_tf
        changed.append(f"{nt}.{','.join(names[i] for i in cols)} ({int(rows.sum())} rows)")
    return out, changed


def scores(data, col_stats, task, tables, result, recipe, seed: int) -> tuple[float, float]:
    """(val, test) of the task's first metric, as the `metrics` asset computes them."""
    s = evaluation.evaluate(
        data,
        col_stats,
        task,
        tables,
        result["state_dict"],
        recipe,
        torch.device("cpu"),
        seed=seed,
        output_range=result.get("output_range"),
    )
    return tuple(float(next(iter(s[split].values()))) for split in ("val", "test"))


def interval(d: pd.Series) -> str:
    if len(d) < 2:
        return f"{d.mean():+.3f} (n={len(d)})"
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    star = "*" if abs(d.mean()) > h else ""
    return f"{d.mean():+.3f} [{d.mean() - h:+.3f}, {d.mean() + h:+.3f}]{star}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--database", default="rel-f1")
    p.add_argument("--tasks", default="driver-dnf,driver-top3,driver-position")
    p.add_argument("--label-sets", default="0.1,1,top10")
    p.add_argument("--methods", default="scratch,tve@4000", help="scratch first")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument(
        "--rescale",
        default="points:0.4",
        help="WORD:FACTOR, the columns and factor of test_fresh_rescaled ('' for none)",
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    runner = Runner(a.database, a.run_dir)
    recipe = runner.recipe
    summary = runner.load("raw_tables")
    dataset = open_dataset(summary.dataset_dir)
    data, col_stats = _cached_graph(runner.resources["storage"], summary, dataset, recipe)
    fresh = fresh_graph(dataset, summary, recipe, col_stats)
    graphs = {"test": data, "test_fresh": fresh}
    if a.rescale:
        word, factor = a.rescale.split(":")
        test_seconds = pd.Timestamp(dataset.manifest.test_timestamp).timestamp()
        shifted, changed = rescaled(fresh, test_seconds, float(factor), word)
        if changed:
            graphs["test_fresh_rescaled"] = shifted
            print(f"x{factor} from {dataset.manifest.test_timestamp}: " + "; ".join(changed))
    cols = ["val", *graphs]
    methods = a.methods.split(",")
    stored = runner.instance.get_materialized_partitions(runner.db.key("finetuned_models"))
    rows = []
    logging.disable(logging.WARNING)
    for task_name in a.tasks.split(","):
        for label_set in a.label_sets.split(","):
            _, task, tables = _task_of(
                task_name, summary, label_setting(label_set), with_test_labels=True
            )
            sign = 1.0 if evaluation.higher_is_better(task) else -1.0
            for method in methods:
                for seed in [int(s) for s in a.seeds.split(",")]:
                    cell = f"{task_name}|{method}|{label_set}|s{seed}"
                    if cell not in stored:
                        continue
                    result = runner.load("finetuned_models", cell)
                    row = {"task": task_name, "label_set": label_set, "method": method}
                    row["seed"] = seed
                    for col, graph in graphs.items():
                        val, test = scores(graph, col_stats, task, tables, result, recipe, seed)
                        row.setdefault("val", sign * val)
                        row[col] = sign * test
                    print(cell, "  ".join(f"{k} {row[k]:.4f}" for k in cols), flush=True)
                    rows.append(row)
    frame = pd.DataFrame(rows)
    print(f"\nmean over seeds (signed: + is better; NMAE negated) of {', '.join(cols)}")
    for key, g in frame.groupby(["task", "label_set", "method"], sort=False):
        print(f"  {' '.join(key):>40}: " + "  ".join(f"{g[c].mean():+.4f}" for c in cols))
    print(f"\npaired gain over {methods[0]} (+ is better, 95% t-interval, * excludes 0)")
    print("| task | labels | method | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---:|" * len(cols))
    for (task_name, label_set), g in frame.groupby(["task", "label_set"], sort=False):
        base = g[g["method"] == methods[0]].set_index("seed")
        for method in methods[1:]:
            m = g[g["method"] == method].set_index("seed")
            cells = [interval((m[c] - base[c]).dropna()) for c in cols]
            print(f"| {task_name} | {label_set} | {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
