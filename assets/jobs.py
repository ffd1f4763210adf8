"""Each database's jobs: one asset job per stage, so that every run has a job of the code
location.

A run made by ``tve run``/``tve demo``/``tve materialize`` (:class:`assets.commands.Runner`)
executes one of these jobs in its own process, so the UI finds it under the job's name
(Overview, Runs filtered by job) and can re-execute it from the code location. An asset job
needs one partitions definition for all its assets, so there is one job per stage, not one
per database:

- ``<group>__tables``: ``raw_tables``, ``temporal_windows``, ``traversal_graph``;
- ``<group>__refresh_targets`` (:func:`assets.sensors.build_targets_job`): the same and
  ``tve_targets``, partitioned by window (the growth sensor's job too);
- ``<group>__pretrain``: ``pretrained_checkpoint``, one partition per checkpoint;
- ``<group>__finetune``: ``finetuned_models`` and ``metrics``, one partition per cell;
- ``<group>__probe``: ``probe_metrics``, one partition per probe cell;
- ``<group>__summarise``: ``results`` (a job may not share the name of an asset's op,
  ``<group>__results``).
"""

import dagster as dg

from assets.registry import ADD_YOUR_OWN, Database
from assets.sensors import build_targets_job, targets_job_name

# stage -> (its assets, what one run of it does)
STAGES = {
    "tables": (
        ("raw_tables", "temporal_windows", "traversal_graph"),
        "read and validate the tables, derive the seed schedule and the traversal graph",
    ),
    "pretrain": (("pretrained_checkpoint",), "pre-train one checkpoint (a partition)"),
    "finetune": (
        ("finetuned_models", "metrics"),
        "fine-tune and evaluate one experiment cell (a partition)",
    ),
    "probe": (("probe_metrics",), "fit the linear probe of one cell (a partition)"),
    "summarise": (("results",), "summarise every cell's metrics"),
}


def stage_job_name(db: Database, stage: str) -> str:
    return f"{db.group}__{stage}"


def job_of_assets(db: Database, names: list[str]) -> str:
    """The job a run of these assets of ``db`` belongs to (they share one stage)."""
    if set(names) == {"tve_targets"}:
        return targets_job_name(db)
    for stage, (assets, _) in STAGES.items():
        if set(names) <= set(assets):
            return stage_job_name(db, stage)
    raise ValueError(f"assets {', '.join(names)} of {db.name!r} belong to no single stage job")


def build_stage_jobs(db: Database) -> dict:
    """The database's jobs (unresolved asset jobs) by stage: ``tables``, ``pretrain``,
    ``finetune``, ``probe``, ``summarise`` and ``refresh_targets``."""
    jobs = {
        stage: dg.define_asset_job(
            stage_job_name(db, stage),
            selection=[db.key(a) for a in assets],
            description=f"{db.name}: {what}. `tve run {db.name}` runs this stage of everything "
            f"missing or stale; `tve materialize` one partition. {ADD_YOUR_OWN}",
        )
        for stage, (assets, what) in STAGES.items()
    }
    return {**jobs, "refresh_targets": build_targets_job(db)}
