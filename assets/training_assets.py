"""Learning assets: the pre-trained checkpoint, fine-tuned models and their metrics."""

import dagster as dg
import pandas as pd

from assets.database_assets import _fail, database_timedelta
from assets.partitions import by_database, database_partitions, database_task_partitions, window_key
from resources import DeviceResource, MLflowTracking, RecipeResource, TVEStorage
from tve_pipeline import database as tdb
from tve_pipeline import training
from tve_pipeline.tasks import past_activity, restrict_to_most_active


def training_windows(summary, recipe) -> list[str]:
    """The window partitions that hold this database's training seed times."""
    dataset = tdb.open_dataset(summary.dataset_dir)
    schedule = tdb.seed_schedule(summary, database_timedelta(summary, recipe), tdb.num_eval_timestamps(dataset))
    return sorted({window_key(t) for t in schedule.loc[schedule["split"] == "train", "timestamp"]})


def _graph(storage: TVEStorage, summary, dataset, recipe):
    db = dataset.get_db()
    return training.graph_for(db, summary.column_types, recipe.backbone,
                              storage.graph_cache(summary.name, summary.fingerprint))


@dg.asset(
    partitions_def=database_partitions,
    deps=[dg.AssetDep("tve_targets", partition_mapping=by_database)],
    group_name="learning",
    kinds={"pytorch", "mlflow"},
    pool="gpu",
)
def pretrained_checkpoint(
    context: dg.AssetExecutionContext,
    raw_tables,
    traversal_graph,
    storage: TVEStorage,
    recipe: RecipeResource,
    device: DeviceResource,
    mlflow: MLflowTracking,
) -> dg.Output:
    """Backbone state_dicts (CPU) per pre-training objective and entity table, with the
    task-vector normaliser each was trained with (fine-tuning and inference reuse it)."""
    r = recipe.recipe()
    dataset = tdb.open_dataset(raw_tables.dataset_dir)
    checkpoint = {"recipe": r.model_dump(mode="json"), "column_types": raw_tables.column_types, "objectives": {},
                  "created": context.run_id}
    windows = training_windows(raw_tables, r)
    meta = {"windows": ", ".join(windows)}
    targets = {}
    for entity, defs in traversal_graph.items():
        files = [storage.targets_file(context.partition_key, w, entity) for w in windows]
        missing = [w for w, f in zip(windows, files) if not f.exists()]
        if missing:
            raise dg.Failure(
                description=f"tve_targets of {context.partition_key!r} missing for {len(missing)} of {len(windows)} "
                f"training windows ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}): materialise them first"
            )
        frames = [pd.read_parquet(f) for f in files]
        stale = [w for w, f in zip(windows, frames) if not {d["name"] for d in defs} <= set(f.columns)]
        if stale:
            raise dg.Failure(
                description=f"tve_targets of {context.partition_key!r} for {', '.join(stale[:4])} were computed "
                "with another traversal graph: re-materialise them"
            )
        targets[entity] = pd.concat(frames, ignore_index=True).sort_values("timestamp", kind="stable").reset_index(drop=True)
    data, col_stats = _graph(storage, raw_tables, dataset, r)
    for objective in r.pretrain.objectives:
        checkpoint["objectives"][objective] = {}
        with mlflow.run(context, f"pretrain {objective}") as run:
            run.log_params({"objective": objective, "profile": r.profile,
                            **{f"pretrain.{k}": v for k, v in r.pretrain.model_dump().items()},
                            **{f"backbone.{k}": v for k, v in r.backbone.model_dump().items()}})
            for entity, defs in traversal_graph.items():
                raw = targets[entity]
                context.log.info(f"pre-training {objective} on {entity}: {len(raw)} seeds, {len(defs)} targets")
                try:
                    result = training.pretrain(
                        data, col_stats, entity, dataset.manifest.tables[entity].pkey, raw,
                        {d["name"]: d["aggregation"] for d in defs}, r, device.torch_device(),
                        log=lambda m, step, e=entity: run.log_metrics({f"{e}.{k}": v for k, v in m.items()}, step),
                        objective=objective,
                        checkpoint=training.Checkpointer(
                            storage.checkpoint_file("pretrained_checkpoint", context.partition_key, f"{objective}-{entity}"),
                            r.checkpoint_every,
                            key=f"{raw_tables.fingerprint}:{r.model_dump_json()}",
                        ),
                    )
                except ValueError as exc:
                    raise _fail(exc) from exc
                checkpoint["objectives"][objective][entity] = result
                meta[f"{objective}_{entity}_seeds"] = len(raw)
                meta[f"{objective}_{entity}_best_epoch"] = result["best_epoch"]
                meta[f"{objective}_{entity}_best_val_loss"] = result["best_val_loss"]
            run.log_torch({e: v["backbone"] for e, v in checkpoint["objectives"][objective].items()}, "backbone.pt")
            meta[f"{objective}_mlflow_run_id"] = run.run_id
    return dg.Output(checkpoint, metadata=meta)


