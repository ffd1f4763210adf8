"""Growth and lineage: a database that gains rows gets new windows and their targets; a
changed database or recipe shows exactly the affected assets as stale (Dagster's own
stale-status resolver is the judge)."""

import dagster as dg
import pandas as pd
import pytest
import yaml
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from assets.commands import Runner, prepare_run_dir, register_dataset
from assets.definitions import database_assets
from assets.partitions import windows_name
from assets.registry import registered_databases
from assets.sensors import build_growth_sensor, build_targets_job
from tve_pipeline.config import make_recipe
from tve_pipeline.datasets import build_synthetic

DELTA = pd.Timedelta("30 days")
CELL = "customer-churn|tve|1|s0"


@pytest.fixture
def grown(tmp_path, monkeypatch):
    """A database with its targets materialised, then 60 days more data and splits moved on."""
    for name in ("DAGSTER_HOME", "TVE_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "run"
    instance = prepare_run_dir(run_dir)
    register_dataset(build_synthetic(tmp_path / "grow"), run_dir, instance, profile="test")
    runner = Runner("grow", run_dir)
    windows = list(instance.get_dynamic_partitions(windows_name("grow")))
    runner.materialize(["raw_tables", "temporal_windows", "traversal_graph"], "grow")
    runner.materialize(["tve_targets"], "all windows", window_range=(windows[0], windows[-1]))
    databases = registered_databases(run_dir / "datasets")
    sensor = build_growth_sensor(databases, [build_targets_job(db) for db in databases])
    ctx = dg.build_sensor_context(instance=instance, resources=runner.resources)
    assert isinstance(sensor(ctx), dg.SkipReason)  # nothing changed since the targets were computed
    cursor = ctx.cursor

    folder = run_dir / "datasets" / "grow"
    orders = pd.read_parquet(folder / "db" / "orders.parquet")
    end = orders["order_time"].max()
    more = orders[orders["order_time"] > end - pd.Timedelta(days=60)].copy()
    more["order_time"] += pd.Timedelta(days=60)
    more["order_id"] = range(len(orders), len(orders) + len(more))
    pd.concat([orders, more], ignore_index=True).to_parquet(
        folder / "db" / "orders.parquet", index=False
    )
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    for split in ("val_timestamp", "test_timestamp"):
        manifest[split] = str((pd.Timestamp(manifest[split]) + pd.Timedelta(days=60)).date())
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return {
        "run_dir": run_dir,
        "instance": instance,
        "runner": runner,
        "sensor": sensor,
        "cursor": cursor,
        "old_windows": windows,
        "orders": pd.concat([orders, more], ignore_index=True),
        "val": manifest["val_timestamp"],
    }


def test_growth_adds_windows_and_materialises_their_targets(grown):
    g = grown
    instance, runner = g["instance"], g["runner"]
    result = g["sensor"](
        dg.build_sensor_context(instance=instance, resources=runner.resources, cursor=g["cursor"])
    )
    assert isinstance(result, dg.SensorResult), result
    (add,) = result.dynamic_partitions_requests
    new = list(add.partition_keys)
    val = pd.Timestamp(g["val"])
    # the seed times the 60 days added: a training one and the new validation one (the
    # other new training seed time, val - 2Δ, was the old validation window: registered)
    assert new == [str((val - DELTA).date()), str(val.date())]
    assert str((val - 2 * DELTA).date()) == g["old_windows"][-1]
    assert add.partitions_def_name == "grow.windows"
    (run,) = result.run_requests
    assert {k.path[-1] for k in run.asset_selection} == {
        "raw_tables",
        "temporal_windows",
        "traversal_graph",
        "tve_targets",
    }
    instance.add_dynamic_partitions(add.partitions_def_name, new)
    done = dg.materialize(
        runner.assets,
        selection=run.asset_selection,
        instance=instance,
        resources=runner.resources,
        tags=run.tags,
    )
    assert done.success
    assert instance.get_materialized_partitions(runner.db.key("tve_targets")) == set(
        g["old_windows"] + new
    )

    # the new windows' targets, against a count by hand over the grown orders table
    orders = g["orders"]
    for window in new:
        t = pd.Timestamp(window)
        frame = pd.read_parquet(g["run_dir"] / "targets" / "grow" / window / "customers.parquet")
        hits = orders[(orders["order_time"] > t) & (orders["order_time"] <= t + DELTA)]
        counts = hits.groupby("customer_id").size()
        expected_inactive = (~frame["customer_id"].isin(counts.index)).astype(int)
        assert (frame["inactive"].to_numpy() == expected_inactive.to_numpy()).all()
        assert frame["inactive"].eq(0).sum() == len(counts) > 0

    # the old windows read the old data: stale; the new ones are fresh
    resolver = get_stale_status_resolver(instance, runner.assets)
    key = runner.db.key("tve_targets")
    assert resolver.get_status(key, g["old_windows"][0]) == StaleStatus.STALE
    assert resolver.get_status(key, new[-1]) == StaleStatus.FRESH

    again = g["sensor"](
        dg.build_sensor_context(instance=instance, resources=runner.resources, cursor=result.cursor)
    )
    assert isinstance(again, dg.SkipReason)


def test_changed_data_without_new_windows_reruns_raw_tables(grown):
    g = grown
    instance, runner = g["instance"], g["runner"]
    val = pd.Timestamp(g["val"])
    instance.add_dynamic_partitions(  # as if already registered
        "grow.windows", [str((val - DELTA).date()), str(val.date())]
    )
    result = g["sensor"](
        dg.build_sensor_context(instance=instance, resources=runner.resources, cursor=g["cursor"])
    )
    assert not result.dynamic_partitions_requests or not list(
        result.dynamic_partitions_requests[0].partition_keys
    )
    (run,) = result.run_requests
    assert [k.path[-1] for k in run.asset_selection] == ["raw_tables"]


def test_changed_recipe_marks_exactly_what_it_changes_stale(pipeline_run):
    """Code versions come from the recipe sections an asset depends on."""
    instance, db = pipeline_run["instance"], pipeline_run["runner"].db
    same = get_stale_status_resolver(instance, database_assets(db, make_recipe("test")))
    assert all(
        same.get_status(db.key(n)) == StaleStatus.FRESH
        for n in ("raw_tables", "temporal_windows", "traversal_graph", "results")
    )
    assert same.get_status(db.key("pretrained_checkpoint"), "tve") == StaleStatus.FRESH
    assert same.get_status(db.key("metrics"), CELL) == StaleStatus.FRESH

    longer = get_stale_status_resolver(
        instance, database_assets(db, make_recipe("test", {"pretrain": {"epochs": 3}}))
    )
    assert longer.get_status(db.key("traversal_graph")) == StaleStatus.FRESH
    assert longer.get_status(db.key("pretrained_checkpoint"), "tve") == StaleStatus.STALE
    # its own code did not change; it goes stale when the new checkpoint lands (new upstream data)
    assert longer.get_status(db.key("finetuned_models"), CELL) == StaleStatus.FRESH
    shorter_finetune = get_stale_status_resolver(
        instance, database_assets(db, make_recipe("test", {"finetune": {"epochs": 3}}))
    )
    assert shorter_finetune.get_status(db.key("pretrained_checkpoint"), "tve") == StaleStatus.FRESH
    assert shorter_finetune.get_status(db.key("finetuned_models"), CELL) == StaleStatus.STALE

    # a grown experiment grid (more seeds, fractions, objectives; a task list) keeps its
    # finished cells
    grown = get_stale_status_resolver(
        instance,
        database_assets(
            db,
            make_recipe(
                "test",
                {
                    "pretrain": {"objectives": ["tve", "mae"]},
                    "finetune": {
                        "seeds": [0, 1],
                        "label_fractions": [0.5, 1.0],
                        "tasks": list(db.tasks),
                    },
                },
            ),
        ),
    )
    assert grown.get_status(db.key("pretrained_checkpoint"), "tve") == StaleStatus.FRESH
    assert grown.get_status(db.key("finetuned_models"), CELL) == StaleStatus.FRESH
    assert grown.get_status(db.key("metrics"), CELL) == StaleStatus.FRESH

    one_hop = get_stale_status_resolver(
        instance, database_assets(db, make_recipe("test", {"targets": {"hops": 1}}))
    )
    assert one_hop.get_status(db.key("raw_tables")) == StaleStatus.FRESH
    assert one_hop.get_status(db.key("traversal_graph")) == StaleStatus.STALE
    window = sorted(instance.get_dynamic_partitions("tiny.windows"))[0]
    assert one_hop.get_status(db.key("tve_targets"), window) == StaleStatus.STALE

    # a memory budget changes how the task vectors are computed, not their rows
    budget = get_stale_status_resolver(
        instance, database_assets(db, make_recipe("test", {"targets": {"memory_limit": "1GB"}}))
    )
    assert budget.get_status(db.key("tve_targets"), window) == StaleStatus.FRESH
    assert budget.get_status(db.key("pretrained_checkpoint"), "tve") == StaleStatus.FRESH
