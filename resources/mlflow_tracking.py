"""MLflow tracking, one MLflow run per (asset, partition).

``dagster-mlflow`` keeps one MLflow run per Dagster run and pins an older Dagster, so this
small resource opens its own run for every asset partition, tagged with the Dagster run
id, the asset and the partition key; the asset writes the MLflow run id into its output
metadata so that the UI links the two, as a URL into the MLflow UI (``make mlflow-ui``, or
the tracking server when the tracking URI is one). The embedded default is a SQLite store
in the run folder (MLflow 3 refuses plain file stores).

What MLflow 3.17's web app reads to choose an experiment's view (GenAI overview or model
training) is not the experiment: it is the ``workflowType`` query parameter of the page's
URL, else the browser's localStorage key ``mlflow.workflowType_v1`` (written when the
user flips the sidebar's switch), else ``genai`` (:data:`MODEL_TRAINING_VIEW` cites the
code). The experiment's ``mlflow.experimentKind`` tag only names its kind (no "choose the
experiment type" dialog) and is read for the view only behind a feature flag that the
open-source build hard-codes off. So every link this project writes (the Dagster metadata
``mlflow_run``/``mlflow_experiment``, what ``tve`` prints) carries
``?workflowType=machine_learning``, and the experiment is created with the
model-training kind all the same.

Every run is named for what it is (``plane-delay · tve@4000 · 0.1 · s3``, see
:func:`run_name`) and carries its cell as parameters, so that MLflow's compare and
group-by work on them; the ``results`` run logs the summary as metrics
(:func:`summary_metrics`).
"""

import contextlib
import hashlib
import math
import posixpath
import re
import tempfile
import time
from pathlib import Path

import dagster as dg

#: MLflow 3's experiment-kind tag and its value for a (non-GenAI) model-training experiment,
#: as MLflow 3.17.2's web app spells them (site-packages/mlflow/server/js/build/static/js/
#: main.c2f5f8d4.js:2, ``CUSTOM_MODEL_DEVELOPMENT="custom_model_development"``; the Python
#: side writes the GenAI value the same way, mlflow/demo/generators/traces.py:329).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
#: The query that opens a page of MLflow 3's UI in its model-training view. In MLflow
#: 3.17.2 (mlflow/server/js/build/static/js/, minified, no source maps):
#: - main.c2f5f8d4.js:2, module 7975 (the WorkflowTypeProvider): the view is the URL's
#:   ``workflowType`` (``genai`` or ``machine_learning``), else localStorage
#:   ``mlflow.workflowType`` version 1 (key ``mlflow.workflowType_v1``, module 51653),
#:   default ``genai``;
#: - main.c2f5f8d4.js:24: the experiment's kind is that view
#:   (``m=e=>e===a.g$.GENAI?GENAI_DEVELOPMENT:CUSTOM_MODEL_DEVELOPMENT``) whenever feature
#:   flag ``Z0`` is on, else the experiment's ``mlflow.experimentKind`` tag; and
#:   main.c2f5f8d4.js:2, module 89511: ``Z0:()=>R`` with ``R=()=>!0`` (always on);
#: - experimentPage.20d52159.chunk.js:1: an experiment's bare page (``/experiments/<id>``,
#:   what the experiment list links to) redirects to the Overview/Traces tab for a GenAI
#:   kind, to Runs otherwise.
#: (mlflow/mlflow#24498 reports the switch never follows the tag; its fix, #24493, was
#: closed unmerged.)
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"
#: What ``make mlflow-ui`` serves.
DEFAULT_UI_URL = "http://127.0.0.1:5000"
#: MLflow's own limits (mlflow/utils/validation.py:72,78): a parameter value and a key.
MAX_PARAM_VALUE, MAX_KEY = 6000, 250
#: Between the parts of a run name.
NAME_SEPARATOR = " · "


def mlflow_key(name: str) -> str:
    """A name MLflow takes as a metric or parameter key: MLflow 3.17 allows letters, digits,
    ``_ - . / :`` and space (mlflow/utils/validation.py:321-329; ``:`` not on Windows, so not
    here), a name that is its own normalised path (validation.py:340, no ``//``, ``..``,
    leading or trailing ``/``) and 250 characters (validation.py:78,423). Other characters
    become ``_`` ('tve+mae' -> 'tve_mae', 'tve@4000' -> 'tve_4000', 'tve>mae' -> 'tve_mae'),
    empty path parts ``_``; a name still too long keeps its head and a hash of the whole."""
    key = re.sub(r"[^\w\-. /]", "_", name)
    parts = ["_" if p in ("", ".", "..") else p for p in key.split("/")]
    key = "/".join(parts)
    if len(key) > MAX_KEY:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        key = f"{key[: MAX_KEY - 11]}_{digest}"
    assert posixpath.normpath(key) == key, key
    return key


def run_name(*parts) -> str:
    """A run's name in MLflow's tables and chart legends, what tells it apart first (legends
    cut long names): ``run_name("plane-delay", "tve@4000", "0.1", "s3")`` ->
    ``plane-delay · tve@4000 · 0.1 · s3``; empty parts left out."""
    return NAME_SEPARATOR.join(str(p) for p in parts if p not in (None, ""))


#: What tells a summary row apart (tve_pipeline.results.KEYS), in its metrics' names.
SUMMARY_KEYS = ("task", "readout", "method", "label_set", "split", "metric")


def summary_metric_name(row, statistic: str) -> str:
    """The metric of one summary row's statistic: the row's keys as a path,
    ``task/readout/method/label_set/split/metric/statistic``
    (``plane-delay/finetune/tve_4000/0.1/test/roc_auc/mean``); MLflow's charts group a
    run's metrics by the part before the first ``/``, here the task."""
    return mlflow_key(
        "/".join(str(row[k]).replace("/", "_") for k in SUMMARY_KEYS) + "/" + statistic
    )


