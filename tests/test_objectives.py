"""Every pre-training objective and label fraction, on the tiny database (the end-to-end
run covers one objective, one fraction and one seed)."""

import numpy as np
import pandas as pd
import pytest
import torch

from tve_pipeline import training
from tve_pipeline.config import make_recipe
from tve_pipeline.database import column_types, open_dataset
from tve_pipeline.datasets import build_synthetic
from tve_pipeline.graph import graph_for
from tve_pipeline.targets import TargetQuery, compute_targets
from tve_pipeline.traversal import build_traversal_graph
from tve_pipeline.windows import training_seed_times


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = open_dataset(build_synthetic(tmp_path_factory.mktemp("db") / "tiny"))
    db = ds.get_db()
    tables = {n: t.df for n, t in db.table_dict.items()}
    types = column_types(tables, ds.manifest)
    defs = build_traversal_graph(ds.manifest.tables, types, "customers", hops=1)
    delta = pd.Timedelta("30 days")
    raw = compute_targets(
        TargetQuery(
            tables,
            ds.manifest.tables,
            defs,
            "customers",
            training_seed_times(ds.val_timestamp, db.min_timestamp, delta),
            delta,
        )
    )
    val_raw = compute_targets(  # the validation window, on which each epoch is scored
        TargetQuery(
            tables, ds.manifest.tables, defs, "customers", [pd.Timestamp(ds.val_timestamp)], delta
        )
    )
    recipe = make_recipe("test")
    data, col_stats = graph_for(db, types, recipe.backbone)
    return {
        "ds": ds,
        "raw": raw,
        "val_raw": val_raw,
        "defs": defs,
        "data": data,
        "col_stats": col_stats,
        "recipe": recipe,
    }


def test_each_objective_trains_its_own_backbone(setup):
    s = setup
    states = {}
    for objective in ("tve", "mae", "ctr", "tve+mae", "tve+ctr"):
        result = training.pretrain(
            s["data"],
            s["col_stats"],
            "customers",
            "customer_id",
            s["raw"],
            {d.name: d.aggregation for d in s["defs"]},
            s["recipe"],
            torch.device("cpu"),
            val_targets=s["val_raw"],
            objective=objective,
        )
        assert result["objective"] == objective and result["n_train_seeds"] > 0
        # each objective's own loss on the validation window, clean inputs: finite
        assert result["n_val_seeds"] > 0 and np.isfinite(result["best_val_loss"])
        states[objective] = result["backbone"]
    key = next(k for k in states["tve"] if k.startswith("gnn.") and k.endswith("weight"))
    for a in states:
        for b in states:
            if a < b:
                assert not torch.equal(states[a][key], states[b][key]), (a, b)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_a_label_fraction_is_the_same_rows_for_every_method(setup, fraction):
    s = setup
    task = s["ds"].load_task("customer-churn")
    db = task.get_db(upto_test_timestamp=False)
    tables = {split: task.get_table(split, db=db) for split in ("train", "val", "test")}
    n = len(tables["train"].df)
    seen = {}
    for seed in (0, 1):
        for method, backbone in (("scratch", None), ("pretrained", None)):
            result = training.finetune(
                s["data"],
                s["col_stats"],
                task,
                tables,
                s["recipe"],
                torch.device("cpu"),
                seed=seed,
                label_fraction=fraction,
                backbone=backbone,
            )
            assert result["n_train"] == round(n * fraction)
            seen[(method, seed)] = result["history"]
        # the same label sample and random streams: the same run for both methods without a backbone
        assert seen[("scratch", seed)] == seen[("pretrained", seed)]
    assert seen[("scratch", 0)] != seen[("scratch", 1)]


# --------------------------------------------------------------------------- the reference's SSL
# Hand-built batches: the small random databases of test_sampling, users given two text
# embedding columns (and a missing numerical and categorical cell), sampled around users.


