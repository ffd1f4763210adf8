"""TVE targets: the raw next-window task vectors of one database, one partition per window.

A window partition is a training or val seed time ``t``; its value is one parquet file per entity
table (``targets/<database>/<window>/<entity>.parquet``). A backfill of many windows runs
as one run (``BackfillPolicy.single_run``): the tables are loaded once and one streamed
query computes every window's rows, each window written to its own file atomically
(``write_targets_by_seed_time``), not a process start or a query per window; each
window's materialisation still carries that window's own counts (seeds, active share),
recorded in window order, so the asset's plots are a trend over windows. Downstream
assets receive the files through the :class:`TaskVectorFiles` IO manager, so Dagster knows
which windows a checkpoint read.
"""

from pathlib import Path

import dagster as dg
from dagster._core.definitions.partitions.subset.default import DefaultPartitionsSubset

from assets.database_assets import database_timedelta, sql_markdown
from assets.failures import failure
from assets.metadata import table
from assets.partitions import window_partitions
from assets.registry import Database
from resources import RecipeResource, TVEStorage
from tve_pipeline.config import recipe_version
from tve_pipeline.database import open_dataset, table_files
from tve_pipeline.target_summary import summarise_targets
from tve_pipeline.targets import TargetQuery, targets_script, write_targets_by_seed_time
from tve_pipeline.traversal import TargetDef
from tve_pipeline.windows import window_seed_time

DATABASE_METADATA = "tve/database"


class _InWindowOrder(DefaultPartitionsSubset):
    """Window keys that list in window order (they sort as dates: ``2013-03-04``,
    ``2013-03-04T12:00:00``)."""

    def get_partition_keys(self):
        return sorted(self.subset)


def _materialise_in_window_order(context: dg.OutputContext) -> None:
    """Dagster 1.13 records one materialisation per partition of a multi-partition output in
    the order of its partition subset, a Python set for dynamic partitions
    (``execute_step._get_output_asset_events`` over ``OutputContext.asset_partition_keys``),
    so a backfill's windows would land in the event log in random order. This context is
    the one those events are made from, after ``handle_output``: its subset is swapped for
    the same windows listed in order. Anything else (a Dagster that builds it otherwise)
    is left as it is."""
    subset = getattr(context, "_asset_partitions_subset", None)
    if type(subset) is DefaultPartitionsSubset:
        context._asset_partitions_subset = _InWindowOrder(subset.subset)


class TaskVectorFiles(dg.ConfigurableIOManager):
    """The window folders of ``tve_targets``: written by the asset, handed downstream as paths.

    ``load_input`` returns ``{window: folder}`` for every window the downstream asset maps
    to; the reader checks that the windows it needs are there (the windows of a database's
    current seed schedule: a registered window may have left it when the splits moved).
    """

    run_dir: str

    def folder(self, database: str, window: str) -> Path:
        return Path(self.run_dir) / "targets" / database / window

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        missing = [
            w
            for w in (obj or {})
            if not self.folder(context.definition_metadata[DATABASE_METADATA], w).is_dir()
        ]
        if missing:
            raise failure(f"tve_targets wrote no files for windows {', '.join(missing[:4])}")
        _materialise_in_window_order(context)

    def load_input(self, context: dg.InputContext) -> dict[str, Path]:
        database = context.upstream_output.definition_metadata[DATABASE_METADATA]
        return {w: self.folder(database, w) for w in context.asset_partition_keys}


def window_metadata(graph: dict, stats: dict) -> dict:
    """One window's own numbers (``stats``: entity -> ``{"rows", "inactive"}`` of that
    window), added to that partition's materialisation alone: its seeds (one row each:
    own time ``<= t``, or first fact row ``<= t + Δ``, as the reference's "universal"
    table), the active share, per entity table in ``by_entity``."""
    rows = sum(s["rows"] for s in stats.values())
    inactive = sum(s["inactive"] for s in stats.values())

    def share(active: int, total: int) -> float:
        return active / total if total else 0.0

    return {
        "rows": rows,
        "dagster/row_count": rows,
        "inactive_rate": share(inactive, rows),
        "active_share": share(rows - inactive, rows),
        "by_entity": table(
            [
                {
                    "entity": e,
                    "targets": len(graph[e]),
                    "seeds": s["rows"],
                    "active": s["rows"] - s["inactive"],
                    "active_share": share(s["rows"] - s["inactive"], s["rows"]),
                }
                for e, s in stats.items()
            ],
            {
                "entity": "string",
                "targets": "int",
                "seeds": "int",
                "active": "int",
                "active_share": "float",
            },
            {
                "seeds": "(entity, seed time) rows: own time <= t, or (a table without time) "
                "first row in a first-hop fact table <= t + Δ",
                "active": "seeds with a next-window row on some path (inactive = 0)",
            },
        ),
    }


