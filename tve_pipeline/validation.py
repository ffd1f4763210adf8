"""Check a RelBench 3 dataset folder and say exactly what is wrong with it.

``validate_dataset(dataset_dir)`` reads ``manifest.yaml``, every ``db/<table>.parquet``
and every ``tasks/<task>/manifest.yaml`` and returns a :class:`ValidationReport`: one
line per finding, naming the table and column (or task). Errors are what makes RelBench
or the pipeline fail or silently mis-read the data:

* a manifest that does not parse, bad val/test timestamps, a table whose parquet file is
  missing, manifest columns missing from the parquet file, foreign keys to unknown tables
  or to tables without a primary key, empty tables;
* primary keys that are null, duplicated, not integers, or not 0..n-1 in row order;
* dangling foreign keys (values outside the parent's 0..n-1), with the count and up to
  five sample values; foreign keys that are not integer ids;
* time columns that are not naive datetimes: text (parseable or not), numbers,
  timezone-aware values, mixed timezones; a keyed table not sorted by its time column
  (RelBench's ``upto`` would then break its 0..n-1 keys); a time column whose name is not
  a Python identifier (RelBench filters it with ``DataFrame.query``);
* task manifests that do not parse or name unknown tables; a ``tve_types.json`` giving
  a type that is not one of the pipeline's.

Warnings are suspicious but usable (rows without a time, timezone-aware non-time
columns, ``remove_columns`` naming nothing, a column of numbers stored as text because of
a few words such as ``NA`` or ``-``, unless ``tve_types.json`` declares its type).
``info`` lists identifiers with spaces, quotes or non-ASCII letters: they work everywhere
in the pipeline (parquet files, DuckDB task SQL with quoted identifiers) and are reported
only so that a user writing SQL knows to quote them. ``counts`` holds the numbers behind
the findings (rows per table, null and dangling foreign keys, null times, the words of
those number columns) and, when the folder has a ``tve_import.json``, what
the import changed or added (``counts["import_report"]``: placeholder parents, references
set to null, renamed columns, ...).
"""

from __future__ import annotations

import json
import keyword
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tve_pipeline.common import (
    error_summary,
    has_utc_offset,
    numeric_text_tokens,
    numeric_tokens_line,
)
from tve_pipeline.schema import SEMANTIC_TYPES, TYPES_FILE, DatabaseError

_SAMPLE = 5
_PLAIN_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ValidationReport:
    """What :func:`validate_dataset` found; ``ok`` when there are no errors."""

    dataset_dir: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise :class:`DatabaseError` with the first error (and how many more there are)."""
        if not self.errors:
            return
        more = len(self.errors) - 1
        raise DatabaseError(self.errors[0] + (f" (and {more} more)" if more else ""))

    def lines(self) -> list[str]:
        """The report as printable lines: errors, warnings, info, then a summary."""
        out = [f"error: {m}" for m in self.errors]
        out += [f"warning: {m}" for m in self.warnings]
        out += [f"info: {m}" for m in self.info]
        rows = self.counts.get("rows", {})
        out.append(
            f"{self.dataset_dir}: {len(self.errors)} errors, {len(self.warnings)} warnings; "
            f"{sum(rows.values())} rows in {len(rows)} tables, {self.counts.get('tasks', 0)} tasks"
        )
        return out

    def to_dict(self) -> dict:
        return {
            "dataset_dir": self.dataset_dir,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "info": list(self.info),
            "counts": self.counts,
        }


def _sample(values) -> list:
    out = []
    for v in list(values)[:_SAMPLE]:
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(v)
    return out


def _where(table: str, column: str | None = None) -> str:
    return f"table '{table}'" + (f", column '{column}'" if column is not None else "")


def _odd_identifier(name: str) -> str | None:
    """Why an identifier needs quoting in SQL, or None for a plain one."""
    if _PLAIN_IDENTIFIER.match(name):
        return None
    reasons = []
    if any(c.isspace() for c in name):
        reasons.append("spaces")
    if any(c in "\"'`" for c in name):
        reasons.append("quotes")
    if any(ord(c) > 127 for c in name):
        reasons.append("non-ASCII letters")
    if not reasons:
        reasons.append("characters other than letters, digits and _")
    return " and ".join(reasons)


def validate_dataset(dataset_dir: str | Path) -> ValidationReport:
    """Check the dataset folder ``dataset_dir``; never raises for a bad dataset.

    The steps, each a function below: the manifest and its split timestamps, every table's
    parquet file, each table's columns and keys, the row counts, the sidecar files, the
    tasks.
    """
    dataset_dir = Path(dataset_dir).expanduser()
    report = ValidationReport(str(dataset_dir))
    manifest = _read_manifest(dataset_dir, report)
    if manifest is None:
        return report
    stamps = _split_timestamps(manifest, report.errors.append)
    if not manifest.tables:
        report.errors.append("manifest: no tables")
    frames = _read_tables(dataset_dir, manifest, report)
    counts = {"null_fkeys": {}, "dangling_fkeys": {}, "null_times": {}}
    for name, spec in manifest.tables.items():
        if name in frames:
            _check_table(name, spec, frames, manifest, report, counts)
    rows = {name: len(frames[name]) for name in manifest.tables if name in frames}
    report.counts.update(
        tables=len(manifest.tables), rows=rows, rows_total=sum(rows.values()), **counts
    )
    if "test_timestamp" in stamps:
        report.counts["rows_upto_test_timestamp"] = _rows_upto(
            stamps["test_timestamp"], manifest, frames
        )
    _check_sidecars(dataset_dir, frames, report)
    _check_numeric_text(dataset_dir, manifest, frames, report)
    _check_tasks(dataset_dir, manifest, frames, stamps, report)
    return report


def _read_manifest(dataset_dir: Path, report: ValidationReport):
    """The folder's ``DatasetManifest``, or None (and an error) when there is none to read."""
    from relbench.manifest import DatasetManifest

    manifest_path = dataset_dir / "manifest.yaml"
    if not manifest_path.is_file():
        report.errors.append(
            f"{dataset_dir} is not a RelBench dataset folder: no manifest.yaml there"
        )
        return None
    try:
        return DatasetManifest.load(manifest_path)
    except Exception as exc:  # yaml errors, missing keys, wrong shapes
        report.errors.append(f"manifest.yaml cannot be read: {error_summary(exc, whole=True)}")
        return None


