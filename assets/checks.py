"""Asset checks of one database: each stage's result looked at from outside, per partition.

- ``raw_tables``: ``validation`` (blocking), the dataset folder's validation report has no
  error.
- ``tve_targets``, one step for two checks (the tables are read once), sampled per run,
  not per window, so that they cost a fraction of the targets (``bench/bench_checks.py``):
  ``no_leakage`` (blocking, per window), in every window the rows are at
  its seed time ``t`` and are the seeds at ``t`` (own time ``<= t``; without one, first
  active by ``t + Δ``), a training window ends by the validation timestamp and a
  validation window by the test timestamp, and a sample of rows of the run's newest
  window recomputed in pandas from the rows in the next window ``(t, t+Δ]`` alone equals
  the file (one evaluation per window: Dagster writes each to the event log, ~50 ms on a
  loaded machine, so the former ``seed_times`` check is part of this one);
  ``coverage`` (warning, one evaluation per run: not partitioned), the share of inactive
  rows of every window, and no target without a value in every window of the run (a
  sparse path leaves a target empty in most windows: the data, not a fault; a column that
  real data fills only in later years warns, not blocks).
- ``pretrained_checkpoint``, per objective: ``finite_weights`` (blocking) and
  ``beats_trivial_predictor``, the task-vector loss on the validation windows below that
  of the mean normalised task vector of the training windows.
- ``metrics``, per cell: ``beats_trivial_baseline`` (warning), the model's metric better
  than the task's trivial baseline's (:mod:`tve_pipeline.baselines`) on val; test shown
  beside it, not judged (a shifted test period lets a constant win there).

A blocking check that fails stops what follows in the run that materialised its asset (the
step fails with the check's description), and the check result shows on the asset's Checks
tab either way. The measurements are :mod:`tve_pipeline.quality`'s; this module wires
them to partitions.

``tve_targets`` materialises a range of windows in one run, and Dagster records an
``AssetCheckResult`` of such a run without a partition (the windows' checks would stay
"planned"); so ``no_leakage`` emits one ``AssetCheckEvaluation`` per window, each pointing
at that window's materialisation. Dagster's SQLite event log writes each evaluation in
three connections, each synced; :func:`_event_log_held_open` keeps its files open
meanwhile, so that SQLite does not checkpoint and delete the WAL on every write
(``bench/bench_checks.py``: 92 evaluations 6.9 s -> 2.7 s on the shared disk).
"""

import contextlib
import os
import sqlite3

import dagster as dg
import pandas as pd
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.storage.event_log import SqliteEventLogStorage

from assets.database_assets import database_timedelta
from assets.partitions import cell_partitions, objective_partitions, parse_cell, window_partitions
from assets.registry import Database
from assets.training_assets import _cached_graph, _target_files, trivial_baseline_of
from resources import DeviceResource, RecipeResource, TVEStorage
from tve_pipeline import quality
from tve_pipeline.database import open_dataset, table_files
from tve_pipeline.recompute import read_tables
from tve_pipeline.task_vectors import pretraining_task_vectors
from tve_pipeline.traversal import TargetDef
from tve_pipeline.windows import window_seed_time

#: Checks whose failure warns instead of stopping anything.
WARN = dg.AssetCheckSeverity.WARN


def _result(verdict: quality.Verdict, severity=dg.AssetCheckSeverity.ERROR):
    return dg.AssetCheckResult(
        passed=verdict.passed,
        description=verdict.description,
        metadata=_metadata(verdict.metadata),
        severity=severity,
    )


def _metadata(values: dict) -> dict:
    """A verdict's numbers as the UI shows them: dicts, lists and None as JSON, the
    validation report as Markdown, numbers and text as they are."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (dict, list)) or value is None:
            out[key] = dg.MetadataValue.json(value)
        elif key == "report":
            out[key] = dg.MetadataValue.md(value)
        else:
            out[key] = value
    return out


def _materialisations(instance, key: dg.AssetKey, partitions: list[str]) -> dict:
    """The latest materialisation of each partition, as a check evaluation points at it: the
    storage ids first (no event read), then those events only (a window's carries its plots,
    ~170 kB to deserialise on rel-flights)."""
    from dagster._core.events import DagsterEventType

    ids = instance.event_log_storage.get_latest_storage_id_by_partition(
        key, DagsterEventType.ASSET_MATERIALIZATION, set(partitions)
    )
    records = (
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, storage_ids=list(ids.values())), limit=len(ids)
        ).records
        if ids
        else []
    )
    return {
        r.partition_key: AssetCheckEvaluationTargetMaterializationData(
            storage_id=r.storage_id, run_id=r.run_id, timestamp=r.timestamp
        )
        for r in records
    }


def _evaluation(spec: dg.AssetCheckSpec, partition: str, verdict, severity, target):
    return dg.AssetCheckEvaluation(
        asset_key=spec.asset_key,
        check_name=spec.name,
        passed=verdict.passed,
        metadata=_metadata(verdict.metadata),
        target_materialization_data=target,
        severity=severity,
        description=verdict.description,
        blocking=spec.blocking,
        partition=partition,
    )


def build_checks(db: Database, recipe) -> list[dg.AssetChecksDefinition]:
    """The asset checks of one database's assets (see the module docstring)."""
    return [
        _raw_tables_check(db),
        _targets_checks(db),
        *_checkpoint_checks(db, recipe),
        _metrics_check(db, recipe),
    ]


