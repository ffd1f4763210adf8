"""The schema file of ``tve import files``: what it may say, and what it means.

Design. The YAML file (its format is documented in :mod:`tve_pipeline.datasets.files`)
is parsed by pydantic models (:class:`ImportSchema`, :class:`TableSchema`,
:class:`ForeignKeySchema`) whose validators raise the message a user reads;
:func:`_schema_problem` puts in front of it where the problem is, so that every message is
one line naming the table and column. :func:`_parse_schema` then turns the models into
:class:`_TableDef` (a table's source, keys, types and time column, paths resolved), the
only form the import itself reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    InstanceOf,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from relbench.manifest import KIND_FORECAST, TaskManifest

from tve_pipeline.common import error_summary
from tve_pipeline.schema import SEMANTIC_TYPES

SOURCE_KINDS = ("csv", "parquet", "sqlite", "duckdb")
POLICIES = ("null", "add_parents")


def _fail(message: str):
    raise ValueError(message)


# --------------------------------------------------------------------------- #
# The schema file: what it may say (pydantic models), then what it means (_TableDef)
# --------------------------------------------------------------------------- #
#
# A validator raises ValueError with the message a user reads; ``_schema_problem`` puts
# in front of it where the problem is (the schema file, or ``table '<name>'`` and the key
# of the table: ``primary_key``, ``foreign key '<column>'``, ``type of column
# '<column>'``), so that every message is one line naming the table and column.


def _column_names(value) -> list[str]:
    """A column name or a non-empty list of them, as a list (none: [])."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"must be a column name or a list of column names, got {value!r}")


def _null_markers(value) -> list[str]:
    """``null_values``: a marker or a list of them, as text (YAML reads ``-1`` as a number)."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item is None or isinstance(item, bool):
            raise ValueError(
                "must be strings; quote null, ~, yes, no, true and false "
                "(unquoted, YAML reads them as no string)"
            )
        if not isinstance(item, (str, int, float)):
            raise ValueError(f"must be a string or a list of strings, got {item!r}")
    return [str(item) for item in items]


# Keyword arguments of ``pandas.read_csv`` that decide what is null: ``null_values`` does.
_NULL_READ_OPTIONS = ("na_values", "keep_default_na", "na_filter")


def _semantic_type(value) -> str:
    if value not in SEMANTIC_TYPES:
        raise ValueError(f"must be one of {list(SEMANTIC_TYPES)}, got {value!r}")
    return value


def _table_name(value) -> str:
    name = str(value)
    if not name or "/" in name or name.startswith(".") or name == "timestamps":
        raise ValueError("not a usable table name (no '/', no leading '.', not 'timestamps')")
    return name


def _mapping_or_empty(what: str):
    """A before-validator: a mapping as it is, nothing as {}, anything else an error."""

    def check(value):
        value = value or {}
        if not isinstance(value, dict):
            raise ValueError(what)
        return value

    return BeforeValidator(check)


def _task_manifest(item: dict) -> TaskManifest:
    """A task of the schema file as RelBench's manifest (``kind`` defaults to forecast)."""
    item = {"kind": KIND_FORECAST, **item}
    if "timedelta" in item and item["timedelta"] is not None:
        item["timedelta"] = str(item["timedelta"])
    unknown = sorted(set(item) - set(TaskManifest.__dataclass_fields__))
    if unknown:
        raise ValueError(f"task '{item['name']}': unknown keys {unknown}")
    tm = TaskManifest.from_dict(item)
    tm.validate()
    return tm


ColumnName = Annotated[str, BeforeValidator(str)]
NullMarkers = Annotated[list[str], BeforeValidator(_null_markers)]
SemanticType = Annotated[str, BeforeValidator(_semantic_type)]
TableName = Annotated[str, BeforeValidator(_table_name)]
TaskSchema = Annotated[InstanceOf[TaskManifest], BeforeValidator(_task_manifest)]


