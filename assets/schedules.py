"""Scheduled backfills: each database brought up to date at the ticks of its recipe's cron.

At each tick of ``schedule.cron`` (recipe; default daily at 03:00 UTC) the schedule
``<group>__scheduled_backfill``:

1. registers the database's new windows (training and validation seed times its data has
   now; as ``tve register`` and the growth sensor do);
2. computes every partition that is missing or stale (:class:`Outdated`: Dagster's own
   stale status, the data's fingerprint against the one ``raw_tables`` was computed from,
   and everything downstream of what will be recomputed; the same set ``tve run`` works
   through one run after another and ``tve experiment`` submits);
3. submits it as ONE asset backfill, ``RunRequest.for_asset_graph_subset``, which the
   backfill daemon of ``dg dev`` runs in dependency order (Runs > Backfills in the UI).

Dagster 1.13's scheduler daemon launches a schedule's run requests as runs of the
schedule's job (``dagster/_scheduler/scheduler.py``, ``_submit_run_request``); only the
sensor daemon hands a ``for_asset_graph_subset`` request to the backfill daemon
(``dagster/_daemon/sensor.py``, ``_submit_backfill_request``). So the schedule submits the
backfill itself, as that function does, and its tick reads "skipped" with the backfill's
id and size in the reason. A tick while an earlier backfill of the database is still
running submits nothing (the same cells would run twice).
"""

import time
from pathlib import Path

import dagster as dg

from assets.database_assets import pretraining_windows
from assets.partitions import PROBE, experiment_cells, parse_cell, windows_name
from assets.registry import Database, register_windows
from assets.sensors import DATA_VERSION_TAG
from resources import TVEStorage
from tve_pipeline.summary import summarise_database

DATABASE_TAG = "tve/database"
UPSTREAM = ("raw_tables", "temporal_windows", "traversal_graph")


def schedule_name(db: Database) -> str:
    return f"{db.group}__scheduled_backfill"


class Outdated:
    """What of one database's assets is missing or stale, from one look at the instance."""

    def __init__(self, instance: dg.DagsterInstance, asset_graph, db: Database, recipe):
        from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
        from dagster._core.definitions.data_version import CachingStaleStatusResolver
        from dagster._core.definitions.temporal_context import TemporalContext
        from dagster._time import get_current_datetime

        self.instance, self.db, self.recipe = instance, db, recipe
        view = AssetGraphView(
            temporal_context=TemporalContext(
                effective_dt=get_current_datetime(), last_event_id=None
            ),
            instance=instance,
            asset_graph=asset_graph,
        )
        self.resolver = CachingStaleStatusResolver(instance, asset_graph, loading_context=view)

    def to_run(self, name: str, partitions=(None,)) -> list:
        """The partitions of an asset that are missing, or stale for Dagster (a changed code
        version, or upstream data newer than what they were computed from)."""
        from dagster._core.definitions.data_version import StaleStatus

        key = self.db.key(name)
        return [p for p in partitions if self.resolver.get_status(key, p) != StaleStatus.FRESH]

    def data_changed(self, fingerprint: str) -> bool:
        """The dataset's fingerprint is not the one ``raw_tables`` was last computed from."""
        event = self.instance.get_latest_materialization_event(self.db.key("raw_tables"))
        stored = event.asset_materialization.tags.get(DATA_VERSION_TAG) if event else None
        return stored != fingerprint

    def unfinished(self, every_checkpoint: bool = False, every_cell: bool = False) -> set:
        """The (asset, partition) pairs of the experiment (checkpoints, cells, probes,
        results) that are missing or stale, with everything downstream of them (a re-run
        checkpoint re-runs its cells). ``every_checkpoint``: the targets change, so every
        checkpoint is re-trained; ``every_cell``: the tables change, so every cell (scratch
        ones too) is."""
        from dagster._core.definitions.events import AssetKeyPartitionKey

        db, recipe = self.db, self.recipe
        checkpoints = recipe.pretrain.checkpoint_keys()
        cells = experiment_cells(db.tasks, recipe, db.name)
        probes = experiment_cells(db.tasks, recipe, db.name, PROBE)
        objectives = set(
            checkpoints if every_checkpoint else self.to_run("pretrained_checkpoint", checkpoints)
        )

        def redo(name: str, keys: list[str]) -> set:
            if every_cell:
                return set(keys)
            return set(self.to_run(name, keys)) | {
                c for c in keys if parse_cell(c)[1] in objectives
            }

        tuned = redo("finetuned_models", cells)
        scored = set(cells) if every_cell else set(self.to_run("metrics", cells)) | tuned
        probed = redo("probe_metrics", probes)
        todo = {AssetKeyPartitionKey(db.key("pretrained_checkpoint"), o) for o in objectives}
        todo |= {AssetKeyPartitionKey(db.key("finetuned_models"), c) for c in tuned}
        todo |= {AssetKeyPartitionKey(db.key("metrics"), c) for c in scored}
        todo |= {AssetKeyPartitionKey(db.key("probe_metrics"), c) for c in probed}
        if todo or self.to_run("results"):
            todo.add(AssetKeyPartitionKey(db.key("results"), None))
        return todo

    def everything(self, fingerprint: str) -> set:
        """Every missing or stale partition of the database, its tables and windows too:
        what a re-read of the tables or a new window makes stale is in it before it runs."""
        from dagster._core.definitions.events import AssetKeyPartitionKey

        db = self.db
        todo = set()
        changed = self.data_changed(fingerprint)
        for name in UPSTREAM:  # each reads the ones before it
            if changed or self.to_run(name):
                changed = True
                todo.add(AssetKeyPartitionKey(db.key(name), None))
        windows = list(self.instance.get_dynamic_partitions(windows_name(db.name)))
        targets = windows if changed else self.to_run("tve_targets", windows)
        todo |= {AssetKeyPartitionKey(db.key("tve_targets"), w) for w in targets}
        return todo | self.unfinished(every_checkpoint=bool(targets), every_cell=changed)


