"""Benchmark of ``tve targets`` (TVE task vectors in DuckDB) on the synthetic generator. Not a test.

    cd /work/main && .venv/bin/python bench/bench_targets.py
        [--rows 10000000] [--pandas-rows 1000000] [--fkf-rows 1000000] [--seeds 52]
        [--repeat 3] [--memory-limit 2GB] [--data-dir DIR] [--skip-fkf] [--skip-baseline]
        [--skip-relf1] [--spill-rows 50000000] [--quick]

Data: ``build_synthetic_at_scale`` (customers -> orders <- products, 10 customers and
1,000 orders per product on average, popularity-skewed products, two years), generated
once per size into ``--data-dir`` (default: ``$TMPDIR/tve-bench-targets``) and reused.
Task: entity ``customers``, Δ = 7 days, the ``--seeds`` weekly seed times that end at the
validation timestamp (val - 7 days, val - 14 days, ...), one row per customer that exists
at each seed time (~47 million rows at 10 million orders). Path kinds: 1-hop ``orders``;
2-hop fact->dimension ``orders > products``; 2-hop fact->key<-fact ``orders > products <
orders`` (every order of the same product in the 7 days up to the first-hop order, as the
reference bounds the second hop: one product has hundreds of orders a week).

Each configuration runs in a fresh subprocess that runs ``tve targets`` in-process
(:func:`tve_pipeline.targets_cli.run_targets_command`: column types, SQL, DuckDB, densify,
parquet) and reports its wall time (the command, without interpreter start and imports)
and its own peak RSS (``VmHWM`` of ``/proc/self/status``: the high-water mark of the
process's memory since it started, DuckDB's native memory included; ``getrusage``'s max
RSS would also count the parent's memory at fork). Baselines, in the same run:
``pandas`` is a straightforward per-timestamp implementation at ``--pandas-rows``
(boolean window mask, ``merge`` with products, ``groupby().agg``, ``Series.mode`` per
group, reindex, ``concat``, ``to_parquet``) and ``pandas-vec`` the same with a vectorised
mode, both checked to give tve targets' values; ``joined`` is tve targets with
fact->key<-fact paths computed the straightforward way (each first-hop row joined to
every row of its key in the 7 days up to it, ``running_aggregates=False``; the method
before per-key lookups) at ``--fkf-rows``, checked equal too. ``--memory-limit`` is each
run's memory budget (``tve targets --memory-limit``: DuckDB is given half as its own limit,
the in-process work is sized to the rest). ``--spill-rows`` adds one run over a database
that does not fit the budget (hops 2, all path kinds). The
rel-f1 database of ``../shared/data`` runs with the ``reference`` recipe's targets
(entity drivers, hops 2, every path kind). Wall times are medians of ``--repeat`` runs
(baselines, fkf and spill: one run); on shared cores, compare ratios from the same run.
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

DELTA = "7 days"


# --------------------------------------------------------------------------- children


def _peak_rss_mb() -> float:
    """This process's own peak RSS: ``VmHWM`` (reset at exec, unlike ``ru_maxrss``, which
    starts from the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def child_ours(a) -> dict:
    import duckdb  # noqa: F401  (imports are not timed: relbench alone, via sklearn and scipy, takes ~2 s)
    import pyarrow.parquet  # noqa: F401
    import relbench  # noqa: F401

    from tve_pipeline.targets_cli import add_targets_parser

    parser = argparse.ArgumentParser()
    add_targets_parser(parser.add_subparsers(dest="command"))
    argv = [
        "targets",
        a.dataset,
        "--entity",
        "customers",
        "--timedelta",
        DELTA,
        "--timestamps",
        a.timestamps,
        "--hops",
        str(a.hops),
        "--out",
        a.out,
        "--memory-limit",
        a.memory_limit,
    ]
    if not a.fkf:
        argv.append("--no-fact-key-fact")
    if a.entity:
        argv[2:4] = ["--entity", a.entity]
    if a.entity and a.timestamps == "default":
        del argv[argv.index("--timestamps") : argv.index("--timestamps") + 2]
        del argv[argv.index("--timedelta") : argv.index("--timedelta") + 2]
    args = parser.parse_args(argv)
    if a.child == "joined":  # the straightforward fact->key<-fact join, as the baseline
        import dataclasses

        from tve_pipeline import targets

        write = targets.write_targets
        targets.write_targets = lambda query, *args, **kwargs: write(
            dataclasses.replace(query, running_aggregates=False), *args, **kwargs
        )
    start = time.perf_counter()
    summary = args.func(args)
    return {
        "wall_s": time.perf_counter() - start,
        "rows": summary["rows"],
        "targets": summary["targets"],
    }


