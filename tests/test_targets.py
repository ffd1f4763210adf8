"""Traversal graph and raw task vectors, checked against an independent brute force.

The brute force below re-implements the target semantics (tve_pipeline.traversal's
docstring) with plain Python loops over seed times, entities and rows; no SQL. Hypothesis
draws small databases that hit the edge cases: times exactly at t and t + Δ, empty and
single-value windows, ties for the mode, null values and keys, dangling keys, entities
created after the seed time.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tve_pipeline import targets
from tve_pipeline.targets import (
    TargetQuery,
    compute_targets,
    connection,
    group_files,
    iter_targets,
    lookups,
    targets_sql,
)
from tve_pipeline.targets import query as target_query
from tve_pipeline.traversal import (
    Hop,
    TargetDef,
    build_traversal_graph,
    entity_tables,
    load_targets_json,
    save_targets_json,
    traversal_paths,
)


@dataclass
class Spec:  # the TableSpec shape (relbench.manifest.TableSpec), kept local on purpose
    pkey: str | None = None
    time_col: str | None = None
    fkeys: dict[str, str] = field(default_factory=dict)


BASE = pd.Timestamp("2021-03-01")
DELTA = pd.Timedelta(days=2)


# --------------------------------------------------------------------------- brute force


def _missing(v) -> bool:
    return v is None or (not isinstance(v, str) and bool(pd.isna(v)))


def _records(frame: pd.DataFrame) -> list[dict]:
    return [
        {c: (None if _missing(v) else v) for c, v in row.items()}
        for row in frame.to_dict("records")
    ]


def _aggregate(aggregation: str, rows: list[dict], column: str | None):
    if column is None:
        return len(rows)
    values = [r[column] for r in rows if r[column] is not None]
    if aggregation == "count":
        return len(values)
    if aggregation == "count_distinct":
        return len(set(values))
    if not values:
        return None
    if aggregation == "mode":
        counts = Counter(values)
        best = max(counts.values())
        return min(v for v, n in counts.items() if n == best)
    x = [float(v) for v in values]
    if aggregation == "sum":
        return math.fsum(x)
    if aggregation == "mean":
        return math.fsum(x) / len(x)
    if aggregation == "min":
        return min(x)
    if aggregation == "max":
        return max(x)
    if aggregation == "std":
        if len(x) < 2:
            return None
        mean = math.fsum(x) / len(x)
        return math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (len(x) - 1))
    raise AssertionError(aggregation)


def brute_force(frames, schema, defs, entity_table, timestamps, delta, second=None) -> pd.DataFrame:
    """``second``: Δ2, the window (τ - Δ2, τ] of a later "in" hop (None: ``delta``)."""
    rows = {name: _records(frame) for name, frame in frames.items()}
    entity = schema[entity_table]
    second = delta if second is None else second

    def walk(path, entity_id, t):
        first = path[0]
        time = schema[first.table].time_col
        reached = [
            (r, r)
            for r in rows[first.table]
            if r[first.via] is not None
            and r[first.via] == entity_id
            and r[time] is not None
            and t < r[time] <= t + delta
        ]
        current_table = first.table
        for hop in path[1:]:
            spec = schema[hop.table]
            nxt = []
            for hop1_row, row in reached:
                if hop.direction == "out":
                    key = row[hop.via]
                    nxt += [
                        (hop1_row, x)
                        for x in rows[hop.table]
                        if key is not None and x[spec.pkey] == key
                    ]
                else:
                    key = row[schema[current_table].pkey]
                    hop1_time = hop1_row[schema[first.table].time_col]
                    for x in rows[hop.table]:
                        if x[hop.via] is None or x[hop.via] != key:
                            continue
                        if spec.time_col is not None and (
                            x[spec.time_col] is None
                            or x[spec.time_col] > hop1_time
                            or x[spec.time_col] <= hop1_time - second
                        ):
                            continue
                        nxt.append((hop1_row, x))
            reached, current_table = nxt, hop.table
        return [row for _, row in reached]

    out = []
    first_hops = list(dict.fromkeys(d.path[0] for d in defs))
    # A table without time: an entity is a seed from t + Δ >= its first row in any first-hop
    # table on (the reference's "universal" table); never without a non-null-time row.
    first_activity: dict = {}
    for h in first_hops:
        time = schema[h.table].time_col
        for r in rows[h.table]:
            if r[h.via] is not None and r[time] is not None:
                before = first_activity.get(r[h.via], r[time])
                first_activity[r[h.via]] = min(before, r[time])
    for t in sorted(set(pd.to_datetime(list(timestamps)))):
        for e in sorted(rows[entity_table], key=lambda r: r[entity.pkey]):
            if entity.time_col is not None and (
                e[entity.time_col] is None or e[entity.time_col] > t
            ):
                continue
            if entity.time_col is None and not (
                e[entity.pkey] in first_activity and first_activity[e[entity.pkey]] <= t + delta
            ):
                continue
            record = {entity.pkey: e[entity.pkey], "timestamp": t}
            active = any(walk((h,), e[entity.pkey], t) for h in first_hops)
            record["inactive"] = 0 if active else 1
            for d in defs:
                record[d.name] = _aggregate(
                    d.aggregation, walk(d.path, e[entity.pkey], t), d.column
                )
            out.append(record)
    return pd.DataFrame(
        out, columns=[entity.pkey, "timestamp", "inactive", *[d.name for d in defs]]
    )


def assert_same_targets(got: pd.DataFrame, want: pd.DataFrame, defs: list[TargetDef]) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want), (got.iloc[:, :3], want.iloc[:, :3])
    key = want.columns[0]
    assert got[key].tolist() == want[key].tolist()
    assert pd.to_datetime(got["timestamp"]).tolist() == pd.to_datetime(want["timestamp"]).tolist()
    assert got["inactive"].tolist() == want["inactive"].tolist()
    assert got["inactive"].dtype == np.int64
    for d in defs:
        for i, (g, w) in enumerate(zip(got[d.name].tolist(), want[d.name].tolist())):
            where = f"{d.name} row {i} ({got[key].iloc[i]}, {got['timestamp'].iloc[i]})"
            if _missing(w):
                assert _missing(g), f"{where}: got {g!r}, want null"
            elif d.aggregation == "mode":
                assert g == w, f"{where}: got {g!r}, want {w!r}"
            else:
                assert not _missing(g), f"{where}: got null, want {w!r}"
                assert math.isclose(float(g), float(w), rel_tol=1e-9, abs_tol=1e-9), (
                    f"{where}: {g!r} != {w!r}"
                )


# --------------------------------------------------------------------------- random databases

NUMBERS = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5, -3.0, 7.0]))
STATUSES = st.one_of(st.none(), st.sampled_from(["x", "y", "z"]))
DAYS = st.integers(0, 9)


def shop_schema(customer_time: bool, names: dict[str, str] | None = None) -> dict[str, Spec]:
    n = {
        k: k
        for k in (
            "customers",
            "products",
            "orders",
            "customer_id",
            "product_id",
            "order_id",
            "created",
            "time",
            "amount",
            "status",
            "price",
            "category",
            "label",
        )
    }
    n.update(names or {})
    return {
        n["customers"]: Spec(
            pkey=n["customer_id"], time_col=n["created"] if customer_time else None
        ),
        n["products"]: Spec(pkey=n["product_id"]),
        n["orders"]: Spec(
            pkey=n["order_id"],
            time_col=n["time"],
            fkeys={n["customer_id"]: n["customers"], n["product_id"]: n["products"]},
        ),
    }


def shop_column_types(names: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    n = {
        k: k
        for k in (
            "customers",
            "products",
            "orders",
            "amount",
            "status",
            "price",
            "category",
            "label",
            "age",
            "time",
            "customer_id",
        )
    }
    n.update(names or {})
    return {
        n["customers"]: {n["age"]: "numerical"},
        n["products"]: {n["price"]: "numerical", n["category"]: "categorical", n["label"]: "text"},
        n["orders"]: {
            n["amount"]: "numerical",
            n["status"]: "categorical",
            n["time"]: "timestamp",
            n["customer_id"]: "numerical",
        },
    }


@st.composite
def shop_databases(draw, orders: tuple[int, int] = (0, 12)):
    customer_time = draw(st.booleans())
    n_customers = draw(st.integers(1, 4))
    n_products = draw(st.integers(1, 3))
    created = [
        draw(st.one_of(st.none(), DAYS)) if customer_time else None for _ in range(n_customers)
    ]
    customers = pd.DataFrame(
        {
            "customer_id": list(range(n_customers)),
            "age": [draw(NUMBERS) for _ in range(n_customers)],
        }
    )
    if customer_time:
        customers["created"] = [None if d is None else BASE + pd.Timedelta(days=d) for d in created]
        customers["created"] = pd.to_datetime(customers["created"])
    products = pd.DataFrame(
        {
            "product_id": list(range(n_products)),
            "price": pd.array([draw(NUMBERS) for _ in range(n_products)], dtype="Float64"),
            "category": pd.Series([draw(STATUSES) for _ in range(n_products)], dtype=object),
            "label": [f"p{i}" for i in range(n_products)],
        }
    )
    n_orders = draw(st.integers(*orders))
    key = lambda n: st.one_of(st.none(), st.integers(0, n))  # noqa: E731  (n itself dangles)
    order_days = [draw(st.one_of(DAYS, st.just(None))) for _ in range(n_orders)]
    orders = pd.DataFrame(
        {
            "order_id": list(range(n_orders)),
            "time": pd.to_datetime(
                [None if d is None else BASE + pd.Timedelta(days=d) for d in order_days]
            ),
            "customer_id": pd.array(
                [draw(key(n_customers)) for _ in range(n_orders)], dtype="Int64"
            ),
            "product_id": [
                draw(key(n_products)) for _ in range(n_orders)
            ],  # float64 with NaN when null
            "amount": [draw(NUMBERS) for _ in range(n_orders)],
            "status": pd.Series([draw(STATUSES) for _ in range(n_orders)], dtype=object),
        }
    )
    orders["product_id"] = orders["product_id"].astype("float64")
    orders["amount"] = orders["amount"].astype("float64")
    seed_days = draw(st.lists(st.integers(-1, 9), min_size=1, max_size=3))
    timestamps = [BASE + pd.Timedelta(days=d) for d in seed_days]
    frames = {"customers": customers, "products": products, "orders": orders}
    return customer_time, frames, timestamps


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    db=shop_databases(),
    entity=st.sampled_from(["customers", "products"]),
    hops=st.sampled_from([1, 2]),
    running=st.booleans(),
)
def test_targets_match_brute_force(db, entity, hops, running):
    customer_time, frames, timestamps = db
    schema = shop_schema(customer_time)
    defs = build_traversal_graph(schema, shop_column_types(), entity, hops=hops)
    query = TargetQuery(
        frames, schema, defs, entity, timestamps, DELTA, memory_limit="1GB", threads=2
    )
    got = compute_targets(replace(query, running_aggregates=running))
    want = brute_force(frames, schema, defs, entity, timestamps, DELTA)
    assert_same_targets(got, want, defs)
    # the dense SQL (`--show-sql`'s spec): the same rows, its seeds included
    con = _duckdb_over(frames, sorted(set(timestamps)))
    dense = con.sql(targets_sql(schema, defs, entity, DELTA, running_aggregates=running)).df()
    assert_same_targets(dense.astype({"inactive": "int64"}), want, defs)


@FAST
@given(
    db=shop_databases(orders=(10, 40)),
    entity=st.sampled_from(["customers", "products"]),
    seeds=st.lists(st.integers(-1, 9), min_size=1, max_size=4),
    per_query=st.sampled_from([None, 1, 2]),
    second=st.sampled_from(
        [None, pd.Timedelta(days=1), pd.Timedelta(hours=36), pd.Timedelta(days=20)]
    ),
    values=st.sampled_from([0, 16]),
)
def test_fact_key_fact_paths_match_brute_force(db, entity, seeds, per_query, second, values):
    """fact->key<-fact paths alone, on databases with enough orders that many (seed time,
    entity) pairs reach the key side from one (key, time) and many from several: the two
    ways modes and distinct counts are computed; in one group of seed times or several
    (each group reads its own files of the lookups: windows of 2 days a day apart overlap
    from group to group); the second hop's window (τ - Δ2, τ] of Δ (None), shorter, not
    on the day grid, or longer than every history (the whole history up to τ); value counts
    per window from prefix counts per value (few values) or from runs of (key, value)."""
    customer_time, frames, _ = db
    timestamps = [BASE + pd.Timedelta(days=d) for d in seeds]
    schema = shop_schema(customer_time)
    defs = [
        d
        for d in build_traversal_graph(schema, shop_column_types(), entity, hops=2)
        if len(d.path) == 3 and d.path[2].direction == "in"
    ]
    query = TargetQuery(
        frames,
        schema,
        defs,
        entity,
        timestamps,
        DELTA,
        seeds_per_query=per_query,
        second_hop_window=second,
    )
    with mock.patch.object(lookups, "_DENSE_VALUES", values):
        got = compute_targets(query)
    want = brute_force(frames, schema, defs, entity, timestamps, DELTA, second)
    assert_same_targets(got, want, defs)


#: Other orders of the products a customer's orders are of: a fact->key<-fact path.
FKF_PATH = (
    Hop("orders", "customer_id", "in"),
    Hop("products", "product_id", "out"),
    Hop("orders", "product_id", "in"),
)


def test_fact_key_fact_mode_over_several_keys():
    """A customer whose window orders (days 2 and 3) reach two products (their orders in
    (day 0, day 2] and (day 1, day 3]): the mode is of the summed counts (y: 2 + 0, x: 1 +
    0, z: 0 + 1 -> y, not the smallest value x), hand-computed."""
    t = lambda d: BASE + pd.Timedelta(days=d)  # noqa: E731
    frames = _fixed_shop()
    frames["orders"] = pd.DataFrame(
        {
            "order_id": range(6),
            "time": [t(1), t(1), t(1), t(2), t(2), t(3)],
            "customer_id": [1, 1, 1, 2, 0, 0],
            "product_id": [0, 0, 0, 1, 0, 1],
            "amount": [1.0] * 6,
            "status": ["y", "y", "x", "z", None, None],
        }
    )
    schema = shop_schema(True)
    path = FKF_PATH
    defs = [
        TargetDef(f"x__{a}", "customers", path, "status", a) for a in ("mode", "count_distinct")
    ]
    got = compute_targets(TargetQuery(frames, schema, defs, "customers", [t(1)], DELTA))
    assert_same_targets(got, brute_force(frames, schema, defs, "customers", [t(1)], DELTA), defs)
    row = got.set_index("customer_id").loc[0]
    assert row["x__mode"] == "y" and row["x__count_distinct"] == 3


def test_fact_key_fact_mode_of_one_key():
    """Customers whose window orders reach one product each read the mode and distinct
    count of the product's orders in (τ - Δ, τ] of their order's time τ, rows at τ included
    (hand-computed: product 0 in (day 0, day 2] holds y, y, x, z -> y, 3 values; product 1
    in (day 1, day 3] holds z, x -> the tie goes to the smaller x, 2 values)."""
    t = lambda d: BASE + pd.Timedelta(days=d)  # noqa: E731
    frames = _fixed_shop()
    frames["orders"] = pd.DataFrame(
        {
            "order_id": range(7),
            "time": [t(1), t(1), t(1), t(2), t(2), t(3), t(4)],
            "customer_id": [1, 1, 2, 0, 2, 1, 2],
            "product_id": [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0],
            "amount": [1.0] * 7,
            "status": ["y", "y", "x", "z", "z", "x", "x"],
        }
    )
    schema = shop_schema(True)
    path = FKF_PATH
    defs = [
        TargetDef(f"x__{a}", "customers", path, "status", a)
        for a in ("mode", "count_distinct", "count")
    ]
    got = compute_targets(TargetQuery(frames, schema, defs, "customers", [t(1)], DELTA))
    assert_same_targets(got, brute_force(frames, schema, defs, "customers", [t(1)], DELTA), defs)
    rows = got.set_index("customer_id")
    assert rows.loc[0, ["x__mode", "x__count_distinct", "x__count"]].tolist() == ["y", 3, 4]
    assert rows.loc[1, ["x__mode", "x__count_distinct", "x__count"]].tolist() == ["x", 2, 2]


def _fixed_shop():
    """A hand-made database with ties, single values, boundaries and a late customer."""
    t = lambda d, h=0: BASE + pd.Timedelta(days=d, hours=h)  # noqa: E731
    customers = pd.DataFrame(
        {"customer_id": [0, 1, 2, 3], "created": [t(0), t(0), t(6), pd.NaT], "age": [1.0] * 4}
    )
    products = pd.DataFrame(
        {
            "product_id": [0, 1, 2],
            "price": [10.0, 20.0, None],
            "category": ["b", "a", "a"],
            "label": ["x", "y", "z"],
        }
    )
    orders = pd.DataFrame(
        {
            "order_id": range(8),
            "time": [t(1), t(3), t(3, 1), t(2), t(5), t(7), t(4), t(1)],
            "customer_id": [0, 0, 0, 1, 1, 2, 1, 3],
            "product_id": [0, 1, 1, 0, 2, 1, 1, 0],
            "amount": [1.0, 2.0, 2.0, 5.0, np.nan, 3.0, 4.0, 9.0],
            "status": ["y", "x", "y", "x", "x", None, "y", "z"],
        }
    )
    return {"customers": customers, "products": products, "orders": orders}


def test_fixed_database_values():
    frames = _fixed_shop()
    schema = shop_schema(True)
    defs = build_traversal_graph(schema, shop_column_types(), "customers")
    ts = [BASE + pd.Timedelta(days=1), BASE + pd.Timedelta(days=5)]
    got = compute_targets(TargetQuery(frames, schema, defs, "customers", ts, DELTA))
    assert_same_targets(got, brute_force(frames, schema, defs, "customers", ts, DELTA), defs)
    by = got.set_index(["customer_id", "timestamp"])
    # t = day 1, window (day 1, day 3]: customer 0 has orders 1 (day 3, exactly t + Δ) only;
    # order 0 at exactly t is outside, order 2 (day 3 + 1h) too.
    row = by.loc[(0, ts[0])]
    assert row["orders__count"] == 1 and row["orders.amount__sum"] == 2.0
    assert pd.isna(row["orders.amount__std"])  # a single value
    assert row["orders>products<orders__count"] == 1  # order 2 is later than the hop-1 order
    # customer 1, window (day 1, day 3]: order 3 (day 2) only; (day 5, day 7]: nothing.
    assert by.loc[(1, ts[0])]["orders.status__mode"] == "x"
    assert by.loc[(1, ts[1])]["inactive"] == 1 and by.loc[(1, ts[1])]["orders__count"] == 0
    assert pd.isna(by.loc[(1, ts[1])]["orders.status__mode"])
    # customer 2 is created on day 6: absent at day 1 and day 5; customer 3 has no creation time.
    assert 2 not in got["customer_id"].tolist() and 3 not in got["customer_id"].tolist()
    assert got.columns[:3].tolist() == ["customer_id", "timestamp", "inactive"]


def _window_shop() -> dict[str, pd.DataFrame]:
    """Product 0's orders at days 5, 6, 9 (exactly τ - Δ), 10, 10.5, 11 (the first-hop
    order of customer 0, τ) and 11 + 1 hour (after τ, customer 1's): what the bound keeps."""
    t = lambda d, h=0: BASE + pd.Timedelta(days=d, hours=h)  # noqa: E731
    frames = _fixed_shop()
    frames["customers"] = pd.DataFrame({"customer_id": [0, 1], "created": [BASE] * 2, "age": 1.0})
    frames["orders"] = pd.DataFrame(
        {
            "order_id": range(7),
            "time": [t(5), t(6), t(9), t(10), t(10, 12), t(11), t(11, 1)],
            "customer_id": [1, 1, 1, 1, 1, 0, 1],
            "product_id": [0.0] * 7,
            "amount": [100.0, -50.0, 7.0, 1.0, 2.0, 3.0, 1000.0],
            "status": ["a", "a", "a", "b", "b", "c", "a"],
        }
    )
    return frames


@pytest.mark.parametrize(
    ("second", "want"),
    [
        # Δ2 = Δ = 2 days: (day 9, day 11] holds 1 b, 2 b, 3 c (day 9 itself is out)
        (None, [3, 6.0, 2.0, 1.0, 3.0, 1.0, "b", 2, 3]),
        # Δ2 = 1 day: (day 10, day 11] holds 2 b, 3 c: the tie goes to the smaller b
        (pd.Timedelta(days=1), [2, 5.0, 2.5, 2.0, 3.0, math.sqrt(0.5), "b", 2, 2]),
        # Δ2 = 30 days: every order up to day 11, the old "no later than" (the whole history)
        (
            pd.Timedelta(days=30),
            [6, 63.0, 10.5, -50.0, 100.0, math.sqrt(11901.5 / 5), "a", 3, 6],
        ),
    ],
)
@pytest.mark.parametrize("values", [0, 16])
def test_second_hop_window_bounds_every_aggregate(monkeypatch, second, want, values):
    """Hand-computed: customer 0's one window order (day 11, product 0) reaches product 0's
    orders in (day 11 - Δ2, day 11], itself included; the bound changes every aggregate
    (count, sum, mean, min, max, std, mode, distinct count, value count) against the whole
    history, in process (value counts from prefix counts per value, or from runs) and in
    the SQL that ``--show-sql`` prints (lookups and joined rows)."""
    import duckdb

    monkeypatch.setattr(lookups, "_DENSE_VALUES", values)
    frames = _window_shop()
    schema = shop_schema(True)
    names = ["n", "sum", "mean", "min", "max", "std", "mode", "distinct", "count"]
    defs = [TargetDef("x__n", "customers", FKF_PATH, None, "count")] + [
        TargetDef(f"x__{name}", "customers", FKF_PATH, column, agg)
        for name, column, agg in [
            ("sum", "amount", "sum"),
            ("mean", "amount", "mean"),
            ("min", "amount", "min"),
            ("max", "amount", "max"),
            ("std", "amount", "std"),
            ("mode", "status", "mode"),
            ("distinct", "status", "count_distinct"),
            ("count", "status", "count"),
        ]
    ]
    ts = [BASE + pd.Timedelta(days=10)]
    query = TargetQuery(frames, schema, defs, "customers", ts, DELTA, second_hop_window=second)
    con = duckdb.connect()
    for name, frame in frames.items():
        con.register(name, frame)
    con.register("timestamps", pd.DataFrame({"timestamp": pd.to_datetime(ts)}))
    outputs = {"in process": compute_targets(query)}
    for running in (True, False):
        sql = targets_sql(
            schema, defs, "customers", DELTA, running_aggregates=running, second_hop_window=second
        )
        outputs[f"SQL, running {running}"] = con.sql(sql).df()
    for how, got in outputs.items():
        row = got.set_index("customer_id").loc[0, [f"x__{name}" for name in names]].tolist()
        for name, g, w in zip(names, row, want):
            assert g == w or math.isclose(g, w, rel_tol=1e-9), f"{how}: {name} {g!r} != {w!r}"
    assert_same_targets(
        outputs["in process"],
        brute_force(frames, schema, defs, "customers", ts, DELTA, second),
        defs,
    )


def test_mode_ties_take_smallest_value():
    frames = _fixed_shop()
    schema = shop_schema(True)
    defs = [
        d
        for d in build_traversal_graph(schema, shop_column_types(), "customers", hops=1)
        if d.aggregation == "mode"
    ]
    t0 = BASE  # window (day 0, day 2]: customer 0 orders 0 ('y'); (day 0, day 4]:
    got = compute_targets(
        TargetQuery(frames, schema, defs, "customers", [t0], pd.Timedelta(days=4))
    )
    # customer 0: orders 0 ('y'), 1 ('x'), 2 ('y') -> 'y';
    # customer 1: orders 3 ('x'), 6 ('y') -> tie -> 'x'
    assert got.set_index("customer_id")["orders.status__mode"].to_dict() == {0: "y", 1: "x"}


# --------------------------------------------------------------------------- seeds


def _seeds_db():
    """Users without a time column, two fact tables (reviews, visits); seed times 01-10 and
    01-20, Δ = 10 days (a step of Δ apart, as the reference's are)."""
    day = lambda d: pd.Timestamp("2021-01-01") + pd.Timedelta(days=d - 1)  # noqa: E731
    none = pd.NaT
    # user: 0 first active 01-01 (before the first window), 1 on 01-15 (inside the first
    # window), 2 on 01-25 (inside the second only), 3 on 02-05 (after the last), 4 only
    # null-time rows, 5 no row, 6 on 01-20 exactly (t + Δ of the first seed time; plus a
    # null-time review), 7 first in reviews (01-08) though later in visits (01-26); a
    # null-key review on 01-02 is no one's
    reviews = pd.DataFrame(
        {
            "review_id": range(8),
            "user_id": pd.array([0, 2, 3, 4, 4, 6, 7, None], dtype="Int64"),
            "at": pd.to_datetime([day(1), day(25), day(36), none, none, none, day(8), day(2)]),
        }
    )
    visits = pd.DataFrame(
        {
            "visit_id": range(5),
            "user_id": pd.array([1, 3, 6, 7, 4], dtype="Int64"),
            "day": pd.to_datetime([day(15), day(40), day(20), day(26), none]),
        }
    )
    frames = {"users": pd.DataFrame({"user_id": range(8)}), "reviews": reviews, "visits": visits}
    schema = {
        "users": Spec(pkey="user_id"),
        "reviews": Spec(pkey="review_id", time_col="at", fkeys={"user_id": "users"}),
        "visits": Spec(pkey="visit_id", time_col="day", fkeys={"user_id": "users"}),
    }
    defs = [
        TargetDef(f"{f}__count", "users", (Hop(f, "user_id", "in"),), None, "count")
        for f in ("reviews", "visits")
    ]
    return frames, schema, defs, [day(10), day(20)], pd.Timedelta(days=10)


#: (user, seed day of January, inactive, reviews__count, visits__count), by hand
SEED_ROWS = [
    (0, 10, 1, 0, 0),
    (1, 10, 0, 0, 1),
    (6, 10, 0, 0, 1),
    (7, 10, 1, 0, 0),
    (0, 20, 1, 0, 0),
    (1, 20, 1, 0, 0),
    (2, 20, 0, 1, 0),
    (6, 20, 1, 0, 0),
    (7, 20, 0, 0, 1),
]


def _seed_rows(frame: pd.DataFrame) -> list[tuple]:
    return [
        (int(r.user_id), pd.Timestamp(r.timestamp).day, int(r.inactive), int(r[3]), int(r[4]))
        for r in frame.itertuples(index=False)
    ]


def test_seeds_of_a_table_without_time_are_first_active_by_the_next_window_end(tmp_path):
    """Seeds as the reference's "universal" table, by hand: an entity of a table without
    time is a seed at t from t + Δ >= its first row in any first-hop table on; one with only
    null-time rows, or none, or first active after t + Δ, is not; in the dense SQL, the
    in-process engine (frame, one file, a file per seed time) and the pandas oracle."""
    from tve_pipeline.recompute import existing_entities, recompute_task_vectors

    frames, schema, defs, ts, delta = _seeds_db()
    con = _duckdb_over(frames, ts)
    assert _seed_rows(con.sql(targets_sql(schema, defs, "users", delta)).df()) == SEED_ROWS
    query = TargetQuery(frames, schema, defs, "users", ts, delta)
    assert _seed_rows(compute_targets(query)) == SEED_ROWS
    stats = targets.write_targets(query, tmp_path / "all.parquet", slice_rows=2)
    assert _seed_rows(pd.read_parquet(tmp_path / "all.parquet")) == SEED_ROWS
    assert stats == {"rows": 9, "inactive": 5}
    by_time = targets.write_targets_by_seed_time(query, lambda t: tmp_path / f"{t.day}.parquet")
    assert {t.day: v["rows"] for t, v in by_time.items()} == {10: 4, 20: 5}
    files = [pd.read_parquet(tmp_path / f"{d}.parquet") for d in (10, 20)]
    assert _seed_rows(pd.concat(files)) == SEED_ROWS
    oracle = []
    for t in ts:
        seeds = existing_entities(frames, schema, "users", t, defs=defs, delta=delta)
        oracle += _seed_rows(
            recompute_task_vectors(frames, schema, defs, "users", seeds, t, delta).frame
        )
    assert oracle == SEED_ROWS
    # an entity table with its own time keeps `time <= t`, whatever its activity
    timed = {**schema, "users": Spec(pkey="user_id", time_col="joined")}
    joined = {**frames, "users": frames["users"].assign(joined=[ts[1]] * 4 + [ts[0]] * 4)}
    got = compute_targets(TargetQuery(joined, timed, defs, "users", ts, delta))
    assert [(int(u), t.day) for u, t in zip(got["user_id"], got["timestamp"])] == [
        *[(u, 10) for u in range(4, 8)],
        *[(u, 20) for u in range(8)],
    ]


# --------------------------------------------------------------------------- leakage


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    db=shop_databases(),
    extra=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2), NUMBERS, STATUSES), min_size=1, max_size=4
    ),
)
def test_rows_outside_what_a_target_reads_do_not_change_it(db, extra):
    customer_time, frames, timestamps = db
    schema = shop_schema(customer_time)
    defs = build_traversal_graph(schema, shop_column_types(), "customers")
    t = max(timestamps)
    before = compute_targets(TargetQuery(frames, schema, defs, "customers", [t], DELTA))

    def with_orders(days: list[pd.Timedelta]) -> dict[str, pd.DataFrame]:
        orders = frames["orders"]
        new = pd.DataFrame(
            {
                "order_id": range(len(orders), len(orders) + len(days)),
                "time": [t + d for d in days],
                "customer_id": pd.array([e[0] for e in extra], dtype="Int64"),
                "product_id": [float(e[1]) for e in extra],
                "amount": [np.nan if e[2] is None else e[2] for e in extra],
                "status": pd.Series([e[3] for e in extra], dtype=object),
            }
        )
        return {**frames, "orders": pd.concat([orders, new], ignore_index=True)}

    # Future rows (after t + Δ) are read by no target at all.
    future = with_orders([DELTA + pd.Timedelta(microseconds=1 + i) for i in range(len(extra))])
    after = compute_targets(TargetQuery(future, schema, defs, "customers", [t], DELTA))
    pd.testing.assert_frame_equal(before, after)

    # Past rows (time <= t) are outside every first hop: the paths that read first-hop rows
    # only (orders, orders>products) and `inactive` keep their values. A past row can make
    # an entity without a time column a seed (first active by t + Δ): an inactive one.
    past = with_orders([-pd.Timedelta(days=i) for i in range(len(extra))])
    after = compute_targets(TargetQuery(past, schema, defs, "customers", [t], DELTA))
    first_hop_only = ["inactive"] + [d.name for d in defs if len(d.path) <= 2]
    seen = after["customer_id"].isin(before["customer_id"]).to_numpy()
    kept = after[seen].reset_index(drop=True)
    pd.testing.assert_frame_equal(before[first_hop_only], kept[first_hop_only])
    assert (after.loc[~seen, "inactive"] == 1).all()
    assert seen.all() or not customer_time


