"""TVE targets: raw next-window task vectors for the training seed times of one window."""

import dagster as dg
import pandas as pd

from assets.database_assets import _fail, database_timedelta
from assets.partitions import by_database, database_window_partitions
from resources import RecipeResource
from tve_pipeline import database as tdb
from tve_pipeline.targets import compute_targets
from tve_pipeline.traversal import TargetDef


@dg.asset(
    partitions_def=database_window_partitions,
    ins={
        "raw_tables": dg.AssetIn(partition_mapping=by_database),
        "traversal_graph": dg.AssetIn(partition_mapping=by_database),
    },
    group_name="targets",
    kinds={"duckdb"},
)
def tve_targets(
    context: dg.AssetExecutionContext, raw_tables, traversal_graph, temporal_windows, recipe: RecipeResource
) -> dg.Output:
    """Raw task vectors per entity table for this window's *training* seed times.

    Only training seeds: their windows end by the validation timestamp, so pre-training
    never reads past it. Other windows hold empty frames (and say so).
    """
    r = recipe.recipe()
    seeds = temporal_windows[temporal_windows["split"] == "train"]["timestamp"]
    delta = database_timedelta(raw_tables, r)
    out, meta = {}, {"timedelta": str(delta), "num_seed_times": len(seeds)}
    if len(seeds):
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
            out[entity] = frame
            meta[f"{entity}_rows"] = len(frame)
            meta[f"{entity}_inactive_rate"] = float(frame["inactive"].mean()) if len(frame) else 0.0
            if len(frame):
                meta[f"{entity}_preview"] = dg.MetadataValue.md(frame.head(5).to_markdown(index=False))
    else:
        meta["note"] = "no training seed time in this window"
    return dg.Output(out, metadata=meta)
