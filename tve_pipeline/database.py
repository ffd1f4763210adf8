"""Open a RelBench 3 dataset folder and say what is in it.

A database is a RelBench 3 dataset folder (manifest.yaml + db/*.parquet + tasks/*); the
manifest is the one source of truth for keys, foreign keys and time columns. This module
opens such a folder (or a Hub spec when a network is there), infers each column's semantic
type (:mod:`tve_pipeline.schema`) once, deterministically, and reads what the downstream
tasks say about the database (their window Δ, their entity tables). Everything downstream
(traversal graph, targets, model inputs) reads these answers instead of re-deciding them.
:class:`DatabaseSummary` is what ``raw_tables`` records (built by
:func:`tve_pipeline.summary.summarise_database`, after our checks); the seed times derived
from it live in :mod:`tve_pipeline.windows`.
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tve_pipeline.schema import (
    CATEGORICAL,
    KEY,
    NUMERICAL,
    TEXT,
    TIMESTAMP,
    TYPES_FILE,
    DatabaseError,
)

# A string column with at most this many distinct values, each seen more than once on
# average, is categorical; otherwise it is free text or an identifier.
_MAX_CATEGORIES = 1000
# An integer column with at most this many distinct values is a code, not a quantity.
_MAX_INT_CODES = 10


def _network_available(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def open_dataset(name_or_path: str | Path):
    """``relbench.load_dataset`` with clear errors: a local folder, or a Hub spec when online.

    Offline, a Hub spec fails within seconds (instead of retrying downloads) with a
    message that says how to point at a local folder.
    """
    import relbench

    path = Path(name_or_path).expanduser()
    if (path / "manifest.yaml").exists():
        return relbench.load_dataset(path)
    looks_like_path = (
        isinstance(name_or_path, Path)
        or str(name_or_path).startswith((".", "/", "~"))
        or path.exists()
    )
    if looks_like_path:
        raise DatabaseError(f"{path} is not a RelBench dataset folder: no manifest.yaml there")
    if not _network_available():
        raise DatabaseError(
            f"cannot fetch {name_or_path!r} from the Hugging Face Hub: no network here; "
            "build or copy the dataset folder locally and pass its path"
        )
    return relbench.load_dataset(str(name_or_path))


def table_files(dataset) -> dict[str, Path]:
    """The parquet file of every table of the dataset's manifest, each checked to exist:
    what DuckDB reads (``tve targets``, the ``tve_targets`` asset) instead of loading the
    tables into pandas, so a database larger than memory streams."""
    files = {name: Path(dataset.db_dir) / f"{name}.parquet" for name in dataset.manifest.tables}
    for name, path in files.items():
        if not path.exists():
            raise ValueError(f"table {name!r}: no file {path}")
    return files


def infer_column_type(ser: pd.Series) -> str:
    """The semantic type of one non-key column (deterministic: reads the whole column)."""
    if pd.api.types.is_datetime64_any_dtype(ser.dtype):
        return TIMESTAMP
    if pd.api.types.is_bool_dtype(ser.dtype):
        return CATEGORICAL
    non_null = ser.dropna()
    if pd.api.types.is_float_dtype(ser.dtype):
        return NUMERICAL
    if pd.api.types.is_integer_dtype(ser.dtype):
        return CATEGORICAL if non_null.nunique() <= _MAX_INT_CODES else NUMERICAL
    n_unique = non_null.nunique()
    if n_unique <= _MAX_CATEGORIES and n_unique * 2 <= max(len(non_null), 1):
        return CATEGORICAL
    return TEXT


def declared_column_types(dataset_dir: str | Path | None) -> dict[str, dict[str, str]]:
    """Types a dataset folder declares in ``tve_types.json`` (written by ``tve import files``
    from inference plus the user's overrides); empty when there is none."""
    if dataset_dir is None:
        return {}
    path = Path(dataset_dir) / TYPES_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("columns", {})


def column_types(
    tables: dict[str, pd.DataFrame], manifest, dataset_dir: str | Path | None = None
) -> dict[str, dict[str, str]]:
    """Semantic type of every column of every table; keys and time columns are ``key``.

    Declared types (``tve_types.json``) win over inference; manifest keys stay keys.
    """
    declared = declared_column_types(dataset_dir)
    out: dict[str, dict[str, str]] = {}
    for name, spec in manifest.tables.items():
        df = tables[name]
        keys = {c for c in [spec.pkey, spec.time_col, *spec.fkeys] if c}
        given = declared.get(name, {})
        out[name] = {
            col: KEY if col in keys else given.get(col) or infer_column_type(df[col])
            for col in df.columns
        }
    return out


@dataclass(frozen=True)
class DatabaseSummary:
    """What ``raw_tables`` records about a database: where it is and what it holds."""

    name: str
    dataset_dir: str
    fingerprint: str  # sha256 over manifest + parquet bytes: changes when the data changes
    rows: dict[str, int]
    val_timestamp: str
    test_timestamp: str
    min_timestamp: str
    max_timestamp: str
    task_names: tuple[str, ...]
    column_types: dict[str, dict[str, str]]
    warnings: tuple[str, ...] = ()
    info: tuple[str, ...] = ()
    changed_rows: dict | None = None  # every row the import or RelBench changed, counted


def fingerprint(dataset_dir: Path) -> str:
    """sha256 over the manifest, the parquet files, the declared types and the task
    manifests: it changes when the data (or what the pipeline reads of it) changes."""
    h = hashlib.sha256()
    files = [dataset_dir / "manifest.yaml", *sorted((dataset_dir / "db").glob("*.parquet"))]
    files += [f for f in [dataset_dir / TYPES_FILE] if f.exists()]  # types change the graph
    files += sorted((dataset_dir / "tasks").glob("*/manifest.yaml"))
    for f in files:
        h.update(str(f.relative_to(dataset_dir)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def task_manifests(dataset) -> list:
    """The ``relbench.manifest.TaskManifest`` of every task of ``dataset``, in its task order."""
    from relbench.manifest import TaskManifest

    return [
        TaskManifest.load(dataset.dataset_dir / "tasks" / name / "manifest.yaml")
        for name in dataset.get_task_names()
    ]


def task_timedelta(dataset) -> pd.Timedelta:
    """Δ of a database: the downstream tasks' window (the shortest when they differ)."""
    deltas = [pd.Timedelta(tm.timedelta) for tm in task_manifests(dataset) if tm.timedelta]
    if not deltas:
        raise DatabaseError(
            f"database {dataset.manifest.name!r} has no task with a timedelta: "
            "set the recipe's targets.timedelta"
        )
    return min(deltas)


def task_entity_tables(dataset) -> list[str]:
    """The entity tables the database's entity tasks predict about (pre-training targets)."""
    out = []
    for tm in task_manifests(dataset):
        if tm.entity_table and tm.entity_col and tm.entity_table not in out:
            out.append(tm.entity_table)
    return out


def num_eval_timestamps(dataset) -> int:
    """The most evaluation seed times any task of ``dataset`` asks for (1 when none)."""
    return max((tm.num_eval_timestamps for tm in task_manifests(dataset)), default=1)