def _raw_tables_check(db: Database) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=db.key("raw_tables"),
        name="validation",
        blocking=True,
        description="The dataset folder's validation report (tve validate) has no error.",
    )
    def validation(raw_tables) -> dg.AssetCheckResult:
        return _result(
            quality.validation_verdict(raw_tables.dataset_dir, f"database {db.name!r} raw_tables")
        )

    return validation


def _targets_checks(db: Database) -> dg.AssetChecksDefinition:
    windows = window_partitions(db.name)
    upstream = [db.key("raw_tables"), db.key("traversal_graph")]
    key = db.key("tve_targets")
    specs = {
        "no_leakage": dg.AssetCheckSpec(
            "no_leakage",
            asset=key,
            additional_deps=upstream,
            blocking=True,
            partitions_def=windows,
            description=(
                "No task vector reads a row it should not: every window's rows are at its seed "
                "time t and are the seeds at t (own time <= t; an entity table without time: "
                "first fact row <= t + Δ); t + Δ is no later than the validation timestamp (a "
                "validation window's: the test timestamp); a sample per run, not per window "
                "(64 rows per entity table, in the run's newest window), recomputed in pandas "
                "from the rows in the next window (t, t+Δ] alone, equals the file (if not, "
                "every window of the run fails). The evaluation says how many rows and values "
                "were compared (rows_compared, run_values_compared)."
            ),
        ),
        "coverage": dg.AssetCheckSpec(  # not partitioned: one evaluation per run
            "coverage",
            asset=key,
            additional_deps=upstream,
            description=(
                "Judged per run, over the windows the run materialised (not per window: a "
                "target empty in one window is the data, and each recorded evaluation costs "
                "Dagster synced SQLite writes): warns when a target has no value in any window "
                "of the run (null counts of every target in 4 of the run's windows, then of the "
                "targets still without a value in the others: run_values_compared), or a "
                "window lacks a file or column; metadata: every window's share of inactive "
                "rows and rows. A target empty in some windows only is a sparse path, not a "
                "fault, and passes: the demo's flights>airports[origin_id]<flights[dest_id] "
                "reaches one flight of 2013, EWR->LGA, so it is empty in 44 of 46 windows."
            ),
        ),
    }

    @dg.multi_asset_check(
        specs=list(specs.values()),
        name=f"{db.group}_tve_targets_checks",
        ins={
            "tve_targets": dg.AssetIn(key=key),
            "raw_tables": dg.AssetIn(key=db.key("raw_tables")),
            "traversal_graph": dg.AssetIn(key=db.key("traversal_graph")),
        },
    )
    def tve_targets_checks(
        context: dg.AssetCheckExecutionContext,
        tve_targets,
        raw_tables,
        traversal_graph,
        recipe: RecipeResource,
    ):
        delta = database_timedelta(raw_tables, recipe.recipe())
        dataset = open_dataset(raw_tables.dataset_dir)
        schema = dataset.manifest.tables
        defs = {e: [TargetDef.from_dict(d) for d in ds] for e, ds in traversal_graph.items()}
        frames = _frames_of_all(dataset, schema, defs)
        instance = context.instance
        windows = sorted(tve_targets)
        where = f"{db.name} tve_targets"
        leakage = quality.leakage_verdicts(
            tve_targets,
            {w: window_seed_time(w) for w in windows},
            frames,
            schema,
            defs,
            delta,
            where,
            second_hop_window=recipe.recipe().targets.second_hop_delta(),
        )
        bounds = {
            w: quality.seed_time_verdict(
                tve_targets[w],
                window_seed_time(w),
                list(defs),
                delta,
                raw_tables.val_timestamp,
                f"{where} window {w}",
                test_timestamp=raw_tables.test_timestamp,
            )
            for w in windows
        }
        no_leakage = {
            w: quality.joined_verdict([bounds[w], leakage[w]], f"{where} window {w}")
            for w in windows
        }
        coverage = quality.coverage_run_verdict(tve_targets, defs, where)
        targets = _materialisations(instance, key, windows)
        leak, error = specs["no_leakage"], dg.AssetCheckSeverity.ERROR
        with _event_log_held_open(instance, context.op_execution_context.run_id):
            for window in windows:  # in window order, like the materialisations
                yield _evaluation(leak, window, no_leakage[window], error, targets.get(window))
            # the run's, pointing at its newest window's materialisation (recorded last)
            newest = targets.get(windows[-1]) if windows else None
            yield _evaluation(specs["coverage"], None, coverage, WARN, newest)
            for spec in specs.values():  # their events are written here too
                yield dg.Output(None, output_name=spec.get_python_identifier())

    return tve_targets_checks