def child_pandas(a, vectorised: bool) -> dict:
    """The straightforward per-timestamp pandas implementation (same targets, same semantics)."""
    import numpy as np
    import pandas as pd

    start = time.perf_counter()
    db = Path(a.dataset) / "db"
    customers = pd.read_parquet(db / "customers.parquet")
    orders = pd.read_parquet(db / "orders.parquet")
    products = pd.read_parquet(db / "products.parquet")
    delta = pd.Timedelta(DELTA)
    categorical = ["quantity", "channel"]  # of orders; amount and rating are numerical

    def mode(s: pd.Series):
        m = s.mode()  # sorted: the first of the most frequent values is the smallest
        return m.iloc[0] if len(m) else None

    def vector_mode(frame: pd.DataFrame, column: str) -> pd.Series:
        counts = frame.groupby(["customer_id", column]).size().rename("n").reset_index()
        counts = counts.sort_values(["customer_id", "n", column], ascending=[True, False, True])
        return counts.drop_duplicates("customer_id").set_index("customer_id")[column]

    frames = []
    for t in sorted(pd.to_datetime(a.timestamps.split(","))):
        window = orders[(orders["order_time"] > t) & (orders["order_time"] <= t + delta)]
        if a.hops == 2:
            window = window.merge(
                products.rename(columns={"product_id": "p.product_id"}),
                how="left",
                left_on="product_id",
                right_on="p.product_id",
            )
        spec = {"orders__count": ("order_id", "size")}
        columns = [
            ("orders", c, "categorical") if c in categorical else ("orders", c, "numerical")
            for c in ["quantity", "amount", "rating", "channel"]
        ]
        if a.hops == 2:
            spec["orders>products__count"] = ("p.product_id", "count")
            columns += [
                ("orders>products", "price", "numerical"),
                ("orders>products", "category", "categorical"),
            ]
        modes = []
        for path, col, kind in columns:
            name = f"{path}.{col}"
            if kind == "numerical":
                for agg in ("mean", "min", "max", "sum", "count", "std"):
                    spec[f"{name}__{agg}"] = (col, agg)
            else:
                if not vectorised:
                    spec[f"{name}__mode"] = (col, mode)
                else:
                    modes.append((f"{name}__mode", col))
                spec[f"{name}__count"] = (col, "count")
                spec[f"{name}__count_distinct"] = (col, "nunique")
        agg = window.groupby("customer_id").agg(**spec)
        for name, col in modes:
            agg[name] = vector_mode(window, col)
        for path, col, kind in columns:  # a sum over no values is null, not 0
            if kind == "numerical":
                agg.loc[agg[f"{path}.{col}__count"] == 0, f"{path}.{col}__sum"] = np.nan
        exist = customers.loc[customers["signup_time"] <= t, ["customer_id"]]
        out = exist.merge(agg, how="left", left_on="customer_id", right_index=True)
        out.insert(1, "timestamp", t)
        out.insert(2, "inactive", out["orders__count"].isna().astype("int64"))
        for c in out.columns:
            if c.endswith(("__count", "__count_distinct")):
                out[c] = out[c].fillna(0).astype("int64")
        frames.append(out)
    result = pd.concat(frames, ignore_index=True)
    result.to_parquet(Path(a.out) / "targets.parquet", index=False)
    return {
        "wall_s": time.perf_counter() - start,
        "rows": len(result),
        "targets": result.shape[1] - 3,
    }