def _text_graph():
    """test_sampling's graph with two text-embedding columns on users (widths 5 and 3)."""
    import copy

    from test_sampling import make_graph
    from torch_frame import TensorFrame, stype
    from torch_frame.data import MultiEmbeddingTensor
    from torch_frame.data.stats import StatType

    base, base_stats = make_graph(1)
    data, col_stats = copy.deepcopy(base), copy.deepcopy(base_stats)
    tf = data["users"].tf
    n = tf.num_rows
    g = torch.Generator().manual_seed(3)
    emb = MultiEmbeddingTensor.from_tensor_list(
        [torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)]
    )
    feats = {st: f.clone() for st, f in tf.feat_dict.items()}
    age = tf.col_names_dict[stype.numerical].index("age")
    feats[stype.numerical][0, age] = float("nan")
    feats[stype.categorical][1, 0] = -1
    data["users"].tf = TensorFrame(
        {**feats, stype.embedding: emb}, {**tf.col_names_dict, stype.embedding: ["bio", "note"]}
    )
    col_stats["users"]["bio"] = {StatType.EMB_DIM: 5}
    col_stats["users"]["note"] = {StatType.EMB_DIM: 3}
    return data, col_stats


def _ssl_setup(objective: str, n_seeds: int = 12):
    from test_sampling import random_seeds

    from tve_pipeline.config import BackboneConfig
    from tve_pipeline.model import RDLModel
    from tve_pipeline.objectives import objective_heads
    from tve_pipeline.sampling import TemporalNeighborSampler

    data, col_stats = _text_graph()
    cfg = BackboneConfig(channels=8, encoder_layers=1, num_neighbors=(4, 3), aggr="sum")
    torch.manual_seed(0)
    # fast=False: every sampled copy of a row is encoded from its own cells, as the oracle
    # below encodes them (the fast path's equality with this is tests/test_model_fast.py's).
    model = RDLModel(data, col_stats, cfg, out_channels=3, fast=False).eval()
    heads = objective_heads(objective, cfg.channels, data, col_stats, "users", cfg.aggr).eval()
    nodes, seed_time = random_seeds(data, "users", n_seeds, 5)
    sampler = TemporalNeighborSampler(data, list(cfg.num_neighbors))
    batch = sampler.sample("users", nodes, seed_time, generator=torch.Generator().manual_seed(1))
    vectors = torch.rand(n_seeds, 3, generator=torch.Generator().manual_seed(2))
    vectors[::3] = torch.tensor([1.0, 0.0, 0.0])  # inactive rows
    return data, col_stats, model, heads, batch, vectors


def _oracle_all(model, batch, entity="users"):
    """Every node through relbench's modules as they are: encoder, time, full GNN."""
    x = {nt: model.encoder.encoders[nt](tf) for nt, tf in batch.collect("tf").items()}
    seed_time = batch[entity].seed_time
    for nt, t in model.temporal_encoder(
        seed_time, batch.collect("time"), batch.collect("batch")
    ).items():
        x[nt] = x[nt] + t
    return model.gnn(x, batch.collect("edge_index"))


def _tve_by_hand(model, z, vectors, cfg) -> float:
    pred = model.head(z).double()
    target = vectors.double()
    w = torch.where(target[:, 0] == 1, cfg.inactive_weight, 1 - cfg.inactive_weight).double()
    cos = (pred * target).sum(1) / (pred.norm(dim=1) * target.norm(dim=1))
    return float((w * (1 - cos) ** cfg.sce_alpha).sum() / w.sum())


def _mae_by_hand(heads, h, batch, col_stats) -> float:
    """loss_helper.py MaskedLoss, one cell at a time over every node of every node type."""
    from torch_frame import stype
    from torch_frame.data.stats import StatType

    dec = heads["mae"]
    d = {nt: dec.enc_to_dec[nt](x) for nt, x in h.items()}
    r = dec.gnn(d, batch.collect("edge_index"))
    assert set(r) == set(batch.node_types)  # every node type of the subgraph is decoded
    num, cat, emb = [], [], []
    for nt, z in r.items():
        tf = batch[nt].tf
        names = tf.col_names_dict
        for j, col in enumerate(names.get(stype.numerical, [])):
            pred = dec.num[nt](z)[:, j].double()
            mean, std = col_stats[nt][col][StatType.MEAN], col_stats[nt][col][StatType.STD]
            errs = [
                (pred[i].item() - (y - mean) / std) ** 2
                for i, y in enumerate(tf.feat_dict[stype.numerical][:, j].tolist())
                if y == y  # not NaN
            ]
            if errs and std > 0:
                num.append(sum(errs) / len(errs))
        for j, _ in enumerate(names.get(stype.categorical, [])):
            logp = torch.log_softmax(dec.cat[nt][j](z).double(), dim=1)
            ys = tf.feat_dict[stype.categorical][:, j].tolist()
            errs = [-logp[i, y].item() for i, y in enumerate(ys) if y != -1]
            if errs:
                cat.append(sum(errs) / len(errs))
        if stype.embedding in names:
            pred = dec.emb[nt](z).double()
            values = tf.feat_dict[stype.embedding].values.double()
            start = 0
            for col in names[stype.embedding]:
                width = col_stats[nt][col][StatType.EMB_DIM]
                diff = pred[:, start : start + width] - values[:, start : start + width]
                emb.append(float((diff**2).sum()) / diff.numel())
                start += width
    assert num and cat and len(emb) == 2
    return sum(sum(part) / len(part) for part in (cat, num, emb))