# --------------------------------------------------------------------------- traversal graph


def small_schema() -> dict[str, Spec]:
    return {
        "customers": Spec(pkey="customer_id"),
        "products": Spec(pkey="product_id", time_col="added"),
        "orders": Spec(
            pkey="order_id",
            time_col="time",
            fkeys={"customer_id": "customers", "product_id": "products"},
        ),
        "reviews": Spec(
            pkey=None, time_col="time", fkeys={"customer_id": "customers", "product_id": "products"}
        ),
        "returns": Spec(pkey="return_id", fkeys={"order_id": "orders"}),  # no time: not a fact
        "transfers": Spec(time_col="time", fkeys={"from_id": "customers", "to_id": "customers"}),
        "stores": Spec(pkey="store_id"),
    }


def test_traversal_graph_paths_match_hand_written_list():
    I, O = "in", "out"  # noqa: E741
    o1, r1 = Hop("orders", "customer_id", I), Hop("reviews", "customer_id", I)
    to_p = Hop("products", "product_id", O)
    back_o, back_r = Hop("orders", "product_id", I), Hop("reviews", "product_id", I)
    tf, tt = Hop("transfers", "from_id", I), Hop("transfers", "to_id", I)
    via_to, via_from = Hop("customers", "to_id", O), Hop("customers", "from_id", O)
    # schema order: facts into customers, then each fact's other fkeys, then facts into the key
    expected = [
        (o1,),
        (o1, to_p),
        (o1, to_p, back_o),
        (o1, to_p, back_r),
        (r1,),
        (r1, to_p),
        (r1, to_p, back_o),
        (r1, to_p, back_r),
        (tf,),
        (tf, via_to),
        (tf, via_to, o1),
        (tf, via_to, r1),
        (tf, via_to, tf),
        (tf, via_to, tt),
        (tt,),
        (tt, via_from),
        (tt, via_from, o1),
        (tt, via_from, r1),
        (tt, via_from, tf),
        (tt, via_from, tt),
    ]
    schema = small_schema()
    assert traversal_paths(schema, "customers") == expected
    assert traversal_paths(schema, "customers", hops=1) == [(o1,), (r1,), (tf,), (tt,)]
    assert traversal_paths(schema, "customers", exclude_tables=["reviews", "transfers"]) == [
        (o1,),
        (o1, to_p),
        (o1, to_p, back_o),
    ]
    assert traversal_paths(schema, "customers", include_tables=["orders"]) == [(o1,)]


