"""`tve experiment`: the cells as one Dagster backfill, run by a real Dagster daemon two at a
time in their own processes; a failed cell leaves the others intact, and a relaunch runs
only what is unfinished."""

import json

import pytest

from assets.cli import main
from assets.commands import Runner
from tve_pipeline.datasets import build_synthetic

pytestmark = pytest.mark.usefixtures("keep_tve_environment")


def _backfill_runs(runner, backfill):
    return [
        r
        for r in runner.instance.get_runs()
        if r.tags.get("dagster/backfill") == backfill.backfill_id
    ]


def test_experiment_is_a_backfill_a_failed_cell_stays_alone_and_a_relaunch_runs_the_rest(
    tmp_path, capsys
):
    run_dir = tmp_path / "run"
    assert (
        main(["register", str(build_synthetic(tmp_path / "tiny")), "--run-dir", str(run_dir)]) == 0
    )
    # a label fraction too small to leave a training row: its cells fail, the others must not
    (run_dir / "recipe.json").write_text(
        json.dumps(
            {"profile": "test", "overrides": {"finetune": {"label_fractions": [0.0001, 1.0]}}}
        )
    )
    # one task keeps the daemon's runs few (each is a process of its own)
    command = [
        "experiment",
        "tiny",
        "--preset",
        "test",
        "--tasks",
        "customer-churn",
        "--run-dir",
        str(run_dir),
    ]
    assert main(command) == 2  # the command fails, naming the failed cells
    out = capsys.readouterr()
    assert "launched backfill" in out.out
    bad = {f"customer-churn|{m}|0.0001|s0" for m in ("scratch", "tve")}
    good = {f"customer-churn|{m}|1|s0" for m in ("scratch", "tve")}
    for cell in bad:
        assert f"failed: {cell}" in out.out
    assert "no results" in out.err

    runner = Runner("tiny", run_dir)
    (first,) = runner.instance.get_backfills()
    runs = _backfill_runs(runner, first)
    # the cells ran in the backfill's runs, not in this process; the good ones finished
    assert runner.instance.get_materialized_partitions(runner.db.key("metrics")) == good
    failed = {r.tags["dagster/partition"] for r in runs if r.status.value == "FAILURE"}
    assert failed == bad
    assert {
        r.tags.get("dagster/partition") for r in runs if r.status.value == "SUCCESS"
    } >= good | {"tve"}
    # the failed run says why in one line naming the task and the fraction
    (bad_run,) = [
        r for r in runs if r.tags["dagster/partition"] == "customer-churn|scratch|0.0001|s0"
    ]
    failure = next(
        e.dagster_event
        for e in runner.instance.all_logs(bad_run.run_id)
        if e.dagster_event and e.dagster_event.is_step_failure
    )
    message = failure.step_failure_data.user_failure_data.description
    assert (
        "customer-churn" in message and "label fraction 0.0001" in message and "\n" not in message
    )

    # the user drops the fraction: the relaunch runs only the results, not one finished cell again
    (run_dir / "recipe.json").write_text(
        json.dumps({"profile": "test", "overrides": {"finetune": {"label_fractions": [1.0]}}})
    )
    assert main(command) == 0
    assert "completed_success" in capsys.readouterr().out
    runner = Runner("tiny", run_dir)
    second = next(b for b in runner.instance.get_backfills() if b.backfill_id != first.backfill_id)
    relaunched = _backfill_runs(runner, second)
    assert [r.tags.get("dagster/partition") for r in relaunched] == [None]
    assert {k.path[-1] for r in relaunched for k in r.asset_selection} == {"results"}
    summary = runner.results()
    assert set(summary["method"]) == {"scratch", "tve"} and set(summary["label_fraction"]) == {1.0}


def test_a_relaunch_cancels_what_a_stopped_experiment_left(tmp_path):
    """A `tve experiment` killed mid-way leaves its backfill requested and pool slots claimed
    by runs that died; the next launch cancels the one and frees the others."""
    from dagster._core.definitions.events import AssetKeyPartitionKey
    from dagster._core.execution.backfill import BulkActionStatus

    from assets.commands import _launch_backfill, cancel_stale_backfills

    run_dir = tmp_path / "run"
    assert (
        main(["register", str(build_synthetic(tmp_path / "tiny")), "--run-dir", str(run_dir)]) == 0
    )
    runner = Runner("tiny", run_dir)
    todo = {AssetKeyPartitionKey(runner.db.key("results"), None)}
    left = _launch_backfill(runner, todo, "an experiment whose daemon was killed")
    storage = runner.instance.event_log_storage
    storage.initialize_concurrency_limit_to_default("gpu")
    assert storage.claim_concurrency_slot(
        "gpu", "a-run-that-died", "tiny__finetuned_models"
    ).is_claimed
    assert storage.get_concurrency_info("gpu").claimed_slots

    assert cancel_stale_backfills(runner.instance, runner.db) == [left]
    assert runner.instance.get_backfill(left).status == BulkActionStatus.CANCELED
    assert not storage.get_concurrency_info("gpu").claimed_slots
    assert cancel_stale_backfills(runner.instance, runner.db) == []  # nothing left to cancel
