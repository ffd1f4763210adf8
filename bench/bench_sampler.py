"""Benchmark of TemporalNeighborSampler (not a test).

    cd /work/main && .venv/bin/python bench/bench_sampler.py [--users 50000] [--items 5000]
        [--events 2000000] [--batch 512] [--batches 10] [--fanout 128 64] [--baseline-seeds 32] [--threads N]

Synthetic schema: users (untimed), items (untimed, popularity-skewed), events (2M rows,
fkeys to both, uniformly random times over two years); TensorFrame features on every
table, as make_pkey_fkey_graph builds them. Seeds are random users (about 40 events each)
and random items (hundreds to thousands of events each, so the uniform draw is exercised),
each with a random seed time. Prints the median ms per batch, the sampled sizes, and the
speed-up over a straightforward per-seed Python loop (plain dst-grouped CSC, a time mask
and a randperm per frontier node, a Python set per seed; same semantics) timed on a few
seeds in the same run and extrapolated to the batch size. On a machine whose cores are
shared, pass --threads 1: torch's intra-op threads then slow these small ops down a lot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch_frame import TensorFrame, stype
from torch_geometric.data import HeteroData

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tve_pipeline.sampling import TemporalNeighborSampler  # noqa: E402

T_START, T_SPAN = 1_600_000_000, 2 * 365 * 86_400


def build_graph(n_users: int, n_items: int, n_events: int, seed: int = 0) -> HeteroData:
    g = torch.Generator().manual_seed(seed)
    data = HeteroData()

    def tf(n, cols):
        return TensorFrame({stype.numerical: torch.randn(n, cols, generator=g)}, {stype.numerical: [f"c{i}" for i in range(cols)]})

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


def baseline_sample(data, csc: dict, num_neighbors, entity: str, node: int, seed_time: int, gen) -> int:
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--fanout", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--baseline-seeds", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    data = build_graph(args.users, args.items, args.events)
    t0 = time.perf_counter()
    sampler = TemporalNeighborSampler(data, args.fanout, strategy="uniform")
    print(f"graph: {args.users} users, {args.items} items, {args.events} events; "
          f"sampler init (CSC build) {time.perf_counter() - t0:.2f} s; fan-out {args.fanout}")

    base_csc = baseline_csc(data)
    gen = torch.Generator().manual_seed(0)
    for entity in ("users", "items"):
        n_rows = data[entity].tf.num_rows
        times, sizes, edges = [], None, None
        for i in range(args.batches + 1):
            nodes = torch.randint(0, n_rows, (args.batch,), generator=gen)
            seed_time = T_START + torch.randint(0, T_SPAN, (args.batch,), generator=gen)
            t = time.perf_counter()
            b = sampler.sample(entity, nodes, seed_time, generator=gen)
            if i:  # first batch is warm-up
                times.append(time.perf_counter() - t)
            sizes = {nt: b[nt].num_nodes for nt in b.node_types}
            edges = sum(b[et].edge_index.size(1) for et in b.edge_types)
        med = statistics.median(times) * 1e3

        # Baseline on a few seeds of the same kind, extrapolated to the batch size.
        nodes = torch.randint(0, n_rows, (args.baseline_seeds,), generator=gen)
        seed_time = T_START + torch.randint(0, T_SPAN, (args.baseline_seeds,), generator=gen)
        t = time.perf_counter()
        for v, s in zip(nodes.tolist(), seed_time.tolist()):
            baseline_sample(data, base_csc, args.fanout, entity, v, s, gen)
        base = (time.perf_counter() - t) / args.baseline_seeds * args.batch * 1e3
        print(f"seeds={entity:<6} median {med:8.1f} ms/batch of {args.batch} "
              f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); last batch nodes {sizes}, edges {edges}; "
              f"per-seed Python loop ~{base:,.0f} ms/batch (extrapolated from {args.baseline_seeds} seeds) "
              f"-> {base / med:.0f}x")


if __name__ == "__main__":
    main()