def _split_timestamps(manifest, err) -> dict[str, pd.Timestamp]:
    """``val_timestamp`` and ``test_timestamp`` as naive timestamps, val before test; the
    ones that are not are left out (and reported)."""
    stamps = {}
    for what in ("val_timestamp", "test_timestamp"):
        value = getattr(manifest, what)
        try:
            ts = pd.Timestamp(str(value))
            if ts is pd.NaT:
                raise ValueError
        except (TypeError, ValueError):
            err(f"manifest: {what} {value!r} is not a timestamp")
            continue
        if ts.tzinfo is not None:
            err(f"manifest: {what} {value!r} has a timezone; RelBench compares naive times")
        stamps[what] = ts
    if len(stamps) == 2 and not stamps["val_timestamp"] < stamps["test_timestamp"]:
        err(
            f"manifest: val_timestamp {stamps['val_timestamp']} is not before "
            f"test_timestamp {stamps['test_timestamp']}"
        )
    return stamps


def _read_tables(dataset_dir: Path, manifest, report: ValidationReport) -> dict[str, pd.DataFrame]:
    """Every table of the manifest whose parquet file reads. All are read before any is
    checked: foreign keys need their parents' sizes."""
    frames: dict[str, pd.DataFrame] = {}
    for name in manifest.tables:
        why = _odd_identifier(name)
        if why:
            report.info.append(f"table '{name}': name has {why} (works; quote it in SQL)")
        path = dataset_dir / "db" / f"{name}.parquet"
        if not path.is_file():
            report.errors.append(f"{_where(name)}: db/{name}.parquet is missing")
            continue
        try:
            frames[name] = pd.read_parquet(path)
        except Exception as exc:
            report.errors.append(
                f"{_where(name)}: db/{name}.parquet cannot be read: "
                f"{error_summary(exc, whole=True)}"
            )
    extra = sorted(
        p.stem for p in (dataset_dir / "db").glob("*.parquet") if p.stem not in manifest.tables
    )
    for name in extra:
        report.warnings.append(
            f"table '{name}': db/{name}.parquet is not in manifest.yaml, so RelBench ignores it"
        )
    return frames


