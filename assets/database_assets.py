"""Database-level assets of one database: validated tables, its seed schedule, its traversal
graph."""

import hashlib
import json

import dagster as dg
import pandas as pd

from assets.failures import failure
from assets.metadata import code, png_markdown, table
from assets.registry import Database, register_windows
from resources import RecipeResource, TVEStorage
from tve_pipeline.config import recipe_version
from tve_pipeline.database import (
    num_eval_timestamps,
    open_dataset,
    table_files,
    task_entity_tables,
    task_timedelta,
)
from tve_pipeline.schema import DatabaseError
from tve_pipeline.schema_diagram import er_diagram, schema_png
from tve_pipeline.summary import summarise_database
from tve_pipeline.target_selection import (
    TargetSelection,
    check_picked_entities,
    select_targets,
    traversal_targets,
)
from tve_pipeline.targets import TargetQuery, targets_sql
from tve_pipeline.traversal import TargetDef
from tve_pipeline.windows import seed_schedule as database_seed_schedule
from tve_pipeline.windows import window_key

# Bumped when the validation or summary code changes what raw_tables records.
RAW_TABLES_VERSION = "2"


def database_timedelta(summary, recipe) -> pd.Timedelta:
    if recipe.targets.timedelta:
        return pd.Timedelta(recipe.targets.timedelta)
    return task_timedelta(open_dataset(summary.dataset_dir))


#: The splits whose seed times are windows of tve_targets: pre-training trains on the
#: training windows and chooses its checkpoint on the validation ones (the reference's
#: val split of task vectors, src/helpers/task_vector_generation_helper.py:240-254). All
#: the tasks' validation seed times, not only the first: the reference's notebooks take one
#: (num_eval_timestamps = 1, its databases' tasks too), but rel-f1's tasks have 40, and its
#: first window (2005-01-01, 2005-01-31] holds no race: every driver inactive.
WINDOW_SPLITS = ("train", "val")


def seed_schedule(summary, recipe) -> pd.DataFrame:
    """Every seed time of the database with its split (RelBench's layout) and its window key
    (training and validation seed times; test seed times have none)."""
    dataset = open_dataset(summary.dataset_dir)
    schedule = database_seed_schedule(
        summary, database_timedelta(summary, recipe), num_eval_timestamps(dataset)
    )
    schedule["window"] = [
        window_key(t) if s in WINDOW_SPLITS else None
        for t, s in zip(schedule["timestamp"], schedule["split"])
    ]
    return schedule


def pretraining_windows(summary, recipe) -> list[str]:
    """The window keys of a database, oldest first: one per training seed time, then one
    per validation seed time."""
    schedule = seed_schedule(summary, recipe)
    return list(schedule["window"].dropna())


def pruned_targets(summary, schedule, defs, entity: str, recipe) -> TargetSelection:
    """``defs`` less the targets null or constant on every active row of the training seed
    times of ``schedule`` (temporal_windows), computed by the targets engine."""
    dataset = open_dataset(summary.dataset_dir)
    training = schedule.loc[schedule["split"] == "train", "timestamp"]
    chosen = select_targets(
        TargetQuery(
            table_files(dataset),
            dataset.manifest.tables,
            defs,
            entity,
            list(training),
            database_timedelta(summary, recipe),
            memory_limit=recipe.targets.memory_limit,
        )
    )
    if defs and not chosen.kept:
        raise ValueError(
            f"entity table {entity!r}: every one of its {len(defs)} targets is null or constant "
            f"on the active rows of the {len(training)} training seed times"
        )
    return chosen


def raw_tables_metadata(summary) -> dict:
    """The schema as an image and as Mermaid source, the row count of every table, the
    checks' notes."""
    tables = open_dataset(summary.dataset_dir).manifest.tables
    counts = [
        {
            "table": name,
            "rows": summary.rows.get(name, 0),
            "columns": len(summary.column_types.get(name, {})),
            "primary_key": spec.pkey or "",
            "time_column": spec.time_col or "",
            "foreign_keys": ", ".join(f"{c} -> {p}" for c, p in spec.fkeys.items()),
        }
        for name, spec in tables.items()
    ]
    total = sum(summary.rows.values())
    return {
        "dataset_dir": dg.MetadataValue.path(summary.dataset_dir),
        "fingerprint": summary.fingerprint,
        "rows": total,
        "dagster/row_count": total,
        "tables": len(tables),
        "row_counts": table(
            counts,
            {
                "table": "string",
                "rows": "int",
                "columns": "int",
                "primary_key": "string",
                "time_column": "string",
                "foreign_keys": "string",
            },
        ),
        "schema": dg.MetadataValue.md(
            code(er_diagram(tables, summary.column_types), "mermaid")
            + "\n\nMermaid source of the schema (GitHub and mermaid.live draw it): a table per "
            'entity, PK/FK marking keys, `"time"` the time column, a line per foreign key.'
        ),
        "schema_image": dg.MetadataValue.md(
            png_markdown(schema_png(tables, summary.column_types), "schema")
        ),
        "time_range": f"{summary.min_timestamp} .. {summary.max_timestamp}",
        "val_timestamp": summary.val_timestamp,
        "test_timestamp": summary.test_timestamp,
        "tasks": ", ".join(summary.task_names),
        "column_types": dg.MetadataValue.json(summary.column_types),
        "changed_rows": dg.MetadataValue.json(summary.changed_rows or {}),
        "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in summary.warnings) or "(none)"),
        "info": dg.MetadataValue.md("\n".join(f"- {i}" for i in summary.info) or "(none)"),
    }


