"""Learning assets of one database: pre-trained checkpoints, fine-tuned cells, metrics,
linear probes, results.

An experiment is a grid of independent partitions: ``pretrained_checkpoint`` has one per
pre-training objective (it reads every window of ``tve_targets`` as a Dagster input);
``finetuned_models``, ``metrics`` and ``probe_metrics`` (a linear probe on the frozen
encoder: the cheap readout) one per cell (task x method x label setting x seed; a label
setting is a label fraction or the restricted task ``top<k>``), each
cell mapped to its objective's checkpoint; ``results`` summarises whatever cells exist,
both readouts. A cell fails alone, re-runs alone, and a backfill of the grid runs only what
is missing. Each asset's code version hashes the recipe sections that decide its result,
so a changed recipe shows exactly those assets as stale.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from dagster._core.errors import DagsterPipesExecutionError

from assets.executors import GPU_STEP_TAGS
from assets.failures import failure
from assets.metadata import image, mlflow_metadata, png_markdown, table
from assets.partitions import (
    FINETUNE,
    PROBE,
    SCRATCH,
    cell_partitions,
    checkpoint_of_cells,
    experiment_cells,
    objective_partitions,
    parse_cell,
)
from assets.registry import Database
from resources import DeviceResource, MLflowTracking, RecipeResource, TVEStorage
from resources.mlflow_tracking import run_name, summary_metrics
from tve_pipeline import baselines, evaluation, probe, training
from tve_pipeline.common import atomic_path, exclusive
from tve_pipeline.config import budget_key, parse_budget_key, recipe_version
from tve_pipeline.database import open_dataset
from tve_pipeline.graph import graph_for
from tve_pipeline.learning_curves import plot_learning_curves
from tve_pipeline.results import markdown_table, plot_budget_benefit, plot_tasks, summarise
from tve_pipeline.tasks import label_set_name, restrict_task_tables, restricted_k

# Bumped when the summary, the table or the plots change.
RESULTS_VERSION = "2"


def _cached_graph(storage: TVEStorage, summary, dataset, recipe):
    """RelBench's tensor-frame graph of the database and its column stats, via the graph cache."""
    db = dataset.get_db()
    return graph_for(
        db,
        summary.column_types,
        recipe.backbone,
        storage.graph_cache(summary.name, summary.fingerprint),
    )


def _target_files(
    tve_targets: dict, temporal_windows: pd.DataFrame, entity: str, database: str
) -> tuple[list, list]:
    """The task-vector files of one entity table, one per window of the schedule: the
    training windows' (pre-training's seeds) and the validation windows' (its checkpoint's
    choice)."""
    scheduled = temporal_windows.dropna(subset=["window"])
    windows, splits = list(scheduled["window"]), list(scheduled["split"])
    files = [tve_targets.get(w, Path("/nonexistent")) / f"{entity}.parquet" for w in windows]
    missing = [w for w, f in zip(windows, files) if not f.exists()]
    if missing:
        raise failure(
            f"tve_targets of {database!r} missing for {len(missing)} of {len(windows)} windows "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): "
            f"run `tve run {database}` "
            "or backfill its tve_targets in the UI"
        )
    train = [f for f, s in zip(files, splits) if s == "train"]
    if not train:
        raise failure(
            f"database {database!r} has no training seed time, so no task vectors to pre-train on"
        )
    return train, [f for f, s in zip(files, splits) if s == "val"]


def _pretrain_one(
    context,
    recipe,
    graph,
    entity: str,
    entity_col: str,
    defs,
    files,
    objective: str,
    run,
    checkpoint: "training.Checkpointer",
    device,
    budget: int | None = None,
    snapshot=None,
) -> dict:
    """One objective on one entity table, streamed from the task-vector files of its windows
    (active rows only, float32: a few hundred MB where the dense frame took 20 GB);
    ``files``: (training windows' files, validation windows' files)."""
    train_files, val_files = files
    context.log.info(
        f"pre-training {objective} on {entity}: {len(train_files)} training and "
        f"{len(val_files)} validation windows, {len(defs)} targets"
    )
    started = time.perf_counter()

    def log(metrics: dict, epoch: int) -> None:
        """Each evaluation to MLflow and to the run's log (the UI's progress line)."""
        run.log_metrics({f"{entity}.{k}": v for k, v in metrics.items()}, epoch)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
        steps = (epoch + 1) * recipe.pretrain.steps_per_epoch
        context.log.info(
            f"{objective} {entity}: step {steps}, {shown} "
            f"({time.perf_counter() - started:.0f} s in this run)"
        )

    if not val_files:  # a schedule whose validation window would pass the test timestamp
        context.log.warning(f"{entity}: no validation window, so the last epoch is kept")
    data, col_stats = graph
    try:
        return training.pretrain_to_budget(
            data,
            col_stats,
            entity,
            entity_col,
            train_files,
            {d["name"]: d["aggregation"] for d in defs},
            recipe,
            device.torch_device(),
            val_targets=val_files,
            objective=objective,
            checkpoint=checkpoint,
            budget=budget,
            snapshot=snapshot,
            log=log,
        )
    except ValueError as exc:
        raise failure(exc) from exc


PRETRAIN_SECTIONS = ("seed", "backbone", "targets", "pretrain")


