"""``tve import rel-f1``: RelBench's rel-f1 rebuilt from the Ergast CSVs, checked by RelBench.

The numbers are RelBench's published ones (shared/data/rel-f1/raw/PROVENANCE.md): 9 tables,
67 columns, 74,063 rows up to the test timestamp, and the task split sizes. Everything is
read back through ``relbench.load_dataset(...).load_task(name, regenerate=True)``, so the
labels are computed by RelBench from the manifests' SQL, not by our code. driver-top3 is
compared row for row with RelBench's own exported tables; driver-dnf and driver-position
labels are recomputed here with plain pandas from the raw CSVs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import relbench

from tve_pipeline import cli
from tve_pipeline.datasets.relf1 import build_rel_f1

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rel-f1" / "raw"
pytestmark = pytest.mark.skipif(
    not (DATA / "ergast_csv").is_dir(),
    reason=f"the rel-f1 raw data is not at {DATA} (../shared/data beside the repo)",
)

SPLITS = ("train", "val", "test")
EXPECTED_SPLITS = {
    "driver-position": (7453, 499, 760),
    "driver-top3": (1353, 588, 726),
    "driver-dnf": (11411, 566, 702),
}
# PROVENANCE.md: rows per table, in full and up to the test timestamp 2010-01-01.
EXPECTED_ROWS = {
    "races": (1101, 820),
    "circuits": (77, 77),
    "drivers": (857, 857),
    "results": (26080, 20323),
    "standings": (34124, 28115),
    "constructors": (211, 211),
    "constructor_results": (12290, 9408),
    "constructor_standings": (13051, 10170),
    "qualifying": (9815, 4082),
}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return build_rel_f1(DATA, tmp_path_factory.mktemp("relf1") / "rel-f1")


@pytest.fixture(scope="module")
def dataset(out_dir):
    return relbench.load_dataset(out_dir)


@pytest.fixture(scope="module")
def tables(dataset):
    """Every task's train/val/test tables, labels included, as RelBench regenerates them."""
    out = {}
    for name in EXPECTED_SPLITS:
        task = dataset.load_task(name, regenerate=True)
        db = task.get_db(upto_test_timestamp=False)
        out[name] = {s: task.get_table(s, mask_input_cols=False, db=db).df for s in SPLITS}
        out[name]["masked_test"] = task.get_table("test", db=db).df
    return out


def test_nine_tables_67_columns_74063_rows(dataset):
    db = dataset.get_db()  # cut at the test timestamp, RelBench's key checks included
    assert sorted(db.table_dict) == sorted(EXPECTED_ROWS)
    assert sum(len(t.df.columns) for t in db.table_dict.values()) == 67
    assert {n: len(t.df) for n, t in db.table_dict.items()} == {
        n: upto for n, (_, upto) in EXPECTED_ROWS.items()
    }
    assert sum(len(t.df) for t in db.table_dict.values()) == 74_063
    full = dataset.get_db(upto_test_timestamp=False)
    assert {n: len(t.df) for n, t in full.table_dict.items()} == {
        n: rows for n, (rows, _) in EXPECTED_ROWS.items()
    }
    assert (
        str(dataset.val_timestamp.date()) == "2005-01-01"
        and str(dataset.test_timestamp.date()) == "2010-01-01"
    )
    assert full.min_timestamp == pd.Timestamp("1950-05-13")


def test_task_manifests(dataset):
    assert dataset.get_task_names() == sorted(EXPECTED_SPLITS)
    deltas = {"driver-dnf": 30, "driver-top3": 30, "driver-position": 60}
    for name, days in deltas.items():
        task = dataset.load_task(name, regenerate=True)
        assert task.timedelta == pd.Timedelta(days=days)
        assert task.num_eval_timestamps == 40
        assert (task.entity_table, task.entity_col, task.time_col) == (
            "drivers",
            "driverId",
            "date",
        )


@pytest.mark.parametrize("name", list(EXPECTED_SPLITS))
def test_split_sizes(tables, name):
    assert tuple(len(tables[name][s]) for s in SPLITS) == EXPECTED_SPLITS[name]


