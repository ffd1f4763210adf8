"""Pre-training objectives on the RDL backbone: TVE and the self-supervised baselines.

Every objective reads the same sampled batch and is built as the reference builds it
(github.com/quang-truong/task-vector-estimation, src/models and src/helpers/loss_helper.py).
TVE predicts the normalised next-window task vector from a corrupted view (scaled cosine
error, rows weighted ``w`` inactive / ``1-w`` active). MAE decodes every node of the
sampled subgraph from a corrupted view (numerical cells standardised, categorical cells as
classes, text embeddings as vectors). CTR contrasts every node's embedding in the
corrupted view with its embedding in the clean batch, the other nodes of its type as
negatives (InfoNCE). The heads here are thrown away after pre-training; only the backbone
transfers.

:class:`PretrainingLoss` is an objective's whole loss on one batch: it corrupts the batch,
embeds it and sums the losses the objective's name lists (``"tve+ctr"``), an auxiliary
loss weighted ``aux_weight`` beside TVE and 1 alone. Its random draws (the corruption)
come from the generator it is given, dropout from torch's global one.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torch_frame
from relbench.modeling.nn import HeteroGraphSAGE
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torch_frame import stype
from torch_frame.data import MultiEmbeddingTensor
from torch_frame.data.stats import StatType
from torch_geometric.data import HeteroData

from tve_pipeline.config import PretrainConfig


def sce_loss(pred: Tensor, target: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """Scaled cosine error, per-row weighted mean: sum w (1 - cos)^alpha / sum w."""
    cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    err = (1.0 - cos).clamp_min(0).pow(alpha)
    return (weight * err).sum() / weight.sum().clamp_min(1e-12)


def info_nce(z1: Tensor, z2: Tensor, tau: float, chunk: int = 4096) -> Tensor:
    """Symmetric InfoNCE: row i of ``z1`` and ``z2`` are positives, other rows negatives.

    ``(CE(S, I) + CE(S^T, I)) / 2`` with ``S = norm(z1) norm(z2)^T / tau``, the reference's
    loss (src/helpers/loss_helper.py:130-140). Over every sampled node of a node type ``S``
    is ``N x N`` (11k races in a rel-f1 batch of 512 drivers at fan-out 32/16), so it is
    never held whole: :class:`_SymmetricInfoNCE` computes it ``chunk`` rows at a time, once
    in the forward pass and once in the backward pass.
    """
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    if 2.0 / tau <= 60.0:
        return _SymmetricInfoNCE.apply(z1, z2, tau, chunk)
    # A temperature this small could underflow exp(S - 1/tau): blocks with logsumexp,
    # recomputed in the backward pass (activation checkpointing).
    n = z1.size(0)
    return (_nce_rows(z1, z2, tau, chunk) + _nce_rows(z2, z1, tau, chunk)) / (2 * n)


class _SymmetricInfoNCE(torch.autograd.Function):
    """Both directions of InfoNCE from one pass over ``S = a b^T / tau``, in row blocks.

    ``a`` and ``b`` are unit rows, so ``|S| <= 1/tau`` and ``exp(S - 1/tau)`` lies in
    ``[exp(-2/tau), 1]``: no running maximum is needed, and one exponential per entry
    gives the row sums (logsumexp over j) and the column sums (over i) together. The
    backward pass recomputes each block: ``dL/dS = (softmax_rows + softmax_cols - 2I) /
    2N``, ``dL/da = dL/dS b / tau``, ``dL/db = dL/dS^T a / tau``. Memory ``chunk x N``.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, tau: float, chunk: int) -> Tensor:
        n, shift = a.size(0), 1.0 / tau
        rows, cols = a.new_zeros(n), a.new_zeros(n)
        a_tau = a / tau
        for s in range(0, n, chunk):
            e = (a_tau[s : s + chunk] @ b.t()).sub_(shift).exp_()
            rows[s : s + chunk] = e.sum(1)
            cols += e.sum(0)
        positives = (a * b).sum(1) / tau
        lse = rows.log() + cols.log() + 2 * shift
        ctx.save_for_backward(a, b, rows, cols)
        ctx.tau, ctx.chunk = tau, chunk
        return (lse - 2 * positives).sum() / (2 * n)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, rows, cols = ctx.saved_tensors
        tau, chunk = ctx.tau, ctx.chunk
        n, shift, d = a.size(0), 1.0 / tau, a.size(1)
        grad_a, grad_b = -2 * b, -2 * a  # the positives' -2I
        a_tau = a / tau
        # g = E / rows + E / cols, applied without forming it: g b = (E b) / rows +
        # E (b / cols) and g^T a = E^T (a / rows) + (E^T a) / cols, two matmuls a block.
        b_both = torch.cat([b, b / cols[:, None]], 1)
        for s in range(0, n, chunk):
            e = (a_tau[s : s + chunk] @ b.t()).sub_(shift).exp_()
            a_blk, r_blk = a[s : s + chunk], rows[s : s + chunk, None]
            eb = e @ b_both
            grad_a[s : s + chunk] += eb[:, :d] / r_blk + eb[:, d:]
            ea = e.t() @ torch.cat([a_blk / r_blk, a_blk], 1)
            grad_b += ea[:, :d] + ea[:, d:] / cols[:, None]
        scale = grad / (2 * n * tau)
        return grad_a * scale, grad_b * scale, None, None