def test_traversal_graph_targets_names_and_columns():
    schema = small_schema()
    column_types = {
        "customers": {"customer_id": "numerical", "name": "text"},
        "orders": {
            "order_id": "numerical",
            "time": "timestamp",
            "customer_id": "numerical",
            "amount": "numerical",
            "status": "categorical",
            "note": "text_embedded",
        },
        "products": {"price": "numerical", "added": "numerical", "kind": "categorical"},
        "transfers": {"value": "numerical"},
    }
    defs = build_traversal_graph(
        schema, column_types, "customers", exclude_columns={"products": ["kind"]}
    )
    names = [d.name for d in defs]
    assert len(names) == len(set(names))
    assert names[:11] == [
        "orders__count",
        "orders.amount__mean",
        "orders.amount__min",
        "orders.amount__max",
        "orders.amount__sum",
        "orders.amount__count",
        "orders.amount__std",
        "orders.status__mode",
        "orders.status__count",
        "orders.status__count_distinct",
        "orders>products__count",
    ]
    assert "orders>products.price__mean" in names
    assert not any(
        ".kind__" in n or ".added__" in n or ".note__" in n or ".time__" in n for n in names
    )
    assert (
        "orders>products<orders.amount__std" in names and "orders>products<reviews__count" in names
    )
    # two fkeys of transfers point at customers: those hops carry their column
    assert "transfers[from_id].value__sum" in names
    assert "transfers[from_id]>customers[to_id]<transfers[to_id].value__mean" in names
    assert "transfers[to_id]>customers[from_id]<orders.status__mode" in names
    d = next(d for d in defs if d.name == "orders>products<reviews__count")
    assert d.column is None and d.aggregation == "count"
    assert d.path == (
        Hop("orders", "customer_id", "in"),
        Hop("products", "product_id", "out"),
        Hop("reviews", "product_id", "in"),
    )