def test_driver_top3_identical_to_relbench_tables(tables):
    for split in SPLITS:
        ref = pd.read_csv(
            DATA / "reference_relbench_task_tables" / f"driver-top3_{split}.csv.gz",
            parse_dates=["date"],
        )
        got = (
            tables["driver-top3"]["masked_test"]
            if split == "test"
            else tables["driver-top3"][split]
        )
        assert list(got.columns) == list(ref.columns), split
        key = ["date", "driverId"]
        got = got.sort_values(key).reset_index(drop=True)
        ref = ref.sort_values(key).reset_index(drop=True)
        assert (got["date"].to_numpy() == ref["date"].to_numpy().astype(got["date"].dtype)).all(), (
            split
        )
        for col in ref.columns[1:]:
            assert got[col].tolist() == ref[col].tolist(), (split, col)


def _raw_results():
    """Raw Ergast results with their race time, and the drivers' file order (RelBench's ids)."""
    races = pd.read_csv(DATA / "ergast_csv" / "races.csv.gz", keep_default_na=False)
    clock = races["time"].where(races["time"] != "\\N", "00:00:00")
    races = races.assign(when=pd.to_datetime(races["date"] + "T" + clock))
    results = pd.read_csv(DATA / "ergast_csv" / "results.csv.gz").merge(
        races[["raceId", "when"]], on="raceId"
    )
    drivers = pd.read_csv(DATA / "ergast_csv" / "drivers.csv.gz")
    new_id = pd.Series(np.arange(len(drivers)), index=drivers["driverId"])
    return results.assign(new_driver=results["driverId"].map(new_id))


@pytest.mark.parametrize("name", ["driver-dnf", "driver-position"])
def test_labels_match_raw_csvs(tables, name):
    results = _raw_results()
    delta = pd.Timedelta(days=30 if name == "driver-dnf" else 60)
    for split in ("val", "test"):
        table = tables[name][split]
        for t in sorted(table["date"].unique())[::7]:
            window = results[(results["when"] > t) & (results["when"] <= t + delta)]
            if name == "driver-dnf":
                expected = window.groupby("new_driver")["statusId"].agg(
                    lambda s: int((s != 1).any())
                )
                target = "did_not_finish"
            else:
                expected = window.groupby("new_driver")["positionOrder"].mean()
                target = "position"
            got = table[table["date"] == t].set_index("driverId")[target].sort_index()
            assert got.index.tolist() == expected.index.tolist(), (split, t)
            assert np.allclose(got.to_numpy(float), expected.to_numpy(float)), (split, t)


def test_keys_follow_relbench_numbering(out_dir):
    """Untimed tables keep file order; timed ones are numbered after RelBench's sort by time.

    The result rows are values published in RelBench-processed rel-f1 tables (2014+ seasons,
    AntonioNvs/ortogonal-representation output/data/team/results.csv, see PROVENANCE.md).
    """
    drivers = pd.read_parquet(out_dir / "db" / "drivers.parquet")
    assert drivers.loc[0, "driverRef"] == "hamilton" and drivers["driverId"].tolist() == list(
        range(857)
    )
    races = pd.read_parquet(out_dir / "db" / "races.parquet")
    assert races["date"].is_monotonic_increasing and races.loc[0, "name"] == "British Grand Prix"
    results = pd.read_parquet(out_dir / "db" / "results.parquet").set_index("resultId")
    cols = ["raceId", "driverId", "constructorId", "positionOrder", "statusId"]
    published = {
        22133: (897, 812, 205, 16, 132),
        22137: (897, 0, 129, 19, 5),
        25881: (1081, 842, 5, 20, 4),
        26060: (1090, 821, 49, 12, 1),
        26075: (1090, 814, 8, 2, 1),
    }
    for result_id, row in published.items():
        assert tuple(int(results.loc[result_id, c]) for c in cols) == row, result_id


def test_import_report(out_dir):
    report = json.loads((out_dir / "tve_import.json").read_text())
    assert report["rows"] == {n: rows for n, (rows, _) in EXPECTED_ROWS.items()}
    assert sum(report["rows_upto_test_timestamp"].values()) == 74_063
    assert all(v == 0 for v in report["unmatched_fkeys"].values())


def test_cli_import_and_bad_raw_dir_keeps_build(out_dir, tmp_path, capsys):
    target = tmp_path / "rel-f1"
    assert cli.main(["import", "rel-f1", str(DATA), str(target)]) == 0
    assert (target / "db" / "results.parquet").read_bytes() == (
        out_dir / "db" / "results.parquet"
    ).read_bytes()
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["import", "rel-f1", str(empty), str(target)]) == 2
    assert "races.csv" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
