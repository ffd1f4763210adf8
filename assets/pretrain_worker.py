"""One process of a multi-process pre-training run, started by ``torchrun`` through Pipes.

``pretrained_checkpoint`` launches ``torchrun --nproc-per-node N -m assets.pretrain_worker
SPEC.json`` with :class:`dagster.PipesSubprocessClient` when the device resource asks for
more than one process. Every rank reads the same spec (written by the asset: the dataset
folder, the recipe, the objective, each entity table's task-vector files and checkpoint
file), joins the process group torchrun describes (NCCL on CUDA, gloo on the CPU) and runs
:func:`tve_pipeline.training.pretrain` on its slice of every global batch
(:mod:`tve_pipeline.distributed`). Rank 0 alone talks to Dagster (``dagster_pipes``: its
log lines and the materialisation's metadata), writes the resumable training checkpoints
and, at the end, the result file the asset loads (atomically, like every checkpoint
write). The other ranks report nothing: Pipes has one message channel per launch.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from tve_pipeline import distributed, training
from tve_pipeline.common import atomic_path
from tve_pipeline.config import Recipe
from tve_pipeline.database import open_dataset
from tve_pipeline.graph import graph_for


class _Silent:
    """What a rank other than 0 reports through: nothing."""

    class log:  # noqa: N801 (mirrors PipesContext.log)
        @staticmethod
        def info(message: str) -> None:
            pass

    def report_asset_materialization(self, **kwargs) -> None:
        pass


@contextlib.contextmanager
def _reporter(world: distributed.World):
    """Rank 0's Pipes context (a silent stand-in elsewhere, or outside a Dagster launch)."""
    if world.is_main:
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

        if PipesEnvVarParamsLoader().is_dagster_pipes_process():
            with open_dagster_pipes() as pipes:
                yield pipes
            return
    yield _Silent()


def _graph(spec: dict, recipe: Recipe, world: distributed.World):
    """The database's graph; rank 0 builds (and caches) it first, the others then read it."""

    def build():
        db = open_dataset(spec["dataset_dir"]).get_db()
        return graph_for(db, spec["column_types"], recipe.backbone, spec["graph_cache"])

    graph = build() if world.is_main else None
    world.barrier()
    return graph if graph is not None else build()


def run(spec: dict, world: distributed.World, device: torch.device, report) -> dict:
    """Pre-train every entity table of the spec; returns what the asset stores."""
    recipe = Recipe.model_validate(spec["recipe"])
    data, col_stats = _graph(spec, recipe, world)
    by_entity, seconds = {}, {}
    for part in spec["entities"]:
        entity = part["entity"]
        report.log.info(
            f"rank 0 of {world.size}: pre-training {spec['objective']} on {entity}, "
            f"{len(part['files'])} training and {len(part.get('val_files', []))} validation "
            f"windows, {len(part['aggregations'])} targets, {device}"
        )
        t0 = time.perf_counter()

        def log(metrics: dict, epoch: int, entity=entity) -> None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
            report.log.info(f"rank 0: {entity} epoch {epoch}: {shown}")

        def snapshot(steps: int, part=part) -> training.Checkpointer:
            path = part["snapshot"].replace("STEPS", str(steps))
            return training.Checkpointer(path, 1, key=spec["checkpoint_key"])

        by_entity[entity] = training.pretrain_to_budget(
            data,
            col_stats,
            entity,
            part["entity_col"],
            [Path(f) for f in part["files"]],
            part["aggregations"],
            recipe,
            device,
            log=log,
            val_targets=[Path(f) for f in part.get("val_files", [])],
            objective=spec["objective"],
            checkpoint=training.Checkpointer(
                part["checkpoint"], recipe.checkpoint_every, key=spec["checkpoint_key"]
            ),
            world=world,
            budget=spec.get("budget"),
            snapshot=snapshot if "snapshot" in part else None,
        )
        seconds[entity] = round(time.perf_counter() - t0, 2)
    return {"by_entity": by_entity, "seconds": seconds}


def _metadata(result: dict, world: distributed.World, device: torch.device) -> dict:
    """What rank 0 reports for the materialisation (the in-process path's keys, and more)."""
    by_entity = result["by_entity"]

    def per_entity(values: dict) -> dict:
        return {"raw_value": values, "type": "json"}

    return {
        "processes": world.size,
        "backend": distributed.backend_for(device),
        "device": str(device),
        "seeds": per_entity(
            {e: r["n_train_seeds"] + r["n_val_seeds"] for e, r in by_entity.items()}
        ),
        "best_epoch": per_entity({e: r["best_epoch"] for e, r in by_entity.items()}),
        "best_val_loss": per_entity({e: r["best_val_loss"] for e, r in by_entity.items()}),
        "seconds": per_entity(result["seconds"]),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("threads", 0) > 0:
        torch.set_num_threads(spec["threads"])
    world, device = distributed.start(spec["device"])
    try:
        with _reporter(world) as report:
            result = run(spec, world, device, report)
            if world.is_main:
                with atomic_path(spec["out"]) as tmp:
                    torch.save(result, tmp)
                report.report_asset_materialization(metadata=_metadata(result, world, device))
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
