"""Databases become partitions: the datasets-folder sensor, and Hub specs offline."""

import time

import dagster as dg
import pytest

from assets.registry import datasets_folder_sensor
from resources import TVEStorage
from tve_pipeline.database import DatabaseError, open_dataset
from tve_pipeline.datasets import build_synthetic


def test_sensor_registers_dropped_dataset_folders(tmp_path):
    run_dir = tmp_path / "run"
    build_synthetic(run_dir / "datasets" / "shop-a")
    build_synthetic(run_dir / "datasets" / "shop-b", seed=1)
    (run_dir / "datasets" / ".shop-c.building-1").mkdir(parents=True)  # a write in progress
    (run_dir / "datasets" / "notes").mkdir()  # not a dataset folder
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"storage": TVEStorage(run_dir=str(run_dir))})
        result = datasets_folder_sensor(ctx)
        added = {r.partitions_def_name: set(r.partition_keys) for r in result.dynamic_partitions_requests}
        assert added == {"database": {"shop-a", "shop-b"}, "task": {"customer-churn", "customer-spend"}}
        for r in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(r.partitions_def_name, list(r.partition_keys))
        again = datasets_folder_sensor(dg.build_sensor_context(instance=instance, resources={"storage": TVEStorage(run_dir=str(run_dir))}))
        assert isinstance(again, dg.SkipReason)


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
