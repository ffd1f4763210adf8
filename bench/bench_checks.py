"""What the asset checks cost beside the assets they check (issue 25: at most a quarter).

On a copy of a run folder that ``tve demo`` (or ``tve run``) finished, so the folder itself
is left as it is:

- materialises ``tve_targets`` over all the database's windows (or the first ``--windows``)
  in one run with its checks, ``--repeat`` times, and prints each run's step seconds: the
  asset's step, the checks' step, and their ratio, then the medians;
- prints the same ratio for every other checked asset from the run records already in the
  folder (``pretrained_checkpoint``, ``metrics``, ``raw_tables``: one step of the asset and
  one of each check per run).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_checks.py /tmp/demo-x \\
        [--database rel-flights] [--repeat 3] [--windows 1]

Step seconds are Dagster's own (step start to step end, the run's event log), inputs
loaded and outputs written included. "Writing events" is the span from a step's first
materialisation or check evaluation to its end: Dagster writing them to the instance's
SQLite event log; it means that only when a step yields its events after its work, as
both steps do since issue 25 (before, the checks yielded them window by window). A check
evaluation is three connections to the WAL-mode shards (run insert, index insert, index
update), each synced on commit, and the last connection's close checkpoints the shard and
deletes its WAL: ~60-75 ms per evaluation on this shared disk, ~4 ms on /dev/shm; ~30 ms
while the step holds the shards open (assets/checks.py ``_event_log_held_open``, session
11).
"""

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import dagster as dg


def step_seconds(instance, run_id: str) -> dict[str, float]:
    return {
        s.step_key: s.end_time - s.start_time
        for s in instance.get_run_step_stats(run_id)
        if s.start_time and s.end_time
    }


def recording_seconds(instance, run_id: str, step: str, event_type: str) -> tuple[float, int]:
    """Seconds from a step's first event of ``event_type`` to its step success (Dagster
    writing those events to the instance's event log: no_leakage's one per window and
    coverage's one per run), and their count."""
    times = [
        e.timestamp
        for e in instance.all_logs(run_id)
        if e.step_key == step and e.dagster_event and e.dagster_event.event_type_value == event_type
    ]
    end = max(e.timestamp for e in instance.all_logs(run_id) if e.step_key == step)
    return (end - min(times), len(times)) if times else (0.0, 0)


def bench_targets(run_dir: Path, database: str, repeat: int, windows: int | None) -> None:
    from assets.commands import Runner
    from assets.partitions import windows_name
    from assets.sensors import RANGE_END_TAG, RANGE_START_TAG

    runner = Runner(database, run_dir)
    order = list(runner.instance.get_dynamic_partitions(windows_name(database)))
    order = order[:windows] if windows else order
    print(f"tve_targets of {database}: {len(order)} windows ({order[0]} .. {order[-1]}), one run")
    rows = []
    for i in range(repeat):
        result = dg.materialize(
            [*runner.assets, *runner.checks],
            selection=[runner.by_name["tve_targets"]],
            instance=runner.instance,
            resources=runner.resources,
            tags={RANGE_START_TAG: order[0], RANGE_END_TAG: order[-1]},
            raise_on_error=True,
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        )
        steps = step_seconds(runner.instance, result.run_id)
        asset_step = next(k for k in steps if k.endswith("__tve_targets"))
        check_step = next(k for k in steps if k.endswith("_tve_targets_checks"))
        asset, check = steps[asset_step], steps[check_step]
        asset_rec, n_mat = recording_seconds(
            runner.instance, result.run_id, asset_step, "ASSET_MATERIALIZATION"
        )
        check_rec, n_eval = recording_seconds(
            runner.instance, result.run_id, check_step, "ASSET_CHECK_EVALUATION"
        )
        rows.append((asset, check, check / asset, asset_rec, check_rec))
        print(
            f"  run {i + 1}: tve_targets {asset:.1f}s, checks {check:.1f}s, ratio "
            f"{check / asset:.2f}; of which writing events: {n_mat} materialisations "
            f"{asset_rec:.1f}s, {n_eval} check evaluations {check_rec:.1f}s; without them: "
            f"ratio {(check - check_rec) / (asset - asset_rec):.2f}"
        )
    med = [statistics.median(r[i] for r in rows) for i in range(5)]
    print(
        f"  median of {repeat}: tve_targets {med[0]:.1f}s, checks {med[1]:.1f}s, ratio "
        f"{med[2]:.2f} (goal <= 0.25); events written: asset {med[3]:.1f}s, checks "
        f"{med[4]:.1f}s; ratio without them "
        f"{statistics.median((r[1] - r[4]) / (r[0] - r[3]) for r in rows):.2f}"
    )