def run_child(argv: list[str]) -> dict:
    """One measurement in a fresh interpreter: its JSON line plus the subprocess's total wall."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True, cwd=ROOT
    )
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"child {argv[:2]} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = total
    return out


# --------------------------------------------------------------------------- parent


def dataset(data_dir: Path, rows: int) -> Path:
    from tve_pipeline.datasets.synthetic import build_synthetic_at_scale

    path = data_dir / f"synthetic-{rows}"
    if not (path / "manifest.yaml").exists():
        start = time.perf_counter()
        build_synthetic_at_scale(path, rows=rows)
        print(f"  generated {path} in {time.perf_counter() - start:.1f} s", flush=True)
    return path


def seed_times(path: Path, n: int) -> str:
    import pandas as pd
    import yaml

    val = pd.Timestamp(yaml.safe_load((path / "manifest.yaml").read_text())["val_timestamp"])
    return ",".join(str(val - pd.Timedelta(DELTA) * k) for k in range(n, 0, -1))


def measure(
    label: str,
    kind: str,
    path: Path,
    a,
    hops: int,
    repeat: int,
    fkf: bool = False,
    entity: str | None = None,
) -> dict:
    """``repeat`` runs of one configuration, each in a fresh process. ``ours`` keeps its
    output as the reference that the baselines of the same data and paths are checked
    against."""
    ref = Path(a.data_dir) / f"reference-{path.name}-{hops}{'-fkf' if fkf else ''}.parquet"
    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="tve-bench-out-", dir=a.data_dir) as out:
            argv = (
                [
                    kind,
                    "--dataset",
                    str(path),
                    "--timestamps",
                    "default" if entity else seed_times(path, a.seeds),
                    "--hops",
                    str(hops),
                    "--out",
                    out,
                    "--memory-limit",
                    a.memory_limit,
                ]
                + (["--fkf"] if fkf else [])
                + (["--entity", entity] if entity else [])
            )
            if kind != "ours":
                argv += ["--compare-to", str(ref)]
            runs.append(run_child(argv))
            if kind == "ours" and not entity:  # one result to check the baselines against
                os.replace(Path(out) / "targets.parquet", ref)
    walls = [r["wall_s"] for r in runs]
    result = {
        "label": label,
        "wall_s": statistics.median(walls),
        "walls": walls,
        "peak_rss_gb": max(r["peak_rss_mb"] for r in runs) / 1024,
        "rows": runs[0]["rows"],
        "targets": runs[0]["targets"],
        "process_s": statistics.median(r["process_s"] for r in runs),
        "agree": runs[0].get("agree"),
    }
    walls_text = ", ".join(f"{w:.1f}" for w in walls)
    print(
        f"  {label:<44} median {result['wall_s']:7.1f} s  (runs: {walls_text})"
        f"  peak RSS {result['peak_rss_gb']:.2f} GiB"
        f"  {result['rows']:,} rows x {result['targets']} targets"
        + (f"  {result['agree']}" if result["agree"] else ""),
        flush=True,
    )
    return result


def compare(produced: Path, reference: Path) -> str:
    """Check a baseline's parquet against tve targets' (same rows, same values)."""
    import numpy as np
    import pandas as pd

    got = pd.read_parquet(produced).sort_values(["timestamp", "customer_id"], ignore_index=True)
    want = pd.read_parquet(reference)
    got["timestamp"] = got["timestamp"].astype("datetime64[us]")
    assert sorted(got.columns) == sorted(want.columns), set(got.columns) ^ set(want.columns)
    assert len(got) == len(want), (len(got), len(want))
    assert (got["customer_id"].to_numpy() == want["customer_id"].to_numpy()).all()
    assert (got["timestamp"].to_numpy() == want["timestamp"].to_numpy()).all()
    for c in want.columns[2:]:
        w, g = want[c], got[c]
        if w.dtype.kind in "fiu" and g.dtype.kind in "fiu":
            assert np.allclose(
                g.to_numpy(float), w.to_numpy(float), rtol=1e-9, atol=1e-9, equal_nan=True
            ), c
        else:
            assert ((g.isna() & w.isna()) | (g.astype(object) == w.astype(object))).all(), c
    return f"(same values as tve targets: {len(want):,} rows x {want.shape[1] - 3} targets)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--pandas-rows", type=int, default=1_000_000)
    p.add_argument("--fkf-rows", type=int, default=1_000_000)
    p.add_argument("--seeds", type=int, default=52)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--memory-limit", default="2GB")
    p.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "tve-bench-targets"))
    p.add_argument("--skip-fkf", action="store_true")
    p.add_argument(
        "--quick", action="store_true", help="1M rows, pandas at 100k, fkf at 100k, one run each"
    )
    # child mode (internal)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dataset")
    p.add_argument("--timestamps")
    p.add_argument("--hops", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--fkf", action="store_true")
    p.add_argument("--compare-to")
    p.add_argument("--entity", default=None)
    p.add_argument("--skip-baseline", action="store_true", help="no joined fkf baseline")
    p.add_argument("--skip-relf1", action="store_true")
    p.add_argument("--spill-rows", type=int, default=0, help="e.g. 50000000 (0: skip)")
    return p


def _child(a) -> None:
    """One configuration, in this (fresh) process: its result as one JSON line."""
    if a.child in ("ours", "joined"):
        result = child_ours(a)
    else:
        result = child_pandas(a, vectorised=a.child == "pandas-vec")
    result["peak_rss_mb"] = _peak_rss_mb()  # before the check below reads both files
    if a.child != "ours" and a.compare_to and Path(a.compare_to).exists():  # after RSS
        result["agree"] = compare(Path(a.out) / "targets.parquet", Path(a.compare_to))
    print(json.dumps(result))


def relf1_dataset(data_dir: Path) -> Path:
    from tve_pipeline.datasets.relf1 import build_rel_f1

    path = data_dir / "rel-f1"
    if not (path / "manifest.yaml").exists():
        build_rel_f1(ROOT.parent / "shared" / "data" / "rel-f1" / "raw", path)
    return path


def main() -> None:
    a = _parser().parse_args()
    if a.child:
        _child(a)
        return
    if a.quick:
        a.rows, a.pandas_rows, a.fkf_rows, a.repeat = 1_000_000, 100_000, 100_000, 1
    data_dir = Path(a.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"tve targets benchmark: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
        f"memory budget {a.memory_limit} (DuckDB given half), {a.seeds} weekly seed times,"
        f" Δ = {DELTA}",
        flush=True,
    )
    big, small = dataset(data_dir, a.rows), dataset(data_dir, a.pandas_rows)
    results: dict[str, dict] = {}

    print(f"\n{a.rows:,} orders ({a.rows // 10:,} customers), each path kind added in turn:")
    results["hops1"] = measure("hops 1", "ours", big, a, 1, a.repeat)
    results["fact_dim"] = measure("hops 2 fact->dimension", "ours", big, a, 2, a.repeat)
    results["all"] = measure("hops 2, all path kinds", "ours", big, a, 2, a.repeat, fkf=True)

    print(f"\n{a.pandas_rows:,} orders, hops 2 fact->dimension, against pandas (same run):")
    results["small"] = measure("tve targets", "ours", small, a, 2, a.repeat)
    results["pandas_vec"] = measure("pandas-vec (vectorised mode)", "pandas-vec", small, a, 2, 1)
    results["pandas"] = measure("pandas (straightforward)", "pandas", small, a, 2, 1)

    if not a.skip_fkf:
        fkf_path = dataset(data_dir, a.fkf_rows)
        print(f"\n{a.fkf_rows:,} orders, hops 2 with fact->key<-fact paths:")
        results["fkf"] = measure("per-key lookups", "ours", fkf_path, a, 2, a.repeat, True)
        if not a.skip_baseline:
            results["fkf_joined"] = measure(
                "joined rows (baseline)", "joined", fkf_path, a, 2, 1, True
            )
    if not a.skip_relf1:
        print("\nrel-f1 (../shared/data), reference recipe's targets: drivers, hops 2, all kinds:")
        results["relf1"] = measure(
            "drivers", "ours", relf1_dataset(data_dir), a, 2, a.repeat, True, entity="drivers"
        )
    if a.spill_rows:
        print(f"\n{a.spill_rows:,} orders, hops 2, all path kinds, memory budget {a.memory_limit}:")
        results["spill"] = measure(
            "larger than memory", "ours", dataset(data_dir, a.spill_rows), a, 2, 1, True
        )
    _print_summary(a, results)


def _print_summary(a, r: dict[str, dict]) -> None:
    """The goals of the targets-at-scale issue, each against its figure from this run."""

    def line(text: str, ok: bool | None = None) -> None:
        print(f"  {text}" + ("" if ok is None else f"  [{'met' if ok else 'NOT met'}]"))

    print("\nsummary (goal in brackets):")
    for key, goal_s, goal_gb in (("fact_dim", 15, None), ("all", 60, 2.0)):
        x = r[key]
        gib = None if goal_gb is None else goal_gb * 1e9 / 2**30  # the stricter reading
        ok = x["wall_s"] <= goal_s and (gib is None or x["peak_rss_gb"] <= gib)
        gb = f" and {goal_gb} GB = {gib:.2f} GiB" if goal_gb else ""
        line(
            f"{a.rows:,} orders, {x['label']}: {x['wall_s']:.1f} s, {x['peak_rss_gb']:.2f} GiB"
            f" peak ({goal_s} s{gb})",
            ok,
        )
    ours, vec, naive = r["small"], r["pandas_vec"], r["pandas"]
    line(
        f"{a.pandas_rows:,} orders: tve targets {ours['wall_s']:.1f} s; straightforward pandas "
        f"{naive['wall_s']:.1f} s ({naive['wall_s'] / ours['wall_s']:.1f}x); vectorised pandas "
        f"{vec['wall_s']:.1f} s ({vec['wall_s'] / ours['wall_s']:.1f}x)"
    )
    if "fkf" in r:
        fkf = r["fkf"]
        text = f"{a.fkf_rows:,} orders with fact->key<-fact: {fkf['wall_s']:.1f} s"
        if "fkf_joined" in r:
            ratio = r["fkf_joined"]["wall_s"] / fkf["wall_s"]
            line(
                f"{text}; joined rows {r['fkf_joined']['wall_s']:.1f} s ({ratio:.1f}x) (20x)",
                ratio >= 20,
            )
        else:
            line(f"{text} (20x faster than 213.9 s: {213.9 / fkf['wall_s']:.1f}x)")
    if "relf1" in r:
        x = r["relf1"]
        line(f"rel-f1 drivers, all path kinds: {x['wall_s']:.1f} s, {x['peak_rss_gb']:.2f} GiB")
    if "spill" in r:
        x = r["spill"]
        line(
            f"{a.spill_rows:,} orders, all path kinds, budget {a.memory_limit}:"
            f" {x['wall_s']:.1f} s, {x['peak_rss_gb']:.2f} GiB peak"
        )


if __name__ == "__main__":
    main()