#: The generated SQL shown per entity table, at most (a 2-hop graph of a wide database can
#: reach hundreds of kilobytes; `tve targets --show-sql` prints all of it).
SQL_SHOWN_CHARS = 100_000


def sql_markdown(sql: dict[str, str], note: str) -> str:
    """Each entity table's SQL as a ```sql block under its name, after ``note``."""
    blocks = []
    for entity, text in sql.items():
        if len(text) > SQL_SHOWN_CHARS:
            text = (
                text[:SQL_SHOWN_CHARS]
                + f"\n-- ... {len(text) - SQL_SHOWN_CHARS} more characters: "
                + f"tve targets DATASET_DIR --entity {entity} --show-sql"
            )
        blocks.append(code(text, "sql", heading=entity))
    return "\n\n".join([note, *blocks])


def traversal_graph_metadata(
    graph: dict,
    sql: dict[str, str],
    recipe,
    left_out: dict | None = None,
    seconds: dict | None = None,
) -> dict:
    """The targets: counted, listed (entity, name, path, column, aggregation), and as SQL;
    the ones left out (null or constant on the active training rows) with the reason."""
    left_out, seconds = left_out or {}, seconds or {}
    dropped = [{"entity": e, **row} for e, rows in left_out.items() for row in rows]
    listed = [
        {
            "entity": entity,
            "target": d["name"],
            "path": entity
            + "".join(
                f" {'<-' if h['direction'] == 'in' else '->'} {h['table']}[{h['via']}]"
                for h in d["path"]
            ),
            "column": d["column"] or "*",
            "aggregation": d["aggregation"],
        }
        for entity, defs in graph.items()
        for d in defs
    ]
    by_entity = [
        {
            "entity": entity,
            "targets": len(defs),
            "paths": len({tuple(tuple(sorted(h.items())) for h in d["path"]) for d in defs}),
            "left_out": len(left_out.get(entity, ())),
            "profile_seconds": round(seconds.get(entity, 0.0), 2),
        }
        for entity, defs in graph.items()
    ]
    return {
        "targets": len(listed),
        "entity_tables": len(graph),
        "hops": recipe.targets.hops,
        "left_out": len(dropped),
        "by_entity": table(
            by_entity,
            {
                "entity": "string",
                "targets": "int",
                "paths": "int",
                "left_out": "int",
                "profile_seconds": "float",
            },
            {
                "left_out": "targets null or constant on every active training row",
                "profile_seconds": "computing the targets over the training seed times to "
                "find them",
            },
        ),
        "left_out_targets": table(
            dropped,
            {"entity": "string", "target": "string", "aggregation": "string", "reason": "string"},
            {"reason": "over the active rows (inactive = 0) of every training seed time"},
        ),
        "target_list": table(
            listed,
            {
                "entity": "string",
                "target": "string",
                "path": "string",
                "column": "string",
                "aggregation": "string",
            },
            {
                "path": "entity <- TABLE[FKEY]: rows of TABLE whose FKEY references the "
                "previous row; -> TABLE[FKEY]: the TABLE row the previous row's FKEY references"
            },
        ),
        "sql": dg.MetadataValue.md(
            sql_markdown(
                sql,
                "The DuckDB query of each entity table's raw task vectors. It reads every "
                "table as a relation of its name and the seed times as "
                "`timestamps(timestamp)`; `tve_targets` shows it as a script over the "
                "parquet files that runs as it is.",
            )
        ),
        "targets_json": dg.MetadataValue.json(json.loads(json.dumps(graph))),
    }