def _run_files(storage, database: str, objective: str, entity: str, run_key: str, every: int):
    """(the run's resumable state, ``steps -> its result at that budget``) of one objective
    and entity table: ``checkpoints/pretrained_checkpoint/<db>/<objective>-<entity>.pt`` and
    ``.../<objective>@<steps>-<entity>.pt``."""

    def file(name: str) -> Path:
        return storage.checkpoint_file("pretrained_checkpoint", database, name)

    def snapshot(steps: int) -> "training.Checkpointer":
        return training.Checkpointer(file(f"{budget_key(objective, steps)}-{entity}"), 1, run_key)

    return training.Checkpointer(file(f"{objective}-{entity}"), every, run_key), snapshot


def _pretrain_params(objective: str, recipe, budget: int | None = None) -> dict:
    """What a pre-training run logs to MLflow as its parameters."""
    return {
        "objective": objective,
        "budget": budget if budget is not None else recipe.pretrain.step_budgets[-1],
        "profile": recipe.profile,
        **{f"pretrain.{k}": v for k, v in recipe.pretrain.model_dump().items()},
        **{f"backbone.{k}": v for k, v in recipe.backbone.model_dump().items()},
    }


def _pretrain_with_torchrun(
    context, checkpoint: dict, raw_tables, traversal_graph, files, storage, device, mlflow
) -> dg.Output:
    """``pretrained_checkpoint`` on ``device.processes`` processes: ``torchrun`` launched
    through Dagster Pipes (``assets.pretrain_worker``; rank 0 streams its log lines and the
    metadata back), one model trained with DistributedDataParallel. The checkpoint and its
    metadata are those of the in-process path, plus ``processes``, ``backend``, ``seconds``."""
    import torch

    from tve_pipeline.config import Recipe

    recipe = Recipe.model_validate(checkpoint["recipe"])
    objective, database = checkpoint["objective"], raw_tables.name
    processes, kind = device.processes, device.launch_device()

    def checkpoint_file(name: str) -> Path:
        return storage.checkpoint_file("pretrained_checkpoint", database, name)

    tables = open_dataset(raw_tables.dataset_dir).manifest.tables
    home = checkpoint_file("_").parent
    home.mkdir(parents=True, exist_ok=True)
    budget = checkpoint["budget"]
    with (
        tempfile.TemporaryDirectory(prefix=".torchrun-", dir=home) as launch,
        mlflow.run(context, run_name(checkpoint["key"], "pretrain"), database=database) as run,
    ):
        spec = {
            "dataset_dir": str(raw_tables.dataset_dir),
            "column_types": raw_tables.column_types,
            "graph_cache": str(storage.graph_cache(database, raw_tables.fingerprint)),
            "recipe": checkpoint["recipe"],
            "objective": objective,
            "device": kind,
            "threads": device.threads,
            # a checkpoint of another number of processes holds other generators' states
            "checkpoint_key": f"{raw_tables.fingerprint}:"
            f"{recipe_version(recipe, *PRETRAIN_SECTIONS)}:processes={processes}",
            "budget": budget,
            "entities": [
                {
                    "entity": entity,
                    "entity_col": tables[entity].pkey,
                    "aggregations": {d["name"]: d["aggregation"] for d in defs},
                    "files": [str(f) for f in files[entity][0]],
                    "val_files": [str(f) for f in files[entity][1]],
                    "checkpoint": str(checkpoint_file(f"{objective}-{entity}")),
                    # the run's result at each budget: "{steps}" is the budget
                    "snapshot": str(checkpoint_file(f"{objective}@STEPS-{entity}")),
                }
                for entity, defs in traversal_graph.items()
            ],
            "out": str(Path(launch) / "result.pt"),
        }
        spec_file = Path(launch) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        run.log_params({**_pretrain_params(objective, recipe, budget), "processes": processes})
        context.log.info(f"pre-training {objective} on {processes} {kind} processes (torchrun)")
        # the worker imports this project's code, wherever the parent found it
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={processes}", "-m", "assets.pretrain_worker", str(spec_file)]
        lock = storage.lock_file(database, f"{objective}-ranks")
        try:
            with exclusive(lock):  # one process group at a time on an objective's run
                invocation = dg.PipesSubprocessClient(env={"PYTHONPATH": path}).run(
                    context=context, command=command
                )
        except DagsterPipesExecutionError as exc:
            raise failure(
                f"pre-training {objective} on {processes} processes failed: {exc} "
                "(the ranks' tracebacks are in the run's stderr)"
            ) from exc
        reported = invocation.get_materialize_result().metadata or {}
        result = torch.load(spec["out"], map_location="cpu", weights_only=False)
        checkpoint["by_entity"] = result["by_entity"]
        checkpoint["processes"] = processes
        for entity, part in checkpoint["by_entity"].items():
            for row in part["history"]:
                metrics = {f"{entity}.{k}": v for k, v in row.items() if k != "epoch"}
                run.log_metrics(metrics, row["epoch"])
        run.log_torch({e: v["backbone"] for e, v in checkpoint["by_entity"].items()}, "backbone.pt")
    return dg.Output(
        checkpoint,
        metadata={
            "num_windows": sum(map(len, next(iter(files.values())))),
            **checkpoint_metadata(
                checkpoint["key"], checkpoint["by_entity"], traversal_graph, recipe.pretrain
            ),
            **reported,
            **mlflow_metadata(run),
        },
    )


