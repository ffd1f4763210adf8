"""Shared fixtures: one tiny synthetic database pushed through the whole pipeline, once."""

import json
import os

import dagster as dg
import pytest
import torch

from assets.commands import prepare_run_dir, register_dataset, run_pipeline
from assets.definitions import build_resources
from tve_pipeline.datasets import build_synthetic

# On a shared 2-core machine torch's intra-op threads make the suite's many tiny ops 10-20x
# slower (a 2-thread scatter_add_ on a few hundred rows: ~50 ms; 1 thread: < 1 ms).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """Materialise every asset of the tiny database in a persistent run folder.

    A real Dagster instance (DAGSTER_HOME in the run folder), real IO manager, real MLflow
    SQLite store; the recipe is the 'test' profile (tiny budgets, same method).
    """
    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "TVE_RUN_DIR")}
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "recipe.json").write_text(json.dumps({"profile": "test", "overrides": {}}))
    dataset_dir = build_synthetic(tmp_path_factory.mktemp("src") / "tiny")
    instance = prepare_run_dir(run_dir)
    register_dataset(dataset_dir, run_dir, instance)
    resources = build_resources(run_dir)
    frame = run_pipeline("tiny", run_dir, instance, resources)
    yield {"run_dir": run_dir, "instance": instance, "resources": resources, "metrics": frame,
           "dataset_dir": run_dir / "datasets" / "tiny"}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def load_asset(run, asset: str, partition: str | dg.MultiPartitionKey):
    """Read a materialised asset value back through the IO manager's files."""
    import pickle

    key = partition if isinstance(partition, str) else str(partition)
    path = run["run_dir"] / "storage" / asset / key.replace("|", "/")
    with open(path, "rb") as f:
        return pickle.load(f)
