"""Does averaging the last evaluated weights shrink the seed spread? (not a test)

Fine-tunes one rel-f1 task from scratch with the fine-tuning protocol
(``training.finetune``: the step floor, AdamW, evaluations every ``eval_every`` steps) for
several seeds, keeps the weights of every evaluation, and scores on val and test (test
only for this diagnosis; the protocol chooses on val):

- the protocol without averaging: test at the best-val evaluation;
- the mean of the last k evaluated weights (``finetune.average_last`` = k), alone;
- the protocol with averaging: the mean when its val beats every evaluation, else the best.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_protocol_spread.py \\
        --dataset /tmp/protocol-relf1 --task driver-top3 --seeds 0,1,2 [--lr 0.005] [--k 3,5]
(``--dataset``: a folder written by ``tve import rel-f1 RAW FOLDER``.)
"""

import argparse
import json
import time

import pandas as pd
import torch

from tve_pipeline import evaluation, training
from tve_pipeline.config import make_recipe
from tve_pipeline.database import column_types, open_dataset
from tve_pipeline.graph import graph_for


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--task", default="driver-top3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr", default="0.005", help="the rate grid, comma-separated")
    p.add_argument("--k", default="3,5", help="how many last evaluations to average")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ds = open_dataset(a.dataset)
    db = ds.get_db()
    types = column_types({n: t.df for n, t in db.table_dict.items()}, ds.manifest, ds.dataset_dir)
    grid = [float(x) for x in a.lr.split(",")]
    recipe = make_recipe(a.preset, {"finetune": {"lr_grid": grid, "average_last": 1}})
    data, col_stats = graph_for(db, types, recipe.backbone)
    task = ds.load_task(a.task)
    full = task.get_db(upto_test_timestamp=False)
    tabs = {s: task.get_table(s, db=full) for s in ("train", "val", "test")}
    tabs["test_labels"] = task.get_table("test", mask_input_cols=False, db=full)
    device = torch.device("cpu")
    sign = 1.0 if evaluation.higher_is_better(task) else -1.0

    snapshots: list[dict] = []
    fit = training._fit

    def keeping_every_evaluation(modules, *args, evaluate_epoch, **kwargs):
        def evaluate():
            out = evaluate_epoch()
            snapshots.append({k: v.detach().clone() for k, v in modules.state_dict().items()})
            return out

        return fit(modules, *args, evaluate_epoch=evaluate, **kwargs)

    training._fit = keeping_every_evaluation

    def score(state, seed, clamp):
        s = evaluation.evaluate(
            data, col_stats, task, tabs, state, recipe, device, seed=seed, output_range=clamp
        )
        return next(iter(s["val"].values())), next(iter(s["test"].values()))

    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        snapshots.clear()
        t0 = time.perf_counter()
        res = training.finetune(data, col_stats, task, tabs, recipe, device, seed=seed)
        seconds = time.perf_counter() - t0
        # the chosen rate's evaluations are the last ones kept
        own = snapshots[-len(res["history"]) :]
        best_val, best_test = score(res["state_dict"], seed, res["output_range"])
        row = {"seed": seed, "best_step": res["best_step"], "lr": res["lr"], "seconds": seconds}
        row.update(single_val=best_val, single_test=best_test)
        for k in [int(x) for x in a.k.split(",")]:
            val, test = score(training.average_states(own[-k:]), seed, res["output_range"])
            wins = sign * val > sign * best_val
            row.update({f"avg{k}_val": val, f"avg{k}_test": test})
            row[f"guarded{k}_test"] = test if wins else best_test
            row[f"guarded{k}_picks_avg"] = bool(wins)
        rows.append(row)
        print(json.dumps(row), flush=True)
    frame = pd.DataFrame(rows)
    print(f"\n{a.task}, scratch, 100% labels, {len(frame)} seeds, preset {a.preset}, lr {grid}")
    for col in [c for c in frame.columns if c.endswith("_test")]:
        print(f"{col:>16}: {100 * frame[col].mean():.2f} ± {100 * frame[col].std():.2f}")


if __name__ == "__main__":
    main()
