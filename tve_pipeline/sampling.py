"""Exact disjoint temporal neighbour sampling in vectorised PyTorch.

PyG's temporal ``NeighborLoader`` needs ``pyg-lib``, which cannot be installed here
(DESIGN.md section 2), so this module re-implements the "disjoint temporal" sampling that
RelBench relies on. At construction every edge type ``(S, rel, D)`` becomes a CSC
structure: for each destination row ``v`` the contiguous segment of its source rows,
sorted by source time (ties by source id). For a frontier node ``v`` of a subgraph whose
seed time is ``s``, the eligible candidates (``time <= s``) are therefore a *prefix* of
``v``'s segment, and the prefix lengths of a whole frontier come from ONE
``torch.searchsorted`` over a composite int64 key ``v * span + (time - tmin + 1)``
(rank-compressed times if the raw span would overflow the key; a vectorised segmented
bisection if even that would). Edge types in which every destination has at most one
source (fact row -> the row its foreign key points to) skip the CSC: the candidate is a
lookup. Choosing ``k`` of the ``n`` eligible candidates is exact and vectorised over all
frontier nodes at once: take all when ``n <= k``; ``last`` takes the ``k`` most recent (the
tail of the prefix); ``uniform`` shuffles mid-size segments (``k < n <= 2k``) with one
global ``randperm`` plus a stable sort by segment, and for large segments draws ``k``
slots with replacement and re-draws the duplicated slots until ``k`` distinct remain
(accepting the first ``k`` distinct values of an i.i.d. uniform stream is sampling
without replacement, so this is exact; as ``n > 2k`` a re-draw collides with probability
< 1/2, so few rounds are needed). Work is thus O(k) per frontier node whatever its degree.
Each seed owns its own subgraph: node identity inside the batch is ``(seed index, type,
row id)``, deduplicated per hop with the composite key ``batch * num_rows + id`` (one sort
of the new candidates, ``searchsorted`` against the sorted keys of the nodes already in
the batch). Python loops run only over hops, edge types and the few re-draw rounds, never
over seeds or nodes.

Semantics (those of pyg-lib's disjoint temporal sampling as RelBench uses it):

* Seeds are the first ``len(nodes)`` rows of ``entity_table`` in input order
  (``batch = arange``); they are included whatever their own time.
* Hop ``i`` expands exactly the nodes first added at hop ``i - 1`` along every edge type
  whose destination is the node's type, sampling at most ``num_neighbors[i]`` PER EDGE
  TYPE (a negative value means "all eligible").
* A source row of a timed table is eligible iff ``time <= seed_time`` of its subgraph;
  rows of untimed tables are always eligible.
* A row already in a seed's subgraph is not added again nor re-expanded, but the edge to
  it is still recorded. Node order per type: by hop; within a hop, by (seed index, row
  id). ``num_sampled_nodes`` (per type, per hop) and ``num_sampled_edges`` (per edge
  type, per hop) are recorded as PyG's loaders do.
* The sampler is meant for CPU tensors (a ``generator`` must live on the data's device).
  On a machine whose cores are shared, torch's intra-op threads can make the small ops
  used here far slower than one thread; DataLoader workers already run single-threaded.

PyG integration: :class:`TemporalNeighborSampler` is a
``torch_geometric.sampler.NeighborSampler`` whose ``sample_from_nodes`` returns a
``HeteroSamplerOutput`` (global ids per type, local ``row``/``col`` per edge type,
``batch``, ``num_sampled_nodes``/``num_sampled_edges``, ``metadata = (input_id,
seed_time)``), so ``NodeLoader(data, node_sampler=sampler, input_nodes=(table, ids),
input_time=times, batch_size=..., shuffle=...)`` -- or ``NeighborLoader(...,
time_attr="time", neighbor_sampler=sampler)`` -- yields batches with ``tf``, ``time``,
``n_id``, ``batch`` per type and ``seed_time``/``input_id``/``batch_size`` on the seed
table, as RelBench's examples read them. :meth:`TemporalNeighborSampler.sample` is the
same sampling joined with the features by the same code path as the loader
(:meth:`~TemporalNeighborSampler.to_hetero_data`), so both give identical batches for the
same seeds and generator. Loaders pass no generator: see the ``seed`` argument for how
their batches are seeded.

Training and prediction draw their batches with :meth:`TemporalNeighborSampler.sample`,
one batch ahead on a worker thread (:class:`Prefetcher`), from the sampler a recipe's
backbone asks for (:func:`sampler_for`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.loader import NodeLoader
from torch_geometric.loader.utils import filter_hetero_data
from torch_geometric.sampler import HeteroSamplerOutput, NeighborSampler, NodeSamplerInput
from torch_geometric.sampler.base import DataType, SubgraphType

if TYPE_CHECKING:
    from tve_pipeline.config import BackboneConfig

__all__ = ["Prefetcher", "TemporalNeighborSampler", "sampler_for"]

# A composite int64 key must stay below this (keeps a factor-2 margin under 2**63).
_KEY_LIMIT = 2**62
# Uniform sampling of k from n > _SHUFFLE_RATIO * k uses re-draw of duplicates; below,
# a full shuffle of the (at most _SHUFFLE_RATIO * k) candidates is cheaper and exact.
_SHUFFLE_RATIO = 2
_STRATEGIES = ("uniform", "last")


def _exclusive_cumsum(x: Tensor) -> Tensor:
    out = torch.zeros_like(x)
    if x.numel() > 1:
        torch.cumsum(x[:-1], dim=0, out=out[1:])
    return out


def _segment_arange(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For segments of the given sizes: (segment id, position within segment) per element."""
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    pos = torch.arange(seg.numel(), device=counts.device) - _exclusive_cumsum(counts)[seg]
    return seg, pos