#: The summary's statistics the ``results`` run logs: the mean over seeds and the paired
#: difference to scratch (with its 95% interval).
SUMMARY_STATISTICS = ("mean", "diff_vs_scratch", "diff_ci_low", "diff_ci_high")


def summary_metrics(summary) -> dict[str, float]:
    """The ``results`` summary (tve_pipeline.results.summarise) as MLflow metrics: one per
    row and statistic of :data:`SUMMARY_STATISTICS` that is a number (a scratch row has no
    difference, one seed no interval). Of two rows whose names sanitise alike (``a+b`` and
    ``a_b``), the second's name ends in a hash of the row."""
    metrics: dict[str, float] = {}
    for _, row in summary.iterrows():
        for statistic in SUMMARY_STATISTICS:
            value = row.get(statistic)
            if value is None or not math.isfinite(float(value)):
                continue
            name = summary_metric_name(row, statistic)
            if name in metrics:  # two rows that sanitise alike: the second one's own hash
                identity = "|".join(str(row[k]) for k in SUMMARY_KEYS)
                digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
                name = mlflow_key(f"{name}_{digest}")
            metrics[name] = float(value)
    return metrics


class MLflowRun:
    """A thin handle on one MLflow run (client API: no process-global active run)."""

    def __init__(self, client, run_id: str, url: str = "", experiment_url: str = ""):
        self.client, self.run_id = client, run_id
        self.url, self.experiment_url = url, experiment_url

    def log_params(self, params: dict) -> None:
        """``params`` as text, in one request (MLflow refuses a parameter a second value)."""
        from mlflow.entities import Param

        batch = [Param(mlflow_key(k), str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """``metrics`` at ``step`` (0 when None), in one request; None values left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(mlflow_key(key), float(value), now, step or 0)
            for key, value in metrics.items()
            if value is not None
        ]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_dict(self, obj, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def log_artifacts(self, folder) -> None:
        self.client.log_artifacts(self.run_id, str(folder))

    def log_torch(self, state, name: str) -> None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            torch.save(state, path)
            self.client.log_artifact(self.run_id, str(path))


class MLflowTracking(dg.ConfigurableResource):
    tracking_uri: str
    experiment: str = "tve-pipeline"
    # Where a new experiment keeps its artifacts (models, plots); MLflow's default is
    # ./mlruns under whatever folder the process runs in.
    artifact_location: str = ""
    # The MLflow UI the run links point at: the tracking server when the tracking URI is
    # one, otherwise what `make mlflow-ui` serves.
    ui_url: str = ""

    def ui(self) -> str:
        if self.ui_url:
            return self.ui_url.rstrip("/")
        if self.tracking_uri.startswith(("http://", "https://")):
            return self.tracking_uri.rstrip("/")
        return DEFAULT_UI_URL

    def experiment_url(self, experiment_id: str) -> str:
        """The experiment's runs in the MLflow UI, in its model-training view."""
        return f"{self.ui()}/#/experiments/{experiment_id}{MODEL_TRAINING_VIEW}"

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """The run's page in the MLflow UI, in its model-training view."""
        return f"{self.ui()}/#/experiments/{experiment_id}/runs/{run_id}{MODEL_TRAINING_VIEW}"

    def experiment_id(self, client=None) -> str:
        """The experiment's id, created as a model-training experiment when missing (and
        tagged so when an older version created it). Runs that start at once on a new store
        (parallel runs, Celery workers) may all try to create it: the losers read the id."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = client or MlflowClient(tracking_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return client.create_experiment(
                    self.experiment,
                    artifact_location=self.artifact_location or None,
                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING},
                )
            except MlflowException:
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id

    @contextlib.contextmanager
    def run(
        self,
        context: dg.AssetExecutionContext,
        name: str,
        database: str = "",
        params: dict | None = None,
    ):
        """A new MLflow run named ``name`` (:func:`run_name`), tagged with the Dagster run,
        asset and partition, with ``params`` (and ``database``) logged as its parameters."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        exp_id = self.experiment_id(client)
        partition = context.partition_key if context.has_partition_key else ""
        tags = {
            "dagster.run_id": context.run_id,
            "dagster.asset": context.asset_key.path[-1],
            "dagster.asset_key": context.asset_key.to_user_string(),
            "dagster.partition": str(partition),
            "tve.database": database,
        }
        run = client.create_run(exp_id, tags=tags, run_name=name)
        handle = MLflowRun(
            client,
            run.info.run_id,
            self.run_url(exp_id, run.info.run_id),
            self.experiment_url(exp_id),
        )
        try:
            handle.log_params({**({"database": database} if database else {}), **(params or {})})
            yield handle
        except BaseException:
            client.set_terminated(run.info.run_id, status="FAILED")
            raise
        client.set_terminated(run.info.run_id, status="FINISHED")


def experiment_link(tracking_uri: str, experiment: str = "tve-pipeline", ui_url: str = "") -> str:
    """What to open in the MLflow UI: the experiment in its model-training view, when the
    store has it (read only: a SQLite store that is not there is not created)."""
    tracking = MLflowTracking(tracking_uri=tracking_uri, experiment=experiment, ui_url=ui_url)
    path = tracking_uri.removeprefix("sqlite:///")
    if tracking_uri.startswith("sqlite:///") and not Path(path).exists():
        return f"{tracking.ui()} (no MLflow store at {path} yet: `make demo` writes one)"
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        return f"{tracking.ui()} (no experiment {experiment!r} yet)"
    return tracking.experiment_url(exp.experiment_id)
