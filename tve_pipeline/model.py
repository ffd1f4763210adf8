"""The RDL backbone (RelBench's recipe) and the heads that sit on it.

Per-table torch_frame ResNet encoders, a relative-time encoding of every sampled row, a
heterogeneous GraphSAGE over the temporal subgraph, and a linear head on the seed
entities (DESIGN.md section 2). The parts come from ``relbench.modeling.nn``. The
*backbone* is everything but the head: that is what pre-training produces and what
transfer copies.
"""

from __future__ import annotations

import torch
import torch_frame
from relbench.modeling.nn import (
    _DEFAULT_STYPE_ENCODER_CLS_KWARGS,
    HeteroEncoder,
    HeteroGraphSAGE,
    HeteroTemporalEncoder,
)
from torch import Tensor
from torch_frame.nn import LinearEncoder
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
        x = torch.einsum("ij,jk->ijk", torch.where(ok, z, torch.zeros_like(z)), self.weight) + self.bias
        return x * ok.unsqueeze(-1)


STYPE_ENCODERS = {**_DEFAULT_STYPE_ENCODER_CLS_KWARGS, torch_frame.numerical: (SafeLinearEncoder, {})}


class RDLModel(torch.nn.Module):
    def __init__(self, data: HeteroData, col_stats_dict: dict, cfg: BackboneConfig, out_channels: int):
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

    def embed(self, batch: HeteroData, entity_table: str) -> Tensor:
        seed_time = batch[entity_table].seed_time
        x_dict = self.encoder(batch.collect("tf"))
        rel_time = self.temporal_encoder(seed_time, batch.collect("time"), batch.collect("batch"))
        for nt, t in rel_time.items():
            x_dict[nt] = x_dict[nt] + t
        x_dict = self.gnn(x_dict, batch.collect("edge_index"))
        return x_dict[entity_table][: seed_time.size(0)]

    def forward(self, batch: HeteroData, entity_table: str) -> Tensor:
        return self.head(self.embed(batch, entity_table))


def backbone_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The transferable part of a state_dict, on the CPU (what assets pass around)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}


def load_backbone(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a pre-trained backbone into ``model``; the head stays freshly initialised."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if k.startswith(BACKBONE_PREFIXES)]
    if bad_missing or unexpected:
        raise ValueError(
            f"pre-trained backbone does not fit this model: missing {bad_missing[:3]}, unexpected {unexpected[:3]}"
        )


def corrupt_(batch: HeteroData, rate: float, generator: torch.Generator | None = None) -> None:
    """Swap a fraction ``rate`` of input cells with other rows' values of the same column.

    TVE's input corruption (rate 0.15): every cell of every table is replaced, with
    probability ``rate``, by the value of the same column in a random row of that table
    in this batch. Works for every torch_frame stype tensor (``[N, C, ...]``).
    """
    if rate <= 0:
        return
    for nt in batch.node_types:
        tf: torch_frame.TensorFrame = batch[nt].tf
        n = tf.num_rows
        if n < 2:
            continue
        for st, feat in tf.feat_dict.items():
            if not isinstance(feat, Tensor) or feat.dim() < 2:
                continue  # multi-nested tensors (text tokens, sequences) are left as they are
            c = feat.size(1)
            device = feat.device
            mask = torch.rand((n, c), generator=generator).to(device) < rate
            src = torch.randint(0, n, (n, c), generator=generator).to(device)
            swapped = feat[src, torch.arange(c, device=device).expand(n, c)]
            shape = (n, c) + (1,) * (feat.dim() - 2)
            tf.feat_dict[st] = torch.where(mask.view(shape), swapped, feat)
