"""The whole asset graph, materialised on the tiny synthetic database, checked from outside.

Every check compares with something the pipeline did not compute: labels and targets
recomputed with pandas from the parquet files, sklearn's metrics, the MLflow store read
back through its own client.
"""

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import mean_absolute_error, roc_auc_score

from tests.conftest import load_asset
from tve_pipeline.database import open_dataset
from tve_pipeline.evaluation import predict
from tve_pipeline.graph import graph_for, seed_tensors
from tve_pipeline.model import RDLModel
from tve_pipeline.sampling import TemporalNeighborSampler
from tve_pipeline.windows import window_key

DELTA = pd.Timedelta("30 days")


def _tables(run):
    db = run["dataset_dir"] / "db"
    return {n: pd.read_parquet(db / f"{n}.parquet") for n in ("customers", "products", "orders")}


def test_every_partition_materialised_and_no_other(pipeline_run):
    """The windows are exactly the training seed times (recomputed here from the manifest's
    validation timestamp and the first row's time) and the validation seed time (the
    validation timestamp, its window ending by the test timestamp), the task partitions
    exactly the folder's tasks, and after one `tve run` none of them is missing."""
    inst, runner = pipeline_run["instance"], pipeline_run["runner"]
    t = _tables(pipeline_run)
    ds = open_dataset(pipeline_run["dataset_dir"])
    first = min(t["customers"]["signup_time"].min(), t["orders"]["order_time"].min())
    seeds, ts = [], pd.Timestamp(ds.val_timestamp) - DELTA
    while ts >= first:
        seeds.append(ts)
        ts -= DELTA
    val = pd.Timestamp(ds.val_timestamp)
    assert val + DELTA <= pd.Timestamp(ds.test_timestamp)  # so it has a validation window
    expected = sorted(window_key(s) for s in [*seeds, val])
    cells = {
        f"{task}|{method}|1|s0"
        for task in ("customer-churn", "customer-spend")
        for method in ("scratch", "tve")
    }
    expected_keys = {
        "tve_targets": set(expected),
        "pretrained_checkpoint": {"tve"},
        "finetuned_models": cells,
        "metrics": cells,
        "probe_metrics": cells,
    }
    for asset in runner.assets:
        pdef = asset.partitions_def
        if pdef is None:
            assert inst.get_latest_materialization_event(asset.key) is not None, asset.key
            continue
        keys = set(pdef.get_partition_keys(dynamic_partitions_store=inst))
        assert keys == expected_keys[asset.key.path[-1]], asset.key
        assert inst.get_materialized_partitions(asset.key) == keys, asset.key


def test_a_second_run_does_nothing(pipeline_run, capsys):
    runner = pipeline_run["runner"]
    before = runner.step
    runner.run()
    assert runner.step == before


def test_metrics_are_relbench_task_metrics_for_every_cell(pipeline_run):
    """One row per (cell, split, metric): the tasks are the dataset folder's task folders, the
    metric names RelBench's own for each task, the methods scratch plus the recipe's
    objectives; every value a finite number in the metric's range."""
    m = pipeline_run["metrics"]
    dataset_dir = pipeline_run["dataset_dir"]
    ds = open_dataset(dataset_dir)
    tasks = sorted(p.name for p in (dataset_dir / "tasks").iterdir() if p.is_dir())
    recipe = pipeline_run["resources"]["recipe"].recipe()
    methods = {"scratch", *recipe.pretrain.objectives}
    assert sorted(set(m["task"])) == tasks
    for task in tasks:
        names = {fn.__name__ for fn in ds.load_task(task).metrics}
        rows = m[m["task"] == task]
        assert set(rows["metric"]) == names
        assert set(rows["method"]) == methods
        assert len(rows) == len(methods) * 2 * len(names)  # one per method, split, metric
    assert set(m["split"]) == {"val", "test"}
    assert np.isfinite(m["value"]).all()
    auroc = m.loc[m["metric"] == "roc_auc", "value"]
    assert ((auroc >= 0) & (auroc <= 1)).all() and (
        m.loc[m["metric"] == "nmae", "value"] >= 0
    ).all()


