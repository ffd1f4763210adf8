"""Learning assets of one database: the pre-trained checkpoint, fine-tuned models, metrics.

The checkpoint reads every window of ``tve_targets`` as a Dagster input (all windows of
the database: ``AllPartitionMapping``); fine-tuned models and metrics are partitioned by
the database's own tasks. Each asset's code version hashes the recipe sections that
decide its result, so a changed recipe shows exactly those assets as stale.
"""

from pathlib import Path

import dagster as dg
import pandas as pd

from assets.failures import failure
from assets.partitions import task_partitions
from assets.registry import Database
from resources import DeviceResource, MLflowTracking, RecipeResource, TVEStorage
from tve_pipeline import database as tdb
from tve_pipeline import training
from tve_pipeline.config import recipe_version
from tve_pipeline.tasks import past_activity, restrict_to_most_active


def _graph(storage: TVEStorage, summary, dataset, recipe):
    db = dataset.get_db()
    return training.graph_for(db, summary.column_types, recipe.backbone,
                              storage.graph_cache(summary.name, summary.fingerprint))


def _target_files(tve_targets: dict, temporal_windows: pd.DataFrame, entity: str, database: str) -> list:
    """The task-vector files of one entity table: one per training window of the schedule."""
    windows = list(temporal_windows["window"].dropna())
    files = [tve_targets.get(w, Path("/nonexistent")) / f"{entity}.parquet" for w in windows]
    missing = [w for w, f in zip(windows, files) if not f.exists()]
    if missing:
        raise failure(
            f"tve_targets of {database!r} missing for {len(missing)} of {len(windows)} windows "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): run `tve run {database}` "
            "or backfill its tve_targets in the UI"
        )
    if not files:
        raise failure(f"database {database!r} has no training seed time, so no task vectors to pre-train on")
    return files


def _pretrain_one(context, r, graph, entity: str, entity_col: str, defs, files, objective: str, run,
                  checkpoint: "training.Checkpointer", device) -> dict:
    """One objective on one entity table, streamed from the task-vector files of its windows
    (active rows only, float32: a few hundred MB where the dense frame took 20 GB)."""
    context.log.info(f"pre-training {objective} on {entity}: {len(files)} windows, {len(defs)} targets")
    data, col_stats = graph
    try:
        return training.pretrain(
            data, col_stats, entity, entity_col, files, {d["name"]: d["aggregation"] for d in defs}, r,
            device.torch_device(), objective=objective, checkpoint=checkpoint,
            log=lambda m, step: run.log_metrics({f"{entity}.{k}": v for k, v in m.items()}, step),
        )
    except ValueError as exc:
        raise failure(exc) from exc


def _task_of(name: str, raw_tables, recipe, *, with_test_labels: bool = False):
    """The task and its tables (restricted when the recipe says so).

    The test table is RelBench's masked one (entity + seed time); ``with_test_labels``
    adds the labelled test table under ``"test_labels"``, for the evaluator only.
    """
    if name not in raw_tables.task_names:
        raise failure(f"database {raw_tables.name!r} has no task {name!r}; "
                      f"its tasks: {', '.join(raw_tables.task_names) or '(none)'}")
    dataset = tdb.open_dataset(raw_tables.dataset_dir)
    task = dataset.load_task(name)
    db = task.get_db(upto_test_timestamp=False)
    tables = {split: task.get_table(split, db=db) for split in ("train", "val", "test")}
    if with_test_labels:
        tables["test_labels"] = task.get_table("test", mask_input_cols=False, db=db)
    k = recipe.finetune.restrict_top_k
    if k is not None:
        frames = {n: t.df for n, t in db.table_dict.items()}
        for table in tables.values():
            activity = past_activity(table.df, frames, dataset.manifest.tables, task.entity_table,
                                     task.entity_col, task.time_col, task.timedelta)
            table.df = restrict_to_most_active(table.df, activity, task.entity_col, task.time_col, k).reset_index(drop=True)
    return dataset, task, tables