def _check_table(
    name: str, spec, frames: dict[str, pd.DataFrame], manifest, report, counts: dict
) -> None:
    """One table: its column names, the columns the manifest names, its primary key, its
    time column, its foreign keys. Null times and null or dangling references go into
    ``counts``."""
    err, warn = report.errors.append, report.warnings.append
    df = frames[name]
    for col in df.columns:
        why = _odd_identifier(str(col))
        if why:
            report.info.append(f"{_where(name, col)}: name has {why} (works; quote it in SQL)")
    named = [("pkey", spec.pkey), ("time_col", spec.time_col), *[("fkey", c) for c in spec.fkeys]]
    for what, col in named:
        if col is not None and col not in df.columns:
            err(
                f"{_where(name, col)}: named as {what} in manifest.yaml "
                f"but missing from db/{name}.parquet"
            )
    if len(df) == 0:
        err(f"{_where(name)}: empty (0 rows)")
    if spec.pkey is not None and spec.pkey in df.columns:
        _check_pkey(name, spec.pkey, df[spec.pkey], err)
    if spec.time_col is not None and spec.time_col in df.columns:
        keyed = spec.pkey is not None
        nulls = _check_time(name, spec.time_col, df[spec.time_col], keyed, err, warn)
        if nulls:
            counts["null_times"][f"{name}.{spec.time_col}"] = nulls
    for col in df.columns:
        if col != spec.time_col and isinstance(df[col].dtype, pd.DatetimeTZDtype):
            warn(
                f"{_where(name, col)}: timezone-aware ({df[col].dtype.tz}); "
                "the time columns are naive"
            )
    for col, parent in spec.fkeys.items():
        if col in df.columns:
            _check_reference(name, col, parent, frames, manifest, err, counts)


def _check_reference(name: str, col: str, parent: str, frames, manifest, err, counts) -> None:
    """One foreign key: to a known table with a primary key, holding ids in its range."""
    if parent not in manifest.tables:
        err(f"{_where(name, col)}: foreign key to unknown table '{parent}'")
        return
    if manifest.tables[parent].pkey is None:
        err(f"{_where(name, col)}: foreign key to table '{parent}', which has no primary key")
        return
    if parent not in frames:
        return
    label = f"{name}.{col}"
    n_null, n_bad = _check_fkey(name, col, frames[name][col], parent, len(frames[parent]), err)
    counts["null_fkeys"][label] = n_null
    if n_bad:
        counts["dangling_fkeys"][label] = n_bad


def _rows_upto(test: pd.Timestamp, manifest, frames: dict[str, pd.DataFrame]) -> int:
    """How many rows RelBench keeps up to the test timestamp (all of an untimed table)."""
    upto = {}
    for name, spec in manifest.tables.items():
        if (
            name in frames
            and spec.time_col in frames[name].columns
            and pd.api.types.is_datetime64_dtype(frames[name][spec.time_col].dtype)
        ):
            upto[name] = int((frames[name][spec.time_col] <= test).sum())
        elif name in frames:
            upto[name] = len(frames[name])
    return sum(upto.values())


def _check_tasks(
    dataset_dir: Path, manifest, frames: dict[str, pd.DataFrame], stamps: dict, report
) -> None:
    """Every ``tasks/<task>/manifest.yaml``: it parses, names tables of the dataset, and its
    window fits between the validation and test timestamps."""
    from relbench.manifest import TaskManifest

    err, warn = report.errors.append, report.warnings.append
    task_dirs = sorted(p.parent for p in (dataset_dir / "tasks").glob("*/manifest.yaml"))
    report.counts["tasks"] = len(task_dirs)
    for task_dir in task_dirs:
        tname = task_dir.name
        try:
            tm = TaskManifest.load(task_dir / "manifest.yaml")
            tm.validate()
        except Exception as exc:
            err(f"task '{tname}': manifest cannot be used: {error_summary(exc, whole=True)}")
            continue
        for what in ("entity_table", "src_entity_table", "dst_entity_table"):
            table = getattr(tm, what)
            if table is not None and table not in manifest.tables:
                err(f"task '{tname}': {what} '{table}' is not a table of the dataset")
        if (
            tm.entity_table in frames
            and tm.entity_col
            and manifest.tables[tm.entity_table].pkey is None
        ):
            err(
                f"task '{tname}': entity table '{tm.entity_table}' "
                "has no primary key to predict about"
            )
        for pair in tm.remove_columns or []:
            if not _names_column(pair, frames):
                warn(
                    f"task '{tname}': remove_columns entry {pair!r} names no column of the dataset"
                )
        if tm.timedelta and len(stamps) == 2:
            _check_task_window(tname, tm.timedelta, stamps, err)


