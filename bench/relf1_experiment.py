"""rel-f1 experiment: our backbone from scratch (and after TVE pre-training) vs RelBench's RDL.

Not a test. Builds rel-f1 from ../shared/data/rel-f1/raw, computes task vectors for every
training seed time in one set-based DuckDB query, pre-trains (unless --no-pretrain),
fine-tunes each task for each seed and prints RelBench's test metrics (AUROC for
driver-dnf / driver-top3, MAE and NMAE for driver-position) as mean ± std.

    .venv/bin/python bench/relf1_experiment.py --tasks driver-dnf --seeds 0 [--epochs 10] \
        [--no-pretrain] [--threads 1] [--label-fractions 0.1,0.25,1] [--methods scratch,tve] \
        [--text glove|hashing]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch_frame

from tve_pipeline import evaluation, training
from tve_pipeline.config import make_recipe
from tve_pipeline.database import column_types, open_dataset, task_timedelta
from tve_pipeline.datasets import build_rel_f1
from tve_pipeline.graph import graph_for
from tve_pipeline.targets import TargetQuery, compute_targets
from tve_pipeline.traversal import build_traversal_graph
from tve_pipeline.windows import training_seed_times

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "rel-f1" / "raw"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="driver-dnf,driver-top3,driver-position")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument(
        "--epochs", type=int, default=None, help="fine-tuning epochs (default: the recipe's, 20)"
    )
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--pretrain-steps", type=int, default=50)
    p.add_argument("--no-pretrain", action="store_true")
    p.add_argument("--methods", default="scratch,tve", help="which of scratch,tve to fine-tune")
    p.add_argument(
        "--label-fractions",
        default="1",
        help="fractions of the training table, e.g. 0.05,0.1,1 "
        "(drawn with the seed: the same rows for every method)",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument(
        "--text",
        choices=["glove", "hashing"],
        default=None,
        help="text embedder (default: the recipe's, glove)",
    )
    p.add_argument(
        "--nan-columns",
        choices=["mask", "dead"],
        default="mask",
        help="ablation: 'dead' blanks every numerical column that has a missing cell, which is "
        "what torch_frame's stock LinearEncoder ends up doing in RelBench's RDL (its NaN "
        "gradient turns the column's weights into NaN after one Adam step)",
    )
    p.add_argument(
        "--relbench-modules",
        action="store_true",
        help="ablation: run relbench's modules as they are (RDLModel(fast=False): every sampled "
        "row encoded with its own dropout mask, the full GNN), about 5x slower",
    )
    a = p.parse_args()
    if a.relbench_modules:
        import functools

        plain = functools.partial(training.RDLModel, fast=False)
        training.RDLModel = evaluation.RDLModel = plain  # every model the run builds
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    ds = open_dataset(build_rel_f1(RAW, tmp / "rel-f1"))
    db = ds.get_db()
    tables = {n: t.df for n, t in db.table_dict.items()}
    types = column_types(tables, ds.manifest, ds.dataset_dir)
    recipe = make_recipe(
        "reference",
        {
            "finetune": {"epochs": a.epochs} if a.epochs else {},
            "pretrain": {
                "epochs": a.pretrain_epochs,
                "steps_per_epoch": a.pretrain_steps,
                "lr_step_epochs": max(a.pretrain_epochs // 2, 1),
            },
            "backbone": {"text_embedder": a.text} if a.text else {},
        },
    )
    data, col_stats = graph_for(db, types, recipe.backbone)
    if a.nan_columns == "dead":
        for nt in data.node_types:
            feat = data[nt].tf.feat_dict.get(torch_frame.numerical)
            if feat is None:
                continue
            gone = torch.isnan(feat).any(0)
            feat[:, gone] = float("nan")
            names = data[nt].tf.col_names_dict[torch_frame.numerical]
            print(
                f"dead numerical columns in {nt}: {[n for n, g in zip(names, gone.tolist()) if g]}",
                flush=True,
            )
    device = torch.device("cpu")
    backbone = None
    if not a.no_pretrain:
        delta = task_timedelta(ds)
        defs = build_traversal_graph(
            ds.manifest.tables, types, "drivers", hops=2, fact_key_fact=False
        )
        t0 = time.perf_counter()
        raw = compute_targets(
            TargetQuery(
                tables,
                ds.manifest.tables,
                defs,
                "drivers",
                training_seed_times(ds.val_timestamp, db.min_timestamp, delta),
                delta,
            )
        )
        val_raw = compute_targets(  # the validation window: the checkpoint is chosen on it
            TargetQuery(
                tables, ds.manifest.tables, defs, "drivers", [pd.Timestamp(ds.val_timestamp)], delta
            )
        )
        print(
            f"targets: {len(raw)} rows x {len(defs)} targets in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        t0 = time.perf_counter()
        pre = training.pretrain(
            data,
            col_stats,
            "drivers",
            "driverId",
            raw,
            {d.name: d.aggregation for d in defs},
            recipe,
            device,
            val_targets=val_raw,
            objective="tve",
        )
        backbone = pre["backbone"]
        print(
            f"pre-training: {time.perf_counter() - t0:.0f}s, best epoch {pre['best_epoch']}",
            flush=True,
        )
    rows = []
    for name in a.tasks.split(","):
        task = ds.load_task(name)
        full = task.get_db(upto_test_timestamp=False)
        tabs = {s: task.get_table(s, db=full) for s in ("train", "val", "test")}
        test_labels = task.get_table("test", mask_input_cols=False, db=full)
        tabs["test_labels"] = test_labels
        methods = [("scratch", None)] + ([("tve", backbone)] if backbone is not None else [])
        for method, bb in [m for m in methods if m[0] in a.methods.split(",")]:
            for fraction, seed in [
                (float(f), int(s)) for f in a.label_fractions.split(",") for s in a.seeds.split(",")
            ]:
                t0 = time.perf_counter()
                res = training.finetune(
                    data,
                    col_stats,
                    task,
                    tabs,
                    recipe,
                    device,
                    seed=seed,
                    backbone=bb,
                    label_fraction=fraction,
                )
                scores = evaluation.evaluate(
                    data,
                    col_stats,
                    task,
                    tabs,
                    res["state_dict"],
                    recipe,
                    device,
                    seed=seed,
                    output_range=res["output_range"],
                )
                row = {
                    "task": name,
                    "method": method,
                    "fraction": fraction,
                    "n_train": res["n_train"],
                    "seed": seed,
                    "seconds": round(time.perf_counter() - t0),
                    "best_epoch": res["best_epoch"],
                    **{f"test_{k}": v for k, v in scores["test"].items()},
                    **{f"val_{k}": v for k, v in scores["val"].items()},
                }
                if "test_nmae" in row:
                    row["test_mae"] = row["test_nmae"] * task.nmae_std
                rows.append(row)
                print(json.dumps(row), flush=True)
    frame = pd.DataFrame(rows)
    cols = [c for c in frame.columns if c.startswith("test_")]
    print(frame.groupby(["task", "fraction", "method"])[cols].agg(["mean", "std"]).to_string())
    if a.out:
        frame.to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
