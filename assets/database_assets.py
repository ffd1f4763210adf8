"""Database-level assets: validated tables, seed-time windows and the traversal graph."""

import json

import dagster as dg
import pandas as pd

from assets.partitions import (
    by_database,
    database_partitions,
    database_window_partitions,
    window_bounds,
)
from resources import RecipeResource, TVEStorage
from tve_pipeline import database as tdb
from tve_pipeline.traversal import build_traversal_graph


def _fail(exc: Exception) -> dg.Failure:
    return dg.Failure(description=str(exc).splitlines()[0] if str(exc) else type(exc).__name__, allow_retries=False)


@dg.asset(partitions_def=database_partitions, group_name="database", kinds={"parquet", "duckdb"})
def raw_tables(context: dg.AssetExecutionContext, storage: TVEStorage) -> dg.Output:
    """The database's tables, validated: manifest, keys 0..n-1, time columns, column types."""
    try:
        summary = tdb.summarise_database(storage.dataset_dir(context.partition_key))
    except tdb.DatabaseError as exc:
        raise _fail(exc) from exc
    return dg.Output(
        summary,
        metadata={
            "dataset_dir": dg.MetadataValue.path(summary.dataset_dir),
            "fingerprint": summary.fingerprint,
            "rows": dg.MetadataValue.json(summary.rows),
            "total_rows": sum(summary.rows.values()),
            "time_range": f"{summary.min_timestamp} .. {summary.max_timestamp}",
            "val_timestamp": summary.val_timestamp,
            "test_timestamp": summary.test_timestamp,
            "tasks": ", ".join(summary.task_names),
            "column_types": dg.MetadataValue.json(summary.column_types),
            "changed_rows": dg.MetadataValue.json(summary.changed_rows or {}),
            "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in summary.warnings) or "(none)"),
            "info": dg.MetadataValue.md("\n".join(f"- {i}" for i in summary.info) or "(none)"),
        },
    )


def database_timedelta(summary, recipe) -> pd.Timedelta:
    if recipe.targets.timedelta:
        return pd.Timedelta(recipe.targets.timedelta)
    return tdb.task_timedelta(tdb.open_dataset(summary.dataset_dir))


@dg.asset(
    partitions_def=database_window_partitions,
    ins={"raw_tables": dg.AssetIn(partition_mapping=by_database)},
    group_name="database",
)
def temporal_windows(context: dg.AssetExecutionContext, raw_tables, recipe: RecipeResource) -> dg.Output:
    """The seed times (and their split) that fall in this calendar window."""
    keys = context.partition_key.keys_by_dimension
    start, end = window_bounds(keys["window"])
    try:
        dataset = tdb.open_dataset(raw_tables.dataset_dir)
        delta = database_timedelta(raw_tables, recipe.recipe())
        schedule = tdb.seed_schedule(raw_tables, delta, tdb.num_eval_timestamps(dataset))
    except ValueError as exc:
        raise _fail(exc) from exc
    seeds = schedule[(schedule["timestamp"] >= start) & (schedule["timestamp"] < end)].reset_index(drop=True)
    return dg.Output(
        seeds,
        metadata={
            "timedelta": str(delta),
            "num_seed_times": len(seeds),
            "by_split": dg.MetadataValue.json(seeds["split"].value_counts().to_dict()),
            "seed_times": ", ".join(str(t.date()) for t in seeds["timestamp"]) or "(none in this window)",
        },
    )


@dg.asset(partitions_def=database_partitions, group_name="database")
def traversal_graph(context: dg.AssetExecutionContext, raw_tables, recipe: RecipeResource) -> dg.Output:
    """Target definitions per entity table: schema paths x usable columns x aggregations."""
    r = recipe.recipe()
    dataset = tdb.open_dataset(raw_tables.dataset_dir)
    entities = tdb.task_entity_tables(dataset)
    if not entities:
        raise dg.Failure(description=f"database {context.partition_key!r} has no entity task, so no entity table to pre-train on")
    graph = {}
    try:
        for entity in entities:
            defs = build_traversal_graph(
                dataset.manifest.tables, raw_tables.column_types, entity, hops=r.targets.hops, fact_key_fact=r.targets.fact_key_fact
            )
            graph[entity] = [d.to_dict() for d in defs]
    except ValueError as exc:
        raise _fail(exc) from exc
    preview = "\n".join(
        f"| {entity} | {d['name']} | {' '.join(h['direction'] + ':' + h['table'] for h in d['path'])} | {d['column'] or '*'} | {d['aggregation']} |"
        for entity, defs in graph.items()
        for d in defs
    )
    return dg.Output(
        graph,
        metadata={
            "num_targets": dg.MetadataValue.json({e: len(d) for e, d in graph.items()}),
            "hops": r.targets.hops,
            "targets": dg.MetadataValue.md("| entity | name | path | column | aggregation |\n|---|---|---|---|---|\n" + preview),
            "targets_json": dg.MetadataValue.json(json.loads(json.dumps(graph))),
        },
    )