class _SchemaModel(BaseModel):
    # Unknown keys are errors (a typo must not be ignored); a number where a name is
    # expected is that name, as YAML reads ``2021`` or ``5`` unquoted.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ForeignKeySchema(_SchemaModel):
    """A foreign key: ``column: parent`` (the short form: the column holds the parent's
    ids, rewritten in place) or ``{columns: [...], references: parent}`` (a new column
    that references the parent through ``columns``)."""

    references: str
    columns: list[str] | None = None  # None: the short form

    @model_validator(mode="before")
    @classmethod
    def _either_form(cls, value):
        if isinstance(value, str):
            return {"references": value}
        long_form = isinstance(value, dict) and set(value) <= {"columns", "references"}
        if long_form and value.get("references"):
            return {"references": str(value["references"]), "columns": value.get("columns")}
        raise ValueError("must be a parent table name or {columns: [...], references: parent}")

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, value) -> list[str]:
        return _column_names(value)

    @model_validator(mode="after")
    def _has_columns(self) -> ForeignKeySchema:
        if self.columns == []:
            raise ValueError("needs 'columns'")
        return self


class TableSchema(_SchemaModel):
    """One table of the schema file: its source, its keys, its time column, its types."""

    csv: str | None = None
    parquet: str | None = None
    sqlite: str | None = None
    duckdb: str | None = None
    table: str | None = None
    query: str | None = None
    read_options: Annotated[dict[str, Any], _mapping_or_empty("must be a mapping")] = {}
    null_values: NullMarkers | None = None  # None: the file's top-level list
    primary_key: Annotated[list[str], BeforeValidator(_column_names)] = []
    key_column: str | None = None
    original_id_column: str | None = None
    time_column: str | None = None
    time_format: str | None = None
    foreign_keys: Annotated[
        dict[ColumnName, ForeignKeySchema],
        _mapping_or_empty("must map a column to its parent table"),
    ] = {}
    types: Annotated[
        dict[ColumnName, SemanticType],
        _mapping_or_empty(f"must map column names to one of {list(SEMANTIC_TYPES)}"),
    ] = {}

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, value):
        value = value or {}
        if not isinstance(value, dict):
            raise ValueError("expected a mapping (csv/parquet/sqlite/duckdb, primary_key, ...)")
        return value

    @field_validator("read_options")
    @classmethod
    def _no_null_options(cls, value: dict) -> dict:
        given = sorted(k for k in value if k in _NULL_READ_OPTIONS)
        if given:
            raise ValueError(
                f"may not set {given}: only empty fields are null; "
                "give null_values: [...] for more null markers"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TableSchema:
        kinds = self.own_sources
        if len(kinds) > 1:
            raise ValueError(f"give one source, not {kinds}")
        if kinds and kinds[0] in ("csv", "parquet") and (self.table or self.query):
            raise ValueError("'table' and 'query' apply to sqlite and duckdb sources only")
        if self.table and self.query:
            raise ValueError("give 'table' or 'query', not both")
        pkey = self.primary_key
        in_place = len(pkey) == 1 and (self.key_column or pkey[0]) == pkey[0]
        if self.original_id_column and not in_place:
            raise ValueError(
                "original_id_column applies to a single-column primary_key without key_column"
            )
        if self.time_format is not None and not self.time_column:
            raise ValueError("time_format given without time_column")
        return self

    @property
    def own_sources(self) -> list[str]:
        """The source kinds the table names itself (one, or none for the default)."""
        return [kind for kind in SOURCE_KINDS if getattr(self, kind)]


class ImportSchema(_SchemaModel):
    """The schema file of ``tve import files`` (the YAML format above)."""

    name: str | None = None
    description: str | None = None
    val_timestamp: str = Field(default=None, validate_default=True)
    test_timestamp: str = Field(default=None, validate_default=True)
    missing_parents: Literal["null", "add_parents"] = "null"
    timezone: str = "UTC"
    null_values: list[str] = []
    sqlite: str | None = None
    duckdb: str | None = None
    tables: dict[TableName, TableSchema] = Field(default=None, validate_default=True)
    tasks: list[TaskSchema] = []

    @field_validator("val_timestamp", "test_timestamp", mode="before")
    @classmethod
    def _required(cls, value, info: ValidationInfo) -> str:
        if value is None:
            raise ValueError(f"'{info.field_name}' is required")
        return str(value)

    @field_validator("null_values", mode="before")
    @classmethod
    def _null_values(cls, value) -> list[str]:
        if value is None:
            return []
        try:
            return _null_markers(value)
        except ValueError as exc:
            raise ValueError(f"null_values {exc}") from None

    @field_validator("missing_parents", mode="before")
    @classmethod
    def _policy(cls, value) -> str:
        policy = value or "null"
        if policy not in POLICIES:
            raise ValueError(f"missing_parents must be one of {list(POLICIES)}, got {policy!r}")
        return policy

    @field_validator("timezone", mode="before")
    @classmethod
    def _zone(cls, value) -> str:
        tz = str(value or "UTC")
        try:
            pd.Timestamp("2000-01-01", tz=tz)
        except Exception:
            raise ValueError(
                f"timezone {tz!r} is not a time zone name (e.g. UTC, Europe/Berlin)"
            ) from None
        return tz

    @field_validator("duckdb")
    @classmethod
    def _one_default_source(cls, value, info: ValidationInfo):
        if value and info.data.get("sqlite"):
            raise ValueError("give at most one of the top-level 'sqlite' and 'duckdb'")
        return value

    @field_validator("tables", mode="before")
    @classmethod
    def _some_tables(cls, value):
        if not isinstance(value, dict) or not value:
            raise ValueError("'tables' must map table names to their sources")
        return value

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_list(cls, value):
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError("'tasks' must be a list of task manifests")
        for i, item in enumerate(value):
            if not isinstance(item, dict) or not item.get("name"):
                raise ValueError(f"task #{i + 1} must be a mapping with a 'name'")
        return value

    @property
    def default_source(self) -> tuple[str, str] | None:
        """The top-level ``sqlite`` or ``duckdb`` file, for tables that name no source."""
        kind = "sqlite" if self.sqlite else "duckdb" if self.duckdb else None
        return None if kind is None else (kind, getattr(self, kind))


def _schema_problem(exc: ValidationError, schema_yaml: Path) -> str:
    """The first problem pydantic found, as the one line a user reads: the file's own
    problems first, then each table's in the file's order (unknown keys first), then the
    tasks'."""
    errors = exc.errors()
    seen: dict[tuple, int] = {}
    for e in errors:
        seen.setdefault(_scope(e["loc"]), len(seen))

    def order(e) -> tuple:
        scope = _scope(e["loc"])
        group = 0 if not scope else 1 if scope[0] == "tables" else 2
        return group, seen[scope], e["type"] != "extra_forbidden"

    first = min(errors, key=order)
    scope = _scope(first["loc"])
    rest = first["loc"][len(scope) :]
    if first["type"] == "extra_forbidden":
        unknown = sorted(
            (
                e["loc"][-1]
                for e in errors
                if e["type"] == "extra_forbidden" and _scope(e["loc"]) == scope
            ),
            key=str,
        )
        fields = TableSchema.model_fields if scope else ImportSchema.model_fields
        message = f"unknown keys {unknown}; expected some of {sorted(fields)}"
    elif first["type"] == "value_error":
        # The file's own validators name their key; a table's say what is wrong with it.
        message = (_what(rest) if scope else "") + str(first["ctx"]["error"])
    else:  # a value of the wrong type: its key and what pydantic expected instead
        message = _what(rest) + first["msg"][0].lower() + first["msg"][1:]
    if not scope:
        return f"{schema_yaml}: {message}"
    if scope[0] == "tables":
        return f"table '{scope[1]}': {message}"
    return message  # a task's: ours and RelBench's name the task ("task 'churn': ...")


def _scope(loc: tuple) -> tuple:
    """Whose problem an error at ``loc`` is: a table's (``("tables", name)``), a task's
    (``("tasks", i)``) or the file's (``()``)."""
    return tuple(loc[:2]) if loc[:1] in (("tables",), ("tasks",)) and len(loc) > 1 else ()


def _what(loc: tuple) -> str:
    """The key (of a table, or of the file) an error is about, as the start of its message."""
    match loc:
        case () | ("[key]",):
            return ""
        case ("foreign_keys", col):
            return f"foreign key '{col}' "
        case ("foreign_keys", col, "columns"):
            return f"foreign key '{col}' columns "
        case ("types", col):
            return f"type of column '{col}' "
        case _:
            return f"{'.'.join(map(str, loc))} "


@dataclass
class _FKey:
    columns: list[str]  # source columns in the child
    parent: str
    new_column: str
    in_place: bool  # short form: the single source column is replaced by the new ids


@dataclass
class _TableDef:
    """What a table of the schema file means: its source resolved, its keys named."""

    name: str
    kind: str
    path: Path | None
    table: str | None
    query: str | None
    read_options: dict
    null_values: list[str]  # CSV fields read as null besides empty ones
    pkey: list[str]  # [] = none
    key_column: str
    original_id_column: str | None  # only for an in-place single-column key
    time_column: str | None
    time_format: str | None
    fkeys: list[_FKey] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)