def _info_nce_by_hand(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    """(CE over rows + CE over columns) / 2 of a b^T / tau, one node at a time."""
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    n = a.size(0)
    rows = cols = 0.0
    for i in range(n):
        s_row = torch.stack([a[i] @ b[j] for j in range(n)]) / tau
        s_col = torch.stack([a[j] @ b[i] for j in range(n)]) / tau
        rows += -(s_row[i] - torch.logsumexp(s_row, 0)).item()
        cols += -(s_col[i] - torch.logsumexp(s_col, 0)).item()
    return (rows / n + cols / n) / 2


def _finite_grads(*modules):
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("objective", ["mae", "tve+mae"])
def test_mae_is_a_hand_computation_over_every_node_of_the_corrupted_view(objective):
    from tve_pipeline.config import PretrainConfig
    from tve_pipeline.objectives import PretrainingLoss, corrupted_copy

    data, col_stats, model, heads, batch, vectors = _ssl_setup(objective)
    cfg = PretrainConfig(corruption_rate=0.15, mae_corruption_rate=0.25)
    rate = 0.15 if objective == "tve+mae" else 0.25
    got = PretrainingLoss(objective, model, heads, "users", cfg)(
        batch, vectors, torch.Generator().manual_seed(7)
    )
    # the view the encoder must see: the same generator's corruption at the objective's rate
    view = corrupted_copy(batch, rate, torch.Generator().manual_seed(7))
    assert any(
        not torch.equal(view[nt].tf.feat_dict[st], f)
        for nt in batch.node_types
        for st, f in batch[nt].tf.feat_dict.items()
        if isinstance(f, torch.Tensor)
    )
    with torch.no_grad():
        h = _oracle_all(model, view)
        want = _mae_by_hand(heads, h, batch, col_stats)  # targets: the CLEAN batch
        if objective == "tve+mae":
            want = _tve_by_hand(model, h["users"][: len(vectors)], vectors, cfg) + 0.1 * want
        # the encoder never sees the clean cells: decoding the clean batch gives another loss
        clean = _mae_by_hand(heads, _oracle_all(model, batch), batch, col_stats)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert abs(clean - want) > 1e-4
    got.backward()
    _finite_grads(model, heads)
    assert heads["mae"].emb["users"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("objective", ["ctr", "tve+ctr"])
def test_ctr_is_an_explicit_info_nce_over_every_sampled_node(objective):
    from tve_pipeline.config import PretrainConfig
    from tve_pipeline.objectives import PretrainingLoss, corrupted_copy

    data, col_stats, model, heads, batch, vectors = _ssl_setup(objective)
    cfg = PretrainConfig(corruption_rate=0.15, ctr_corruption_rate=0.25, ctr_tau=0.1)
    rate = 0.15 if objective == "tve+ctr" else 0.25
    got = PretrainingLoss(objective, model, heads, "users", cfg)(
        batch, vectors, torch.Generator().manual_seed(7)
    )
    view = corrupted_copy(batch, rate, torch.Generator().manual_seed(7))
    with torch.no_grad():
        h_view, h_clean = _oracle_all(model, view), _oracle_all(model, batch)
        per_type = [
            _info_nce_by_hand(heads["proj"][nt](h_view[nt]), heads["proj"][nt](h_clean[nt]), 0.1)
            for nt in batch.node_types
        ]
        assert all(batch[nt].num_nodes > len(vectors) for nt in ("events", "products"))
        want = sum(per_type) / len(per_type)
        if objective == "tve+ctr":
            want = _tve_by_hand(model, h_view["users"][: len(vectors)], vectors, cfg) + 0.1 * want
    assert heads["proj"]["users"].out_features == 4  # channels // 2
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    _finite_grads(model, heads)


@pytest.mark.parametrize("tau,chunk", [(0.1, 7), (0.1, 4096), (0.01, 7), (0.01, 4096)])
def test_info_nce_in_blocks_equals_cross_entropy_over_the_whole_matrix(tau, chunk):
    """Value and gradients against torch's cross-entropy over the whole similarity matrix
    (and the value against the node-by-node loop); tau 0.01 takes the logsumexp route."""
    from tve_pipeline.objectives import info_nce

    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(50, 6, generator=g) * 3, torch.randn(50, 6, generator=g)
    a1, b1 = (a0.clone().requires_grad_(), b0.clone().requires_grad_())
    a2, b2 = (a0.clone().requires_grad_(), b0.clone().requires_grad_())
    s = torch.nn.functional.normalize(a1, dim=1) @ torch.nn.functional.normalize(b1, dim=1).t()
    labels = torch.arange(50)
    F = torch.nn.functional
    whole = (F.cross_entropy(s / tau, labels) + F.cross_entropy(s.t() / tau, labels)) / 2
    blocks = info_nce(a2, b2, tau, chunk=chunk)
    assert whole.item() == pytest.approx(_info_nce_by_hand(a0, b0, tau), rel=1e-5)
    torch.testing.assert_close(blocks, whole)
    (whole * 3).backward()
    (blocks * 3).backward()
    torch.testing.assert_close(a2.grad, a1.grad)
    torch.testing.assert_close(b2.grad, b1.grad)


def _binomial_ok(k: int, n: int, p: float) -> bool:
    return abs(k - n * p) <= 5 * (n * p * (1 - p)) ** 0.5


def test_corruption_swaps_cells_within_columns_and_zeroes_text_embedding_values():
    from torch_frame import TensorFrame, stype
    from torch_frame.data import MultiEmbeddingTensor
    from torch_geometric.data import HeteroData

    from tve_pipeline.objectives import corrupted_copy

    n, rate = 400, 0.25
    b = HeteroData()
    num = torch.arange(n * 3, dtype=torch.float32).view(n, 3)  # distinct values per column
    cat = torch.arange(n * 2).view(n, 2)
    ts = torch.arange(n * 7).view(n, 1, 7)
    emb_values = 1.0 + torch.rand(n, 6, generator=torch.Generator().manual_seed(0))
    emb = MultiEmbeddingTensor(
        num_rows=n, num_cols=2, values=emb_values.clone(), offset=torch.tensor([0, 4, 6])
    )
    b["t"].tf = TensorFrame(
        {
            stype.numerical: num.clone(),
            stype.categorical: cat.clone(),
            stype.timestamp: ts,
            stype.embedding: emb,
        },
        {
            stype.numerical: ["a", "b", "c"],
            stype.categorical: ["d", "e"],
            stype.timestamp: ["f"],
            stype.embedding: ["g", "h"],
        },
    )
    view = corrupted_copy(b, rate, torch.Generator().manual_seed(1))
    feats = view["t"].tf.feat_dict
    for st, before in ((stype.numerical, num), (stype.categorical, cat)):
        after = feats[st]
        changed = after != before
        # a changed cell holds another row's value of its own column
        for j in range(before.size(1)):
            assert set(after[:, j].tolist()) <= set(before[:, j].tolist())
        # masked at rate, minus the cells a permutation maps to themselves (1/n)
        assert _binomial_ok(int(changed.sum()), changed.numel(), rate * (1 - 1 / n))
    assert torch.equal(feats[stype.timestamp], ts)  # timestamps are not corrupted
    values = feats[stype.embedding].values
    zeroed = values == 0
    assert torch.equal(values[~zeroed], emb_values[~zeroed])  # kept values stay in place
    assert _binomial_ok(int(zeroed.sum()), zeroed.numel(), rate)
    assert torch.equal(feats[stype.embedding].offset, emb.offset)
    assert torch.equal(b["t"].tf.feat_dict[stype.embedding].values, emb_values)  # untouched
