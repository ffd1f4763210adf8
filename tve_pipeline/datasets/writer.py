"""Write a RelBench 3 dataset folder, atomically, after checking it would load.

Every database the pipeline builds from a raw source ends here: a folder with
``manifest.yaml``, ``db/<table>.parquet`` and ``tasks/<task>/manifest.yaml``, which
``relbench.load_dataset(path)`` reads. The checks RelBench would only make at load or
label time (primary keys 0..n-1 in row order, a keyed table with a time column sorted by
it, foreign keys into known tables and in range, naive datetime time columns, task
windows that fit the data) are made here, before anything touches the disk, and fail
with a one-line ``ValueError`` naming the table, column or task. The folder is built in
a temporary sibling directory and swapped in with two renames, so a reader sees either
the previous complete build or the new complete build, never a mix, and a failed build
leaves the previous one untouched. ``reindex_primary_keys`` turns tables keyed by their
original ids into that shape: 0..n-1 keys in row order, the original id kept as a column
of its own table, foreign keys mapped to the new ids, and every reference whose parent
is missing handled by an explicit, counted policy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from relbench.base import is_time_sorted
from relbench.manifest import KIND_FORECAST, DatasetManifest, TableSpec, TaskManifest

# Sidecar written next to manifest.yaml by importers: what the import policy did.
IMPORT_REPORT_FILE = "tve_import.json"


# --------------------------------------------------------------------------- #
# Key normalisation
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ForeignKey:
    """A reference from a child table to a parent table, by the parent's original id.

    ``column`` holds the original ids and is replaced in the output by ``new_column``,
    which holds the parent's new 0..n-1 ids (the parent keeps the original id itself).
    """

    column: str
    parent: str
    new_column: str


@dataclass
class KeyReport:
    """What reindexing did to references, per foreign key ``"<table>.<new_column>"``.

    ``null_fkeys``: references that were already null in the source. ``unmatched_fkeys``:
    non-null references whose parent id does not exist, set to null (policy ``"null"``).
    ``added_parents``: placeholder rows appended per parent table (policy
    ``"add_parents"``), one per distinct missing id.
    """

    null_fkeys: dict[str, int] = field(default_factory=dict)
    unmatched_fkeys: dict[str, int] = field(default_factory=dict)
    added_parents: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {
            "added_parents": dict(self.added_parents),
            "unmatched_fkeys": dict(self.unmatched_fkeys),
            "null_fkeys": dict(self.null_fkeys),
        }


def reindex_primary_keys(
    tables: Mapping[str, pd.DataFrame],
    pkeys: Mapping[str, tuple[str | None, str]],
    fkeys: Mapping[str, Sequence[ForeignKey]] | None = None,
    *,
    missing: Literal["null", "add_parents"] = "null",
) -> tuple[dict[str, pd.DataFrame], KeyReport]:
    """Give every keyed table a 0..n-1 primary key in its current row order.

    ``pkeys`` maps a table to ``(original_id_column, new_pkey_column)``; an original
    column of ``None`` means the table has no natural key and gets a surrogate one. The
    original id column is kept, the new key becomes the first column. When both names
    are the same the ids are replaced in place (same column, same position), as
    RelBench's own reindexing does; a ``ForeignKey`` whose ``column`` and
    ``new_column`` are equal is likewise rewritten in place. Sort a table (for instance
    by its time column) *before* calling this: row order is key order.

    ``fkeys`` maps a child table to its references. A non-null reference to an id its
    parent lacks is, under ``missing="null"``, set to null and counted; under
    ``missing="add_parents"``, a placeholder parent row (original id set, every other
    column null) is appended for each distinct missing id, in sorted id order, so the
    reference survives. New foreign key columns are ``int64``, or nullable ``Int64``
    when some reference is null. Input frames are not modified.
    """
    fkeys = fkeys or {}
    if missing not in ("null", "add_parents"):
        raise ValueError(f"missing must be 'null' or 'add_parents', got {missing!r}")
    out = {name: df.copy() for name, df in tables.items()}
    report = KeyReport()
    _check_key_names(out, pkeys, fkeys)
    # Placeholder parents go in before any key is assigned, so that they get keys too.
    if missing == "add_parents":
        _add_missing_parents(out, pkeys, fkeys, report)
    id_maps = _assign_primary_keys(out, pkeys)
    _map_foreign_keys(out, fkeys, id_maps, missing, report)
    return out, report


def _check_key_names(
    tables: Mapping[str, pd.DataFrame],
    pkeys: Mapping[str, tuple[str | None, str]],
    fkeys: Mapping[str, Sequence[ForeignKey]],
) -> None:
    """Refuse keys that name an unknown table or column, or a parent without original ids."""
    for name in pkeys:
        if name not in tables:
            raise ValueError(f"pkeys name unknown table '{name}'")
    for child, refs in fkeys.items():
        if child not in tables:
            raise ValueError(f"fkeys name unknown table '{child}'")
        for ref in refs:
            if ref.parent not in pkeys or pkeys[ref.parent][0] is None:
                raise ValueError(
                    f"table '{child}': fkey '{ref.column}' -> '{ref.parent}', which has "
                    "no original id column in pkeys"
                )
            if ref.column not in tables[child].columns:
                raise ValueError(f"table '{child}': no fkey column '{ref.column}'")


def _add_missing_parents(
    out: dict[str, pd.DataFrame],
    pkeys: Mapping[str, tuple[str | None, str]],
    fkeys: Mapping[str, Sequence[ForeignKey]],
    report: KeyReport,
) -> None:
    """Append one placeholder row per referenced but missing parent id, in sorted id order."""
    wanted: dict[str, set] = {}
    for child, refs in fkeys.items():
        for ref in refs:
            wanted.setdefault(ref.parent, set()).update(out[child][ref.column].dropna())
    for parent, ids in wanted.items():
        id_col = pkeys[parent][0]
        absent = sorted(ids - set(out[parent][id_col].dropna()))
        if absent:
            placeholders = pd.DataFrame(
                {id_col: pd.Series(absent, dtype=out[parent][id_col].dtype)}
            )
            out[parent] = pd.concat([out[parent], placeholders], ignore_index=True)
        report.added_parents[parent] = len(absent)


def _assign_primary_keys(
    out: dict[str, pd.DataFrame], pkeys: Mapping[str, tuple[str | None, str]]
) -> dict[str, pd.Series]:
    """Give each keyed table its 0..n-1 key; return original id -> new key per table."""
    id_maps: dict[str, pd.Series] = {}
    for name, (id_col, new_col) in pkeys.items():
        df = out[name].reset_index(drop=True)
        if new_col in df.columns and new_col != id_col:
            raise ValueError(f"table '{name}': new pkey column '{new_col}' already exists")
        if id_col is not None:
            ids = df[id_col]
            if ids.isna().any() or not ids.is_unique:
                raise ValueError(
                    f"table '{name}': original id column '{id_col}' has nulls or duplicates"
                )
            id_maps[name] = pd.Series(np.arange(len(df), dtype="int64"), index=pd.Index(ids))
        if new_col == id_col:
            df[new_col] = np.arange(len(df), dtype="int64")
        else:
            df.insert(0, new_col, np.arange(len(df), dtype="int64"))
        out[name] = df
    return id_maps


def _map_foreign_keys(
    out: dict[str, pd.DataFrame],
    fkeys: Mapping[str, Sequence[ForeignKey]],
    id_maps: Mapping[str, pd.Series],
    missing: str,
    report: KeyReport,
) -> None:
    """Replace each reference's original ids by its parent's new keys, counting the nulls."""
    for child, refs in fkeys.items():
        df = out[child]
        for ref in refs:
            label = f"{child}.{ref.new_column}"
            original = df[ref.column]
            new = original.map(id_maps[ref.parent])
            report.null_fkeys[label] = int(original.isna().sum())
            if missing == "null":
                report.unmatched_fkeys[label] = int((new.isna() & original.notna()).sum())
            new = new.astype("Int64") if new.isna().any() else new.astype("int64")
            position = df.columns.get_loc(ref.column)
            df = df.drop(columns=[ref.column])
            df.insert(position, ref.new_column, new)
        out[child] = df


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _timestamp(value, what: str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} {value!r} is not a timestamp") from exc
    if ts is pd.NaT:
        raise ValueError(f"{what} is missing")
    if ts.tzinfo is not None:
        raise ValueError(f"{what} {value!r} must be timezone-naive, like RelBench's splits")
    return ts


def _iso(ts: pd.Timestamp) -> str:
    # Midnight timestamps are written as plain dates, as RelBench's own manifests do.
    return ts.date().isoformat() if ts == ts.normalize() else ts.isoformat()


def _prepare_tables(
    tables: Mapping[str, tuple[pd.DataFrame, TableSpec]],
) -> dict[str, pd.DataFrame]:
    """Check every table against RelBench's key contract; return the frames to write.

    Datetime columns come back as ``datetime64[ns]``: under pandas 3 they default to
    microseconds, and ``relbench.modeling.utils.to_unix_time`` divides the raw int64 by
    1e9 whatever the unit, so anything coarser than ns becomes a wrong epoch time.
    """
    if not tables:
        raise ValueError("a dataset needs at least one table")
    prepared: dict[str, pd.DataFrame] = {}
    for name, (df, spec) in tables.items():
        _check_table_spec(name, df, spec)
        df = _naive_ns_datetimes(name, df.reset_index(drop=True))
        _check_time_column(name, df, spec)
        prepared[name] = df
    _check_foreign_keys(tables, prepared)
    return prepared


def _check_table_spec(name: str, df: pd.DataFrame, spec: TableSpec) -> None:
    """The table's name, columns and spec fit together; its pkey is 0..n-1 in row order."""
    if not isinstance(df, pd.DataFrame) or not isinstance(spec, TableSpec):
        raise ValueError(f"table '{name}': expected (DataFrame, TableSpec)")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"table name {name!r} cannot be a parquet file name")
    if not df.columns.is_unique:
        raise ValueError(f"table '{name}': duplicate column names")
    for col in [spec.pkey, spec.time_col, *spec.fkeys]:
        if col is not None and col not in df.columns:
            raise ValueError(f"table '{name}': column '{col}' named in its spec is missing")

    if spec.pkey is not None:
        key = df[spec.pkey]
        if not pd.api.types.is_integer_dtype(key.dtype) or key.isna().any():
            raise ValueError(
                f"table '{name}': pkey '{spec.pkey}' must be a non-null integer column"
            )
        if not np.array_equal(key.to_numpy(dtype="int64"), np.arange(len(df))):
            raise ValueError(
                f"table '{name}': pkey '{spec.pkey}' must be 0..n-1 in row order "
                "(RelBench 3); use reindex_primary_keys"
            )


