"""What an experiment cost: CPU-hours per stage and per pre-training budget (not a test).

    .venv/bin/python bench/experiment_cost.py /work/runs/rel-f1 rel-f1 [--threads 1]

Reads the run folder's Dagster instance: every successful run of the database's assets,
its wall time (start to end) and the asset it materialised; the cells run one thread each
under ``TVE_THREADS=1`` (``--threads`` says how many), so CPU-hours = wall-hours x threads
(an upper bound on a shared machine: waiting for the CPU counts). For pre-training it
also reads each checkpoint's per-evaluation timing (``timing``: the seconds of the steps
its run trained) and prints, per objective and budget, the steps trained, the seconds and
the seeds per second, the cumulative CPU-hours of the run up to that budget, and the kept
checkpoint's validation loss (mean over entity tables) and step.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path


def stage_hours(runner, threads: int) -> dict[str, dict]:
    """asset -> {"runs", "hours"} over the successful runs of the database's assets.

    A run's assets are those it materialised (its materialisation events), so that runs of
    an ephemeral job (``dg.materialize``, which records no asset selection) count too."""
    from dagster import AssetRecordsFilter, DagsterRunStatus, RunsFilter

    from assets.definitions import ASSET_NAMES

    assets_of: dict[str, set] = defaultdict(set)
    for name in ASSET_NAMES:
        key = runner.db.key(name)
        cursor = None
        while True:
            page = runner.instance.fetch_materializations(
                AssetRecordsFilter(asset_key=key), limit=1000, cursor=cursor
            )
            for record in page.records:
                assets_of[record.run_id].add(name)
            if not page.has_more:
                break
            cursor = page.cursor
    out: dict[str, dict] = defaultdict(lambda: {"runs": 0, "hours": 0.0})
    run_ids = list(assets_of)
    for i in range(0, len(run_ids), 500):
        records = runner.instance.get_run_records(
            filters=RunsFilter(run_ids=run_ids[i : i + 500], statuses=[DagsterRunStatus.SUCCESS])
        )
        for record in records:
            if record.start_time is None or record.end_time is None:
                continue
            stage = "+".join(sorted(assets_of[record.dagster_run.run_id]))
            out[stage]["runs"] += 1
            out[stage]["hours"] += (record.end_time - record.start_time) / 3600 * threads
    return dict(out)


def budget_rows(runner) -> list[dict]:
    """Per checkpoint key: steps trained by its own run, seconds, seeds/s, and the
    objective's cumulative hours up to the budget (its own and the shorter budgets' runs)."""
    from tve_pipeline.config import parse_budget_key

    recipe = runner.recipe.pretrain
    done = runner.instance.get_materialized_partitions(runner.db.key("pretrained_checkpoint"))
    # objective -> (entity, step) -> seconds: a budget's checkpoint repeats the timing of
    # the shorter budgets its run passed, so each evaluation is counted once
    timing: dict[str, dict[tuple[str, int], float]] = defaultdict(dict)
    rows = []
    for key in recipe.checkpoint_keys():
        if key not in done:
            continue
        checkpoint = runner.load("pretrained_checkpoint", key)
        objective, budget = parse_budget_key(key)
        for entity, result in checkpoint["by_entity"].items():
            for row in result.get("timing") or []:
                timing[objective][(entity, row["step"])] = row["seconds"]
        losses = [r["best_val_loss"] for r in checkpoint["by_entity"].values()]
        losses = [v for v in losses if v is not None]
        rows.append(
            {
                "key": key,
                "objective": objective,
                "budget": budget,
                "val_loss": sum(losses) / len(losses) if losses else float("nan"),
                "best_step": max(r.get("best_step", -1) for r in checkpoint["by_entity"].values()),
            }
        )
    for row in rows:
        steps = timing[row["objective"]]
        upto = [k for k in steps if row["budget"] is None or k[1] <= row["budget"]]
        seconds = sum(steps[k] for k in upto)
        trained = len(upto) * recipe.steps_per_epoch  # summed over entity tables
        row.update(
            steps_timed=trained,
            hours=seconds / 3600,
            seeds_per_s=trained * recipe.batch_size / seconds if seconds else float("nan"),
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("database")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from assets.commands import Runner

    runner = Runner(args.database, args.run_dir)
    stages = stage_hours(runner, args.threads)
    print(f"{args.database}: CPU-hours per stage (successful runs, {args.threads} thread(s) each)")
    for stage, v in sorted(stages.items()):
        print(f"  {stage:<40} {v['runs']:>5} runs {v['hours']:>8.2f} h")
    print(
        f"  {'total':<40} {sum(v['runs'] for v in stages.values()):>5} runs "
        f"{sum(v['hours'] for v in stages.values()):>8.2f} h"
    )
    print("\npre-training per budget (steps timed: the evaluations whose timing was kept)")
    print(
        f"  {'checkpoint':<16} {'steps':>6} {'CPU-h to here':>14} {'seeds/s':>9} "
        f"{'val loss':>9} {'kept step':>9}"
    )
    for row in budget_rows(runner):
        print(
            f"  {row['key']:<16} {row['steps_timed']:>6} {row['hours']:>14.2f} "
            f"{row['seeds_per_s']:>9.1f} {row['val_loss']:>9.4f} {row['best_step']:>9}"
        )


if __name__ == "__main__":
    main()
