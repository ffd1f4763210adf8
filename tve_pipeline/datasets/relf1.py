"""Build RelBench's ``rel-f1`` from the Ergast CSV snapshot it was made from.

The recipe is RelBench 1.x's (``relbench/datasets/f1.py`` and ``relbench/tasks/f1.py``,
as written out in ``shared/data/rel-f1/raw/PROVENANCE.md``), re-implemented here so that
the result is a RelBench 3 dataset folder that ``relbench.load_dataset`` opens and whose
forecast tasks RelBench regenerates from their DuckDB SQL:

* nine tables (races, circuits, drivers, results, standings, constructors,
  constructor_results, constructor_standings, qualifying), read with plain
  ``pandas.read_csv`` defaults, so Ergast's ``\\N`` stays a string except where the recipe
  nulls it (results, circuits); the recipe's columns dropped, 67 columns remain;
* ``races.date`` = date + time (``\\N`` time read as 00:00:00); results, standings,
  constructor results/standings and qualifying take their race's date, qualifying one day
  earlier; results' numeric columns coerced, ``circuits.alt`` float, ``drivers.dob``
  parsed; ``results.statusId`` stays the raw Ergast code (not a foreign key);
* every keyed table with a time column sorted by it with pandas' default sort, exactly
  as RelBench does, then its primary key replaced in place by 0..n-1 and foreign keys
  mapped to the new ids (no original-id columns are added: the db is RelBench's,
  column for column);
* splits: val 2005-01-01, test 2010-01-01; tasks driver-dnf (30 days), driver-top3
  (30 days) and driver-position (60 days), 40 evaluation timestamps each.

The task SQL leaves out RelBench 1.x's "driver active in the last year" filter: it has no
upper bound and the driver already has an event in the window, so it never removes a row
(the split sizes and the driver-top3 reference tables are reproduced without it). A
faithful build gives 74,063 rows up to the test timestamp and the split sizes listed in
PROVENANCE.md; ``tests/test_import_relf1.py`` checks them through RelBench itself.

Note on row order: RelBench sorts timed tables with pandas' default (quicksort, not
stable) sort before numbering rows, so rows of one race are numbered in whatever order
that sort leaves ties. We call the same sort on the same input, which reproduces
RelBench's published numbering on the machines checked; the counts, the labels and every
driver/constructor/circuit id (untimed tables keep file order) do not depend on it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
from relbench.manifest import KIND_FORECAST, TableSpec, TaskManifest

from tve_pipeline.datasets.writer import (
    IMPORT_REPORT_FILE,
    ForeignKey,
    reindex_primary_keys,
    write_dataset,
)

NAME = "rel-f1"
VAL_TIMESTAMP = "2005-01-01"
TEST_TIMESTAMP = "2010-01-01"
NUM_EVAL_TIMESTAMPS = 40

# table name -> source CSV (without .csv / .csv.gz)
SOURCES = {
    "races": "races",
    "circuits": "circuits",
    "drivers": "drivers",
    "results": "results",
    "standings": "driver_standings",
    "constructors": "constructors",
    "constructor_results": "constructor_results",
    "constructor_standings": "constructor_standings",
    "qualifying": "qualifying",
}

DROPPED_COLUMNS = {
    "races": [
        "url",
        "fp1_date",
        "fp1_time",
        "fp2_date",
        "fp2_time",
        "fp3_date",
        "fp3_time",
        "quali_date",
        "quali_time",
        "sprint_date",
        "sprint_time",
    ],
    "circuits": ["url"],
    "drivers": ["number", "url"],
    "results": ["positionText", "time", "fastestLapTime", "fastestLapSpeed"],
    "standings": ["positionText"],
    "constructors": ["url"],
    "constructor_standings": ["positionText"],
    "constructor_results": ["status"],
    "qualifying": ["q1", "q2", "q3"],
}

RESULTS_NUMERIC = [
    "rank",
    "number",
    "grid",
    "position",
    "points",
    "laps",
    "milliseconds",
    "fastestLap",
]

SPECS = {
    "races": TableSpec(pkey="raceId", time_col="date", fkeys={"circuitId": "circuits"}),
    "circuits": TableSpec(pkey="circuitId"),
    "drivers": TableSpec(pkey="driverId"),
    "results": TableSpec(
        pkey="resultId",
        time_col="date",
        fkeys={"raceId": "races", "driverId": "drivers", "constructorId": "constructors"},
    ),
    "standings": TableSpec(
        pkey="driverStandingsId", time_col="date", fkeys={"raceId": "races", "driverId": "drivers"}
    ),
    "constructors": TableSpec(pkey="constructorId"),
    "constructor_results": TableSpec(
        pkey="constructorResultsId",
        time_col="date",
        fkeys={"raceId": "races", "constructorId": "constructors"},
    ),
    "constructor_standings": TableSpec(
        pkey="constructorStandingsId",
        time_col="date",
        fkeys={"raceId": "races", "constructorId": "constructors"},
    ),
    "qualifying": TableSpec(
        pkey="qualifyId",
        time_col="date",
        fkeys={"raceId": "races", "driverId": "drivers", "constructorId": "constructors"},
    ),
}

_NULL = re.compile(r"^\\N$")

DNF_SQL = """
SELECT
    t."timestamp" AS "date",
    re."driverId" AS "driverId",
    CAST(MAX(CASE WHEN re."statusId" != 1 THEN 1 ELSE 0 END) AS BIGINT) AS "did_not_finish"
