"""Databases become asset groups with partitions of their own; Hub specs offline."""

import shutil
import time

import pytest

from assets.definitions import build_definitions
from tve_pipeline.database import open_dataset
from tve_pipeline.datasets import build_synthetic
from tve_pipeline.schema import DatabaseError


def test_each_database_gets_its_own_assets_windows_and_tasks(tmp_path):
    """Two databases, one with a task fewer: no partition of one shows up in the other."""
    run_dir = tmp_path / "run"
    build_synthetic(run_dir / "datasets" / "shop-a")
    build_synthetic(run_dir / "datasets" / "shop-b", seed=1)
    shutil.rmtree(run_dir / "datasets" / "shop-b" / "tasks" / "customer-spend")
    (run_dir / "datasets" / ".shop-c.building-1").mkdir(parents=True)  # a write in progress
    (run_dir / "datasets" / "notes").mkdir()  # not a dataset folder
    defs = build_definitions(run_dir)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    names = [
        "raw_tables",
        "temporal_windows",
        "traversal_graph",
        "tve_targets",
        "pretrained_checkpoint",
        "finetuned_models",
        "metrics",
        "probe_metrics",
        "results",
    ]
    assert keys == {f"{group}/{n}" for group in ("shop_a", "shop_b") for n in names}
    cells = {
        g: graph.get(
            next(k for k in graph.get_all_asset_keys() if k.path == [g, "metrics"])
        ).partitions_def
        for g in ("shop_a", "shop_b")
    }
    # the reference recipe: scratch and tve, one fraction, one seed, per task of the database
    assert cells["shop_a"].get_partition_keys() == [
        f"{t}|{m}|1|s0" for t in ("customer-churn", "customer-spend") for m in ("scratch", "tve")
    ]
    assert cells["shop_b"].get_partition_keys() == [
        "customer-churn|scratch|1|s0",
        "customer-churn|tve|1|s0",
    ]
    windows = {
        g: graph.get(
            next(k for k in graph.get_all_asset_keys() if k.path == [g, "tve_targets"])
        ).partitions_def
        for g in ("shop_a", "shop_b")
    }
    assert windows["shop_a"].name == "shop-a.windows" and windows["shop_b"].name == "shop-b.windows"
    # lineage stays inside a database
    for key in graph.get_all_asset_keys():
        assert {p.path[0] for p in graph.get(key).parent_keys} <= {key.path[0]}


def test_two_folders_with_one_asset_prefix_fail_in_one_line(tmp_path):
    build_synthetic(tmp_path / "datasets" / "shop-a")
    build_synthetic(tmp_path / "datasets" / "shop_a")
    with pytest.raises(ValueError) as err:
        build_definitions(tmp_path)
    assert "same asset prefix 'shop_a'" in str(err.value) and "\n" not in str(err.value)


def test_hub_spec_offline_fails_fast_with_a_way_out():
    from tve_pipeline.database import _network_available

    if _network_available():
        pytest.skip("the Hub is reachable from here: nothing offline to test")
    t0 = time.perf_counter()
    with pytest.raises(DatabaseError) as err:
        open_dataset("stanford-star/relbench-v1/rel-amazon")
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "no network" in msg and "local" in msg and "\n" not in msg


def test_windows_are_the_seed_times_whatever_the_first_year(tmp_path, monkeypatch):
    """A database from the 1870s: its windows are its own training seed times, registered
    with it (calendar windows from 1950 on had none of them)."""
    import pandas as pd
    import yaml

    from assets.commands import prepare_run_dir, register_dataset

    for name in ("DAGSTER_HOME", "TVE_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    folder = build_synthetic(tmp_path / "old")
    shift = -pd.Timedelta(days=150 * 365)  # a whole number of days keeps the order of every row
    for table, col in (("customers", "signup_time"), ("orders", "order_time")):
        frame = pd.read_parquet(folder / "db" / f"{table}.parquet")
        frame[col] = frame[col] + shift
        frame.to_parquet(folder / "db" / f"{table}.parquet", index=False)
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    for split in ("val_timestamp", "test_timestamp"):
        manifest[split] = str((pd.Timestamp(manifest[split]) + shift).date())
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))

    run_dir = tmp_path / "run"
    instance = prepare_run_dir(run_dir)
    info = register_dataset(folder, run_dir, instance, profile="test")
    first = min(
        pd.read_parquet(folder / "db" / "customers.parquet")["signup_time"].min(),
        pd.read_parquet(folder / "db" / "orders.parquet")["order_time"].min(),
    )
    val, delta = pd.Timestamp(manifest["val_timestamp"]), pd.Timedelta("30 days")
    expected = [t for t in (val - k * delta for k in range(1, 40)) if t >= first]
    # the training seed times, then the validation seed time
    assert info["windows"] == [str(t.date()) for t in sorted(expected)] + [str(val.date())]
    assert info["windows"][0].startswith("1870")
    assert list(instance.get_dynamic_partitions("old.windows")) == info["windows"]
