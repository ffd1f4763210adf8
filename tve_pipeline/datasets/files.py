"""Import a user's own database (CSV, Parquet, SQLite or DuckDB) into a RelBench 3 dataset folder.

``build_from_files(schema_yaml, out_dir)`` reads the tables named in a short YAML file,
normalises keys, times and types the way RelBench 3 needs them, and writes the dataset
folder atomically with :func:`tve_pipeline.datasets.writer.write_dataset`.

The YAML format
===============

Paths are relative to the YAML file. Table and column names may contain spaces, quotes
and non-ASCII letters (quote them in YAML and, in task SQL, as DuckDB identifiers:
``"order lines"``)::

    name: shop                        # dataset name (default: the output folder's name)
    description: My shop's orders     # optional
    val_timestamp: 2021-07-01         # required; rows up to here train, after it validate
    test_timestamp: 2021-10-01        # required
    missing_parents: add_parents      # dangling foreign keys: null (default) or add_parents
    timezone: Europe/Berlin           # optional: zone for times with a UTC offset (default UTC)
    null_values: ["-"]                # optional: CSV fields read as null besides empty ones
    tables:
      customers:
        csv: data/customers.csv       # one of csv / parquet / sqlite / duckdb
        primary_key: customer_id
        time_column: signup_time
        types: {zip: categorical}     # optional overrides of inferred semantic types
        null_values: ["NA", "n/a"]    # optional: this table's markers (instead of the file's)
      orders:
        parquet: data/orders.parquet
        primary_key: order_no
        time_column: ordered at
        foreign_keys: {customer_id: customers}
      order lines:
        sqlite: data/shop.db
        table: order_lines            # name inside the file (default: this table's name)
        primary_key: [order_no, line_no]   # composite: a surrogate key is added
        key_column: line_id                # its name (default "<table>_id")
        foreign_keys: {order_no: orders}
      reviews:
        duckdb: data/shop.duckdb
        query: SELECT * FROM reviews WHERE stars IS NOT NULL   # instead of table:
        time_column: written_at       # no primary key: surrogate key "reviews_id"
        time_format: "%d.%m.%Y %H:%M" # optional: strftime format, or s / ms / us / ns for epochs
        foreign_keys:
          customer_id: customers
          line_id: {columns: [order_no, line_no], references: order lines}
    tasks:                            # optional: RelBench task manifests (default kind: forecast)
      - name: customer-churn
        task_type: binary_classification
        entity_table: customers
        entity_col: customer_id
        target_col: churn
        time_col: timestamp
        timedelta: 30 days
        sql: |
          SELECT t.timestamp AS timestamp, c.customer_id AS customer_id,
                 CAST(COUNT(o.order_no) = 0 AS INTEGER) AS churn
          FROM timestamps t
          JOIN customers c ON c.signup_time <= t.timestamp
          LEFT JOIN orders o ON o.customer_id = c.customer_id
              AND o."ordered at" > t.timestamp
              AND o."ordered at" <= t.timestamp + INTERVAL '{timedelta}'
          GROUP BY t.timestamp, c.customer_id

A top-level ``sqlite: path`` or ``duckdb: path`` is the default source of tables that name
none. CSV files are read with ``pandas.read_csv`` (``read_options`` passes more keyword
arguments to it), but only empty fields are null: ``NA``, ``N/A``, ``null``, ``NaN``,
``None`` and the rest of pandas' default null markers stay text values. ``null_values``
(a string or a list of strings, matched exactly, as ``pandas.read_csv``'s ``na_values``)
opts in to more markers: at the top level for every CSV table, in a table for that table
alone (replacing the top-level list; ``[]`` opts out). They apply to CSV sources only
(``read_options`` may not set ``na_values``, ``keep_default_na`` or ``na_filter``).

The file is read with ``yaml.safe_load`` and checked by typed models
(:mod:`tve_pipeline.datasets.import_schema`: :class:`ImportSchema`, its :class:`TableSchema`
and :class:`ForeignKeySchema`, its tasks as RelBench's ``TaskManifest``); unknown keys are
errors, and every problem is one line naming the
table and column (or task).

What the import does
====================

* **Keys.** RelBench 3 needs primary keys 0..n-1 in row order. A table with a time column
  is sorted by it (stable; rows without a time go last), then numbered. A single-column
  primary key ``k`` is renumbered *in place* (the column keeps its name, so task SQL joins
  read as before) and the original ids move to ``k_original`` (or ``original_id_column``);
  with ``key_column`` set, the new key gets that name instead and the original column
  stays as it is. A composite or missing primary key gets a surrogate key (``key_column``,
  default ``<table>_id``) as the first column; the composite's columns stay. Short-form
  foreign keys (``column: parent``) are rewritten in place to the parent's new ids; the
  long form (``new_column: {columns: [...], references: parent}``) adds ``new_column`` and
  keeps the source columns (needed for composite references). Keys are matched by value,
  with whole floats and integers equal and numbers compared as text against text ids.
* **Dangling foreign keys** (a reference to an id the parent lacks): ``missing_parents:
  null`` sets them to null; ``add_parents`` appends one placeholder parent row (key
  columns set, everything else null) per distinct missing id. (A placeholder in a table
  with a time column has no time unless the time is part of its key, so RelBench's
  time-filtered views leave it out and the references to it read as null there.) Either
  way they are counted in ``tve_import.json`` (``unmatched_fkeys`` / ``added_parents``),
  as are references that were null already (``null_fkeys``).
* **Times.** Time columns and columns typed ``timestamp`` are parsed (ISO 8601 first, or
  ``time_format``); a string column whose every value is an ISO date is parsed too.
  Values with a UTC offset, and epoch numbers (which count in UTC), are converted to
  ``timezone`` and made naive (RelBench compares naive times); a column mixing values
  with and without an offset, or holding values that are not timestamps, is an error
  naming the table, column and a sample. Rows with no
  time are kept and counted (``null_times``); RelBench never shows them to a model.
  RelBench filters time columns with ``DataFrame.query``, which cannot name a column that
  is not a Python identifier, so such a time column is renamed (``ordered at`` ->
  ``ordered_at``), listed under ``renamed_columns``; task SQL naming the old column as a
  quoted identifier (``"ordered at"``) is rewritten to the new name
  (``rewritten_task_sql``).
* **Types.** Every column's semantic type (numerical, categorical, timestamp, text, key)
  is inferred with :func:`tve_pipeline.database.infer_column_type` (keys, time columns and
  original-id columns are ``key``), overridden by ``types``, and written to
  ``tve_types.json`` (:data:`TYPES_FILE`): ``{"format": 1, "columns": {table: {column:
  type}}, "overrides": {table: {column: type}}}``. Overriding a text column as
  ``numerical`` converts it; values that are not numbers become null and are counted
  (``coerced_to_null``). Object columns mixing Python types (SQLite allows it) are stored
  as text and listed under ``cast_to_text``.
* **Numbers kept as text by a few words.** A column without a declared type whose values
  are at least half numbers and otherwise at most five distinct words (``NA``, ``n/a``,
  ``-``: :func:`tve_pipeline.common.numeric_text_tokens`) is stored as text and typed as
  any text column (categorical or text), which is rarely what its numbers mean. Its counts
  go into ``numeric_tokens`` (``{table: {column: {"numbers": n, "tokens": {word: count},
  "typed": type}}}``) and ``tve import files`` prints one ``warning:`` line per column
  naming the words, their counts and the fix: declare the words as ``null_values`` (CSV)
  or the column as ``types: {column: numerical}``. Declaring any type for the column
  silences it; ``tve validate`` warns about the same columns from the parquet files.
* **Nulls.** Every value the import turns into null is counted under ``nulls`` in
  ``tve_import.json`` (``{table: {column: count}}``, nonzero counts only, column names
  as in the source) and printed by ``tve import files`` (one line per table). It is the
  sum of three counts: CSV fields read as null (empty fields, fields missing from a short
  row, and fields equal to a ``null_values`` marker; ``read_as_null``, same shape), text
  typed ``numerical`` that is not a number (``coerced_to_null``), and dangling foreign
  keys set to null (``unmatched_fkeys``, counted in the reference column). Values that
  were null in a Parquet, SQLite or DuckDB source are not counted (nothing turned them
  into null), nor are the null cells of ``add_parents`` placeholder rows (counted as
  ``added_parents``). Times never become null: a value that does not parse is an error.
* **Tasks** are checked before anything is written: each forecast task's SQL is run once,
  at the validation timestamp, and must return its entity, target and time columns.

Errors a user can cause raise ``ValueError`` (or ``FileNotFoundError``) with one line
naming the table, column or task; an earlier build at ``out_dir`` is then left untouched.
"""