def _naive_ns_datetimes(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every datetime column as ``datetime64[ns]``; refuses timezone-aware ones."""
    converted = {}
    for col in df.columns:
        dtype = df[col].dtype
        if isinstance(dtype, pd.DatetimeTZDtype):
            raise ValueError(
                f"table '{name}': column '{col}' is timezone-aware; RelBench compares naive times"
            )
        if pd.api.types.is_datetime64_dtype(dtype) and dtype != np.dtype("datetime64[ns]"):
            converted[col] = df[col].astype("datetime64[ns]")
    if converted:
        df = df.assign(**converted)
    return df


def _check_time_column(name: str, df: pd.DataFrame, spec: TableSpec) -> None:
    """The time column is datetime64 and, in a keyed table, sorted (RelBench's upto)."""
    if spec.time_col is None:
        return
    if not pd.api.types.is_datetime64_dtype(df[spec.time_col].dtype):
        raise ValueError(
            f"table '{name}': time column '{spec.time_col}' must be datetime64, "
            f"got {df[spec.time_col].dtype}"
        )
    # Database.upto keeps the rows with time <= t; for the survivors to still be
    # keyed 0..m-1 (relbench checks this on every get_db) they must be a prefix.
    if spec.pkey is not None and not is_time_sorted(df[spec.time_col]):
        raise ValueError(
            f"table '{name}': rows must be sorted by time column '{spec.time_col}' "
            "(nulls last) because it has a pkey"
        )


def _check_foreign_keys(
    tables: Mapping[str, tuple[pd.DataFrame, TableSpec]], prepared: Mapping[str, pd.DataFrame]
) -> None:
    """Every fkey points at a keyed table and holds whole ids within that table's keys."""
    for name, (_, spec) in tables.items():
        for col, parent in spec.fkeys.items():
            if parent not in tables:
                raise ValueError(f"table '{name}': fkey '{col}' -> unknown table '{parent}'")
            parent_spec = tables[parent][1]
            if parent_spec.pkey is None:
                raise ValueError(
                    f"table '{name}': fkey '{col}' -> table '{parent}', which has no pkey"
                )
            ref = prepared[name][col]
            values = ref.dropna()
            # Float is tolerated (pandas' classic dtype for an integer column with nulls,
            # and RelBench reads it with astype(int)) as long as every value is whole.
            whole_floats = pd.api.types.is_float_dtype(ref.dtype) and bool(
                (values == np.floor(values)).all()
            )
            if not (pd.api.types.is_integer_dtype(ref.dtype) or whole_floats):
                raise ValueError(
                    f"table '{name}': fkey '{col}' must hold integer ids, got {ref.dtype}"
                )
            if len(values) and (values.min() < 0 or values.max() >= len(prepared[parent])):
                raise ValueError(
                    f"table '{name}': fkey '{col}' has values outside "
                    f"0..{len(prepared[parent]) - 1} of table '{parent}'"
                )


def _time_range(tables: Mapping[str, pd.DataFrame], specs: Mapping[str, TableSpec], upto=None):
    """(min, max) over every time column, optionally of rows <= ``upto`` (Database.upto)."""
    lows, highs = [], []
    for name, spec in specs.items():
        if spec.time_col is None:
            continue
        times = tables[name][spec.time_col]
        if upto is not None:
            times = times[times <= upto]
        if times.notna().any():
            lows.append(times.min())
            highs.append(times.max())
    if not lows:
        return None, None
    return min(lows), max(highs)


def _check_tasks(
    tasks: Sequence[TaskManifest],
    tables: Mapping[str, pd.DataFrame],
    specs: Mapping[str, TableSpec],
    val: pd.Timestamp,
    test: pd.Timestamp,
) -> None:
    """The task checks RelBench makes only when labels are generated, made up front."""
    names = set()
    for tm in tasks:
        if not isinstance(tm, TaskManifest):
            raise ValueError(f"tasks must be TaskManifest objects, got {type(tm).__name__}")
        tm.validate()
        if not tm.name or "/" in tm.name or tm.name.startswith("."):
            raise ValueError(f"task name {tm.name!r} cannot be a directory name")
        if tm.name in names:
            raise ValueError(f"task '{tm.name}' is defined twice")
        names.add(tm.name)
        for table in [tm.entity_table, tm.src_entity_table, tm.dst_entity_table]:
            if table is not None and table not in specs:
                raise ValueError(f"task '{tm.name}': unknown entity table '{table}'")
        if tm.kind != KIND_FORECAST:
            continue
        td = pd.Timedelta(tm.timedelta)
        if td <= pd.Timedelta(0):
            raise ValueError(f"task '{tm.name}': timedelta {tm.timedelta!r} must be positive")
        # These mirror relbench.base.task_base: BaseTask.__init__ and _get_table.
        if test - val < td:
            raise ValueError(
                f"task '{tm.name}': timedelta {tm.timedelta} exceeds test - val ({test - val})"
            )
        low, high_before_test = _time_range(tables, specs, upto=test)
        _, high = _time_range(tables, specs)
        if low is None:
            raise ValueError(f"task '{tm.name}': a forecast task needs a table with a time column")
        n_train = len(pd.date_range(start=val - td, end=low, freq=-td))
        if n_train < 3:
            raise ValueError(
                f"task '{tm.name}': only {n_train} training timestamps between {low} and "
                f"{val - td}; RelBench needs 3"
            )
        if val + td > high_before_test:
            raise ValueError(
                f"task '{tm.name}': val window ends after the last row before test "
                f"({high_before_test})"
            )
        if test + td > high:
            raise ValueError(f"task '{tm.name}': test window ends after the last row ({high})")


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def write_dataset(
    out_dir: str | Path,
    name: str,
    tables: Mapping[str, tuple[pd.DataFrame, TableSpec]],
    val_timestamp,
    test_timestamp,
    tasks: Sequence[TaskManifest],
    description: str | None = None,
    *,
    sidecars: Mapping[str, Any] | None = None,
) -> Path:
    """Validate, then atomically (re)place the RelBench 3 dataset folder ``out_dir``.

    ``tables`` maps a table name to its frame and :class:`TableSpec`; ``tasks`` are
    written to ``tasks/<name>/manifest.yaml`` (no label files: RelBench regenerates
    forecast labels from their SQL). ``sidecars`` maps extra file names in the folder
    to JSON-serialisable objects (e.g. ``{"tve_import.json": report}``). An existing
    ``out_dir`` is only replaced if it is a dataset folder (has ``manifest.yaml``) or
    empty. Returns ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    tasks = list(tasks)  # iterated twice: checked, then written
    if not name:
        raise ValueError("dataset name must be non-empty")
    val = _timestamp(val_timestamp, "val_timestamp")
    test = _timestamp(test_timestamp, "test_timestamp")
    if not val < test:
        raise ValueError(f"val_timestamp {val} must be before test_timestamp {test}")
    specs = {table: spec for table, (_, spec) in tables.items()}
    frames = _prepare_tables(tables)
    _check_tasks(tasks, frames, specs, val, test)
    sidecars = dict(sidecars or {})
    for file_name in sidecars:
        if (
            "/" in file_name
            or file_name in ("manifest.yaml", "db", "tasks")
            or file_name.startswith(".")
        ):
            raise ValueError(f"sidecar name {file_name!r} is not a plain extra file name")
    # The swap deletes what was at out_dir: only ever a previous dataset (or nothing).
    if out_dir.exists() and (
        not out_dir.is_dir()
        or (not (out_dir / "manifest.yaml").exists() and any(out_dir.iterdir()))
    ):
        raise ValueError(f"{out_dir} exists and is not a dataset folder; refusing to replace it")

    manifest = DatasetManifest(
        name=name,
        val_timestamp=_iso(val),
        test_timestamp=_iso(test),
        description=description,
        tables={
            table: TableSpec(spec.pkey, spec.time_col, dict(spec.fkeys))
            for table, spec in specs.items()
        },
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one file system and is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a dataset folder is shared
        (staging / "db").mkdir()
        for table, df in frames.items():
            df.to_parquet(staging / "db" / f"{table}.parquet", index=False)
        for tm in tasks:
            tm.save(staging / "tasks" / tm.name / "manifest.yaml")
        for file_name, payload in sidecars.items():
            (staging / file_name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        # The manifest last: a folder is only a dataset once it has one.
        manifest.save(staging / "manifest.yaml")
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging``: rename the old away, the new in, drop the old.

    Between the two renames ``out_dir`` is briefly absent, never partial; if the second
    rename fails the old folder is put back.
    """
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out_dir, retired)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(retired, out_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)
