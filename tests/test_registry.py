"""Databases become asset groups with partitions of their own; Hub specs offline."""

import shutil
import time

import pytest

from assets.definitions import build_definitions
from tve_pipeline.database import DatabaseError, open_dataset
from tve_pipeline.datasets import build_synthetic


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
    names = ["raw_tables", "temporal_windows", "traversal_graph", "tve_targets", "pretrained_checkpoint",
             "finetuned_models", "metrics"]
    assert keys == {f"{group}/{n}" for group in ("shop_a", "shop_b") for n in names}
    tasks = {g: graph.get(next(k for k in graph.get_all_asset_keys() if k.path == [g, "metrics"])).partitions_def
             for g in ("shop_a", "shop_b")}
    assert tasks["shop_a"].get_partition_keys() == ["customer-churn", "customer-spend"]
    assert tasks["shop_b"].get_partition_keys() == ["customer-churn"]
    windows = {g: graph.get(next(k for k in graph.get_all_asset_keys() if k.path == [g, "tve_targets"])).partitions_def
               for g in ("shop_a", "shop_b")}
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