from __future__ import annotations

import hashlib
import keyword
import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from relbench.manifest import KIND_FORECAST, TableSpec, TaskManifest

from tve_pipeline.common import (
    UTC_OFFSET,
    error_summary,
    has_utc_offset,
    numeric_text_tokens,
    numeric_tokens_line,
)
from tve_pipeline.database import infer_column_type
from tve_pipeline.datasets.import_schema import _fail, _parse_schema, _TableDef
from tve_pipeline.datasets.writer import IMPORT_REPORT_FILE, write_dataset
from tve_pipeline.schema import KEY, NUMERICAL, TIMESTAMP, TYPES_FILE

_ISO = re.compile(
    r"^\d{4}-\d{2}-\d{2}"
    r"(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:\s*" + UTC_OFFSET + r")?)?$"
)
_EPOCH_UNITS = ("s", "ms", "us", "ns")


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _read(d: _TableDef) -> pd.DataFrame:
    where = f"table '{d.name}'"
    if not d.path.exists():
        raise FileNotFoundError(f"{where}: {d.kind} source {d.path} does not exist")
    try:
        if d.kind == "csv":
            # Only empty fields and the schema's own markers are null: never "NA" & co.
            na_values = ["", *d.null_values]
            return pd.read_csv(d.path, keep_default_na=False, na_values=na_values, **d.read_options)
        if d.kind == "parquet":
            return pd.read_parquet(d.path)
        sql = d.query or f"SELECT * FROM {_quote(d.table or d.name)}"
        if d.kind == "sqlite":
            con = sqlite3.connect(f"{d.path.as_uri()}?mode=ro", uri=True)
            try:
                return pd.read_sql_query(sql, con)
            finally:
                con.close()
        import duckdb

        con = duckdb.connect(str(d.path), read_only=True)
        try:
            return con.sql(sql).df()
        finally:
            con.close()
    except FileNotFoundError:
        raise
    except Exception as exc:  # parser/sqlite3/duckdb/pyarrow errors: say which table and file
        _fail(f"{where}: cannot read {d.kind} source {d.path}: {error_summary(exc, whole=True)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# Times
# --------------------------------------------------------------------------- #


def _sample(values, k: int = 5) -> list:
    out = []
    for v in values:
        if len(out) == k:
            break
        out.append(v.item() if isinstance(v, np.generic) else v)
    return out


def _to_naive(ser: pd.Series, tz: str) -> pd.Series:
    return ser.dt.tz_convert(tz).dt.tz_localize(None)


def _parse_times(ser: pd.Series, where: str, fmt: str | None, tz: str, notes: dict) -> pd.Series:
    """A naive ``datetime64[ns]`` column, or a one-line error naming ``where``."""
    if isinstance(ser.dtype, pd.DatetimeTZDtype):
        notes.setdefault("converted_timezone", []).append(where)
        return _to_naive(ser, tz).astype("datetime64[ns]")
    if pd.api.types.is_datetime64_dtype(ser.dtype):
        return ser.astype("datetime64[ns]")
    non_null = ser.dropna()
    if fmt in _EPOCH_UNITS:
        if not pd.api.types.is_numeric_dtype(ser.dtype):
            numbers = pd.to_numeric(non_null, errors="coerce")
            bad = non_null[numbers.isna()]
            if len(bad):
                _fail(
                    f"{where}: {len(bad)} values are not {fmt} epoch numbers, e.g. {_sample(bad)}"
                )
            ser = pd.to_numeric(ser, errors="coerce")
        # Epoch numbers count from 1970-01-01 UTC: shown in ``tz`` like every other time.
        if tz != "UTC":
            notes.setdefault("converted_timezone", []).append(where)
        return _to_naive(pd.to_datetime(ser, unit=fmt, utc=True), tz).astype("datetime64[ns]")
    if pd.api.types.is_numeric_dtype(ser.dtype) and len(non_null):
        _fail(
            f"{where}: holds numbers ({ser.dtype}), not timestamps; set time_format to "
            f"one of {list(_EPOCH_UNITS)} if they are epoch times"
        )
    text = non_null.astype(str).str.strip()
    # An explicit time_format says how every value reads: no offsets to look for.
    with_offset = has_utc_offset(text) if fmt is None else pd.Series(False, index=text.index)
    if with_offset.any() and not with_offset.all():
        _fail(
            f"{where}: mixed timezones: {int(with_offset.sum())} values carry a UTC offset, "
            f"{int((~with_offset).sum())} do not, "
            f"e.g. {_sample(text[with_offset], 1) + _sample(text[~with_offset], 1)}"
        )
    utc = bool(with_offset.any())
    parsed = None
    for attempt in [fmt] if fmt else ["ISO8601", "mixed"]:
        try:
            parsed = pd.to_datetime(text, format=attempt, utc=utc, errors="coerce")
        except (ValueError, TypeError):
            continue
        if parsed.notna().all():
            break
    if parsed is None or parsed.isna().any():
        bad = text if parsed is None else text[parsed.isna()]
        hint = f" with time_format {fmt!r}" if fmt else ""
        _fail(f"{where}: {len(bad)} values are not timestamps{hint}, e.g. {_sample(bad)}")
    if not pd.api.types.is_datetime64_any_dtype(parsed.dtype):  # several offsets, no utc=True
        _fail(
            f"{where}: mixed timezones (values with different UTC offsets), "
            f"e.g. {_sample(text.unique(), 2)}"
        )
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        notes.setdefault("converted_timezone", []).append(where)
        parsed = _to_naive(parsed, tz)
    out = pd.Series(pd.NaT, index=ser.index, dtype="datetime64[ns]")
    out.loc[parsed.index] = parsed.astype("datetime64[ns]").to_numpy()
    return out


def _looks_iso(ser: pd.Series) -> bool:
    if not (pd.api.types.is_object_dtype(ser.dtype) or pd.api.types.is_string_dtype(ser.dtype)):
        return False
    non_null = ser.dropna()
    if non_null.empty or not all(isinstance(v, str) for v in non_null):
        return False
    return bool(non_null.str.strip().str.match(_ISO).all())


# --------------------------------------------------------------------------- #
# Keys
# --------------------------------------------------------------------------- #


def _key_part(ser: pd.Series) -> pd.Series:
    """One key column as comparable values: whole floats -> integers, text stays text."""
    if pd.api.types.is_bool_dtype(ser.dtype):
        return ser.astype(object)
    if pd.api.types.is_float_dtype(ser.dtype):
        non_null = ser.dropna()
        if (non_null == np.floor(non_null)).all():
            return ser.astype("Int64").astype(object).where(ser.notna(), None)
    return ser.astype(object).where(ser.notna(), None)


def _key_frame(df: pd.DataFrame, cols: list[str], textual: list[bool]) -> pd.DataFrame:
    out = {}
    for i, col in enumerate(cols):
        part = _key_part(df[col])
        if textual[i] and not _is_text(df[col]):
            part = part.map(lambda v: None if v is None else str(v))
        out[f"k{i}"] = part
    return pd.DataFrame(out, index=df.index)


def _is_text(ser: pd.Series) -> bool:
    return not (
        pd.api.types.is_numeric_dtype(ser.dtype)
        or pd.api.types.is_bool_dtype(ser.dtype)
        or pd.api.types.is_datetime64_any_dtype(ser.dtype)
    )


def _unique_name(base: str, taken) -> str:
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _safe_identifier(name: str) -> str:
    out = re.sub(r"\W", "_", name)
    if not out or out[0].isdigit() or keyword.iskeyword(out):
        out = f"_{out}"
    return out


# --------------------------------------------------------------------------- #
# Import
# --------------------------------------------------------------------------- #


def _check_columns(d: _TableDef, df: pd.DataFrame) -> None:
    where = f"table '{d.name}'"
    if not df.columns.is_unique:
        dupes = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        _fail(f"{where}: duplicate column names {dupes}")
    cols = set(df.columns)
    named = [("primary_key", c) for c in d.pkey]
    named += [("time_column", d.time_column)] if d.time_column else []
    named += [(f"foreign key '{fk.new_column}'", c) for fk in d.fkeys for c in fk.columns]
    named += [("types", c) for c in d.types]
    for what, col in named:
        if col not in cols:
            _fail(
                f"{where}: {what} names column '{col}', which the source does not have "
                f"(columns: {sorted(map(str, cols))})"
            )
    replaced = ([d.pkey[0]] if d.original_id_column else []) + [
        fk.columns[0] for fk in d.fkeys if fk.in_place
    ]
    if d.time_column and d.time_column in replaced:
        _fail(f"{where}: time_column '{d.time_column}' cannot also be a renumbered key column")
    if d.original_id_column and d.pkey[0] in [fk.columns[0] for fk in d.fkeys if fk.in_place]:
        _fail(
            f"{where}: column '{d.pkey[0]}' is both the primary key and a foreign key; "
            "set key_column to give the new primary key another name"
        )
    new_cols = [d.key_column] if not d.original_id_column else []
    new_cols += [d.original_id_column] if d.original_id_column else []
    new_cols += [fk.new_column for fk in d.fkeys if not fk.in_place]
    for col in new_cols:
        if col in cols:
            _fail(
                f"{where}: new column '{col}' already exists in the source; "
                "choose another name in the schema"
            )
    if len(set(new_cols)) != len(new_cols):
        _fail(f"{where}: two new key columns would share a name: {new_cols}")


def build_from_files(schema_yaml: str | Path, out_dir: str | Path) -> Path:
    """Build a RelBench 3 dataset folder at ``out_dir`` from the tables ``schema_yaml`` names.

    The steps, each a function below: the schema file; the sources as they are; each
    table's values (times, numbers, text); the primary keys (comparable, unique); the
    placeholder parents (``add_parents``); the rows in time order; the new 0..n-1 keys and
    the references mapped to them; the final tables and their semantic types; the tasks;
    then the dataset folder, with what the import did in ``tve_import.json``.
    """
    schema_yaml = Path(schema_yaml).expanduser().resolve()
    out_dir = Path(out_dir)
    schema, defs = _parse_schema(schema_yaml)
    add_parents = schema.missing_parents == "add_parents"
    notes: dict[str, Any] = {}
    frames, sources = _read_sources(defs, notes)
    raw_rows = {name: len(df) for name, df in frames.items()}
    source_columns = {name: list(df.columns) for name, df in frames.items()}
    for name, d in defs.items():
        frames[name] = _parse_values(d, frames[name], schema.timezone, notes)
    textual = _key_kinds(defs, frames, notes)
    _check_primary_keys(defs, frames, textual)
    added = _add_parents(defs, frames, textual) if add_parents else {}
    _sort_by_time(defs, frames)
    new_fkeys, null_fkeys, unmatched = _map_references(defs, frames, textual)
    if add_parents:
        assert not any(unmatched.values()), unmatched
        unmatched = {}
    tables, renamed, original_cols = _final_tables(defs, frames, new_fkeys)
    types, overrides = _resolve_types(defs, tables, original_cols, renamed)
    tasks = schema.tasks
    rewritten = _rewrite_renamed(tasks, renamed, tables)
    _check_task_sql(tasks, {name: df for name, (df, _) in tables.items()}, schema.val_timestamp)
    nulls = _null_counts(defs, source_columns, notes, unmatched)
    numeric_tokens = notes.get("numeric_tokens", {})
    for name, columns in numeric_tokens.items():
        for col, entry in columns.items():
            entry["typed"] = types[name].get(col)

    report = {
        "source": {"schema": str(schema_yaml), "tables": sources},
        "policy": schema.missing_parents,
        "raw_rows": raw_rows,
        "rows": {name: len(df) for name, (df, _) in tables.items()},
        "added_parents": added,
        "unmatched_fkeys": unmatched,
        "null_fkeys": null_fkeys,
        "renamed_columns": renamed,
        "rewritten_task_sql": rewritten,
        "null_times": notes.get("null_times", {}),
        "converted_timezone": {
            "to": schema.timezone,
            "columns": notes.get("converted_timezone", []),
        },
        "nulls": nulls,
        "read_as_null": notes.get("read_as_null", {}),
        "coerced_to_null": notes.get("coerced_to_null", {}),
        "cast_to_text": notes.get("cast_to_text", []),
        "left_as_text": notes.get("left_as_text", []),
        "numeric_tokens": numeric_tokens,
    }
    sidecar_types = {"format": 1, "columns": types, "overrides": overrides}
    return write_dataset(
        out_dir,
        str(schema.name or out_dir.name),
        tables,
        schema.val_timestamp,
        schema.test_timestamp,
        tasks,
        schema.description,
        sidecars={IMPORT_REPORT_FILE: report, TYPES_FILE: sidecar_types},
    )


def _read_sources(defs: dict[str, _TableDef], notes: dict) -> tuple[dict[str, pd.DataFrame], dict]:
    """Every table as its source holds it (column names as text, checked against the
    schema), and where each came from (format, path, sha256, table or query; a CSV's null
    markers). The cells a CSV read as null are counted per column (``read_as_null``)."""
    frames: dict[str, pd.DataFrame] = {}
    sources: dict[str, dict] = {}
    hashes: dict[Path, str] = {}
    for name, d in defs.items():
        df = _read(d)
        df.columns = [str(c) for c in df.columns]
        _check_columns(d, df)
        if d.path not in hashes:
            hashes[d.path] = _sha256(d.path)
        in_file = d.kind in ("sqlite", "duckdb") and not d.query
        sources[name] = {
            "format": d.kind,
            "path": str(d.path),
            "sha256": hashes[d.path],
            **({"table": d.table or name} if in_file else {}),
            **({"query": d.query} if d.query else {}),
            **({"null_values": ["", *d.null_values]} if d.kind == "csv" else {}),
        }
        if d.kind == "csv":  # a CSV has no nulls of its own: every one is the reader's
            counts = {col: int(n) for col, n in df.isna().sum().items() if n}
            if counts:
                notes.setdefault("read_as_null", {})[name] = counts
        frames[name] = df
    return frames, sources


def _null_counts(defs, source_columns, notes: dict, unmatched: dict) -> dict:
    """Every value the import turned into null, per table and column (nonzero counts
    only): CSV cells read as null, text typed ``numerical`` that is not a number, dangling
    references set to null."""
    read = notes.get("read_as_null", {})
    coerced = notes.get("coerced_to_null", {})
    nulls: dict[str, dict[str, int]] = {}
    for name, d in defs.items():
        counts: dict[str, int] = {}
        for col in source_columns[name]:
            counts[col] = read.get(name, {}).get(col, 0) + coerced.get(f"{name}.{col}", 0)
        for fk in d.fkeys:
            counts[fk.new_column] = counts.get(fk.new_column, 0) + unmatched.get(
                f"{name}.{fk.new_column}", 0
            )
        counts = {col: n for col, n in counts.items() if n}
        if counts:
            nulls[name] = counts
    return nulls


def null_summary(report: Mapping) -> list[str]:
    """The lines ``tve import files`` prints about ``report["nulls"]`` (a
    ``tve_import.json``): one per table with values that became null, its columns by
    count (most first, then by name), e.g. ``orders: 3 values became null (status 2,
    note 1)``."""
    lines = []
    for name, counts in sorted(report.get("nulls", {}).items()):
        total = sum(counts.values())
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        each = ", ".join(f"{col} {n}" for col, n in ranked)
        lines.append(f"{name}: {total} value{'' if total == 1 else 's'} became null ({each})")
    return lines


def _parse_values(d: _TableDef, df: pd.DataFrame, tz: str, notes: dict) -> pd.DataFrame:
    """A table's values as the dataset holds them: times parsed (the time column, columns
    typed or stored as timestamps, ISO text), text typed ``numerical`` as numbers, object
    columns mixing Python types as text; rows without a time counted."""
    name = d.name
    keys = {*d.pkey, *(c for fk in d.fkeys for c in fk.columns)}
    for col in df.columns:
        where = f"table '{name}': column '{col}'"
        ser = df[col]
        wanted = d.types.get(col)
        if wanted is None and col != d.time_column and col not in keys:
            _note_numeric_tokens(name, col, ser, notes)
        if col == d.time_column:
            df[col] = _parse_times(
                ser, f"table '{name}': time column '{col}'", d.time_format, tz, notes
            )
        elif wanted == TIMESTAMP or isinstance(ser.dtype, pd.DatetimeTZDtype):
            df[col] = _parse_times(ser, where, None, tz, notes)
        elif wanted is None and _looks_iso(ser):
            try:
                df[col] = _parse_times(ser, where, None, tz, notes)
            except ValueError:  # e.g. mixed offsets in a column that is not the time
                notes.setdefault("left_as_text", []).append(f"{name}.{col}")
        elif wanted == NUMERICAL and not pd.api.types.is_numeric_dtype(ser.dtype):
            numbers = pd.to_numeric(ser, errors="coerce")
            lost = int((numbers.isna() & ser.notna()).sum())
            if lost:
                notes.setdefault("coerced_to_null", {})[f"{name}.{col}"] = lost
            df[col] = numbers
        elif pd.api.types.is_object_dtype(ser.dtype):
            kinds = {type(v) for v in ser.dropna()}
            if len(kinds) > 1 and not kinds <= {int, float, np.int64, np.float64}:
                notes.setdefault("cast_to_text", []).append(f"{name}.{col}")
                df[col] = ser.map(lambda v: None if pd.isna(v) else str(v)).astype(object)
            elif kinds and kinds <= {int, float, np.int64, np.float64}:
                df[col] = pd.to_numeric(ser)
    if d.time_column:
        nulls = int(df[d.time_column].isna().sum())
        if nulls:
            notes.setdefault("null_times", {})[f"{name}.{d.time_column}"] = nulls
    return df


def _note_numeric_tokens(name: str, col: str, ser: pd.Series, notes: dict) -> None:
    """A column of numbers stored as text because of a few words ("NA", "-"): its counts
    go into ``numeric_tokens`` (the import then prints one line with the fix)."""
    numbers, tokens = numeric_text_tokens(ser)
    if tokens:
        entry = {"numbers": numbers, "tokens": tokens}
        notes.setdefault("numeric_tokens", {}).setdefault(name, {})[col] = entry


def numeric_tokens_summary(report: Mapping) -> list[str]:
    """The lines ``tve import files`` prints about ``report["numeric_tokens"]`` (a
    ``tve_import.json``): one per column of numbers that a few words kept as text, naming
    the words, their counts and the fix (:func:`tve_pipeline.common.numeric_tokens_line`)."""
    tables = report.get("source", {}).get("tables", {})
    lines = []
    for name, columns in sorted(report.get("numeric_tokens", {}).items()):
        csv = tables.get(name, {}).get("format", "csv") == "csv"
        for col, entry in sorted(columns.items()):
            typed = f"typed {entry['typed']}" if entry.get("typed") else "text"
            line = numeric_tokens_line(
                f"table '{name}': column '{col}'",
                col,
                entry["numbers"],
                entry["tokens"],
                typed,
                csv=csv,
            )
            lines.append(f"warning: {line}")
    return lines


def _key_kinds(
    defs: dict[str, _TableDef], frames: dict[str, pd.DataFrame], notes: dict
) -> dict[str, list[bool]]:
    """Per keyed table, which primary key columns are compared as text: those that are
    text on either side of a reference. A parent's ids that a child names by text become
    text too (``cast_to_text``)."""
    textual: dict[str, list[bool]] = {}
    for name, d in defs.items():
        if d.pkey:
            textual[name] = [_is_text(frames[name][c]) for c in d.pkey]
    for d in defs.values():
        for fk in d.fkeys:  # text on either side: compare as text
            flags = textual[fk.parent]
            for i, col in enumerate(fk.columns):
                flags[i] = flags[i] or _is_text(frames[d.name][col])
    for name, d in defs.items():
        for i, col in enumerate(d.pkey):
            if textual[name][i] and not _is_text(frames[name][col]):
                notes.setdefault("cast_to_text", []).append(f"{name}.{col}")
                frames[name][col] = _key_part(frames[name][col]).map(
                    lambda v: None if v is None else str(v)
                )
    return textual


def _check_primary_keys(defs, frames: dict[str, pd.DataFrame], textual) -> None:
    """Primary keys are unique and never null, compared as the references compare them."""
    for name, d in defs.items():
        if not d.pkey:
            continue
        keys = _key_frame(frames[name], d.pkey, textual[name])
        label = "+".join(d.pkey)
        null = keys.isna().any(axis=1)
        if null.any():
            _fail(f"table '{name}': primary key '{label}' is null in {int(null.sum())} rows")
        dup = keys.duplicated(keep=False)
        if dup.any():
            values = keys[dup].drop_duplicates().head(5).itertuples(index=False, name=None)
            sample = [v[0] if len(v) == 1 else v for v in values]
            _fail(
                f"table '{name}': primary key '{label}' has {int(keys.duplicated().sum())} "
                f"duplicate values, e.g. {sample}"
            )


def _add_parents(defs, frames: dict[str, pd.DataFrame], textual) -> dict[str, int]:
    """``add_parents``: one placeholder parent row (key columns set, the rest null) per
    distinct id a reference names and its parent lacks, added before any key is numbered.
    Returns how many were added per parent table."""
    added: dict[str, int] = {}
    for name, d in defs.items():
        for fk in d.fkeys:
            parent = defs[fk.parent]
            flags = textual[fk.parent]
            child_keys = _key_frame(frames[name], fk.columns, flags).dropna().drop_duplicates()
            parent_keys = _key_frame(frames[fk.parent], parent.pkey, flags)
            have = set(parent_keys.itertuples(index=False, name=None))
            missing = [k for k in child_keys.itertuples(index=False, name=None) if k not in have]
            if not missing:
                continue
            missing = sorted(missing, key=lambda k: tuple(str(v) for v in k))
            pdf = frames[fk.parent]
            rows = {}
            for i, col in enumerate(parent.pkey):
                values = [k[i] for k in missing]
                rows[col] = _placeholder_column(values, pdf[col])
            frames[fk.parent] = pd.concat([pdf, pd.DataFrame(rows)], ignore_index=True)
            added[fk.parent] = added.get(fk.parent, 0) + len(missing)
    return added


def _sort_by_time(defs, frames: dict[str, pd.DataFrame]) -> None:
    """Row order is key order: a table with a time column is sorted by it (stable, rows
    without a time last), placeholders included (their time is set when it is a key part)."""
    for name, d in defs.items():
        if d.time_column:
            frames[name] = (
                frames[name]
                .sort_values(d.time_column, kind="stable", na_position="last")
                .reset_index(drop=True)
            )


def _map_references(defs, frames: dict[str, pd.DataFrame], textual) -> tuple[dict, dict, dict]:
    """Number every keyed table's rows 0..n-1 and map each reference to the new number:
    (new foreign key columns per table, null references, references to no parent)."""
    key_maps: dict[str, pd.DataFrame] = {}
    for name, d in defs.items():
        if d.pkey:
            keys = _key_frame(frames[name], d.pkey, textual[name])
            key_maps[name] = keys.assign(__new=np.arange(len(keys), dtype="int64"))
    null_fkeys: dict[str, int] = {}
    unmatched: dict[str, int] = {}
    new_fkey_cols: dict[str, dict[str, pd.Series]] = {}
    for name, d in defs.items():
        for fk in d.fkeys:
            label = f"{name}.{fk.new_column}"
            child = _key_frame(frames[name], fk.columns, textual[fk.parent])
            any_null = child.isna().any(axis=1)
            merged = child.merge(
                key_maps[fk.parent], how="left", on=list(child.columns), validate="many_to_one"
            )
            new = pd.Series(merged["__new"].to_numpy(), index=child.index)
            new[any_null] = np.nan
            null_fkeys[label] = int(any_null.sum())
            unmatched[label] = int((new.isna() & ~any_null).sum())
            new = new.astype("Int64") if new.isna().any() else new.astype("int64")
            new_fkey_cols.setdefault(name, {})[fk.new_column] = new
    return new_fkey_cols, null_fkeys, unmatched


def _final_tables(defs, frames: dict[str, pd.DataFrame], new_fkey_cols) -> tuple[dict, dict, dict]:
    """Every table as the dataset holds it, with its ``TableSpec``: (tables, renamed time
    columns per table, original-id columns per table)."""
    tables: dict[str, tuple[pd.DataFrame, TableSpec]] = {}
    renamed: dict[str, dict[str, str]] = {}
    original_cols: dict[str, list[str]] = {}
    for name, d in defs.items():
        df, originals = _with_new_keys(d, frames[name], new_fkey_cols.get(name, {}))
        time_col = d.time_column
        if time_col is not None and (not time_col.isidentifier() or keyword.iskeyword(time_col)):
            # RelBench filters time columns with DataFrame.query: a Python identifier.
            safe = _unique_name(_safe_identifier(time_col), set(df.columns))
            df = df.rename(columns={time_col: safe})
            renamed.setdefault(name, {})[time_col] = safe
            time_col = safe
        spec = TableSpec(
            pkey=d.key_column,
            time_col=time_col,
            fkeys={fk.new_column: fk.parent for fk in d.fkeys},
        )
        tables[name] = (df, spec)
        original_cols[name] = originals
    return tables, renamed, original_cols


def _with_new_keys(d: _TableDef, df: pd.DataFrame, new_fkeys: dict[str, pd.Series]):
    """A table with its new 0..n-1 key (in place, the original ids beside it, or a new
    first column) and its references replaced or added; and its original-id columns."""
    new_key = pd.Series(np.arange(len(df), dtype="int64"), index=df.index)
    originals = []
    if d.pkey and d.original_id_column:  # single key renumbered in place
        col = d.pkey[0]
        position = df.columns.get_loc(col)
        original = df[col]
        df = df.drop(columns=[col])
        df.insert(position, col, new_key)
        df.insert(position + 1, d.original_id_column, original)
        originals = [d.original_id_column]
    else:
        df.insert(0, d.key_column, new_key)
        if len(d.pkey) == 1:
            originals = [d.pkey[0]]
    for fk in d.fkeys:
        new = new_fkeys[fk.new_column]
        if fk.in_place:
            col = fk.columns[0]
            position = df.columns.get_loc(col)
            df = df.drop(columns=[col])
            df.insert(position, col, new)
        else:
            df.insert(df.columns.get_loc(fk.columns[0]), fk.new_column, new)
    return df, originals


def _placeholder_column(values: list, like: pd.Series) -> pd.Series:
    """Key values of placeholder parent rows, in the parent column's own dtype when possible."""
    ser = pd.Series(values)
    try:
        return ser.astype(like.dtype)
    except (TypeError, ValueError):
        return ser


def _resolve_types(defs, tables, original_cols, renamed) -> tuple[dict, dict]:
    types: dict[str, dict[str, str]] = {}
    overrides: dict[str, dict[str, str]] = {}
    for name, (df, spec) in tables.items():
        d = defs[name]
        keys = {spec.pkey, spec.time_col, *spec.fkeys, *original_cols[name]}
        out = {}
        for col in df.columns:
            out[col] = KEY if col in keys else infer_column_type(df[col])
        for col, typ in d.types.items():
            col = renamed.get(name, {}).get(col, col)
            if col in (spec.pkey, spec.time_col, *spec.fkeys):
                _fail(
                    f"table '{name}': column '{col}' is a key or time column; "
                    "its type cannot be overridden"
                )
            out[col] = typ
            overrides.setdefault(name, {})[col] = typ
        types[name] = out
    return types, overrides


def _rewrite_renamed(tasks, renamed, tables) -> dict[str, list[str]]:
    """Point task SQL at renamed time columns: ``"ordered at"`` -> ``"ordered_at"``.

    Only where the old name is unambiguous (no column of any table still has it); other
    references fail in :func:`_check_task_sql` with DuckDB's message.
    """
    still_there = {col for df, _ in tables.values() for col in df.columns}
    done: dict[str, list[str]] = {}
    for tm in tasks:
        if not tm.sql:
            continue
        for mapping in renamed.values():
            for old, new in mapping.items():
                if old in still_there or _quote(old) not in tm.sql:
                    continue
                tm.sql = tm.sql.replace(_quote(old), _quote(new))
                done.setdefault(tm.name, []).append(f"{old} -> {new}")
    return done


def _check_task_sql(
    tasks: list[TaskManifest], frames: Mapping[str, pd.DataFrame], val_timestamp
) -> None:
    """Run each forecast task's SQL once (at the validation timestamp), as RelBench would."""
    forecast = [tm for tm in tasks if tm.kind == KIND_FORECAST and tm.sql]
    if not forecast:
        return
    import duckdb

    try:
        val = pd.Timestamp(str(val_timestamp))
    except (TypeError, ValueError):
        _fail(f"val_timestamp {val_timestamp!r} is not a timestamp")
    for tm in forecast:
        try:
            delta = pd.Timedelta(tm.timedelta)
        except (TypeError, ValueError):
            _fail(
                f"task '{tm.name}': timedelta {tm.timedelta!r} is not a duration (e.g. '30 days')"
            )
        con = duckdb.connect()
        try:
            con.register("timestamps", pd.DataFrame({"timestamp": pd.DatetimeIndex([val])}))
            for name, df in frames.items():
                # As relbench does: DuckDB cannot reliably ingest pandas' string dtype.
                strings = [c for c in df.columns if isinstance(df[c].dtype, pd.StringDtype)]
                con.register(name, df.astype({c: object for c in strings}) if strings else df)
            try:
                result = con.sql(tm.sql.replace("{timedelta}", str(delta)))
                columns = list(result.columns)
                result.limit(1).fetchall()
            except duckdb.Error as exc:
                _fail(f"task '{tm.name}': its SQL fails: {error_summary(exc, whole=True)}")
        finally:
            con.close()
        wanted = [c for c in (tm.entity_col, tm.target_col, tm.time_col) if c]
        missing = [c for c in wanted if c not in columns]
        if missing:
            _fail(f"task '{tm.name}': its SQL returns columns {columns}, missing {missing}")