@contextlib.contextmanager
def _event_log_held_open(instance, run_id: str):
    """Hold the run's and the index's SQLite event-log files open while a step writes many
    events: Dagster's SQLite storage opens and closes a connection per write (three per
    check evaluation), and SQLite's last connection to close a WAL database checkpoints it
    and deletes its WAL (two more syncs and four file operations per write). With one more
    connection open, each write costs its commit's sync only (bench/bench_checks.py). The
    events are the same and as durable; other event-log storages: nothing to do."""
    storage = instance.event_log_storage
    if not isinstance(storage, SqliteEventLogStorage):
        yield
        return
    with contextlib.ExitStack() as stack:
        for shard in ("index", run_id):
            path = storage.path_for_shard(shard)
            if os.path.exists(path):
                conn = stack.enter_context(contextlib.closing(sqlite3.connect(path, timeout=30)))
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # opens the WAL
        yield


def _frames_of_all(dataset, schema, defs):
    """The columns every entity table's definitions read, one frame per table."""
    frames = {}
    for entity, entity_defs in defs.items():
        for name, frame in read_tables(table_files(dataset), schema, entity_defs, entity).items():
            if name in frames:
                extra = [c for c in frame.columns if c not in frames[name].columns]
                frames[name] = frames[name].join(frame[extra]) if extra else frames[name]
            else:
                frames[name] = frame
    return frames


def _checkpoint_checks(db: Database, recipe) -> list[dg.AssetChecksDefinition]:
    objectives = objective_partitions(recipe)
    key = db.key("pretrained_checkpoint")

    @dg.asset_check(
        asset=key,
        name="finite_weights",
        blocking=True,
        partitions_def=objectives,
        description="Every weight of every entity table's backbone and head is finite.",
    )
    def finite_weights(context: dg.AssetCheckExecutionContext, pretrained_checkpoint):
        where = f"{db.name} pretrained_checkpoint {context.op_execution_context.partition_key}"
        return _result(quality.finite_weights_verdict(pretrained_checkpoint, where))

    @dg.asset_check(
        asset=key,
        name="beats_trivial_predictor",
        partitions_def=objectives,
        additional_ins={
            "raw_tables": dg.AssetIn(key=db.key("raw_tables")),
            "traversal_graph": dg.AssetIn(key=db.key("traversal_graph")),
            "temporal_windows": dg.AssetIn(key=db.key("temporal_windows")),
        },
        description=(
            "Task-vector loss on the validation windows below the trivial predictor's (the "
            "mean normalised task vector of the training seeds), both by pre-training's own "
            "loss on clean inputs."
        ),
    )
    def beats_trivial_predictor(
        context: dg.AssetCheckExecutionContext,
        pretrained_checkpoint,
        raw_tables,
        traversal_graph,
        temporal_windows,
        storage: TVEStorage,
        recipe: RecipeResource,
        device: DeviceResource,
    ):
        objective = context.op_execution_context.partition_key
        where = f"{db.name} pretrained_checkpoint {objective}"
        if "tve" not in objective.split("+"):
            return dg.AssetCheckResult(
                passed=True,
                description=f"{where}: objective {objective!r} predicts no task vector",
            )
        run_recipe = recipe.recipe()
        dataset = open_dataset(raw_tables.dataset_dir)
        # The window folders the checkpoint read. (A check's input does not take the
        # AllPartitionMapping that pretrained_checkpoint's does: Dagster maps the objective
        # key onto tve_targets' windows and fails.)
        folders = {
            w: storage.targets_file(db.name, w, "-").parent
            for w in temporal_windows["window"].dropna()
        }
        losses = {}
        for entity, result in pretrained_checkpoint["by_entity"].items():
            train_files, val_files = _target_files(folders, temporal_windows, entity, db.name)
            seeds = pretraining_task_vectors(
                train_files,
                dataset.manifest.tables[entity].pkey,
                {d["name"]: d["aggregation"] for d in traversal_graph[entity]},
                val=val_files,
                mode_encoding=run_recipe.targets.mode_encoding,
                mca_components=run_recipe.targets.mca_components,
            )
            if objective == "tve":  # its validation loss is the task-vector loss, recorded
                model = result["best_val_loss"]
            else:  # beside an auxiliary loss: the task-vector part, recomputed
                graph = _cached_graph(storage, raw_tables, dataset, run_recipe)
                model = quality.model_validation_loss(
                    graph, entity, result, seeds, run_recipe, device.torch_device()
                )
            losses[entity] = (model, quality.trivial_validation_loss(seeds, run_recipe, entity))
        return _result(quality.pretraining_verdict(losses, where), severity=WARN)  # not blocking

    return [finite_weights, beats_trivial_predictor]


