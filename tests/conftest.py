"""Shared fixtures: one tiny synthetic database pushed through the whole pipeline, once."""

import os

import pytest
import torch

from assets.commands import Runner, prepare_run_dir, register_dataset
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
    dataset_dir = build_synthetic(tmp_path_factory.mktemp("src") / "tiny")
    instance = prepare_run_dir(run_dir)
    register_dataset(dataset_dir, run_dir, instance, profile="test")
    runner = Runner("tiny", run_dir)
    summary = runner.run()
    yield {
        "run_dir": run_dir,
        "instance": runner.instance,
        "resources": runner.resources,
        "metrics": runner.cell_metrics(),
        "summary": summary,
        "dataset_dir": run_dir / "datasets" / "tiny",
        "runner": runner,
        "runs": runner.step,
    }
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def load_asset(run, asset: str, partition: str | None = None, database: str = "tiny"):
    """Read a materialised asset value back from the IO manager's files (not through Dagster)."""
    import pickle

    path = run["run_dir"] / "storage" / database / asset
    with open(path / partition if partition else path, "rb") as f:
        return pickle.load(f)


@pytest.fixture
def keep_tve_environment(monkeypatch):
    """`tve` points DAGSTER_HOME and TVE_RUN_DIR at its run folder; undo it after the test."""
    for name in ("DAGSTER_HOME", "TVE_RUN_DIR"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
