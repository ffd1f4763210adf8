"""``tve targets``: the command against an independent brute force, its errors, its files.

The brute force below reads the tiny synthetic database with pandas and recomputes a few
targets with plain loops over seed times and customers (no SQL, no shared code with
tve_pipeline.targets): row counts, sum/mean/std, a mode with its tie rule, a dimension
aggregate, a distinct count, a fact->key<-fact count and ``inactive``. Seed times are
chosen to put orders exactly at t (outside the window) and exactly at t + Δ (inside).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tve_pipeline import cli
from tve_pipeline.database import column_types, open_dataset
from tve_pipeline.datasets import build_synthetic
from tve_pipeline.targets import (
    TargetQuery,
    compute_targets,
    iter_targets,
    targets_sql,
    write_targets,
    write_targets_by_seed_time,
)
from tve_pipeline.traversal import (
    AGGREGATIONS_BY_STYPE,
    build_traversal_graph,
    load_targets_json,
)
from tve_pipeline.windows import training_seed_times

ROOT = Path(__file__).resolve().parents[1]
DELTA = pd.Timedelta("30 days")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def frames(tiny):
    db = Path(tiny) / "db"
    return {
        name: pd.read_parquet(db / f"{name}.parquet")
        for name in ("customers", "products", "orders")
    }


def boundary_seeds(orders: pd.DataFrame) -> list[pd.Timestamp]:
    """Seed times with an order exactly at t and another exactly at t + Δ."""
    times = orders["order_time"].sort_values(ignore_index=True)
    return [
        times.iloc[len(times) // 3],
        times.iloc[2 * len(times) // 3] - DELTA,
        times.iloc[len(times) // 2],
    ]


def brute_force(frames, seeds) -> pd.DataFrame:
    customers, products, orders = frames["customers"], frames["products"], frames["orders"]
    price = dict(zip(products["product_id"], products["price"]))
    category = dict(zip(products["product_id"], products["category"]))
    rows = []
    for t in sorted(seeds):
        for cid, signup in zip(customers["customer_id"], customers["signup_time"]):
            if not signup <= t:
                continue
            mine = orders[
                (orders["customer_id"] == cid)
                & (orders["order_time"] > t)
                & (orders["order_time"] <= t + DELTA)
            ]
            amounts = [float(a) for a in mine["amount"] if not pd.isna(a)]
            channels = Counter(c for c in mine["channel"] if not pd.isna(c))
            top = max(channels.values(), default=0)
            fkf = 0
            for pid, when in zip(mine["product_id"], mine["order_time"]):
                same = orders["product_id"] == pid  # the second hop: (τ - Δ, τ] of τ = when
                in_window = (orders["order_time"] <= when) & (orders["order_time"] > when - DELTA)
                fkf += int((same & in_window).sum())
            rows.append(
                {
                    "customer_id": cid,
                    "timestamp": t,
                    "inactive": int(mine.empty),
                    "orders__count": len(mine),
                    "orders.amount__sum": math.fsum(amounts) if amounts else None,
                    "orders.amount__mean": math.fsum(amounts) / len(amounts) if amounts else None,
                    "orders.amount__std": float(np.std(amounts, ddof=1))
                    if len(amounts) > 1
                    else None,
                    "orders.channel__mode": min(
                        (c for c, n in channels.items() if n == top), default=None
                    ),
                    "orders>products.price__max": max(
                        (price[p] for p in mine["product_id"]), default=None
                    ),
                    "orders>products.category__count_distinct": len(
                        {category[p] for p in mine["product_id"]}
                    ),
                    "orders>products<orders__count": fkf,
                }
            )
    return pd.DataFrame(rows)


def assert_matches(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert len(got) == len(want)
    assert got["customer_id"].tolist() == want["customer_id"].tolist()
    assert pd.to_datetime(got["timestamp"]).tolist() == pd.to_datetime(want["timestamp"]).tolist()
    for col in want.columns[2:]:
        for i, (g, w) in enumerate(zip(got[col].tolist(), want[col].tolist())):
            where = f"{col} row {i}"
            if w is None or (isinstance(w, float) and math.isnan(w)):
                assert g is None or (isinstance(g, float) and math.isnan(g)), (
                    f"{where}: got {g!r}, want null"
                )
            elif isinstance(w, str):
                assert g == w, f"{where}: got {g!r}, want {w!r}"
            else:
                assert math.isclose(float(g), float(w), rel_tol=1e-9, abs_tol=1e-9), (
                    f"{where}: {g!r} != {w!r}"
                )


def assert_same_frame(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Equal values; a text mode read back from parquet is pandas ``str`` (NaN for missing),
    compute_targets gives ``object`` (None): both are the same column of strings."""

    def plain(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        for col in frame.columns:
            if frame[col].dtype == object or isinstance(frame[col].dtype, pd.StringDtype):
                frame[col] = frame[col].astype(object).where(frame[col].notna(), None)
        return frame

    pd.testing.assert_frame_equal(plain(got), plain(want), check_dtype=False)


def run_cli(*argv: str) -> int:
    return cli.main(["targets", *map(str, argv)])


def test_cli_matches_brute_force(tiny, frames, tmp_path, capsys):
    seeds = boundary_seeds(frames["orders"])
    ts = ",".join(str(t) for t in seeds)
    assert (
        run_cli(
            tiny,
            "--entity",
            "customers",
            "--timedelta",
            "30 days",
            "--timestamps",
            ts,
            "--hops",
            "2",
            "--out",
            tmp_path,
        )
        == 0
    )
    assert "targets.parquet" in capsys.readouterr().out
    got = pd.read_parquet(tmp_path / "targets.parquet")
    want = brute_force(frames, seeds)
    assert_matches(got[list(want.columns)], want)
    assert got.columns[:3].tolist() == ["customer_id", "timestamp", "inactive"]
    defs = load_targets_json(tmp_path / "targets.json")
    assert [d.name for d in defs] == got.columns[3:].tolist()
    assert got["inactive"].sum() > 0 and (got["inactive"] == 0).sum() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "targets.json",
        "targets.parquet",
    ]  # no temp files left
    # The boundaries are really hit: an order exactly at t (excluded) and at t + Δ (included).
    times = set(frames["orders"]["order_time"])
    assert seeds[0] in times and seeds[1] + DELTA in times