def _nce_rows(a: Tensor, b: Tensor, tau: float, chunk: int) -> Tensor:
    """``sum_i logsumexp_j(a_i . b_j / tau) - a_i . b_i / tau``: n x CE(a b^T / tau, I)."""
    if a.size(0) <= chunk:
        return _nce_block(a, b, 0, tau)
    return sum(
        checkpoint(_nce_block, a[s : s + chunk], b, s, tau, use_reentrant=False)
        for s in range(0, a.size(0), chunk)
    )


def _nce_block(a: Tensor, b: Tensor, start: int, tau: float) -> Tensor:
    logits = a @ b.t() / tau
    positives = (a * b[start : start + a.size(0)]).sum(-1) / tau
    return (torch.logsumexp(logits, dim=-1) - positives).sum()


def corrupt_(batch: HeteroData, rate: float, generator: torch.Generator | None = None) -> None:
    """Corrupt a fraction ``rate`` of the input cells of every node type, as the reference.

    The reference's ``mask_input`` (src/models/tve.py:88-109; the same in mae.py:132-166,
    contrastive.py:93-127, tve_mae.py, tve_contrastive.py), for every node type:

    * numerical and categorical cells are replaced, each with probability ``rate``, by the
      value of the same column in the row that a random permutation of the node type's
      rows maps them to (one permutation per column);
    * text embeddings (``stype.embedding``, ``[rows, sum of dims]``) have each VALUE zeroed
      with probability ``rate``: the reference draws its mask over ``values``, not over
      columns, so a row keeps about ``1 - rate`` of each embedding;
    * timestamps are left as they are (the reference's branch for them is commented out).
    """
    if rate <= 0:
        return
    for nt in batch.node_types:
        tf: torch_frame.TensorFrame = batch[nt].tf
        n = tf.num_rows
        if n == 0:
            continue
        for st, feat in list(tf.feat_dict.items()):
            if st in (stype.numerical, stype.categorical):
                shape = tuple(feat.shape[:2])
                mask = (torch.rand(shape, generator=generator) < rate).to(feat.device)
                perm = torch.rand(shape, generator=generator).argsort(0).to(feat.device)
                tf.feat_dict[st] = torch.where(mask, feat.gather(0, perm), feat)
            elif st == stype.embedding:
                values = feat.values
                keep = (torch.rand(values.shape, generator=generator) >= rate).to(values.device)
                tf.feat_dict[st] = MultiEmbeddingTensor(
                    num_rows=feat.num_rows,
                    num_cols=feat.num_cols,
                    values=torch.where(keep, values, torch.zeros_like(values)),
                    offset=feat.offset,
                )


def corrupted_copy(batch: HeteroData, rate: float, generator: torch.Generator | None) -> HeteroData:
    """A view of ``batch`` with its cells corrupted at ``rate``; ``batch`` itself is untouched."""
    view = copy.copy(batch)
    for nt in batch.node_types:
        view[nt].tf = copy.copy(batch[nt].tf)  # new feat_dict; tensors are replaced, not edited
    corrupt_(view, rate, generator=generator)
    return view


