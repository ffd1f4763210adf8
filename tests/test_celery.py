"""Past one machine: a backfill's steps on two Celery workers, the instance on PostgreSQL.

Real components: a PostgreSQL cluster of our own (Debian's binaries; initdb in a temporary
folder, as the ``postgres`` user when we are root, password authentication over TCP) holding
the instance of ``deploy/dagster.yaml``; Debian's Redis as the broker; two workers started with
``dagster-celery worker start -y deploy/celery.yaml``, each its own process loading the
project's code. A backfill of two target windows (one range run, as ``tve run`` and the UI
make it) and two experiment cells runs with ``TVE_EXECUTOR=celery``: each run is coordinated
in a process of its own (forked from this one, so that no run pays torch's imports again) and
every step is executed by a worker.

Checked against things the code under test does not write: PostgreSQL's own ``event_logs``
table (each asset partition materialised exactly once), the workers' names in the engine
events (each step ran in a worker, and the two workers ran steps at the same time), and the
target files and metric values of the same partitions run in one process (conftest's
``pipeline_run``, default executor).
"""

import glob
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from assets.executors import GPU_STEP_TAGS, executor_from_environment

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKERS = ("w1", "w2")
PG_PASSWORD = "tve-test-password"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _services_missing() -> str | None:
    if _postgres_bin() is None:
        return "PostgreSQL's initdb is absent (Debian: apt-get install postgresql)"
    if shutil.which("redis-server") is None:
        return "redis-server is absent (Debian: apt-get install redis-server)"
    return None


