"""`tve experiment`: the cells as one Dagster backfill, run by a real Dagster daemon two at a
time in their own processes; a second launch finds nothing unfinished."""

import pytest

from assets.commands import Runner
from tve_pipeline.cli import main
from tve_pipeline.datasets import build_synthetic

pytestmark = pytest.mark.usefixtures("keep_tve_environment")


def test_experiment_is_a_backfill_and_a_relaunch_runs_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["register", str(build_synthetic(tmp_path / "tiny")), "--run-dir", str(run_dir)]) == 0
    # one task keeps the daemon's runs few (each is a process of its own)
    assert main(["experiment", "tiny", "--preset", "test", "--tasks", "customer-churn", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "launched backfill" in out and "completed_success" in out

    runner = Runner("tiny", run_dir)
    cells = {f"customer-churn|{m}|1|s0" for m in ("scratch", "tve")}
    assert runner.instance.get_materialized_partitions(runner.db.key("metrics")) == cells
    backfills = runner.instance.get_backfills()
    assert len(backfills) == 1 and backfills[0].status.value == "COMPLETED_SUCCESS"
    runs = runner.instance.get_runs()
    in_backfill = [r for r in runs if r.tags.get("dagster/backfill") == backfills[0].backfill_id]
    assert in_backfill and all(r.status.value == "SUCCESS" for r in in_backfill)
    # the cells ran in the backfill's runs, not in this process
    assert {r.tags.get("dagster/partition") for r in in_backfill} >= cells

    assert main(["experiment", "tiny", "--preset", "test", "--tasks", "customer-churn", "--run-dir", str(run_dir)]) == 0
    assert "nothing to launch" in capsys.readouterr().out
    assert len(Runner("tiny", run_dir).instance.get_backfills()) == 1
