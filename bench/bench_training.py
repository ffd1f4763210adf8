"""Speed of one training step of the RDL backbone, five ways, measured in one run (not a test).

    cd /work/main && .venv/bin/python bench/bench_training.py [--steps 5] [--warmup 1]
        [--threads default 1 s1] [--paths ...] [--db auto|rel-f1|rel-flights] [--profile]

Database and task: rel-f1 driver-dnf (built from ../shared/data/rel-f1/raw/ergast_csv by
``build_rel_f1``) when that builder and the raw files are there, else rel-flights
plane-active (``build_flights``); built into a temporary folder. Reference settings:
``make_recipe("reference")`` (channels 128, 4 encoder layers, fan-out [128, 64], batch
512, sum aggregation), ``RDLModel`` on ``training.build_graph``, Adam at the fine-tuning
lr, BCE on the task label, training mode (dropout on).

Paths, fed the same seed batches step by step (interleaved, so that load on a shared
machine hits them alike), each with its own copy of the same initial model:

* ``straightforward``: :class:`SimpleTemporalSampler` below (plain destination-grouped
  CSC; every neighbour of a frontier node gathered and masked ``time <= seed_time``; k
  kept by a random sort; per-seed dedup by ``torch.unique``: the same subgraph semantics
  as ours, ~70-77k rows per batch on rel-f1, as the issue's reference) + ``model(batch)``;
* ``ours``: ``TemporalNeighborSampler.sample`` + ``model(batch)`` (what training.py does);
* ``+dedup+trim``: ours + :func:`fast_embed` -- the same function of the same parameters
  (checked below, forward and gradients), computed with (1) each table's encoder run once
  per distinct row of the batch and gathered (:func:`encode_unique`), (2) each GNN layer
  run only for the nodes the seeds' outputs depend on, summed root weights, and lin_l
  before aggregation where the source side is smaller (:func:`gnn_needed`);
* ``+fold``: and the numerical/categorical column encoders folded into the first ResNet
  block's two linears (:func:`resnet_folded`);
* ``+dropout (all)``: and ``torch.nn.Dropout`` swapped for :class:`FastDropout` (same
  distribution, mask from ``uniform_`` instead of the slow CPU ``bernoulli_``).

Per path: median sampling ms (batch assembly included), fwd+bwd+optimizer ms, step ms,
seeds/s, sampling share of the step, the ratio to the first path, and rows per batch.
``--threads``: ``default`` = torch's default intra-op threads for everything; ``1`` =
``torch.set_num_threads(1)`` for everything; ``s1`` = one thread for sampling only.
``--profile`` adds a per-part breakdown of one step at one thread (sampling vs batch
assembly, encoder per table, temporal encoder, GNN, head/loss/optimizer; each part timed
forward+backward on detached inputs) and torch.profiler's top operators.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import HeteroData

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tve_pipeline import training  # noqa: E402
from tve_pipeline.config import make_recipe  # noqa: E402
from tve_pipeline.database import column_types, open_dataset  # noqa: E402
from tve_pipeline.model import RDLModel  # noqa: E402
from tve_pipeline.sampling import TemporalNeighborSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PATHS = ["straightforward", "ours", "+dedup+trim", "+fold", "+dropout (all)"]
RELF1_RAW = REPO.parent / "shared" / "data" / "rel-f1" / "raw"


# --------------------------------------------------------------------------- database
def build_database(which: str, tmp: Path):
    """(dataset, task name) for rel-f1 driver-dnf if buildable, else rel-flights plane-active."""
    if which in ("auto", "rel-f1"):
        build_rel_f1 = None
        try:
            from tve_pipeline.datasets import build_rel_f1  # type: ignore[attr-defined]
        except ImportError:
            try:
                from tve_pipeline.datasets.relf1 import build_rel_f1  # type: ignore[no-redef]
            except ImportError:
                pass
        if build_rel_f1 is not None and (RELF1_RAW / "ergast_csv").is_dir():
            return open_dataset(build_rel_f1(RELF1_RAW, tmp / "rel-f1")), "driver-dnf"
        if which == "rel-f1":
            raise SystemExit(f"rel-f1 is not buildable here (builder or {RELF1_RAW / 'ergast_csv'} missing)")
    from tve_pipeline.datasets import build_flights

    return open_dataset(build_flights(tmp / "rel-flights")), "plane-active"


# --------------------------------------------------------------------------- straightforward sampler
class SimpleTemporalSampler:
    """The straightforward vectorised temporal sampler the speed goal is measured against.

    Same semantics as ``TemporalNeighborSampler`` (disjoint subgraphs, ``time <=
    seed_time``, k per (node, edge type) uniformly without replacement, a row at most once
    per seed, nodes in hop order), none of its tricks: no time-sorted CSC, no
    searchsorted, no O(k) draws -- all of a frontier node's neighbours are gathered and
    masked, and the k kept are the first k of a random sort; dedup by ``torch.unique``
    over all keys of the type every hop.
    """

    def __init__(self, data: HeteroData, num_neighbors: list[int]):
        self.data, self.fanout = data, list(num_neighbors)
        self.num_rows = {nt: data[nt].tf.num_rows for nt in data.node_types}
        self.time = {nt: data[nt].time for nt in data.node_types if "time" in data[nt]}
        self.csc = {}
        for et in data.edge_types:
            src, dst = data[et].edge_index
            order = torch.argsort(dst, stable=True)
            colptr = torch.zeros(self.num_rows[et[2]] + 1, dtype=torch.long)
            torch.cumsum(torch.bincount(dst, minlength=self.num_rows[et[2]]), 0, out=colptr[1:])
            self.csc[et] = (colptr, src[order])

    def sample(self, entity: str, nodes: Tensor, seed_time: Tensor, generator=None) -> HeteroData:
        B = nodes.numel()
        types = self.data.node_types
        ids = {nt: [] for nt in types}
        bat = {nt: [] for nt in types}
        keys = {nt: torch.empty(0, dtype=torch.long) for nt in types}  # batch * N + id, local order
        nsn = {nt: [0] for nt in types}
        nse = {et: [] for et in self.csc}
        edges = {et: [] for et in self.csc}
        ids[entity].append(nodes)
        bat[entity].append(torch.arange(B))
        keys[entity] = torch.arange(B) * self.num_rows[entity] + nodes
        nsn[entity][0] = B
        frontier = {entity: (nodes, torch.arange(B), torch.arange(B))}
        for k in self.fanout:
            found: dict[str, list] = {}
            for et, (colptr, row) in self.csc.items():
                s, _, d = et
                if d not in frontier:
                    continue
                f_id, f_b, f_local = frontier[d]
                deg = colptr[f_id + 1] - colptr[f_id]
                seg = torch.repeat_interleave(torch.arange(f_id.numel()), deg)
                start = torch.cumsum(deg, 0) - deg
                cand = row[colptr[f_id][seg] + torch.arange(seg.numel()) - start[seg]]
                if s in self.time:
                    ok = self.time[s][cand] <= seed_time[f_b[seg]]
                    cand, seg = cand[ok], seg[ok]
                if k >= 0 and cand.numel():
                    o = torch.argsort(torch.rand(cand.numel(), generator=generator))
                    o = o[torch.argsort(seg[o], stable=True)]  # random order inside each segment
                    cand, seg = cand[o], seg[o]
                    cnt = torch.bincount(seg, minlength=f_id.numel())
                    rank = torch.arange(seg.numel()) - (torch.cumsum(cnt, 0) - cnt)[seg]
                    cand, seg = cand[rank < k], seg[rank < k]
                found.setdefault(s, []).append((et, cand, f_b[seg], f_local[seg]))
            new_frontier = {}
            for nt in types:
                parts = found.get(nt)
                if not parts:
                    nsn[nt].append(0)
                    continue
                ckey = torch.cat([p[2] for p in parts]) * self.num_rows[nt] + torch.cat([p[1] for p in parts])
                old = keys[nt]
                uniq, inv = torch.unique(torch.cat([old, ckey]), return_inverse=True)
                slot_local = torch.full((uniq.numel(),), -1, dtype=torch.long)
                slot_local[inv[: old.numel()]] = torch.arange(old.numel())
                inv_new = inv[old.numel():]
                new_slots = torch.unique(inv_new[slot_local[inv_new] < 0])
                slot_local[new_slots] = old.numel() + torch.arange(new_slots.numel())
                local = slot_local[inv_new]
                new_keys = uniq[new_slots]
                keys[nt] = torch.cat([old, new_keys])
                n_ids, n_b = new_keys % self.num_rows[nt], new_keys // self.num_rows[nt]
                ids[nt].append(n_ids)
                bat[nt].append(n_b)
                nsn[nt].append(new_slots.numel())
                if new_slots.numel():
                    new_frontier[nt] = (n_ids, n_b, old.numel() + torch.arange(new_slots.numel()))
                off = 0
                for et, cand, _, dst_local in parts:
                    edges[et].append(torch.stack([local[off: off + cand.numel()], dst_local]))
                    off += cand.numel()
            for et in self.csc:
                nse[et].append(sum(e.size(1) for e in edges[et]) - sum(nse[et]))
            frontier = new_frontier

        out = HeteroData()
        for nt in types:
            n_id = torch.cat(ids[nt]) if ids[nt] else torch.empty(0, dtype=torch.long)
            out[nt].n_id = n_id
            out[nt].batch = torch.cat(bat[nt]) if bat[nt] else torch.empty(0, dtype=torch.long)
            out[nt].tf = self.data[nt].tf[n_id]
            if nt in self.time:
                out[nt].time = self.time[nt][n_id]
            out[nt].num_sampled_nodes = nsn[nt]
        for et in self.csc:
            out[et].edge_index = torch.cat(edges[et], 1) if edges[et] else torch.empty(2, 0, dtype=torch.long)
            out[et].num_sampled_edges = nse[et]
        out[entity].seed_time = seed_time
        return out


# --------------------------------------------------------------------------- fast forward
def encode_unique(model: RDLModel, batch: HeteroData, fold: bool = False) -> dict[str, Tensor]:
    """``model.encoder(batch.collect("tf"))``, each distinct row of a table encoded once.

    A row's encoding does not depend on its seed, so rows that repeat across the seeds
    of a batch (on rel-f1 about 3 in 4) are encoded once and gathered; the gradient of
    the gather sums over the copies. Needs the batch's tf to be the graph's rows at
    ``n_id`` (not per-occurrence corrupted copies). In training mode the dropout mask is
    then per distinct row rather than per copy.
    """
    x = {}
    for nt in batch.node_types:
        store, resnet = batch[nt], model.encoder.encoders[nt]
        enc = (lambda tf, r=resnet: resnet_folded(r, tf)) if fold else resnet
        n_id = store.n_id
        uniq, inv = torch.unique(n_id, return_inverse=True)
        if uniq.numel() == n_id.numel():
            x[nt] = enc(store.tf)
            continue
        first = torch.full((uniq.numel(),), n_id.numel(), dtype=torch.long, device=n_id.device)
        first.scatter_reduce_(0, inv, torch.arange(n_id.numel(), device=n_id.device), reduce="amin")
        x[nt] = enc(store.tf[first])[inv]
    return x


def gnn_needed(model: RDLModel, batch: HeteroData, x: dict[str, Tensor], fuse_root: bool = True) -> dict[str, Tensor]:
    """``model.gnn(x, edge_index)`` restricted to what the seeds' outputs depend on.

    Nodes and edges are laid out by hop (``num_sampled_nodes``/``num_sampled_edges``, as
    PyG's samplers and ours produce). With L layers, layer l updates only the nodes of
    hops <= L-1-l, reading edges of hops <= L-l (PyG's trim_to_layer keeps one hop more,
    whose outputs nothing reads). SAGEConv is lin_l(aggregated messages) + lin_r(x_dst) per
    edge type, and HeteroConv sums over the edge types into a node type; ``fuse_root``
    (1) applies their lin_r (bias-free) as one matmul with the summed weight, and (2) for a
    sum/mean aggregation applies lin_l's weight BEFORE aggregating when the edge type has
    fewer source than destination rows (W sum_j x_j = sum_j W x_j; the bias once after).
    LayerNorm here is per node, so every kept node's value is unchanged.
    """
    gnn = model.gnn
    L = len(gnn.convs)
    nsn = {nt: batch[nt].num_sampled_nodes for nt in batch.node_types}
    nse = {et: batch[et].num_sampled_edges for et in batch.edge_types}
    C = next(iter(x.values())).size(-1)
    for layer, (conv, norms) in enumerate(zip(gnn.convs, gnn.norms)):
        n_dst = {nt: sum(nsn[nt][: L - layer]) for nt in nsn}
        out: dict[str, Tensor] = {}
        roots: dict[str, list[Tensor]] = {}
        for et, sage in conv.convs.items():
            s, _, d = et
            if n_dst[d] == 0:
                continue
            linear_aggr = isinstance(sage.aggr, str) and sage.aggr in ("sum", "add", "mean")
            ei = batch[et].edge_index[:, : sum(nse[et][: L - layer])]
            x_src = x.get(s, x[d].new_zeros(0, C))
            x_dst = x[d][: n_dst[d]]
            if fuse_root:
                if x_src.size(0) < n_dst[d] and linear_aggr:
                    # lin_l(sum_j x_j) = sum_j (W x_j) + b: transform the fewer side first
                    # (e.g. the 512 seed drivers that ~20k first-hop rows point to).
                    h = F.linear(x_src, sage.lin_l.weight)
                    o = sage.propagate(ei, x=(h, None), size=(x_src.size(0), n_dst[d]))
                    o = o + sage.lin_l.bias if sage.lin_l.bias is not None else o
                else:
                    msg = sage.propagate(ei, x=(x_src, x_dst), size=(x_src.size(0), n_dst[d]))
                    o = sage.lin_l(msg)
                roots.setdefault(d, []).append(sage.lin_r.weight)
            else:
                o = sage((x_src, x_dst), ei)
            out[d] = o if d not in out else out[d] + o
        for d, ws in roots.items():
            out[d] = out[d] + F.linear(x[d][: n_dst[d]], torch.stack(ws).sum(0))
        x = {d: norms[d](o).relu() for d, o in out.items()}
    return x


def resnet_folded(resnet, tf) -> Tensor:
    """``resnet(tf)`` for torch_frame's ResNet, with the column encoders folded into block 0.

    Block 0's ``lin1`` and ``shortcut`` read the flattened column embeddings
    ``[N, cols * C]``; both are linear, and so are the numerical and categorical column
    encoders, so they compose into small maps computed once per call from the
    parameters (autograd reaches every parameter as before):

    * numerical (``LinearEncoder``): cell embedding ``z * w_c + b_c`` with ``z`` the
      standardised value, zeroed where ``z`` is NaN (torch_frame's ``nan_to_num``), so
      ``sum_c A_c e_c = [z*m | m] @ [A_c w_c ; A_c b_c]`` -- a ``[N, 2 cols]`` matmul instead
      of building ``[N, cols, C]`` and a ``[N, cols*C] x [cols*C, 2C]`` matmul;
    * categorical (``EmbeddingEncoder``): ``A_c Emb[idx]`` = ``(Emb A_c^T)[idx]``: project
      the embedding table once, then gather (when the table is smaller than the batch);
    * anything else (timestamps, other encoders, inf values) takes the usual route.

    Dropout modules are called in the same order as in ResNet.forward.
    """
    from torch_frame import stype as st
    from torch_frame.nn.encoder.stype_encoder import EmbeddingEncoder, LinearEncoder

    block0 = resnet.backbone[0]
    if block0.shortcut is None:  # one column: nothing to fold
        return resnet(tf)
    enc = resnet.encoder
    N = tf.num_rows
    W = torch.cat([block0.lin1.weight, block0.shortcut.weight], 0)  # [2C, cols*C_in]
    C_out = block0.lin1.out_features
    total_cols = sum(len(enc.col_names_dict[s]) for s in tf.stypes)
    C_in = W.size(1) // total_cols
    W3 = W.view(W.size(0), total_cols, C_in)
    h = torch.cat([block0.lin1.bias, block0.shortcut.bias]).expand(N, -1)
    col = 0
    for stp in tf.stypes:
        feat = tf.feat_dict[stp]
        names = enc.col_names_dict[stp]
        n = len(names)
        Wc = W3[:, col : col + n, :]  # [2C, n, C_in]
        e = enc.encoder_dict[stp.value]
        plain = e.post_module is None and e.na_strategy is None
        if stp == st.numerical and type(e) is LinearEncoder and plain and not torch.isinf(feat).any():
            z = (feat - e.mean) / e.std
            m = ~torch.isnan(z)
            z = torch.where(m, z, torch.zeros_like(z))
            P = torch.einsum("ocj,cj->co", Wc, e.weight)  # [n, 2C]
            Q = torch.einsum("ocj,cj->co", Wc, e.bias)
            h = h + torch.cat([z, m.to(z.dtype)], 1) @ torch.cat([P, Q], 0)
        elif stp == st.categorical and type(e) is EmbeddingEncoder and plain and e.emb.num_embeddings * n < N:
            idx = feat + e.offset + 1
            idx = torch.where(feat < 0, torch.zeros_like(idx), idx)
            V = e.emb.num_embeddings
            proj = torch.einsum("vj,ocj->cvo", e.emb.weight, Wc).reshape(n * V, -1)  # [n*V, 2C]
            h = h + F.embedding(idx + torch.arange(n, device=idx.device) * V, proj).sum(1)
        else:
            x = e(feat, names)  # [N, n, C_in]
            h = h + x.reshape(N, n * C_in) @ Wc.reshape(Wc.size(0), n * C_in).t()
        col += n
    out, short = h[:, :C_out], h[:, C_out:]
    out = block0.norm1(out) if block0.norm1 else out
    out = block0.dropout(block0.relu(out))
    out = block0.lin2(out)
    out = block0.norm2(out) if block0.norm2 else out
    out = block0.dropout(block0.relu(out))
    x = out + short
    for block in resnet.backbone[1:]:
        x = block(x)
    return resnet.decoder(x)


class FastDropout(torch.nn.Module):
    """``torch.nn.Dropout(p)`` drawing its mask with ``uniform_`` + compare instead of
    ``bernoulli_`` (the same distribution from the same global generator, a different
    stream; on this CPU about 1.7x faster, and ``bernoulli_`` was the top operator)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        mask = torch.empty_like(x).uniform_().ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * mask


def use_fast_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every ``torch.nn.Dropout`` in ``model`` for :class:`FastDropout` (no parameters
    change, so state dicts stay compatible)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(module, name, FastDropout(child.p))
    return model


def fast_embed(model: RDLModel, batch: HeteroData, entity: str, fuse_root: bool = True, fold: bool = False) -> Tensor:
    """``model.embed(batch, entity)``, computed with the savings described above."""
    seed_time = batch[entity].seed_time
    x = encode_unique(model, batch, fold)
    rel = model.temporal_encoder(seed_time, batch.collect("time"), batch.collect("batch"))
    for nt, t in rel.items():
        x[nt] = x[nt] + t
    return gnn_needed(model, batch, x, fuse_root)[entity][: seed_time.size(0)]


# --------------------------------------------------------------------------- timing
@contextlib.contextmanager
def threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Runner:
    def __init__(self, name, sample_fn, forward_fn, model, lr):
        self.name, self.sample_fn, self.forward_fn, self.model = name, sample_fn, forward_fn, model
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.t_sample, self.t_compute, self.rows = [], [], []

    def step(self, nodes, times, y, gen, sample_threads, compute_threads, record=True):
        with threads(sample_threads):
            t0 = time.perf_counter()
            batch = self.sample_fn(nodes, times, gen)
            t1 = time.perf_counter()
        with threads(compute_threads):
            t2 = time.perf_counter()
            loss = F.binary_cross_entropy_with_logits(self.forward_fn(self.model, batch).view(-1), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            t3 = time.perf_counter()
        if record:
            self.t_sample.append(t1 - t0)
            self.t_compute.append(t3 - t2)
            self.rows.append(sum(batch[nt].num_nodes for nt in batch.node_types))
        return batch


def median_ms(xs):
    return statistics.median(xs) * 1e3


def report(paths, batch_size):
    base = None
    for p in paths:
        s, c = median_ms(p.t_sample), median_ms(p.t_compute)
        step = statistics.median([a + b for a, b in zip(p.t_sample, p.t_compute)]) * 1e3
        sps = batch_size / step * 1e3
        base = base or sps
        print(f"  {p.name:<16} sampling {s:8.1f} ms | fwd+bwd+opt {c:8.1f} ms | step {step:8.1f} ms | "
              f"{sps:6.1f} seeds/s | sampling share {100 * s / step:5.1f}% | x{sps / base:4.2f} vs {paths[0].name} "
              f"| rows/batch {statistics.median(p.rows):,.0f}")


# --------------------------------------------------------------------------- profile
def breakdown(model, batch, entity, y, fast: bool, sample_parts: dict, fold: bool = False, quiet: bool = False):
    """Per-part ms of one step: each part forward+backward on detached inputs."""
    res = dict(sample_parts)

    def fb(fn):
        t = time.perf_counter()
        out = fn()
        out.sum().backward() if out.requires_grad else None
        return (time.perf_counter() - t) * 1e3, out

    x = {}
    for nt in batch.node_types:
        if batch[nt].num_nodes == 0:
            continue
        if fast:
            n_id = batch[nt].n_id
            uniq, inv = torch.unique(n_id, return_inverse=True)
            first = torch.full((uniq.numel(),), n_id.numel(), dtype=torch.long)
            first.scatter_reduce_(0, inv, torch.arange(n_id.numel()), reduce="amin")
            tf = batch[nt].tf[first]
            resnet = model.encoder.encoders[nt]
            ms, out = fb(lambda: resnet_folded(resnet, tf) if fold else resnet(tf))
            x[nt] = out.detach()[inv]
            res[f"encoder {nt} ({uniq.numel():,} distinct of {n_id.numel():,} rows)"] = ms
        else:
            ms, out = fb(lambda: model.encoder.encoders[nt](batch[nt].tf))
            x[nt] = out.detach()
            res[f"encoder {nt} ({batch[nt].num_nodes:,} rows)"] = ms
    for nt in batch.node_types:
        if nt not in x:
            x[nt] = model.encoder.encoders[nt](batch[nt].tf).detach()
    seed_time = batch[entity].seed_time
    ms, rel = fb(lambda: torch.cat([v for v in model.temporal_encoder(
        seed_time, batch.collect("time"), batch.collect("batch")).values()]))
    res["temporal encoder"] = ms
    xr = {k: v.clone().requires_grad_() for k, v in x.items()}
    if fast:
        ms, h = fb(lambda: gnn_needed(model, batch, xr)[entity][: seed_time.numel()])
    else:
        ms, h = fb(lambda: model.gnn(xr, batch.collect("edge_index"))[entity][: seed_time.numel()])
    res["GNN (2 layers)"] = ms
    opt = torch.optim.Adam(model.parameters(), lr=1e-9)
    hr = h.detach().requires_grad_()
    t = time.perf_counter()
    loss = F.binary_cross_entropy_with_logits(model.head(hr).view(-1), y)
    loss.backward()
    opt.step()
    res["head + loss + optimizer"] = (time.perf_counter() - t) * 1e3
    total = sum(res.values())
    model.zero_grad(set_to_none=True)
    if quiet:
        return
    for k, v in res.items():
        print(f"    {k:<58} {v:8.1f} ms  {100 * v / total:5.1f}%")
    print(f"    {'sum':<58} {total:8.1f} ms")


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="auto", choices=["auto", "rel-f1", "rel-flights"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", nargs="+", default=["default", "1"], choices=["default", "1", "s1"])
    ap.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS,
                    help="the first one is the baseline the ratios are against")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        run(args, Path(tmp))


def run(args, tmp: Path) -> None:
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, default intra-op threads {default_threads}")
    t = time.perf_counter()
    ds, task_name = build_database(args.db, tmp)
    db = ds.get_db()
    types = column_types({n: tb.df for n, tb in db.table_dict.items()}, ds.manifest)
    data, col_stats = training.build_graph(db, types, cache_dir=tmp / "cache")
    task = ds.load_task(task_name)
    train = task.get_table("train").df
    nodes, times = training.seed_tensors(train[task.entity_col], train[task.time_col])
    y = torch.from_numpy(train[task.target_col].to_numpy(dtype=np.float32))
    entity = task.entity_table
    recipe = make_recipe("reference")
    fan = list(recipe.backbone.num_neighbors)
    B = recipe.finetune.batch_size
    n_rows = sum(data[nt].tf.num_rows for nt in data.node_types)
    print(f"{ds.manifest.name if hasattr(ds, 'manifest') else ''} {task_name}: {n_rows:,} rows in {len(data.node_types)} "
          f"tables, {len(train):,} training seeds; channels {recipe.backbone.channels}, fan-out {fan}, batch {B} "
          f"(setup {time.perf_counter() - t:.1f} s)")

    ours = TemporalNeighborSampler(data, fan, strategy=recipe.backbone.sampling)
    simple = SimpleTemporalSampler(data, fan)

    # Equivalence of the fast forward (eval mode: no dropout) on one batch.
    torch.manual_seed(args.seed)
    model0 = RDLModel(data, col_stats, recipe.backbone, out_channels=1)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(nodes), generator=g)[:B]
    batch = ours.sample(entity, nodes[idx], times[idx], generator=g)
    model0.eval()
    with torch.no_grad():
        ref = model0.embed(batch, entity)
        for fuse, fold in ((False, False), (True, False), (True, True)):
            got = fast_embed(model0, batch, entity, fuse_root=fuse, fold=fold)
            print(f"fast_embed(fuse_root={fuse}, fold={fold}) vs model.embed, eval mode: max |diff| "
                  f"{(got - ref).abs().max().item():.2e} (max |value| {ref.abs().max().item():.2f})")
    model0.train()
    # Gradients too, in eval mode (the training graph minus dropout).
    m1, m2 = copy.deepcopy(model0).eval(), copy.deepcopy(model0).eval()
    m1.embed(batch, entity).square().sum().backward()
    fast_embed(m2, batch, entity, fold=True).square().sum().backward()
    worst, nan_ref, nan_fast = 0.0, [], []
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        if p1.grad is None:
            continue
        ok = torch.isfinite(p1.grad)
        if not ok.all():
            nan_ref.append(f"{name} ({int((~ok).sum())})")
        if not torch.isfinite(p2.grad).all():
            nan_fast.append(name)
        if ok.any():
            d = (p1.grad - p2.grad)[ok].abs().max() / p1.grad[ok].abs().max().clamp_min(1e-12)
            worst = max(worst, d.item())
    print(f"gradients, fast_embed(fold=True) vs model.embed: worst relative max |diff| {worst:.1e} over finite "
          f"entries; non-finite: model.embed {nan_ref or 'none'}, fast_embed {nan_fast or 'none'}")
    if nan_ref:
        print("  (torch_frame's LinearEncoder: a NaN cell gives NaN * 0 = NaN in its weight gradient; one optimiser "
              "step makes that column's weights NaN, and nan_to_num then silently zeroes the column for good)")

    def ours_sample(n, tm, gen):
        return ours.sample(entity, n, tm, generator=gen)

    def simple_sample(n, tm, gen):
        return simple.sample(entity, n, tm, generator=gen)

    def std_forward(m, b):
        return m(b, entity)

    def fast_forward(m, b):
        return m.head(fast_embed(m, b, entity))

    def fold_forward(m, b):
        return m.head(fast_embed(m, b, entity, fold=True))

    path_defs = {  # name: (sampler, forward, model transform)
        "straightforward": (simple_sample, std_forward, None),
        "ours": (ours_sample, std_forward, None),
        "+dedup+trim": (ours_sample, fast_forward, None),
        "+fold": (ours_sample, fold_forward, None),
        "+dropout (all)": (ours_sample, fold_forward, use_fast_dropout),
    }

    def make_path(name):
        sample_fn, forward_fn, transform = path_defs[name]
        model = copy.deepcopy(model0)
        return Runner(name, sample_fn, forward_fn, transform(model) if transform else model, lr)

    lr = recipe.finetune.lr
    for setting in args.threads:
        sample_threads = {"default": default_threads, "1": 1, "s1": 1}[setting]
        compute_threads = {"default": default_threads, "1": 1, "s1": default_threads}[setting]
        paths = [make_path(name) for name in args.paths]
        gen = torch.Generator().manual_seed(args.seed + 1)
        for step in range(args.warmup + args.steps):
            idx = torch.randperm(len(nodes), generator=gen)[:B]
            for p in paths:  # the same seeds for every path, interleaved
                p.step(nodes[idx], times[idx], y[idx], gen, sample_threads, compute_threads, record=step >= args.warmup)
        print(f"threads: sampling {sample_threads}, compute {compute_threads} -- medians over {args.steps} steps "
              f"after {args.warmup} warm-up (batch {B}):")
        report(paths, B)

    if args.profile:
        with threads(1):
            g = torch.Generator().manual_seed(args.seed + 2)
            idx = torch.randperm(len(nodes), generator=g)[:B]
            t0 = time.perf_counter()
            out = ours.sample_output(entity, nodes[idx], times[idx], generator=g)
            t1 = time.perf_counter()
            batch = ours.to_hetero_data(out, entity)
            t2 = time.perf_counter()
            simple.sample(entity, nodes[idx], times[idx], generator=g)
            t3 = time.perf_counter()
            for fast, fold, name in ((False, False, "ours: model(batch) as in training.py"),
                                     (True, False, "+dedup+trim"), (True, True, "+fold"),
                                     (True, True, "+dropout (all)")):
                model = copy.deepcopy(model0)
                if name.startswith("+dropout"):
                    use_fast_dropout(model)
                breakdown(model, batch, entity, y[idx], fast, {}, fold, quiet=True)  # warm-up
                print(f"profile, 1 thread, {name}:")
                parts = {"sampling (ours, ids + edges)": (t1 - t0) * 1e3, "batch assembly (tf/time gather)": (t2 - t1) * 1e3}
                if not fast:
                    print(f"    (for reference, not in the sum: the straightforward sampler, whole: {(t3 - t2) * 1e3:.1f} ms)")
                breakdown(model, batch, entity, y[idx], fast, parts, fold)
            from torch.profiler import ProfilerActivity, profile

            p = make_path("+dropout (all)")
            p.step(nodes[idx], times[idx], y[idx], g, 1, 1, record=False)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                p.step(nodes[idx], times[idx], y[idx], g, 1, 1, record=False)
            print("torch.profiler, one '+dropout (all)' step, 1 thread, top operators by self CPU time:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