def _as_postgres(command: list) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the `postgres` user."""
    command = [str(c) for c in command]
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def postgres_server():
    """A PostgreSQL cluster of our own on a free port; yields deploy/dagster.yaml's variables."""
    bindir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="tve-pg-"))
    password_file = root / "password"
    password_file.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        for path in (root, password_file):
            shutil.chown(path, "postgres", "postgres")
    data, port = root / "data", _free_port()
    try:
        subprocess.run(
            _as_postgres(
                [bindir / "initdb", "-D", data, "-U", "tve", f"--pwfile={password_file}"]
                + ["--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -F"
        subprocess.run(
            _as_postgres([bindir / "pg_ctl", "-D", data, "-l", root / "log", "-w"])
            + ["-o", options, "start"],
            check=True,
            capture_output=True,
        )
        env = {**os.environ, "PGPASSWORD": PG_PASSWORD}
        subprocess.run(
            [bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tve", "dagster"],
            check=True,
            env=env,
        )
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(port),
            "DAGSTER_PG_DB": "dagster",
            "DAGSTER_PG_USER": "tve",
            "DAGSTER_PG_PASSWORD": PG_PASSWORD,
        }
    finally:
        subprocess.run(
            _as_postgres([bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def redis_server():
    """Redis on a free port, nothing written to disk; yields its URL."""
    import redis

    root, port = Path(tempfile.mkdtemp(prefix="tve-redis-")), _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root)]
        + ["--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(200):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _start_worker(name: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app"]
        + ["-y", str(ROOT / "deploy" / "celery.yaml"), "-n", name, "-i", "assets.definitions"]
        + ["--", "--concurrency", "1"],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _wait_for_workers(procs: list, logs: list[Path], timeout: float = 300) -> set[str]:
    """The workers' names once each says it is ready. Read from their logs: a Celery client in
    this process would leave broker connections that the forked run coordinators inherit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [re.search(r"(\S+@\S+) ready\.", log.read_text()) for log in logs]
        if all(ready):
            return {match.group(1) for match in ready}
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"a Celery worker exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"Celery workers not ready after {timeout:.0f}s")


@pytest.fixture(scope="module")
def celery_cluster(tmp_path_factory):
    """PostgreSQL, Redis, a run folder of the tiny database on that instance with its tables,
    schedule and graph materialised, and two Celery workers on it."""
    missing = _services_missing()
    if missing:
        pytest.skip(missing)
    saved = dict(os.environ)
    base = tmp_path_factory.mktemp("celery")
    try:
        with postgres_server() as pg, redis_server() as broker:
            os.environ.update(pg)
            os.environ.update(
                {"TVE_EXECUTOR": "celery", "TVE_CELERY_BROKER": broker, "TVE_THREADS": "1"}
            )
            os.environ.pop("TVE_EXECUTOR_CONFIG", None)
            cluster = _cluster_on(base, pg)
            try:
                yield cluster
            finally:
                for proc in cluster["procs"]:
                    _stop(proc)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _cluster_on(base: Path, pg: dict) -> dict:
    from assets.commands import Runner, create_tracking_store, prepare_run_dir, register_dataset
    from tve_pipeline.datasets import build_synthetic

    run_dir = base / "run"
    (run_dir / "dagster").mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "dagster.yaml", run_dir / "dagster" / "dagster.yaml")
    instance = prepare_run_dir(run_dir, parallel=2)  # keeps the PostgreSQL storage
    info = register_dataset(build_synthetic(base / "tiny"), run_dir, instance, profile="test")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    logs = [base / f"{name}.log" for name in WORKERS]
    workers = [_start_worker(n, env, log) for n, log in zip(WORKERS, logs)]
    try:
        # upstream of the backfill, in this process while the workers import the code
        runner = Runner("tiny", run_dir)
        runner.materialize(["raw_tables"], "tiny")
        runner.materialize(["temporal_windows", "traversal_graph"], "tiny")
        create_tracking_store(runner)  # as `tve experiment` does before its backfill
        names = _wait_for_workers(workers, logs)
        return {
            "runner": runner,
            "windows": info["windows"],
            "workers": names,
            "pg": pg,
            "procs": workers,
        }
    except BaseException:
        for proc in workers:
            _stop(proc)
        raise


def _coordinate(job, instance_ref, selection, tags) -> None:
    """One run, coordinated in a forked process as the daemon's run worker would: its steps go
    to the Celery workers."""
    try:
        instance = dg.DagsterInstance.from_ref(instance_ref)
        result = dg.execute_job(job, instance=instance, asset_selection=selection, tags=tags)
        code = 0 if result.success else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    os._exit(code)


def _launch_runs(runner, runs: list[tuple[list, dict]], timeout: float = 600) -> None:
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    job = ReconstructableRepository.for_module(
        "assets.definitions", "defs", working_directory=str(ROOT)
    ).get_reconstructable_job("__ASSET_JOB")
    fork = multiprocessing.get_context("fork")
    ref = runner.instance.get_ref()
    procs = [fork.Process(target=_coordinate, args=(job, ref, sel, tags)) for sel, tags in runs]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(1.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    for proc, (_, tags) in zip(procs, runs):
        assert proc.exitcode == 0, f"the run of {tags} failed (exit {proc.exitcode})"


def _pg_rows(pg: dict, sql: str) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(
        host=pg["DAGSTER_PG_HOST"],
        port=pg["DAGSTER_PG_PORT"],
        dbname=pg["DAGSTER_PG_DB"],
        user=pg["DAGSTER_PG_USER"],
        password=pg["DAGSTER_PG_PASSWORD"],
    )
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def _metrics_of(run_dir: Path, cell: str) -> pd.DataFrame:
    with open(run_dir / "storage" / "tiny" / "metrics" / cell, "rb") as f:
        return pickle.load(f).sort_values(["split", "metric"]).reset_index(drop=True)


def test_a_backfill_runs_on_two_celery_workers_once_each_with_in_process_results(
    celery_cluster, pipeline_run, monkeypatch
):
    from assets.partitions import SCRATCH, experiment_cells, parse_cell
    from assets.sensors import RANGE_END_TAG, RANGE_START_TAG

    runner = celery_cluster["runner"]
    run_dir, db = runner.run_dir, runner.db
    windows = celery_cluster["windows"][:2]
    cells = [c for c in experiment_cells(db.tasks, runner.recipe) if parse_cell(c)[1] == SCRATCH]
    cells = sorted({parse_cell(c)[0]: c for c in reversed(cells)}.values())  # one per task
    assert len(cells) == 2 and len(windows) == 2
    # the code location these runs reconstruct their job from is this run folder's
    monkeypatch.setattr("assets.definitions.defs", runner.defs)
    runs = [([db.key("tve_targets")], {RANGE_START_TAG: windows[0], RANGE_END_TAG: windows[1]})]
    runs += [
        ([db.key("finetuned_models"), db.key("metrics")], {"dagster/partition": c}) for c in cells
    ]
    t0 = time.perf_counter()
    _launch_runs(runner, runs)
    print(f"backfill of 2 windows and 2 cells on Celery: {time.perf_counter() - t0:.1f}s")

    # PostgreSQL's own table: every asset partition materialised exactly once
    rows = _pg_rows(
        celery_cluster["pg"],
        "SELECT asset_key, partition, count(*) FROM event_logs "
        "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' GROUP BY asset_key, partition",
    )
    counts = {(json.loads(key)[-1], partition): n for key, partition, n in rows}
    expected = {(a, None) for a in ("raw_tables", "temporal_windows", "traversal_graph")}
    expected |= {("tve_targets", w) for w in windows}
    expected |= {(a, c) for a in ("finetuned_models", "metrics") for c in cells}
    assert counts == dict.fromkeys(expected, 1)

    # every step of the backfill's runs ran in one of the two workers, and both worked at once
    backfill_runs = [
        r for r in runner.instance.get_runs() if set(r.asset_selection or ()) & {db.key("metrics")}
    ]
    backfill_runs += [
        r for r in runner.instance.get_runs() if r.tags.get(RANGE_START_TAG) == windows[0]
    ]
    assert len(backfill_runs) == 3 and all(r.is_success for r in backfill_runs)
    spans: dict[str, list[tuple[float, float]]] = {}
    steps = 0
    for run in backfill_runs:
        events = [e for e in runner.instance.all_logs(run.run_id) if e.dagster_event]
        worker_of = {
            e.dagster_event.step_key: e.dagster_event.event_specific_data.metadata[
                "Celery worker"
            ].value
            for e in events
            if e.dagster_event.event_type_value == "ENGINE_EVENT"
            and "Celery worker" in (e.dagster_event.event_specific_data.metadata or {})
        }
        start = {
            e.dagster_event.step_key: e.timestamp
            for e in events
            if e.dagster_event.event_type_value == "STEP_START"
        }
        for e in events:
            if e.dagster_event.event_type_value == "STEP_SUCCESS":
                step = e.dagster_event.step_key
                assert step in worker_of, f"{step} of run {run.run_id} did not run in a worker"
                spans.setdefault(worker_of[step], []).append((start[step], e.timestamp))
                steps += 1
    # the targets range and its checks; fine-tuning, metrics and the metrics check of each cell
    assert steps == 8
    assert set(spans) == celery_cluster["workers"]
    first, second = spans
    assert any(a0 < b1 and b0 < a1 for a0, a1 in spans[first] for b0, b1 in spans[second]), (
        f"the two workers never ran steps at the same time: {spans}"
    )

    # the same partitions run in one process, by the default executor, gave the same values
    reference = pipeline_run["run_dir"]
    for window in windows:
        files = sorted((run_dir / "targets" / "tiny" / window).glob("*.parquet"))
        assert files
        for path in files:
            # DuckDB's parallel aggregates may differ in the last bit from run to run (seen on
            # a fact->key<-fact mean), wherever they run: floats to 1e-12, the rest exactly
            pd.testing.assert_frame_equal(
                pd.read_parquet(path),
                pd.read_parquet(reference / path.relative_to(run_dir)),
                check_exact=False,
                rtol=1e-12,
                atol=0,
            )
    for cell in cells:
        metrics = _metrics_of(run_dir, cell)
        assert len(metrics) >= 2  # val and test
        pd.testing.assert_frame_equal(metrics, _metrics_of(reference, cell), check_exact=True)


def test_the_gpu_pool_is_written_before_a_run_claims_it(celery_cluster):
    """On PostgreSQL Dagster cannot rewrite a pool's default limit once its row exists (the
    failed INSERT aborts the transaction of the UPDATE that follows): every run that claims
    the pool would fail. `prepare_run_dir` writes the row itself, with the new limit."""
    import sqlalchemy

    from assets.commands import prepare_run_dir

    run_dir = celery_cluster["runner"].run_dir
    try:
        instance = prepare_run_dir(run_dir, parallel=3)
        storage = instance.event_log_storage
        (gpu,) = [p for p in storage.get_pool_limits() if p.name == "gpu"]
        assert (gpu.limit, gpu.from_default) == (3, True)
        # what a run's first claim would do after `--parallel` changed: Dagster's own write
        instance = prepare_run_dir(run_dir, parallel=2)
        with pytest.raises(sqlalchemy.exc.InternalError, match="InFailedSqlTransaction"):
            instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
    finally:
        instance = prepare_run_dir(run_dir, parallel=2)
    (gpu,) = [p for p in instance.event_log_storage.get_pool_limits() if p.name == "gpu"]
    assert (gpu.limit, gpu.from_default) == (2, True)


# ----------------------------------------------------------------- choosing the executor


def test_the_executor_is_in_process_unless_tve_executor_says_otherwise(tmp_path):
    assert executor_from_environment({}) is dg.in_process_executor
    assert executor_from_environment({"TVE_EXECUTOR": "multiprocess"}).name == "multiprocess"
    with pytest.raises(ValueError, match="TVE_EXECUTOR='ray' is not one of in_process"):
        executor_from_environment({"TVE_EXECUTOR": "ray"})
    with pytest.raises(ValueError, match="TVE_EXECUTOR=celery needs the broker: set TVE_CELERY"):
        executor_from_environment({"TVE_EXECUTOR": "celery"})
    celery = executor_from_environment(
        {"TVE_EXECUTOR": "celery", "TVE_CELERY_BROKER": "redis://127.0.0.1:1/0"}
    )
    assert celery.name == "celery"
    # a typo in the executor's config fails when the code location loads, naming the field
    bad = tmp_path / "k8s.yaml"
    bad.write_text(yaml.safe_dump({"execution": {"config": {"job_namspace": "tve"}}}))
    with pytest.raises(ValueError, match="bad k8s executor config: .*job_namspace"):
        executor_from_environment({"TVE_EXECUTOR": "k8s", "TVE_EXECUTOR_CONFIG": str(bad)})
    with pytest.raises(ValueError, match="TVE_EXECUTOR_CONFIG='/nowhere.yaml': no such file"):
        executor_from_environment({"TVE_EXECUTOR": "k8s", "TVE_EXECUTOR_CONFIG": "/nowhere.yaml"})


def test_tve_experiment_keeps_a_postgres_instance_config_when_it_sets_parallel():
    from assets.commands import instance_config

    deploy = (ROOT / "deploy" / "dagster.yaml").read_text()
    config = yaml.safe_load(instance_config(3, deploy))
    assert config["storage"] == yaml.safe_load(deploy)["storage"]
    assert config["concurrency"] == {
        "runs": {"max_concurrent_runs": 3},
        "pools": {"default_limit": 3},
    }


def test_the_kubernetes_configuration_loads_and_gives_the_training_steps_a_gpu(
    tmp_path, monkeypatch
):
    """deploy/k8s.yaml and the op tags, loaded as the Kubernetes executor would: the config
    validates, and dagster-k8s builds each step's Job with a GPU only where the step trains."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    from assets.definitions import build_definitions
    from tve_pipeline.datasets import build_synthetic

    config_file = ROOT / "deploy" / "k8s.yaml"
    monkeypatch.setenv("TVE_EXECUTOR", "k8s")
    monkeypatch.setenv("TVE_EXECUTOR_CONFIG", str(config_file))
    build_synthetic(tmp_path / "datasets" / "tiny")
    (tmp_path / "recipe.json").write_text(json.dumps({"profile": "test"}))
    defs = build_definitions(tmp_path)
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s"
    config = yaml.safe_load(config_file.read_text())["execution"]["config"]
    # the file's per-op example (rel-f1's pre-training on 4 GPUs), for this database's op
    override = config["per_step_k8s_config"]["rel_f1__pretrained_checkpoint"]
    per_op = {"tiny__pretrained_checkpoint": override}

    gpus = {}
    for asset in defs.resolve_asset_graph().assets_defs:
        if asset.is_external or not asset.is_executable or len(asset.keys) != 1:
            continue  # asset checks only (no asset of their own): no training step
        name = asset.key.path[-1]
        tags = asset.op.tags
        # what K8sStepHandler does for a step: executor config, then the step's op tags, then
        # the per-op override of the executor config
        step_config = (
            K8sContainerContext(
                namespace=config["job_namespace"],
                env_vars=config["env_vars"],
                env_secrets=config["env_secrets"],
                volumes=config["volumes"],
                volume_mounts=config["volume_mounts"],
                run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config["step_k8s_config"]),
            )
            .merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
            .merge(
                K8sContainerContext(
                    run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
                        per_op.get(asset.op.name, {})
                    )
                )
            )
        )
        k8s_job = construct_dagster_k8s_job(
            DagsterK8sJobConfig(job_image=config["job_image"]),
            args=["dagster", "api", "execute_step"],
            job_name=f"dagster-step-{name.replace('_', '-')}",
            user_defined_k8s_config=step_config.run_k8s_config,
        )
        (container,) = k8s_job.spec.template.spec.containers
        assert container.image == config["job_image"]
        assert container.resources.requests == {"cpu": "2", "memory": "8Gi"}
        assert [m.mount_path for m in container.volume_mounts] == ["/runs"]
        assert {e.name: e.value for e in container.env}["TVE_EXECUTOR"] == "k8s"
        assert [e.secret_ref.name for e in container.env_from] == ["tve-postgres"]
        assert [
            v.persistent_volume_claim.claim_name for v in k8s_job.spec.template.spec.volumes
        ] == ["tve-runs"]
        gpus[name] = (container.resources.limits or {}).get("nvidia.com/gpu")
    assert gpus == {
        "raw_tables": None,
        "temporal_windows": None,
        "traversal_graph": None,
        "tve_targets": None,
        "pretrained_checkpoint": "4",  # the op tag's 1, overridden per op
        "finetuned_models": "1",
        "probe_metrics": None,  # forward passes only: seconds on a CPU node
        "metrics": None,
        "results": None,
    }
    tagged = {
        a.key.path[-1]
        for a in defs.resolve_asset_graph().assets_defs
        if "dagster-k8s/config" in a.op.tags
    }
    assert tagged == {"pretrained_checkpoint", "finetuned_models"}
    assert (
        json.loads(
            defs.get_assets_def(dg.AssetKey(["tiny", "finetuned_models"])).op.tags[
                "dagster-k8s/config"
            ]
        )
        == (GPU_STEP_TAGS["dagster-k8s/config"])
    )
