"""Training throughput on the CPU and on CUDA, the same step (not a test).

    cd /work/main && .venv/bin/python bench/bench_gpu.py [--steps 10] [--rounds 2] \
        [--threads 1] [--db auto|rel-f1|rel-flights] [--profile reference]

The training step ``training.finetune`` runs (``training._fit``: ``TemporalNeighborSampler``
on the host, the next batch sampled on a worker thread, ``RDLModel``, Adam, BCE) on rel-f1
driver-dnf (rel-flights plane-active when the rel-f1 raw files are absent), the recipe
profile's settings (reference: channels 128, fan-out [128, 64], batch 512). Each round
times ``--steps`` optimiser steps on the CPU (the baseline of the ratio) and then on CUDA
(batches and tensor frames moved per step, as the assets do; CUDA synchronised before the
clock stops). Prints per-round seeds/s, the medians and the ratio CUDA / CPU. Without a
CUDA device the CUDA part is skipped with a message and only the CPU figure is printed.
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
from tve_pipeline.graph import graph_for, seed_tensors, to_device  # noqa: E402
from tve_pipeline.model import RDLModel  # noqa: E402
from tve_pipeline.sampling import sampler_for  # noqa: E402


def seeds_per_second(setup: dict, device: torch.device, steps: int) -> float:
    """``steps`` optimiser steps of the fine-tuning loop on ``device``; seeds per second."""
    data, col_stats, recipe = setup["data"], setup["col_stats"], setup["recipe"]
    task, nodes, times, sampler = setup["task"], setup["nodes"], setup["times"], setup["sampler"]
    torch.manual_seed(0)
    model = RDLModel(data, col_stats, recipe.backbone, out_channels=1).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=max(recipe.finetune.lr_grid))
    y_dev = setup["y"].to(device)

    def sample(idx, gen):
        return sampler.sample(task.entity_table, nodes[idx], times[idx], generator=gen)

    def batch_loss(batch, idx, gen):
        pred = model(to_device(batch, device), task.entity_table).view(-1)
        return F.binary_cross_entropy_with_logits(pred, y_dev[idx.to(device)])

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    training._fit(
        model,
        opt,
        None,
        n=len(nodes),
        batch_size=recipe.finetune.batch_size,
        steps_per_epoch=steps,
        epochs=1,
        seed=0,
        sample=sample,
        batch_loss=batch_loss,
        evaluate_epoch=lambda: ({}, 0.0),
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * recipe.finetune.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="auto", choices=["auto", "rel-f1", "rel-flights"])
    ap.add_argument("--profile", default="reference")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        ds, task_name = build_database(args.db, Path(tmp))
        db = ds.get_db()
        types = column_types({n: tb.df for n, tb in db.table_dict.items()}, ds.manifest)
        recipe = make_recipe(args.profile)
        data, col_stats = graph_for(db, types, recipe.backbone)
        task = ds.load_task(task_name)
        train = task.get_table("train").df
        nodes, times = seed_tensors(train[task.entity_col], train[task.time_col])
        setup = {
            "data": data,
            "col_stats": col_stats,
            "recipe": recipe,
            "task": task,
            "nodes": nodes,
            "times": times,
            "y": torch.from_numpy(train[task.target_col].to_numpy(dtype=np.float32)),
            "sampler": sampler_for(data, recipe.backbone),
        }
        gpu = torch.cuda.get_device_name(0) if cuda else None
        print(
            f"{task_name}: {len(train):,} training seeds, profile {args.profile}, batch "
            f"{recipe.finetune.batch_size}, {args.steps} steps per timing, {args.threads} CPU "
            f"thread(s); CUDA: {gpu or 'none'}",
            flush=True,
        )
        devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if cuda else [])
        for device in devices:  # warm-up: allocator, lazy init, CUDA context and kernels
            seeds_per_second(setup, device, 2)
        rates = {d.type: [] for d in devices}
        for r in range(args.rounds):
            for device in devices:
                rate = seeds_per_second(setup, device, args.steps)
                rates[device.type].append(rate)
                print(f"round {r} {device.type:4s} {rate:8.1f} seeds/s", flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        line = f"median: cpu {med['cpu']:.1f} seeds/s"
        if cuda:
            line += (
                f", cuda {med['cuda']:.1f} seeds/s, ratio cuda/cpu {med['cuda'] / med['cpu']:.2f}x"
            )
        else:
            line += "; CUDA part skipped: no CUDA device on this machine (no ratio)"
        print(line)


if __name__ == "__main__":
    main()
