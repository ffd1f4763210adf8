"""Benchmark of TemporalNeighborSampler and its share of a training step (not a test).

    cd /work/main && .venv/bin/python bench/bench_sampler.py --threads 1 \
        [--db rel-f1|synthetic|both|events] [--rows 10000000] [--batches 20] [--warmup 2] \
        [--steps 5] [--baseline-seeds 512] [--data-dir DIR]

Issue 5, item 1: batches of 512 seeds (``make_recipe("reference")``'s batch size) with
fan-out [128, 64] (its ``num_neighbors``), uniform strategy, on

* ``rel-f1``: built from ../shared/data/rel-f1/raw by ``build_rel_f1``; seeds are the
  driver-dnf training table (``graph.build_graph`` + ``graph.seed_tensors``, as
  bench/bench_training.py and training.finetune do);
* ``synthetic``: ``build_synthetic_at_scale(rows=--rows)`` (default 10 million orders, 1M
  customers, 10k products); seeds are the customer-churn training table.

Per database, measured in one process, interleaved so that load on a shared machine hits
both alike:

1. ``TemporalNeighborSampler.sample`` (node ids + edges + the tf/time gather of the batch,
   i.e. what training.py calls): median ms per batch over ``--batches`` batches of random
   training seeds after ``--warmup`` warm-up batches, and sampled rows per batch;
2. the straightforward per-seed Python loop (:func:`baseline_sample`: plain dst-grouped
   CSC, a time mask and a randperm per frontier node, a Python set per seed; same
   semantics, ids only, no feature gather), run on the first ``--baseline-seeds /
   --batches`` seeds of each timed batch right after it (default: 512 seeds in all, one
   batch worth, from 20 batches); ms per batch = total time / seeds x batch size;
3. one training step as training.finetune runs it: sample + ``RDLModel(...)(batch,
   entity)`` (reference backbone, out_channels=1; whatever tve_pipeline/model.py does now)
   + BCE on the task label + backward + Adam at the fine-tuning lr, training mode; medians
   over ``--steps`` steps after one warm-up; share = median sampling ms / median step ms.

``--threads 1`` (torch.set_num_threads(1)) for everything: on a machine whose cores are
shared torch's intra-op threads slow these ops down a lot. Peak RSS (getrusage) is
printed after each stage; it is a high-water mark, so the value after a database bounds
everything up to it. ``--data-dir DIR`` builds the dataset folders (and the materialised
tensor frames) under DIR and reuses them on later runs; default: a temporary folder.
``--db events`` is the older in-memory graph (users / items / 2M events, no tf columns
beyond random numbers, no training step) for comparison with earlier figures.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch_frame import TensorFrame, stype
from torch_geometric.data import HeteroData

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tve_pipeline.config import make_recipe  # noqa: E402
from tve_pipeline.sampling import TemporalNeighborSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RELF1_RAW = REPO.parent / "shared" / "data" / "rel-f1" / "raw"
T_START, T_SPAN = 1_600_000_000, 2 * 365 * 86_400


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}, peak RSS {peak_rss_gb():.2f} GiB] {msg}", flush=True)


# --------------------------------------------------------------------------- databases
def build_events_graph(n_users: int, n_items: int, n_events: int, seed: int = 0) -> HeteroData:
    """The older in-memory graph: users, items (popularity-skewed), events with random times."""
    g = torch.Generator().manual_seed(seed)
    data = HeteroData()

    def tf(n, cols):
        return TensorFrame(
            {stype.numerical: torch.randn(n, cols, generator=g)},
            {stype.numerical: [f"c{i}" for i in range(cols)]},
        )

    data["users"].tf = tf(n_users, 4)
    data["items"].tf = tf(n_items, 4)
    data["events"].tf = tf(n_events, 8)
    data["events"].time = T_START + torch.randint(0, T_SPAN, (n_events,), generator=g)
    user = torch.randint(0, n_users, (n_events,), generator=g)
    item = (torch.rand(n_events, generator=g) ** 2 * n_items).long()  # popular items: long tail
    ev = torch.arange(n_events)
    for col, other, fk in (("user_id", "users", user), ("item_id", "items", item)):
        data["events", f"f2p_{col}", other].edge_index = torch.stack([ev, fk])
        data[other, f"rev_f2p_{col}", "events"].edge_index = torch.stack([fk, ev])
    return data


def load_relbench(which: str, root: Path, rows: int, reuse: bool):
    """(data, col_stats, entity table, seed nodes, seed times, labels, description)."""
    from tve_pipeline.database import column_types, open_dataset
    from tve_pipeline.graph import graph_for, seed_tensors

    t0 = time.perf_counter()
    if which == "rel-f1":
        from tve_pipeline.datasets import build_rel_f1

        folder, task_name = root / "rel-f1", "driver-dnf"
        if not (reuse and (folder / "manifest.yaml").exists()):
            build_rel_f1(RELF1_RAW, folder)
    else:
        from tve_pipeline.datasets.synthetic import build_synthetic_at_scale

        folder, task_name = root / f"synthetic-{rows}", "customer-churn"
        if not (reuse and (folder / "manifest.yaml").exists()):
            build_synthetic_at_scale(folder, rows=rows)
    log(f"{which}: dataset folder ready in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    ds = open_dataset(folder)
    # All rows, test period included (the sampler never returns a row later than the seed
    # time, so the training seeds' subgraphs are the same as on get_db()'s default cut;
    # the CSC and memory then cover the whole database, e.g. exactly --rows orders).
    db = ds.get_db(upto_test_timestamp=False)
    types = column_types({n: tb.df for n, tb in db.table_dict.items()}, ds.manifest, ds.dataset_dir)
    data, col_stats = graph_for(
        db,
        types,
        make_recipe("reference").backbone,
        cache_dir=(root / f"tf-cache-{folder.name}") if reuse else None,
    )
    log(f"{which}: graph (make_pkey_fkey_graph, tensor frames) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    task = ds.load_task(task_name)
    train = task.get_table("train").df
    nodes, times = seed_tensors(train[task.entity_col], train[task.time_col])
    y = torch.from_numpy(train[task.target_col].to_numpy(dtype=np.float32))
    log(
        f"{which}: {task_name} training table ({len(train):,} seeds) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    del train, db, ds
    sizes = ", ".join(f"{nt} {data[nt].tf.num_rows:,}" for nt in data.node_types)
    return data, col_stats, task.entity_table, nodes, times, y, f"{task_name}; {sizes}"


# ------------------------------------------------------------------------- straightforward baseline
def baseline_csc(data: HeteroData) -> dict:
    """Plain CSC per edge type (dst-sorted, no time order) for the baseline."""
    out = {}
    for et in data.edge_types:
        src, dst = data[et].edge_index
        order = torch.argsort(dst)
        colptr = torch.zeros(data[et[2]].tf.num_rows + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(dst, minlength=colptr.numel() - 1), 0, out=colptr[1:])
        out[et] = (colptr, src[order])
    return out


def baseline_sample(
    data, csc: dict, num_neighbors, entity: str, node: int, seed_time: int, gen
) -> int:
    """Straightforward reference: one seed at a time, Python loops over frontier nodes."""
    seen = {nt: set() for nt in data.node_types}
    seen[entity].add(node)
    frontier = {entity: [node]}
    total = 1
    for k in num_neighbors:
        new = {}
        for (s, _, d), (colptr, row) in csc.items():
            for v in frontier.get(d, []):
                cand = row[int(colptr[v]) : int(colptr[v + 1])]
                if "time" in data[s]:
                    cand = cand[data[s].time[cand] <= seed_time]
                if cand.numel() > k:
                    cand = cand[torch.randperm(cand.numel(), generator=gen)[:k]]
                for u in cand.tolist():
                    if u not in seen[s]:
                        seen[s].add(u)
                        new.setdefault(s, []).append(u)
                        total += 1
        frontier = new
    return total


# --------------------------------------------------------------------------- measurements
def bench_sampler(args, data, entity, nodes, times, fanout) -> dict:
    """Ours: median ms per batch over args.batches; baseline on a few seeds of each batch."""
    t0 = time.perf_counter()
    sampler = TemporalNeighborSampler(data, fanout, strategy="uniform")
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_csc = baseline_csc(data)
    base_init_s = time.perf_counter() - t0
    per_batch = max(1, -(-args.baseline_seeds // args.batches))
    gen = torch.Generator().manual_seed(args.seed)
    base_gen = torch.Generator().manual_seed(args.seed + 1)
    times_ms, rows, edges = [], [], []
    base_s, base_seeds, base_rows = 0.0, 0, 0
    for i in range(args.warmup + args.batches):
        idx = torch.randint(0, nodes.numel(), (args.batch,), generator=gen)
        t = time.perf_counter()
        b = sampler.sample(entity, nodes[idx], times[idx], generator=gen)
        dt = time.perf_counter() - t
        if i < args.warmup:
            continue
        times_ms.append(dt * 1e3)
        rows.append(sum(b[nt].num_nodes for nt in b.node_types))
        edges.append(sum(b[et].edge_index.size(1) for et in b.edge_types))
        del b
        # the straightforward loop on the first seeds of the same batch, right after it
        sub = idx[:per_batch]
        t = time.perf_counter()
        for v, s in zip(nodes[sub].tolist(), times[sub].tolist()):
            base_rows += baseline_sample(data, base_csc, fanout, entity, v, s, base_gen)
        base_s += time.perf_counter() - t
        base_seeds += sub.numel()
    del base_csc
    med = statistics.median(times_ms)
    base_ms = base_s / base_seeds * args.batch * 1e3
    return {
        "sampler": sampler,
        "init_s": init_s,
        "base_init_s": base_init_s,
        "ms": med,
        "ms_min": min(times_ms),
        "ms_max": max(times_ms),
        "n": len(times_ms),
        "rows": statistics.median(rows),
        "edges": statistics.median(edges),
        "base_ms": base_ms,
        "base_seeds": base_seeds,
        "base_rows": base_rows / base_seeds * args.batch,
        "ratio": base_ms / med,
    }


def bench_step(args, data, col_stats, entity, nodes, times, y, sampler) -> dict:
    """One training step (sample + model(batch, entity) + BCE + backward + Adam), medians."""
    from tve_pipeline.model import RDLModel

    recipe = make_recipe("reference")
    torch.manual_seed(args.seed)
    model = RDLModel(data, col_stats, recipe.backbone, out_channels=1)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=max(recipe.finetune.lr_grid))
    gen = torch.Generator().manual_seed(args.seed + 2)
    t_sample, t_step, rows = [], [], []
    for i in range(args.step_warmup + args.steps):
        idx = torch.randperm(nodes.numel(), generator=gen)[: args.batch]
        t0 = time.perf_counter()
        batch = sampler.sample(entity, nodes[idx], times[idx], generator=gen)
        t1 = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(batch, entity).view(-1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= args.step_warmup:
            t_sample.append((t1 - t0) * 1e3)
            t_step.append((t2 - t0) * 1e3)
            rows.append(sum(batch[nt].num_nodes for nt in batch.node_types))
        del batch, loss
    s, st = statistics.median(t_sample), statistics.median(t_step)
    return {
        "sample_ms": s,
        "step_ms": st,
        "compute_ms": statistics.median([b - a for a, b in zip(t_sample, t_step)]),
        "step_min": min(t_step),
        "step_max": max(t_step),
        "share": s / st,
        "n": len(t_step),
        "seeds_per_s": args.batch / st * 1e3,
        "rows": statistics.median(rows),
    }


def run_db(args, which: str, root: Path) -> dict:
    recipe = make_recipe("reference")
    fanout = args.fanout or list(recipe.backbone.num_neighbors)
    if which == "events":
        data = build_events_graph(args.users, args.items, args.events)
        n_rows = args.users + args.items + args.events
        results = []
        for entity in ("users", "items"):
            n = data[entity].tf.num_rows
            g = torch.Generator().manual_seed(args.seed)
            nodes = torch.randint(0, n, (100_000,), generator=g)
            times = T_START + torch.randint(0, T_SPAN, (100_000,), generator=g)
            r = bench_sampler(args, data, entity, nodes, times, fanout)
            log(
                f"events/{entity}: ours {r['ms']:.1f} ms/batch, "
                f"loop ~{r['base_ms']:,.0f} ms/batch -> {r['ratio']:.0f}x"
            )
            results.append(
                {
                    "db": f"events ({entity} seeds)",
                    "rows_total": n_rows,
                    "desc": "random seeds",
                    **r,
                    "step": None,
                }
            )
        return results
    data, col_stats, entity, nodes, times, y, desc = load_relbench(
        which, root, args.rows, args.data_dir is not None
    )
    n_rows = sum(data[nt].tf.num_rows for nt in data.node_types)
    r = bench_sampler(args, data, entity, nodes, times, fanout)
    log(
        f"{which}: sampler init {r['init_s']:.2f} s; ours {r['ms']:.1f} ms/batch "
        f"(min {r['ms_min']:.1f}, max {r['ms_max']:.1f}, {r['n']} batches), "
        f"{r['rows']:,.0f} rows and {r['edges']:,.0f} edges per batch; straightforward loop "
        f"~{r['base_ms']:,.0f} ms/batch (from {r['base_seeds']} seeds, "
        f"~{r['base_rows']:,.0f} rows/batch) -> {r['ratio']:.0f}x"
    )
    step = bench_step(args, data, col_stats, entity, nodes, times, y, r["sampler"])
    log(
        f"{which}: training step {step['step_ms']:.1f} ms "
        f"(min {step['step_min']:.1f}, max {step['step_max']:.1f}, {step['n']} steps): "
        f"sampling {step['sample_ms']:.1f} ms + fwd/bwd/Adam {step['compute_ms']:.1f} ms; "
        f"{step['seeds_per_s']:.0f} seeds/s; sampling share {100 * step['share']:.1f}%"
    )
    return [
        {
            "db": which,
            "rows_total": n_rows,
            "desc": desc,
            **r,
            "step": step,
            "peak_rss": peak_rss_gb(),
        }
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default="both", choices=["rel-f1", "synthetic", "both", "events"])
    ap.add_argument("--rows", type=int, default=10_000_000, help="synthetic: orders (fact rows)")
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="build/reuse dataset folders here (default: a temp dir)",
    )
    ap.add_argument("--batch", type=int, default=make_recipe("reference").finetune.batch_size)
    ap.add_argument(
        "--fanout",
        type=int,
        nargs="+",
        default=None,
        help="default: the reference recipe's [128, 64]",
    )
    ap.add_argument(
        "--batches", type=int, default=20, help="timed sampler batches (after --warmup)"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--baseline-seeds",
        type=int,
        default=512,
        help="seeds for the per-seed loop, spread over the timed batches "
        "(default: one batch worth)",
    )
    ap.add_argument(
        "--steps", type=int, default=5, help="timed training steps (after --step-warmup)"
    )
    ap.add_argument("--step-warmup", type=int, default=1)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=50_000, help="--db events only")
    ap.add_argument("--items", type=int, default=5_000, help="--db events only")
    ap.add_argument("--events", type=int, default=2_000_000, help="--db events only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    fan = args.fanout or list(make_recipe("reference").backbone.num_neighbors)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
        f"batch {args.batch}, fan-out {fan}, uniform; "
        f"{args.batches} sampler batches after {args.warmup} warm-up, "
        f"{args.steps} steps after {args.step_warmup} warm-up",
        flush=True,
    )
    dbs = {"both": ["rel-f1", "synthetic"]}.get(args.db, [args.db])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_sampler_") as tmp:
        root = args.data_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for which in dbs:
            results += run_db(args, which, root)

    print(
        f"\nSummary ({torch.get_num_threads()} thread(s); batch {args.batch}, fan-out {fan}; "
        "medians; the loop is extrapolated from its seeds; "
        "share = sampling ms / step ms, both medians of the same steps):"
    )
    head = (
        f"{'database':<22} {'graph rows':>11} {'ours ms/batch':>14} {'loop ms/batch':>14} "
        f"{'loop/ours':>10} {'rows/batch':>11} {'step ms':>9} {'sampling ms':>12} "
        f"{'fwd+bwd+opt':>12} {'seeds/s':>8} {'share':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        s = r["step"]
        tail = (
            (
                f"{s['step_ms']:9.1f} {s['sample_ms']:12.1f} {s['compute_ms']:12.1f} "
                f"{s['seeds_per_s']:8.0f} {100 * s['share']:6.1f}%"
            )
            if s
            else f"{'-':>9} {'-':>12} {'-':>12} {'-':>8} {'-':>7}"
        )
        print(
            f"{r['db']:<22} {r['rows_total']:>11,} {r['ms']:14.1f} {r['base_ms']:14,.0f} "
            f"{r['ratio']:9.0f}x {r['rows']:11,.0f} {tail}"
        )
    for r in results:
        print(
            f"  {r['db']}: {r['desc']}; sampler init {r['init_s']:.1f} s"
            + (f"; peak RSS after it {r['peak_rss']:.2f} GiB" if "peak_rss" in r else "")
        )
    print(
        f"peak RSS {peak_rss_gb():.2f} GiB (getrusage ru_maxrss); "
        f"wall time {time.perf_counter() - wall:.0f} s"
    )


if __name__ == "__main__":
    main()
