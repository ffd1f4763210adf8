"""MLflow as a user sees it: the experiment's view, run names and parameters, the kept
fine-tuning evaluation, the results summary as metrics (issue 25, item 7).

Real MLflow SQLite stores: a fresh one per unit test, and the tiny pipeline's
(``pipeline_run``) for what the assets log."""

import json
import math
import re
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from resources.mlflow_tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    MLflowTracking,
    experiment_link,
    mlflow_key,
    run_name,
    summary_metrics,
)
from tve_pipeline.results import summarise


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _bundle() -> str:
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(p.read_text(errors="ignore") for p in sorted(js.glob("*.js")))


# --------------------------------------------------------------------------- the experiment


def test_experiment_is_created_and_tagged_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = MLflowTracking(tracking_uri=uri, artifact_location=(tmp_path / "a").as_uri())
    exp_id = tracking.experiment_id()
    client = _client(uri)
    exp = client.get_experiment(exp_id)
    assert exp.name == "tve-pipeline"
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.experiment_id() == exp_id  # found, not created again
    # an experiment an older version created without the tag gains it
    other = MLflowTracking(tracking_uri=uri, experiment="older")
    old_id = client.create_experiment("older")
    assert other.experiment_id() == old_id
    assert client.get_experiment(old_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    link = f"http://127.0.0.1:5000/#/experiments/{exp_id}?workflowType=machine_learning"
    assert tracking.experiment_url(exp_id) == link
    # what `make mlflow-ui` prints: the link, or that there is no store (none created)
    assert experiment_link(uri) == link
    missing = tmp_path / "none" / "mlflow.db"
    assert "no MLflow store" in experiment_link(f"sqlite:///{missing}")
    assert not missing.parent.exists()


def test_mlflow_ui_takes_the_view_from_the_url_then_the_browser_then_genai():
    """What MLflow's installed web app reads to choose the view (the constants'
    comment in resources/mlflow_tracking.py): if these fragments move, re-check there."""
    text = _bundle()
    # the workflow types and the provider: the URL's workflowType, else localStorage
    # (key mlflow.workflowType, version 1), else GenAI
    assert 'e.GENAI="genai",e.MACHINE_LEARNING="machine_learning"' in text
    assert 'key:"mlflow.workflowType",version:1,initialValue:c' in text
    assert 'const n=e.get("workflowType");return n===l.GENAI||n===l.MACHINE_LEARNING?n:t' in text
    assert "const o=(e,t)=>`${e}_v${t}`" in text  # the storage key: mlflow.workflowType_v1
    # the experiment's kind is the view's when flag Z0 is on, the tag only otherwise...
    assert re.search(
        r"n\?m\(t\):\(e=>\{var t;return null===e\|\|void 0===e\|\|null===\(t=e\.find\(e=>"
        r'"mlflow\.experimentKind"===e\.key\)\)',
        text,
    )
    # ... and Z0 is always on
    flags = re.search(r"89511\(e,t,n\)\{\"use strict\";n\.d\(t,\{(.*?)\}\);(.*?)\}", text)
    assert flags and "Z0:()=>R" in flags.group(1)
    assert re.search(r"[,;]R=\(\)=>!0[,;]", flags.group(2))


# --------------------------------------------------------------------------- names


def test_keys_are_names_mlflow_accepts(tmp_path):
    """Names MLflow refuses (its own validator) become names a real store takes."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, _validate_metric_name

    refused = [
        "plane-delay/finetune/tve>mae@4000/top10/test/roc_auc/mean",
        "a|b",
        "tve+mae",
        "//x/../y/",
        "./.",
    ]
    for raw in refused:
        with pytest.raises(MlflowException):
            _validate_metric_name(raw)
    names = [*refused, "x" * 400, "x" * 401, "é/ü", "val_roc_auc", "curve/val_mae.lr0.001"]
    keys = [mlflow_key(raw) for raw in names]
    assert len(set(keys)) == len(keys) and all(len(k) <= MAX_ENTITY_KEY_LENGTH for k in keys)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = _client(uri)
    run_id = client.create_run(client.create_experiment("keys")).info.run_id
    for key in keys:
        client.log_metric(run_id, key, 1.0)
        client.log_param(run_id, key, "1")
    assert set(client.get_run(run_id).data.metrics) == set(keys)
    assert mlflow_key("tve>mae@4000|0.1") == "tve_mae_4000_0.1"
    assert mlflow_key("val_roc_auc") == "val_roc_auc"
    assert (
        run_name("plane-delay", "tve@4000", "0.1", "s3", "") == "plane-delay · tve@4000 · 0.1 · s3"
    )


def test_summary_metrics_name_every_row_and_statistic():
    """Two seeds of scratch and of a staged, budgeted objective: every finite mean and
    paired difference, under a name built here by hand."""
    rows = pd.DataFrame(
        [
            {
                "task": "plane-delay",
                "method": method,
                "label_fraction": 0.1,
                "label_set": "0.1",
                "seed": seed,
                "readout": "finetune",
                "split": "test",
                "metric": "roc_auc",
                "value": value,
            }
            for method, values in (("scratch", (0.60, 0.62)), ("tve>mae@4000", (0.65, 0.70)))
            for seed, value in enumerate(values)
        ]
    )
    metrics = summary_metrics(summarise(rows))
    head = "plane-delay/finetune"
    assert metrics == pytest.approx(
        {
            f"{head}/scratch/0.1/test/roc_auc/mean": 0.61,
            f"{head}/tve_mae_4000/0.1/test/roc_auc/mean": 0.675,
            f"{head}/tve_mae_4000/0.1/test/roc_auc/diff_vs_scratch": 0.065,
            # t(0.975, 1) = 12.706; the two differences 0.05 and 0.08: sd 0.0212, se 0.015
            f"{head}/tve_mae_4000/0.1/test/roc_auc/diff_ci_low": 0.065 - 12.7062 * 0.015,
            f"{head}/tve_mae_4000/0.1/test/roc_auc/diff_ci_high": 0.065 + 12.7062 * 0.015,
        },
        rel=1e-4,
    )
    # two methods whose names sanitise alike both keep a metric of their own
    tve = rows[rows["method"] != "scratch"]
    twins = pd.concat([rows, tve.assign(method=tve["method"].str.replace(">", "_"))])
    twin_metrics = summary_metrics(summarise(twins))
    assert len(twin_metrics) == 2 * len(metrics) - 1  # one scratch row
    assert sorted(twin_metrics.values()) == pytest.approx(
        sorted([*metrics.values(), *(v for k, v in metrics.items() if "/scratch/" not in k)])
    )


def test_run_logs_its_name_params_and_metrics_to_a_real_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = MLflowTracking(tracking_uri=uri, artifact_location=(tmp_path / "a").as_uri())

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["t|tve@8|0.5|s2"]))
    def cell(context: dg.AssetExecutionContext, mlflow: MLflowTracking):
        with mlflow.run(context, "t · tve@8 · 0.5 · s2", "db", params={"seed": 2}) as run:
            run.log_metrics({f"m{i}": i for i in range(1500)}, step=3)  # over one batch
            run.log_params({f"p{i}": i for i in range(150)})
        return run.run_id

    result = dg.materialize([cell], partition_key="t|tve@8|0.5|s2", resources={"mlflow": tracking})
    run = _client(uri).get_run(result.output_for_node("cell"))
    assert run.info.run_name == "t · tve@8 · 0.5 · s2" and run.info.status == "FINISHED"
    assert run.data.params["seed"] == "2" and run.data.params["database"] == "db"
    assert len(run.data.metrics) == 1500 and run.data.metrics["m1499"] == 1499
    assert len(run.data.params) == 152
    assert run.data.tags["dagster.partition"] == "t|tve@8|0.5|s2"


# --------------------------------------------------------------------------- the pipeline's runs


def _materialisations(pipeline_run, asset: str) -> list[dg.AssetMaterialization]:
    """The tiny database's materialisations of ``asset``, newest first."""
    key = dg.AssetKey(["tiny", asset])
    records = pipeline_run["instance"].fetch_materializations(key, limit=10_000)
    return [r.asset_materialization for r in records.records]


def test_cell_runs_carry_their_partition_key_as_params_and_name(pipeline_run):
    client = _client(f"sqlite:///{pipeline_run['run_dir']}/mlflow.db")
    stages = {"metrics": "", "finetuned_models": "fine-tune", "probe_metrics": "probe"}
    names = set()
    for asset, stage in stages.items():
        events = _materialisations(pipeline_run, asset)
        assert events, asset
        for m in events:
            task, method, label_set, seed = m.partition.split("|")
            run = client.get_run(m.metadata["mlflow_run_id"].text)
            params = run.data.params
            assert (params["task"], params["method"], params["label_set"]) == (
                task,
                method,
                label_set,
            )
            assert f"s{params['seed']}" == seed
            assert params["database"] == "tiny"
            assert params["readout"] == ("probe" if asset == "probe_metrics" else "finetune")
            assert params["objective"] == method.partition("@")[0]
            # the test profile has no budgets: a pre-trained method's is its run's end
            recipe = pipeline_run["runner"].recipe
            assert params.get("budget") == (
                None if method == "scratch" else str(recipe.pretrain.epochs * 3)
            )
            expected = " · ".join([task, method, label_set, seed] + ([stage] if stage else []))
            assert run.info.run_name == expected
            names.add(run.info.run_name)
    # a name per run: none of the three stages' runs of a cell share one
    assert len(names) == sum(len(_materialisations(pipeline_run, a)) for a in stages)


def test_finetune_run_reports_the_kept_evaluation(pipeline_run):
    client = _client(f"sqlite:///{pipeline_run['run_dir']}/mlflow.db")
    for m in _materialisations(pipeline_run, "finetuned_models"):
        run_id = m.metadata["mlflow_run_id"].text
        _check_kept(
            client, run_id, m.metadata, pipeline_run["runner"].load("finetuned_models", m.partition)
        )


def _check_kept(client, run_id: str, meta: dict, result: dict) -> None:
    """The run's val_<metric> is the metadata's val_<metric> (the kept evaluation); its curve
    holds every evaluation at its step, the last one last."""
    metric = meta["metric"].text
    data = client.get_run(run_id).data
    assert data.metrics[f"val_{metric}"] == pytest.approx(meta[f"val_{meta['metric'].text}"].value)
    assert data.metrics["best_step"] == meta["best_step"].value
    assert data.metrics["lr"] == pytest.approx(meta["lr"].value)
    assert data.params["lr"] == str(result["lr"])
    curve = sorted(client.get_metric_history(run_id, f"curve/val_{metric}"), key=lambda p: p.step)
    assert [p.step for p in curve] == [row["step"] for row in result["history"]]
    assert [p.value for p in curve] == pytest.approx(
        [row[f"val_{metric}"] for row in result["history"]]
    )
    assert data.metrics[f"curve/val_{metric}"] == pytest.approx(
        result["history"][-1][f"val_{metric}"]
    )
    (kept,) = client.get_metric_history(run_id, f"val_{metric}")
    assert kept.step == meta["best_step"].value
    assert kept.value == pytest.approx(meta[f"val_{meta['metric'].text}"].value)


def test_finetune_run_kept_evaluation_is_not_the_last(
    pipeline_run, tmp_path, keep_tve_environment, monkeypatch
):
    """A cell whose best evaluation is not its last (a high rate, four evaluations): the
    run's val_<metric> is the best one, not the last one the curve ends on."""
    from assets.commands import Runner

    run_dir = tmp_path / "run"
    shutil.copytree(
        pipeline_run["run_dir"], run_dir, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts")
    )
    settings = json.loads((run_dir / "recipe.json").read_text())
    settings.setdefault("overrides", {}).setdefault("finetune", {}).update(
        {"epochs": 4, "min_steps": 12, "lr_grid": [0.5]}
    )
    (run_dir / "recipe.json").write_text(json.dumps(settings))
    runner = Runner("tiny", run_dir)
    cell = "customer-churn|scratch|1|s0"
    result = runner.materialize(["finetuned_models"], cell, partition_key=cell)
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    tuned = runner.load("finetuned_models", cell)
    metric = meta["metric"].text
    history = [row[f"val_{metric}"] for row in tuned["history"]]
    assert len(history) == 4
    kept_value = meta[f"val_{meta['metric'].text}"].value
    assert not math.isclose(history[-1], kept_value), "pick a case where they differ"
    client = _client(runner.resources["mlflow"].tracking_uri)
    run_id = meta["mlflow_run_id"].text
    _check_kept(client, run_id, meta, tuned)
    assert client.get_run(run_id).data.metrics[f"val_{metric}"] != pytest.approx(history[-1])


def test_results_run_logs_the_summary_as_metrics(pipeline_run):
    client = _client(f"sqlite:///{pipeline_run['run_dir']}/mlflow.db")
    event = _materialisations(pipeline_run, "results")[0]
    run = client.get_run(event.metadata["mlflow_run_id"].text)
    assert run.info.run_name == "results · tiny"
    summary = pipeline_run["summary"]
    expected = {}
    for _, row in summary.iterrows():
        # the test database's names need no sanitising
        head = "/".join(
            str(row[k]) for k in ("task", "readout", "method", "label_set", "split", "metric")
        )
        for statistic in ("mean", "diff_vs_scratch", "diff_ci_low", "diff_ci_high"):
            if pd.notna(row[statistic]):
                expected[f"{head}/{statistic}"] = row[statistic]
    assert any(k.endswith("/diff_vs_scratch") for k in expected)
    assert run.data.metrics == pytest.approx(expected)


# --------------------------------------------------------------------------- in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def mlflow_ui(pipeline_run, tmp_path):
    """``make mlflow-ui`` over the pipeline's store, on a free port; yields its URL."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).parent / "mlflow"), "ui", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{pipeline_run['run_dir']}/mlflow.db"]
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "mlflow-ui.log", "wb") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.time() + 180
            while True:
                try:
                    if requests.get(f"{url}/health", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(
                        f"mlflow ui did not start: {(tmp_path / 'mlflow-ui.log').read_text()}"
                    )
                time.sleep(1)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (`make system-packages`)")
def test_links_open_the_runs_by_name_and_a_bare_link_opens_genai(pipeline_run, mlflow_ui):
    """In a fresh browser, the experiment link the project writes opens the model-training
    view, the runs listed by their names; the experiment's bare page (what MLflow's own
    experiment list links to) opens the GenAI overview although the experiment is tagged
    model training: why the links carry workflowType (if this changes, MLflow follows
    the tag, and the README's advice can go)."""
    from playwright.sync_api import expect, sync_playwright

    client = _client(f"sqlite:///{pipeline_run['run_dir']}/mlflow.db")
    exp_id = client.get_experiment_by_name("tve-pipeline").experiment_id
    names = [
        client.get_run(m.metadata["mlflow_run_id"].text).info.run_name
        for m in _materialisations(pipeline_run, "metrics")
    ]
    link = MLflowTracking(tracking_uri="", ui_url=mlflow_ui).experiment_url(exp_id)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        try:
            for url, model_training in ((link, True), (link.partition("?")[0], False)):
                context = browser.new_context(viewport={"width": 1600, "height": 1000})
                page = context.new_page()
                page.goto(url)
                if model_training:
                    expect(page.get_by_text("Run Name", exact=True)).to_be_visible(timeout=90_000)
                    for name in names:
                        expect(page.get_by_text(name, exact=True)).to_have_count(1)
                else:
                    expect(page.get_by_text("Token Usage").first).to_be_visible(timeout=90_000)
                    expect(page.get_by_text(names[0], exact=True)).to_have_count(0)
                context.close()
        finally:
            browser.close()