class AttributeDecoder(torch.nn.Module):
    """MAE's decoder as the reference builds it (src/models/mae.py:75-113, 204-216).

    From every node's GNN embedding: a linear map per node type (``enc_to_dec``, PyG's
    one-layer MLP, i.e. one Linear), one more GNN layer over the subgraph (``decoder_gnn``:
    the backbone's GNN with one layer) and per column a linear head: one output for a
    numerical column, one logit per category for a categorical one, the embedding's width
    for a text embedding. Timestamps are not decoded (commented out in the reference).
    A node type's per-column heads are stacked into one Linear where their widths allow
    (the same function and initialisation: a Linear's init depends on its input width).
    """

    def __init__(self, channels: int, data: HeteroData, col_stats: dict, aggr: str = "sum"):
        super().__init__()
        self.enc_to_dec = torch.nn.ModuleDict(
            {nt: torch.nn.Linear(channels, channels) for nt in data.node_types}
        )
        self.gnn = HeteroGraphSAGE(
            data.node_types, data.edge_types, channels, aggr=aggr, num_layers=1
        )
        self.num, self.cat, self.emb = (torch.nn.ModuleDict() for _ in range(3))
        self.num_stats: dict[str, list[tuple[float, float]]] = {}
        for nt in data.node_types:
            names = data[nt].tf.col_names_dict
            stats = col_stats[nt]
            if names.get(stype.numerical):
                cols = names[stype.numerical]
                self.num[nt] = torch.nn.Linear(channels, len(cols))
                self.num_stats[nt] = [
                    (float(stats[c][StatType.MEAN]), float(stats[c][StatType.STD])) for c in cols
                ]
            if names.get(stype.categorical):
                self.cat[nt] = torch.nn.ModuleList(
                    torch.nn.Linear(channels, len(stats[c][StatType.COUNT][0]))
                    for c in names[stype.categorical]
                )
            if names.get(stype.embedding):
                dims = sum(int(stats[c][StatType.EMB_DIM]) for c in names[stype.embedding])
                self.emb[nt] = torch.nn.Linear(channels, dims)
        if not (len(self.num) or len(self.cat) or len(self.emb)):
            raise ValueError(
                "masked-attribute reconstruction needs a numerical, categorical or text "
                "column in some table"
            )

    def forward(self, x_dict: dict[str, Tensor], edge_index_dict: dict) -> dict[str, Tensor]:
        """The decoder's embedding of every node (``decoder_gnn``'s output) per node type."""
        h = {nt: self.enc_to_dec[nt](x) for nt, x in x_dict.items()}
        return self.gnn(h, edge_index_dict)

    def loss(self, x_dict: dict[str, Tensor], batch: HeteroData) -> Tensor:
        """Reconstruction loss of every node's columns against the clean ``batch``.

        The reference's ``MaskedLoss`` (src/helpers/loss_helper.py:61-117): over every
        node of every node type (masked or not), per column: numerical cells standardised
        with the column's statistics, MSE over the non-missing cells, constant columns
        left out; categorical cells by cross-entropy over the non-missing cells (code
        -1); text embeddings by MSE. The loss is mean(categorical columns' losses) +
        mean(numerical ones') + mean(text ones'). A column with no non-missing cell in the
        batch is left out (the reference's mean over no cells would be NaN).
        """
        num, cat, emb = [], [], []
        for nt, h in self.forward(x_dict, batch.collect("edge_index")).items():
            if h.size(0) == 0:
                continue
            feats = batch[nt].tf.feat_dict
            if nt in self.num:
                pred, y = self.num[nt](h), feats[stype.numerical].float()
                for j, (mean, std) in enumerate(self.num_stats[nt]):
                    ok = ~torch.isnan(y[:, j])
                    if std > 0 and ok.any():  # std NaN (no values at all) fails too
                        num.append(F.mse_loss(pred[ok, j], (y[ok, j] - mean) / std))
            if nt in self.cat:
                y = feats[stype.categorical].long()
                for j, head in enumerate(self.cat[nt]):
                    ok = y[:, j] != -1
                    if ok.any():
                        cat.append(F.cross_entropy(head(h[ok]), y[ok, j]))
            if nt in self.emb:
                values = feats[stype.embedding].values
                pred, offset = self.emb[nt](h), feats[stype.embedding].offset.tolist()
                for a, b in zip(offset[:-1], offset[1:]):
                    emb.append(F.mse_loss(pred[:, a:b], values[:, a:b].float()))
        parts = [torch.stack(losses).mean() for losses in (cat, num, emb) if losses]
        if not parts:
            return sum(p.sum() for p in self.parameters()) * 0.0
        return torch.stack(parts).sum()


