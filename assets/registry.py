"""Databases become partitions: a dataset folder in the run folder's ``datasets/`` is a database.

Registration adds the database key and its task names to the dynamic partitions; the
sensor does it for every folder dropped into ``datasets/``, ``tve register`` for one.
"""

from pathlib import Path

import dagster as dg
import yaml

from assets.partitions import database_partitions, task_partitions
from resources import TVEStorage


def dataset_folders(datasets_dir: Path) -> dict[str, list[str]]:
    """Database name -> task names, for every dataset folder under ``datasets_dir``."""
    out = {}
    for path in sorted(Path(datasets_dir).glob("*/manifest.yaml")):
        if path.parent.name.startswith("."):
            continue  # a dataset being written or swapped in (see datasets.writer)
        tasks = sorted(p.parent.name for p in path.parent.glob("tasks/*/manifest.yaml"))
        out[path.parent.name] = tasks
    return out


def register(instance: dg.DagsterInstance, databases: dict[str, list[str]]) -> list[str]:
    """Add database and task keys not yet registered; returns what was added."""
    added = []
    have_db = set(instance.get_dynamic_partitions(database_partitions.name))
    have_task = set(instance.get_dynamic_partitions(task_partitions.name))
    new_db = [d for d in databases if d not in have_db]
    new_task = sorted({t for ts in databases.values() for t in ts} - have_task)
    if new_db:
        instance.add_dynamic_partitions(database_partitions.name, new_db)
        added += new_db
    if new_task:
        instance.add_dynamic_partitions(task_partitions.name, new_task)
        added += new_task
    return added


def check_folder_name(dataset_dir: Path) -> str:
    """A database key is its folder name; it must be a valid partition key."""
    name = Path(dataset_dir).name
    bad = set("|[],") & set(name)
    if bad or not name:
        raise ValueError(f"dataset folder name {name!r} cannot be a partition key (contains {''.join(sorted(bad))})")
    manifest = yaml.safe_load((Path(dataset_dir) / "manifest.yaml").read_text())
    if not isinstance(manifest, dict) or "tables" not in manifest:
        raise ValueError(f"{dataset_dir}/manifest.yaml is not a RelBench dataset manifest (no 'tables')")
    return name


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def datasets_folder_sensor(context: dg.SensorEvaluationContext, storage: TVEStorage):
    """Registers every dataset folder dropped into the run folder's ``datasets/``."""
    found = dataset_folders(storage.datasets_dir)
    have_db = set(context.instance.get_dynamic_partitions(database_partitions.name))
    have_task = set(context.instance.get_dynamic_partitions(task_partitions.name))
    new_db = [d for d in found if d not in have_db]
    new_task = sorted({t for ts in found.values() for t in ts} - have_task)
    requests = []
    if new_db:
        requests.append(database_partitions.build_add_request(new_db))
    if new_task:
        requests.append(task_partitions.build_add_request(new_task))
    if not requests:
        return dg.SkipReason(f"no new dataset folder in {storage.datasets_dir}")
    return dg.SensorResult(dynamic_partitions_requests=requests)
