"""The code location: every asset, resource and sensor of the pipeline.

Settings come from the run folder (``TVE_RUN_DIR``, default ``./runs/default``): its
``recipe.json`` (``{"profile": ..., "overrides": {...}}``) picks the recipe, and its
``mlflow.db`` is the embedded MLflow store unless ``MLFLOW_TRACKING_URI`` is set.
"""

import json
import os
from pathlib import Path

import dagster as dg

from assets.partitions import database_window_partitions
from assets.database_assets import raw_tables, temporal_windows, traversal_graph
from assets.registry import datasets_folder_sensor
from assets.target_assets import tve_targets
from assets.training_assets import finetuned_models, metrics, pretrained_checkpoint
from resources import DeviceResource, MLflowTracking, RecipeResource, TVEStorage

ASSETS = [raw_tables, temporal_windows, traversal_graph, tve_targets, pretrained_checkpoint, finetuned_models, metrics]

# Windows of every registered database, one run per (database, window): what a monthly
# schedule or a UI backfill materialises as new data arrives.
tve_targets_job = dg.define_asset_job(
    "tve_targets_job", selection=[temporal_windows, tve_targets], partitions_def=database_window_partitions
)
tve_targets_schedule = dg.build_schedule_from_partitioned_job(tve_targets_job)


def default_run_dir() -> Path:
    return Path(os.environ.get("TVE_RUN_DIR", Path.cwd() / "runs" / "default")).resolve()


def build_resources(run_dir: str | Path, *, profile: str | None = None, overrides: dict | None = None, device: str = "auto") -> dict:
    run_dir = Path(run_dir).resolve()
    settings_file = run_dir / "recipe.json"
    settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    return {
        "storage": TVEStorage(run_dir=str(run_dir)),
        "recipe": RecipeResource(
            profile=profile or settings.get("profile", "reference"),
            overrides_json=json.dumps(overrides if overrides is not None else settings.get("overrides", {})),
        ),
        "device": DeviceResource(device=os.environ.get("TVE_DEVICE", device), threads=int(os.environ.get("TVE_THREADS", "0"))),
        "mlflow": MLflowTracking(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{run_dir}/mlflow.db")),
        "io_manager": dg.FilesystemIOManager(base_dir=str(run_dir / "storage")),
    }


def build_definitions(run_dir: str | Path | None = None, **kwargs) -> dg.Definitions:
    return dg.Definitions(
        assets=ASSETS,
        jobs=[tve_targets_job],
        schedules=[tve_targets_schedule],
        sensors=[datasets_folder_sensor],
        resources=build_resources(run_dir or default_run_dir(), **kwargs),
    )


defs = build_definitions()