def build_database_assets(db: Database, recipe) -> list[dg.AssetsDefinition]:
    targets_version = recipe_version(recipe, "targets")

    @dg.asset(
        key=db.key("raw_tables"),
        group_name=db.group,
        kinds={"parquet", "duckdb"},
        code_version=RAW_TABLES_VERSION,
    )
    def raw_tables(context: dg.AssetExecutionContext, storage: TVEStorage) -> dg.Output:
        """The database's tables, validated: manifest, keys 0..n-1, time columns, column types.
        Its data version is the fingerprint of the dataset folder: new data makes everything
        downstream stale."""
        try:
            summary = summarise_database(storage.dataset_dir(db.name))
        except DatabaseError as exc:
            raise failure(exc) from exc
        return dg.Output(
            summary,
            data_version=dg.DataVersion(summary.fingerprint),
            metadata=raw_tables_metadata(summary),
        )

    @dg.asset(
        key=db.key("temporal_windows"),
        ins={"raw_tables": dg.AssetIn(key=db.key("raw_tables"))},
        group_name=db.group,
        code_version=targets_version,
    )
    def temporal_windows(
        context: dg.AssetExecutionContext, raw_tables, recipe: RecipeResource
    ) -> dg.Output:
        """Every seed time of the database with its split; each training or validation seed
        time is one window partition of tve_targets (registered here if the data grew)."""
        run_recipe = recipe.recipe()
        try:
            schedule = seed_schedule(raw_tables, run_recipe)
        except ValueError as exc:
            raise failure(exc) from exc
        windows = list(schedule["window"].dropna())
        added = register_windows(context.instance, db.name, windows)
        return dg.Output(
            schedule,
            metadata={
                "timedelta": str(database_timedelta(raw_tables, run_recipe)),
                "num_seed_times": len(schedule),
                "num_windows": len(windows),
                "windows_added": len(added),
                "by_split": dg.MetadataValue.json(schedule["split"].value_counts().to_dict()),
                "first_window": windows[0] if windows else "(none)",
                "last_window": windows[-1] if windows else "(none)",
            },
        )

    @dg.asset(
        key=db.key("traversal_graph"),
        ins={
            "raw_tables": dg.AssetIn(key=db.key("raw_tables")),
            "temporal_windows": dg.AssetIn(key=db.key("temporal_windows")),
        },
        group_name=db.group,
        code_version=targets_version,
    )
    def traversal_graph(
        context: dg.AssetExecutionContext, raw_tables, temporal_windows, recipe: RecipeResource
    ) -> dg.Output:
        """Target definitions per entity table: schema paths x usable columns x aggregations
        (or the recipe's hand-picked set), less those null or constant on every active
        training row (found by running the targets over the training seed times)."""
        run_recipe = recipe.recipe()
        dataset = open_dataset(raw_tables.dataset_dir)
        entities = task_entity_tables(dataset)
        if not entities:
            raise failure(
                f"database {db.name!r} has no entity task, so no entity table to pre-train on"
            )
        graph, left_out, seconds = {}, {}, {}
        try:
            check_picked_entities(run_recipe.targets.select or {}, entities)
            for entity in entities:
                defs = traversal_targets(
                    dataset.manifest.tables, raw_tables.column_types, entity, run_recipe.targets
                )
                if run_recipe.targets.prune:
                    chosen = pruned_targets(raw_tables, temporal_windows, defs, entity, run_recipe)
                    defs, left_out[entity], seconds[entity] = (
                        chosen.kept,
                        chosen.left_out,
                        chosen.seconds,
                    )
                    context.log.info(
                        f"traversal_graph {db.name} {entity}: {len(defs)} targets kept, "
                        f"{len(chosen.left_out)} left out ({chosen.seconds:.1f}s)"
                    )
                graph[entity] = [d.to_dict() for d in defs]
        except ValueError as exc:
            raise failure(exc) from exc
        try:  # the SQL is shown, not run: without a Δ the graph stands and the UI says why
            delta = database_timedelta(raw_tables, run_recipe)
            sql = {
                entity: targets_sql(
                    dataset.manifest.tables, [TargetDef.from_dict(d) for d in defs], entity, delta
                )
                for entity, defs in graph.items()
            }
        except ValueError as exc:
            sql = {entity: f"-- no SQL: {str(exc).splitlines()[0]}" for entity in graph}
        # The graph now depends on the data (what is pruned): its data version is its content,
        # so that new rows that prune the same targets leave every window's targets fresh.
        content = hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()[:16]
        return dg.Output(
            graph,
            data_version=dg.DataVersion(content),
            metadata=traversal_graph_metadata(graph, sql, run_recipe, left_out, seconds),
        )

    return [raw_tables, temporal_windows, traversal_graph]
