"""The growth sensor: databases that gain data get their new windows and targets by themselves.

Every tick it compares a cheap signature of each dataset folder (file names, sizes, times)
with the one it saw last; only a changed folder is read. Then:

- new training seed times (the data grew, or a new split moved the validation timestamp
  on) are registered as window partitions of the database;
- a database whose targets were materialised before gets one run that refreshes its
  tables, seed schedule and traversal graph and computes the new windows' targets;
- a database whose data changed without new windows gets its ``raw_tables`` re-run, so
  that everything computed from the old data shows as stale in the UI;
- a folder the code location does not know yet is reported (reload the code location to
  see its assets; its windows are registered already).
"""

import json
from pathlib import Path

import dagster as dg

from assets.database_assets import pretraining_windows
from assets.failures import one_line
from assets.partitions import contiguous_ranges, window_partitions, windows_name
from assets.registry import ADD_YOUR_OWN, Database, dataset_folders, folder_signature
from resources import RecipeResource, TVEStorage
from tve_pipeline.summary import summarise_database

DATA_VERSION_TAG = "dagster/data_version"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def _last_data_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    event = instance.get_latest_materialization_event(key)
    return (
        event.asset_materialization.tags.get(DATA_VERSION_TAG)
        if event and event.asset_materialization
        else None
    )


def targets_job_name(db: Database) -> str:
    return f"{db.group}__refresh_targets"


def build_targets_job(db: Database):
    """A database's tables, seed schedule, traversal graph and the targets of some windows:
    what the sensor runs when the database grows (one run for all its new windows)."""
    return dg.define_asset_job(
        targets_job_name(db),
        selection=[
            db.key(a) for a in ("raw_tables", "temporal_windows", "traversal_graph", "tve_targets")
        ],
        partitions_def=window_partitions(db.name),
        description=f"refresh {db.name}'s tables and compute the task vectors of some of its "
        f"windows (the growth sensor's runs; `tve run`'s runs of tve_targets). {ADD_YOUR_OWN}",
    )


def _growth_runs(instance, db: Database, summary, new_windows: list[str]) -> list[dg.RunRequest]:
    """The runs a changed database needs (none before the user materialised it once)."""
    if instance.get_latest_materialization_event(db.key("raw_tables")) is None:
        return []
    if new_windows and instance.get_latest_materialization_event(db.key("tve_targets")) is not None:
        order = list(instance.get_dynamic_partitions(windows_name(db.name))) or new_windows
        selection = [
            db.key(a) for a in ("raw_tables", "temporal_windows", "traversal_graph", "tve_targets")
        ]
        return [
            dg.RunRequest(
                run_key=f"{db.name}:{summary.fingerprint}:{first}",
                job_name=targets_job_name(db),
                asset_selection=selection,
                tags={RANGE_START_TAG: first, RANGE_END_TAG: last},
            )
            for first, last in contiguous_ranges(
                new_windows, order + [w for w in new_windows if w not in order]
            )
        ]
    if _last_data_version(instance, db.key("raw_tables")) != summary.fingerprint:
        return [
            dg.RunRequest(
                run_key=f"{db.name}:{summary.fingerprint}",
                job_name=targets_job_name(db),
                asset_selection=[db.key("raw_tables")],
            )
        ]
    return []


def evaluate_growth(
    instance: dg.DagsterInstance,
    datasets_dir: Path,
    recipe,
    known: dict[str, Database],
    cursor: dict,
) -> tuple[dict, list, list[dg.RunRequest], list[str]]:
    """One tick: (new cursor, dynamic-partition requests, run requests, messages)."""
    cursor, add_requests, runs, messages = dict(cursor), [], [], []
    for name in dataset_folders(datasets_dir):
        folder = Path(datasets_dir) / name
        signature = folder_signature(folder)
        if cursor.get(name) == signature:
            continue
        cursor[name] = signature
        try:
            summary = summarise_database(folder)
            windows = pretraining_windows(summary, recipe)
        except (
            ValueError
        ) as exc:  # a folder being edited or broken: say so, try again when it changes
            messages.append(f"{name}: {one_line(exc)}")
            continue
        have = set(instance.get_dynamic_partitions(windows_name(name)))
        new = [w for w in windows if w not in have]
        if new:
            add_requests.append(window_partitions(name).build_add_request(new))
            messages.append(f"{name}: {len(new)} new windows ({new[0]} .. {new[-1]})")
        if name in known:
            runs += _growth_runs(instance, known[name], summary, new)
        else:
            messages.append(
                f"{name}: new database folder; reload the code location to see its assets"
            )
    return cursor, add_requests, runs, messages


def build_growth_sensor(databases: list[Database], jobs: list) -> dg.SensorDefinition:
    known = {db.name: db for db in databases}

    @dg.sensor(
        name="database_growth_sensor",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=jobs or None,
    )
    def database_growth_sensor(
        context: dg.SensorEvaluationContext, storage: TVEStorage, recipe: RecipeResource
    ):
        """Registers the windows of databases that grew and materialises their targets."""
        cursor, add_requests, runs, messages = evaluate_growth(
            context.instance,
            storage.datasets_dir,
            recipe.recipe(),
            known,
            json.loads(context.cursor or "{}"),
        )
        for message in messages:
            context.log.info(message)
        if not (add_requests or runs):
            context.update_cursor(json.dumps(cursor))
            return dg.SkipReason(
                "; ".join(messages) or f"no database in {storage.datasets_dir} changed"
            )
        return dg.SensorResult(
            run_requests=runs, dynamic_partitions_requests=add_requests, cursor=json.dumps(cursor)
        )

    return database_growth_sensor
