"""Training throughput with and without sampling one step ahead (not a test).

    cd /work/main && .venv/bin/python bench/bench_prefetch.py [--steps 12] [--rounds 3] \
        [--threads 1]

What ``training.finetune`` runs for its steps (``training._fit``: ``TemporalNeighborSampler``
+ ``RDLModel``, Adam, BCE) on rel-f1 driver-dnf (rel-flights plane-active when the rel-f1
raw files are absent), reference settings (channels 128, fan-out [128, 64], batch 512).
Each round times ``--steps`` optimiser steps twice, in alternating order: ``plain``
(sample, then compute: the baseline of the ratio) and ``prefetch`` (the next batch is
sampled on a worker thread while this one computes; the default in training.py). Both
draw the same batches and end with the same weights (checked). Prints per-round seeds/s,
the medians and their ratio. ``--threads`` sets torch's intra-op threads for compute (the
prefetch worker shares the pool).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_training import build_database  # noqa: E402
from tve_pipeline import training  # noqa: E402
from tve_pipeline.config import make_recipe  # noqa: E402
from tve_pipeline.database import column_types  # noqa: E402
from tve_pipeline.graph import graph_for, seed_tensors  # noqa: E402
from tve_pipeline.model import RDLModel  # noqa: E402
from tve_pipeline.sampling import TemporalNeighborSampler  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="auto", choices=["auto", "rel-f1", "rel-flights"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_prefetch_") as tmp:
        ds, task_name = build_database(args.db, Path(tmp))
        db = ds.get_db()
        types = column_types({n: tb.df for n, tb in db.table_dict.items()}, ds.manifest)
        recipe = make_recipe("reference")
        data, col_stats = graph_for(db, types, recipe.backbone)
        task = ds.load_task(task_name)
        train = task.get_table("train").df
        nodes, times = seed_tensors(train[task.entity_col], train[task.time_col])
        y = torch.from_numpy(train[task.target_col].to_numpy(dtype=np.float32))
        sampler = TemporalNeighborSampler(
            data, list(recipe.backbone.num_neighbors), strategy=recipe.backbone.sampling
        )
        B = recipe.finetune.batch_size
        print(
            f"{task_name}: {len(train):,} training seeds, batch {B}, "
            f"{args.steps} steps per timing, {args.threads} compute thread(s)",
            flush=True,
        )

        def one_run(prefetch: bool):
            torch.manual_seed(0)
            model = RDLModel(data, col_stats, recipe.backbone, out_channels=1)
            opt = torch.optim.Adam(model.parameters(), lr=max(recipe.finetune.lr_grid))

            def sample(idx, gen):
                return sampler.sample(task.entity_table, nodes[idx], times[idx], generator=gen)

            def batch_loss(batch, idx, gen):
                return F.binary_cross_entropy_with_logits(
                    model(batch, task.entity_table).view(-1), y[idx]
                )

            t0 = time.perf_counter()
            training._fit(
                model,
                opt,
                None,
                n=len(nodes),
                batch_size=B,
                steps_per_epoch=args.steps,
                epochs=1,
                seed=0,
                sample=sample,
                batch_loss=batch_loss,
                evaluate_epoch=lambda: ({}, 0.0),
                prefetch=prefetch,
            )
            return args.steps * B / (time.perf_counter() - t0), model.state_dict()

        one_run(True)  # warm-up (allocator, lazy init)
        rates = {"plain": [], "prefetch": []}
        states = {}
        for r in range(args.rounds):
            for mode in ["plain", "prefetch"] if r % 2 == 0 else ["prefetch", "plain"]:
                rate, states[mode] = one_run(mode == "prefetch")
                rates[mode].append(rate)
                print(f"round {r} {mode:9s} {rate:7.1f} seeds/s", flush=True)
        same = all(torch.equal(states["plain"][k], states["prefetch"][k]) for k in states["plain"])
        med = {m: statistics.median(v) for m, v in rates.items()}
        print(
            f"median: plain {med['plain']:.1f} seeds/s, prefetch {med['prefetch']:.1f} seeds/s, "
            f"ratio {med['prefetch'] / med['plain']:.2f}x; identical weights: {same}"
        )


if __name__ == "__main__":
    main()
