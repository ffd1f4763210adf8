"""The RDL backbone (RelBench's recipe) and the heads that sit on it.

Per-table torch_frame ResNet encoders, a relative-time encoding of every sampled row, a
heterogeneous GraphSAGE over the temporal subgraph, and a linear head on the seed
entities (DESIGN.md section 2). The parts come from ``relbench.modeling.nn``. The
*backbone* is everything but the head: that is what pre-training produces and what
transfer copies.

``RDLModel.embed`` computes exactly the function of relbench's modules (same parameters,
same state_dict; ``fast=False`` runs the modules as they are), about 5x faster on CPU:
each distinct sampled row is encoded once (on rel-f1 three sampled rows in four repeat
across a batch's seeds), the column encoders are folded into the first ResNet block,
each GNN layer runs only for the nodes the seeds' outputs depend on, and dropout draws
its mask with ``uniform_`` (bench/bench_training.py measures each step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_frame
from relbench.modeling.nn import (
    _DEFAULT_STYPE_ENCODER_CLS_KWARGS,
    HeteroEncoder,
    HeteroGraphSAGE,
    HeteroTemporalEncoder,
)
from torch import Tensor
from torch_frame.nn import EmbeddingEncoder, LinearEncoder
from torch_geometric.data import HeteroData

from tve_pipeline.config import BackboneConfig

BACKBONE_PREFIXES = ("encoder.", "temporal_encoder.", "gnn.")


class SafeLinearEncoder(LinearEncoder):
    """torch_frame's numerical ``LinearEncoder`` without its NaN-gradient trap.

    The stock encoder lets a missing (NaN) cell flow through the linear map and zeroes the
    *output* afterwards; the backward pass still multiplies by the NaN, so one step of Adam
    turns that column's weights into NaN and the column is dead for good (seen on rel-f1's
    ``results`` and rel-flights' delays). Masking the *input* gives the same forward (a
    missing cell embeds to zero) with finite gradients, and the same state_dict keys.
    """

    def encode_forward(self, feat: Tensor, col_names: list[str] | None = None) -> Tensor:
        z = (feat - self.mean) / self.std
        ok = ~torch.isnan(z)
        x = (
            torch.einsum("ij,jk->ijk", torch.where(ok, z, torch.zeros_like(z)), self.weight)
            + self.bias
        )
        return x * ok.unsqueeze(-1)


STYPE_ENCODERS = {
    **_DEFAULT_STYPE_ENCODER_CLS_KWARGS,
    torch_frame.numerical: (SafeLinearEncoder, {}),
}


class FastDropout(torch.nn.Module):
    """``torch.nn.Dropout(p)`` with its mask drawn by ``uniform_`` + compare.

    The same distribution from the same global generator (a different stream of it);
    the CPU ``bernoulli_`` that ``torch.nn.Dropout`` uses was the single most expensive
    operator of a training step (bench/bench_training.py --profile). No parameters, so
    state dicts are unchanged.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        return x * torch.empty_like(x).uniform_().ge_(self.p).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every ``torch.nn.Dropout`` inside ``module`` for :class:`FastDropout`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, FastDropout(child.p))
    return module