def objective_heads(
    objective: str,
    channels: int,
    data: HeteroData,
    col_stats: dict,
    entity_table: str,
    aggr: str = "sum",
) -> torch.nn.ModuleDict:
    """The heads an objective trains beside the backbone's own (which predicts the task
    vector): ``"mae"``, the :class:`AttributeDecoder` of every table's columns (its GNN
    layer aggregates with ``aggr``, the backbone's), and ``"proj"``, CTR's projection of
    every node type before InfoNCE: one Linear to ``channels // 2`` per node type
    (src/models/contrastive.py:75-78)."""
    parts = objective.replace(">", "+").split("+")  # a staged objective: both stages' heads
    heads = torch.nn.ModuleDict()
    if "mae" in parts:
        heads["mae"] = AttributeDecoder(channels, data, col_stats, aggr=aggr)
    if "ctr" in parts:
        heads["proj"] = torch.nn.ModuleDict(
            {nt: torch.nn.Linear(channels, channels // 2) for nt in data.node_types}
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
    vectors, on the CPU) is read by TVE only. As the reference builds each objective
    (src/models/*.py, src/helpers/loss_helper.py), from one corrupted view of the batch:

    * ``tve``: the head's prediction from the seeds' embeddings, scaled cosine error;
    * ``mae``: every node of the subgraph decoded (:class:`AttributeDecoder`), its
      columns compared with the clean batch;
    * ``ctr``: every node's embedding of the view against its embedding in the clean
      batch, through ``heads["proj"]``; InfoNCE per node type, the other nodes of the
      type as negatives, averaged over node types (loss_helper.py:125-140).

    The view is corrupted at ``corruption_rate`` when TVE is part of the objective (TVE,
    TVE-MAE and TVE-CTR share it: tve_mae.py:167, tve_contrastive.py:131; the reference's
    configs give 0.15), else at ``mae_corruption_rate`` / ``ctr_corruption_rate`` (0.25:
    cfg/rel-amazon/*-ssl/*.yaml). An auxiliary loss is weighted ``aux_weight`` beside TVE
    (loss_helper.py:166, 205: beta 0.1) and 1 alone.
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
        if "tve" in self.parts:
            self.rate = cfg.corruption_rate
        elif "mae" in self.parts:
            self.rate = cfg.mae_corruption_rate
        else:
            self.rate = cfg.ctr_corruption_rate

    def __call__(
        self, batch: HeteroData, task_vectors: Tensor, generator, *, corrupt: bool = True
    ) -> Tensor:
        """The loss; ``corrupt=False`` scores clean inputs, as the reference's validation does
        (its models corrupt only ``if self.training``: src/models/tve.py:90, mae.py:134,
        contrastive.py:95; CTR then contrasts two clean views)."""
        view = corrupted_copy(batch, self.rate if corrupt else 0.0, generator)
        if self.parts == {"tve"}:  # the seeds' embeddings only: the fast path
            return self.task_vector_loss(self.model.embed(view, self.entity_table), task_vectors)
        x_view = self.model.embed_all(view, self.entity_table)
        loss = None
        if "tve" in self.parts:
            n_seeds = batch[self.entity_table].seed_time.size(0)
            z = x_view[self.entity_table][:n_seeds]
            loss = self.task_vector_loss(z, task_vectors)
        if "mae" in self.parts:
            aux = self.heads["mae"].loss(x_view, batch)
            loss = self.aux_weight * aux if loss is None else loss + self.aux_weight * aux
        if "ctr" in self.parts:
            aux = self.contrastive_loss(batch, x_view)
            loss = self.aux_weight * aux if loss is None else loss + self.aux_weight * aux
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

    def contrastive_loss(self, batch: HeteroData, x_view: dict[str, Tensor]) -> Tensor:
        """InfoNCE between every node's corrupted and clean embedding, per node type.

        Both views through the same per-node-type projection; the mean over the node types
        present (src/models/contrastive.py:143-179, src/helpers/loss_helper.py:125-140).
        """
        x_clean = self.model.embed_all(batch, self.entity_table)
        proj = self.heads["proj"]
        losses = [
            info_nce(proj[nt](x_view[nt]), proj[nt](x_clean[nt]), self.cfg.ctr_tau)
            for nt in x_view
            if x_view[nt].size(0) > 0
        ]
        return torch.stack(losses).mean()


class StagedLoss:
    """A staged objective, ``"first>then"`` (``ctr>tve``): ``first``'s loss for the first
    ``cfg.first_stage_steps`` optimiser steps, ``then``'s after, in one run with one optimiser
    (the heads of both stages are trained, each only in its stage).

    The training loop tells it the step about to run (:meth:`at_step`). Validation scores
    ``then`` only (:attr:`final`), and only once its stage has begun (:meth:`in_final`):
    the checkpoint of a staged objective is one of its last stage.
    """

    def __init__(self, objective, model, heads, entity_table: str, cfg: PretrainConfig):
        first, then = objective.split(">")
        self.stages = (
            PretrainingLoss(first, model, heads, entity_table, cfg),
            PretrainingLoss(then, model, heads, entity_table, cfg),
        )
        self.final = self.stages[1]
        self.stage_steps = cfg.first_stage_steps
        self.step = 0  # the optimiser step about to run (0-based)
        self.parts = self.final.parts

    def at_step(self, step: int) -> None:
        self.step = step

    def in_final(self, steps_done: int) -> bool:
        return steps_done > self.stage_steps

    def __call__(self, batch, task_vectors, generator, *, corrupt: bool = True):
        stage = self.stages[self.step >= self.stage_steps]
        return stage(batch, task_vectors, generator, corrupt=corrupt)


def pretraining_loss(objective: str, model, heads, entity_table: str, cfg: PretrainConfig):
    """The loss of an objective: :class:`PretrainingLoss`, or :class:`StagedLoss` for
    ``"first>then"``."""
    if ">" in objective:
        return StagedLoss(objective, model, heads, entity_table, cfg)
    return PretrainingLoss(objective, model, heads, entity_table, cfg)
