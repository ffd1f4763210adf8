"""Peak memory of pre-training input: window files read compactly vs one concatenated frame.
Not a test.

    cd /work/main && .venv/bin/python bench/bench_pretrain_input.py
        [--entities 21000] [--seeds 59] [--targets 472] [--modes 12] [--active 0.06]
        [--repeat 3] [--baseline-cap-gb 16] [--baseline-files 10,20,30] [--data-dir DIR]

Workload: a user's database pre-trained at 20.9 GB peak RSS: 21k entities x 59 weekly
seed times = 1.24 million seeds x 472 targets, 94 % inactive. The database is
``build_synthetic_at_scale(rows=10 x entities)`` (``--entities`` customers, their orders
and products; its graph is what pre-training samples from). The task vectors are
*synthetic*, not ``compute_targets``' of that database (whose 29 targets are far fewer):
one parquet file per seed time (window), written by ``DataFrame.to_parquet`` as the
``tve_targets`` asset writes them, every customer at every seed time, ``--active`` of the
rows active; ``--targets`` targets in compute_targets' dtypes: counts int64 (0 when
inactive), numeric aggregates float64 (null when inactive, ~10 % null when active, like a
``std`` of one value), ``--modes`` of them ``mode`` targets (half text from 25 values,
half integer-valued float64 from 1..12; null when inactive). Generated once into
``--data-dir`` (default ``$TMPDIR/tve-bench-pretrain-input``) and reused.

Measurements, each in a fresh subprocess that reports its own peak RSS (``getrusage``
max RSS) and its wall time without interpreter start and imports (every child imports
``tve_pipeline.training``, so torch is loaded in all):

- ``concat`` (the baseline; what ``pretrained_checkpoint`` + ``training.pretrain`` did
  before): ``pd.read_parquet`` of every window (the list kept alive, as the asset kept
  it), ``pd.concat``, stable sort by timestamp, the latest seed time apart, the dense
  ``TaskVectorNormaliser.fit`` / ``transform`` of train and val, ``seed_tensors``. Run
  under an address-space limit (``RLIMIT_AS``, ``--baseline-cap-gb``) so that it cannot
  take the machine down; above it, it stops with MemoryError and the figure printed is
  *extrapolated* (a least-squares line through its peaks on the first
  ``--baseline-files`` windows, each measured) and labelled so.
- ``compact``: ``task_vectors.pretraining_task_vectors`` on the window files (the
  same seeds, split and vectors; ``--repeat`` runs, median).
- ``pretrain``: what the asset runs now: the graph (``graph.graph_for``) and
  ``training.pretrain`` on the window files, recipe ``test`` (channels 16, fan-out 8, 4)
  with one epoch of ``--steps`` steps of 512 seeds and one validation seed time (the
  latest window stands in for it: 21k validation seeds, one validation pass), objective
  ``tve``.

Prints each peak RSS and wall time and the ratios against the baseline; target: pretrain
within 3 GB. On shared cores, compare times from the same run only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUMERIC_AGGREGATIONS = ("count", "sum", "mean", "min", "max", "std")
WORDS = [f"value-{i:02d}" for i in range(25)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _vm_size_gb() -> float:
    """This process's address space now (what RLIMIT_AS counts): imports alone reserve some."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# --------------------------------------------------------------------------- workload


def make_database(data_dir: Path, entities: int) -> Path:
    from tve_pipeline.datasets.synthetic import build_synthetic_at_scale

    path = data_dir / f"synthetic-{entities}"
    if not (path / "manifest.yaml").exists():
        start = time.perf_counter()
        build_synthetic_at_scale(path, rows=10 * entities, customers=entities)
        print(f"  generated database {path} in {time.perf_counter() - start:.1f} s", flush=True)
    return path