def _names_column(pair, frames: dict[str, pd.DataFrame]) -> bool:
    """Whether a ``remove_columns`` entry is a ``[table, column]`` of the dataset."""
    return (
        isinstance(pair, (list, tuple))
        and len(pair) == 2
        and pair[0] in frames
        and pair[1] in frames[pair[0]].columns
    )


def _check_task_window(tname: str, timedelta, stamps: dict, err) -> None:
    try:
        delta = pd.Timedelta(timedelta)
    except (TypeError, ValueError):
        err(f"task '{tname}': timedelta {timedelta!r} is not a duration")
        return
    if stamps["test_timestamp"] - stamps["val_timestamp"] < delta:
        err(f"task '{tname}': timedelta {timedelta} is longer than test - val")


def _check_sidecars(
    dataset_dir: Path, frames: dict[str, pd.DataFrame], report: ValidationReport
) -> None:
    """``tve_types.json`` must name real columns with known types; ``tve_import.json``'s
    counts (what the import changed or added) go into ``counts["import_report"]``."""
    types_path = dataset_dir / TYPES_FILE
    if types_path.is_file():
        try:
            columns = json.loads(types_path.read_text())["columns"]
            items = [(t, c, v) for t, cols in columns.items() for c, v in cols.items()]
        except Exception as exc:
            report.errors.append(f"{TYPES_FILE} cannot be read: {error_summary(exc, whole=True)}")
            items = []
        for table, col, typ in items:
            if typ not in SEMANTIC_TYPES:
                report.errors.append(
                    f"{_where(table, col)}: {TYPES_FILE} gives unknown type {typ!r}"
                )
            elif table in frames and col not in frames[table].columns:
                report.warnings.append(
                    f"{_where(table, col)}: named in {TYPES_FILE} but not in db/{table}.parquet"
                )
            elif table not in frames:
                report.warnings.append(
                    f"{_where(table, col)}: named in {TYPES_FILE}, "
                    "but the dataset has no such table"
                )
    import_path = dataset_dir / "tve_import.json"
    if import_path.is_file():
        try:
            imported = json.loads(import_path.read_text())
        except ValueError as exc:
            report.warnings.append(
                f"tve_import.json cannot be read: {error_summary(exc, whole=True)}"
            )
            return
        if isinstance(imported, dict):
            report.counts["import_report"] = {k: v for k, v in imported.items() if k != "source"}