def build_training_assets(db: Database, recipe) -> list[dg.AssetsDefinition]:
    pretrain_version = recipe_version(recipe, "seed", "backbone", "targets", "pretrain")
    finetune_version = recipe_version(recipe, "seed", "backbone", "finetune")

    @dg.asset(
        key=db.key("pretrained_checkpoint"),
        ins={
            "raw_tables": dg.AssetIn(key=db.key("raw_tables")),
            "traversal_graph": dg.AssetIn(key=db.key("traversal_graph")),
            "temporal_windows": dg.AssetIn(key=db.key("temporal_windows")),
            # every window of this database; a missing one fails in one line (TaskVectorFiles)
            "tve_targets": dg.AssetIn(key=db.key("tve_targets"), partition_mapping=dg.AllPartitionMapping(),
                                      metadata={"allow_missing_partitions": True}),
        },
        group_name=db.group,
        kinds={"pytorch", "mlflow"},
        pool="gpu",
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
        """Backbone state_dicts (CPU) per pre-training objective and entity table, with the
        task-vector normaliser each was trained with (fine-tuning and inference reuse it)."""
        r = recipe.recipe()
        dataset = tdb.open_dataset(raw_tables.dataset_dir)
        files = {e: _target_files(tve_targets, temporal_windows, e, db.name) for e in traversal_graph}
        checkpoint = {"recipe": r.model_dump(mode="json"), "column_types": raw_tables.column_types,
                      "objectives": {}, "created": context.run_id}
        graph = _graph(storage, raw_tables, dataset, r)
        meta = {"num_windows": len(next(iter(files.values()))), "database": db.name}
        resume_key = f"{raw_tables.fingerprint}:{r.model_dump_json()}"
        for objective in r.pretrain.objectives:
            checkpoint["objectives"][objective] = {}
            with mlflow.run(context, f"pretrain {objective}", database=db.name) as run:
                run.log_params({"objective": objective, "profile": r.profile,
                                **{f"pretrain.{k}": v for k, v in r.pretrain.model_dump().items()},
                                **{f"backbone.{k}": v for k, v in r.backbone.model_dump().items()}})
                for entity, defs in traversal_graph.items():
                    checkpointer = training.Checkpointer(
                        storage.checkpoint_file("pretrained_checkpoint", db.name, f"{objective}-{entity}"),
                        r.checkpoint_every, key=resume_key)
                    result = _pretrain_one(context, r, graph, entity, dataset.manifest.tables[entity].pkey, defs,
                                           files[entity], objective, run, checkpointer, device)
                    checkpoint["objectives"][objective][entity] = result
                    meta[f"{objective}_{entity}_seeds"] = result["n_train_seeds"] + result["n_val_seeds"]
                    meta[f"{objective}_{entity}_best_epoch"] = result["best_epoch"]
                    meta[f"{objective}_{entity}_best_val_loss"] = result["best_val_loss"]
                run.log_torch({e: v["backbone"] for e, v in checkpoint["objectives"][objective].items()}, "backbone.pt")
                meta[f"{objective}_mlflow_run_id"] = run.run_id
        return dg.Output(checkpoint, metadata=meta)

    @dg.asset(
        key=db.key("finetuned_models"),
        partitions_def=task_partitions(db.tasks),
        ins={"raw_tables": dg.AssetIn(key=db.key("raw_tables")),
             "pretrained_checkpoint": dg.AssetIn(key=db.key("pretrained_checkpoint"))},
        group_name=db.group,
        kinds={"pytorch", "mlflow"},
        pool="gpu",
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
        """Per-task models: from scratch and from each pre-trained objective's backbone, for every
        label fraction and seed (CPU state_dicts keyed by (method, label fraction, seed))."""
        r = recipe.recipe()
        dataset, task, tables = _task_of(context.partition_key, raw_tables, r)
        data, col_stats = _graph(storage, raw_tables, dataset, r)
        backbones = {"scratch": None}
        for objective, by_entity in pretrained_checkpoint["objectives"].items():
            if task.entity_table in by_entity:
                backbones[objective] = by_entity[task.entity_table]["backbone"]
            else:
                context.log.warning(f"no {objective} backbone for entity table {task.entity_table!r}: skipping it")
        models = {}
        meta = {"n_train": len(tables["train"].df), "n_val": len(tables["val"].df), "n_test": len(tables["test"].df)}
        # a new pre-trained backbone makes an old fine-tuning checkpoint stale
        resume_key = f"{raw_tables.fingerprint}:{r.model_dump_json()}:{pretrained_checkpoint.get('created', '')}"
        for method, backbone in backbones.items():
            for fraction in r.finetune.label_fractions:
                for seed in r.finetune.seeds:
                    name = f"{method} frac={fraction:g} seed={seed}"
                    with mlflow.run(context, f"finetune {name}", database=db.name) as run:
                        run.log_params({"method": method, "seed": seed, "label_fraction": fraction,
                                        **{f"finetune.{k}": v for k, v in r.finetune.model_dump().items()}})
                        result = training.finetune(
                            data, col_stats, task, tables, r, device.torch_device(), seed=seed, label_fraction=fraction,
                            backbone=backbone, log=run.log_metrics,
                            checkpoint=training.Checkpointer(
                                storage.checkpoint_file("finetuned_models", f"{db.name}/{context.partition_key}",
                                                        name.replace(" ", "_")),
                                r.checkpoint_every, key=resume_key),
                        )
                        run.log_torch(result["state_dict"], "model.pt")
                        result["mlflow_run_id"] = run.run_id
                    models[(method, fraction, seed)] = result
                    for k, v in result["val_metrics"].items():
                        meta[f"{name} val_{k}"] = float(v)
        return dg.Output(models, metadata=meta)

    @dg.asset(
        key=db.key("metrics"),
        partitions_def=task_partitions(db.tasks),
        ins={"raw_tables": dg.AssetIn(key=db.key("raw_tables")),
             "finetuned_models": dg.AssetIn(key=db.key("finetuned_models"))},
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
        """RelBench's evaluator on val and test for every fine-tuned model; one row per metric."""
        r = recipe.recipe()
        task_name = context.partition_key
        dataset, task, tables = _task_of(task_name, raw_tables, r, with_test_labels=True)
        data, col_stats = _graph(storage, raw_tables, dataset, r)
        rows = []
        with mlflow.run(context, "metrics", database=db.name) as run:
            for (method, fraction, seed), model in finetuned_models.items():
                scores = training.evaluate(data, col_stats, task, tables, model["state_dict"], r, device.torch_device(),
                                           seed=seed, output_range=model.get("output_range"))
                for split, values in scores.items():
                    for metric, value in values.items():
                        rows.append({"database": db.name, "task": task_name, "method": method,
                                     "label_fraction": fraction, "seed": seed,
                                     "split": split, "metric": metric, "value": float(value)})
                        run.log_metrics({f"{method}.frac{fraction:g}.seed{seed}.{split}.{metric}": value})
            meta_run = run.run_id
        frame = pd.DataFrame(rows)
        summary = (frame.groupby(["label_fraction", "method", "split", "metric"])["value"].agg(["mean", "std", "count"])
                   .reset_index() if len(frame) else frame)
        return dg.Output(
            frame,
            metadata={"mlflow_run_id": meta_run, "summary": dg.MetadataValue.md(summary.to_markdown(index=False))},
        )

    return [pretrained_checkpoint, finetuned_models, metrics]