def _task_of(name: str, raw_tables, label_set=1.0, *, with_test_labels: bool = False):
    """The task and its tables; for a restricted label setting (``top<k>``) every table
    restricted to the k most active entities per seed time (tve_pipeline.tasks), as the
    reference's top-spending tasks are whole tasks of their own.

    The test table is RelBench's masked one (entity + seed time); ``with_test_labels``
    adds the labelled test table under ``"test_labels"``, for the evaluator only. Ranking
    costs two DuckDB counts over the first-hop rows, about a second for rel-flights'
    plane-active (README), against 7-23 s for a probe: nothing is cached.
    """
    if name not in raw_tables.task_names:
        raise failure(
            f"database {raw_tables.name!r} has no task {name!r}; "
            f"its tasks: {', '.join(raw_tables.task_names) or '(none)'}"
        )
    dataset = open_dataset(raw_tables.dataset_dir)
    task = dataset.load_task(name)
    db = task.get_db(upto_test_timestamp=False)
    tables = {split: task.get_table(split, db=db) for split in ("train", "val", "test")}
    if with_test_labels:
        tables["test_labels"] = task.get_table("test", mask_input_cols=False, db=db)
    k = restricted_k(label_set)
    if k is not None:
        frames = {n: t.df for n, t in db.table_dict.items()}
        try:
            restrict_task_tables(tables, frames, dataset.manifest.tables, task, k)
        except ValueError as exc:  # e.g. one class left in val: one line, no retry
            raise failure(exc) from exc
    return dataset, task, tables


def _label_fraction(label_set) -> float:
    """The fraction of the task's training table a cell trains on: all of a restricted
    task's."""
    return 1.0 if restricted_k(label_set) is not None else float(label_set)


def _cell_params(task_name: str, method: str, label_set, seed: int, readout: str, recipe) -> dict:
    """A cell's identity as MLflow parameters (the parts of its partition key, and what they
    imply: the objective, its pre-training budget, the readout), for compare and group-by."""
    objective, budget = parse_budget_key(method)
    if budget is None and method != SCRATCH:  # a checkpoint without budgets: the run's end
        budget = recipe.pretrain.step_budgets[-1]
    return {
        "task": task_name,
        "method": method,
        "objective": objective,
        **({} if budget is None else {"budget": budget}),
        "seed": seed,
        "label_fraction": _label_fraction(label_set),
        "label_set": label_set_name(label_set),
        "restricted_k": restricted_k(label_set) or 0,
        "readout": readout,
    }


def _cell_run_name(task_name: str, method: str, label_set, seed: int, stage: str = "") -> str:
    """``plane-delay · tve@4000 · 0.1 · s3`` (a cell's ``metrics``), with the stage after
    it for its other runs (``· fine-tune``, ``· probe``)."""
    return run_name(task_name, method, label_set_name(label_set), f"s{seed}", stage)


def _finetune_log(context, run):
    """Each fine-tuning evaluation to MLflow, the per-step curves under ``curve/`` (a chart
    section of their own; the run's own ``val_<metric>`` is the kept evaluation's:
    :func:`_kept_metrics`), and to the run's log, a line per evaluation (the UI's progress)."""
    started = time.perf_counter()

    def log(metrics: dict, step: int) -> None:
        run.log_metrics({f"curve/{k}": v for k, v in metrics.items()}, step)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
        context.log.info(
            f"fine-tuning step {step}: {shown} ({time.perf_counter() - started:.0f} s)"
        )

    return log


def _kept_metrics(result: dict) -> dict:
    """A fine-tuning's kept evaluation (the best on val over steps and rates, the one the
    cell's model is) as the run's final metrics: ``val_<metric>`` as ``finetuned_models``'s
    ``val_metrics``, its step and evaluation, the chosen rate, how many weights it averaged."""
    return {
        **{f"val_{k}": float(v) for k, v in result["val_metrics"].items()},
        "best_step": result["best_step"],
        "best_epoch": result["best_epoch"],
        "lr": result["lr"],
        "averaged": result["averaged"],
        "n_train": result["n_train"],
    }


