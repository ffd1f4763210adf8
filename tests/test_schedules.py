"""The scheduled backfill: a tick of a database's schedule registers its new windows and
submits ONE Dagster backfill of exactly what is missing or stale.

Each tick is evaluated as the scheduler daemon evaluates it (``build_schedule_context`` on
the run folder's instance, the code location's repository, ``evaluate_tick``). What it must
request is read elsewhere: every partition of every asset of the database as Dagster's own
partitions definitions list them, minus what the instance recorded as materialised (and
still fresh).
"""

import datetime

import dagster as dg
import pytest

from assets.commands import Runner, prepare_run_dir
from assets.definitions import build_definitions
from assets.partitions import windows_name
from resources import TVEStorage
from tve_pipeline.datasets import build_synthetic

pytestmark = pytest.mark.usefixtures("keep_tve_environment")

TICK = datetime.datetime(2026, 12, 5, 3, 0, tzinfo=datetime.UTC)


def _tick(defs: dg.Definitions, instance, run_dir, database: str = "tiny"):
    """Evaluate the database's schedule once; returns (skip message, new backfills)."""
    before = {b.backfill_id for b in instance.get_backfills()}
    schedule = defs.get_schedule_def(f"{database}__scheduled_backfill")
    # in a `with` block, as the daemon does: the context enters an instance of its own (and
    # with it Dagster's current defs-state storage), given back when the block ends; left
    # open, a later definitions load found that storage's instance collected (CI, stop 28)
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=TICK,
        resources={"storage": TVEStorage(run_dir=str(run_dir))},
        repository_def=defs.get_repository_def(),
    ) as context:
        data = schedule.evaluate_tick(context)
    assert not data.run_requests  # the backfill is submitted, not handed to the scheduler
    return data.skip_message, [b for b in instance.get_backfills() if b.backfill_id not in before]


def _requested(backfill) -> set:
    return {
        (p.asset_key.path[-1], p.partition_key)
        for p in backfill.asset_backfill_data.target_subset.iterate_asset_partitions()
    }


def _every_partition(defs: dg.Definitions, instance, database: str = "tiny") -> set:
    """(asset, partition) for every partition of every asset of the database, as Dagster's
    partitions definitions list them (None for an unpartitioned asset)."""
    graph = defs.resolve_asset_graph()
    out = set()
    for key in graph.get_all_asset_keys():
        if key.path[0] != database:
            continue
        partitions = graph.get(key).partitions_def
        keys = (
            partitions.get_partition_keys(dynamic_partitions_store=instance)
            if partitions
            else [None]
        )
        out |= {(key.path[-1], k) for k in keys}
    return out


def _materialised(instance, defs, database: str = "tiny") -> set:
    out = set()
    for key in defs.resolve_asset_graph().get_all_asset_keys():
        if key.path[0] != database:
            continue
        if instance.get_latest_materialization_event(key) is None:
            continue
        partitions = instance.get_materialized_partitions(key)
        out |= {(key.path[-1], p) for p in partitions} if partitions else {(key.path[-1], None)}
    return out


def _cancel(instance, backfill) -> None:
    from dagster._core.execution.backfill import BulkActionStatus

    instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELED))


def test_a_tick_registers_windows_and_backfills_exactly_what_is_missing_or_stale(tmp_path):
    run_dir = tmp_path / "run"
    # a dataset folder dropped into the run folder, its windows not registered yet
    build_synthetic(run_dir / "datasets" / "tiny")
    (run_dir / "recipe.json").write_text('{"profile": "test", "overrides": {}}')
    instance = prepare_run_dir(run_dir)
    defs = build_definitions(run_dir)
    schedule = defs.get_schedule_def("tiny__scheduled_backfill")
    assert schedule.cron_schedule == "0 3 * * *" and schedule.execution_timezone == "UTC"
    # the test profile's schedule is listed, stopped (the other profiles': running)
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED

    # 1. nothing materialised: the tick registers the 9 windows (8 training, 1 validation
    #    seed times) and requests every partition of every asset
    message, new = _tick(defs, instance, run_dir)
    windows = instance.get_dynamic_partitions(windows_name("tiny"))
    assert len(windows) == 9
    assert len(new) == 1, message
    every = _every_partition(defs, instance)
    assert {("tve_targets", w) for w in windows} <= every
    assert _requested(new[0]) == every
    assert new[0].tags["tve/database"] == "tiny"
    assert f"submitted backfill {new[0].backfill_id} of {len(every)} partitions" in message

    # 2. a tick while that backfill runs submits nothing (the same cells would run twice)
    message, again = _tick(defs, instance, run_dir)
    assert again == [] and f"backfill {new[0].backfill_id} of tiny is still running" in message
    _cancel(instance, new[0])

    # 3. tables, schedule, graph and every window's targets materialised by `tve run`'s
    #    first stages: the backfill is everything else, the set `tve experiment` submits
    runner = Runner("tiny", run_dir)
    runner.run_upstream()
    done = _materialised(instance, defs)
    assert {a for a, _ in done} == {
        "raw_tables",
        "temporal_windows",
        "traversal_graph",
        "tve_targets",
    }
    message, new = _tick(defs, instance, run_dir)
    assert len(new) == 1, message
    assert _requested(new[0]) == every - done
    assert _requested(new[0]) == {
        (p.asset_key.path[-1], p.partition_key) for p in runner.unfinished()
    }
    _cancel(instance, new[0])

    # 4. a changed targets recipe makes the seed schedule and the traversal graph stale
    #    (their code version is the recipe's targets section), and with them every window's
    #    targets and all that follows; the tables stay
    stale = build_definitions(run_dir, profile="test", overrides={"targets": {"hops": 1}})
    message, new = _tick(stale, instance, run_dir)
    assert len(new) == 1, message
    assert _requested(new[0]) == every - {("raw_tables", None)}


def test_a_tick_on_a_finished_database_submits_nothing(pipeline_run):
    run_dir = pipeline_run["run_dir"]
    defs = pipeline_run["runner"].defs
    message, new = _tick(defs, pipeline_run["instance"], run_dir)
    assert new == [] and message == "tiny: nothing is missing or stale"


def test_the_cron_comes_from_the_recipe(tmp_path):
    build_synthetic(tmp_path / "datasets" / "tiny")
    defs = build_definitions(
        tmp_path, profile="demo", overrides={"schedule": {"cron": "*/15 * * * *"}}
    )
    schedule = defs.get_schedule_def("tiny__scheduled_backfill")
    assert schedule.cron_schedule == "*/15 * * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with pytest.raises(dg.Failure) as failed:
        build_definitions(tmp_path, overrides={"schedule": {"cron": "daily"}})
    assert "schedule.cron must be a cron string of 5 fields" in str(failed.value.__cause__)