def _brute_labels(run, timestamps):
    """customer-churn / customer-spend labels by a plain loop over customers and seed times."""
    t = _tables(run)
    rows = []
    for ts in timestamps:
        for _, c in t["customers"].iterrows():
            if c["signup_time"] > ts:
                continue
            o = t["orders"][
                (t["orders"]["customer_id"] == c["customer_id"])
                & (t["orders"]["order_time"] > ts)
                & (t["orders"]["order_time"] <= ts + DELTA)
            ]
            rows.append(
                {
                    "timestamp": ts,
                    "customer_id": c["customer_id"],
                    "churn": int(len(o) == 0),
                    "spend": float(o["amount"].sum()),
                }
            )
    return pd.DataFrame(rows)


def _predict(run, task_name, table, method="scratch", seed=0):
    """Predictions of a stored fine-tuned model, re-run outside the metrics asset."""
    ds = open_dataset(run["dataset_dir"])
    model_state = load_asset(run, "finetuned_models", f"{task_name}|{method}|1|s{seed}")[
        "state_dict"
    ]
    recipe = run["resources"]["recipe"].recipe()
    summary = load_asset(run, "raw_tables")
    data, col_stats = graph_for(ds.get_db(), summary.column_types, recipe.backbone)
    model = RDLModel(data, col_stats, recipe.backbone, out_channels=1)
    model.load_state_dict(model_state)
    sampler = TemporalNeighborSampler(data, list(recipe.backbone.num_neighbors))
    nodes, times = seed_tensors(table["customer_id"], table["timestamp"])
    return predict(
        model, sampler, "customers", nodes, times, 64, torch.device("cpu"), seed=seed
    ).view(-1)


def _metric(run, task, method, split):
    m = run["metrics"]
    sel = m[
        (m["task"] == task)
        & (m["method"] == method)
        & (m["split"] == split)
        & (m["seed"] == 0)
        & (m["label_fraction"] == 1.0)
    ]
    assert len(sel) == 1
    return sel["value"].iloc[0]


def test_test_auroc_matches_sklearn_on_bruteforce_labels(pipeline_run):
    """The metrics asset's test score equals sklearn's on labels we recompute by hand."""
    run = pipeline_run
    test = (
        open_dataset(run["dataset_dir"]).load_task("customer-churn").get_table("test").df
    )  # masked
    labels = _brute_labels(run, sorted(test["timestamp"].unique()))
    merged = test.merge(labels, on=["timestamp", "customer_id"], how="left")
    assert merged["churn"].notna().all() and len(merged) == len(test)
    for method in ("scratch", "tve"):
        pred = torch.sigmoid(_predict(run, "customer-churn", test, method)).numpy()
        assert _metric(run, "customer-churn", method, "test") == pytest.approx(
            roc_auc_score(merged["churn"], pred), abs=1e-9
        )


def test_val_nmae_is_mae_over_bruteforce_train_std(pipeline_run):
    run = pipeline_run
    task = open_dataset(run["dataset_dir"]).load_task("customer-spend")
    train, val = task.get_table("train").df, task.get_table("val").df
    train_labels = _brute_labels(run, sorted(train["timestamp"].unique()))
    assert len(train_labels) == len(train)  # every existing customer, every training seed time
    std = train_labels["spend"].std(ddof=1)
    merged = val.drop(columns=[task.target_col]).merge(
        _brute_labels(run, sorted(val["timestamp"].unique())), on=["timestamp", "customer_id"]
    )
    pred = _predict(run, "customer-spend", val, "tve").numpy()
    # RelBench's RDL protocol: regression outputs clamped to the 2nd-98th percentile of the
    # training labels
    pred = np.clip(pred, *np.percentile(train_labels["spend"], [2, 98]))
    expected = mean_absolute_error(merged["spend"], pred) / std
    assert _metric(run, "customer-spend", "tve", "val") == pytest.approx(expected, rel=1e-9)