def _metrics_check(db: Database, recipe) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=db.key("metrics"),
        name="beats_trivial_baseline",
        partitions_def=cell_partitions(db.tasks, recipe, db.name),
        additional_ins={"raw_tables": dg.AssetIn(key=db.key("raw_tables"))},
        description=(
            "The model's metric (the task's first: AUROC, NMAE) is better on val than the "
            "trivial baseline's, by RelBench's evaluator: the constant prediction (majority "
            "class; training mean, median or zero) best on val. Two values compared; test is "
            "shown beside them, not judged: a test period whose labels moved lets a constant "
            "win there (the demo's plane-delay: label median -2.0 in training, -4.2 on val, "
            "+9.0 on test), which says nothing about the model; results shows it per task."
        ),
    )
    def beats_trivial_baseline(
        context: dg.AssetCheckExecutionContext,
        metrics,
        raw_tables,
        recipe: RecipeResource,
        storage: TVEStorage,
    ):
        cell = context.op_execution_context.partition_key
        task_name, _, label_set, _ = parse_cell(cell)
        # written by the metrics asset, which had the task's tables loaded: a file read here
        trivial, metric, medians = trivial_baseline_of(storage, raw_tables, task_name, label_set)
        scores = {
            split: dict(zip(rows["metric"], rows["value"]))
            for split, rows in pd.DataFrame(metrics).groupby("split")
        }
        verdict = quality.baseline_verdict(
            scores, trivial, metric, f"{db.name} metrics {cell}", label_medians=medians
        )
        return _result(verdict, severity=WARN)

    return beats_trivial_baseline


def failed_check_lines(instance, checks, assets_by_name: dict) -> list[str]:
    """One line per check of a database that failed or warned in its latest evaluation of
    some partition (of the partitions its asset has now): severity, check, asset, how many
    partitions, which, and the first one's description. What ``tve run`` ends with."""
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecordStatus as Status,
    )

    storage = instance.event_log_storage
    lines = []
    specs = {spec.key: spec for c in checks for spec in c.check_specs}
    for key in sorted(specs, key=lambda k: (k.asset_key.path, k.name)):
        # a check's own partitions (none: one evaluation per run, like tve_targets' coverage)
        asset = assets_by_name.get(key.asset_key.path[-1])
        partitions_def = specs[key].partitions_def if asset is not None else None
        current = (
            None
            if partitions_def is None
            else set(partitions_def.get_partition_keys(dynamic_partitions_store=instance))
        )
        infos = storage.get_asset_check_partition_info([key])
        judged = [  # an unpartitioned check: its own latest (not a partition's from before)
            i
            for i in infos
            if (i.partition_key is None if current is None else i.partition_key in current)
        ]
        failed = sorted(
            (i.partition_key for i in judged if i.latest_execution_status == Status.FAILED),
            key=lambda p: p or "",
        )
        if not failed:
            continue
        history = storage.get_asset_check_execution_history(
            key, limit=1, partition_filter=PartitionKeyFilter(key=failed[0])
        )
        evaluation = (
            history[0].event.dagster_event.event_specific_data
            if history and history[0].event and history[0].event.dagster_event
            else None
        )
        severity = getattr(evaluation, "severity", dg.AssetCheckSeverity.ERROR)
        word = "warning" if severity == dg.AssetCheckSeverity.WARN else "FAILED"
        where = (
            f" in {len(failed)} of {len(judged)} partitions ({', '.join(failed[:3])}"
            f"{' ...' if len(failed) > 3 else ''})"
            if failed != [None]
            else ""
        )
        first = (getattr(evaluation, "description", None) or "").splitlines()
        lines.append(
            f"check {word}: {key.name} on {key.asset_key.to_user_string()}{where}: "
            f"{first[0] if first else '(no description)'}"
        )
    return lines
