"""TVE targets: raw next-window task vectors for the training seed times of one window.

They are written as plain parquet (``targets/<database>/<window>/<entity>.parquet``), one
file per entity table, atomically; the checkpoint asset reads exactly the windows that
hold training seed times and refuses to train when one is missing, instead of loading
every one of the ~900 monthly partitions of a database and silently skipping gaps.
"""

import os

import dagster as dg
import pandas as pd

from assets.database_assets import _fail, database_timedelta
from assets.partitions import by_database, database_window_partitions
from resources import RecipeResource, TVEStorage
from tve_pipeline import database as tdb
from tve_pipeline.targets import compute_targets
from tve_pipeline.traversal import TargetDef


def write_parquet_atomic(frame: pd.DataFrame, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


@dg.asset(
    partitions_def=database_window_partitions,
    ins={
        "raw_tables": dg.AssetIn(partition_mapping=by_database),
        "traversal_graph": dg.AssetIn(partition_mapping=by_database),
    },
    group_name="targets",
    kinds={"duckdb", "parquet"},
)
def tve_targets(
    context: dg.AssetExecutionContext,
    raw_tables,
    traversal_graph,
    temporal_windows,
    recipe: RecipeResource,
    storage: TVEStorage,
) -> dg.MaterializeResult:
    """Raw task vectors per entity table for this window's *training* seed times.

    Only training seeds: their windows end by the validation timestamp, so pre-training
    never reads past it. A window without training seed times writes nothing (and says so).
    """
    r = recipe.recipe()
    keys = context.partition_key.keys_by_dimension
    seeds = temporal_windows[temporal_windows["split"] == "train"]["timestamp"]
    delta = database_timedelta(raw_tables, r)
    meta = {"timedelta": str(delta), "num_seed_times": len(seeds)}
    if len(seeds) == 0:
        meta["note"] = "no training seed time in this window"
        return dg.MaterializeResult(metadata=meta)
    dataset = tdb.open_dataset(raw_tables.dataset_dir)
    db = dataset.get_db()
    tables = {name: t.df for name, t in db.table_dict.items()}
    for entity, defs in traversal_graph.items():
        try:
            frame = compute_targets(
                tables,
                dataset.manifest.tables,
                [TargetDef.from_dict(d) for d in defs],
                entity,
                pd.DatetimeIndex(seeds),
                delta,
                memory_limit=r.targets.duckdb_memory_limit,
            )
        except ValueError as exc:
            raise _fail(exc) from exc
        path = storage.targets_file(keys["database"], keys["window"], entity)
        write_parquet_atomic(frame, path)
        meta[f"{entity}_path"] = dg.MetadataValue.path(str(path))
        meta[f"{entity}_rows"] = len(frame)
        meta[f"{entity}_inactive_rate"] = float(frame["inactive"].mean()) if len(frame) else 0.0
        if len(frame):
            meta[f"{entity}_preview"] = dg.MetadataValue.md(frame.head(5).to_markdown(index=False))
    return dg.MaterializeResult(metadata=meta)
