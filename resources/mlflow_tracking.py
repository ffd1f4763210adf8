"""MLflow tracking, one MLflow run per (asset, partition).

``dagster-mlflow`` keeps one MLflow run per Dagster run and pins an older Dagster, so this
small resource opens its own run for every asset partition, tagged with the Dagster run
id, the asset and the partition key; the asset writes the MLflow run id into its output
metadata so that the UI links the two, as a URL into the MLflow UI (``make mlflow-ui``, or
the tracking server when the tracking URI is one). The embedded default is a SQLite store
in the run folder (MLflow 3 refuses plain file stores).

MLflow 3's UI opens an experiment in its GenAI view (traces) unless told otherwise: the
experiment is created with the experiment-kind tag of a model-training experiment, and
the run links carry ``workflowType=machine_learning``, which is what MLflow 3.17's web app
itself reads (the URL's switch wins over the one it remembers in the browser).
"""

import contextlib
import re
import tempfile
from pathlib import Path

import dagster as dg

#: MLflow 3's experiment-kind tag and its value for a (non-GenAI) model-training experiment.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
#: The query that opens a page of MLflow 3's UI in its model-training view.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"
#: What ``make mlflow-ui`` serves.
DEFAULT_UI_URL = "http://127.0.0.1:5000"


def mlflow_key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / `` and space: 'tve+mae' -> 'tve_mae'."""
    return re.sub(r"[^\w\-. /]", "_", name)


class MLflowRun:
    """A thin handle on one MLflow run (client API: no process-global active run)."""

    def __init__(self, client, run_id: str, url: str = "", experiment_url: str = ""):
        self.client, self.run_id = client, run_id
        self.url, self.experiment_url = url, experiment_url

    def log_params(self, params: dict) -> None:
        for key, value in params.items():
            self.client.log_param(self.run_id, mlflow_key(key), str(value)[:6000])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        for key, value in metrics.items():
            if value is not None:
                self.client.log_metric(self.run_id, mlflow_key(key), float(value), step=step or 0)

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
    def run(self, context: dg.AssetExecutionContext, name: str, database: str = ""):
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
        run = client.create_run(
            exp_id, tags=tags, run_name=" ".join(p for p in (name, database, str(partition)) if p)
        )
        handle = MLflowRun(
            client,
            run.info.run_id,
            self.run_url(exp_id, run.info.run_id),
            self.experiment_url(exp_id),
        )
        try:
            yield handle
        except BaseException:
            client.set_terminated(run.info.run_id, status="FAILED")
            raise
        client.set_terminated(run.info.run_id, status="FINISHED")
