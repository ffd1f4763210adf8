"""MLflow tracking, one MLflow run per (asset, partition).

``dagster-mlflow`` keeps one MLflow run per Dagster run and pins an older Dagster, so this
small resource opens its own run for every asset partition, tagged with the Dagster run
id, the asset and the partition key; the asset writes the MLflow run id into its output
metadata so that the UI links the two. The embedded default is a SQLite store in the run
folder (MLflow 3 refuses plain file stores).
"""

import contextlib
import re
import tempfile
from pathlib import Path

import dagster as dg


def mlflow_key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / `` and space: 'tve+mae' -> 'tve_mae'."""
    return re.sub(r"[^\w\-. /]", "_", name)


class MLflowRun:
    """A thin handle on one MLflow run (client API: no process-global active run)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

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

    def experiment_id(self) -> str:
        """The experiment's id, created on first use. Runs that start at once on a new store
        (parallel runs, Celery workers) may all try to create it: the losers read the id."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(
                self.experiment, artifact_location=self.artifact_location or None
            )
        except MlflowException:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @contextlib.contextmanager
    def run(self, context: dg.AssetExecutionContext, name: str, database: str = ""):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        exp_id = self.experiment_id()
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
        handle = MLflowRun(client, run.info.run_id)
        try:
            yield handle
        except BaseException:
            client.set_terminated(run.info.run_id, status="FAILED")
            raise
        client.set_terminated(run.info.run_id, status="FINISHED")
