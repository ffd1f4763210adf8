"""The command lines a user types: `dagster definitions validate`, `dagster asset materialize`, `tve`.

One real subprocess per command line (the installed entry points, as a user runs them);
the error cases run `tve`'s main in this process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tve_pipeline.cli import main
from tve_pipeline.datasets import build_synthetic

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("keep_tve_environment")


def _run(args, env=None, cwd=ROOT):
    return subprocess.run(
        args,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tve(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    assert err.startswith("tve: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_definitions_validate(pipeline_run):
    run_dir = pipeline_run["run_dir"]
    r = _run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        env={"DAGSTER_HOME": str(run_dir / "dagster"), "TVE_RUN_DIR": str(run_dir)},
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_asset_materialize_cli_on_registered_database(pipeline_run):
    """The README's commands: `dg launch` one window of tve_targets; `dagster asset
    materialize` refuses a window the database does not have."""
    run = pipeline_run
    windows = sorted(p.name for p in (run["run_dir"] / "targets" / "tiny").iterdir())
    window = windows[len(windows) // 2]
    target = run["run_dir"] / "targets" / "tiny" / window / "customers.parquet"
    before = pd.read_parquet(target)
    target.unlink()
    r = _run(
        [str(BIN / "dg"), "launch", "--assets", "tiny/tve_targets", "--partition", window],
        env={"DAGSTER_HOME": str(run["run_dir"] / "dagster"), "TVE_RUN_DIR": str(run["run_dir"])},
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    pd.testing.assert_frame_equal(before, pd.read_parquet(target))
    r = _run(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "--select",
            "tiny/tve_targets",
            "--partition",
            "1999-01-01",
            "-m",
            "assets.definitions",
        ],
        env={"DAGSTER_HOME": str(run["run_dir"] / "dagster"), "TVE_RUN_DIR": str(run["run_dir"])},
    )
    assert r.returncode != 0 and "1999-01-01" in r.stdout + r.stderr


def test_tve_errors_are_one_line_from_the_entry_point(tmp_path):
    r = _run(
        [str(BIN / "tve"), "register", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "run")]
    )
    assert r.returncode == 2
    assert (
        r.stderr.count("\n") == 1 and "no manifest.yaml" in r.stderr and "Traceback" not in r.stderr
    )


def test_tve_validate_names_what_is_wrong(tmp_path, capsys):
    code, _, err = _tve(capsys, "validate", str(tmp_path))
    assert code == 2 and "not a RelBench dataset folder" in _one_line_error(err)


def test_tve_materialize_checks_partition_keys(pipeline_run, capsys):
    run_dir = str(pipeline_run["run_dir"])
    cases = [
        (["raw_tables", "--partition", "no-such-db"], "unknown database 'no-such-db'", "tiny"),
        (["tve_targets", "--partition", "tiny"], "needs --partition 'tiny|window'", ".."),
        (
            ["tve_targets", "--partition", "tiny|2020-13-01"],
            "got '2020-13-01'",
            "2020-01-21 .. 2020-08-18 (8)",
        ),
        (
            ["metrics", "--partition", "tiny|plane-active"],
            "got 'plane-active'",
            "customer-churn|scratch|1|s0",
        ),
        (
            ["pretrained_checkpoint", "--partition", "tiny"],
            "needs --partition 'tiny|objective'",
            "tve",
        ),
        (
            ["raw_tables", "--partition", "tiny|customer-churn"],
            "not partitioned",
            "--partition 'tiny'",
        ),
        (["no_asset", "--partition", "tiny"], "unknown asset 'no_asset'", "tve_targets"),
    ]
    for args, expected, hint in cases:
        code, _, err = _tve(capsys, "materialize", *args, "--run-dir", run_dir)
        assert code == 2, err
        assert expected in _one_line_error(err) and hint in err, err
    code, _, err = _tve(
        capsys, "materialize", "traversal_graph", "--partition", "tiny", "--run-dir", run_dir
    )
    assert code == 0, err


def test_fresh_database_says_what_to_run_first(tmp_path, capsys):
    """A window of a database nothing was materialised for: one line naming the missing
    upstream asset and the command that materialises it, not DagsterExecutionLoadInputError."""
    run_dir = tmp_path / "run"
    code, out, err = _tve(
        capsys,
        "register",
        str(build_synthetic(tmp_path / "fresh")),
        "--run-dir",
        str(run_dir),
        "--profile",
        "test",
    )
    assert code == 0, err
    assert "registered database 'fresh'" in out and "8 windows" in out and "profile 'test'" in out
    code, _, err = _tve(
        capsys,
        "materialize",
        "tve_targets",
        "--partition",
        "fresh|2020-03-21",
        "--run-dir",
        str(run_dir),
    )
    assert code == 2
    assert (
        "fresh/raw_tables has not been materialised" in _one_line_error(err)
        and "tve run fresh" in err
    )
    code, _, err = _tve(capsys, "results", "fresh", "--run-dir", str(run_dir))
    assert code == 2 and "no results for fresh" in _one_line_error(err) and "tve run fresh" in err
    for asset, partition in [
        ("raw_tables", "fresh"),
        ("temporal_windows", "fresh"),
        ("traversal_graph", "fresh"),
        ("tve_targets", "fresh|2020-03-21"),
    ]:
        code, _, err = _tve(
            capsys, "materialize", asset, "--partition", partition, "--run-dir", str(run_dir)
        )
        assert code == 0, err
    code, _, err = _tve(
        capsys,
        "materialize",
        "pretrained_checkpoint",
        "--partition",
        "fresh|tve",
        "--run-dir",
        str(run_dir),
    )
    assert code == 2
    assert (
        "tve_targets of 'fresh' missing for 7 of 8 windows (2020-01-21, 2020-02-20, 2020-04-20 ...)"
        in _one_line_error(err)
        and "tve run fresh" in err
    )


def test_failure_inside_a_run_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    dataset = build_synthetic(tmp_path / "broken")
    assert (
        _tve(capsys, "register", str(dataset), "--run-dir", str(run_dir), "--profile", "test")[0]
        == 0
    )
    (
        run_dir / "datasets" / "broken" / "db" / "products.parquet"
    ).unlink()  # broken after registration
    code, out, err = _tve(capsys, "run", "broken", "--run-dir", str(run_dir))
    assert code == 2
    assert "raw_tables broken failed" in _one_line_error(err) and "products" in err
    assert "Traceback" not in out and "STEP_FAILURE" not in out


def test_register_keeps_the_profile_and_rejects_unknown_ones(tmp_path, capsys):
    run_dir = tmp_path / "run"
    dataset = build_synthetic(tmp_path / "shop")
    code, out, _ = _tve(capsys, "register", str(dataset), "--run-dir", str(run_dir))
    assert code == 0 and "profile 'reference'" in out  # said, and written down
    assert '"profile": "reference"' in (run_dir / "recipe.json").read_text()
    assert (
        _tve(capsys, "register", str(dataset), "--run-dir", str(run_dir), "--profile", "demo")[0]
        == 0
    )
    code, out, _ = _tve(capsys, "register", str(dataset), "--run-dir", str(run_dir))
    assert code == 0 and "profile 'demo'" in out
    with pytest.raises(SystemExit):
        main(["register", str(dataset), "--run-dir", str(run_dir), "--profile", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_tve_import_synthetic_at_scale_loads_in_relbench(tmp_path):
    import relbench

    r = _run([str(BIN / "tve"), "import", "synthetic", "--rows", "20000", str(tmp_path / "shop")])
    assert r.returncode == 0, r.stderr[-2000:]
    ds = relbench.load_dataset(tmp_path / "shop")
    db = ds.get_db(upto_test_timestamp=False)
    assert len(db.table_dict["orders"].df) == 20000
    train = ds.load_task("customer-churn").get_table("train").df
    assert len(train) > 0 and set(train["churn"].unique()) <= {0, 1}