def resnet_folded(resnet, tf: torch_frame.TensorFrame) -> Tensor:
    """``resnet(tf)`` for torch_frame's ResNet, with the column encoders folded into block 0.

    Block 0's ``lin1`` and ``shortcut`` read the flattened column embeddings ``[N, cols *
    C]``. Both are linear, and so are the numerical and categorical column encoders, so
    they compose into small maps built once per call from the parameters (autograd
    reaches every parameter as before):

    * numerical (``LinearEncoder`` / :class:`SafeLinearEncoder`): a cell embeds to
      ``m * (z * w_c + b_c)`` with ``z`` the standardised value and ``m`` 0 where it is
      missing, so ``sum_c A_c e_c = [z*m | m] @ [A_c w_c ; A_c b_c]``: an ``[N, 2 cols]``
      matmul instead of building ``[N, cols, C]`` and multiplying ``[N, cols*C]`` by
      ``[cols*C, 2C]``;
    * categorical (``EmbeddingEncoder``): ``A_c Emb[idx] = (Emb A_c^T)[idx]``: project the
      embedding table once, then gather (when the table is smaller than the batch);
    * everything else (timestamps, text embeddings, infinite values) takes the usual route.

    Dropout modules are called in the order ResNet.forward calls them.
    """
    block0 = resnet.backbone[0]
    if block0.shortcut is None:  # in and out widths equal: nothing to fold
        return resnet(tf)
    enc = resnet.encoder
    n_rows = tf.num_rows
    weight = torch.cat([block0.lin1.weight, block0.shortcut.weight], 0)  # [2C, cols * C_in]
    c_out = block0.lin1.out_features
    total_cols = sum(len(enc.col_names_dict[s]) for s in tf.stypes)
    c_in = weight.size(1) // total_cols
    w3 = weight.view(weight.size(0), total_cols, c_in)
    h = torch.cat([block0.lin1.bias, block0.shortcut.bias]).expand(n_rows, -1)
    col = 0
    for st in tf.stypes:
        feat = tf.feat_dict[st]
        names = enc.col_names_dict[st]
        n = len(names)
        wc = w3[:, col : col + n, :]  # [2C, n, C_in]
        e = enc.encoder_dict[st.value]
        plain = e.post_module is None and e.na_strategy is None
        if (
            st == torch_frame.numerical
            and isinstance(e, LinearEncoder)
            and plain
            and not torch.isinf(feat).any()
        ):
            h = h + _folded_numerical(e, feat, wc)
        elif (
            st == torch_frame.categorical
            and type(e) is EmbeddingEncoder
            and plain
            and e.emb.num_embeddings * n < n_rows
        ):
            h = h + _folded_categorical(e, feat, wc)
        else:
            x = e(feat, names)  # [N, n, C_in]
            h = h + x.reshape(n_rows, n * c_in) @ wc.reshape(wc.size(0), n * c_in).t()
        col += n
    return _after_block0_linears(resnet, h, c_out)


def _folded_numerical(e: LinearEncoder, feat: Tensor, wc: Tensor) -> Tensor:
    """Numerical columns through their encoder and block 0's maps: ``[z*m | m] @ [Aw ; Ab]``."""
    z = (feat - e.mean) / e.std
    m = ~torch.isnan(z)
    z = torch.where(m, z, torch.zeros_like(z))
    p = torch.einsum("ocj,cj->co", wc, e.weight)  # [n, 2C]
    q = torch.einsum("ocj,cj->co", wc, e.bias)
    return torch.cat([z, m.to(z.dtype)], 1) @ torch.cat([p, q], 0)


def _folded_categorical(e: EmbeddingEncoder, feat: Tensor, wc: Tensor) -> Tensor:
    """Categorical columns through their encoder and block 0's maps: ``(Emb A^T)[idx]``."""
    n = wc.size(1)
    idx = torch.where(feat < 0, torch.zeros_like(feat), feat + e.offset + 1)
    v = e.emb.num_embeddings
    emb_weight = e.emb.weight
    if e.emb.padding_idx is not None:
        # A missing cell looks up the padding row, which the Embedding keeps at zero
        # with a zero gradient. Projected with the others, the row would receive
        # the missing cells' gradient and learn (seen on rel-flights' airports):
        # zero it here, so that its gradient is zero as in the encoder.
        pad = torch.tensor([e.emb.padding_idx], device=emb_weight.device)
        emb_weight = emb_weight.index_fill(0, pad, 0.0)
    proj = torch.einsum("vj,ocj->cvo", emb_weight, wc).reshape(n * v, -1)  # [n * V, 2C]
    return F.embedding(idx + torch.arange(n, device=idx.device) * v, proj).sum(1)