FROM timestamps t
JOIN results re
    ON re."date" > t."timestamp"
    AND re."date" <= t."timestamp" + INTERVAL '{timedelta}'
JOIN drivers dri
    ON re."driverId" = dri."driverId"
GROUP BY t."timestamp", re."driverId"
"""

TOP3_SQL = """
SELECT
    t."timestamp" AS "date",
    qu."driverId" AS "driverId",
    CAST(MIN(qu."position") <= 3 AS BIGINT) AS "qualifying"
FROM timestamps t
JOIN qualifying qu
    ON qu."date" > t."timestamp"
    AND qu."date" <= t."timestamp" + INTERVAL '{timedelta}'
JOIN drivers dri
    ON qu."driverId" = dri."driverId"
GROUP BY t."timestamp", qu."driverId"
"""

POSITION_SQL = """
SELECT
    t."timestamp" AS "date",
    re."driverId" AS "driverId",
    AVG(re."positionOrder") AS "position"
FROM timestamps t
JOIN results re
    ON re."date" > t."timestamp"
    AND re."date" <= t."timestamp" + INTERVAL '{timedelta}'
JOIN drivers dri
    ON re."driverId" = dri."driverId"
GROUP BY t."timestamp", re."driverId"
"""

TASKS = [
    TaskManifest(
        name="driver-dnf",
        kind=KIND_FORECAST,
        task_type="binary_classification",
        description="Will the driver not finish (any result with statusId != 1, lapped finishers "
        "included) a race in the next 30 days? Drivers with a race result in the window.",
        entity_table="drivers",
        entity_col="driverId",
        target_col="did_not_finish",
        time_col="date",
        timedelta="30 days",
        num_eval_timestamps=NUM_EVAL_TIMESTAMPS,
        sql=DNF_SQL,
    ),
    TaskManifest(
        name="driver-top3",
        kind=KIND_FORECAST,
        task_type="binary_classification",
        description="Will the driver qualify in the top 3 of a race in the next 30 days? "
        "Drivers with a qualifying session in the window.",
        entity_table="drivers",
        entity_col="driverId",
        target_col="qualifying",
        time_col="date",
        timedelta="30 days",
        num_eval_timestamps=NUM_EVAL_TIMESTAMPS,
        sql=TOP3_SQL,
    ),
    TaskManifest(
        name="driver-position",
        kind=KIND_FORECAST,
        task_type="regression",
        description="Mean finishing position (positionOrder) of the driver over races in the "
        "next 60 days. Drivers with a race result in the window.",
        entity_table="drivers",
        entity_col="driverId",
        target_col="position",
        time_col="date",
        timedelta="60 days",
        num_eval_timestamps=NUM_EVAL_TIMESTAMPS,
        sql=POSITION_SQL,
    ),
]


def _source(raw_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (raw_dir / name).exists():
            return raw_dir / name
    raise FileNotFoundError(
        f"{raw_dir} has no {stem}.csv or {stem}.csv.gz (expected the Ergast CSV folder)"
    )


def _resolve_raw_dir(raw_dir: Path) -> Path:
    """Accept the Ergast CSV folder itself or a folder holding it as ``ergast_csv/``."""
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir} is not a folder (expected the Ergast CSV folder)")
    if not any(raw_dir.glob("races.csv*")) and (raw_dir / "ergast_csv").is_dir():
        return raw_dir / "ergast_csv"
    return raw_dir


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tables(raw_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The nine rel-f1 tables with the recipe's columns, types and dates, before reindexing."""
    raw_dir = _resolve_raw_dir(Path(raw_dir))
    t = {name: pd.read_csv(_source(raw_dir, stem)) for name, stem in SOURCES.items()}
    for name, cols in DROPPED_COLUMNS.items():
        missing = [c for c in cols if c not in t[name].columns]
        if missing:
            raise ValueError(
                f"table '{name}': source has no columns {missing}; "
                "not the Ergast snapshot rel-f1 expects"
            )
        t[name] = t[name].drop(columns=cols)

    races = t["races"]
    races = races.assign(time=races["time"].replace(_NULL.pattern, "00:00:00", regex=True))
    races = races.assign(date=pd.to_datetime(races["date"] + " " + races["time"]))
    t["races"] = races

    race_dates = races[["raceId", "date"]]
    for name in (
        "results",
        "standings",
        "constructor_results",
        "constructor_standings",
        "qualifying",
    ):
        t[name] = t[name].merge(race_dates, on="raceId", how="left")
    t["qualifying"] = t["qualifying"].assign(date=t["qualifying"]["date"] - pd.Timedelta(days=1))

    results = t["results"].replace(_NULL.pattern, np.nan, regex=True)
    for col in RESULTS_NUMERIC:
        results[col] = pd.to_numeric(results[col], errors="coerce")
    t["results"] = results

    circuits = t["circuits"].replace(_NULL.pattern, np.nan, regex=True)
    circuits["alt"] = circuits["alt"].astype(float)
    t["circuits"] = circuits

    t["drivers"] = t["drivers"].assign(dob=pd.to_datetime(t["drivers"]["dob"]))
    return t


