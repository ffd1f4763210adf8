"""Where a deployment keeps its databases and caches, and which recipe it runs.

One *run folder* holds everything of a deployment: ``datasets/<database>/`` (RelBench 3
dataset folders; the folder name is the database partition key), ``storage/`` (asset
values), ``targets/`` (raw task vectors as parquet), ``results/`` (experiment summaries and
plots), ``cache/`` (materialised tensor frames), ``mlflow.db`` and ``dagster/``.
"""

import json
from pathlib import Path

import dagster as dg

from tve_pipeline.config import Recipe, make_recipe


class TVEStorage(dg.ConfigurableResource):
    run_dir: str

    @property
    def datasets_dir(self) -> Path:
        return Path(self.run_dir) / "datasets"

    def dataset_dir(self, database: str) -> Path:
        path = self.datasets_dir / database
        if not (path / "manifest.yaml").exists():
            known = sorted(
                p.name for p in self.datasets_dir.glob("*") if (p / "manifest.yaml").exists()
            )
            raise dg.Failure(
                description=f"unknown database {database!r}: no dataset folder {path}; "
                f"known databases: {', '.join(known) or '(none)'}"
            )
        return path

    def targets_file(self, database: str, window: str, entity_table: str) -> Path:
        """Raw task vectors of one window: ``targets/<database>/<window>/<entity>.parquet``."""
        return Path(self.run_dir) / "targets" / database / window / f"{entity_table}.parquet"

    def checkpoint_file(self, asset: str, partition: str, name: str) -> Path:
        """Resumable training state of one run: ``checkpoints/<asset>/<partition>/<name>.pt``."""
        safe = str(partition).replace("|", "/")
        name = name.replace("+", "_").replace(">", "-then-")
        return Path(self.run_dir) / "checkpoints" / asset / safe / f"{name}.pt"

    def lock_file(self, database: str, name: str) -> Path:
        """A lock that serialises the runs on one thing (an objective's pre-training run):
        ``locks/<database>/<name>.lock``, empty, kept (a lock file removed while another
        process waits on it would let a third in)."""
        name = name.replace("+", "_").replace(">", "-then-")
        return Path(self.run_dir) / "locks" / database / f"{name}.lock"

    def results_dir(self, database: str) -> Path:
        """An experiment's answer: ``results/<database>/`` (summary.csv, summary.md, plots)."""
        return Path(self.run_dir) / "results" / database

    def graph_cache(self, database: str, fingerprint: str) -> Path:
        return Path(self.run_dir) / "cache" / database / fingerprint[:16]


class RecipeResource(dg.ConfigurableResource):
    """The method's configuration: a named profile plus JSON overrides (see tve_pipeline.config)."""

    profile: str = "reference"
    overrides_json: str = "{}"

    def recipe(self) -> Recipe:
        try:
            return make_recipe(self.profile, json.loads(self.overrides_json))
        except ValueError as exc:
            raise dg.Failure(description=f"recipe resource: {exc}".splitlines()[0]) from exc