def bench_cells(run_dir: Path, database: str, asset_name: str = "metrics") -> None:
    """Re-materialises every materialised partition of ``asset_name`` with its checks, one run
    each, twice (the second finds the checks' caches filled), and prints asset vs checks."""
    from assets.commands import Runner

    runner = Runner(database, run_dir)
    key = runner.db.key(asset_name)
    cells = sorted(runner.instance.get_materialized_partitions(key))
    print(f"{asset_name} of {database}: {len(cells)} partitions, one run each, twice")
    ratios = []
    for round_ in (1, 2):
        for cell in cells:
            result = dg.materialize(
                [*runner.assets, *runner.checks],
                selection=[runner.by_name[asset_name]],
                instance=runner.instance,
                resources=runner.resources,
                partition_key=cell,
                raise_on_error=True,
                run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
            )
            steps = step_seconds(runner.instance, result.run_id)
            own = next(v for k, v in steps.items() if k.endswith(f"__{asset_name}"))
            check = sum(
                v for k, v in steps.items() if k.split("__")[-1].startswith(f"{asset_name}_")
            )
            ratios.append(check / own)
            print(
                f"  {round_} {cell}: {asset_name} {own:.1f}s, checks {check:.1f}s, "
                f"ratio {check / own:.2f}"
            )
    print(f"  median ratio over {len(ratios)} runs: {statistics.median(ratios):.2f}")


def report_recorded(instance) -> None:
    """Asset step vs check steps of the runs already recorded, per checked asset."""
    by_asset: dict[str, list[tuple[float, float]]] = {}
    for record in instance.get_run_records():
        steps = step_seconds(instance, record.dagster_run.run_id)
        for key, seconds in steps.items():
            prefix, _, asset = key.partition("__")
            if not asset:
                continue
            mine = [  # a step per check, or one for the asset's checks together
                v
                for k, v in steps.items()
                if k != key
                and (k.startswith(f"{prefix}__{asset}_") or k == f"{prefix}_{asset}_checks")
            ]
            if mine:
                by_asset.setdefault(asset, []).append((seconds, sum(mine)))
    print("recorded runs (asset step vs its checks' steps, median over runs):")
    for asset, pairs in sorted(by_asset.items()):
        own = statistics.median(p[0] for p in pairs)
        check = statistics.median(p[1] for p in pairs)
        ratio = statistics.median(p[1] / p[0] for p in pairs if p[0] > 0)
        print(
            f"  {asset:<24} {len(pairs):>3} runs: asset {own:.1f}s, checks {check:.1f}s, "
            f"ratio {ratio:.2f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--database", default="rel-flights")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--windows", type=int, default=None, help="only the first N windows")
    p.add_argument("--metrics", action="store_true", help="also metrics and its check, per cell")
    p.add_argument(
        "--copy-to",
        default=None,
        help="where the run folder's copy goes (e.g. /dev/shm: no disk sync, so Dagster's "
        "event writes cost what they cost on a fast disk)",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-checks-", dir=args.copy_to) as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(args.run_dir, copy, ignore=shutil.ignore_patterns("mlartifacts"))
        os.environ["DAGSTER_HOME"] = str(copy / "dagster")
        report_recorded(dg.DagsterInstance.from_config(str(copy / "dagster")))
        bench_targets(copy, args.database, args.repeat, args.windows)
        if args.metrics:
            bench_cells(copy, args.database)


if __name__ == "__main__":
    main()