def test_cli_equals_library_and_default_seed_times(tiny, frames, tmp_path):
    assert (
        run_cli(tiny, "--entity", "customers", "--out", tmp_path) == 0
    )  # Δ from the tasks, training seeds
    got = pd.read_parquet(tmp_path / "targets.parquet")
    ds = open_dataset(tiny)
    db = ds.get_db(upto_test_timestamp=False)
    tables = {name: t.df for name, t in db.table_dict.items()}
    seeds = training_seed_times(ds.val_timestamp, db.min_timestamp, DELTA)
    assert sorted(set(pd.to_datetime(got["timestamp"]))) == list(seeds)
    defs = build_traversal_graph(
        ds.manifest.tables, column_types(tables, ds.manifest), "customers", hops=2
    )
    assert [d.name for d in defs] == got.columns[3:].tolist()
    want = compute_targets(TargetQuery(tables, ds.manifest.tables, defs, "customers", seeds, DELTA))
    assert_same_frame(got, want)


def test_cli_options_select_targets(tiny, tmp_path):
    assert (
        run_cli(
            tiny,
            "--entity",
            "customers",
            "--timedelta",
            "30 days",
            "--hops",
            "1",
            "--exclude-columns",
            "orders.amount,orders.channel",
            "--out",
            tmp_path / "a",
        )
        == 0
    )
    names = pd.read_parquet(tmp_path / "a" / "targets.parquet").columns[3:].tolist()
    assert names[0] == "orders__count" and not any(
        "amount" in n or "channel" in n or ">" in n for n in names
    )
    assert (
        run_cli(
            tiny,
            "--entity",
            "customers",
            "--timedelta",
            "30 days",
            "--no-fact-key-fact",
            "--columns",
            "products.price",
            "--out",
            tmp_path / "b",
        )
        == 0
    )
    names = pd.read_parquet(tmp_path / "b" / "targets.parquet").columns[3:].tolist()
    assert names == [
        "orders__count",
        "orders>products__count",
        "orders>products.price__mean",
        "orders>products.price__min",
        "orders>products.price__max",
        "orders>products.price__sum",
        "orders>products.price__count",
        "orders>products.price__std",
    ]
    assert (
        run_cli(
            tiny,
            "--entity",
            "products",
            "--timedelta",
            "30 days",
            "--timestamps",
            "2020-06-01",
            "--exclude-tables",
            "customers",
            "--out",
            tmp_path / "c",
        )
        == 0
    )
    got = pd.read_parquet(tmp_path / "c" / "targets.parquet")
    # the seeds: 24 of the 25 products (no time column) have an order by t + Δ; one has none
    assert len(got) == 24 and "orders>customers__count" not in got.columns


