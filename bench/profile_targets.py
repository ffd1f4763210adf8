"""What an entity's task vectors say: targets by path kind, seeds, active share, and how much of
the normalised target error a predictor that knows only the seed time removes.

Design. Computes the raw task vectors of one entity table over the database's training seed
times with ``tve targets`` (the same code path as the pipeline's ``tve_targets``: the
traversal, the engine and the defaults a user gets), then reads them back:

- **targets by path kind**, after leaving out those null or constant on every active
  training row as the ``traversal_graph`` asset does (``--no-prune``: all generated):
  ``E <- F`` (1-hop), ``E <- F -> D`` (fact->dimension), ``E <- F -> K <- F'``
  (fact->key<-fact), anything else (other);
- **seeds**: the (entity, seed time) rows, and the share that is active (a next-window row
  on some path);
- **seed-time-only baseline**: the active rows' vectors normalised as pre-training sees
  them (:class:`~tve_pipeline.normalise.TaskVectorNormaliser` fitted on the active rows),
  then the share of the squared error around the global mean vector that the per-seed-time
  mean vector removes: ``1 - SSE(seed-time means) / SSE(global mean)``. A high share means
  the vectors say more about the era than about the entity (what the issue 23 audit found:
  79 % on rel-f1 drivers with unbounded second hops). Also per path kind, and averaged
  over the vector's slots (each slot's own share, slots that vary).

Not a test and not timed against a baseline: a measurement for ``bench/RESULTS.md``.

    .venv/bin/python bench/profile_targets.py DATASET_DIR --entity drivers [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tve_pipeline.normalise import TaskVectorNormaliser
from tve_pipeline.target_selection import TargetProfile
from tve_pipeline.targets import INACTIVE, TIMESTAMP
from tve_pipeline.targets_cli import main as targets_main
from tve_pipeline.traversal import TargetDef, load_targets_json


def path_kind(d: TargetDef) -> str:
    """The kind of a target's path, in the method's words."""
    dirs = [hop.direction for hop in d.path]
    if dirs == ["in"]:
        return "1-hop"
    if dirs[0] == "in" and all(x == "out" for x in dirs[1:]):
        return "fact->dimension"
    if dirs == ["in", "out", "in"]:
        return "fact->key<-fact"
    return "other"


def seed_time_share(x: np.ndarray, seed_time: np.ndarray) -> float:
    """``1 - SSE(per-seed-time mean) / SSE(global mean)`` over the rows of ``x``."""
    total = float(((x - x.mean(axis=0)) ** 2).sum())
    if total == 0:
        return float("nan")
    frame = pd.DataFrame(x)
    means = frame.groupby(seed_time).transform("mean").to_numpy()
    return 1.0 - float(((x - means) ** 2).sum()) / total


def mean_column_share(x: np.ndarray, seed_time: np.ndarray) -> float:
    """The same share per normalised slot (slots that vary), averaged over the slots."""
    centred = ((x - x.mean(axis=0)) ** 2).sum(axis=0)
    means = pd.DataFrame(x).groupby(seed_time).transform("mean").to_numpy()
    left = ((x - means) ** 2).sum(axis=0)
    varies = centred > 0
    return float(np.mean(1.0 - left[varies] / centred[varies])) if varies.any() else float("nan")


def kept_targets(defs: list[TargetDef], active: pd.DataFrame) -> list[TargetDef]:
    """The targets that the ``traversal_graph`` asset keeps: not null or constant on every
    active training row (the rule of :class:`~tve_pipeline.target_selection.TargetProfile`)."""
    kept = []
    for d in defs:
        profile = TargetProfile(d.name, d.aggregation)
        values = active[d.name].dropna()
        low, high = (values.min(), values.max()) if len(values) else (None, None)
        profile.add(low, high, len(values), len(active))
        if profile.reason is None:
            kept.append(d)
    return kept


def profile(out_dir: Path, prune: bool = True) -> dict:
    defs = load_targets_json(out_dir / "targets.json")
    raw = pd.read_parquet(out_dir / "targets.parquet")
    active = raw[raw[INACTIVE] == 0].reset_index(drop=True)
    generated = len(defs)
    if prune:
        defs = kept_targets(defs, active)
    kinds = pd.Series([path_kind(d) for d in defs]).value_counts().to_dict()
    aggregations = {d.name: d.aggregation for d in defs}
    normaliser = TaskVectorNormaliser.fit(active, aggregations)
    x = normaliser.transform(active)[:, 1:].astype(np.float64)  # without `inactive`
    seed_time = active[TIMESTAMP].to_numpy()
    by_kind = {}
    start = 0
    slots: dict[str, list[int]] = {}
    for d, s in zip(defs, normaliser.scalers, strict=True):
        slots.setdefault(path_kind(d), []).extend(range(start, start + s.width))
        start += s.width
    if start < x.shape[1]:  # one MCA of all modes (every path kind), after the scalers' slots
        slots["modes (MCA)"] = list(range(start, x.shape[1]))
    for kind, cols in sorted(slots.items()):
        by_kind[kind] = round(seed_time_share(x[:, cols], seed_time), 4)
    per_window = raw.groupby(TIMESTAMP)[INACTIVE].agg(["size", "mean"])
    return {
        "targets_generated": generated,
        "targets": len(defs),
        "vector_width": normaliser.width,
        "targets_by_kind": kinds,
        "seed_times": int(raw[TIMESTAMP].nunique()),
        "seeds": len(raw),
        "active": len(active),
        "active_share": round(len(active) / max(len(raw), 1), 4),
        "seeds_per_window_median": float(per_window["size"].median()),
        "active_share_per_window_median": round(float(1 - per_window["mean"].median()), 4),
        "seed_time_share_of_error": round(seed_time_share(x, seed_time), 4),
        "seed_time_share_by_kind": by_kind,
        "seed_time_share_mean_over_slots": round(mean_column_share(x, seed_time), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("--entity", required=True)
    parser.add_argument("--out", help="folder for targets.parquet (default: a temporary one)")
    parser.add_argument(
        "--no-prune",
        action="store_true",
        help="keep the targets null or constant on every active training row",
    )
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="profile-targets-"))
    start = time.perf_counter()
    if not (out / "targets.parquet").exists():
        targets_main([args.dataset_dir, "--entity", args.entity, "--out", str(out)])
    took = time.perf_counter() - start
    result = {"dataset": args.dataset_dir, "entity": args.entity, **profile(out, not args.no_prune)}
    result["targets_seconds"] = round(took, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
