"""What the Dagster UI shows of the tiny database's assets, read from the materialisation
events of the pipeline's own Dagster instance: fixed metadata keys, a schema diagram that
names every table and foreign key, row counts of the parquet files, SQL that DuckDB runs
to the rows written, plots and tables, links to existing MLflow runs; and the instance and
MLflow settings that keep a sign-up dialog and the GenAI view out of a new user's way."""

import base64
import re
import struct
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from assets.partitions import parse_cell
from tests.conftest import load_asset
from tve_pipeline.schema_diagram import er_diagram
from tve_pipeline.tasks import restricted_k

ASSETS = (
    "raw_tables",
    "temporal_windows",
    "traversal_graph",
    "tve_targets",
    "pretrained_checkpoint",
    "finetuned_models",
    "metrics",
    "probe_metrics",
    "results",
)
MLFLOW = {"mlflow_run", "mlflow_run_id"}
IO_MANAGER = {"path"}  # the file Dagster's FilesystemIOManager wrote
KEYS = {
    "raw_tables": {
        "dataset_dir",
        "fingerprint",
        "rows",
        "dagster/row_count",
        "tables",
        "row_counts",
        "schema",
        "schema_image",
        "time_range",
        "val_timestamp",
        "test_timestamp",
        "tasks",
        "column_types",
        "changed_rows",
        "warnings",
        "info",
    }
    | IO_MANAGER,
    "temporal_windows": {
        "timedelta",
        "num_seed_times",
        "num_windows",
        "windows_added",
        "by_split",
        "first_window",
        "last_window",
    }
    | IO_MANAGER,
    "traversal_graph": {
        "targets",
        "entity_tables",
        "hops",
        "left_out",
        "left_out_targets",
        "by_entity",
        "target_list",
        "sql",
        "targets_json",
    }
    | IO_MANAGER,
    "tve_targets": {
        "timedelta",
        "num_windows",
        "first_window",
        "last_window",
        "rows",
        "dagster/row_count",
        "inactive_rate",
        "active_share",
        "targets",
        "by_entity",
        "target_values",
        "sql",
        "folder",
    },
    "pretrained_checkpoint": {
        "num_windows",
        "seeds",
        "val_loss",
        "train_seconds",
        "by_entity",
        "loss_curves",
    }
    | MLFLOW
    | IO_MANAGER,
    "finetuned_models": {
        "task",
        "method",
        "label_fraction",
        "label_set",
        "seed",
        "n_train",
        "n_val",
        "n_test",
        "best_epoch",
        "best_step",
        "steps",
        "lr",
        "averaged",
        "lr_search",
        "metric",
        "val_{metric}",
        "val_metrics",
        "learning_curve",
    }
    | MLFLOW
    | IO_MANAGER,
    "metrics": {
        "metric",
        "val_{metric}",
        "test_{metric}",
        "trivial_val_{metric}",
        "trivial_test_{metric}",
        "trivial_predictor",
        "scores",
        "plot",
    }
    | MLFLOW
    | IO_MANAGER,
    "probe_metrics": {
        "metric",
        "val_{metric}",
        "test_{metric}",
        "regularisation",
        "strength",
        "seconds",
        "embed_seconds",
        "n_train",
        "grid",
    }
    | MLFLOW
    | IO_MANAGER,
    "results": {
        "cells",
        "probe_cells",
        "cells_expected",
        "probe_cells_expected",
        "summary",
        "test_inputs",
        "plots",
        "folder",
        "mlflow_experiment",
    }
    | MLFLOW
    | IO_MANAGER,
}
# Numbers the UI plots across partitions: a number under the same key in every partition.
PLOTTED = {
    "raw_tables": ("rows", "tables"),
    "traversal_graph": ("targets",),
    "tve_targets": ("rows", "targets", "inactive_rate", "active_share"),
    "pretrained_checkpoint": ("seeds", "val_loss", "train_seconds"),
    "finetuned_models": ("n_train", "best_epoch", "best_step", "lr", "val_{metric}"),
    "metrics": ("val_{metric}", "test_{metric}", "trivial_val_{metric}", "trivial_test_{metric}"),
    "probe_metrics": ("val_{metric}", "test_{metric}", "strength", "seconds"),
}
# ``{metric}``: the partition's task's first metric (a key per metric, so the UI plots
# AUROC and MAE apart)