def backfill_request(
    instance: dg.DagsterInstance, asset_graph, db: Database, recipe, dataset_dir: Path
) -> tuple[dg.RunRequest | None, list[str], set]:
    """One tick's work: register the database's new windows, then the backfill request of
    everything missing or stale (None when nothing is). Returns (request, new windows,
    the (asset, partition) pairs requested)."""
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset

    summary = summarise_database(dataset_dir)
    new = register_windows(instance, db.name, pretraining_windows(summary, recipe))
    todo = Outdated(instance, asset_graph, db, recipe).everything(summary.fingerprint)
    if not todo:
        return None, new, todo
    subset = AssetGraphSubset.from_asset_partition_set(todo, asset_graph)
    return dg.RunRequest.for_asset_graph_subset(subset, tags={DATABASE_TAG: db.name}), new, todo


def running_backfills(instance: dg.DagsterInstance, db: Database) -> list[str]:
    """The ids of backfills still running on any of the database's assets."""
    from dagster._core.execution.backfill import BulkActionStatus

    return [
        b.backfill_id
        for b in instance.get_backfills(status=BulkActionStatus.REQUESTED)
        if any(key.path[0] == db.group for key in (b.asset_selection or ()))
    ]


def submit_backfill(instance: dg.DagsterInstance, request: dg.RunRequest, title: str) -> str:
    """Submit a ``for_asset_graph_subset`` request as the sensor daemon does
    (``_submit_backfill_request``); returns the backfill's id."""
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    backfill = PartitionBackfill.from_asset_graph_subset(
        backfill_id=make_new_backfill_id(),
        dynamic_partitions_store=instance,
        backfill_timestamp=time.time(),
        asset_graph_subset=request.asset_graph_subset,
        tags=request.tags or {},
        title=title,
        description=None,
        run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id


def describe(todo: set) -> str:
    """``3 raw_tables..., 9 tve_targets, ...``: how many partitions of each asset."""
    counts: dict[str, int] = {}
    for pair in todo:
        counts[pair.asset_key.path[-1]] = counts.get(pair.asset_key.path[-1], 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def build_backfill_schedule(db: Database, recipe, job) -> dg.ScheduleDefinition:
    """The database's scheduled backfill (a schedule of ``job``, the database's tables job,
    which it never runs itself: it submits a backfill)."""
    cron = recipe.schedule.cron

    @dg.schedule(
        name=schedule_name(db),
        cron_schedule=cron,
        job=job,
        execution_timezone="UTC",
        default_status=(
            dg.DefaultScheduleStatus.RUNNING
            if recipe.schedule.enabled
            else dg.DefaultScheduleStatus.STOPPED
        ),
        description=f"At {cron} (cron, UTC; recipe `schedule.cron`): register {db.name}'s new "
        "windows and submit one backfill of everything missing or stale (Runs > Backfills).",
    )
    def scheduled_backfill(context: dg.ScheduleEvaluationContext, storage: TVEStorage):
        instance = context.instance
        busy = running_backfills(instance, db)
        if busy:
            return dg.SkipReason(f"backfill {busy[0]} of {db.name} is still running")
        request, new, todo = backfill_request(
            instance,
            context.repository_def.asset_graph,
            db,
            recipe,
            storage.datasets_dir / db.name,
        )
        registered = f"{len(new)} new windows; " if new else ""
        if request is None:
            return dg.SkipReason(f"{registered}{db.name}: nothing is missing or stale")
        when = context.scheduled_execution_time
        title = f"{db.name} scheduled backfill" + (f" {when:%Y-%m-%d %H:%M}" if when else "")
        backfill_id = submit_backfill(instance, request, title)
        return dg.SkipReason(
            f"{registered}submitted backfill {backfill_id} of {len(todo)} partitions "
            f"({describe(todo)}); see Runs > Backfills"
        )

    return scheduled_backfill