def test_entity_without_incoming_fact_raises_naming_the_table():
    schema = small_schema()
    assert entity_tables(schema) == ["customers", "products"]
    for table in ("orders", "stores"):  # orders: only a non-time-stamped table references it
        with pytest.raises(ValueError, match=table):
            build_traversal_graph(schema, {}, table)
    with pytest.raises(ValueError, match="customers"):
        build_traversal_graph(schema, {}, "customers", include_tables=["returns"])


def test_targets_json_round_trip(tmp_path):
    defs = build_traversal_graph(shop_schema(True), shop_column_types(), "customers")
    path = tmp_path / "targets.json"
    save_targets_json(defs, path)
    raw = json.loads(path.read_text())
    assert raw[1] == {
        "name": "orders.amount__mean",
        "entity_table": "customers",
        "path": [{"table": "orders", "via": "customer_id", "direction": "in"}],
        "column": "amount",
        "aggregation": "mean",
    }
    assert load_targets_json(path) == defs


def test_hand_written_definitions_are_checked():
    schema = shop_schema(True)
    frames = _fixed_shop()
    bad = TargetDef("x", "customers", (Hop("orders", "product_id", "in"),), None, "count")
    with pytest.raises(ValueError, match="does not reference"):
        compute_targets(TargetQuery(frames, schema, [bad], "customers", [BASE], DELTA))
    with pytest.raises(ValueError, match="first hop"):
        TargetDef("y", "customers", (Hop("products", "product_id", "out"),), None, "count")
    with pytest.raises(ValueError, match="no column"):
        compute_targets(
            TargetQuery(
                frames,
                schema,
                [TargetDef("z", "customers", (Hop("orders", "customer_id", "in"),), "nope", "sum")],
                "customers",
                [BASE],
                DELTA,
            )
        )