def _keys(keys, metadata) -> set:
    metric = metadata["metric"].text if "metric" in metadata else ""
    return {k.format(metric=metric) for k in keys}


def _materialisations(run, asset: str) -> list[dg.AssetMaterialization]:
    records = run["instance"].fetch_materializations(dg.AssetKey(["tiny", asset]), limit=10_000)
    return [r.asset_materialization for r in records.records]


def _latest(run, asset: str) -> dict:
    return _materialisations(run, asset)[0].metadata


def _blocks(markdown: str, language: str) -> dict[str, str]:
    """Fenced blocks of ``language``, each under the bold heading before it ('' if none)."""
    found = re.findall(
        r"(?:\*\*([^*\n]+)\*\*\s*\n\s*\n)?(`{3,})" + language + r"\n(.*?)\n\2", markdown, re.S
    )
    return {heading: body for heading, _, body in found}


def _png(markdown: str) -> tuple[int, int]:
    """Width and height of the PNG embedded in ``markdown`` (it must be one)."""
    match = re.search(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, "no embedded PNG"
    data = base64.b64decode(match.group(1))
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_every_materialisation_has_the_fixed_keys_and_plottable_numbers(pipeline_run):
    for asset in ASSETS:
        mats = _materialisations(pipeline_run, asset)
        assert mats, f"{asset} was never materialised"
        for m in mats:
            assert set(m.metadata) == _keys(KEYS[asset], m.metadata), (asset, m.partition)
            for key in _keys(PLOTTED.get(asset, ()), m.metadata):
                value = m.metadata[key]
                assert isinstance(value, (dg.IntMetadataValue, dg.FloatMetadataValue)), (
                    asset,
                    key,
                    value,
                )


def test_schema_diagram_names_every_table_column_and_foreign_key(pipeline_run):
    dataset = pipeline_run["dataset_dir"]
    manifest = yaml.safe_load((dataset / "manifest.yaml").read_text())["tables"]
    (diagram,) = _blocks(_latest(pipeline_run, "raw_tables")["schema"].value, "mermaid").values()
    lines = diagram.splitlines()
    assert lines[0] == "erDiagram"
    entities, current = {}, None
    for line in lines[1:]:
        if m := re.fullmatch(r" {4}(\S+) \{", line):
            current = entities.setdefault(m.group(1), {})
        elif line == "    }":
            current = None
        elif current is not None:
            m = re.fullmatch(r' {8}(\S+) (\S+)((?: (?:PK|FK)(?:, (?:PK|FK))*)?)( "[^"]*")?', line)
            assert m, line
            current[m.group(2)] = (m.group(3).replace(",", "").split(), (m.group(4) or "").strip())
    relations = {
        m.groups()
        for line in lines
        if (m := re.fullmatch(r' {4}(\S+) \|o--o\{ (\S+) : "([^"]+)"', line))
    }
    assert set(entities) == set(manifest)
    expected_relations = set()
    for name, spec in manifest.items():
        columns = pq.read_schema(dataset / "db" / f"{name}.parquet").names
        assert set(entities[name]) == set(columns), name
        assert entities[name][spec["pkey"]][0] == ["PK"]
        if spec.get("time_col"):
            assert entities[name][spec["time_col"]][1] == '"time"'
        for col, parent in (spec.get("fkeys") or {}).items():
            assert entities[name][col][0] == ["FK"]
            expected_relations.add((parent, name, col))
    assert relations == expected_relations and expected_relations


def test_diagram_names_survive_odd_table_and_column_names():
    from relbench.manifest import TableSpec

    tables = {
        "order items": TableSpec(pkey="id", time_col="at", fkeys={"2nd-ref": "lists"}),
        "lists": TableSpec(pkey="id"),
    }
    text = er_diagram(tables, {"order items": {"id": "key", "x y": "numerical"}})
    assert "    order_items {" in text and "        numerical x_y" in text
    assert "        key _2nd-ref FK" in text and '        timestamp at "time"' in text
    assert '    lists |o--o{ order_items : "2nd-ref"' in text


def test_row_count_table_equals_the_parquet_files(pipeline_run):
    meta = _latest(pipeline_run, "raw_tables")
    counts = {r.data["table"]: r.data["rows"] for r in meta["row_counts"].records}
    files = {
        p.stem: pq.ParquetFile(p).metadata.num_rows
        for p in (pipeline_run["dataset_dir"] / "db").glob("*.parquet")
    }
    assert counts == files
    assert meta["rows"].value == meta["dagster/row_count"].value == sum(files.values())


def _windows_of_last_run(run) -> tuple[dict, list[str]]:
    mats = _materialisations(run, "tve_targets")
    meta = mats[0].metadata
    last = meta["last_window"].text
    first = meta["first_window"].text
    folder = Path(meta["folder"].path)
    windows = sorted(p.name for p in folder.iterdir() if first <= p.name <= last)
    assert len(windows) == meta["num_windows"].value
    return meta, windows


def _written(run_dir: Path, windows: list[str], entity: str) -> pd.DataFrame:
    frames = [
        pd.read_parquet(run_dir / "targets" / "tiny" / w / f"{entity}.parquet") for w in windows
    ]
    return pd.concat(frames, ignore_index=True)


def _same_rows(got: pd.DataFrame, want: pd.DataFrame, key: str) -> None:
    assert list(got.columns) == list(want.columns)
    order = ["timestamp", key]
    pd.testing.assert_frame_equal(
        got.sort_values(order).reset_index(drop=True),
        want.sort_values(order).reset_index(drop=True),
        check_dtype=False,
    )


def test_tve_targets_script_runs_in_duckdb_and_gives_the_rows_written(pipeline_run):
    meta, windows = _windows_of_last_run(pipeline_run)
    scripts = _blocks(meta["sql"].value, "sql")
    assert set(scripts) == {"customers"}
    got = duckdb.connect().execute(scripts["customers"]).df()
    _same_rows(got, _written(pipeline_run["run_dir"], windows, "customers"), "customer_id")


def test_traversal_graph_query_runs_in_duckdb_on_the_tables(pipeline_run):
    run = pipeline_run
    queries = _blocks(_latest(run, "traversal_graph")["sql"].value, "sql")
    assert set(queries) == {"customers"}
    _, windows = _windows_of_last_run(run)
    want = _written(run["run_dir"], windows[-2:], "customers")
    con = duckdb.connect()
    for p in (run["dataset_dir"] / "db").glob("*.parquet"):
        con.execute(f"CREATE VIEW \"{p.stem}\" AS SELECT * FROM read_parquet('{p}')")
    con.register("seed_times", want[["timestamp"]].drop_duplicates())
    con.execute("CREATE TABLE timestamps AS SELECT * FROM seed_times")
    _same_rows(con.execute(queries["customers"]).df(), want, "customer_id")


def test_target_list_and_values_cover_every_target(pipeline_run):
    graph = load_asset(pipeline_run, "traversal_graph")
    names = [d["name"] for d in graph["customers"]]
    listed = _latest(pipeline_run, "traversal_graph")["target_list"].records
    assert [r.data["target"] for r in listed] == names
    meta, windows = _windows_of_last_run(pipeline_run)
    frame = _written(pipeline_run["run_dir"], windows, "customers")
    active = frame[frame["inactive"] == 0]
    values = {r.data["target"]: r.data for r in meta["target_values"].records}
    assert list(values) == names
    for name in names:
        assert values[name]["active_rows"] == len(active)
        assert values[name]["non_null"] == active[name].notna().sum(), name
    amount = next(n for n in names if n.endswith("amount__sum") and ">" not in n)
    assert values[amount]["mean"] == pytest.approx(active[amount].mean())


def test_each_window_carries_its_own_seeds_and_active_share(pipeline_run):
    """A backfill of many windows is one run, yet each window's materialisation has that
    window's own counts (its file's rows), not the run's totals."""
    run_dir = pipeline_run["run_dir"]
    latest = {}  # window -> its latest materialisation (newest first), that of its file
    for m in _materialisations(pipeline_run, "tve_targets"):
        latest.setdefault(m.partition, m)
    assert len(latest) > 1
    sizes = set()
    for window, m in latest.items():
        frame = _written(run_dir, [window], "customers")
        sizes.add(len(frame))
        active = int((frame["inactive"] == 0).sum())
        assert m.metadata["dagster/row_count"].value == len(frame)
        assert m.metadata["active_share"].value == pytest.approx(active / len(frame))
        assert m.metadata["inactive_rate"].value == pytest.approx(1 - active / len(frame))
        (row,) = [r.data for r in m.metadata["by_entity"].records]
        assert (row["entity"], row["seeds"], row["active"]) == ("customers", len(frame), active)
    assert len(sizes) > 1  # customers join over time: the windows' counts differ


def test_a_backfill_records_each_window_with_its_own_rows_in_window_order(pipeline_run):
    """The fixture's one run over every window (a single-run backfill) recorded the
    windows' materialisations in window order, each with the row count of its own file as
    pyarrow reads it (not the run's total): the asset's plots show a trend."""
    import pyarrow.parquet as pq

    instance = pipeline_run["instance"]
    records = instance.fetch_materializations(
        dg.AssetKey(["tiny", "tve_targets"]), limit=10_000, ascending=True
    ).records
    by_run: dict[str, list] = {}
    for r in records:
        by_run.setdefault(r.run_id, []).append(r.asset_materialization)
    mats = max(by_run.values(), key=len)  # the run of many windows
    windows = [m.partition for m in mats]
    assert len(windows) > 2 and windows == sorted(windows)
    rows = []
    for m in mats:
        files = (pipeline_run["run_dir"] / "targets" / "tiny" / m.partition).glob("*.parquet")
        own = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        assert m.metadata["rows"].value == own, m.partition
        rows.append(own)
    assert len(set(rows)) > 1 and sum(rows) not in rows


def test_metrics_show_a_plot_and_the_evaluated_scores(pipeline_run):
    for m in _materialisations(pipeline_run, "metrics"):
        meta = m.metadata
        width, height = _png(meta["plot"].value)
        assert width > 300 and height > 200
        frame = load_asset(pipeline_run, "metrics", m.partition)
        rows = {
            (r.data["split"], r.data["metric"]): r.data["value"] for r in meta["scores"].records
        }
        assert rows == pytest.approx(
            {(s, k): v for s, k, v in zip(frame["split"], frame["metric"], frame["value"])}
        )
        metric = meta["metric"].text
        assert meta[f"val_{metric}"].value == pytest.approx(rows[("val", metric)])
        assert meta[f"test_{metric}"].value == pytest.approx(rows[("test", metric)])


def test_metrics_show_the_trivial_baseline_computed_by_hand(pipeline_run):
    """Beside the model's scores, the constant best on val: for AUROC any constant scores
    0.5; for NMAE the training labels' zero, mean or median, chosen on val (numpy here)."""
    from tve_pipeline.database import open_dataset

    dataset = open_dataset(pipeline_run["dataset_dir"])
    seen = set()
    for m in _materialisations(pipeline_run, "metrics"):
        meta, (task_name, _, label_set, _) = m.metadata, parse_cell(m.partition)
        metric = meta["metric"].text
        val, test = meta[f"trivial_val_{metric}"].value, meta[f"trivial_test_{metric}"].value
        seen.add(metric)
        if metric == "roc_auc":
            assert (val, test, meta["trivial_predictor"].text) == (0.5, 0.5, "majority")
            continue
        assert metric == "nmae"
        if restricted_k(label_set) is not None:
            continue  # a restricted cell's labels: the restricted task's (tests/test_restricted.py)
        task = dataset.load_task(task_name)
        labels = {
            split: task.get_table(split, mask_input_cols=False).df[task.target_col].to_numpy()
            for split in ("train", "val", "test")
        }
        constants = {
            "global_zero": 0.0,
            "global_mean": labels["train"].mean(),
            "global_median": np.median(labels["train"]),
        }
        nmae = {
            split: {
                name: np.abs(labels[split] - c).mean() / task.nmae_std
                for name, c in constants.items()
            }
            for split in ("val", "test")
        }
        best = min(nmae["val"], key=nmae["val"].get)
        assert meta["trivial_predictor"].text == best
        assert (val, test) == pytest.approx((nmae["val"][best], nmae["test"][best]), rel=1e-6)
    assert seen == {"roc_auc", "nmae"}  # the tiny database's two tasks


def test_every_png_metadata_value_is_an_image(pipeline_run):
    for asset, key in (
        ("pretrained_checkpoint", "loss_curves"),
        ("finetuned_models", "learning_curve"),
        ("results", "plots"),
    ):
        for m in _materialisations(pipeline_run, asset):
            _png(m.metadata[key].value)


def test_mlflow_links_open_existing_runs_in_the_model_training_view(pipeline_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_run['run_dir']}/mlflow.db")
    seen = 0
    for asset in ("pretrained_checkpoint", "finetuned_models", "metrics", "results"):
        for m in _materialisations(pipeline_run, asset):
            url = urlparse(m.metadata["mlflow_run"].url)
            assert f"{url.scheme}://{url.netloc}" == "http://127.0.0.1:5000"  # make mlflow-ui
            route, _, query = url.fragment.partition("?")
            assert parse_qs(query) == {"workflowType": ["machine_learning"]}
            _, experiments, exp_id, runs, run_id = route.split("/")
            assert (experiments, runs) == ("experiments", "runs")
            assert run_id == m.metadata["mlflow_run_id"].text
            run = client.get_run(run_id)
            assert run.info.experiment_id == exp_id
            assert run.data.tags["dagster.asset"] == asset
            assert run.data.tags["dagster.partition"] == (m.partition or "")
            seen += 1
    assert seen >= 4
    url = urlparse(_latest(pipeline_run, "results")["mlflow_experiment"].url)
    route, _, query = url.fragment.partition("?")
    exp = client.get_experiment_by_name("tve-pipeline")
    assert (route, query) == (f"/experiments/{exp.experiment_id}", "workflowType=machine_learning")


def test_experiment_is_marked_model_training_as_mlflow_ui_spells_it(pipeline_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_run['run_dir']}/mlflow.db")
    tags = client.get_experiment_by_name("tve-pipeline").tags
    kind = tags["mlflow.experimentKind"]
    # the values MLflow's own web app knows, read from its build
    bundles = (Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js").glob(
        "*.js"
    )
    known = set()
    for bundle in bundles:
        text = bundle.read_text(errors="ignore")
        if "mlflow.experimentKind" in text:
            known |= set(re.findall(r'CUSTOM_MODEL_DEVELOPMENT="([a-z_]+)"', text))
    assert known == {kind} == {"custom_model_development"}


def test_instance_turns_the_sign_up_dialog_off(pipeline_run, tmp_path, keep_tve_environment):
    from assets.commands import prepare_run_dir

    assert pipeline_run["instance"].nux_enabled is False
    # a run folder from before keeps its settings and gains the setting
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    before = dg.DagsterInstance.from_config(str(home))
    assert before.nux_enabled is True  # Dagster's default: the dialog shows
    after = prepare_run_dir(tmp_path)
    assert after.nux_enabled is False
    assert yaml.safe_load((home / "dagster.yaml").read_text())["telemetry"] == {"enabled": False}