def _task_of(context, raw_tables, recipe, *, with_test_labels: bool = False):
    """The task of this partition and its tables (restricted when the recipe says so).

    The test table is RelBench's masked one (entity + seed time); ``with_test_labels``
    adds the labelled test table under ``"test_labels"``, for the evaluator only.
    """
    keys = context.partition_key.keys_by_dimension
    if keys["task"] not in raw_tables.task_names:
        raise dg.Failure(
            description=f"database {keys['database']!r} has no task {keys['task']!r}; "
            f"its tasks: {', '.join(raw_tables.task_names) or '(none)'}"
        )
    dataset = tdb.open_dataset(raw_tables.dataset_dir)
    task = dataset.load_task(keys["task"])
    db = task.get_db(upto_test_timestamp=False)
    tables = {split: task.get_table(split, db=db) for split in ("train", "val", "test")}
    if with_test_labels:
        tables["test_labels"] = task.get_table("test", mask_input_cols=False, db=db)
    k = recipe.finetune.restrict_top_k
    if k is not None:
        frames = {n: t.df for n, t in db.table_dict.items()}
        for name, table in tables.items():
            activity = past_activity(table.df, frames, dataset.manifest.tables, task.entity_table,
                                     task.entity_col, task.time_col, task.timedelta)
            table.df = restrict_to_most_active(table.df, activity, task.entity_col, task.time_col, k).reset_index(drop=True)
    return dataset, task, tables


@dg.asset(
    partitions_def=database_task_partitions,
    ins={
        "raw_tables": dg.AssetIn(partition_mapping=by_database),
        "pretrained_checkpoint": dg.AssetIn(partition_mapping=by_database),
    },
    group_name="learning",
    kinds={"pytorch", "mlflow"},
    pool="gpu",
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
    dataset, task, tables = _task_of(context, raw_tables, r)
    data, col_stats = _graph(storage, raw_tables, dataset, r)
    backbones = {"scratch": None}
    for objective, by_entity in pretrained_checkpoint["objectives"].items():
        if task.entity_table in by_entity:
            backbones[objective] = by_entity[task.entity_table]["backbone"]
        else:
            context.log.warning(f"no {objective} backbone for entity table {task.entity_table!r}: skipping it")
    models, meta = {}, {"n_train": len(tables["train"].df), "n_val": len(tables["val"].df), "n_test": len(tables["test"].df)}
    for method, backbone in backbones.items():
        for fraction in r.finetune.label_fractions:
            for seed in r.finetune.seeds:
                name = f"{method} frac={fraction:g} seed={seed}"
                with mlflow.run(context, f"finetune {name}") as run:
                    run.log_params({"method": method, "seed": seed, "label_fraction": fraction,
                                    **{f"finetune.{k}": v for k, v in r.finetune.model_dump().items()}})
                    result = training.finetune(
                        data, col_stats, task, tables, r, device.torch_device(), seed=seed, label_fraction=fraction,
                        backbone=backbone, log=run.log_metrics,
                        checkpoint=training.Checkpointer(
                            storage.checkpoint_file("finetuned_models", context.partition_key, name.replace(" ", "_")),
                            r.checkpoint_every,
                            # a new pre-trained backbone makes an old fine-tuning checkpoint stale
                            key=f"{raw_tables.fingerprint}:{r.model_dump_json()}:{pretrained_checkpoint.get('created', '')}",
                        ),
                    )
                    run.log_torch(result["state_dict"], "model.pt")
                    result["mlflow_run_id"] = run.run_id
                models[(method, fraction, seed)] = result
                for k, v in result["val_metrics"].items():
                    meta[f"{name} val_{k}"] = float(v)
    return dg.Output(models, metadata=meta)


@dg.asset(
    partitions_def=database_task_partitions,
    ins={"raw_tables": dg.AssetIn(partition_mapping=by_database)},
    group_name="learning",
    kinds={"mlflow"},
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
    dataset, task, tables = _task_of(context, raw_tables, r, with_test_labels=True)
    data, col_stats = _graph(storage, raw_tables, dataset, r)
    keys = context.partition_key.keys_by_dimension
    rows = []
    with mlflow.run(context, "metrics") as run:
        for (method, fraction, seed), model in finetuned_models.items():
            scores = training.evaluate(data, col_stats, task, tables, model["state_dict"], r, device.torch_device(), seed=seed,
                                         output_range=model.get("output_range"))
            for split, values in scores.items():
                for metric, value in values.items():
                    rows.append({"database": keys["database"], "task": keys["task"], "method": method,
                                 "label_fraction": fraction, "seed": seed,
                                 "split": split, "metric": metric, "value": float(value)})
                    run.log_metrics({f"{method}.frac{fraction:g}.seed{seed}.{split}.{metric}": value})
        meta_run = run.run_id
    frame = pd.DataFrame(rows)
    summary = (frame.groupby(["label_fraction", "method", "split", "metric"])["value"].agg(["mean", "std", "count"]).reset_index()
               if len(frame) else frame)
    return dg.Output(
        frame,
        metadata={"mlflow_run_id": meta_run, "summary": dg.MetadataValue.md(summary.to_markdown(index=False))},
    )