def _after_block0_linears(resnet, h: Tensor, c_out: int) -> Tensor:
    """The rest of ``resnet`` from block 0's ``lin1`` | ``shortcut`` outputs ``h``."""
    block0 = resnet.backbone[0]
    out, short = h[:, :c_out], h[:, c_out:]
    out = block0.norm1(out) if block0.norm1 else out
    out = block0.dropout(block0.relu(out))
    out = block0.lin2(out)
    out = block0.norm2(out) if block0.norm2 else out
    out = block0.dropout(block0.relu(out))
    x = out + short
    for block in resnet.backbone[1:]:
        x = block(x)
    return resnet.decoder(x)


def distinct_rows(n_id: Tensor) -> tuple[Tensor, Tensor] | None:
    """(first occurrence of each distinct id, inverse map), or None when all are distinct."""
    uniq, inv = torch.unique(n_id, return_inverse=True)
    if uniq.numel() == n_id.numel():
        return None
    first = torch.full((uniq.numel(),), n_id.numel(), dtype=torch.long, device=n_id.device)
    first.scatter_reduce_(0, inv, torch.arange(n_id.numel(), device=n_id.device), reduce="amin")
    return first, inv


class RDLModel(torch.nn.Module):
    def __init__(
        self,
        data: HeteroData,
        col_stats_dict: dict,
        cfg: BackboneConfig,
        out_channels: int,
        *,
        fast: bool = True,
    ):
        super().__init__()
        self.encoder = HeteroEncoder(
            channels=cfg.channels,
            node_to_col_names_dict={nt: data[nt].tf.col_names_dict for nt in data.node_types},
            node_to_col_stats=col_stats_dict,
            torch_frame_model_kwargs={"channels": cfg.channels, "num_layers": cfg.encoder_layers},
            default_stype_encoder_cls_kwargs=STYPE_ENCODERS,
        )
        self.temporal_encoder = HeteroTemporalEncoder(
            node_types=[nt for nt in data.node_types if "time" in data[nt]], channels=cfg.channels
        )
        self.gnn = HeteroGraphSAGE(
            node_types=data.node_types,
            edge_types=data.edge_types,
            channels=cfg.channels,
            aggr=cfg.aggr,
            num_layers=cfg.gnn_layers,
        )
        self.head = torch.nn.Linear(cfg.channels, out_channels)
        self.fast = fast
        use_fast_dropout(self)

    def encode(self, batch: HeteroData) -> dict[str, Tensor]:
        """Every sampled row through its table's encoder (``self.encoder`` on ``batch.tf``).

        A row's encoding does not depend on its seed, so each distinct row (by ``n_id``)
        is encoded once and gathered to its copies; the gradient of the gather sums over
        them. The row's features are those of its first copy: a corrupted view
        (:func:`~tve_pipeline.objectives.corrupted_copy`) thus corrupts each distinct row
        once. In training mode the dropout mask is per distinct row rather than per copy.
        """
        if not self.fast:
            return self.encoder(batch.collect("tf"))
        x = {}
        for nt in batch.node_types:
            store, resnet = batch[nt], self.encoder.encoders[nt]
            d = distinct_rows(store.n_id) if "n_id" in store else None
            x[nt] = (
                resnet_folded(resnet, store.tf)
                if d is None
                else resnet_folded(resnet, store.tf[d[0]])[d[1]]
            )
        return x

    def message_passing(self, batch: HeteroData, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """``self.gnn(x, edge_index)``; when the batch is laid out by hop, only what the seeds need.

        With the sampler's layout (``num_sampled_nodes``/``num_sampled_edges``: nodes and
        edges in hop order) and L layers, layer l updates only the nodes of hops <= L-1-l,
        reading edges of hops <= L-l; every kept node's value is unchanged (LayerNorm
        here is per node). Per SAGEConv, ``lin_l(sum_j x_j) + lin_r(x_dst)``: the bias-free
        root maps of a node type's edge types are applied as one matmul with their summed
        weight, and for sum/mean aggregation ``lin_l``'s weight is applied BEFORE
        aggregating when the source side has fewer rows (e.g. 512 seed drivers that 20k
        first-hop rows point to).
        """
        laid_out = all("num_sampled_nodes" in s for s in batch.node_stores) and all(
            "num_sampled_edges" in s for s in batch.edge_stores
        )
        if not self.fast or not laid_out:
            return self.gnn(x, batch.collect("edge_index"))
        n_layers = len(self.gnn.convs)
        nsn = {nt: batch[nt].num_sampled_nodes for nt in batch.node_types}
        nse = {et: batch[et].num_sampled_edges for et in batch.edge_types}
        channels = next(iter(x.values())).size(-1)
        for layer, (conv, norms) in enumerate(zip(self.gnn.convs, self.gnn.norms)):
            keep = n_layers - layer
            n_dst = {nt: int(sum(nsn[nt][:keep])) for nt in nsn}
            out: dict[str, Tensor] = {}
            roots: dict[str, list[Tensor]] = {}
            for et, sage in conv.convs.items():
                s, _, d = et
                if n_dst.get(d, 0) == 0 or d not in x:
                    continue
                ei = batch[et].edge_index[:, : int(sum(nse[et][:keep]))]
                x_src = x.get(s, x[d].new_zeros(0, channels))
                x_dst = x[d][: n_dst[d]]
                linear_aggr = isinstance(sage.aggr, str) and sage.aggr in ("sum", "add", "mean")
                if x_src.size(0) < n_dst[d] and linear_aggr:
                    h = F.linear(x_src, sage.lin_l.weight)
                    o = sage.propagate(ei, x=(h, None), size=(x_src.size(0), n_dst[d]))
                    o = o + sage.lin_l.bias if sage.lin_l.bias is not None else o
                else:
                    o = sage.lin_l(
                        sage.propagate(ei, x=(x_src, x_dst), size=(x_src.size(0), n_dst[d]))
                    )
                if sage.root_weight:
                    roots.setdefault(d, []).append(sage.lin_r.weight)
                out[d] = o if d not in out else out[d] + o
            for d, ws in roots.items():
                out[d] = out[d] + F.linear(x[d][: n_dst[d]], torch.stack(ws).sum(0))
            x = {d: norms[d](o).relu() for d, o in out.items()}
        return x

    def gnn_inputs(self, batch: HeteroData, entity_table: str) -> dict[str, Tensor]:
        """Every sampled row's encoding plus its time relative to its seed's time."""
        seed_time = batch[entity_table].seed_time
        x_dict = self.encode(batch)
        rel_time = self.temporal_encoder(seed_time, batch.collect("time"), batch.collect("batch"))
        for nt, t in rel_time.items():
            x_dict[nt] = x_dict[nt] + t
        return x_dict

    def embed(self, batch: HeteroData, entity_table: str) -> Tensor:
        x_dict = self.message_passing(batch, self.gnn_inputs(batch, entity_table))
        return x_dict[entity_table][: batch[entity_table].seed_time.size(0)]

    def embed_all(self, batch: HeteroData, entity_table: str) -> dict[str, Tensor]:
        """Every sampled row's embedding after the GNN, per node type.

        The self-supervised objectives read every node of the subgraph, not only the seeds
        (the reference's MAE decodes and its contrastive loss contrasts them all:
        src/models/mae.py:197-216, src/models/contrastive.py:164-179), so the GNN runs
        over the whole subgraph (relbench's module as it is) instead of only where the
        seeds need it. The seeds' rows equal :meth:`embed`. Node types that no edge type
        reaches are left out, as relbench's HeteroConv leaves them out.
        """
        return self.gnn(self.gnn_inputs(batch, entity_table), batch.collect("edge_index"))

    def forward(self, batch: HeteroData, entity_table: str) -> Tensor:
        return self.head(self.embed(batch, entity_table))


def backbone_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The transferable part of a state_dict, on the CPU (what assets pass around)."""
    return {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if k.startswith(BACKBONE_PREFIXES)
    }


def load_backbone(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a pre-trained backbone into ``model``; the head stays freshly initialised."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if k.startswith(BACKBONE_PREFIXES)]
    if bad_missing or unexpected:
        raise ValueError(
            "pre-trained backbone does not fit this model: "
            f"missing {bad_missing[:3]}, unexpected {unexpected[:3]}"
        )
