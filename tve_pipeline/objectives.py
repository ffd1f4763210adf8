"""Pre-training objectives on the RDL backbone: TVE and the self-supervised baselines.

Every objective reads the same sampled batch. TVE predicts the normalised next-window task
vector from a corrupted view (scaled cosine error, rows weighted ``w`` inactive / ``1-w``
active). MAE reconstructs the seed rows' own attributes (numerical cells standardised with
the table's statistics, categorical cells as classes) from a corrupted view. CTR pulls a
seed's clean and corrupted views together against the other seeds of the batch (InfoNCE).
The heads here are thrown away after pre-training; only the backbone transfers.

:class:`PretrainingLoss` is an objective's whole loss on one batch: it corrupts the batch,
embeds the seeds and sums the losses the objective's name lists (``"tve+ctr"``), an
auxiliary loss weighted ``aux_weight`` beside TVE and 1 alone. Its random draws (the
corruption) come from the generator it is given, dropout from torch's global one.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torch_frame
from torch import Tensor
from torch_frame import stype
from torch_frame.data.stats import StatType
from torch_geometric.data import HeteroData

from tve_pipeline.config import PretrainConfig


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
                "masked-attribute reconstruction needs a numerical or categorical column "
                "on the entity table"
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


def objective_heads(
    objective: str, channels: int, data: HeteroData, col_stats: dict, entity_table: str
) -> torch.nn.ModuleDict:
    """The heads an objective trains beside the backbone's own (which predicts the task
    vector): ``"mae"``, the :class:`AttributeDecoder` of the entity table's columns, and
    ``"proj"``, CTR's projection before InfoNCE."""
    parts = objective.split("+")
    heads = torch.nn.ModuleDict()
    if "mae" in parts:
        heads["mae"] = AttributeDecoder(
            channels, data[entity_table].tf.col_names_dict, col_stats[entity_table]
        )
    if "ctr" in parts:
        heads["proj"] = torch.nn.Sequential(
            torch.nn.Linear(channels, channels),
            torch.nn.ReLU(),
            torch.nn.Linear(channels, channels),
        )
    return heads


def row_weights(task_vectors: Tensor, inactive_weight: float) -> Tensor:
    """TVE's row weights: ``w`` for inactive rows (the vector's first entry is 1), ``1 - w``
    for active ones."""
    w = inactive_weight
    return torch.where(task_vectors[:, 0] == 1, torch.tensor(w), torch.tensor(1.0 - w))


class PretrainingLoss:
    """One objective's loss on a sampled batch: ``loss(batch, task_vectors, generator)``.

    ``batch`` is on the model's device, ``task_vectors`` (the seeds' normalised task
    vectors, on the CPU) is read by TVE only. The seeds are embedded from a view corrupted
    at ``corruption_rate``; TVE predicts the task vectors from it with the model's head,
    MAE the seed rows' attributes with ``heads["mae"]``, and CTR contrasts it (alone: a
    view corrupted at ``ctr_corruption_rate``) with the clean batch through
    ``heads["proj"]``.
    """

    def __init__(
        self,
        objective: str,
        model: torch.nn.Module,
        heads: torch.nn.ModuleDict,
        entity_table: str,
        cfg: PretrainConfig,
    ):
        self.parts = set(objective.split("+"))
        self.model, self.heads, self.entity_table, self.cfg = model, heads, entity_table, cfg
        # The auxiliary loss is the whole objective when it stands alone, 0.1 x beside TVE.
        self.aux_weight = cfg.aux_weight if "tve" in self.parts else 1.0

    def __call__(
        self, batch: HeteroData, task_vectors: Tensor, generator, *, corrupt: bool = True
    ) -> Tensor:
        """The loss; ``corrupt=False`` scores clean inputs, as the reference's validation does
        (its models corrupt only ``if self.training``: src/models/tve.py:90, mae.py:134,
        contrastive.py:95)."""
        seeds = slice(0, batch[self.entity_table].seed_time.size(0))
        noisy = corrupted_copy(batch, self.cfg.corruption_rate if corrupt else 0.0, generator)
        z = self.model.embed(noisy, self.entity_table)
        loss = torch.zeros((), device=z.device)
        if "tve" in self.parts:
            loss = loss + self.task_vector_loss(z, task_vectors)
        if "mae" in self.parts:
            seed_rows = batch[self.entity_table].tf[seeds]
            loss = loss + self.aux_weight * self.heads["mae"].loss(z, seed_rows)
        if "ctr" in self.parts:
            loss = loss + self.aux_weight * self.contrastive_loss(batch, z, generator, corrupt)
        return loss

    def task_vector_loss(self, z: Tensor, task_vectors: Tensor) -> Tensor:
        """Scaled cosine error of the head's predictions, rows weighted by activity."""
        weight = row_weights(task_vectors, self.cfg.inactive_weight)
        return sce_loss(
            self.model.head(z),
            task_vectors.to(z.device),
            weight.to(z.device),
            self.cfg.sce_alpha,
        )

    def contrastive_loss(
        self, batch: HeteroData, z: Tensor, generator, corrupt: bool = True
    ) -> Tensor:
        """InfoNCE between the clean batch and a corrupted view, through the projection."""
        # TVE+CTR contrasts TVE's own corrupted view; CTR alone uses its stronger corruption.
        if "tve" in self.parts:
            z_view = z
        else:
            rate = self.cfg.ctr_corruption_rate if corrupt else 0.0
            view = corrupted_copy(batch, rate, generator)
            z_view = self.model.embed(view, self.entity_table)
        z_clean = self.model.embed(batch, self.entity_table)
        proj = self.heads["proj"]
        return info_nce(proj(z_clean), proj(z_view), self.cfg.ctr_tau)