# --------------------------------------------------------------------------- identifiers and SQL


def test_identifiers_with_spaces_and_double_quotes():
    names = {
        "customers": 'the "customers"',
        "products": "Seed",
        "orders": "order lines",
        "customer_id": 'customer "id"',
        "product_id": "product id",
        "order_id": "order id",
        "created": "created at",
        "time": "time'stamp",
        "amount": 'amount ("$")',
        "status": "status; DROP",
        "price": "list price",
        "category": 'cat"egory',
        "label": "label",
    }
    schema = shop_schema(True, names)
    column_types = shop_column_types(names)
    plain = _fixed_shop()
    rename = lambda f: f.rename(columns={k: v for k, v in names.items() if k in f.columns})  # noqa: E731
    frames = {names[k]: rename(v) for k, v in plain.items()}
    defs = build_traversal_graph(schema, column_types, names["customers"])
    assert 'order lines.amount ("$")__mean' in [d.name for d in defs]
    ts = [BASE, BASE + pd.Timedelta(days=3)]
    got = compute_targets(TargetQuery(frames, schema, defs, names["customers"], ts, DELTA))
    assert_same_targets(got, brute_force(frames, schema, defs, names["customers"], ts, DELTA), defs)
    sql = targets_sql(schema, defs, names["customers"], DELTA)
    assert (
        '"the ""customers"""' in sql and "tve_seed AS" in sql
    )  # a table called Seed shadows no CTE


