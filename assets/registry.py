"""Registered databases: the dataset folders of a run folder, and the windows of each.

A database is a RelBench 3 dataset folder in the run folder's ``datasets/``; its folder
name is its name (``tve register`` copies a dataset there under the name its manifest
gives: :func:`database_name`). The code location builds each database's assets when it
loads (a new folder appears after a reload of the code location, which ``tve`` commands
do by themselves); the windows of a database are dynamic partitions, registered from its seed
schedule by ``tve register``, by the ``temporal_windows`` asset and by the growth sensor,
so that a database that grows gets new windows without a reload.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import yaml

from assets.partitions import asset_prefix, windows_name

# what the UI says (on every job's page) about a database of one's own
ADD_YOUR_OWN = (
    "Add your own database: `tve import files SCHEMA_YAML OUT` (or any RelBench dataset "
    "folder), then `tve register OUT --run-dir RUN_DIR` and reload the code location "
    "(Deployment > Reload); README, 'Any database'."
)


@dataclass(frozen=True)
class Database:
    """A registered database as the code location sees it: name, tasks, asset keys."""

    name: str
    tasks: tuple[str, ...]

    @property
    def group(self) -> str:
        return asset_prefix(self.name)

    def key(self, asset: str) -> dg.AssetKey:
        return dg.AssetKey([self.group, asset])


def dataset_folders(datasets_dir: Path) -> dict[str, list[str]]:
    """Database name -> task names, for every dataset folder under ``datasets_dir``."""
    out = {}
    for path in sorted(Path(datasets_dir).glob("*/manifest.yaml")):
        if path.parent.name.startswith("."):
            continue  # a dataset being written or swapped in (see datasets.writer)
        tasks = sorted(p.parent.name for p in path.parent.glob("tasks/*/manifest.yaml"))
        out[path.parent.name] = tasks
    return out


def registered_databases(datasets_dir: Path) -> list[Database]:
    """The databases of a run folder; two folder names that share an asset prefix fail."""
    found = [Database(name, tuple(tasks)) for name, tasks in dataset_folders(datasets_dir).items()]
    groups: dict[str, str] = {}
    for db in found:
        if db.group in groups:
            raise ValueError(
                f"dataset folders {groups[db.group]!r} and {db.name!r} in {datasets_dir} "
                f"map to the same asset prefix {db.group!r}: rename one"
            )
        groups[db.group] = db.name
    return found


def check_database_name(name: str, what: str) -> str:
    """A database name (``what`` says where it came from, for the error): letters, digits,
    '-', '_' and '.', as a folder name and an asset prefix both allow."""
    if not name or name.startswith(".") or any(not (c.isalnum() or c in "-_.") for c in name):
        raise ValueError(
            f"{what} {name!r} cannot name a database: use letters, digits, '-', '_' or '.'"
        )
    return name


def database_name(dataset_dir: Path, datasets_dir: Path, name: str | None = None) -> str:
    """The name a dataset folder is registered under: ``name`` when given (``tve register
    --name``); the folder's own name when it lies in the run folder's ``datasets/`` already
    (the code location names it so); otherwise the ``name`` of its manifest.yaml, which the
    import wrote (``tve import files``: the YAML's ``name``), so that the folder an import
    wrote to (``OUT``) does not name the database."""
    dataset_dir = Path(dataset_dir)
    manifest = yaml.safe_load((dataset_dir / "manifest.yaml").read_text())
    if not isinstance(manifest, dict) or "tables" not in manifest:
        raise ValueError(
            f"{dataset_dir}/manifest.yaml is not a RelBench dataset manifest (no 'tables')"
        )
    if name is not None:
        return check_database_name(name, "--name")
    if dataset_dir.resolve().parent == Path(datasets_dir).resolve():
        return check_database_name(dataset_dir.name, "dataset folder name")
    given = manifest.get("name")
    if not given:
        return check_database_name(dataset_dir.name, "dataset folder name")
    try:
        return check_database_name(str(given), f"the name in {dataset_dir}/manifest.yaml")
    except ValueError as exc:
        raise ValueError(f"{exc}; or give one with --name") from None


def register_windows(instance: dg.DagsterInstance, database: str, windows: list[str]) -> list[str]:
    """Add the window keys a database does not have yet (in seed-time order); returns them."""
    have = set(instance.get_dynamic_partitions(windows_name(database)))
    new = [w for w in windows if w not in have]
    if new:
        instance.add_dynamic_partitions(windows_name(database), new)
    return new


def folder_signature(dataset_dir: Path) -> str:
    """A cheap signature of a dataset folder (names, sizes, modification times): a sensor
    compares it every tick and reads the data only when it changed."""
    h = hashlib.sha256()
    for f in sorted(
        p
        for p in Path(dataset_dir).rglob("*")
        if p.is_file() and p.suffix in {".parquet", ".yaml", ".json"}
    ):
        st = f.stat()
        h.update(f"{f.relative_to(dataset_dir)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
