"""Pre-training on two processes (DistributedDataParallel, gloo, CPU) is pre-training on one.

Two ranks each take their half of every global batch (same seeds, same order: the global
batch split in two, 32 + 31 seeds of a 63-seed batch) and the per-step losses are compared
with one process on the whole batch. The comparison needs a seed's loss to depend on
nothing random, because each rank draws its own random numbers (tve_pipeline.distributed):
neighbours are sampled with ``last`` (the most recent, deterministic), corruption is off and
dropout is switched off in both runs. What is then left is float rounding: the loss is a
sum of two partial sums instead of one, each rank aggregates its own subgraphs (scatter
sums in another order) and DDP averages two partial gradients, which Adam carries into the
next steps' weights. Measured: 1.1e-7 relative at most (float32); the tolerance is 1e-4.

The second test launches the same training from the ``pretrained_checkpoint`` asset through
Dagster Pipes (``torchrun --nproc-per-node 2``), a real materialisation on a copy of the
session's tiny run folder.
"""

import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tve_pipeline import distributed, model, training
from tve_pipeline.config import make_recipe
from tve_pipeline.database import column_types, open_dataset
from tve_pipeline.datasets import build_synthetic
from tve_pipeline.graph import graph_for
from tve_pipeline.targets import TargetQuery, compute_targets
from tve_pipeline.traversal import build_traversal_graph
from tve_pipeline.windows import training_seed_times

RELATIVE_TOLERANCE = 1e-4
WORLD = 2


def _no_dropout(self, x):
    return x


def _pretrain_args(inputs: dict) -> tuple:
    return (
        inputs["data"],
        inputs["col_stats"],
        "customers",
        "customer_id",
        inputs["raw"],
        inputs["aggregations"],
        inputs["recipe"],
        torch.device("cpu"),
    )


def _rank_main(rank: int, size: int, rendezvous: str, inputs: dict, out_dir: str) -> None:
    """One training process: join the gloo group, pre-train on this rank's slices."""
    torch.set_num_threads(1)
    model.FastDropout.forward = _no_dropout
    world, _ = distributed.start("cpu", init_method=rendezvous, rank=rank, size=size)
    try:
        losses = []
        result = training.pretrain(
            *_pretrain_args(inputs),
            val_targets=inputs["val_raw"],
            world=world,
            step_losses=losses.extend,
        )
        torch.save({"losses": losses, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.stop()


def tiny_pretraining_inputs(folder: Path) -> dict:
    """The tiny database's graph and 1-hop task vectors of its customers, and a recipe under
    which a seed's loss depends on nothing random (but dropout: see the module docstring)."""
    ds = open_dataset(build_synthetic(folder / "tiny"))
    db = ds.get_db()
    tables = {n: t.df for n, t in db.table_dict.items()}
    types = column_types(tables, ds.manifest)
    defs = build_traversal_graph(ds.manifest.tables, types, "customers", hops=1)
    delta = pd.Timedelta("30 days")
    raw = compute_targets(
        TargetQuery(
            tables,
            ds.manifest.tables,
            defs,
            "customers",
            training_seed_times(ds.val_timestamp, db.min_timestamp, delta),
            delta,
        )
    )
    val_raw = compute_targets(  # the validation window: each epoch's loss is scored on it
        TargetQuery(
            tables, ds.manifest.tables, defs, "customers", [pd.Timestamp(ds.val_timestamp)], delta
        )
    )
    recipe = make_recipe(
        "test",
        {
            "backbone": {"sampling": "last"},
            # 63 seeds: the ranks get 32 and 31; 3 steps per epoch, 2 epochs, a validation loss
            "pretrain": {"corruption_rate": 0.0, "batch_size": 63, "epochs": 2},
        },
    )
    data, col_stats = graph_for(db, types, recipe.backbone)
    return {
        "data": data,
        "col_stats": col_stats,
        "raw": raw,
        "val_raw": val_raw,
        "aggregations": {d.name: d.aggregation for d in defs},
        "recipe": recipe,
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_pretraining_inputs(tmp_path_factory.mktemp("db"))


def _run_ranks(args: tuple, timeout: float = 180.0) -> None:
    """``_rank_main`` on WORLD forked processes (they inherit the imports and the inputs:
    seconds, where spawned ones take ~25 s each to import torch and relbench again)."""
    ctx = torch.multiprocessing.start_processes(
        _rank_main, args=args, nprocs=WORLD, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} training processes did not finish in {timeout:.0f} s")


def test_two_gloo_processes_match_one(inputs, tmp_path, monkeypatch):
    _run_ranks((WORLD, f"file://{tmp_path / 'rendezvous'}", inputs, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    monkeypatch.setattr(model.FastDropout, "forward", _no_dropout)
    single_losses = []
    single = training.pretrain(
        *_pretrain_args(inputs), val_targets=inputs["val_raw"], step_losses=single_losses.extend
    )

    recipe = inputs["recipe"].pretrain
    assert len(single_losses) == recipe.epochs * recipe.steps_per_epoch
    for rank in ranks:  # every rank records the global batch's loss
        assert rank["losses"] == pytest.approx(single_losses, rel=RELATIVE_TOLERANCE)
    ddp = ranks[0]["result"]
    assert ddp["n_train_seeds"] == single["n_train_seeds"]
    assert ddp["n_val_seeds"] == single["n_val_seeds"] > 0
    assert ddp["best_val_loss"] == pytest.approx(single["best_val_loss"], rel=RELATIVE_TOLERANCE)
    # the ranks hold one model, and it is the single process's model
    for key, value in single["backbone"].items():
        assert torch.equal(ranks[1]["result"]["backbone"][key], ddp["backbone"][key]), key
        assert torch.allclose(ddp["backbone"][key], value, rtol=1e-3, atol=1e-5), key


def test_pipes_launch_from_the_asset(pipeline_run, tmp_path, keep_tve_environment, monkeypatch):
    """processes=2: the asset runs torchrun through Pipes; rank 0 reports back."""
    from assets.commands import Runner

    source = Path(pipeline_run["run_dir"])
    run_dir = tmp_path / "run"
    # a copy of the run folder (its own Dagster instance, stored assets and targets); a new
    # MLflow store, since MLflow keeps the original folder's artifact location
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    monkeypatch.setenv("TVE_PROCESSES", str(WORLD))
    monkeypatch.setenv("TVE_DEVICE", "cpu")
    runner = Runner("tiny", run_dir)
    assert runner.resources["device"].processes == WORLD
    result = runner.materialize(["pretrained_checkpoint"], "tve", partition_key="tve")

    event = result.get_asset_materialization_events()[0].materialization
    meta = {k: v.value for k, v in event.metadata.items()}
    assert meta["processes"] == WORLD and meta["backend"] == "gloo"
    assert set(meta["seeds"]) == set(runner.load("traversal_graph"))
    logs = [
        e.message for e in runner.instance.all_logs(result.run_id) if "rank 0" in (e.message or "")
    ]
    assert logs, "rank 0's log lines come back through Pipes"
    checkpoint = runner.load("pretrained_checkpoint", "tve")
    assert checkpoint["processes"] == WORLD
    for entity, part in checkpoint["by_entity"].items():
        assert part["backbone"], entity
        assert len(part["history"]) == runner.recipe.pretrain.epochs
        # the worker was handed the validation window: every epoch scored on it
        assert part["n_val_seeds"] > 0 and all("val_loss" in r for r in part["history"])
    # nothing of the launch is left behind: no spec, no result file, no training checkpoint
    left = [p for p in (run_dir / "checkpoints").rglob("*") if p.is_file()]
    assert left == [], left