def test_sql_is_set_based_and_readable(capsys):
    schema = shop_schema(True)
    defs = build_traversal_graph(schema, shop_column_types(), "customers")
    sql = targets_sql(schema, defs, "customers", pd.Timedelta(days=7))
    assert (
        sql.count('FROM "timestamps" AS ts') == 3
    )  # the seed entities, the one window and its fact->key<-fact lookups, not per time
    assert "INTERVAL '7 days'" in sql
    # fact -> key <- fact: per (key, time) aggregates combined over the window (τ - Δ2, τ]
    # of each distinct first-hop (key, τ), no join of each first-hop row to its key's rows
    assert "per_time_3 AS (  -- orders rows per products key and time" in sql
    assert sql.count("JOIN per_time_3 AS r") == 1 and "JOIN counts_3_1 AS c" in sql
    assert sql.count('"tve.time" > k."tve.time" - INTERVAL \'7 days\'') == 2  # at_3, reach_3_1
    assert "path_3" not in sql
    bounded = targets_sql(schema, defs, "customers", DELTA, second_hop_window=pd.Timedelta(hours=5))
    assert "- INTERVAL '18000000000 microseconds'" in bounded
    assert "INTERVAL '90 microseconds'" in targets_sql(
        schema, defs, "customers", pd.Timedelta(microseconds=90)
    )
    compute_targets(
        TargetQuery(_fixed_shop(), schema, defs[:1], "customers", [BASE], DELTA, show_sql=True)
    )
    assert "WITH" in capsys.readouterr().out


def test_no_seed_times_gives_an_empty_frame_with_all_columns():
    schema = shop_schema(True)
    defs = build_traversal_graph(schema, shop_column_types(), "customers")
    got = compute_targets(TargetQuery(_fixed_shop(), schema, defs, "customers", [], DELTA))
    assert got.empty and list(got.columns) == [
        "customer_id",
        "timestamp",
        "inactive",
        *[d.name for d in defs],
    ]
    with pytest.raises(ValueError, match="no target definitions"):
        compute_targets(TargetQuery(_fixed_shop(), schema, [], "customers", [BASE], DELTA))


def test_fact_key_fact_of_other_shapes_joins_rows():
    """Paths that running aggregates do not cover (a last table without a time column, an
    "in" hop right after the first) are joined row by row, and still match the brute force."""
    frames = _fixed_shop()
    frames["reviews"] = pd.DataFrame(
        {
            "review_id": range(5),
            "product_id": [0, 0, 1, None, 2],
            "order_id": [0, 1, 1, 2, 7],
            "stars": [5.0, 3.0, None, 4.0, 1.0],
        }
    )
    schema = {
        **shop_schema(True),
        "reviews": Spec(pkey="review_id", fkeys={"product_id": "products", "order_id": "orders"}),
    }
    orders, products = Hop("orders", "customer_id", "in"), Hop("products", "product_id", "out")
    paths = {
        "untimed": (orders, products, Hop("reviews", "product_id", "in")),
        "in_after_first": (orders, Hop("reviews", "order_id", "in")),
        "timed": (orders, products, Hop("orders", "product_id", "in")),
    }
    defs = [
        TargetDef(f"{name}__{agg}", "customers", path, column, agg)
        for name, path in paths.items()
        for column, agg in [(None, "count"), ("stars", "std"), ("stars", "mode")]
        if not (name == "timed" and column == "stars")
    ] + [TargetDef("timed__std", "customers", paths["timed"], "amount", "std")]
    ts = [BASE, BASE + pd.Timedelta(days=2), BASE + pd.Timedelta(days=5)]
    sql = targets_sql(schema, defs, "customers", DELTA)
    assert "path_1 AS" in sql and "path_2 AS" in sql and "per_time_3 AS" in sql
    got = compute_targets(TargetQuery(frames, schema, defs, "customers", ts, DELTA))
    assert_same_targets(got, brute_force(frames, schema, defs, "customers", ts, DELTA), defs)


@pytest.mark.parametrize("values", [0, 16])
@pytest.mark.parametrize("bucket_rows", [3, 10**9])
def test_fact_key_fact_into_another_table(monkeypatch, bucket_rows, values):
    """``E <- F -> K <- F'`` with ``F'`` another table than ``F`` (reviews of the ordered
    products): keys that first-hop rows reach but ``F'`` never references (products 0 and
    2 have orders, no review; 0 sorts before the reviewed 1), reviews before, at and after
    each order, in one scan of whole keys or several; every aggregate against the brute
    force."""
    monkeypatch.setattr(group_files, "_LOOKUP_BUCKET_ROWS", bucket_rows)
    monkeypatch.setattr(lookups, "_DENSE_VALUES", values)
    t = lambda d, h=0: BASE + pd.Timedelta(days=d, hours=h)  # noqa: E731
    frames = _fixed_shop()
    frames["reviews"] = pd.DataFrame(
        {
            "review_id": range(7),
            "product_id": [1.0, 1.0, 1.0, 1.0, None, 1.0, 3.0],
            "time": [t(0), t(2), t(2, 5), t(9), t(1), pd.NaT, t(1)],
            "stars": [5.0, None, 3.0, 4.0, 1.0, 2.0, 2.0],
            "kind": ["a", "b", "a", None, "b", "b", "c"],
        }
    )
    schema = {
        **shop_schema(True),
        "reviews": Spec(pkey="review_id", time_col="time", fkeys={"product_id": "products"}),
    }
    path = (
        Hop("orders", "customer_id", "in"),
        Hop("products", "product_id", "out"),
        Hop("reviews", "product_id", "in"),
    )
    defs = [TargetDef("n__count", "customers", path, None, "count")] + [
        TargetDef(f"{column}__{agg}", "customers", path, column, agg)
        for column, aggs in [
            ("stars", ("count", "sum", "mean", "min", "max", "std")),
            ("kind", ("mode", "count_distinct", "count")),
        ]
        for agg in aggs
    ]
    ts = [BASE + pd.Timedelta(days=d) for d in range(-1, 8)]
    got = compute_targets(TargetQuery(frames, schema, defs, "customers", ts, DELTA))
    assert_same_targets(got, brute_force(frames, schema, defs, "customers", ts, DELTA), defs)
    assert (got["n__count"] > 0).any() and got["kind__mode"].notna().any()


