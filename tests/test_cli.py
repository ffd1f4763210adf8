"""The command lines a user types: `dagster definitions validate`, `dagster asset materialize`, `tve`."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args, env=None, cwd=ROOT):
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_definitions_validate(tmp_path):
    home = tmp_path / "dagster"
    home.mkdir()
    r = _run([str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
             env={"DAGSTER_HOME": str(home), "TVE_RUN_DIR": str(tmp_path / "run")})
    assert r.returncode == 0, r.stdout + r.stderr


def test_asset_materialize_cli_on_registered_database(pipeline_run):
    """The README's command: materialise one tve_targets partition from the command line."""
    run = pipeline_run
    windows = sorted(p.name for p in (run["run_dir"] / "targets" / "tiny").iterdir())
    window = windows[len(windows) // 2]
    target = run["run_dir"] / "targets" / "tiny" / window / "customers.parquet"
    before = pd.read_parquet(target)
    target.unlink()
    r = _run([str(BIN / "dagster"), "asset", "materialize", "--select", "tve_targets",
              "--partition", f"tiny|{window}", "-m", "assets.definitions"],
             env={"DAGSTER_HOME": str(run["run_dir"] / "dagster"), "TVE_RUN_DIR": str(run["run_dir"])})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    after = pd.read_parquet(target)
    pd.testing.assert_frame_equal(before, after)


def test_tve_errors_are_one_line(tmp_path):
    r = _run([str(BIN / "tve"), "register", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "run")])
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no manifest.yaml" in r.stderr and "Traceback" not in r.stderr
    r = _run([str(BIN / "tve"), "validate", str(tmp_path)])
    assert r.returncode == 2 and "not a RelBench dataset folder" in r.stderr and r.stderr.count("\n") == 1


def test_dagster_cli_rejects_unregistered_database(pipeline_run):
    run = pipeline_run
    r = _run([str(BIN / "dagster"), "asset", "materialize", "--select", "raw_tables",
              "--partition", "no-such-db", "-m", "assets.definitions"],
             env={"DAGSTER_HOME": str(run["run_dir"] / "dagster"), "TVE_RUN_DIR": str(run["run_dir"])})
    assert r.returncode != 0
    assert "no-such-db" in (r.stdout + r.stderr)


def test_tve_materialize_checks_partition_keys(pipeline_run):
    run_dir = str(pipeline_run["run_dir"])
    cases = [
        (["raw_tables", "--partition", "no-such-db"], "unknown database 'no-such-db'", "tiny"),
        (["tve_targets", "--partition", "tiny"], "must read 'database|window'", "tiny"),
        (["tve_targets", "--partition", "tiny|2020-13-01"], "unknown window '2020-13-01'", "YYYY-MM-01"),
        (["metrics", "--partition", "tiny|plane-active"], "has no task 'plane-active'", "customer-churn"),
        (["no_asset", "--partition", "tiny"], "unknown asset 'no_asset'", "tve_targets"),
    ]
    for args, expected, hint in cases:
        r = _run([str(BIN / "tve"), "materialize", *args, "--run-dir", run_dir])
        assert r.returncode == 2, r.stderr
        assert expected in r.stderr and hint in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _run([str(BIN / "tve"), "materialize", "traversal_graph", "--partition", "tiny", "--run-dir", run_dir])
    assert r.returncode == 0, r.stderr[-2000:]


def test_tve_import_synthetic_at_scale_loads_in_relbench(tmp_path):
    import relbench

    r = _run([str(BIN / "tve"), "import", "synthetic", "--rows", "20000", str(tmp_path / "shop")])
    assert r.returncode == 0, r.stderr[-2000:]
    ds = relbench.load_dataset(tmp_path / "shop")
    db = ds.get_db(upto_test_timestamp=False)
    assert len(db.table_dict["orders"].df) == 20000
    train = ds.load_task("customer-churn").get_table("train").df
    assert len(train) > 0 and set(train["churn"].unique()) <= {0, 1}