def test_tve_targets_match_pandas_oracle_and_never_pass_val(pipeline_run):
    run = pipeline_run
    t = _tables(run)
    graph = load_asset(run, "traversal_graph")["customers"]
    count_def = next(
        d
        for d in graph
        if len(d["path"]) == 1 and d["column"] is None and d["aggregation"] == "count"
    )
    sum_def = next(
        d
        for d in graph
        if len(d["path"]) == 1 and d["column"] == "amount" and d["aggregation"] == "sum"
    )
    ds = open_dataset(run["dataset_dir"])
    val, test = pd.Timestamp(ds.val_timestamp), pd.Timestamp(ds.test_timestamp)
    seen = 0
    for path in sorted((run["run_dir"] / "targets" / "tiny").iterdir()):
        frame = pd.read_parquet(path / "customers.parquet")
        # a training window ends by the validation timestamp, the validation window by the
        # test timestamp: no task vector reads a row of the test period
        is_val = frame["timestamp"] >= val
        assert (frame.loc[~is_val, "timestamp"] + DELTA <= val).all(), (
            "a training window reaches past the validation timestamp"
        )
        assert (frame.loc[is_val, "timestamp"] + DELTA <= test).all(), (
            "the validation window reaches past the test timestamp"
        )
        assert {window_key(ts) for ts in frame["timestamp"]} == {
            path.name
        }  # one seed time per window
        for _, row in frame.sample(min(len(frame), 40), random_state=0).iterrows():
            ts, cid = row["timestamp"], row["customer_id"]
            o = t["orders"][
                (t["orders"]["customer_id"] == cid)
                & (t["orders"]["order_time"] > ts)
                & (t["orders"]["order_time"] <= ts + DELTA)
            ]
            assert row[count_def["name"]] == len(o)
            assert row["inactive"] == int(len(o) == 0)
            if len(o):
                assert row[sum_def["name"]] == pytest.approx(o["amount"].sum())
            seen += 1
        # every customer that exists at t has a row, and no other customer
        for ts, g in frame.groupby("timestamp"):
            exists = set(t["customers"].loc[t["customers"]["signup_time"] <= ts, "customer_id"])
            assert set(g["customer_id"]) == exists
    assert seen > 50


def test_checkpoint_is_cpu_backbone_state(pipeline_run):
    ckpt = load_asset(pipeline_run, "pretrained_checkpoint", "tve")
    assert ckpt["objective"] == "tve"
    entry = ckpt["by_entity"]["customers"]
    assert entry["backbone"], "empty backbone"
    for k, v in entry["backbone"].items():
        assert k.split(".")[0] in {"encoder", "temporal_encoder", "gnn"}
        assert isinstance(v, torch.Tensor) and v.device.type == "cpu"
    # every training window is trained on; the validation window's seeds only score
    val = pd.Timestamp(open_dataset(pipeline_run["dataset_dir"]).val_timestamp)
    rows = {
        path.name: len(pd.read_parquet(path / "customers.parquet"))
        for path in (pipeline_run["run_dir"] / "targets" / "tiny").iterdir()
    }
    assert entry["n_val_seeds"] == rows.pop(window_key(val)) > 0
    assert entry["n_train_seeds"] == sum(rows.values()) > 0
    assert all("val_loss" in row for row in entry["history"])
    # the tve cell starts from it, the scratch cell does not
    tve = load_asset(pipeline_run, "finetuned_models", "customer-churn|tve|1|s0")["state_dict"]
    scratch = load_asset(pipeline_run, "finetuned_models", "customer-churn|scratch|1|s0")[
        "state_dict"
    ]
    key = next(k for k in entry["backbone"] if k.startswith("gnn.") and k.endswith("weight"))
    assert not torch.equal(tve[key], scratch[key])


