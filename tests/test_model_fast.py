"""RDLModel's fast forward against relbench's modules run as they are (the oracle).

``RDLModel.embed`` encodes distinct rows once, folds the column encoders into the first
ResNet block and runs each GNN layer only where the seeds need it. The oracle below
composes the same modules the way relbench's example model does (encoder over every
sampled row, temporal encoder, full HeteroGraphSAGE), so values and gradients must agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_sampling import make_graph, random_seeds

from tve_pipeline.config import BackboneConfig
from tve_pipeline.model import FastDropout, RDLModel, resnet_folded
from tve_pipeline.sampling import TemporalNeighborSampler


def oracle_embed(model: RDLModel, batch, entity: str) -> torch.Tensor:
    seed_time = batch[entity].seed_time
    x = {nt: model.encoder.encoders[nt](tf) for nt, tf in batch.collect("tf").items()}
    for nt, t in model.temporal_encoder(
        seed_time, batch.collect("time"), batch.collect("batch")
    ).items():
        x[nt] = x[nt] + t
    return model.gnn(x, batch.collect("edge_index"))[entity][: seed_time.size(0)]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "entity,aggr,gnn_layers,fan,n_seeds",
    [
        ("users", "sum", 2, [8, 4], 24),
        ("users", "mean", 2, [-1, -1], 12),
        ("posts", "sum", 3, [4, 4, 4], 16),  # self-referencing fkey, three hops
        ("events", "max", 1, [6], 20),  # non-linear aggregation: lin_l after aggregating
        ("users", "sum", 2, [3], 10),  # more layers than sampled hops
    ],
)
def test_fast_embed_equals_relbench_modules(entity, aggr, gnn_layers, fan, n_seeds):
    data, col_stats = make_graph(1)
    cfg = BackboneConfig(
        channels=16, encoder_layers=2, gnn_layers=gnn_layers, num_neighbors=tuple(fan), aggr=aggr
    )
    torch.manual_seed(0)
    fast = RDLModel(data, col_stats, cfg, out_channels=1).eval()
    ref = copy.deepcopy(fast)
    sampler = TemporalNeighborSampler(data, fan)
    nodes, seed_time = random_seeds(data, entity, n_seeds, 3)
    batch = sampler.sample(entity, nodes, seed_time, generator=torch.Generator().manual_seed(0))
    # the batch really repeats rows across seeds, so the dedup path is exercised
    assert any(
        torch.unique(batch[nt].n_id).numel() < batch[nt].num_nodes for nt in batch.node_types
    )

    got, want = fast.embed(batch, entity), oracle_embed(ref, batch, entity)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))

    w = torch.randn_like(got)
    (got * w).sum().backward()
    (want * w).sum().backward()
    g_fast, g_ref = _grads(fast), _grads(ref)
    assert g_fast.keys() == g_ref.keys() and g_ref
    for name in g_ref:
        scale = g_ref[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(
            g_fast[name] / scale, g_ref[name] / scale, rtol=1e-4, atol=1e-4, msg=name
        )


def test_fast_embed_with_empty_tables_and_plain_batches():
    data, col_stats = make_graph(0)
    cfg = BackboneConfig(channels=8, encoder_layers=1, num_neighbors=(8, 4))
    torch.manual_seed(0)
    model = RDLModel(data, col_stats, cfg, out_channels=1).eval()
    sampler = TemporalNeighborSampler(data, [8, 4])
    early = torch.zeros(3, dtype=torch.long)  # before every row: timed tables come back empty
    batch = sampler.sample(
        "users", torch.tensor([0, 1, 1]), early, generator=torch.Generator().manual_seed(0)
    )
    assert batch["events"].num_nodes == 0
    torch.testing.assert_close(model.embed(batch, "users"), oracle_embed(model, batch, "users"))
    # a batch without the sampler's hop layout or n_id takes the modules' own route
    for store in batch.node_stores:
        del store.num_sampled_nodes, store.n_id
    torch.testing.assert_close(model.embed(batch, "users"), oracle_embed(model, batch, "users"))


def test_folded_resnet_handles_missing_cells_like_the_encoder():
    data, col_stats = make_graph(2)
    cfg = BackboneConfig(channels=8, encoder_layers=2)
    torch.manual_seed(1)
    model = RDLModel(data, col_stats, cfg, out_channels=1).eval()
    tf = copy.copy(data["events"].tf)
    from torch_frame import stype

    num = tf.feat_dict[stype.numerical].clone()
    num[::3, 0] = float("nan")
    tf.feat_dict = {**tf.feat_dict, stype.numerical: num}
    resnet = model.encoder.encoders["events"]
    torch.testing.assert_close(resnet_folded(resnet, tf), resnet(tf), rtol=1e-4, atol=1e-5)


def test_folded_resnet_gradients_with_missing_categories_match_the_encoder():
    """A missing category looks up the Embedding's padding row: zero, with zero gradient.
    The fold projects the whole table; it once let that row learn (rel-flights' airports,
    bench/bench_training.py's gradient check: 2.4e-01)."""
    from torch_frame import stype

    data, col_stats = make_graph(2)
    torch.manual_seed(1)
    model = RDLModel(data, col_stats, BackboneConfig(channels=8, encoder_layers=2), 1).eval()
    resnet = model.encoder.encoders["users"]
    emb = resnet.encoder.encoder_dict[stype.categorical.value].emb
    tf = data["users"].tf
    # more rows than embedding rows: the categorical encoder is folded (projected, gathered)
    tf = tf[torch.arange(3 * emb.num_embeddings) % tf.num_rows]
    cat = tf.feat_dict[stype.categorical].clone()
    cat[::4, 0] = -1
    tf.feat_dict = {**tf.feat_dict, stype.categorical: cat}
    ref = copy.deepcopy(resnet)
    got, want = resnet_folded(resnet, tf), ref(tf)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(got)
    (got * w).sum().backward()
    (want * w).sum().backward()
    ref_grad = ref.encoder.encoder_dict[stype.categorical.value].emb.weight.grad
    assert torch.equal(ref_grad[emb.padding_idx], torch.zeros_like(ref_grad[0]))
    torch.testing.assert_close(emb.weight.grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_fast_dropout_keeps_the_expectation():
    torch.manual_seed(0)
    drop = FastDropout(0.25).train()
    out = drop(torch.ones(200_000))
    assert abs((out == 0).float().mean().item() - 0.25) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.01
    assert torch.equal(drop.eval()(torch.ones(5)), torch.ones(5))


def test_state_dict_is_unchanged_by_the_fast_path():
    data, col_stats = make_graph(0)
    cfg = BackboneConfig(channels=8, encoder_layers=1)
    torch.manual_seed(0)
    a = RDLModel(data, col_stats, cfg, out_channels=1)
    torch.manual_seed(0)
    b = RDLModel(data, col_stats, cfg, out_channels=1, fast=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("entity,aggr", [("users", "sum"), ("posts", "mean")])
def test_embed_all_is_every_node_of_the_full_gnn_and_embed_its_seed_rows(entity, aggr):
    """The self-supervised objectives read every sampled node (``embed_all``): relbench's
    modules over every row (the oracle) for every node type, with the fast encoder's
    distinct-row encoding; the seeds' rows are ``embed``'s."""
    data, col_stats = make_graph(1)
    cfg = BackboneConfig(channels=16, encoder_layers=2, num_neighbors=(6, 4), aggr=aggr)
    torch.manual_seed(0)
    model = RDLModel(data, col_stats, cfg, out_channels=1).eval()
    sampler = TemporalNeighborSampler(data, [6, 4])
    nodes, seed_time = random_seeds(data, entity, 16, 3)
    batch = sampler.sample(entity, nodes, seed_time, generator=torch.Generator().manual_seed(0))
    got = model.embed_all(batch, entity)
    seed_time = batch[entity].seed_time
    x = {nt: model.encoder.encoders[nt](tf) for nt, tf in batch.collect("tf").items()}
    for nt, t in model.temporal_encoder(
        seed_time, batch.collect("time"), batch.collect("batch")
    ).items():
        x[nt] = x[nt] + t
    want = model.gnn(x, batch.collect("edge_index"))
    assert set(got) == set(want) == set(data.node_types)
    for nt in want:
        assert got[nt].shape == (batch[nt].num_nodes, 16)
        torch.testing.assert_close(got[nt], want[nt], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        model.embed(batch, entity), got[entity][: seed_time.size(0)], rtol=1e-4, atol=1e-5
    )
