"""Which targets make the task vector, and how its modes are encoded.

Pruning is checked against pandas over the computed targets of the training seed times
(the rows the normaliser is fitted on) and against a hand-made database where one column
is always null, one constant, one constant only before the validation timestamp, and one
fact->key<-fact path empty by construction (every order leaves store 0, as every
rel-flights flight leaves New York). The mode encodings are checked against a hand
computation (the MCA of two associated binary variables) and a direct SVD of the
standardised residuals (prince's computation), and for the properties of principal
coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from assets.database_assets import traversal_graph_metadata
from tve_pipeline.config import TargetConfig, TargetPick, make_recipe
from tve_pipeline.normalise import TaskVectorNormaliser
from tve_pipeline.target_selection import (
    NULL_EVERYWHERE,
    check_picked_entities,
    picked_targets,
    select_targets,
    traversal_targets,
)
from tve_pipeline.targets import TargetQuery, compute_targets
from tve_pipeline.traversal import build_traversal_graph
from tve_pipeline.windows import training_seed_times


@dataclass
class Spec:  # the TableSpec shape (relbench.manifest.TableSpec)
    pkey: str | None = None
    time_col: str | None = None
    fkeys: dict[str, str] = field(default_factory=dict)


SCHEMA = {
    "customers": Spec("customer_id"),
    "stores": Spec("store_id"),
    "orders": Spec(
        "order_id",
        "at",
        {"customer_id": "customers", "origin_id": "stores", "dest_id": "stores"},
    ),
}
TYPES = {
    "orders": {
        "amount": "numerical",
        "channel": "categorical",
        "discount": "numerical",
        "promo": "numerical",
    },
    "stores": {"region": "categorical", "size": "numerical"},
}
DELTA = pd.Timedelta(days=7)
START, VAL = pd.Timestamp("2021-01-01"), pd.Timestamp("2021-03-01")


def shop(seed: int = 0, orders: int = 300) -> dict[str, pd.DataFrame]:
    """Orders of 12 customers, all leaving store 0 for stores 1..3: ``discount`` always
    null, ``channel`` always "web", ``promo`` 1.0 before the validation timestamp only."""
    rng = np.random.default_rng(seed)
    at = START + pd.to_timedelta(rng.integers(0, 80 * 24, orders), unit="h")
    return {
        "customers": pd.DataFrame({"customer_id": np.arange(12)}),
        "stores": pd.DataFrame(
            {"store_id": np.arange(4), "region": ["n", "s", "s", "e"], "size": [1.0, 2, 3, 4]}
        ),
        "orders": pd.DataFrame(
            {
                "order_id": np.arange(orders),
                "at": at,
                "customer_id": rng.integers(0, 12, orders),
                "origin_id": 0,
                "dest_id": rng.integers(1, 4, orders),
                "amount": rng.integers(1, 50, orders).astype(float),
                "channel": "web",
                "discount": np.nan,
                "promo": np.where(at < VAL, 1.0, rng.integers(0, 5, orders).astype(float)),
            }
        ),
    }


def training_query(tables, defs) -> TargetQuery:
    seeds = training_seed_times(VAL, tables["orders"]["at"].min(), DELTA)
    return TargetQuery(tables, SCHEMA, defs, "customers", seeds, DELTA)


def pandas_left_out(query: TargetQuery) -> dict[str, str]:
    """The oracle: the targets of the training seed times, computed, then in pandas: a
    target is left out when its active rows hold fewer than two distinct values."""
    frame = compute_targets(query)
    active = frame[frame["inactive"] == 0]
    out = {}
    for d in query.defs:
        values = active[d.name].dropna()
        if values.empty:
            out[d.name] = "null"
        elif values.nunique() == 1:
            out[d.name] = "constant"
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_equals_pandas_over_the_training_targets(seed):
    tables = shop(seed)
    defs = build_traversal_graph(SCHEMA, TYPES, "customers")
    query = training_query(tables, defs)
    chosen = select_targets(query)
    want = pandas_left_out(query)
    got = {row["target"]: row["reason"] for row in chosen.left_out}
    assert set(got) == set(want)
    for name, kind in want.items():
        assert (got[name] == NULL_EVERYWHERE) == (kind == "null"), (name, got[name])
    assert [d.name for d in chosen.kept] == [d.name for d in defs if d.name not in want]
    # active rows are counted as the oracle counts them
    frame = compute_targets(query)
    assert {p.active_rows for p in chosen.profiles} == {int((frame["inactive"] == 0).sum())}


def test_what_is_left_out_and_why_by_hand():
    tables = shop(0)
    defs = build_traversal_graph(SCHEMA, TYPES, "customers")
    query = training_query(tables, defs)
    chosen = select_targets(query)
    reason = {row["target"]: row["reason"] for row in chosen.left_out}
    kept = {d.name for d in chosen.kept}
    active = chosen.profiles[0].active_rows
    assert active > 0
    # always null
    for agg in ("mean", "min", "max", "sum", "std"):
        assert reason[f"orders.discount__{agg}"] == NULL_EVERYWHERE
    assert reason["orders.discount__count"] == f"constant 0 over {active:,} active training rows"
    # constant: a first-hop order always exists on an active row, so "web" is never null
    assert reason["orders.channel__mode"] == f"constant 'web' over {active:,} active training rows"
    assert reason["orders.channel__count_distinct"].startswith("constant 1 over")
    assert "orders.channel__count" in kept  # the number of orders varies
    # constant on the training rows only (it varies after the validation timestamp)
    assert reason["orders.promo__max"].startswith("constant 1.0 over")
    assert tables["orders"]["promo"].nunique() > 1
    # every order leaves store 0 and none arrives there: the path is empty by construction
    empty = "orders>stores[origin_id]<orders[dest_id]"
    assert reason[f"{empty}__count"] == f"constant 0 over {active:,} active training rows"
    assert reason[f"{empty}.amount__mean"] == NULL_EVERYWHERE
    # a std of one value is null, of several varies: kept where amounts vary
    assert {"orders__count", "orders.amount__mean", "orders.amount__std"} <= kept
    # the origin store's region is always "n"; the destination's varies
    assert reason["orders>stores[origin_id].region__mode"].startswith("constant 'n' over")
    assert "orders>stores[dest_id].region__mode" in kept


def test_traversal_graph_metadata_lists_what_was_left_out():
    tables = shop(0)
    defs = build_traversal_graph(SCHEMA, TYPES, "customers")
    chosen = select_targets(training_query(tables, defs))
    graph = {"customers": [d.to_dict() for d in chosen.kept]}
    meta = traversal_graph_metadata(
        graph,
        {"customers": "SELECT 1"},
        make_recipe("test"),
        {"customers": chosen.left_out},
        {"customers": chosen.seconds},
    )
    assert meta["targets"] == len(chosen.kept)
    assert meta["left_out"] == len(chosen.left_out) > 0
    rows = [r.data for r in meta["left_out_targets"].records]
    assert [(r["entity"], r["target"], r["reason"]) for r in rows] == [
        ("customers", d["target"], d["reason"]) for d in chosen.left_out
    ]
    by_entity = meta["by_entity"].records[0].data
    assert by_entity["left_out"] == len(chosen.left_out)
    assert by_entity["targets"] == len(chosen.kept)


# --------------------------------------------------------------------------- by hand


def test_hand_picked_targets_in_the_order_picked():
    picks = (
        TargetPick(path="orders>stores[dest_id]", columns=("region",), count=False),
        TargetPick(path="orders", columns=("amount", "channel"), aggregations=("mean", "mode")),
        TargetPick(
            path="orders>stores[origin_id]<orders[origin_id]",
            columns=("amount",),
            aggregations=("sum",),
        ),
    )
    got = [d.name for d in picked_targets(SCHEMA, TYPES, "customers", picks)]
    assert got == [
        "orders>stores[dest_id].region__mode",
        "orders>stores[dest_id].region__count",
        "orders>stores[dest_id].region__count_distinct",
        "orders__count",
        "orders.amount__mean",
        "orders.channel__mode",
        "orders>stores[origin_id]<orders[origin_id]__count",
        "orders>stores[origin_id]<orders[origin_id].amount__sum",
    ]
    # the recipe's select replaces the schema's graph for that entity only
    config = TargetConfig(select={"customers": picks})
    assert [d.name for d in traversal_targets(SCHEMA, TYPES, "customers", config)] == got
    # the engine computes a picked target as it does within the whole graph (a fact->key<-fact
    # sum without its count once failed to bind)
    picked = traversal_targets(SCHEMA, TYPES, "customers", config)
    alone = compute_targets(training_query(shop(0), picked))
    whole = compute_targets(
        training_query(shop(0), build_traversal_graph(SCHEMA, TYPES, "customers"))
    )
    pd.testing.assert_frame_equal(alone[got], whole[got])
    # and the picked targets are pruned like the others: orders.channel__mode is constant
    chosen = select_targets(training_query(shop(0), picked))
    assert [r["target"] for r in chosen.left_out] == ["orders.channel__mode"]


@pytest.mark.parametrize(
    "pick, message",
    [
        (
            TargetPick(path="order>stores"),
            "entity table 'customers': no path 'order>stores' in its traversal graph (paths: "
            "orders, orders>stores[origin_id],",
        ),
        (
            TargetPick(path="orders", columns=("amount", "price")),
            "entity table 'customers', path 'orders': table 'orders' has no usable column "
            "'price' (usable: amount, channel, discount, promo)",
        ),
        (
            TargetPick(path="orders", columns=("at",)),
            "table 'orders' has no usable column 'at'",
        ),
        (
            TargetPick(path="orders", columns=("amount",), aggregations=("mode",)),
            "entity table 'customers', path 'orders': aggregation 'mode' fits no picked column "
            "of 'orders' (amount: numerical)",
        ),
    ],
)
def test_bad_hand_picked_names_fail_in_one_line(pick, message):
    with pytest.raises(ValueError) as err:
        picked_targets(SCHEMA, TYPES, "customers", [pick])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_hand_picked_set_of_a_table_that_is_no_entity_fails():
    with pytest.raises(ValueError, match=r"names entity table 'shops', which no task"):
        check_picked_entities({"shops": ()}, ["customers"])


def test_recipe_reads_a_hand_picked_set():
    recipe = make_recipe(
        "test",
        {"targets": {"select": {"customers": [{"path": "orders", "columns": ["amount"]}]}}},
    )
    assert recipe.targets.select["customers"][0] == TargetPick(path="orders", columns=("amount",))
    with pytest.raises(ValueError, match="colums"):
        make_recipe("test", {"targets": {"select": {"c": [{"path": "o", "colums": ["a"]}]}}})


# --------------------------------------------------------------------------- modes


def _raw(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"inactive": np.zeros(n, dtype=int), **columns})


def test_modes_with_few_categories_are_one_hot_over_every_training_category():
    train = _raw(m=["b", "a", "b", None, "c"], x=[1.0, 2, 3, 4, 5])
    agg = {"m": "mode", "x": "sum"}
    norm = TaskVectorNormaliser.fit(train, agg)  # 3 categories <= 64: one-hot
    assert norm.mca is None and norm.scalers[0].categories == ["b", "a", "c"]
    assert norm.width == 1 + 3 + 1
    val = _raw(m=["c", "z", None, "a"], x=[3.0, 3, 3, 3])
    val.loc[3, "inactive"] = 1
    got = norm.transform(val)
    expected = [
        [0, 0, 0, 1, 0.5],
        [0, 0, 0, 0, 0.5],  # unseen category: zeros
        [0, 0, 0, 0, 0.5],  # missing: zeros
        [1, 0, 0, 0, 0],  # inactive: all zeros but the flag
    ]
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float32))


def test_mca_of_two_associated_binary_modes_by_hand():
    """Two modes that always agree: one dimension of inertia 1; a row's coordinate is the
    standardised coordinate of its category, sqrt(q/p) = sqrt(1/2) for the frequent one
    (p = 2/3) and -sqrt(p/q) = -sqrt(2) for the rare one (weighted mean 0, variance 1)."""
    train = _raw(u=["a", "a", "b"], v=["x", "x", "y"])
    norm = TaskVectorNormaliser.fit(
        train, {"u": "mode", "v": "mode"}, mode_encoding="mca", mca_components=1
    )
    assert norm.width == 2 and norm.mca.eigenvalues == pytest.approx([1.0])
    got = norm.transform(train)[:, 1]
    want = np.array([np.sqrt(0.5), np.sqrt(0.5), -np.sqrt(2)])
    sign = np.sign(got[2] / want[2])
    np.testing.assert_allclose(got, sign * want, rtol=1e-6)
    # one of the two modes unseen or missing: the other one's coordinate; both: zeros
    val = _raw(u=["b", "zzz", None], v=["qqq", "x", None])
    np.testing.assert_allclose(
        norm.transform(val)[:, 1], sign * np.array([-np.sqrt(2), np.sqrt(0.5), 0]), rtol=1e-6
    )


def _correlated_modes(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 30, n)
    frame = _raw(
        a=[f"a{v}" for v in base],
        b=[f"b{(v + rng.integers(0, 3)) % 30}" for v in base],
        c=[f"c{v % 7}" if rng.random() < 0.8 else f"c{rng.integers(0, 7)}" for v in base],
    )
    frame.loc[rng.random(n) < 0.1, "b"] = None  # some modes missing
    return frame


def test_mca_equals_a_direct_svd_of_the_standardised_residuals():
    """As prince computes it: Z the indicator matrix, P = Z / N, S = D_r^-1/2 (P - r c^T)
    D_c^-1/2, S = U s V^T, row coordinates D_r^-1/2 U s."""
    train = _correlated_modes(400)
    agg = {"a": "mode", "b": "mode", "c": "mode"}
    norm = TaskVectorNormaliser.fit(train, agg, mca_components=64)  # 67 categories > 64: MCA
    assert norm.mca is not None and all(s.kind == "mca" for s in norm.scalers)
    z = pd.get_dummies(train[list(agg)]).to_numpy(dtype=float)
    p = z / z.sum()
    r, c = p.sum(1), p.sum(0)
    s = (p - np.outer(r, c)) / np.sqrt(np.outer(r, c))
    u, sv, _ = np.linalg.svd(s, full_matrices=False)
    k = norm.mca.width
    assert k == 64
    want = (u[:, :k] * sv[:k]) / np.sqrt(r)[:, None]
    got = norm.transform(train)[:, 1:]
    np.testing.assert_allclose(norm.mca.eigenvalues, sv[:k] ** 2, rtol=1e-9, atol=1e-12)
    distinct = np.flatnonzero(
        np.abs(np.diff(sv[: k + 1] ** 2)) > 1e-9 * sv[0] ** 2
    )  # components with an eigenvalue of their own are unique up to sign
    distinct = distinct[distinct < k - 1]
    assert len(distinct) > 30
    for j in distinct:
        sign = np.sign(want[:, j] @ got[:, j])
        np.testing.assert_allclose(got[:, j], sign * want[:, j], atol=2e-5)


def test_mca_coordinates_are_centred_orthogonal_with_variance_the_eigenvalues():
    train = _correlated_modes(500, seed=1)
    norm = TaskVectorNormaliser.fit(
        train, {"a": "mode", "b": "mode", "c": "mode"}, mode_encoding="mca", mca_components=10
    )
    f = norm.transform(train)[:, 1:].astype(np.float64)
    known = train[["a", "b", "c"]].notna().sum(1).to_numpy()
    mass = known / known.sum()  # the rows' masses r_i
    np.testing.assert_allclose(mass @ f, 0, atol=1e-6)
    gram = f.T @ (mass[:, None] * f)
    np.testing.assert_allclose(gram, np.diag(norm.mca.eigenvalues), atol=1e-6)
    assert np.all(np.diff(norm.mca.eigenvalues) <= 1e-12)


def test_auto_takes_one_hot_up_to_the_component_count():
    train = _raw(m=[f"v{i % 5}" for i in range(20)], k=[f"w{i % 4}" for i in range(20)])
    agg = {"m": "mode", "k": "mode"}
    assert TaskVectorNormaliser.fit(train, agg, mca_components=9).mca is None  # 9 categories
    wide = TaskVectorNormaliser.fit(train, agg, mca_components=8)
    assert wide.mca is not None and wide.width == 1 + 8
    assert (
        TaskVectorNormaliser.fit(train, agg, mode_encoding="onehot", mca_components=2).mca is None
    )
    again = TaskVectorNormaliser.from_dict(wide.to_dict())
    np.testing.assert_array_equal(again.transform(train), wide.transform(train))


# --------------------------------------------------------------------------- the asset


def test_traversal_graph_asset_leaves_out_what_pandas_finds(tmp_path, monkeypatch):
    """The tiny database with a constant column added to its orders: the asset's graph is
    the schema's less the targets pandas finds null or constant on the active rows of the
    training seed times, and its metadata lists each with its reason."""
    import dagster as dg

    from assets.commands import Runner, prepare_run_dir, register_dataset
    from tve_pipeline.database import open_dataset, table_files
    from tve_pipeline.datasets import build_synthetic
    from tve_pipeline.summary import summarise_database

    for name in ("DAGSTER_HOME", "TVE_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    source = build_synthetic(tmp_path / "src" / "pruned")
    orders = pd.read_parquet(source / "db" / "orders.parquet")
    orders["channel"] = "web"
    orders.to_parquet(source / "db" / "orders.parquet", index=False)
    run_dir = tmp_path / "run"
    instance = prepare_run_dir(run_dir)
    register_dataset(source, run_dir, instance, profile="test")
    runner = Runner("pruned", run_dir)
    runner.materialize(["raw_tables", "temporal_windows", "traversal_graph"], "pruned")

    folder = run_dir / "datasets" / "pruned"
    summary, dataset = summarise_database(folder), open_dataset(folder)
    schedule = runner.load("temporal_windows")
    defs = traversal_targets(
        dataset.manifest.tables, summary.column_types, "customers", make_recipe("test").targets
    )
    query = TargetQuery(
        table_files(dataset),
        dataset.manifest.tables,
        defs,
        "customers",
        schedule.loc[schedule["split"] == "train", "timestamp"],
        pd.Timedelta(days=30),
    )
    want = pandas_left_out(query)
    assert "orders.channel__mode" in want and "orders.channel__count_distinct" in want
    graph = runner.load("traversal_graph")
    assert [d["name"] for d in graph["customers"]] == [d.name for d in defs if d.name not in want]
    record = instance.fetch_materializations(
        dg.AssetKey(["pruned", "traversal_graph"]), limit=1
    ).records[0]
    meta = record.asset_materialization.metadata
    rows = [r.data for r in meta["left_out_targets"].records]
    assert [r["target"] for r in rows] == [d.name for d in defs if d.name in want]
    assert all(r["entity"] == "customers" and r["reason"].startswith("constant") for r in rows)
    assert meta["left_out"].value == len(want)