def test_mlflow_runs_tagged_with_dagster_run_and_partition(pipeline_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_run['run_dir']}/mlflow.db")
    exp = client.get_experiment_by_name("tve-pipeline")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    partitions = {r.data.tags.get("dagster.partition") for r in runs}
    assert {"tve", "customer-churn|scratch|1|s0", "customer-spend|tve|1|s0"} <= partitions
    assert all(
        r.data.tags.get("dagster.run_id") and r.data.tags.get("tve.database") == "tiny"
        for r in runs
    )
    pre = [r for r in runs if r.data.tags.get("dagster.asset") == "pretrained_checkpoint"]
    assert pre and any(k.endswith("train_loss") for k in pre[0].data.metrics)
    assert any(a.path == "backbone.pt" for a in client.list_artifacts(pre[0].info.run_id))
    # artifacts live in the run folder, not in ./mlruns of whatever folder the process ran in
    assert pre[0].info.artifact_uri.startswith((pipeline_run["run_dir"] / "mlartifacts").as_uri())


def test_results_summarise_the_cells(pipeline_run):
    """The results asset's summary against the cells' own rows (fine-tuning's and the
    probe's), and its files."""
    summary = pipeline_run["summary"]
    rows = pd.concat([pipeline_run["metrics"], pipeline_run["probe_metrics"]], ignore_index=True)
    assert set(rows["readout"]) == set(summary["readout"]) == {"finetune", "probe"}
    # one seed and fraction: one row per (task, readout, method, split, metric)
    assert len(summary) == len(rows)
    for _, r in summary.iterrows():
        mine = rows[
            (rows["task"] == r["task"])
            & (rows["readout"] == r["readout"])
            & (rows["method"] == r["method"])
            & (rows["split"] == r["split"])
        ]
        assert r["mean"] == pytest.approx(mine["value"].item()) and r["n"] == 1
        if r["method"] == "tve":
            other = rows[
                (rows["task"] == r["task"])
                & (rows["readout"] == r["readout"])
                & (rows["method"] == "scratch")
                & (rows["split"] == r["split"])
            ]
            assert r["diff_vs_scratch"] == pytest.approx(
                mine["value"].item() - other["value"].item()
            )
    out = pipeline_run["run_dir"] / "results" / "tiny"
    assert {p.name for p in out.iterdir()} >= {
        "summary.csv",
        "summary.md",
        "cells.csv",
        "baselines.csv",
        "customer-churn.png",
        "customer-spend.png",
    }
    # label settings are text ("1", "top10"): without restricted cells the CSV looks numeric
    written = pd.read_csv(out / "summary.csv", dtype={"label_set": str})
    pd.testing.assert_frame_equal(written, summary.reset_index(drop=True), check_dtype=False)
    # each row beside its task's trivial baseline (tests/test_baselines.py holds the numbers
    # to hand computations): AUROC 0.5 for churn's majority class, a constant's NMAE for spend
    directions = {"customer-churn": "higher", "customer-spend": "lower"}
    assert summary["direction"].tolist() == summary["task"].map(directions).tolist()
    churn = summary[summary["task"] == "customer-churn"]
    assert (churn["trivial"] == 0.5).all() and set(churn["trivial_predictor"]) == {"majority"}
    spend = summary[summary["task"] == "customer-spend"]
    assert set(spend["trivial_predictor"]) <= {"global_zero", "global_mean", "global_median"}
    scores = pd.read_csv(out / "baselines.csv")
    assert set(scores["predictor"]) == {
        "global_zero",
        "global_mean",
        "global_median",
        "entity_mean",
        "entity_median",
        "random",
        "majority",
    }
    for _, r in spend.iterrows():
        chosen = scores[
            (scores["task"] == "customer-spend")
            & (scores["predictor"] == r["trivial_predictor"])
            & (scores["split"] == r["split"])
        ]
        assert r["trivial"] == pytest.approx(chosen["value"].item())
        assert r["beats_trivial"] == (r["mean"] < r["trivial"])