def test_cli_types_columns_as_tve_types_json_declares(tiny, frames, tmp_path):
    """The dataset's ``tve_types.json`` (the user's overrides) types the columns of ``tve
    targets`` as it types those of the ``traversal_graph`` asset: ``orders.amount`` (floats,
    inferred numerical) declared categorical gets a mode and a distinct count, not sum/mean."""
    dataset = tmp_path / "tiny"
    shutil.copytree(tiny, dataset)
    declared = {"format": 1, "columns": {"orders": {"amount": "categorical"}}}
    (dataset / "tve_types.json").write_text(json.dumps(declared))
    seeds = boundary_seeds(frames["orders"])
    ts = ",".join(str(t) for t in seeds)
    out = tmp_path / "out"
    argv = ["--entity", "customers", "--timedelta", "30 days", "--timestamps", ts, "--out", out]
    assert run_cli(dataset, *argv) == 0

    # What the traversal_graph asset defines: column_types over RelBench's tables, with the
    # dataset folder (so with tve_types.json), then the traversal graph.
    ds = open_dataset(dataset)
    tables = {name: t.df for name, t in ds.get_db(upto_test_timestamp=False).table_dict.items()}
    types = column_types(tables, ds.manifest, dataset)
    assert types["orders"]["amount"] == "categorical"
    want_defs = build_traversal_graph(ds.manifest.tables, types, "customers", hops=2)
    defs = load_targets_json(out / "targets.json")
    assert defs == want_defs
    amount = {d.aggregation for d in defs if d.column == "amount"}
    assert amount == set(AGGREGATIONS_BY_STYPE["categorical"]), amount  # no sum, mean, ...

    # The values follow the declared type too (brute force over the orders in each window).
    got = pd.read_parquet(out / "targets.parquet")
    orders = frames["orders"]
    for row in got.itertuples(index=False):
        cid, t = row[0], pd.Timestamp(row[1])
        mine = orders[
            (orders["customer_id"] == cid)
            & (orders["order_time"] > t)
            & (orders["order_time"] <= t + DELTA)
        ]
        counts = Counter(float(a) for a in mine["amount"] if not pd.isna(a))
        top = max(counts.values(), default=0)
        mode = min((a for a, n in counts.items() if n == top), default=None)
        by_name = dict(zip(got.columns, row))
        assert by_name["orders.amount__count_distinct"] == len(counts)
        got_mode = by_name["orders.amount__mode"]
        assert (got_mode is None or math.isnan(got_mode)) if mode is None else got_mode == mode