def target_aggregations(targets: int, modes: int) -> dict[str, str]:
    """``--targets`` names: ``modes`` modes spread among numeric aggregates (cycled)."""
    every = max(targets // max(modes, 1), 1)
    out = {}
    for j in range(targets):
        if modes and j % every == every - 1 and sum(a == "mode" for a in out.values()) < modes:
            out[f"path_{j // 6}.column__mode_{j}"] = "mode"
        else:
            out[f"path_{j // 6}.column__{NUMERIC_AGGREGATIONS[j % 6]}_{j}"] = NUMERIC_AGGREGATIONS[
                j % 6
            ]
    return out


def window_frame(rng, t, entities: int, aggregations: dict[str, str], active_rate: float):
    """Synthetic raw task vectors of one seed time, in compute_targets' columns and dtypes."""
    import numpy as np
    import pandas as pd

    active = rng.random(entities) < active_rate
    n = int(active.sum())
    cols = {
        "customer_id": np.arange(entities, dtype="int64"),
        "timestamp": np.full(entities, t.to_datetime64(), "datetime64[us]"),
        "inactive": (~active).astype("int64"),
    }
    for k, (name, agg) in enumerate(aggregations.items()):
        if agg == "count":
            col = np.zeros(entities, dtype="int64")
            col[active] = rng.poisson(3.0, n) + 1
        elif agg == "mode" and k % 2 == 0:
            col = np.full(entities, None, dtype=object)
            col[active] = np.asarray(WORDS, dtype=object)[
                np.minimum(rng.geometric(0.25, n) - 1, len(WORDS) - 1)
            ]
        else:
            col = np.full(entities, np.nan)
            values = (
                rng.integers(1, 13, n).astype(float)
                if agg == "mode"
                else rng.lognormal(2.0, 1.0, n)
            )
            values[rng.random(n) < 0.1] = np.nan
            col[active] = values
        cols[name] = col
    return pd.DataFrame(cols)


def make_windows(data_dir: Path, db: Path, a) -> tuple[list[Path], dict[str, str]]:
    """One parquet file per seed time (weekly, ending a week before the database's val
    timestamp)."""
    import numpy as np
    import pandas as pd
    import yaml

    out = data_dir / f"windows-{a.entities}x{a.seeds}x{a.targets}-{a.modes}modes-{a.active}"
    aggregations = target_aggregations(a.targets, a.modes)
    files = [out / f"window-{i:03d}.parquet" for i in range(a.seeds)]
    if not all(f.exists() for f in files):
        out.mkdir(parents=True, exist_ok=True)
        val = pd.Timestamp(yaml.safe_load((db / "manifest.yaml").read_text())["val_timestamp"])
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for i, f in enumerate(files):
            t = val - pd.Timedelta(days=7) * (a.seeds - i)
            window_frame(rng, t, a.entities, aggregations, a.active).to_parquet(f, index=False)
        print(
            f"  generated {len(files)} window files in {out} "
            f"in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    (out / "aggregations.json").write_text(json.dumps(aggregations))
    return files, aggregations


# --------------------------------------------------------------------------- children


def child_concat(files: list[str], aggregations: dict, cap_gb: float) -> dict:
    import pandas as pd

    from tve_pipeline import training  # noqa: F401  (every child imports it: same base RSS)
    from tve_pipeline.graph import seed_tensors
    from tve_pipeline.normalise import TaskVectorNormaliser

    cap = int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    base_vm_gb = _vm_size_gb()
    start = time.perf_counter()
    try:
        frames = [pd.read_parquet(f) for f in files]  # the asset kept this list alive
        raw = (
            pd.concat(frames, ignore_index=True)
            .sort_values("timestamp", kind="stable")
            .reset_index(drop=True)
        )
        is_val = raw["timestamp"] == raw["timestamp"].max()  # the validation window
        train_raw, val_raw = raw[~is_val], raw[is_val]
        normaliser = TaskVectorNormaliser.fit(train_raw, aggregations)
        y_train, y_val = normaliser.transform(train_raw), normaliser.transform(val_raw)
        seed_tensors(train_raw["customer_id"], train_raw["timestamp"])
        seed_tensors(val_raw["customer_id"], val_raw["timestamp"])
    except MemoryError:
        return {
            "wall_s": time.perf_counter() - start,
            "capped": True,
            "rows": None,
            "base_vm_gb": base_vm_gb,
        }
    return {
        "wall_s": time.perf_counter() - start,
        "capped": False,
        "rows": len(raw),
        "base_vm_gb": base_vm_gb,
        "y_gb": (y_train.nbytes + y_val.nbytes) / 2**30,
        "width": normaliser.width,
    }


def child_compact(files: list[str], aggregations: dict) -> dict:
    from tve_pipeline import training  # noqa: F401  (torch loaded, as in the baseline)
    from tve_pipeline.task_vectors import pretraining_task_vectors

    start = time.perf_counter()
    seeds = pretraining_task_vectors(files[:-1], "customer_id", aggregations, val=files[-1:])
    return {
        "wall_s": time.perf_counter() - start,
        "rows": len(seeds.train) + len(seeds.val),
        "vectors_gb": seeds.train.vectors.nbytes / 2**30,
        "width": seeds.normaliser.width,
    }


def child_pretrain(files: list[str], aggregations: dict, db: str, steps: int) -> dict:
    import torch

    from tve_pipeline import training
    from tve_pipeline.config import make_recipe
    from tve_pipeline.database import column_types, open_dataset
    from tve_pipeline.graph import graph_for

    start = time.perf_counter()
    ds = open_dataset(db)
    data_db = ds.get_db()
    types = column_types({n: t.df for n, t in data_db.table_dict.items()}, ds.manifest)
    recipe = make_recipe(
        "test",
        {
            "pretrain": {
                "epochs": 1,
                "steps_per_epoch": steps,
                "batch_size": 512,
            }
        },
    )
    data, col_stats = graph_for(data_db, types, recipe.backbone)
    graph_s = time.perf_counter() - start
    result = training.pretrain(
        data,
        col_stats,
        "customers",
        "customer_id",
        files[:-1],
        aggregations,
        recipe,
        torch.device("cpu"),
        val_targets=files[-1:],
        objective="tve",
    )
    return {
        "wall_s": time.perf_counter() - start,
        "graph_s": graph_s,
        "rows": result["n_train_seeds"] + result["n_val_seeds"],
        "val_loss": result["best_val_loss"],
    }


def run_child(argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {argv[:1]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- parent


def measure(label: str, argv: list[str], repeat: int) -> dict:
    runs = [run_child(argv) for _ in range(repeat)]
    walls, peaks = [r["wall_s"] for r in runs], [r["peak_rss_mb"] / 1024 for r in runs]
    result = {
        **runs[0],
        "label": label,
        "wall_s": statistics.median(walls),
        "peak_gb": statistics.median(peaks),
    }
    capped = " (stopped at the address-space cap)" if runs[0].get("capped") else ""
    print(
        f"  {label:<40} peak RSS {result['peak_gb']:6.2f} GB  wall {result['wall_s']:6.1f} s"
        f"  (runs: {', '.join(f'{p:.2f} GB / {w:.1f} s' for p, w in zip(peaks, walls))}){capped}",
        flush=True,
    )
    return result


def extrapolate(points: list[tuple[int, float]], n: int) -> float:
    """The least-squares line through (files, peak GB), at ``n`` files."""
    import numpy as np

    x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope * n + intercept)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entities", type=int, default=21_000)
    p.add_argument("--seeds", type=int, default=59)
    p.add_argument("--targets", type=int, default=472)
    p.add_argument("--modes", type=int, default=12)
    p.add_argument("--active", type=float, default=0.06)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baseline-cap-gb", type=float, default=16.0)
    p.add_argument("--baseline-files", default="10,20,30")
    p.add_argument(
        "--data-dir", default=str(Path(tempfile.gettempdir()) / "tve-bench-pretrain-input")
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--cap-gb", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(1)
        files = json.loads(Path(a.files).read_text())
        aggregations = json.loads((Path(files[0]).parent / "aggregations.json").read_text())
        if a.child == "concat":
            result = child_concat(files, aggregations, a.cap_gb)
        elif a.child == "compact":
            result = child_compact(files, aggregations)
        else:
            result = child_pretrain(files, aggregations, a.db, a.steps)
        print(json.dumps({**result, "peak_rss_mb": _peak_rss_mb()}))
        return

    data_dir = Path(a.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"pre-training input benchmark: {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    db = make_database(data_dir, a.entities)
    files, aggregations = make_windows(data_dir, db, a)
    n_modes = sum(v == "mode" for v in aggregations.values())
    print(
        f"  {a.entities:,} entities x {a.seeds} seed times = {a.entities * a.seeds:,} seeds "
        f"x {len(aggregations)} "
        f"targets ({n_modes} modes), {1 - a.active:.0%} inactive, {len(files)} window files, "
        f"{sum(f.stat().st_size for f in files) / 2**20:.0f} MiB",
        flush=True,
    )

    def file_list(k: int) -> str:
        path = data_dir / f"files-{len(files)}-first-{k}.json"
        path.write_text(json.dumps([str(f) for f in files[:k]]))
        return str(path)

    common = ["--files", file_list(len(files))]
    print("\nnew way (window files, compact):")
    compact = measure("compact input only", ["compact", *common], a.repeat)
    pretrain = measure(
        f"graph + pretrain ({a.steps} steps + val)",
        ["pretrain", *common, "--db", str(db), "--steps", str(a.steps)],
        a.repeat,
    )
    print(
        f"\nold way (concatenated frame, dense; address space capped at {a.baseline_cap_gb:g} GB):"
    )
    cap = ["--cap-gb", str(a.baseline_cap_gb)]
    full = measure(f"concat + dense, {len(files)} files", ["concat", *common, *cap], 1)
    points = []
    if full["capped"]:
        for k in (int(v) for v in a.baseline_files.split(",")):
            r = measure(
                f"concat + dense, first {k} files", ["concat", "--files", file_list(k), *cap], 1
            )
            if not r["capped"]:
                points.append((k, r["peak_gb"]))
    if not full["capped"]:
        old, how = full["peak_gb"], "measured"
    elif len(points) >= 2:
        old, how = (
            extrapolate(points, len(files)),
            f"EXTRAPOLATED from {len(points)} measured sizes",
        )
    else:
        old, how = None, "over the cap, too few sizes under it to extrapolate"

    print(
        f"  (the cap counts address space: the baseline held {full['base_vm_gb']:.1f} GB of it "
        "after its imports)"
    )
    print("\nsummary:")
    print(
        "  old way peak RSS: "
        + (f"{old:.2f} GB ({how})" if old else how)
        + ("" if full["capped"] else f", {full['wall_s']:.1f} s")
    )
    print(
        f"  new way peak RSS: compact input {compact['peak_gb']:.2f} GB "
        f"({compact['wall_s']:.1f} s); "
        f"graph + pretrain {pretrain['peak_gb']:.2f} GB ({pretrain['wall_s']:.1f} s) "
        f"-> {'within' if pretrain['peak_gb'] <= 3 else 'OVER'} 3 GB"
    )
    if old:
        print(
            f"  ratio old / new: {old / compact['peak_gb']:.1f}x (input only), "
            f"{old / pretrain['peak_gb']:.1f}x (against graph + pretrain)"
        )
    print(
        f"  compact vectors: {compact['vectors_gb']:.3f} GB for {compact['rows']:,} seeds, "
        f"width {compact['width']}"
    )


if __name__ == "__main__":
    main()
