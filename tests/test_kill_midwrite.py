"""A materialisation killed mid-write loses nothing: the earlier materialisation of that
partition stays readable and byte-identical, other partitions are untouched, no half-written
file appears under a final name, and a re-run succeeds and removes the stale temporary files.

Each kind of writer is killed once, with SIGKILL, in a separate process running the real
``dagster asset materialize`` on a copy of the session's run folder: the raw task vectors
of one window (parquet), the resumable training checkpoint of ``pretrained_checkpoint``
(``torch.save``) and the pickled ``pretrained_checkpoint`` value of the IO manager. The
moment is exact: the process (tests/midwrite_worker.py) stops half-way through that write
and waits to be killed. The oracle is the run folder's own bytes before the kill.
"""

import hashlib
import json
import os
import pickle
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DB = "tiny"
CHECKPOINT_PICKLE = f"storage/{DB}/pretrained_checkpoint/tve"


class Worker:
    """tests/midwrite_worker.py: forks a ``dagster`` command per request, reports its end."""

    def __init__(self, run_dir: Path):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DAGSTER_HOME": str(run_dir / "dagster"),
            "TVE_RUN_DIR": str(run_dir),
            "TVE_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        self.run_dir = run_dir
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "midwrite_worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=run_dir,
            env=env,
            start_new_session=True,
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.count = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def _reply(self, timeout: float) -> dict:
        reply = self.replies.get(timeout=timeout)
        assert reply is not None, f"the worker ended (exit {self.proc.wait()})"
        return reply

    def materialize(self, select: str, partition: str, pause: dict | None = None) -> dict:
        """Run ``dagster asset materialize``; with ``pause``, SIGKILL it once it stopped
        mid-write. Returns how it ended and its log."""
        self.count += 1
        log = self.run_dir / f"child-{self.count}.log"
        marker = self.run_dir / f"paused-{self.count}"
        argv = ["asset", "materialize", "-m", "assets.definitions"]
        argv += ["--select", select, "--partition", partition]
        request = {"argv": argv, "log": str(log)}
        if pause:
            request["pause"] = {"nth": 1, **pause, "marker": str(marker)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = self._reply(300)["pid"]  # the worker's imports first
        deadline = time.monotonic() + 300
        while pause and not marker.exists():
            assert self.replies.empty(), f"ended before the write: {_tail(log)}"
            assert time.monotonic() < deadline, f"never reached the write: {_tail(log)}"
            time.sleep(0.05)
        if pause:
            os.kill(pid, signal.SIGKILL)
        end = self._reply(300)
        return {**end, "log": _tail(log)}

    def close(self) -> None:
        """Stop the worker and any child it still has (it has its own process group)."""
        self.proc.stdin.close()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else "(no log)"


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def final_files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file under a final name in the folders materialisations write."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in ("targets", "storage", "checkpoints")
        for p in sorted((run_dir / folder).rglob("*"))
        if p.is_file() and not is_temporary(p)
    }


def temporary_files(run_dir: Path) -> list[Path]:
    return sorted(
        p
        for folder in ("targets", "storage", "checkpoints", "results")
        for p in (run_dir / folder).rglob("*")
        if is_temporary(p)
    )


def latest_run_id(run_dir: Path, asset: str, partition: str) -> str:
    with dg.DagsterInstance.from_config(str(run_dir / "dagster")) as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(dg.AssetKey([DB, asset]), asset_partitions=[partition]), limit=1
        ).records
        return records[0].run_id


def release_killed_runs(run_dir: Path) -> list[str]:
    """Mark the runs that never ended canceled and free their pool slots; returns their ids."""
    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

    with dg.DagsterInstance.from_config(str(run_dir / "dagster")) as instance:
        runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
        for run in runs:
            instance.report_run_canceled(run, message="killed (SIGKILL) by the test")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        return [run.run_id for run in runs]


@pytest.fixture(scope="module")
def run_copy(pipeline_run, tmp_path_factory):
    """The session's run folder copied (its MLflow experiment's artifacts pointed at the copy),
    with a checkpoint every training step, and a worker started on it."""
    src = Path(pipeline_run["run_dir"])
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("mlartifacts"))
    if (run_dir / "mlflow.db").exists():
        with sqlite3.connect(run_dir / "mlflow.db") as mlflow_db:
            mlflow_db.execute(
                "UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?",
                ((run_dir / "mlartifacts").as_uri(), (src / "mlartifacts").as_uri()),
            )
        mlflow_db.close()
    settings = json.loads((run_dir / "recipe.json").read_text())
    settings["overrides"] = {**settings.get("overrides", {}), "checkpoint_every": 1}
    (run_dir / "recipe.json").write_text(json.dumps(settings))
    worker = Worker(run_dir)
    yield run_dir, worker
    worker.close()