@pytest.mark.parametrize("how", ["one bucket", "buckets", "sql windows"])
def test_fact_key_fact_spread_far_from_zero(monkeypatch, how):
    """A std of values far from 0 (1e9 + small) still matches the brute force, and equal
    values give exactly 0: running aggregates accumulated by pandas (keys in one bucket or
    in several) and by the query's own SQL windows (what ``--show-sql`` prints) alike."""
    import duckdb

    monkeypatch.setattr(group_files, "_LOOKUP_BUCKET_ROWS", 3 if how == "buckets" else 10**9)
    frames = _fixed_shop()
    frames["orders"]["amount"] = 1e9 + frames["orders"]["amount"].where(
        frames["orders"]["product_id"] != 0, 3.0
    )
    schema = shop_schema(True)
    path = FKF_PATH
    defs = [TargetDef(f"x__{a}", "customers", path, "amount", a) for a in ("std", "mean", "sum")]
    ts = [BASE + pd.Timedelta(days=d) for d in range(6)]
    if how == "sql windows":
        con = duckdb.connect()
        for name, frame in frames.items():
            con.register(name, frame)
        con.register("timestamps", pd.DataFrame({"timestamp": pd.to_datetime(ts)}))
        got = con.sql(targets_sql(schema, defs, "customers", DELTA)).df()
        got["inactive"] = got["inactive"].astype("int64")  # compute_targets' type
    else:
        got = compute_targets(TargetQuery(frames, schema, defs, "customers", ts, DELTA))
    assert_same_targets(got, brute_force(frames, schema, defs, "customers", ts, DELTA), defs)
    assert (got["x__std"] == 0.0).any()


SPECIAL = st.one_of(
    st.none(), st.sampled_from([0.0, -0.0, 1.0, -3.0, 1e300, math.nan, math.inf, -math.inf])
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    amounts=st.lists(SPECIAL, min_size=0, max_size=14),
    scores=st.lists(SPECIAL, min_size=14, max_size=14),
    qty=st.lists(st.one_of(st.none(), st.integers(-2, 2)), min_size=14, max_size=14),
    days=st.lists(st.integers(0, 5), min_size=14, max_size=14),
    who=st.lists(st.integers(0, 2), min_size=14, max_size=14),
)
def test_special_values_aggregate_as_duckdb_does(amounts, scores, qty, days, who):
    """NaN, infinities, -0.0 and 1e300 in numerical columns and in categorical float and
    int columns: the in-process aggregates (NumPy) give what DuckDB's own SQL aggregates give
    over the same Arrow tables (``targets_sql``, run as it is): NaN is a value (min skips it
    unless all are NaN, max, sums and std take it), NaN is the largest value for a mode and
    one distinct value, and null is not NaN. (fact->key<-fact paths: the test after this.)"""
    import pyarrow as pa

    n = len(amounts)
    frames = _special_shop(
        [1.0, math.nan],
        days[:n],
        who[:n],
        [i % 3 for i in range(n)],  # 2 dangles
        amount=pa.array(amounts, type=pa.float64()),
        score=pa.array(scores[:n], type=pa.float64()),
        qty=pa.array(qty[:n], type=pa.int64()),
    )
    schema = shop_schema(True)
    types = {
        "customers": {},
        "products": {"price": "numerical"},
        "orders": {"amount": "numerical", "score": "categorical", "qty": "categorical"},
    }
    defs = build_traversal_graph(schema, types, "customers", fact_key_fact=False)
    assert {d.aggregation for d in defs} >= {"mode", "count_distinct", "min", "max", "std"}
    ts = [BASE + pd.Timedelta(days=d) for d in (0, 2, 4)]
    query = TargetQuery(frames, schema, defs, "customers", ts, DELTA)
    got = pa.concat_tables(iter_targets(query))  # Arrow: null is not NaN
    con = _duckdb_over(frames, ts)
    want = con.sql(targets_sql(schema, defs, "customers", DELTA)).to_arrow_table()
    assert got.num_rows == want.num_rows
    _assert_same_arrow_values(got, want, defs)


def _special_shop(prices: list, days: list, who: list, product: list, **values) -> dict:
    """Three customers, products 0 and 1 at ``prices``, and an order per day offset in
    ``days`` (of customer ``who``, product ``product``) with the value columns ``values``,
    as Arrow tables."""
    import pyarrow as pa

    orders = {
        "order_id": list(range(len(days))),
        "time": [BASE + pd.Timedelta(days=d) for d in days],
        "customer_id": who,
        "product_id": product,
        **values,
    }
    return {
        "customers": pa.table({"customer_id": [0, 1, 2], "created": [BASE] * 3}),
        "products": pa.table({"product_id": [0, 1], "price": prices}),
        "orders": pa.table(orders),
    }


def _duckdb_over(frames: dict, ts: list):
    """A fresh DuckDB connection with the Arrow ``frames`` and seed times ``ts`` registered."""
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    for name, table in frames.items():
        con.register(name, table)
    con.register("timestamps", pa.table({"timestamp": pa.array(ts, type=pa.timestamp("us"))}))
    return con


def _assert_same_arrow_values(got, want, defs, label: str = "", abs_tol: float = 0.0) -> None:
    """Same keys and, per target, the same values: null only where null, NaN where NaN,
    numbers equal to 1e-9 relative (and ``abs_tol``)."""
    assert got.column(0).to_pylist() == want.column(0).to_pylist()
    for d in defs:
        g, w = got.column(d.name).to_pylist(), want.column(d.name).to_pylist()
        for i, (a, b) in enumerate(zip(g, w)):
            where = f"{d.name} row {i}{label}: got {a!r}, want {b!r}"
            if b is None:
                assert a is None, where
            elif isinstance(b, float) and math.isnan(b):
                assert isinstance(a, float) and math.isnan(a), where
            else:
                assert a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=abs_tol), where


FKF_SPECIAL = st.one_of(
    st.none(), st.sampled_from([0.0, -0.0, 1.0, -3.0, 2.5, math.nan, math.inf, -math.inf])
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    amounts=st.lists(FKF_SPECIAL, min_size=1, max_size=14),
    qty=st.lists(st.one_of(st.none(), st.integers(-2, 2)), min_size=14, max_size=14),
    days=st.lists(st.integers(0, 5), min_size=14, max_size=14),
    who=st.lists(st.integers(0, 2), min_size=14, max_size=14),
    product=st.lists(st.integers(0, 2), min_size=14, max_size=14),
    second=st.sampled_from([None, pd.Timedelta(days=1), pd.Timedelta(days=9)]),
    values=st.sampled_from([0, 16]),
)
def test_fact_key_fact_special_values_aggregate_as_duckdb_does(
    amounts, qty, days, who, product, second, values
):
    """fact->key<-fact paths over NaN, infinities, -0.0 and nulls: the in-process lookups
    give what DuckDB's own aggregates give over the joined rows (``targets_sql`` with
    ``running_aggregates=False``, run as it is: the bounded join), and so does the SQL of
    the lookups (what ``--show-sql`` prints): NaN is the max once reached and the min only
    when every value is NaN, one NaN or infinity that has left the window (τ - Δ2, τ] no
    longer makes a sum, min, max or ``std`` NaN. (1e300 is left out: ``std`` is taken from
    squared distances, which overflow there.)"""
    import pyarrow as pa

    n = len(amounts)
    frames = _special_shop(
        [1.0, 2.0],
        days[:n],
        who[:n],
        product[:n],  # 2 dangles
        amount=pa.array(amounts, type=pa.float64()),
        qty=pa.array(qty[:n], type=pa.int64()),
    )
    schema = shop_schema(True)
    types = {
        "customers": {},
        "products": {"price": "numerical"},
        "orders": {"amount": "numerical", "qty": "categorical"},
    }
    defs = [
        d
        for d in build_traversal_graph(schema, types, "customers", hops=2)
        if len(d.path) == 3 and d.path[2].direction == "in"
    ]
    assert {d.aggregation for d in defs} >= {"mode", "count_distinct", "min", "max", "std"}
    ts = [BASE + pd.Timedelta(days=d) for d in (0, 2, 4)]
    query = TargetQuery(frames, schema, defs, "customers", ts, DELTA, second_hop_window=second)
    with mock.patch.object(lookups, "_DENSE_VALUES", values):
        got = pa.concat_tables(iter_targets(query))
    con = _duckdb_over(frames, ts)
    for running in (False, True):
        sql = targets_sql(
            schema, defs, "customers", DELTA, running_aggregates=running, second_hop_window=second
        )
        want = con.sql(sql).to_arrow_table()
        _assert_same_arrow_values(got, want, defs, f" (running SQL: {running})", abs_tol=1e-12)


