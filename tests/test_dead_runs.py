"""A `tve` process killed mid-run leaves its run STARTED with its ``gpu`` pool slot claimed:
nothing ends such a run (it ran in that process, not under a launcher that Dagster's run
monitoring watches), and with a pool of one slot every later fine-tune waits for that slot
for ever (seen in the experiment: two `tve run`s spun in Dagster's step loop for 15 minutes).

The runs here are real Dagster runs of a pooled asset on a run folder's instance, in separate
processes; one is killed with SIGKILL while it holds the slot. The oracle is the kernel's
(which process is alive) and Dagster's own records (run status, pool claims).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from dagster._core.storage.dagster_run import DagsterRunStatus

from assets.commands import PROCESS_TAG, fail_runs_of_dead_processes, prepare_run_dir, this_process

pytestmark = pytest.mark.usefixtures("keep_tve_environment")

ROOT = Path(__file__).resolve().parents[1]

# a run of one asset in the gpu pool, tagged as Runner.materialize tags its runs; the asset
# writes `started` and then waits `hold` seconds (as a long fine-tune would)
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import dagster as dg
    from assets.commands import PROCESS_TAG, this_process

    started, hold = Path(sys.argv[1]), float(sys.argv[2])

    @dg.asset(pool="gpu")
    def fine_tune():
        started.write_text("")
        time.sleep(hold)

    dg.materialize([fine_tune], instance=dg.DagsterInstance.get(),
                   tags={PROCESS_TAG: this_process()})
    """
)


def _start(run_dir: Path, started: Path, hold: float) -> subprocess.Popen:
    env = {**os.environ, "DAGSTER_HOME": str(run_dir / "dagster"), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(started), str(hold)], env=env)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _queued_behind(storage, holder: str, process: subprocess.Popen, seconds: float):
    """The run id of a step waiting in the gpu pool behind ``holder`` (None: none in time)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        pending = storage.get_concurrency_info("gpu").pending_steps
        others = [p.run_id for p in pending if p.run_id != holder]
        if others:
            return others[0]
        time.sleep(0.5)
    return None


def test_a_killed_runs_slot_is_given_back_and_the_waiting_run_goes_on(tmp_path):
    instance = prepare_run_dir(tmp_path, parallel=1)  # the gpu pool: one slot
    storage = instance.event_log_storage

    killed = _start(tmp_path, tmp_path / "killed.started", hold=600)
    waiting = None
    try:
        assert _wait_for(tmp_path / "killed.started", killed, 120)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        [dead] = instance.get_runs()
        assert dead.status == DagsterRunStatus.STARTED  # what the kill left
        assert dead.tags[PROCESS_TAG].split(":")[1] == str(killed.pid)
        assert [s.run_id for s in storage.get_concurrency_info("gpu").claimed_slots] == [
            dead.run_id
        ]

        # a second run needs the slot: its step queues for it and its asset does not start ...
        waiting = _start(tmp_path, tmp_path / "waiting.started", hold=0)
        queued = _queued_behind(storage, dead.run_id, waiting, 180)
        assert queued is not None, "the second run never queued for the gpu slot"
        time.sleep(3)  # the slot is polled about every second: it would have started by now
        assert waiting.poll() is None and not (tmp_path / "waiting.started").exists()
        live = instance.get_run_by_id(queued)
        assert live.status == DagsterRunStatus.STARTED

        # ... until the dead run is failed and its slot given back; the live one is left alone
        assert fail_runs_of_dead_processes(instance) == [dead.run_id]
        assert instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.FAILURE
        assert waiting.wait(timeout=120) == 0
        assert (tmp_path / "waiting.started").exists()
        assert instance.get_run_by_id(live.run_id).status == DagsterRunStatus.SUCCESS
        assert storage.get_concurrency_info("gpu").claimed_slots == []
        assert fail_runs_of_dead_processes(instance) == []  # nothing left to fail
    finally:
        for process in (killed, waiting):
            if process is not None and process.poll() is None:
                process.kill()


def test_a_started_run_of_a_live_process_is_not_failed(tmp_path):
    instance = prepare_run_dir(tmp_path, parallel=1)
    running = _start(tmp_path, tmp_path / "running.started", hold=600)
    try:
        assert _wait_for(tmp_path / "running.started", running, 120)
        assert fail_runs_of_dead_processes(instance) == []
        [run] = instance.get_runs()
        assert run.status == DagsterRunStatus.STARTED
    finally:
        running.kill()
        running.wait()


def test_this_process_names_this_process():
    host, pid, start = this_process().split(":")
    assert int(pid) == os.getpid()
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    assert start == stat.rsplit(")", 1)[1].split()[19]  # field 22: start time (ticks)


def test_runs_of_tve_run_carry_their_process(pipeline_run):
    runs = [pipeline_run["instance"].get_run_by_id(r) for r in pipeline_run["run_ids"]]
    assert runs and {r.tags.get(PROCESS_TAG) for r in runs} == {this_process()}
