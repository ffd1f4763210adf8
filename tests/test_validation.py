"""``validate_dataset``: each defect injected into a good dataset folder gives its message.

The good folder has identifiers with spaces, quotes and non-ASCII letters; they must load
in RelBench and come back as info, never as errors. Every defect is injected into a fresh
copy by editing its parquet files or manifest directly, the way a broken export or a
hand-edited folder would look.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import relbench
from relbench.manifest import KIND_FORECAST, DatasetManifest, TableSpec, TaskManifest

from tve_pipeline.datasets.writer import write_dataset
from tve_pipeline.schema import DatabaseError
from tve_pipeline.validation import ValidationReport, validate_dataset

KUNDEN = "kunden ü"
REF = "kunde's id"

TASK = TaskManifest(
    name="kunden-aktiv",
    kind=KIND_FORECAST,
    task_type="binary_classification",
    entity_table=KUNDEN,
    entity_col="id",
    target_col="aktiv",
    time_col="timestamp",
    timedelta="2 days",
    sql=f"""
SELECT t."timestamp" AS "timestamp", k.id AS id, CAST(COUNT(o.order_id) > 0 AS INTEGER) AS aktiv
FROM timestamps t CROSS JOIN "{KUNDEN}" k
LEFT JOIN orders o ON o."{REF.replace('"', '""')}" = k.id AND o.ts > t."timestamp"
    AND o.ts <= t."timestamp" + INTERVAL '{{timedelta}}'