def build_rel_f1(raw_dir: str | Path, out_dir: str | Path) -> Path:
    """Build the ``rel-f1`` dataset folder at ``out_dir`` (atomically) and return it.

    ``raw_dir`` is the Ergast CSV folder (``.csv`` or ``.csv.gz`` files), or a folder
    holding it as ``ergast_csv/`` (like ``shared/data/rel-f1/raw``).
    """
    raw_dir = _resolve_raw_dir(Path(raw_dir))
    tables = load_tables(raw_dir)
    raw_rows = {name: len(df) for name, df in tables.items()}

    for name, spec in SPECS.items():
        if spec.time_col is not None:
            # pandas' default sort, as RelBench's reindexing calls it (see module docstring).
            tables[name] = tables[name].sort_values(spec.time_col).reset_index(drop=True)
    tables, report = reindex_primary_keys(
        tables,
        pkeys={name: (spec.pkey, spec.pkey) for name, spec in SPECS.items()},
        fkeys={
            name: [ForeignKey(col, parent, col) for col, parent in spec.fkeys.items()]
            for name, spec in SPECS.items()
            if spec.fkeys
        },
        missing="null",
    )
    test = pd.Timestamp(TEST_TIMESTAMP)
    rows_upto_test = {
        name: int((tables[name][spec.time_col] <= test).sum())
        if spec.time_col
        else len(tables[name])
        for name, spec in SPECS.items()
    }
    import_report = {
        "source": {
            "recipe": "RelBench 1.x rel-f1 (relbench/datasets/f1.py, relbench/tasks/f1.py)",
            "files": {stem: _sha256(_source(raw_dir, stem)) for stem in SOURCES.values()},
        },
        "policy": "null",
        "raw_rows": raw_rows,
        "rows": {name: len(df) for name, df in tables.items()},
        "rows_upto_test_timestamp": rows_upto_test,
        **report.to_dict(),
    }
    description = (
        "RelBench rel-f1: Formula 1 races, drivers, constructors, results, standings and "
        "qualifying (Ergast, http://ergast.com/mrd/), rebuilt from the Ergast CSV snapshot "
        "with RelBench's recipe."
    )
    return write_dataset(
        out_dir,
        NAME,
        {name: (tables[name], spec) for name, spec in SPECS.items()},
        VAL_TIMESTAMP,
        TEST_TIMESTAMP,
        TASKS,
        description,
        sidecars={IMPORT_REPORT_FILE: import_report},
    )
