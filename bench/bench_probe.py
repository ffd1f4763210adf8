"""Cost of the linear probe against a fine-tuning cell, measured in one run (not a test).

    cd /work/wt-X && PYTHONPATH=$PWD .venv/bin/python bench/bench_probe.py \
        [--db tiny|flights] [--dataset-dir DIR] [--tasks plane-active,plane-delay] [--threads 1]
        [--max-train-seeds N]

``tiny``: the test suite's synthetic database, recipe profile ``test``; ``flights``:
rel-flights (``build_flights``, the demo's database; ``--dataset-dir`` reuses a built one),
profile ``demo``. Per task, seed 0, 100% labels: a scratch probe (random encoder), a probe
on another random backbone (as a pre-trained one is loaded), and the baseline: one
fine-tuning cell of the profile (``training.finetune``) plus its evaluation on val and
test (``evaluation.evaluate``), which is what ``finetuned_models`` + ``metrics`` run.
Prints seconds, the probe's share of them (embedding vs fitting) and both readouts'
test scores. The graph is built (or read from the cache) before any timing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tve_pipeline import evaluation, training
from tve_pipeline.config import make_recipe
from tve_pipeline.database import open_dataset
from tve_pipeline.graph import graph_for
from tve_pipeline.model import RDLModel, backbone_state
from tve_pipeline.probe import linear_probe
from tve_pipeline.summary import summarise_database


def _tables(ds, name):
    task = ds.load_task(name)
    db = task.get_db(upto_test_timestamp=False)
    tables = {split: task.get_table(split, db=db) for split in ("train", "val", "test")}
    tables["test_labels"] = task.get_table("test", mask_input_cols=False, db=db)
    return task, tables


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", choices=("tiny", "flights"), default="tiny")
    ap.add_argument("--dataset-dir")
    ap.add_argument("--tasks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-train-seeds", type=int, help="the probe's cap on training seeds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    if args.dataset_dir:
        dataset_dir = Path(args.dataset_dir)
    elif args.db == "tiny":
        from tve_pipeline.datasets import build_synthetic

        dataset_dir = build_synthetic(work / "tiny")
    else:
        from tve_pipeline.datasets import build_flights

        dataset_dir = build_flights(work / "rel-flights")
    cap = {"probe": {"max_train_seeds": args.max_train_seeds}} if args.max_train_seeds else {}
    recipe = make_recipe("test" if args.db == "tiny" else "demo", cap)
    ds = open_dataset(dataset_dir)
    summary = summarise_database(dataset_dir)
    t0 = time.perf_counter()
    data, col_stats = graph_for(
        ds.get_db(), summary.column_types, recipe.backbone, Path(dataset_dir) / ".graph-cache"
    )
    print(f"graph {time.perf_counter() - t0:.1f}s; profile {recipe.profile}, {args.threads} thread")
    torch.manual_seed(123)
    other = backbone_state(RDLModel(data, col_stats, recipe.backbone, out_channels=1))
    cpu = torch.device("cpu")
    names = args.tasks.split(",") if args.tasks else list(ds.get_task_names())
    for name in names:
        task, tables = _tables(ds, name)
        sizes = "/".join(str(len(tables[s].df)) for s in ("train", "val", "test"))
        for label, backbone in (("probe scratch", None), ("probe backbone", other)):
            t = time.perf_counter()
            r = linear_probe(data, col_stats, task, tables, recipe, cpu, backbone=backbone)
            wall = time.perf_counter() - t
            print(
                f"{name} ({sizes} seeds) {label}: {wall:.1f}s (embed {r['embed_seconds']:.1f}s, "
                f"fit {r['seconds'] - r['embed_seconds']:.1f}s over {len(r['grid'])} "
                f"{r['regularisation']}); chosen {r['regularisation']}={r['strength']:g}; "
                f"val {r['metric']} {r['val_metrics'][r['metric']]:.4f}, "
                f"test {r['test_metrics'][r['metric']]:.4f}"
            )
        t = time.perf_counter()
        tuned = training.finetune(data, col_stats, task, tables, recipe, cpu, seed=0)
        t_tune = time.perf_counter() - t
        scores = evaluation.evaluate(
            data,
            col_stats,
            task,
            tables,
            tuned["state_dict"],
            recipe,
            cpu,
            output_range=tuned["output_range"],
        )
        wall = time.perf_counter() - t
        metric = next(iter(scores["val"]))
        print(
            f"{name} fine-tune cell (baseline): {wall:.1f}s (fine-tuning {t_tune:.1f}s, "
            f"evaluation {wall - t_tune:.1f}s); val {metric} {scores['val'][metric]:.4f}, "
            f"test {scores['test'][metric]:.4f}"
        )


if __name__ == "__main__":
    main()