def tve_targets_metadata(
    graph: dict,
    scripts: dict,
    files: dict,
    *,
    windows: list[str],
    timedelta,
    folder: Path,
) -> dict:
    """What a run's windows share, under fixed keys: every target with what its values
    look like over the run's windows (``target_values``) and the DuckDB script of this
    run; each window's own counts are :func:`window_metadata`'s."""
    values = [
        {"entity": entity, "aggregation": d["aggregation"], **summary}
        for entity, defs in graph.items()
        for d, summary in zip(defs, summarise_targets(files[entity], [d["name"] for d in defs]))
    ]
    return {
        "timedelta": str(timedelta),
        "num_windows": len(windows),
        "first_window": windows[0],
        "last_window": windows[-1],
        "targets": sum(len(d) for d in graph.values()),
        "target_values": table(
            values,
            {
                "entity": "string",
                "target": "string",
                "aggregation": "string",
                "active_rows": "int",
                "non_null": "int",
                "mean": "float",
                "min": "string",
                "max": "string",
            },
            {
                "active_rows": "rows of this run's windows with a next-window row (inactive = 0)",
                "non_null": "active rows where the target has a value",
            },
        ),
        "sql": dg.MetadataValue.md(
            sql_markdown(
                scripts,
                "The DuckDB script of each entity table's raw task vectors for this run's "
                "windows: a view per table over its parquet file, the seed times, the query. "
                "It runs as it is (`duckdb < targets.sql`) and gives the rows written here.",
            )
        ),
        "folder": dg.MetadataValue.path(str(folder)),
    }


def build_target_assets(db: Database, recipe) -> list[dg.AssetsDefinition]:
    @dg.asset(
        key=db.key("tve_targets"),
        partitions_def=window_partitions(db.name),
        backfill_policy=dg.BackfillPolicy.single_run(),
        ins={
            name: dg.AssetIn(key=db.key(name))
            for name in ("raw_tables", "traversal_graph", "temporal_windows")
        },
        group_name=db.group,
        kinds={"duckdb", "parquet"},
        io_manager_key="task_vector_files",
        metadata={DATABASE_METADATA: db.name},
        code_version=recipe_version(recipe, "targets"),
    )
    def tve_targets(
        context: dg.AssetExecutionContext,
        raw_tables,
        traversal_graph,
        temporal_windows,
        recipe: RecipeResource,
        storage: TVEStorage,
    ) -> dg.Output:
        """Raw task vectors per entity table at each window's seed time: the next-window
        set aggregations of every traversal path (DuckDB), plus ``inactive``."""
        r = recipe.recipe()
        windows = sorted(context.partition_keys)
        scheduled = set(temporal_windows["window"].dropna())
        gone = [w for w in windows if w not in scheduled]
        if gone:
            raise failure(
                f"window {gone[0]} is not a training or validation seed time of {db.name!r} "
                "any more (its seed schedule changed): materialise temporal_windows and the "
                "new windows"
            )
        delta = database_timedelta(raw_tables, r)
        dataset = open_dataset(raw_tables.dataset_dir)
        try:  # DuckDB reads the parquet files: nothing in pandas; beyond memory, it spills
            tables = table_files(dataset)
        except ValueError as exc:
            raise failure(exc) from exc
        stats = {}  # window -> entity -> {"rows", "inactive"}
        scripts = {}
        seed_times = {window_seed_time(w): w for w in windows}
        for entity, defs in traversal_graph.items():
            try:
                query = TargetQuery(
                    tables,
                    dataset.manifest.tables,
                    [TargetDef.from_dict(d) for d in defs],
                    entity,
                    list(seed_times),
                    delta,
                    memory_limit=r.targets.memory_limit,
                    second_hop_window=r.targets.second_hop_delta(),
                )
                by_time = write_targets_by_seed_time(
                    query, lambda t, e=entity: storage.targets_file(db.name, seed_times[t], e)
                )
                scripts[entity] = targets_script(query)
            except ValueError as exc:
                raise failure(exc) from exc
            for t, counts in by_time.items():
                stats.setdefault(seed_times[t], {})[entity] = counts
            rows = sum(v["rows"] for v in by_time.values())
            active = rows - sum(v["inactive"] for v in by_time.values())
            context.log.info(
                f"tve_targets {db.name} {entity}: {len(windows)} windows, {rows} seed rows,"
                f" {active / rows if rows else 0.0:.1%} active"
            )
        # A backfill is one run: each window's materialisation carries its own counts
        for w in windows:
            context.add_asset_metadata(
                window_metadata(traversal_graph, stats.get(w, {})), partition_key=w
            )
        entities = list(traversal_graph)
        return dg.Output(
            {w: str(storage.targets_file(db.name, w, "x").parent) for w in windows},
            metadata=tve_targets_metadata(
                traversal_graph,
                scripts,
                {e: [storage.targets_file(db.name, w, e) for w in windows] for e in entities},
                windows=windows,
                timedelta=delta,
                folder=storage.targets_file(db.name, windows[0], "x").parent.parent,
            ),
        )

    return [tve_targets]
