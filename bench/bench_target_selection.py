"""What pruning null and constant targets leaves out, and what finding them costs.

For each (dataset folder, entity table) given, builds the traversal graph as the
``traversal_graph`` asset does (reference recipe: 2 hops, fact->key<-fact paths), profiles
it over the training seed times (:func:`tve_pipeline.target_selection.select_targets`) and
times, beside it in the same run, what ``tve_targets`` does for the same seed times: one
backfill writing a file per window (``write_targets_by_seed_time``). Prints the targets
left out with their reason, by path kind, and the two times.

    PYTHONPATH=$PWD python bench/bench_target_selection.py /tmp/relf1:drivers /tmp/flights:planes

Measured 2026-12-04 (2 shared CPU cores, reference recipe, fact->key<-fact second hops not
yet bounded): rel-f1 drivers, 665 training seed times: 715 targets, 137 left out (85 null
everywhere, 52 constant; E<-F 0, E<-F->D 6, E<-F->K<-F' 131: qualifying>races<results and
<constructor_results are empty, a race's results come after its qualifying; every race
has a winner, so ...<results.position__min is 1), profile 38.3 s vs the backfill's 79.1 /
76.9 s. rel-flights planes, 43 seed times: 395 targets, 132 left out (E<-F->D 8: the
origin airport's tz, dst, tzone; E<-F->K<-F' 124: flights>airports[dest_id]<flights
[origin_id] and <weather are empty, as no flight leaves and no weather is recorded where a
plane's flight lands; flights>airports[origin_id]<flights[dest_id] reaches one flight,
EWR to LGA, so its means are constant, its sums vary and are kept), profile 16.7 s vs
16.8 / 21.8 s. The profile is one pass of the engine
(``iter_targets``) over the training seed times; the statistics themselves cost < 1 s.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tve_pipeline.config import make_recipe
from tve_pipeline.database import num_eval_timestamps, open_dataset, table_files, task_timedelta
from tve_pipeline.summary import summarise_database
from tve_pipeline.target_selection import select_targets, traversal_targets
from tve_pipeline.targets import TargetQuery, write_targets_by_seed_time
from tve_pipeline.windows import seed_schedule


def path_kind(d) -> str:
    return {1: "E<-F", 2: "E<-F->D", 3: "E<-F->K<-F'"}[len(d.path)]


def measure(dataset_dir: str, entity: str) -> None:
    recipe = make_recipe("reference")
    summary = summarise_database(dataset_dir)
    dataset = open_dataset(dataset_dir)
    delta = task_timedelta(dataset)
    schedule = seed_schedule(summary, delta, num_eval_timestamps(dataset))
    seeds = list(schedule.loc[schedule["split"] == "train", "timestamp"])
    defs = traversal_targets(dataset.manifest.tables, summary.column_types, entity, recipe.targets)
    query = TargetQuery(
        table_files(dataset),
        dataset.manifest.tables,
        defs,
        entity,
        seeds,
        delta,
        memory_limit=recipe.targets.memory_limit,
    )
    # the backfill first, then the profile, then the backfill again: the machine is shared,
    # so each is timed after the same warm-up and the backfill's two times bound the noise
    backfill = []
    for again in (False, True):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            write_targets_by_seed_time(query, lambda t: Path(out) / f"{t:%Y%m%d%H%M%S}.parquet")
            backfill.append(time.perf_counter() - start)
        if not again:
            chosen = select_targets(query)
    targets_seconds = min(backfill)
    kind = {d.name: path_kind(d) for d in defs}
    print(f"\n{dataset.manifest.name} {entity}: {len(seeds)} training seed times, Δ {delta}")
    print(
        f"  targets {len(defs)}, kept {len(chosen.kept)}, left out {len(chosen.left_out)}; "
        f"active training rows {chosen.profiles[0].active_rows if chosen.profiles else 0:,}"
    )
    total, dropped = Counter(kind.values()), Counter(kind[r["target"]] for r in chosen.left_out)
    for k in total:
        print(f"  {k:12s} {total[k]:4d} targets, {dropped[k]:4d} left out")
    print(
        f"  profile {chosen.seconds:.1f} s; tve_targets' backfill of the same seed times "
        f"{backfill[0]:.1f} s and {backfill[1]:.1f} s (ratio to the faster "
        f"{chosen.seconds / targets_seconds:.2f})"
    )
    for row in chosen.left_out:
        print(f"    - {row['target']}: {row['reason']}")


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        folder, entity = spec.rsplit(":", 1)
        measure(folder, entity)