def _check_numeric_text(
    dataset_dir: Path, manifest, frames: dict[str, pd.DataFrame], report: ValidationReport
) -> None:
    """Warn about columns of numbers stored as text because of a few words ("NA", "-"),
    unless ``tve_types.json`` declares the column's type (the user chose it); the counts go
    into ``counts["numeric_tokens"]`` (``{"table.column": {word: count}}``)."""
    declared, inferred, formats = {}, {}, {}
    try:
        types = json.loads((dataset_dir / TYPES_FILE).read_text())
        declared, inferred = types.get("overrides", {}), types.get("columns", {})
    except (OSError, ValueError, AttributeError):
        pass  # no sidecar, or one _check_sidecars already reported
    try:
        sources = json.loads((dataset_dir / "tve_import.json").read_text())["source"]["tables"]
        formats = {name: source.get("format") for name, source in sources.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    found = {}
    for name, spec in manifest.tables.items():
        if name not in frames:
            continue
        keys = {spec.pkey, spec.time_col, *spec.fkeys}
        for col in frames[name].columns:
            if col in keys or col in declared.get(name, {}):
                continue
            numbers, tokens = numeric_text_tokens(frames[name][col])
            if not tokens:
                continue
            found[f"{name}.{col}"] = tokens
            typed = inferred.get(name, {}).get(col)
            report.warnings.append(
                numeric_tokens_line(
                    _where(name, col),
                    col,
                    numbers,
                    tokens,
                    f"stored as text{f' and typed {typed}' if typed else ''}",
                    csv=formats.get(name, "csv") == "csv",
                )
            )
    report.counts["numeric_tokens"] = found


def _check_pkey(name: str, col: str, key: pd.Series, err) -> None:
    where = _where(name, col)
    nulls = int(key.isna().sum())
    if nulls:
        err(f"{where}: primary key is null in {nulls} rows")
    values = key.dropna()
    dup = values[values.duplicated(keep=False)]
    if len(dup):
        err(
            f"{where}: primary key has {int(values.duplicated().sum())} duplicate values, "
            f"e.g. {_sample(dup.unique())}"
        )
    if not pd.api.types.is_integer_dtype(key.dtype):
        err(f"{where}: primary key must hold integers 0..n-1, got {key.dtype}")
        return
    if nulls or len(dup):
        return
    expected = np.arange(len(key))
    actual = key.to_numpy(dtype="int64")
    if not np.array_equal(actual, expected):
        first = int(np.argmax(actual != expected))
        err(
            f"{where}: primary key is not 0..{len(key) - 1} in row order (row {first} holds "
            f"{int(actual[first])}); RelBench 3 requires it, reindex on import"
        )


def _check_fkey(
    name: str, col: str, ref: pd.Series, parent: str, n_parent: int, err
) -> tuple[int, int]:
    where = _where(name, col)
    n_null = int(ref.isna().sum())
    values = ref.dropna()
    if pd.api.types.is_bool_dtype(ref.dtype) or not pd.api.types.is_numeric_dtype(ref.dtype):
        err(
            f"{where}: foreign key to '{parent}' must hold integer ids 0..n-1, got {ref.dtype}, "
            f"e.g. {_sample(values.unique())}"
        )
        return n_null, 0
    if pd.api.types.is_float_dtype(ref.dtype):
        fractional = values[values != np.floor(values)]
        if len(fractional):
            err(
                f"{where}: foreign key to '{parent}' has {len(fractional)} non-integer values, "
                f"e.g. {_sample(fractional.unique())}"
            )
            return n_null, 0
    bad = values[(values < 0) | (values >= n_parent)]
    if len(bad):
        err(
            f"{where}: {len(bad)} dangling foreign keys "
            f"(not in 0..{n_parent - 1} of table '{parent}'), e.g. {_sample(pd.unique(bad))}"
        )
    return n_null, len(bad)


def _check_time(name: str, col: str, ser: pd.Series, keyed: bool, err, warn) -> int:
    """Check one time column; return how many rows have no time."""
    from relbench.base import is_time_sorted

    where = _where(name, col)
    if not col.isidentifier() or keyword.iskeyword(col):
        err(
            f"{where}: a time column name must be a Python identifier (RelBench filters it with "
            "DataFrame.query); rename it, e.g. spaces to _"
        )
    dtype = ser.dtype
    nulls = int(ser.isna().sum())
    if isinstance(dtype, pd.DatetimeTZDtype):
        err(
            f"{where}: time column is timezone-aware ({dtype.tz}); RelBench compares naive "
            "times, convert and drop the zone"
        )
    elif not pd.api.types.is_datetime64_dtype(dtype):
        _diagnose_stored_times(where, ser, err)
        return nulls
    if nulls:
        warn(f"{where}: {nulls} rows have no time; RelBench never shows them to a model")
    if keyed and not is_time_sorted(ser):
        err(
            f"{where}: rows are not sorted by the time column (rows without a time last); "
            "RelBench's upto() keeps a prefix, so 0..n-1 keys break"
        )
    return nulls


def _diagnose_stored_times(where: str, ser: pd.Series, err) -> None:
    """Why a time column that is not ``datetime64`` is not: numbers, datetime objects
    (mixed timezones), values that are not timestamps, mixed UTC offsets, or plain text."""
    dtype = ser.dtype
    if pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
        err(f"{where}: time column holds {dtype}, not datetimes")
        return
    values = ser.dropna()
    kinds = {type(v).__name__ for v in values}
    if kinds and kinds <= {"Timestamp", "datetime"}:
        zones = {str(getattr(v, "tzinfo", None)) for v in values}
        if len(zones) > 1:
            err(f"{where}: mixed timezones in the time column ({', '.join(sorted(zones))})")
        else:
            err(f"{where}: time column is stored as {dtype} objects, not datetime64")
        return
    text = values.astype(str)
    parsed = pd.to_datetime(text, errors="coerce", format="mixed", utc=True)
    bad = text[parsed.isna()]
    offsets = has_utc_offset(text)
    if len(bad):
        err(
            f"{where}: time column has {len(bad)} values that are not timestamps, "
            f"e.g. {_sample(bad.unique())}"
        )
    elif offsets.any() and not offsets.all():
        err(
            f"{where}: mixed timezones: {int(offsets.sum())} values carry a UTC offset, "
            f"{int((~offsets).sum())} do not"
        )
    else:
        err(f"{where}: time column is stored as text ({dtype}), not datetime64; parse it on import")
