"""Shared fixtures: one tiny synthetic database pushed through the whole pipeline, once."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
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
        "probe_metrics": runner.cell_metrics("probe_metrics"),
        "summary": summary,
        "dataset_dir": run_dir / "datasets" / "tiny",
        "runner": runner,
        "runs": runner.step,
        # the runs of the `tve run` itself (later tests add runs of their own)
        "run_ids": {r.run_id for r in runner.instance.get_runs()},
    }
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def serve(run_dir: Path, log_dir: Path):
    """A real ``dagster-webserver -w workspace.yaml`` over a run folder (its instance and its
    databases); yields its base URL, stops its process group at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DAGSTER_HOME": str(run_dir / "dagster"), "TVE_RUN_DIR": str(run_dir)}
    root = Path(__file__).resolve().parents[1]
    server = Path(sys.executable).parent / "dagster-webserver"
    cmd = [str(server), "-w", str(root / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / "webserver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.time() + 300
            while True:
                try:
                    if requests.get(f"{url}/server_info", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"dagster-webserver exited: {log_path.read_text()[-3000:]}")
                if time.time() > deadline:
                    raise RuntimeError("dagster-webserver did not come up in 300 s")
                time.sleep(1)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def webserver(pipeline_run, tmp_path_factory):
    """The real ``dagster-webserver`` over the pipeline's run folder; yields its base URL.

    Started once for the session (its code location takes a minute to load on a busy
    machine) and stopped with its process group at the end.
    """
    with serve(pipeline_run["run_dir"], tmp_path_factory.mktemp("webserver")) as url:
        yield url


@pytest.fixture(scope="session")
def fresh_webserver(tmp_path_factory):
    """The web server over a new, empty run folder, as a fresh clone's ``make ui`` starts it
    (the instance ``tve`` writes, no database): the code location gives it rel-flights.
    Yields (URL, run folder)."""
    from assets.commands import instance_config

    run_dir = tmp_path_factory.mktemp("fresh")
    (run_dir / "dagster").mkdir()
    (run_dir / "dagster" / "dagster.yaml").write_text(instance_config())
    with serve(run_dir, tmp_path_factory.mktemp("fresh_webserver")) as url:
        yield url, run_dir


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