def build_training_assets(db: Database, recipe) -> list[dg.AssetsDefinition]:
    pretrain_version = recipe_version(recipe, *PRETRAIN_SECTIONS)
    finetune_version = recipe_version(recipe, "seed", "backbone", "finetune")
    probe_version = recipe_version(recipe, "seed", "backbone", "probe")
    cells = cell_partitions(db.tasks, recipe, db.name)

    @dg.asset(
        key=db.key("pretrained_checkpoint"),
        partitions_def=objective_partitions(recipe),
        ins={
            "raw_tables": dg.AssetIn(key=db.key("raw_tables")),
            "traversal_graph": dg.AssetIn(key=db.key("traversal_graph")),
            "temporal_windows": dg.AssetIn(key=db.key("temporal_windows")),
            # every window of this database (the reader names the missing ones)
            "tve_targets": dg.AssetIn(
                key=db.key("tve_targets"),
                partition_mapping=dg.AllPartitionMapping(),
                metadata={"allow_missing_partitions": True},
            ),
        },
        group_name=db.group,
        kinds={"pytorch", "mlflow"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        code_version=pretrain_version,
    )
    def pretrained_checkpoint(
        context: dg.AssetExecutionContext,
        raw_tables,
        traversal_graph,
        temporal_windows,
        tve_targets,
        storage: TVEStorage,
        recipe: RecipeResource,
        device: DeviceResource,
        mlflow: MLflowTracking,
    ) -> dg.Output:
        """One pre-training objective's backbone state_dicts (CPU), one per entity table, with
        the task-vector normaliser each was trained with (fine-tuning reuses it)."""
        run_recipe = recipe.recipe()
        key = context.partition_key
        objective, budget = parse_budget_key(key)
        dataset = open_dataset(raw_tables.dataset_dir)
        files = {
            e: _target_files(tve_targets, temporal_windows, e, db.name) for e in traversal_graph
        }
        checkpoint = {
            "objective": objective,
            "budget": budget,
            "key": key,
            "recipe": run_recipe.model_dump(mode="json"),
            "column_types": raw_tables.column_types,
            "by_entity": {},
            "created": context.run_id,
        }
        if device.processes > 1:
            return _pretrain_with_torchrun(
                context, checkpoint, raw_tables, traversal_graph, files, storage, device, mlflow
            )
        graph = _cached_graph(storage, raw_tables, dataset, run_recipe)
        # what the run is: data and recipe, not which budgets or cells exist (a budget's
        # partition resumes the run another budget's left)
        run_key = f"{raw_tables.fingerprint}:{recipe_version(run_recipe, *PRETRAIN_SECTIONS)}"
        with mlflow.run(context, run_name(key, "pretrain"), database=db.name) as run:
            run.log_params(_pretrain_params(objective, run_recipe, budget))
            for entity, defs in traversal_graph.items():
                checkpointer, snapshot = _run_files(
                    storage, db.name, objective, entity, run_key, run_recipe.checkpoint_every
                )
                # one process at a time on an objective's run: a budget's partition started
                # beside another budget's waits, then reuses or resumes what it left
                with exclusive(
                    storage.lock_file(db.name, f"{objective}-{entity}"),
                    lambda: context.log.info(f"waiting for {objective}'s other budget run"),
                ):
                    result = _pretrain_one(
                        context,
                        run_recipe,
                        graph,
                        entity,
                        dataset.manifest.tables[entity].pkey,
                        defs,
                        files[entity],
                        objective,
                        run,
                        checkpointer,
                        device,
                        budget,
                        snapshot,
                    )
                checkpoint["by_entity"][entity] = result
            run.log_torch(
                {e: v["backbone"] for e, v in checkpoint["by_entity"].items()}, "backbone.pt"
            )
        return dg.Output(
            checkpoint,
            metadata={
                "num_windows": sum(map(len, next(iter(files.values())))),
                **checkpoint_metadata(
                    checkpoint["key"], checkpoint["by_entity"], traversal_graph, run_recipe.pretrain
                ),
                **mlflow_metadata(run),
            },
        )

    # What a cell reads (finetuned_models, probe_metrics): the tables and the cell's
    # checkpoint; a scratch cell maps to none and gets None. Probes read every budget's.
    def cell_inputs(readout: str = FINETUNE) -> dict:
        return {
            "raw_tables": dg.AssetIn(key=db.key("raw_tables")),
            "pretrained_checkpoint": dg.AssetIn(
                key=db.key("pretrained_checkpoint"),
                partition_mapping=checkpoint_of_cells(db.tasks, recipe, db.name, readout),
            ),
        }

    @dg.asset(
        key=db.key("finetuned_models"),
        partitions_def=cells,
        ins=cell_inputs(),
        group_name=db.group,
        kinds={"pytorch", "mlflow"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        code_version=finetune_version,
    )
    def finetuned_models(
        context: dg.AssetExecutionContext,
        raw_tables,
        pretrained_checkpoint,
        storage: TVEStorage,
        recipe: RecipeResource,
        device: DeviceResource,
        mlflow: MLflowTracking,
    ) -> dg.Output:
        """One experiment cell: a task fine-tuned from scratch or from one objective's backbone,
        on one label fraction (drawn with the seed, the same rows for every method) or all of
        the restricted task's labels (``top<k>``), one seed."""
        run_recipe = recipe.recipe()
        task_name, method, label_set, seed = parse_cell(context.partition_key)
        dataset, task, tables = _task_of(task_name, raw_tables, label_set)
        backbone = _backbone_of(method, pretrained_checkpoint, task.entity_table, db.name)
        data, col_stats = _cached_graph(storage, raw_tables, dataset, run_recipe)
        # a new pre-trained backbone makes an old fine-tuning checkpoint stale
        created = (pretrained_checkpoint or {}).get("created", "")
        resume_key = f"{raw_tables.fingerprint}:{run_recipe.model_dump_json()}:{created}"
        with mlflow.run(
            context,
            _cell_run_name(task_name, method, label_set, seed, "fine-tune"),
            database=db.name,
            params={
                **_cell_params(task_name, method, label_set, seed, FINETUNE, run_recipe),
                **{f"finetune.{k}": v for k, v in run_recipe.finetune.model_dump().items()},
            },
        ) as run:
            try:
                result = training.finetune(
                    data,
                    col_stats,
                    task,
                    tables,
                    run_recipe,
                    device.torch_device(),
                    seed=seed,
                    label_fraction=_label_fraction(label_set),
                    backbone=backbone,
                    log=_finetune_log(context, run),
                    checkpoint=training.Checkpointer(
                        storage.checkpoint_file(
                            "finetuned_models", db.name, context.partition_key.replace("|", "_")
                        ),
                        run_recipe.checkpoint_every,
                        key=resume_key,
                    ),
                )
            except (
                ValueError
            ) as exc:  # bad input (e.g. a label sample with no row): one line, no retry
                raise failure(exc) from exc
            run.log_metrics(_kept_metrics(result), result["best_step"])
            run.log_params({"lr": result["lr"], "best_step": result["best_step"]})
            run.log_torch(result["state_dict"], "model.pt")
            result["mlflow_run_id"] = run.run_id
        val = {k: float(v) for k, v in result["val_metrics"].items()}
        metric = next(iter(val), "")
        return dg.Output(
            result,
            metadata={
                "task": task_name,
                "method": method,
                "label_fraction": _label_fraction(label_set),
                "label_set": label_set_name(label_set),
                "seed": seed,
                "n_train": result["n_train"],
                "n_val": len(tables["val"].df),
                "n_test": len(tables["test"].df),
                "best_epoch": result["best_epoch"],
                "best_step": result["best_step"],
                "steps": result["steps"],
                "lr": dg.MetadataValue.float(float(result["lr"])),
                "averaged": result["averaged"],
                "lr_search": table(
                    result["lr_search"],
                    {"lr": "float", "val_score": "float", "best_step": "int"},
                ),
                "metric": metric,
                # a key per metric, so the UI's Plots tab draws AUROC and MAE apart
                f"val_{metric}": dg.MetadataValue.float(val.get(metric, float("nan"))),
                "val_metrics": table(
                    [{"metric": k, "value": v} for k, v in val.items()],
                    {"metric": "string", "value": "float"},
                ),
                "learning_curve": image(
                    plot_learning_curves(
                        {method: result["history"]},
                        title=f"fine-tuning {context.partition_key}",
                        points={"kept (best step)": (result["best_step"], val.get(metric))},
                        x="step",
                    ),
                    "learning curve",
                ),
                **mlflow_metadata(run),
            },
        )

    @dg.asset(
        key=db.key("metrics"),
        partitions_def=cells,
        ins={
            "raw_tables": dg.AssetIn(key=db.key("raw_tables")),
            "finetuned_models": dg.AssetIn(key=db.key("finetuned_models")),
        },
        group_name=db.group,
        kinds={"mlflow"},
        code_version=finetune_version,
    )
    def metrics(
        context: dg.AssetExecutionContext,
        raw_tables,
        finetuned_models,
        storage: TVEStorage,
        recipe: RecipeResource,
        device: DeviceResource,
        mlflow: MLflowTracking,
    ) -> dg.Output:
        """RelBench's evaluator on val and test for one cell's model; one row per metric."""
        run_recipe = recipe.recipe()
        task_name, method, label_set, seed = parse_cell(context.partition_key)
        dataset, task, tables = _task_of(task_name, raw_tables, label_set, with_test_labels=True)
        data, col_stats = _cached_graph(storage, raw_tables, dataset, run_recipe)
        scores = evaluation.evaluate(
            data,
            col_stats,
            task,
            tables,
            finetuned_models["state_dict"],
            run_recipe,
            device.torch_device(),
            seed=seed,
            output_range=finetuned_models.get("output_range"),
        )
        rows = _metric_rows(db.name, task_name, method, label_set, seed, scores, "finetune")
        # the task's trivial baseline beside the model's scores, while its tables are loaded
        # (cached per task and label setting; the beats_trivial_baseline check reads it)
        trivial, _, _ = trivial_baseline_of(
            storage, raw_tables, task_name, label_set, loaded=(task, tables)
        )
        with mlflow.run(
            context,
            _cell_run_name(task_name, method, label_set, seed),
            database=db.name,
            params=_cell_params(task_name, method, label_set, seed, FINETUNE, run_recipe),
        ) as run:
            run.log_metrics({f"{row['split']}.{row['metric']}": row["value"] for row in rows})
        return dg.Output(
            pd.DataFrame(rows),
            metadata={
                **cell_metrics_metadata(scores, finetuned_models, context.partition_key),
                **trivial_metadata(trivial, scores),
                **mlflow_metadata(run),
            },
        )

    @dg.asset(
        key=db.key("probe_metrics"),
        partitions_def=cell_partitions(db.tasks, recipe, db.name, PROBE),
        ins=cell_inputs(PROBE),
        group_name=db.group,
        kinds={"scikitlearn", "mlflow"},
        code_version=probe_version,
    )
    def probe_metrics(
        context: dg.AssetExecutionContext,
        raw_tables,
        pretrained_checkpoint,
        storage: TVEStorage,
        recipe: RecipeResource,
        device: DeviceResource,
        mlflow: MLflowTracking,
    ) -> dg.Output:
        """The cheap readout of one cell: a linear probe on the frozen encoder (the method's
        backbone, or a random one for scratch), strength chosen on val, RelBench's evaluator
        on val and test; rows as ``metrics``'s, with ``readout`` = ``probe``."""
        run_recipe = recipe.recipe()
        task_name, method, label_set, seed = parse_cell(context.partition_key)
        dataset, task, tables = _task_of(task_name, raw_tables, label_set, with_test_labels=True)
        backbone = _backbone_of(method, pretrained_checkpoint, task.entity_table, db.name)
        data, col_stats = _cached_graph(storage, raw_tables, dataset, run_recipe)
        try:
            result = probe.linear_probe(
                data,
                col_stats,
                task,
                tables,
                run_recipe,
                device.torch_device(),
                seed=seed,
                label_fraction=_label_fraction(label_set),
                backbone=backbone,
                cache=probe.EMBEDDINGS,
                # the graph is loaded anew for every cell: name it by its data
                graph_key=f"{db.name}:{raw_tables.fingerprint}",
            )
        except ValueError as exc:  # e.g. a label sample of one class: one line, no retry
            raise failure(exc) from exc
        scores = {"val": result["val_metrics"], "test": result["test_metrics"]}
        rows = _metric_rows(db.name, task_name, method, label_set, seed, scores, "probe")
        with mlflow.run(
            context,
            _cell_run_name(task_name, method, label_set, seed, "probe"),
            database=db.name,
            params={
                **_cell_params(task_name, method, label_set, seed, PROBE, run_recipe),
                result["regularisation"]: result["strength"],
            },
        ) as run:
            run.log_metrics({f"{r['split']}.{r['metric']}": r["value"] for r in rows})
        return dg.Output(
            pd.DataFrame(rows),
            metadata={**probe_metadata(result), **mlflow_metadata(run)},
        )

    cells_expected = len(experiment_cells(db.tasks, recipe, db.name))
    probe_cells_expected = len(experiment_cells(db.tasks, recipe, db.name, PROBE))

    @dg.asset(
        key=db.key("results"),
        ins={
            name: dg.AssetIn(
                key=db.key(name),
                partition_mapping=dg.AllPartitionMapping(),
                metadata={"allow_missing_partitions": True},
            )
            for name in ("metrics", "probe_metrics")
        }
        | {"raw_tables": dg.AssetIn(key=db.key("raw_tables"))},
        group_name=db.group,
        kinds={"mlflow", "pandas"},
        code_version=RESULTS_VERSION,
    )
    def results(
        context: dg.AssetExecutionContext,
        metrics,
        probe_metrics,
        raw_tables,
        storage: TVEStorage,
        recipe: RecipeResource,
        mlflow: MLflowTracking,
    ) -> dg.Output:
        """The experiment's answer: mean ± std over seeds per task, readout (fine-tuning or
        linear probe), method and label setting, each pre-trained method's paired
        difference to scratch (same readout) with a 95% CI, and each task's trivial
        baseline beside it (RelBench's trivial predictors, from the training labels);
        written to ``results/<database>/`` (summary.csv, summary.md, baselines.csv, one PNG
        per task, budget.png)."""
        frames = [
            *(f.assign(readout=f.get("readout", "finetune")) for f in metrics.values()),
            *probe_metrics.values(),
        ]
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        scores = trivial_scores(rows, raw_tables)
        summary = summarise(rows, trivial_by_setting(scores))
        ages = evaluation.test_input_ages(
            open_dataset(raw_tables.dataset_dir), sorted(set(rows.get("task", ())))
        )
        out = storage.results_dir(db.name)
        write_results(out, rows, summary, scores, ages)
        with mlflow.run(context, run_name("results", db.name), database=db.name) as run:
            # one metric per summary row's mean and paired difference, named
            # task/readout/method/label_set/split/metric/statistic
            run.log_metrics(summary_metrics(summary))
            run.log_artifacts(out)
        plots = sorted(out.glob("*.png"))
        return dg.Output(
            summary,
            metadata={
                "cells": len(metrics),
                "probe_cells": len(probe_metrics),
                "cells_expected": cells_expected,
                "probe_cells_expected": probe_cells_expected,
                "summary": dg.MetadataValue.md(markdown_table(summary)),
                "test_inputs": dg.MetadataValue.md(test_inputs_text(ages)),
                "plots": dg.MetadataValue.md(
                    "\n\n".join(png_markdown(p.read_bytes(), p.stem) for p in plots) or "(no plot)"
                ),
                "folder": dg.MetadataValue.path(str(out)),
                "mlflow_experiment": dg.MetadataValue.url(run.experiment_url),
                **mlflow_metadata(run),
            },
        )

    return [pretrained_checkpoint, finetuned_models, metrics, probe_metrics, results]


def _backbone_of(method: str, checkpoint: dict | None, entity_table: str, database: str):
    """The backbone a cell starts from: its objective's for the entity table, None for
    scratch."""
    if method == SCRATCH:
        return None
    by_entity = (checkpoint or {}).get("by_entity", {})
    if entity_table not in by_entity:
        raise failure(
            f"the {method} checkpoint of {database!r} has no backbone for entity table "
            f"{entity_table!r}: re-materialise pretrained_checkpoint {method}"
        )
    return by_entity[entity_table]["backbone"]


def _metric_rows(database, task, method, label_set, seed, scores: dict, readout: str) -> list:
    """One row per split and metric of a cell, as ``results`` reads them: ``label_set`` the
    cell's label setting (``0.1``, ``top10``), ``label_fraction`` its fraction (NaN for a
    restricted task, so that a filter on the fraction never mixes it with the whole task)."""
    k = restricted_k(label_set)
    return [
        {
            "database": database,
            "task": task,
            "method": method,
            "label_fraction": float("nan") if k is not None else float(label_set),
            "label_set": label_set_name(label_set),
            "seed": seed,
            "readout": readout,
            "split": split,
            "metric": metric,
            "value": float(value),
        }
        for split, values in scores.items()
        for metric, value in values.items()
    ]


def probe_metadata(result: dict) -> dict:
    """A probe cell under the keys ``metrics`` uses (``val_<metric>``, ``test_<metric>``:
    the task's first metric, a key per metric so the UI plots each apart), the chosen
    strength, seconds, and the validation grid."""
    name = result["regularisation"]
    return {
        "metric": result["metric"],
        f"val_{result['metric']}": dg.MetadataValue.float(result["val_metrics"][result["metric"]]),
        f"test_{result['metric']}": dg.MetadataValue.float(
            result["test_metrics"][result["metric"]]
        ),
        "regularisation": name,
        "strength": dg.MetadataValue.float(result["strength"]),
        "seconds": dg.MetadataValue.float(result["seconds"]),
        "embed_seconds": dg.MetadataValue.float(result["embed_seconds"]),
        "n_train": result["n_train"],
        "grid": table(
            [{name: g[name], "val_score": g["val_score"]} for g in result["grid"]],
            {name: "float", "val_score": "float"},
        ),
    }


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _throughput(result: dict, cfg) -> tuple[float, float]:
    """(wall seconds, seeds per second) of the steps the run that made ``result`` trained
    (a resumed budget: the steps since the budget it resumed from)."""
    rows = result.get("timing") or []
    seconds = sum(r["seconds"] for r in rows)
    if not rows or seconds <= 0:
        return float("nan"), float("nan")
    steps = rows[-1]["step"] - rows[0]["step"] + cfg.steps_per_epoch
    return seconds, steps * cfg.batch_size / seconds


def checkpoint_metadata(objective: str, by_entity: dict, graph: dict, cfg=None) -> dict:
    """Seeds and best validation loss (mean over entity tables: one number per
    checkpoint, plotted across objectives), a row per entity table (with the seconds and
    seeds/s of the steps trained for it, given the pre-training config ``cfg``), the loss
    curves."""
    speed = {e: _throughput(r, cfg) if cfg else (float("nan"),) * 2 for e, r in by_entity.items()}
    return {
        "train_seconds": dg.MetadataValue.float(float(sum(v[0] for v in speed.values()))),
        "seeds": sum(r["n_train_seeds"] + r["n_val_seeds"] for r in by_entity.values()),
        "val_loss": dg.MetadataValue.float(_mean(r["best_val_loss"] for r in by_entity.values())),
        "by_entity": table(
            [
                {
                    "entity": entity,
                    "targets": len(graph.get(entity, ())),
                    "train_seeds": r["n_train_seeds"],
                    "val_seeds": r["n_val_seeds"],
                    "inactive_rate": r["inactive_rate"],
                    "best_epoch": r["best_epoch"],
                    "best_step": r.get("best_step", -1),
                    "best_val_loss": r["best_val_loss"],
                    "seconds": speed[entity][0],
                    "seeds_per_s": speed[entity][1],
                }
                for entity, r in by_entity.items()
            ],
            {
                "entity": "string",
                "targets": "int",
                "train_seeds": "int",
                "val_seeds": "int",
                "inactive_rate": "float",
                "best_epoch": "int",
                "best_step": "int",
                "best_val_loss": "float",
                "seconds": "float",
                "seeds_per_s": "float",
            },
        ),
        "loss_curves": image(
            plot_learning_curves(
                {entity: r["history"] for entity, r in by_entity.items()},
                title=f"pre-training {objective}",
                quantities=["train_loss", "val_loss"],
            ),
            "loss curves",
        ),
    }


def trivial_baseline_of(
    storage: TVEStorage, raw_tables, task_name: str, label_set, loaded: tuple | None = None
):
    """A task's trivial baseline (a restricted cell's: its restricted task's), its first
    metric and its label medians, computed once per database version, task and label
    setting: RelBench's task tables cost ~2.5 s (rel-flights), the metrics they check ~3.5 s,
    and every cell of a task has the same baseline. ``loaded``: the cell's (task, tables)
    (with test labels) when the caller has them already (the ``metrics`` asset)."""
    path = (
        storage.graph_cache(raw_tables.name, raw_tables.fingerprint)  # the data version's
        / "baselines"
        / f"{task_name}-{label_set_name(label_set)}.json"
    )
    if path.exists():
        saved = json.loads(path.read_text())
        return pd.DataFrame(saved["trivial"]), saved["metric"], saved["medians"]
    if loaded is None:
        _, *loaded = _task_of(task_name, raw_tables, label_set, with_test_labels=True)
    task, tables = loaded
    trivial = baselines.trivial_baseline(baselines.baseline_scores(task, tables))
    metric, medians = task.metrics[0].__name__, baselines.label_medians(task, tables)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps(
            {"trivial": trivial.to_dict("records"), "metric": metric, "medians": medians},
            default=float,
        )
    )
    tmp.replace(path)
    return trivial, metric, medians


def trivial_metadata(trivial: pd.DataFrame, scores: dict) -> dict:
    """The task's trivial baseline on the first metric, per split (``trivial_val_<metric>``,
    ``trivial_test_<metric>``), and the constant it predicts: beside ``val_<metric>`` on the
    asset's page, so that a model worse than a constant shows as one."""
    metric = next(iter(scores.get("val") or scores.get("test") or {}), "")
    rows = trivial[trivial["metric"] == metric]
    out = {
        f"trivial_{row['split']}_{metric}": dg.MetadataValue.float(float(row["trivial"]))
        for _, row in rows.iterrows()
    }
    if not rows.empty:
        out["trivial_predictor"] = str(rows["trivial_predictor"].iloc[0])
    return out


def cell_metrics_metadata(scores: dict, finetuned: dict, cell: str) -> dict:
    """The task's first metric (RelBench's order; the one fine-tuning chose its epoch by)
    under ``val_<metric>`` / ``test_<metric>`` (a key per metric: the UI's Plots tab draws
    each metric's own line, not AUROC and MAE joined), every metric in a table, and a plot:
    the fine-tuning curve with the evaluated val and test scores at the kept epoch."""
    metric = next(iter(scores.get("val") or scores.get("test") or {}), "")
    nan = float("nan")
    val, test = scores.get("val", {}).get(metric, nan), scores.get("test", {}).get(metric, nan)
    # fine-tuning results written before the step budget have epochs only
    x = "step" if "best_step" in finetuned else "epoch"
    kept = finetuned.get(f"best_{x}", 0)
    return {
        "metric": metric,
        f"val_{metric}": dg.MetadataValue.float(float(val)),
        f"test_{metric}": dg.MetadataValue.float(float(test)),
        "scores": table(
            [
                {"split": split, "metric": name, "value": value}
                for split, values in scores.items()
                for name, value in values.items()
            ],
            {"split": "string", "metric": "string", "value": "float"},
        ),
        "plot": image(
            plot_learning_curves(
                {"fine-tuning": finetuned.get("history", [])},
                title=cell,
                quantities=["train_loss", f"val_{metric}"],
                points={"val (evaluated)": (kept, val), "test": (kept, test)},
                x=x,
            ),
            f"{metric}: fine-tuning curve, val and test at the kept {x}",
        ),
    }


WHOLE_TASK = "all"


def trivial_scores(rows: pd.DataFrame, raw_tables) -> pd.DataFrame:
    """RelBench's trivial predictors of every task with cells in ``rows``, on val and test
    (:func:`tve_pipeline.baselines.baseline_scores`; training labels only): the whole
    task's (``label_set`` ``all``) and each restricted task's (``top10``: its own tables)."""
    settings = {(name, WHOLE_TASK) for name in rows.get("task", ())}
    if "label_set" in rows:
        settings |= {
            (name, str(s))
            for name, s in zip(rows["task"], rows["label_set"])
            if pd.notna(s) and restricted_k(s) is not None
        }
    frames = []
    for name, setting in sorted(settings):
        label_set = 1.0 if setting == WHOLE_TASK else setting
        task, tables = _task_of(name, raw_tables, label_set, with_test_labels=True)[1:]
        frames.append(baselines.baseline_scores(task, tables).assign(label_set=setting))
    columns = [*baselines.COLUMNS, "label_set"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def trivial_by_setting(scores: pd.DataFrame) -> pd.DataFrame:
    """:func:`tve_pipeline.baselines.trivial_baseline` of the whole task (``label_fraction``
    NaN) and of each restricted task (``label_fraction`` names it), as ``summarise`` reads."""
    frames = [
        baselines.trivial_baseline(part).assign(
            label_fraction=np.nan if setting == WHOLE_TASK else setting
        )
        for setting, part in scores.groupby("label_set", sort=True)
    ]
    return pd.concat(frames, ignore_index=True) if frames else None


def test_inputs_text(ages: pd.DataFrame) -> str:
    """The test seeds' input age per task, as the results' metadata and summary.md say it."""
    if ages.empty:
        return "(no task)"
    lines = [
        "Test seeds see the database up to the test timestamp (RelBench's protocol: the graph "
        "is cut there), so their inputs are older than a val seed's (which sees its rows up "
        "to its own time):",
        "",
        "| task | inputs until | test seeds | input age (days) |",
        "|---|---|---|---:|",
    ]
    for r in ages.itertuples():
        lines.append(
            f"| {r.task} | {r.inputs_until} | {r.first_test_seed} to {r.last_test_seed} | "
            f"{r.min_age_days:.0f} to {r.max_age_days:.0f} |"
        )
    return "\n".join(lines)


def write_results(
    out: Path,
    rows: pd.DataFrame,
    summary: pd.DataFrame,
    scores: pd.DataFrame | None = None,
    ages: pd.DataFrame | None = None,
) -> None:
    """summary.csv, cells.csv (every cell's metric), baselines.csv (every trivial
    predictor's scores), test_inputs.csv (how old the test seeds' inputs are), summary.md
    and the plots, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    frames = [("summary.csv", summary), ("cells.csv", rows)]
    if scores is not None:
        frames.append(("baselines.csv", scores))
    if ages is not None:
        frames.append(("test_inputs.csv", ages))
    for name, frame in frames:
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    with atomic_path(out / "summary.md") as tmp:
        notes = f"\n\n{test_inputs_text(ages)}\n" if ages is not None and len(ages) else "\n"
        tmp.write_text(markdown_table(summary) + notes)
    plot_tasks(summary, out)
    plot_budget_benefit(summary, out)