def _randbelow(n: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform integers in [0, n) elementwise (modulo bias <= n / 2**62: negligible)."""
    draws = torch.randint(0, 2**62, n.shape, generator=generator, device=n.device)
    return draws % n


@dataclass
class _CSC:
    """One edge type (src_type, rel, dst_type), grouped by destination, time-sorted.

    ``mode`` says how the eligible candidates are found:

    * ``"parent"``: every destination has at most one source (the direction from a fact
      row to the row its foreign key names -- half the edge types of a pkey/fkey graph),
      so no CSC is needed: ``parent[v]`` is the only candidate;
    * ``"untimed"``: the source table has no time, every candidate is eligible;
    * ``"offset"``: key = dst * span + (time - tmin + 1), one searchsorted;
    * ``"rank"``: the same with rank-compressed times, when the raw time span would
      overflow the key;
    * ``"bisect"``: segmented bisection over ``row_time``, the last resort.
    """

    src_type: str
    dst_type: str
    colptr: Tensor  # [num_dst + 1] segment boundaries into `row`
    row: Tensor  # [E] source row ids, per segment sorted by (source time, source id)
    mode: str
    key: Tensor | None = None  # [E] composite key, non-decreasing ("offset"/"rank")
    span: int = 0
    tmin: int = 0
    utimes: Tensor | None = None  # sorted distinct source times ("rank")
    row_time: Tensor | None = None  # [E] source time per edge ("bisect")
    parent: Tensor | None = None  # [num_dst] the single source row, -1 if none ("parent")
    parent_time: Tensor | None = None  # [num_dst] its time, if the source table is timed

    @classmethod
    def build(
        cls, src_type: str, dst_type: str, edge_index: Tensor, num_dst: int, src_time: Tensor | None
    ) -> _CSC:
        src, dst = edge_index[0].long(), edge_index[1].long()
        n_dst = max(num_dst, 1)
        deg = torch.bincount(dst, minlength=num_dst)
        colptr = torch.zeros(num_dst + 1, dtype=torch.long, device=src.device)
        torch.cumsum(deg, dim=0, out=colptr[1:])
        if deg.numel() == 0 or int(deg.max()) <= 1:
            parent = torch.full((num_dst,), -1, dtype=torch.long, device=src.device)
            parent[dst] = src
            csc = cls(src_type, dst_type, colptr, src[:0], "parent", parent=parent)
            if src_time is not None:
                csc.parent_time = src_time.long()[parent.clamp(min=0)]
            return csc
        # Ties (equal time) are broken by source id, so that `last` and the uniform draws
        # are deterministic: every later sort is stable over a source-sorted edge list.
        # relbench's edge lists are already sorted by source; then this costs one pass.
        if src.numel() > 1 and not bool((src[1:] >= src[:-1]).all()):
            p = torch.argsort(src, stable=True)
            src, dst = src[p], dst[p]
        fields: dict = {}
        if src_time is None:
            mode, key = "untimed", dst
        else:
            t = src_time[src].long()
            tmin, tmax = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
            span = tmax - tmin + 2  # offsets 1..span-1; 0 = "before every row"
            if n_dst * span < _KEY_LIMIT:
                mode, key = "offset", dst * span + (t - tmin + 1)
                fields = dict(span=span, tmin=tmin)
            else:
                # Rank-compress the times: the key then needs num_dst * (#distinct + 1).
                utimes, rank = torch.unique(t, sorted=True, return_inverse=True)
                span = utimes.numel() + 1
                if n_dst * span < _KEY_LIMIT:
                    mode, key = "rank", dst * span + (rank + 1)
                    fields = dict(span=span, utimes=utimes)
                else:
                    p = torch.argsort(t, stable=True)
                    src, dst, t = src[p], dst[p], t[p]
                    mode, key = "bisect", dst
        perm = torch.argsort(key, stable=True)
        row = src[perm]
        if mode in ("offset", "rank"):
            fields["key"] = key[perm]
        elif mode == "bisect":
            fields["row_time"] = t[perm]
        return cls(src_type, dst_type, colptr, row, mode, **fields)

    def sample(
        self, v: Tensor, seed_time: Tensor, k: int, strategy: str, generator
    ) -> tuple[Tensor, Tensor]:
        """Sampled neighbours of frontier nodes v: (frontier row, source row id) pairs."""
        if k == 0:
            return v[:0], v[:0]
        if self.mode == "parent":
            cand = self.parent[v]
            ok = cand >= 0
            if self.parent_time is not None:
                ok &= self.parent_time[v] <= seed_time
            rows = torch.nonzero(ok).flatten()
            return rows, cand[rows]
        start, n = self.eligible_count(v, seed_time)
        rows, pos = _choose(start, n, k, strategy, generator)
        return rows, self.row[pos]

    def eligible_count(self, v: Tensor, seed_time: Tensor) -> tuple[Tensor, Tensor]:
        """(segment start, number of eligible sources) for frontier nodes v at seed_time."""
        start = self.colptr[v]
        end = self.colptr[v + 1]
        if self.mode == "untimed":
            return start, end - start
        if self.mode in ("offset", "rank"):
            # top = largest eligible time code: sources with code <= top are eligible, and
            # 0 <= top <= span - 1 keeps the query inside v's own key range [v*span, (v+1)*span).
            if self.mode == "offset":
                top = seed_time.clamp(self.tmin - 1, self.tmin + self.span - 2) - (self.tmin - 1)
            else:
                top = torch.searchsorted(self.utimes, seed_time, right=True)
            stop = torch.searchsorted(self.key, v * self.span + top, right=True)
            return start, stop - start
        # "bisect": vectorised bisection over every segment at once; the loop runs
        # log2(max degree) times, not once per node.
        lo, hi = start.clone(), end.clone()
        last = max(self.row.numel() - 1, 0)
        while True:
            active = lo < hi
            if not bool(active.any()):
                break
            mid = (lo + hi) // 2
            ok = self.row_time[mid.clamp(max=last)] <= seed_time
            lo = torch.where(active & ok, mid + 1, lo)
            hi = torch.where(active & ~ok, mid, hi)
        return start, lo - start


def _choose(
    start: Tensor, n: Tensor, k: int, strategy: str, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Pick min(n, k) of each eligible prefix [start, start + n).

    Returns (frontier row, CSC position) per pick, grouped by frontier row in order.
    """
    c = n if k < 0 else n.clamp(max=k)
    rows, slot = _segment_arange(c)
    if strategy == "last":
        # The eligible prefix is time-sorted, so the k most recent are its tail.
        return rows, start[rows] + (n - c)[rows] + slot
    offs = _exclusive_cumsum(c)
    pos = start[rows] + slot  # correct for every segment with n <= k (take all)
    if k < 0:
        return rows, pos

    # Medium segments (k < n <= 2k): shuffle each segment exactly with ONE global random
    # permutation followed by a stable sort by segment id -- the relative order inside
    # every segment is then a uniform permutation; keep its first k.
    med = torch.nonzero((n > k) & (n <= _SHUFFLE_RATIO * k)).flatten()
    if med.numel():
        seg, within = _segment_arange(n[med])
        perm = torch.randperm(seg.numel(), generator=generator, device=n.device)
        shuffled = perm[torch.argsort(seg[perm], stable=True)]  # grouped like `seg`
        keep = within < k
        kept_rows = med[seg[keep]]  # the frontier row of each kept slot
        pos[offs[kept_rows] + within[keep]] = start[kept_rows] + within[shuffled[keep]]

    # Large segments (n > 2k): k draws with replacement, then re-draw every slot holding
    # a value already present in its row. Accepted values are the first k distinct ones of
    # an i.i.d. uniform stream => a uniform k-subset. Sorting each row puts duplicates
    # side by side; only rows that still have duplicates take part in the next round.
    big = torch.nonzero(n > _SHUFFLE_RATIO * k).flatten()
    if big.numel():
        nb = n[big].unsqueeze(1).expand(-1, k)
        picks = _randbelow(nb, generator)
        active = torch.arange(big.numel(), device=n.device)
        while active.numel():
            sub = picks[active].sort(dim=1).values
            dup = torch.zeros_like(sub, dtype=torch.bool)
            dup[:, 1:] = sub[:, 1:] == sub[:, :-1]
            has_dup = dup.any(dim=1)
            sub[dup] = _randbelow(nb[active][dup], generator)
            picks[active] = sub
            active = active[has_dup]
        pick_rows = big.unsqueeze(1).expand(-1, k)  # the frontier row of each pick
        pos[offs[pick_rows] + torch.arange(k, device=n.device)] = start[pick_rows] + picks
    return rows, pos


@dataclass
class _Subgraphs:
    """The seeds' subgraphs as sampled so far, built hop by hop by ``sample_output``.

    Per node type: chunks of (global id, seed index) in local-index order, the node
    count, and the sorted composite keys (batch * num_rows + id) of all nodes so far with
    their local index, for "already in this seed's subgraph?" look-ups; per edge type the
    (local src, local dst) chunks; per type and hop, the counts PyG's loaders record.
    """

    ids_chunks: dict[str, list[Tensor]]
    batch_chunks: dict[str, list[Tensor]]
    count: dict[str, int]
    keys: dict[str, Tensor]
    key_local: dict[str, Tensor]
    n_sampled_nodes: dict[str, list[int]]
    n_sampled_edges: dict[tuple, list[int]]
    edge_chunks: dict[tuple, list[tuple[Tensor, Tensor]]]


class TemporalNeighborSampler(NeighborSampler):
    """Disjoint temporal neighbour sampler over a RelBench ``make_pkey_fkey_graph`` graph.

    A :class:`torch_geometric.sampler.NeighborSampler`: PyG's loaders take it as
    ``node_sampler=`` (:class:`~torch_geometric.loader.NodeLoader`) or
    ``neighbor_sampler=`` (:class:`~torch_geometric.loader.NeighborLoader`, with
    ``time_attr="time"``), and :meth:`sample` gives the same batch for one list of seeds
    without a loader. See :meth:`loader` and the module docstring.

    Args:
        data: the full graph (``data[table].tf``, optional ``data[table].time`` in unix
            seconds, edge types ``(src, rel, dst)`` with ``edge_index = [src; dst]``).
        num_neighbors: fan-out per hop, applied per (frontier node, edge type); a negative
            value takes every eligible neighbour.
        strategy: ``"uniform"`` (k without replacement) or ``"last"`` (k most recent).
        seed: how batches drawn through PyG's loaders (which pass no generator) are
            seeded. ``None``: from torch's global generator (reproducible under
            ``torch.manual_seed`` for a fixed ``num_workers``; the DataLoader seeds each
            worker from it). An int: every batch gets its own generator, seeded from
            ``(seed, epoch, the batch's input ids)`` (:meth:`generator_for`) -- the draw is
            then a function of the batch alone, whatever the worker count, prefetching,
            other users of the global generator, or a resume mid-epoch. Call
            :meth:`set_epoch` each epoch for fresh draws of a recurring batch.
    """

    def __init__(
        self,
        data: HeteroData,
        num_neighbors: list[int],
        *,
        strategy: str = "uniform",
        seed: int | None = None,
    ):
        # NeighborSampler.__init__ is deliberately not called: it builds PyG's own CSC
        # (unused here) and its sampling needs pyg-lib. The attributes PyG's loaders and
        # NeighborSampler's properties read are set here instead.
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        self.data = data
        self.fanout = [int(k) for k in num_neighbors]
        self.strategy = strategy
        self.seed = None if seed is None else int(seed)
        self.epoch = 0
        self.node_types: list[str] = list(data.node_types)
        self.edge_types = list(data.edge_types)
        self.num_rows: dict[str, int] = {}
        for nt in self.node_types:
            store = data[nt]
            n = store.tf.num_rows if "tf" in store else store.num_nodes
            self.num_rows[nt] = int(n or 0)
        self.time: dict[str, Tensor] = {
            nt: data[nt].time.long() for nt in self.node_types if "time" in data[nt]
        }
        self.csc: dict[tuple, _CSC] = {}
        for et in self.edge_types:
            s, _, d = et
            self.csc[et] = _CSC.build(s, d, data[et].edge_index, self.num_rows[d], self.time.get(s))
        # --- NeighborSampler's state, as its own __init__ would leave it
        self.data_type = DataType.heterogeneous
        self.sample_direction = "forward"
        self.num_nodes = dict(self.num_rows)
        self.node_time = self.time or None  # timed => `is_temporal`, hence `disjoint`
        self.edge_time = None
        self.edge_weight = None
        self.perm = None  # edge ids are not returned (RelBench graphs have no edge features)
        self.num_neighbors = list(self.fanout)  # NeighborSampler's setter: a NumNeighbors
        self.replace = False
        self.subgraph_type = SubgraphType.directional
        self.disjoint = True
        self.temporal_strategy = strategy
        self.keep_orig_edges = False

    # ------------------------------------------------------------------ seeding
    def set_epoch(self, epoch: int) -> None:
        """Mixed into the per-batch seed (only when ``seed`` is set)."""
        self.epoch = int(epoch)

    def generator_for(self, input_id: Tensor) -> torch.Generator | None:
        """The generator a loader batch with these input ids samples with.

        ``None`` (torch's global generator) when ``seed`` is None; otherwise a fresh
        generator seeded with a 64-bit hash of ``(seed, epoch, input_id)``.
        """
        if self.seed is None:
            return None
        h = hashlib.blake2b(digest_size=8)
        h.update(struct.pack("<qq", self.seed, self.epoch))
        h.update(torch.as_tensor(input_id).detach().cpu().long().contiguous().numpy().tobytes())
        return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little"))

    # ------------------------------------------------------------------ PyG interface
    def sample_from_nodes(self, inputs: NodeSamplerInput) -> HeteroSamplerOutput:
        """PyG's entry point (NodeLoader / NeighborLoader): one subgraph per input seed.

        Seed times come from ``inputs.time`` (the loader's ``input_time``); without them,
        from the seed rows' own time, as PyG's temporal NeighborLoader does.
        """
        entity = inputs.input_type
        if entity is None:
            raise ValueError(
                "TemporalNeighborSampler samples heterogeneous graphs: "
                "pass input_nodes=(node_type, ids)"
            )
        nodes = inputs.node
        if inputs.time is not None:
            seed_time = inputs.time
        elif entity in self.time:
            seed_time = self.time[entity][nodes.long()]
        else:
            raise ValueError(
                f"no seed times: pass input_time (table {entity!r} has no time column)"
            )
        input_id = inputs.input_id if inputs.input_id is not None else torch.arange(nodes.numel())
        return self.sample_output(
            entity, nodes, seed_time, generator=self.generator_for(input_id), input_id=input_id
        )

    def sample_from_edges(self, inputs, neg_sampling=None):
        raise NotImplementedError(
            "TemporalNeighborSampler samples from seed nodes only (no link-level sampling)"
        )

    def to_hetero_data(self, out: HeteroSamplerOutput, entity_table: str) -> HeteroData:
        """Join a sampler output with the graph's features: what NodeLoader yields.

        The same steps as ``NodeLoader.filter_fn`` (``filter_hetero_data`` copies every
        node attribute -- ``tf``, ``time`` -- at ``out.node``; ``n_id``, ``batch``,
        ``num_sampled_*`` per store; ``input_id``, ``seed_time``, ``batch_size`` on the
        entity store), so :meth:`sample` and a loader give identical batches.
        """
        data = filter_hetero_data(
            self.data, dict(out.node), dict(out.row), dict(out.col), dict(out.edge or {}), self.perm
        )
        for nt, node in out.node.items():
            if "n_id" not in data[nt]:
                data[nt].n_id = node
        data.set_value_dict("batch", out.batch)
        data.set_value_dict("num_sampled_nodes", out.num_sampled_nodes)
        data.set_value_dict("num_sampled_edges", out.num_sampled_edges)
        data[entity_table].input_id = out.metadata[0]
        data[entity_table].seed_time = out.metadata[1]
        data[entity_table].batch_size = out.metadata[0].size(0)
        return data

    def loader(self, entity_table: str, nodes: Tensor, seed_time: Tensor, **kwargs) -> NodeLoader:
        """A PyG ``NodeLoader`` over seeds ``(nodes[i], seed_time[i])`` with this sampler.

        ``kwargs`` go to the loader (``batch_size``, ``shuffle``, ``num_workers``, ...).
        """
        nodes = torch.as_tensor(nodes, dtype=torch.long).flatten()
        seed_time = torch.as_tensor(seed_time, dtype=torch.long).flatten()
        return NodeLoader(
            self.data,
            node_sampler=self,
            input_nodes=(entity_table, nodes),
            input_time=seed_time,
            **kwargs,
        )

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        entity_table: str,
        nodes: Tensor,
        seed_time: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> HeteroData:
        """Sample one disjoint temporal subgraph per seed ``(nodes[i], seed_time[i])``.

        The batch a ``NodeLoader`` would yield for these seeds (``input_id`` = 0..B-1),
        drawn with ``generator`` (torch's global generator if None).
        """
        return self.to_hetero_data(
            self.sample_output(entity_table, nodes, seed_time, generator=generator), entity_table
        )

    def sample_output(
        self,
        entity_table: str,
        nodes: Tensor,
        seed_time: Tensor,
        *,
        generator: torch.Generator | None = None,
        input_id: Tensor | None = None,
    ) -> HeteroSamplerOutput:
        """The sampling itself, without features: node ids, local edges, hops, metadata."""
        nodes, seed_time = self._checked_seeds(entity_table, nodes, seed_time)
        device = nodes.device
        num_seeds = nodes.numel()
        empty = torch.empty(0, dtype=torch.long, device=device)
        if input_id is None:
            input_id = torch.arange(num_seeds, device=device)
        seed_batch = torch.arange(num_seeds, device=device)
        graphs = self._seed_subgraphs(entity_table, nodes, seed_batch, empty)
        # frontier: type -> (global id, seed index, local index) of the nodes new last hop
        frontier = {entity_table: (nodes, seed_batch, seed_batch)} if num_seeds else {}
        for hop, k in enumerate(self.fanout):
            last_hop = hop == len(self.fanout) - 1
            # sample per edge type, candidates grouped by source type; then add them
            per_src = self._candidates(frontier, seed_time, k, generator)
            frontier = self._add_hop(graphs, per_src, not last_hop, device)
        return self._sampler_output(graphs, input_id, seed_time, empty)

    def _seed_subgraphs(
        self, entity_table: str, nodes: Tensor, seed_batch: Tensor, empty: Tensor
    ) -> _Subgraphs:
        """The subgraphs before the first hop: each seed alone in its own."""
        graphs = _Subgraphs(
            ids_chunks={nt: [] for nt in self.node_types},
            batch_chunks={nt: [] for nt in self.node_types},
            count={nt: 0 for nt in self.node_types},
            keys={nt: empty for nt in self.node_types},
            key_local={nt: empty for nt in self.node_types},
            n_sampled_nodes={nt: [0] for nt in self.node_types},
            n_sampled_edges={et: [] for et in self.edge_types},
            edge_chunks={et: [] for et in self.edge_types},
        )
        num_seeds = nodes.numel()
        graphs.ids_chunks[entity_table].append(nodes)
        graphs.batch_chunks[entity_table].append(seed_batch)
        graphs.count[entity_table] = num_seeds
        graphs.n_sampled_nodes[entity_table][0] = num_seeds
        graphs.keys[entity_table], graphs.key_local[entity_table] = torch.sort(
            seed_batch * self.num_rows[entity_table] + nodes
        )
        return graphs

    def _add_hop(
        self, graphs: _Subgraphs, per_src: dict[str, list[tuple]], update: bool, device
    ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Add one hop's new nodes and its edges to the subgraphs; return the next frontier."""
        # Per source type: map candidates to local indices, appending new nodes; ``update``
        # keeps the look-up keys current (not needed after the last hop).
        new_frontier = {}
        hop_edges: dict[tuple, int] = {}
        for nt in self.node_types:
            parts = per_src.get(nt)
            if not parts:
                graphs.n_sampled_nodes[nt].append(0)
                continue
            cand_id = torch.cat([p[1] for p in parts])
            cand_batch = torch.cat([p[2] for p in parts])
            local, new = self._assign_local(
                nt, cand_id, cand_batch, graphs.count, graphs.keys, graphs.key_local, update
            )
            n_new = new[0].numel()
            graphs.n_sampled_nodes[nt].append(n_new)
            if n_new:
                count = graphs.count[nt]
                new_local = torch.arange(count, count + n_new, device=device)
                graphs.ids_chunks[nt].append(new[0])
                graphs.batch_chunks[nt].append(new[1])
                graphs.count[nt] += n_new
                new_frontier[nt] = (new[0], new[1], new_local)
            offset = 0
            for et, src, _, dst_local in parts:
                m = src.numel()
                # messages flow neighbour (src) -> frontier node (dst)
                graphs.edge_chunks[et].append((local[offset : offset + m], dst_local))
                hop_edges[et] = m
                offset += m
        for et in self.edge_types:
            graphs.n_sampled_edges[et].append(hop_edges.get(et, 0))
        return new_frontier

    def _sampler_output(
        self, graphs: _Subgraphs, input_id: Tensor, seed_time: Tensor, empty: Tensor
    ) -> HeteroSamplerOutput:
        """The subgraphs as PyG's sampler output: each type's chunks concatenated."""

        def cat(chunks):
            return torch.cat(chunks) if chunks else empty

        return HeteroSamplerOutput(
            node={nt: cat(graphs.ids_chunks[nt]) for nt in self.node_types},
            row={et: cat([c[0] for c in graphs.edge_chunks[et]]) for et in self.edge_types},
            col={et: cat([c[1] for c in graphs.edge_chunks[et]]) for et in self.edge_types},
            edge={et: None for et in self.edge_types},
            batch={nt: cat(graphs.batch_chunks[nt]) for nt in self.node_types},
            num_sampled_nodes=graphs.n_sampled_nodes,
            num_sampled_edges=graphs.n_sampled_edges,
            metadata=(input_id, seed_time),
        )

    def _checked_seeds(self, entity_table: str, nodes, seed_time) -> tuple[Tensor, Tensor]:
        """Seed ids and times as flat int64 tensors, checked against the graph."""
        nodes = torch.as_tensor(nodes, dtype=torch.long).flatten()
        seed_time = torch.as_tensor(seed_time, dtype=torch.long).flatten()
        if nodes.numel() != seed_time.numel():
            raise ValueError("nodes and seed_time must have the same length")
        if entity_table not in self.num_rows:
            raise KeyError(f"unknown node type {entity_table!r}")
        if nodes.numel() and (
            int(nodes.min()) < 0 or int(nodes.max()) >= self.num_rows[entity_table]
        ):
            raise IndexError(f"seed ids out of range for {entity_table!r}")
        return nodes, seed_time

    def _candidates(
        self, frontier: dict, seed_time: Tensor, k: int, generator
    ) -> dict[str, list[tuple]]:
        """One hop's draw along every edge type into the frontier, grouped by source type:
        (edge type, neighbour ids, their seed index, the frontier node's local index)."""
        per_src: dict[str, list[tuple]] = {}
        for et, csc in self.csc.items():
            if csc.dst_type not in frontier:
                continue
            f_id, f_batch, f_local = frontier[csc.dst_type]
            rows, src = csc.sample(f_id, seed_time[f_batch], k, self.strategy, generator)
            per_src.setdefault(csc.src_type, []).append((et, src, f_batch[rows], f_local[rows]))
        return per_src

    def _assign_local(self, nt, cand_id, cand_batch, count, keys, key_local, update: bool):
        """Local index of each candidate of type nt, adding the ones new to their subgraph.

        Returns (local index per candidate, (ids, seed index) of the new nodes). New nodes
        are numbered in (seed index, row id) order -- grouped by seed, and the order the
        sort produces anyway. ``update`` keeps the look-up table current (not needed
        after the last hop).
        """
        n_rows = self.num_rows[nt]
        ckey = cand_batch * n_rows + cand_id
        old, old_local = keys[nt], key_local[nt]
        miss = None
        if old.numel():
            # Already in the subgraph (a seed, or a node of an earlier hop)?
            p = torch.searchsorted(old, ckey).clamp_(max=old.numel() - 1)
            found = old[p] == ckey
            local = old_local[p]
            if bool(found.all()):
                return local, (cand_id[:0], cand_batch[:0])
            miss = torch.nonzero(~found).flatten()
            ckey_new = ckey[miss]
        else:
            local = torch.empty_like(ckey)
            ckey_new = ckey
        # Deduplicate the rest with one sort: runs of equal keys are one new node.
        sk, perm = torch.sort(ckey_new)
        first = torch.ones_like(sk, dtype=torch.bool)
        first[1:] = sk[1:] != sk[:-1]
        uniq = sk[first]
        new_local = torch.empty_like(sk)
        new_local[perm] = count[nt] + torch.cumsum(first, 0) - 1
        if miss is None:
            local = new_local
        else:
            local[miss] = new_local
        if update:
            fresh_local = torch.arange(count[nt], count[nt] + uniq.numel(), device=sk.device)
            if old.numel():
                # Merge two sorted, disjoint key lists without a full re-sort.
                size = old.numel() + uniq.numel()
                at_new = torch.searchsorted(old, uniq) + torch.arange(
                    uniq.numel(), device=sk.device
                )
                at_old = torch.searchsorted(uniq, old) + torch.arange(old.numel(), device=sk.device)
                merged, merged_local = sk.new_empty(size), sk.new_empty(size)
                merged[at_new], merged_local[at_new] = uniq, fresh_local
                merged[at_old], merged_local[at_old] = old, old_local
                keys[nt], key_local[nt] = merged, merged_local
            else:
                keys[nt], key_local[nt] = uniq, fresh_local
        return local, (uniq % n_rows, uniq // n_rows)


def sampler_for(data: HeteroData, backbone: BackboneConfig) -> TemporalNeighborSampler:
    """The sampler a recipe's backbone asks for: its fan-out and sampling strategy."""
    return TemporalNeighborSampler(data, list(backbone.num_neighbors), strategy=backbone.sampling)


class Prefetcher:
    """Runs ``fn(item)`` for the next item on a worker thread while the caller uses this one.

    ``for out in Prefetcher(fn, items)``: results in order, at most one computed ahead.
    The worker calls ``fn`` on the items one at a time, in order, so a generator that
    ``fn`` shares across items is consumed exactly as in a plain loop: the results are the
    same with or without the thread (``enabled=False`` is that plain loop). Sampling a
    temporal subgraph is host work that releases the GIL in torch's kernels; on a GPU it
    overlaps the device's step, on a CPU the spare core's.
    """

    def __init__(self, fn: Callable, items, enabled: bool = True):
        self.fn, self.items, self.enabled = fn, list(items), enabled

    def __iter__(self):
        if not self.enabled or len(self.items) < 2:
            for item in self.items:
                yield self.fn(item)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tve-prefetch") as pool:
            pending = pool.submit(self.fn, self.items[0])
            try:
                for i in range(len(self.items)):
                    result = pending.result()
                    if i + 1 < len(self.items):
                        pending = pool.submit(self.fn, self.items[i + 1])
                    yield result
            finally:
                pending.cancel()