GROUP BY t."timestamp", k.id
""",
)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    days = pd.date_range("2021-01-01", periods=12, freq="D")
    kunden = pd.DataFrame({"id": [0, 1, 2], "since": days[:3], "Straße": ["a", "b", "c"]})
    orders = pd.DataFrame(
        {
            "order_id": range(12),
            "ts": days,
            REF: [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2],
            "item_id": [0, 1] * 6,
            "net €": [1.5] * 12,
        }
    )
    items = pd.DataFrame({"item_id": [0, 1], 'say "hi"': ["x", "y"]})
    return write_dataset(
        tmp_path_factory.mktemp("validation") / "good",
        "good",
        {
            KUNDEN: (kunden, TableSpec(pkey="id", time_col="since")),
            "orders": (
                orders,
                TableSpec(pkey="order_id", time_col="ts", fkeys={REF: KUNDEN, "item_id": "items"}),
            ),
            "items": (items, TableSpec(pkey="item_id")),
        },
        "2021-01-08",
        "2021-01-10",
        [TASK],
    )


def test_good_dataset_has_no_errors_and_odd_names_are_info(good):
    report = validate_dataset(good)
    assert isinstance(report, ValidationReport)
    assert report.errors == [] and report.warnings == []
    assert report.info == [
        f"table '{KUNDEN}': name has spaces and non-ASCII letters (works; quote it in SQL)",
        f"table '{KUNDEN}', column 'Straße': name has non-ASCII letters (works; quote it in SQL)",
        f"table 'orders', column '{REF}': name has spaces and quotes (works; quote it in SQL)",
        "table 'orders', column 'net €': name has spaces and non-ASCII letters "
        "(works; quote it in SQL)",
        "table 'items', column 'say \"hi\"': name has spaces and quotes (works; quote it in SQL)",
    ]
    assert report.counts["rows"] == {KUNDEN: 3, "orders": 12, "items": 2}
    assert report.counts["rows_upto_test_timestamp"] == 3 + 10 + 2
    assert report.counts["null_fkeys"] == {f"orders.{REF}": 0, "orders.item_id": 0}
    report.raise_for_errors()  # nothing to raise
    # and they really work: RelBench loads the folder and regenerates the task's labels
    ds = relbench.load_dataset(good)
    ds.get_db()
    labels = ds.load_task("kunden-aktiv", regenerate=True).get_table("val").df
    assert len(labels) == 3


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "bad"))


def _edit_table(folder: Path, table: str, edit) -> None:
    path = folder / "db" / f"{table}.parquet"
    edit(pd.read_parquet(path)).to_parquet(path, index=False)


def _edit_manifest(folder: Path, edit) -> None:
    m = DatasetManifest.load(folder / "manifest.yaml")
    edit(m)
    m.save(folder / "manifest.yaml")


def _set(col, values):
    return lambda df: df.assign(**{col: values})


def _rename_time(folder: Path) -> None:
    _edit_table(folder, "orders", lambda df: df.rename(columns={"ts": "order ts"}))
    _edit_manifest(folder, lambda m: setattr(m.tables["orders"], "time_col", "order ts"))


def _fkey_to_unknown(m):
    m.tables["orders"].fkeys[REF] = "clients"


T = pd.Timestamp
DAYS = [str(d.date()) for d in pd.date_range("2021-01-01", periods=12, freq="D")]

DEFECTS = {
    "duplicate pkey": (
        lambda f: _edit_table(f, "orders", _set("order_id", [0, 1, 1, *range(3, 12)])),
        "table 'orders', column 'order_id': primary key has 1 duplicate values, e.g. [1]",
    ),
    "null pkey": (
        lambda f: _edit_table(f, "orders", _set("order_id", [0, None, *range(2, 12)])),
        "table 'orders', column 'order_id': primary key is null in 1 rows",
    ),
    "pkey not 0..n-1": (
        lambda f: _edit_table(f, "items", _set("item_id", [1, 2])),
        "table 'items', column 'item_id': primary key is not 0..1 in row order (row 0 holds 1); "
        "RelBench 3 requires it, reindex on import",
    ),
    "dangling fkey": (
        lambda f: _edit_table(f, "orders", _set(REF, [0, 7, 9, 7, 1, 2, 0, 1, 2, 12, 1, 5])),
        f"table 'orders', column '{REF}': 5 dangling foreign keys "
        f"(not in 0..2 of table '{KUNDEN}'), e.g. [7, 9, 12, 5]",
    ),
    "fkey not integer": (
        lambda f: _edit_table(f, "orders", _set("item_id", ["a", "b"] * 6)),
        "table 'orders', column 'item_id': foreign key to 'items' must hold integer ids 0..n-1, "
        "got str, e.g. ['a', 'b']",
    ),
    "unparseable time": (
        lambda f: _edit_table(f, "orders", _set("ts", [*DAYS[:5], "soon", *DAYS[6:]])),
        "table 'orders', column 'ts': time column has 1 values that are not timestamps, "
        "e.g. ['soon']",
    ),
    "mixed timezones": (
        lambda f: _edit_table(
            f,
            "orders",
            _set("ts", [d + ("T00:00:00+01:00" if i % 2 else "") for i, d in enumerate(DAYS)]),
        ),
        "table 'orders', column 'ts': mixed timezones: 6 values carry a UTC offset, 6 do not",
    ),
    "time as text": (
        lambda f: _edit_table(f, "orders", _set("ts", DAYS)),
        "table 'orders', column 'ts': time column is stored as text (str), not datetime64; "
        "parse it on import",
    ),
    "timezone-aware time": (
        lambda f: _edit_table(
            f, "orders", lambda df: df.assign(ts=df["ts"].dt.tz_localize("Europe/Berlin"))
        ),
        "table 'orders', column 'ts': time column is timezone-aware (Europe/Berlin); "
        "RelBench compares naive times, convert and drop the zone",
    ),
    "numeric time": (
        lambda f: _edit_table(f, "orders", _set("ts", list(range(12)))),
        "table 'orders', column 'ts': time column holds int64, not datetimes",
    ),
    "unsorted time": (
        lambda f: _edit_table(
            f, KUNDEN, _set("since", [T("2021-01-02"), T("2021-01-01"), T("2021-01-03")])
        ),
        f"table '{KUNDEN}', column 'since': rows are not sorted by the time column "
        "(rows without a time last); RelBench's upto() keeps a prefix, so 0..n-1 keys break",
    ),
    "time column name": (
        _rename_time,
        "table 'orders', column 'order ts': a time column name must be a Python identifier "
        "(RelBench filters it with DataFrame.query); rename it, e.g. spaces to _",
    ),
    "manifest column missing": (
        lambda f: _edit_table(f, "orders", lambda df: df.drop(columns=[REF])),
        f"table 'orders', column '{REF}': named as fkey in manifest.yaml "
        "but missing from db/orders.parquet",
    ),
    "parquet missing": (
        lambda f: (f / "db" / "items.parquet").unlink(),
        "table 'items': db/items.parquet is missing",
    ),
    "fkey to unknown table": (
        lambda f: _edit_manifest(f, _fkey_to_unknown),
        f"table 'orders', column '{REF}': foreign key to unknown table 'clients'",
    ),
    "empty table": (
        lambda f: _edit_table(f, "items", lambda df: df.iloc[:0]),
        "table 'items': empty (0 rows)",
    ),
    "task on unknown table": (
        lambda f: TaskManifest.from_dict({**TASK.to_dict(), "entity_table": "nope"}).save(
            f / "tasks" / TASK.name / "manifest.yaml"
        ),
        "task 'kunden-aktiv': entity_table 'nope' is not a table of the dataset",
    ),
    "val after test": (
        lambda f: _edit_manifest(f, lambda m: setattr(m, "val_timestamp", "2021-02-01")),
        "manifest: val_timestamp 2021-02-01 00:00:00 is not before "
        "test_timestamp 2021-01-10 00:00:00",
    ),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_gives_its_message(good, tmp_path, defect):
    inject, message = DEFECTS[defect]
    folder = _copy(good, tmp_path)
    inject(folder)
    report = validate_dataset(folder)
    assert message in report.errors, report.errors
    assert all("\n" not in m for m in report.errors + report.warnings + report.info)
    with pytest.raises(DatabaseError) as info:
        report.raise_for_errors()
    assert str(info.value).startswith(report.errors[0])


def test_null_times_are_a_warning(good, tmp_path):
    folder = _copy(good, tmp_path)
    _edit_table(folder, "orders", lambda df: df.assign(ts=df["ts"].where(df.index < 10)))
    report = validate_dataset(folder)
    assert report.errors == []
    assert report.warnings == [
        "table 'orders', column 'ts': 2 rows have no time; RelBench never shows them to a model"
    ]
    assert report.counts["null_times"] == {"orders.ts": 2}


def test_raise_for_errors_counts_the_rest(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "db" / "items.parquet").unlink()
    _edit_table(folder, "orders", _set("order_id", [0, 1, 1, *range(3, 12)]))
    report = validate_dataset(folder)
    assert len(report.errors) == 2
    with pytest.raises(
        DatabaseError, match=r"^table 'items': db/items.parquet is missing \(and 1 more\)$"
    ):
        report.raise_for_errors()


def test_not_a_dataset_folder(tmp_path):
    report = validate_dataset(tmp_path)
    assert report.errors == [f"{tmp_path} is not a RelBench dataset folder: no manifest.yaml there"]
    (tmp_path / "manifest.yaml").write_text("name: [unclosed\n")
    assert validate_dataset(tmp_path).errors[0].startswith("manifest.yaml cannot be read:")


def test_cli_validate_prints_the_report(good, tmp_path, capsys):
    from tve_pipeline import cli

    assert cli.main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert (
        f"info: table '{KUNDEN}': name has spaces and non-ASCII letters (works; quote it in SQL)"
        in out
    )
    assert "good: OK, 17 rows in 3 tables, tasks: kunden-aktiv" in out
    folder = _copy(good, tmp_path)
    (folder / "db" / "items.parquet").unlink()
    _edit_table(folder, "orders", _set("order_id", [0, 1, 1, *range(3, 12)]))
    assert cli.main(["validate", str(folder)]) == 2
    captured = capsys.readouterr()
    assert "error: table 'items': db/items.parquet is missing\n" in captured.out
    assert (
        "error: table 'orders', column 'order_id': primary key has 1 duplicate values, e.g. [1]\n"
        in captured.out
    )
    assert f"{folder}: 2 errors, 0 warnings;" in captured.out
    assert captured.err == "tve: error: table 'items': db/items.parquet is missing (and 1 more)\n"


def test_types_sidecar_and_import_report(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "tve_types.json").write_text(
        '{"format": 1, "columns": {"items": {"say \\"hi\\"": "words", "gone": "text"}}}'
    )
    (folder / "tve_import.json").write_text('{"source": {}, "added_parents": {"items": 2}}')
    report = validate_dataset(folder)
    assert report.errors == [
        "table 'items', column 'say \"hi\"': tve_types.json gives unknown type 'words'"
    ]
    assert report.warnings == [
        "table 'items', column 'gone': named in tve_types.json but not in db/items.parquet"
    ]
    assert report.counts["import_report"] == {"added_parents": {"items": 2}}