@pytest.mark.parametrize("method", ["scratch", "tve"])
def test_probe_cells_probe_their_checkpoint_and_report_both_readouts(pipeline_run, method):
    """A probe cell's rows are the library's probe re-run here on the stored checkpoint's
    backbone (scratch: none), seed and fraction; its metadata names the chosen strength."""
    import dagster as dg

    from tve_pipeline.probe import linear_probe

    run = pipeline_run
    cell = f"customer-churn|{method}|1|s0"
    stored = load_asset(run, "probe_metrics", cell)
    assert set(stored["readout"]) == {"probe"}
    assert set(run["metrics"]["readout"]) == {"finetune"}
    ds = open_dataset(run["dataset_dir"])
    recipe = run["resources"]["recipe"].recipe()
    summary = load_asset(run, "raw_tables")
    data, col_stats = graph_for(ds.get_db(), summary.column_types, recipe.backbone)
    task = ds.load_task("customer-churn")
    db = task.get_db(upto_test_timestamp=False)
    tables = {split: task.get_table(split, db=db) for split in ("train", "val", "test")}
    tables["test_labels"] = task.get_table("test", mask_input_cols=False, db=db)
    backbone = None
    if method != "scratch":
        backbone = load_asset(run, "pretrained_checkpoint", method)["by_entity"]["customers"][
            "backbone"
        ]
    again = linear_probe(
        data, col_stats, task, tables, recipe, torch.device("cpu"), seed=0, backbone=backbone
    )
    got = {(r.split, r.metric): r.value for r in stored.itertuples()}
    assert got == pytest.approx(
        {("val", k): v for k, v in again["val_metrics"].items()}
        | {("test", k): v for k, v in again["test_metrics"].items()}
    )
    event = (
        run["instance"]
        .fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(["tiny", "probe_metrics"]), asset_partitions=[cell]
            ),
            limit=1,
        )
        .records[0]
    )
    meta = event.asset_materialization.metadata
    assert meta["strength"].value == again["strength"]
    assert meta["regularisation"].text == "C"


def test_results_say_how_old_the_test_seeds_inputs_are(pipeline_run):
    """test_inputs.csv and the results' metadata against DuckDB over the dataset's parquet
    files: the last row at or before the test timestamp (the graph's cut, RelBench's
    ``get_db()``), the test seed times of RelBench's own test table, the ages in days."""
    import duckdb

    dataset = open_dataset(pipeline_run["dataset_dir"])
    cut = pd.Timestamp(dataset.manifest.test_timestamp)
    con = duckdb.connect()
    last = max(
        con.execute(
            f"SELECT max({t.time_col}) FROM '{dataset.db_dir}/{name}.parquet' "
            f"WHERE {t.time_col} <= ?",
            [cut.to_pydatetime()],
        ).fetchone()[0]
        for name, t in dataset.manifest.tables.items()
        if t.time_col
    )
    out = pipeline_run["run_dir"] / "results" / "tiny"
    ages = pd.read_csv(out / "test_inputs.csv", parse_dates=["inputs_until"]).set_index("task")
    assert set(ages.index) == {"customer-churn", "customer-spend"}
    for name, row in ages.iterrows():
        task = dataset.load_task(name)
        seeds = task.get_table("test", db=task.get_db(upto_test_timestamp=False)).df
        first = pd.Timestamp(seeds[task.time_col].min())
        assert row["inputs_until"] == pd.Timestamp(last)
        assert pd.Timestamp(row["first_test_seed"]) == first
        assert row["min_age_days"] == pytest.approx((first - pd.Timestamp(last)).days, abs=1)
        assert row["max_age_days"] >= row["min_age_days"] >= 0
    records = pipeline_run["instance"].fetch_materializations(
        dg.AssetKey(["tiny", "results"]), limit=1
    )
    shown = records.records[0].asset_materialization.metadata["test_inputs"].value
    assert "| customer-churn |" in shown and str(pd.Timestamp(last)) in shown
