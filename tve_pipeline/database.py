"""Open a RelBench 3 dataset folder and say what is in it.

A database is a RelBench 3 dataset folder (manifest.yaml + db/*.parquet + tasks/*); the
manifest is the one source of truth for keys, foreign keys and time columns. This module
opens such a folder (or a Hub spec when a network is there), infers each column's semantic
type once, deterministically, and derives the seed times the method trains on. Everything
downstream (traversal graph, targets, model inputs) reads these answers instead of
re-deciding them.
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

# Semantic types we distinguish. "numerical" and "categorical" are aggregated by TVE and
# fed to the tabular encoder; "timestamp" is fed to the encoder only; "text" is not
# aggregated but is fed to the encoder as an offline embedding (tve_pipeline.text, no
# download); "key" marks primary/foreign keys and time columns.
NUMERICAL, CATEGORICAL, TIMESTAMP, TEXT, KEY = (
    "numerical",
    "categorical",
    "timestamp",
    "text",
    "key",
)

# A string column with at most this many distinct values, each seen more than once on
# average, is categorical; otherwise it is free text or an identifier.
_MAX_CATEGORIES = 1000
# An integer column with at most this many distinct values is a code, not a quantity.
_MAX_INT_CODES = 10


class DatabaseError(ValueError):
    """A database that cannot be used, with a one-line reason naming what is wrong."""


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


TYPES_FILE = "tve_types.json"


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
    h = hashlib.sha256()
    files = [dataset_dir / "manifest.yaml", *sorted((dataset_dir / "db").glob("*.parquet"))]
    files += [f for f in [dataset_dir / TYPES_FILE] if f.exists()]  # types change the graph
    files += sorted((dataset_dir / "tasks").glob("*/manifest.yaml"))
    for f in files:
        h.update(str(f.relative_to(dataset_dir)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def summarise_database(dataset_dir: str | Path) -> DatabaseSummary:
    """Open and validate a dataset folder: our checks (``tve_pipeline.validation``), then
    RelBench's own load, whose silent corrections are counted."""
    from tve_pipeline.validation import validate_dataset

    dataset_dir = Path(dataset_dir).resolve()
    ds = open_dataset(dataset_dir)
    report = validate_dataset(dataset_dir)
    try:
        report.raise_for_errors()
    except DatabaseError as exc:
        raise DatabaseError(f"database {ds.manifest.name!r}: {exc}") from exc
    try:
        db = ds.make_db()
        # RelBench's get_db() sets foreign keys past the parent table to null without a
        # word (they dangle once later rows are cut); count them so nothing changes silently.
        corrected = {
            f"{name}.{col}": int((t.df[col] >= len(db.table_dict[parent].df)).sum())
            for name, t in db.table_dict.items()
            for col, parent in t.fkey_col_to_pkey_table.items()
        }
        ds.validate_and_correct_db(db)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise DatabaseError(f"database {ds.manifest.name!r} at {dataset_dir}: {exc}") from exc
    tables = {name: t.df for name, t in db.table_dict.items()}
    return DatabaseSummary(
        name=ds.manifest.name,
        dataset_dir=str(dataset_dir),
        fingerprint=fingerprint(dataset_dir),
        rows={name: len(t.df) for name, t in db.table_dict.items()},
        val_timestamp=str(ds.val_timestamp),
        test_timestamp=str(ds.test_timestamp),
        min_timestamp=str(db.min_timestamp),
        max_timestamp=str(db.max_timestamp),
        task_names=tuple(ds.get_task_names()),
        column_types=column_types(tables, ds.manifest, dataset_dir),
        warnings=tuple(report.warnings),
        info=tuple(report.info),
        changed_rows={
            "relbench_nulled_fkeys": {k: v for k, v in corrected.items() if v},
            **report.counts.get("import_report", {}),
        },
    )


def task_timedelta(dataset) -> pd.Timedelta:
    """Δ of a database: the downstream tasks' window (the shortest when they differ)."""
    from relbench.manifest import TaskManifest

    deltas = []
    for name in dataset.get_task_names():
        tm = TaskManifest.load(dataset.dataset_dir / "tasks" / name / "manifest.yaml")
        if tm.timedelta:
            deltas.append(pd.Timedelta(tm.timedelta))
    if not deltas:
        raise DatabaseError(
            f"database {dataset.manifest.name!r} has no task with a timedelta: set the recipe's targets.timedelta"
        )
    return min(deltas)


def task_entity_tables(dataset) -> list[str]:
    """The entity tables the database's entity tasks predict about (pre-training targets)."""
    from relbench.manifest import TaskManifest

    out = []
    for name in dataset.get_task_names():
        tm = TaskManifest.load(dataset.dataset_dir / "tasks" / name / "manifest.yaml")
        if tm.entity_table and tm.entity_col and tm.entity_table not in out:
            out.append(tm.entity_table)
    return out


def training_seed_times(val_timestamp, min_timestamp, timedelta: pd.Timedelta) -> pd.DatetimeIndex:
    """RelBench's training seed times: from ``val - Δ`` back to the first timestamp by Δ.

    Every window ``(t, t+Δ]`` ends at or before the validation timestamp, so pre-training
    never reads a row past it.
    """
    return pd.date_range(
        start=pd.Timestamp(val_timestamp) - timedelta,
        end=pd.Timestamp(min_timestamp),
        freq=-timedelta,
    ).sort_values()


def seed_schedule(
    summary: DatabaseSummary, timedelta: pd.Timedelta, num_eval_timestamps: int = 1
) -> pd.DataFrame:
    """Every seed time of a database with its split, as RelBench's task splits lay them out.

    ``train`` seeds step back from ``val - Δ`` by Δ (their windows end by ``val``); ``val``
    and ``test`` seeds start at their timestamps and step forward, as long as their
    windows stay before the next split (or the end of the data).
    """
    val, test = pd.Timestamp(summary.val_timestamp), pd.Timestamp(summary.test_timestamp)
    k = max(num_eval_timestamps - 1, 0)
    train = training_seed_times(val, summary.min_timestamp, timedelta)
    val_seeds = pd.date_range(val, min(val + timedelta * k, test - timedelta), freq=timedelta)
    test_seeds = pd.date_range(
        test,
        min(test + timedelta * k, pd.Timestamp(summary.max_timestamp) - timedelta),
        freq=timedelta,
    )
    frames = [
        pd.DataFrame({"timestamp": ts, "split": split})
        for ts, split in ((train, "train"), (val_seeds, "val"), (test_seeds, "test"))
    ]
    return (
        pd.concat(frames, ignore_index=True)
        .sort_values("timestamp", kind="stable")
        .reset_index(drop=True)
    )


def num_eval_timestamps(dataset) -> int:
    from relbench.manifest import TaskManifest

    counts = [
        TaskManifest.load(
            dataset.dataset_dir / "tasks" / name / "manifest.yaml"
        ).num_eval_timestamps
        for name in dataset.get_task_names()
    ]
    return max(counts, default=1)