def test_a_killed_materialisation_loses_nothing_and_a_rerun_cleans_up(run_copy):
    run_dir, worker = run_copy
    windows = sorted(p.name for p in (run_dir / "targets" / DB).iterdir())
    window = windows[len(windows) // 2]
    window_dir = run_dir / "targets" / DB / window
    targets_before = {p.name: pq.read_table(p) for p in window_dir.glob("*.parquet")}
    assert targets_before and all(t.num_rows for t in targets_before.values())
    before = final_files(run_dir)
    assert CHECKPOINT_PICKLE in before
    checkpoint_run = latest_run_id(run_dir, "pretrained_checkpoint", "tve")
    targets_run = latest_run_id(run_dir, "tve_targets", window)

    # 1. one window's targets, killed after a row group, before the parquet footer
    killed = worker.materialize(
        f"{DB}/tve_targets", window, {"writer": "parquet", "match": f"/{window}/"}
    )
    assert killed.get("signal") == signal.SIGKILL, killed
    assert final_files(run_dir) == before, "a final file changed or appeared"
    (torn,) = temporary_files(run_dir)
    assert torn.parent == window_dir
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(torn)  # it was killed mid-write: no footer yet
    for name, table in targets_before.items():
        assert pq.read_table(window_dir / name).equals(table)
    assert latest_run_id(run_dir, "tve_targets", window) == targets_run

    # 2. pre-training, killed while writing its second resumable checkpoint
    killed = worker.materialize(
        f"{DB}/pretrained_checkpoint",
        "tve",
        {"writer": "torch", "match": "/checkpoints/pretrained_checkpoint/", "nth": 2},
    )
    assert killed.get("signal") == signal.SIGKILL, killed
    (checkpoint,) = (run_dir / "checkpoints").rglob("*.pt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 1  # the first checkpoint, whole
    assert {k: v for k, v in final_files(run_dir).items() if "checkpoints" not in k} == before
    torn_checkpoint = [p for p in temporary_files(run_dir) if p.parent == checkpoint.parent]
    assert len(torn_checkpoint) == 1
    with pytest.raises(RuntimeError):
        torch.load(torn_checkpoint[0], map_location="cpu", weights_only=False)

    # 3. pre-training again, killed while pickling its value (the IO manager)
    killed = worker.materialize(
        f"{DB}/pretrained_checkpoint",
        "tve",
        {"writer": "pickle", "match": "/pretrained_checkpoint/"},
    )
    assert killed.get("signal") == signal.SIGKILL, killed
    assert final_files(run_dir) == before, "a final file changed or appeared"
    assert not torn_checkpoint[0].exists(), "the next run left the stale checkpoint temp"
    torn_pickle = [p for p in temporary_files(run_dir) if p.parent.name == "pretrained_checkpoint"]
    assert len(torn_pickle) == 1
    with pytest.raises((EOFError, pickle.UnpicklingError)):
        pickle.loads(torn_pickle[0].read_bytes())
    with open(run_dir / CHECKPOINT_PICKLE, "rb") as f:
        assert pickle.load(f)["created"] == checkpoint_run
    assert latest_run_id(run_dir, "pretrained_checkpoint", "tve") == checkpoint_run

    # 4. re-runs succeed, remove the stale temporary files and change only what they wrote.
    # Nothing ran the killed runs' ends: they stay STARTED and keep their `gpu` pool slots.
    # After a crash a user terminates them in the UI (which marks them canceled); the slots
    # of runs that are over are freed by the daemon (or `tve experiment`'s relaunch).
    assert len(release_killed_runs(run_dir)) == 3
    for select, partition in (
        (f"{DB}/tve_targets", window),
        (f"{DB}/pretrained_checkpoint", "tve"),
    ):
        done = worker.materialize(select, partition)
        assert done.get("exit") == 0, done["log"]
    assert temporary_files(run_dir) == []
    after = final_files(run_dir)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {CHECKPOINT_PICKLE, *(f"targets/{DB}/{window}/{n}" for n in targets_before)}
    for name, table in targets_before.items():  # DuckDB's float sums may differ in the last bit
        pd.testing.assert_frame_equal(
            pq.read_table(window_dir / name).to_pandas(), table.to_pandas(), rtol=1e-9
        )
    new_run = latest_run_id(run_dir, "pretrained_checkpoint", "tve")
    assert new_run != checkpoint_run
    with open(run_dir / CHECKPOINT_PICKLE, "rb") as f:
        assert pickle.load(f)["created"] == new_run