def test_show_sql_prints_the_query(tiny, tmp_path, capsys):
    assert (
        run_cli(
            tiny,
            "--entity",
            "customers",
            "--timedelta",
            "30 days",
            "--timestamps",
            "2020-06-01",
            "--show-sql",
            "--out",
            tmp_path,
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "WITH" in out and 'JOIN "orders" AS f' in out and "INTERVAL '30 days'" in out


@pytest.mark.parametrize(("entity", "second"), [("customers", None), ("products", "3 days")])
def test_show_sql_script_runs_as_is_and_gives_the_same_rows(
    tiny, frames, tmp_path, capsys, entity, second
):
    """``--show-sql`` prints a DuckDB script (fact->key<-fact paths included, their second
    hop in (τ - Δ2, τ]: Δ2 = Δ or ``--second-hop-window``) that a fresh connection runs on
    the dataset's parquet files as it is, giving targets.parquet's rows; it writes nothing."""
    import duckdb

    seeds = ",".join(str(t) for t in boundary_seeds(frames["orders"]))
    argv = [tiny, "--entity", entity, "--timedelta", "30 days", "--timestamps", seeds]
    if second is not None:
        argv += ["--second-hop-window", second]
    assert run_cli(*argv, "--show-sql") == 0
    script = capsys.readouterr().out
    bound = f'"tve.time" > k."tve.time" - INTERVAL \'{second or "30 days"}\''
    assert bound in script and "read_parquet(" in script and not (tmp_path / "x").exists()
    assert run_cli(*argv, "--out", tmp_path / "x") == 0
    want = pd.read_parquet(tmp_path / "x" / "targets.parquet")
    con = duckdb.connect()  # a fresh connection: nothing registered, the script as printed
    got = con.execute(script).df()
    assert got.columns.tolist() == want.columns.tolist() and len(got) == len(want) > 0
    for col in want.columns:
        g, w = got[col], want[col]
        if w.dtype.kind in "fiuM":
            assert np.allclose(
                g.to_numpy(float), w.to_numpy(float), rtol=1e-9, atol=1e-12, equal_nan=True
            ), col
        else:
            assert ((g.isna() & w.isna()) | (g.astype(object) == w.astype(object))).all(), col


def test_out_or_show_sql_is_required(tiny, capsys):
    assert run_cli(tiny, "--entity", "customers") == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--entity", "nope"], ["nope"]),
        (["--entity", "orders"], ["orders"]),  # nothing time-stamped references orders
        (["--entity", "products", "--exclude-tables", "orders"], ["products"]),
        (["--entity", "customers", "--exclude-tables", "shops"], ["shops"]),
        (["--entity", "customers", "--columns", "orders.order_time"], ["orders.order_time"]),
        (["--entity", "customers", "--columns", "orders.customer_id"], ["orders.customer_id"]),
        (["--entity", "customers", "--columns", "orders.nope"], ["orders", "nope"]),
        (["--entity", "customers", "--columns", "products.price", "--hops", "1"], ["products"]),
        (["--entity", "customers", "--exclude-columns", "amount"], ["amount"]),
        (["--entity", "customers", "--timestamps", "2020-13-01"], ["2020-13-01"]),
        (["--entity", "customers", "--timedelta", "30 dayz"], ["30 dayz"]),
        (["--entity", "customers", "--second-hop-window", "-2 days"], ["--second-hop-window"]),
        (["--entity", "customers", "--second-hop-window", "soon"], ["--second-hop-window", "soon"]),
        (["--entity", "customers", "--memory-limit", "2 XB"], ["--memory-limit", "2 XB"]),
    ],
)
def test_bad_input_fails_in_one_line_naming_it(tiny, tmp_path, capsys, argv, names):
    assert run_cli(tiny, *argv, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tve: error: ") and "\n" not in err, err
    for name in names:
        assert name in err, err
    assert not (tmp_path / "out" / "targets.parquet").exists()


def test_not_a_dataset(tmp_path, capsys):
    assert run_cli(tmp_path, "--entity", "customers", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "manifest.yaml" in err and "\n" not in err


def test_tve_binary(tiny, frames, tmp_path):
    tve = Path(sys.executable).parent / "tve"
    if not tve.exists():
        pytest.skip("no tve console script next to this interpreter")
    seeds = boundary_seeds(frames["orders"])
    ts = ",".join(str(t) for t in seeds)
    done = subprocess.run(
        [
            str(tve),
            "targets",
            str(tiny),
            "--entity",
            "customers",
            "--timedelta",
            "30 days",
            "--timestamps",
            ts,
            "--hops",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    want = brute_force(frames, seeds)
    got = pd.read_parquet(tmp_path / "out" / "targets.parquet")
    assert_matches(got[list(want.columns)], want)
    bad = subprocess.run(
        [str(tve), "targets", str(tiny), "--entity", "orders", "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'orders'" in bad.stderr, (
        bad.stderr
    )


# --------------------------------------------------------------------------- library paths


def _tiny_library(tiny):
    ds = open_dataset(tiny)
    tables = {name: t.df for name, t in ds.get_db(upto_test_timestamp=False).table_dict.items()}
    defs = build_traversal_graph(
        ds.manifest.tables, column_types(tables, ds.manifest), "customers", hops=2
    )
    return ds, tables, defs


def test_groups_hold_fewer_seed_times_past_the_pair_budget(tiny, monkeypatch):
    """A group of seed times spans at most ``_GROUP_PAIRS`` (entity, seed time) pairs,
    whatever ``seeds_per_query`` asks (here: all at once): same rows, more queries."""
    import tve_pipeline.targets.compute as targets

    ds, tables, defs = _tiny_library(tiny)
    start = pd.Timestamp(ds.val_timestamp) - pd.Timedelta(days=200)
    seeds = [start + pd.Timedelta(days=30 * i) for i in range(5)]
    query = TargetQuery(
        tables, ds.manifest.tables, defs, "customers", seeds, DELTA, seeds_per_query=None
    )
    want = compute_targets(query)
    asked, chunks = [], targets._chunks
    monkeypatch.setattr(targets, "_chunks", lambda s, n: (asked.append(n), chunks(s, n))[1])
    monkeypatch.setattr(targets, "_GROUP_PAIRS", 2 * len(tables["customers"]))
    pd.testing.assert_frame_equal(compute_targets(query), want)
    assert asked == [2]


def test_dense_sql_gives_the_same_rows(tiny, frames):
    """The printable one-query form (seed LEFT JOIN vector) equals what compute_targets returns."""
    import duckdb

    ds, tables, defs = _tiny_library(tiny)
    seeds = boundary_seeds(frames["orders"])
    want = compute_targets(TargetQuery(tables, ds.manifest.tables, defs, "customers", seeds, DELTA))
    con = duckdb.connect()
    for name, frame in tables.items():
        con.register(name, frame)
    con.register(
        "timestamps", pd.DataFrame({"timestamp": pd.to_datetime(seeds).astype("datetime64[us]")})
    )
    got = con.execute(targets_sql(ds.manifest.tables, defs, "customers", DELTA)).df()
    assert got.columns.tolist() == want.columns.tolist() and len(got) == len(want)
    for col in want.columns:
        g, w = got[col], want[col]
        if w.dtype.kind in "fiu" or g.dtype.kind in "fiu":
            assert np.allclose(
                g.to_numpy(float), w.to_numpy(float), rtol=1e-12, atol=0, equal_nan=True
            ), col
        else:
            assert ((g.isna() & w.isna()) | (g.astype(object) == w.astype(object))).all(), col


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    slice_rows=st.integers(1, 70),
    per_query=st.sampled_from([None, 1, 2, 3]),
    picks=st.lists(st.integers(-40, 260), min_size=1, max_size=7),
)
def test_slices_groups_and_parquet_equal_the_frame(tiny, tmp_path, slice_rows, per_query, picks):
    """Any slice size and grouping of seed times gives the same rows (all seed times in one
    query as the reference), and write_targets' file holds compute_targets' frame."""
    import pyarrow as pa

    ds, tables, defs = _tiny_library(tiny)
    start = pd.Timestamp(ds.val_timestamp) - pd.Timedelta(days=200)
    seeds = [start + pd.Timedelta(days=p) for p in picks]
    everything = TargetQuery(tables, ds.manifest.tables, defs, "customers", seeds, DELTA)
    want = compute_targets(replace(everything, seeds_per_query=None))
    grouped = replace(everything, seeds_per_query=per_query)
    parts = list(iter_targets(grouped, slice_rows=slice_rows))
    assert all(p.num_rows <= slice_rows for p in parts)
    got = pa.concat_tables(parts).to_pandas()
    assert got[["customer_id", "timestamp"]].equals(want[["customer_id", "timestamp"]])
    pd.testing.assert_frame_equal(compute_targets(grouped), want)
    path = tmp_path / f"t{slice_rows}.parquet"
    stats = write_targets(grouped, path, slice_rows=slice_rows)
    written = pd.read_parquet(path)
    assert stats == {"rows": len(want), "inactive": int(want["inactive"].sum())}
    assert_same_frame(written, want)


def test_write_targets_is_atomic_on_failure(tiny, tmp_path):
    ds, tables, defs = _tiny_library(tiny)
    path = tmp_path / "targets.parquet"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match="no data for tables"):
        write_targets(
            TargetQuery(
                {"customers": tables["customers"]},
                ds.manifest.tables,
                defs,
                "customers",
                ["2020-06-01"],
                DELTA,
            ),
            path,
        )
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == [
        "targets.parquet"
    ]


def test_parquet_paths_as_tables(tiny, frames):
    """compute_targets reads parquet files directly (what the command does) with the same result."""
    ds, tables, defs = _tiny_library(tiny)
    seeds = boundary_seeds(frames["orders"])
    files = {name: Path(tiny) / "db" / f"{name}.parquet" for name in tables}
    got = compute_targets(TargetQuery(files, ds.manifest.tables, defs, "customers", seeds, DELTA))
    want = compute_targets(TargetQuery(tables, ds.manifest.tables, defs, "customers", seeds, DELTA))
    pd.testing.assert_frame_equal(got, want)
    assert json.loads(json.dumps([d.to_dict() for d in defs]))[0]["name"] == "orders__count"


def test_targets_by_seed_time_are_compute_targets_split_by_seed_time(tiny, tmp_path):
    """One streamed query, one file per seed time: each file holds exactly compute_targets'
    rows of its seed time (compute_targets being checked against brute force above)."""
    ds, tables, defs = _tiny_library(tiny)
    start = pd.Timestamp(ds.val_timestamp) - pd.Timedelta(days=200)
    seeds = [start + pd.Timedelta(days=d) for d in (0, 30, 60, 90)]
    early = pd.Timestamp("1999-01-01")  # before every customer: a file without rows
    stats = write_targets_by_seed_time(
        TargetQuery(tables, ds.manifest.tables, defs, "customers", [early, *seeds], DELTA),
        lambda t: tmp_path / f"{t.date()}.parquet",
    )
    whole = compute_targets(
        TargetQuery(tables, ds.manifest.tables, defs, "customers", seeds, DELTA)
    )
    for t in seeds:
        want = whole[whole["timestamp"] == t].reset_index(drop=True)
        assert_same_frame(pd.read_parquet(tmp_path / f"{t.date()}.parquet"), want)
        assert stats[t] == {"rows": len(want), "inactive": int(want["inactive"].sum())}
    assert len(pd.read_parquet(tmp_path / "1999-01-01.parquet")) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