def _parse_schema(schema_yaml: Path) -> tuple[ImportSchema, dict[str, _TableDef]]:
    """The schema file, checked (a problem is one line naming the table and column), and
    what each of its tables means."""
    if not schema_yaml.is_file():
        raise FileNotFoundError(f"schema file {schema_yaml} does not exist")
    try:
        doc = yaml.safe_load(schema_yaml.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        _fail(f"{schema_yaml}: not valid YAML: {error_summary(exc, whole=True)}")
    if not isinstance(doc, dict):
        _fail(
            f"{schema_yaml}: expected a mapping with 'tables', 'val_timestamp' and 'test_timestamp'"
        )
    try:
        schema = ImportSchema.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(_schema_problem(exc, schema_yaml)) from exc
    defs = {
        name: _table_def(name, spec, schema, schema_yaml.parent)
        for name, spec in schema.tables.items()
    }
    _check_references(defs)
    return schema, defs


def _table_def(name: str, spec: TableSchema, schema: ImportSchema, base: Path) -> _TableDef:
    """A table of the schema file with its source (its own, or the file's default), its
    null markers (its own, or the file's) and its key columns named (``key_column`` and
    ``original_id_column`` defaults)."""
    where = f"table '{name}'"
    default = schema.default_source
    kinds = spec.own_sources
    if kinds:
        kind, path = kinds[0], getattr(spec, kinds[0])
    elif default:
        kind, path = default
    else:
        _fail(f"{where}: no source; give one of {list(SOURCE_KINDS)} (a path)")
    if spec.read_options and kind != "csv":
        _fail(f"{where}: read_options apply to csv sources only")
    if spec.null_values is not None and kind != "csv":
        _fail(f"{where}: null_values apply to csv sources only")
    markers = schema.null_values if spec.null_values is None else spec.null_values
    pkey = spec.primary_key
    single = len(pkey) == 1
    key_column = spec.key_column or (pkey[0] if single else f"{name}_id")
    in_place = single and key_column == pkey[0]
    return _TableDef(
        name=name,
        kind=kind,
        path=(base / str(path)).resolve(),
        table=spec.table,
        query=spec.query,
        read_options=dict(spec.read_options),
        null_values=list(markers) if kind == "csv" else [],
        pkey=pkey,
        key_column=key_column,
        original_id_column=spec.original_id_column or (f"{pkey[0]}_original" if in_place else None),
        time_column=spec.time_column,
        time_format=spec.time_format,
        fkeys=[
            _FKey(fk.columns or [col], fk.references, col, fk.columns in (None, [col]))
            for col, fk in spec.foreign_keys.items()
        ],
        types=dict(spec.types),
    )


def _check_references(defs: dict[str, _TableDef]) -> None:
    """Every foreign key names a table with a primary key of as many columns."""
    for d in defs.values():
        for fk in d.fkeys:
            where = f"table '{d.name}': foreign key '{fk.new_column}'"
            if fk.parent not in defs:
                _fail(f"{where} -> unknown table '{fk.parent}'")
            parent = defs[fk.parent]
            if not parent.pkey:
                _fail(f"{where} -> table '{fk.parent}', which has no primary_key to reference")
            if len(fk.columns) != len(parent.pkey):
                _fail(
                    f"{where} has {len(fk.columns)} column(s) "
                    f"but the primary key of '{fk.parent}' has {len(parent.pkey)}"
                )
