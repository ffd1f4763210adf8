"""The code location: each registered database's nine assets, the resources, the growth sensor.

Settings come from the run folder (``TVE_RUN_DIR``, default ``./runs/default``): its
``datasets/`` holds the databases (one asset group per database), its ``recipe.json``
(``{"profile": ..., "overrides": {...}}``) picks the recipe, and its ``mlflow.db`` is the
embedded MLflow store unless ``MLFLOW_TRACKING_URI`` is set.
"""

import json
import os
import warnings
from pathlib import Path

import dagster as dg

from assets.checks import build_checks
from assets.database_assets import build_database_assets
from assets.executors import executor_from_environment
from assets.registry import Database, registered_databases
from assets.sensors import build_growth_sensor, build_targets_job
from assets.target_assets import TaskVectorFiles, build_target_assets
from assets.training_assets import build_training_assets
from resources import (
    AtomicFilesystemIOManager,
    DeviceResource,
    MLflowTracking,
    RecipeResource,
    TVEStorage,
)

# Data versions and single-run backfills are marked beta/preview; they are what we rely on.
for _category in ("BetaWarning", "PreviewWarning", "SupersessionWarning"):
    if hasattr(dg, _category):
        warnings.filterwarnings("ignore", category=getattr(dg, _category))

ASSET_NAMES = (
    "raw_tables",
    "temporal_windows",
    "traversal_graph",
    "tve_targets",
    "pretrained_checkpoint",
    "finetuned_models",
    "metrics",
    "probe_metrics",
    "results",
)


def default_run_dir() -> Path:
    return Path(os.environ.get("TVE_RUN_DIR", Path.cwd() / "runs" / "default")).resolve()


def read_settings(run_dir: Path) -> dict:
    """The run folder's recipe settings (``recipe.json``); the reference recipe without one."""
    settings_file = Path(run_dir) / "recipe.json"
    return json.loads(settings_file.read_text()) if settings_file.exists() else {}


def build_resources(
    run_dir: str | Path,
    *,
    profile: str | None = None,
    overrides: dict | None = None,
    device: str = "auto",
) -> dict:
    run_dir = Path(run_dir).resolve()
    settings = read_settings(run_dir)
    return {
        "storage": TVEStorage(run_dir=str(run_dir)),
        "recipe": RecipeResource(
            profile=profile or settings.get("profile", "reference"),
            overrides_json=json.dumps(
                overrides if overrides is not None else settings.get("overrides", {})
            ),
        ),
        "device": DeviceResource(
            device=os.environ.get("TVE_DEVICE", device),
            threads=int(os.environ.get("TVE_THREADS", "0")),
            processes=int(os.environ.get("TVE_PROCESSES", "1")),
        ),
        "mlflow": MLflowTracking(
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{run_dir}/mlflow.db"),
            artifact_location=(run_dir / "mlartifacts").as_uri(),
        ),
        # pickled asset values; Dagster's FilesystemIOManager writes them in place, not atomically
        "io_manager": AtomicFilesystemIOManager(base_dir=str(run_dir / "storage")),
        "task_vector_files": TaskVectorFiles(run_dir=str(run_dir)),
    }


def database_assets(db: Database, recipe) -> list[dg.AssetsDefinition]:
    """The nine assets of one database, in dependency order."""
    return [
        *build_database_assets(db, recipe),
        *build_target_assets(db, recipe),
        *build_training_assets(db, recipe),
    ]


def database_checks(db: Database, recipe) -> list[dg.AssetChecksDefinition]:
    """The asset checks of one database's assets (:mod:`assets.checks`)."""
    return build_checks(db, recipe)


def build_definitions(run_dir: str | Path | None = None, **kwargs) -> dg.Definitions:
    run_dir = Path(run_dir or default_run_dir()).resolve()
    resources = build_resources(run_dir, **kwargs)
    recipe = resources["recipe"].recipe()
    databases = registered_databases(run_dir / "datasets")
    jobs = [build_targets_job(db) for db in databases]
    return dg.Definitions(
        assets=[a for db in databases for a in database_assets(db, recipe)],
        asset_checks=[c for db in databases for c in database_checks(db, recipe)],
        jobs=jobs,
        sensors=[build_growth_sensor(databases, jobs)],
        resources=resources,
        # A run here is one partition of one or two steps (a window, a checkpoint, a cell);
        # parallelism comes from runs (the run queue and the `gpu` pool), not from steps, so
        # the default is the in-process executor: the multiprocess one would start a Python per
        # step (torch + relbench imports: ~14 s each) and load the graph again in each.
        # TVE_EXECUTOR=celery|k8s sends the steps past one machine (assets/executors.py).
        executor=executor_from_environment(),
    )


defs = build_definitions()
