"""Pre-training objectives on the RDL backbone: TVE and the self-supervised baselines.

Every objective reads the same sampled batch. TVE predicts the normalised next-window task
vector from a corrupted view (scaled cosine error, rows weighted ``w`` inactive / ``1-w``
active). MAE reconstructs the seed rows' own attributes (numerical cells standardised with
the table's statistics, categorical cells as classes) from a corrupted view. CTR pulls a
seed's clean and corrupted views together against the other seeds of the batch (InfoNCE).
The heads here are thrown away after pre-training; only the backbone transfers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_frame import stype
from torch_frame.data.stats import StatType
from torch_geometric.data import HeteroData

from tve_pipeline.model import corrupt_


def sce_loss(pred: Tensor, target: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """Scaled cosine error, per-row weighted mean: sum w (1 - cos)^alpha / sum w."""
    cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    err = (1.0 - cos).clamp_min(0).pow(alpha)
    return (weight * err).sum() / weight.sum().clamp_min(1e-12)


def info_nce(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    """Symmetric InfoNCE: row i of ``z1`` and ``z2`` are positives, other rows negatives."""
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    logits = z1 @ z2.t() / tau
    labels = torch.arange(z1.size(0), device=z1.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def corrupted_copy(batch: HeteroData, rate: float, generator: torch.Generator | None) -> HeteroData:
    """A view of ``batch`` with its cells swapped at ``rate``; ``batch`` itself is untouched."""
    view = copy.copy(batch)
    for nt in batch.node_types:
        view[nt].tf = copy.copy(batch[nt].tf)  # new feat_dict; tensors are replaced, not edited
    corrupt_(view, rate, generator=generator)
    return view


class AttributeDecoder(torch.nn.Module):
    """MAE head: the seed table's numerical cells (standardised) and categorical classes."""

    def __init__(self, channels: int, col_names: dict, col_stats: dict):
        super().__init__()
        self.num_cols = list(col_names.get(stype.numerical, []))
        self.cat_cols = list(col_names.get(stype.categorical, []))
        if not self.num_cols and not self.cat_cols:
            raise ValueError(
                "masked-attribute reconstruction needs a numerical or categorical column on the entity table"
            )
        mean = [float(col_stats[c][StatType.MEAN]) for c in self.num_cols]
        std = [max(float(col_stats[c][StatType.STD]), 1e-6) for c in self.num_cols]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.num_classes = [len(col_stats[c][StatType.COUNT][0]) for c in self.cat_cols]
        self.lin = torch.nn.Linear(channels, len(self.num_cols) + sum(self.num_classes))

    def loss(self, z: Tensor, tf) -> Tensor:
        out = self.lin(z)
        losses = []
        if self.num_cols:
            x = (tf.feat_dict[stype.numerical].float() - self.mean) / self.std
            pred = out[:, : len(self.num_cols)]
            ok = ~torch.isnan(x)
            if ok.any():
                losses.append(F.mse_loss(pred[ok], x[ok]))
        offset = len(self.num_cols)
        for j, k in enumerate(self.num_classes):
            y = tf.feat_dict[stype.categorical][:, j].long()
            ok = y >= 0
            if ok.any():
                losses.append(F.cross_entropy(out[ok, offset : offset + k], y[ok]))
            offset += k
        return torch.stack(losses).mean() if losses else out.sum() * 0.0