@pytest.mark.parametrize("bucket_rows", [7, 10**9])
def test_fact_key_fact_window_std_keeps_its_digits_after_a_long_history(monkeypatch, bucket_rows):
    """A window's ``std`` does not inherit its key's history: 400 earlier orders of +-1e6
    then a window of 0.1 .. 0.6. A difference of running sums of squares would keep ~0.4 of
    rounding from the history's 4e14 (std off by ~0.3); the window's own sums keep it to the
    last digits: the value of DuckDB's ``stddev_samp`` over the joined rows, hand-checked."""
    import statistics

    monkeypatch.setattr(group_files, "_LOOKUP_BUCKET_ROWS", bucket_rows)
    t = lambda d, m=0: BASE + pd.Timedelta(days=d, minutes=m)  # noqa: E731
    history = [t(1 + i // 60, i % 60) for i in range(400)]
    window = [t(8, 60 * (i + 1)) for i in range(5)] + [t(10)]
    amounts = [1e6 if i % 2 else -1e6 for i in range(400)] + [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    frames = _fixed_shop()
    frames["orders"] = pd.DataFrame(
        {
            "order_id": range(406),
            "time": history + window,
            "customer_id": [1] * 405 + [0],
            "product_id": [0.0] * 406,
            "amount": amounts,
            "status": ["x"] * 406,
        }
    )
    schema = shop_schema(True)
    defs = [TargetDef("x__std", "customers", FKF_PATH, "amount", "std")]
    ts = [t(9)]
    got = compute_targets(TargetQuery(frames, schema, defs, "customers", ts, DELTA))
    want = statistics.stdev([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert math.isclose(got.set_index("customer_id").loc[0, "x__std"], want, rel_tol=1e-9)
    joined = _duckdb_over(frames, ts).sql(
        targets_sql(schema, defs, "customers", DELTA, running_aggregates=False)
    )
    assert math.isclose(joined.df().set_index("customer_id").loc[0, "x__std"], want, rel_tol=1e-9)


def test_assemble_places_each_source_by_pair_whatever_its_order():
    """The in-process assembly of a group's rows: the active pairs (those of the base
    aggregate, of entities that exist at the seed time, in (seed time, key) order) get each
    target from its source by pair, whether the source is sorted, shuffled (a query's
    output order is arbitrary) or covers only some pairs (counts 0, others null)."""
    import pyarrow as pa

    from tve_pipeline.targets.assemble import _assemble, _EntityKeys
    from tve_pipeline.targets.plan import _Assembly

    t0, t1 = np.datetime64("2021-03-01", "us"), np.datetime64("2021-03-08", "us")
    entities = _EntityKeys(
        np.array([10, 20, 30]),
        np.array(["2021-01-01", "2021-01-01", "2021-03-05"], dtype="datetime64[us]"),
        pa.int64(),
    )
    seeds = [t0, t0, t1, t1, t1, t0]
    keys = [20, 10, 10, 20, 30, 30]  # (t0, 30): 30 does not exist yet
    base = pa.table(
        {"s": pa.array(seeds, pa.timestamp("us")), "e": keys, "a__count": [1, 2, 3, 4, 5, 6]}
    )
    order = [4, 0, 5, 2, 1, 3]
    shuffled = pa.table(
        {
            "s": pa.array([seeds[i] for i in order], pa.timestamp("us")),
            "e": [keys[i] for i in order],
            "b__mean": [float(10 * keys[i] + (i < 2)) for i in order],
        }
    )
    some = pa.table(
        {
            "s": pa.array([t1, t0], pa.timestamp("us")),
            "e": [30, 20],
            "c__count": [7, 8],
            "c__mode": ["x", "y"],
        }
    )
    hop = (Hop("orders", "customer_id", "in"),)
    defs = [
        TargetDef("a__count", "customers", hop, None, "count"),
        TargetDef("b__mean", "customers", hop, "b", "mean"),
        TargetDef("c__count", "customers", hop, "c", "count"),
        TargetDef("c__mode", "customers", hop, "c", "mode"),
    ]
    assembly = _Assembly(
        windows=("w",),
        base="base",
        sources=(("a__count", "base"), ("b__mean", "x"), ("c__count", "y"), ("c__mode", "y")),
    )
    got = _assemble({"base": base, "x": shuffled, "y": some}, assembly, entities, [t1, t0], defs)
    # active pairs in (seed, key) order: (t0, 10), (t0, 20), (t1, 10), (t1, 20), (t1, 30)
    assert got.column(0).to_pylist() == [10, 20, 10, 20, 30]
    assert got.column(1).to_numpy().tolist() == [t0, t0, t1, t1, t1]
    assert got.column(2).to_pylist() == [0] * 5
    assert got.column("a__count").to_pylist() == [2, 1, 3, 4, 5]
    assert got.column("b__mean").to_pylist() == [101.0, 201.0, 100.0, 200.0, 300.0]
    assert got.column("c__count").to_pylist() == [0, 8, 0, 0, 7]
    assert got.column("c__mode").to_pylist() == [None, "y", None, None, "x"]


@pytest.mark.parametrize(
    "text, size",
    [
        ("2GB", 2 * 10**9),
        ("4GiB", 4 * 2**30),
        ("1500MB", 1_500_000_000),
        ("512 MiB", 512 * 2**20),
        ("1.5gb", 1_500_000_000),
        ("64kB", 64_000),
        ("1TiB", 2**40),
        ("123456789 bytes", 123_456_789),
    ],
)
def test_memory_limit_reads_sizes_as_duckdb_writes_them(text, size):
    """Hand-computed: DuckDB's units (KB/MB/GB/TB: powers of 1000; KiB/...: of 1024)."""
    assert targets.memory_bytes(text) == size


@pytest.mark.parametrize("text", ["lots", "1e9", "-1GB", "0GB", "2XB", "GB", ""])
def test_unreadable_memory_limit_fails_in_one_line_naming_it(text):
    with pytest.raises(ValueError, match=r"^memory_limit: cannot read") as info:
        TargetQuery({}, {}, [], "customers", [], DELTA, memory_limit=text)
    assert "\n" not in str(info.value) and repr(text) in str(info.value)


def test_duckdb_is_given_half_of_the_memory_budget():
    """The budget is the whole computation's: DuckDB's own limit is half of it (DuckDB's
    setting, read back from the connection)."""
    seeds = target_query._seed_times_frame([BASE])
    for limit, want in [("2GiB", "1.0 GiB"), ("3GiB", "1.5 GiB"), ("1000MiB", "500.0 MiB")]:
        query = TargetQuery({}, {}, [], "customers", [BASE], DELTA, memory_limit=limit)
        with connection._connection(query, [], seeds, "timestamps") as con:
            got = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
        assert got == want, (limit, got)


def test_recipe_second_hop_window_is_a_positive_duration():
    """``targets.second_hop_window``: None is Δ (the reference); a duration is Δ2; anything
    else fails when the recipe is read, naming the field."""
    from pydantic import ValidationError

    from tve_pipeline.config import TargetConfig

    assert TargetConfig().second_hop_delta() is None
    assert TargetConfig(second_hop_window="3 days").second_hop_delta() == pd.Timedelta(days=3)
    for bad in ("-2 days", "0s", "soon"):
        with pytest.raises(ValidationError, match="second_hop_window"):
            TargetConfig(second_hop_window=bad)
    with pytest.raises(ValueError, match="second_hop_window"):
        TargetQuery({}, {}, [], "customers", [BASE], DELTA, second_hop_window=pd.Timedelta(0))
