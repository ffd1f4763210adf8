"""The linear probe on the tiny database, against scikit-learn fitted here by hand.

The oracle re-does the probe's steps outside it: the embeddings come from the probe's own
embedding function (the one thing taken from the code under test), the standardisation,
the label centring, the fit at the chosen strength, the clamp and the metric are written
out here with numpy and scikit-learn.
"""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, SGDRegressor
from sklearn.metrics import mean_absolute_error, roc_auc_score

from tve_pipeline.config import make_recipe
from tve_pipeline.database import open_dataset
from tve_pipeline.datasets import build_synthetic
from tve_pipeline.graph import graph_for
from tve_pipeline.model import RDLModel, backbone_state
from tve_pipeline.probe import embed_seeds, linear_probe, probe_encoder
from tve_pipeline.sampling import sampler_for
from tve_pipeline.summary import summarise_database
from tve_pipeline.training import _label_sample

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    dataset_dir = build_synthetic(tmp_path_factory.mktemp("probe") / "tiny")
    ds = open_dataset(dataset_dir)
    recipe = make_recipe("test")
    summary = summarise_database(dataset_dir)
    data, col_stats = graph_for(ds.get_db(), summary.column_types, recipe.backbone)
    # a "pre-trained" backbone: weights other than the recipe's random initialisation
    torch.manual_seed(123)
    backbone = backbone_state(RDLModel(data, col_stats, recipe.backbone, out_channels=1))
    return {
        "ds": ds,
        "recipe": recipe,
        "summary": summary,
        "data": data,
        "col_stats": col_stats,
        "backbone": backbone,
    }


def _task(tiny, name):
    task = tiny["ds"].load_task(name)
    db = task.get_db(upto_test_timestamp=False)
    tables = {split: task.get_table(split, db=db) for split in ("train", "val", "test")}
    tables["test_labels"] = task.get_table("test", mask_input_cols=False, db=db)
    return task, tables


def _embeddings(tiny, task, tables, fraction, seed, backbone):
    recipe = tiny["recipe"]
    model = probe_encoder(tiny["data"], tiny["col_stats"], recipe, backbone)
    sampler = sampler_for(tiny["data"], recipe.backbone)
    train = _label_sample(task, tables["train"].df, fraction, seed)
    frames = (train, tables["val"].df, tables["test"].df)
    x = [embed_seeds(model, sampler, task, f, recipe.probe.batch_size, CPU, seed) for f in frames]
    mean, std = x[0].mean(0), x[0].std(0)
    std[std <= 1e-12] = 1.0
    return train, [(m - mean) / std for m in x]


def _probe(tiny, task, tables, **kw):
    return linear_probe(tiny["data"], tiny["col_stats"], task, tables, tiny["recipe"], CPU, **kw)


@pytest.mark.parametrize("backbone", ["pretrained", "scratch"])
def test_classification_probe_is_sklearn_logistic_regression(tiny, backbone):
    task, tables = _task(tiny, "customer-churn")
    state = tiny["backbone"] if backbone == "pretrained" else None
    result = _probe(tiny, task, tables, seed=1, label_fraction=0.5, backbone=state)
    train, (x_tr, x_val, x_te) = _embeddings(tiny, task, tables, 0.5, 1, state)
    assert result["n_train"] == len(train) < len(tables["train"].df)
    y_val = tables["val"].df[task.target_col].to_numpy()
    y_te = tables["test_labels"].df[task.target_col].to_numpy()
    by_c = {}
    for c in tiny["recipe"].probe.c_grid:
        fit = LogisticRegression(C=c, max_iter=1000).fit(x_tr, train[task.target_col])
        by_c[c] = fit
    val_auc = {c: roc_auc_score(y_val, f.predict_proba(x_val)[:, 1]) for c, f in by_c.items()}
    best = max(val_auc, key=lambda c: (val_auc[c], -c))  # ties: the stronger penalty
    assert result["regularisation"] == "C" and result["strength"] == best
    assert [g["val_score"] for g in result["grid"]] == pytest.approx(list(val_auc.values()))
    assert result["metric"] == "roc_auc"
    assert result["val_metrics"]["roc_auc"] == pytest.approx(val_auc[best], abs=1e-9)
    test_auc = roc_auc_score(y_te, by_c[best].predict_proba(x_te)[:, 1])
    assert result["test_metrics"]["roc_auc"] == pytest.approx(test_auc, abs=1e-9)


def test_regression_probe_is_sklearn_l1_regression_clamped(tiny):
    task, tables = _task(tiny, "customer-spend")
    result = _probe(tiny, task, tables, seed=0, backbone=tiny["backbone"])
    train, (x_tr, x_val, x_te) = _embeddings(tiny, task, tables, 1.0, 0, tiny["backbone"])
    y = train[task.target_col].to_numpy(dtype=float)
    centre = np.median(y)
    scale = np.mean(np.abs(y - centre))
    std = y.std(ddof=1)  # NMAE: MAE over the training labels' std (RelBench 3)
    lo, hi = np.percentile(y, [2, 98])
    assert result["regularisation"] == "alpha"
    fit = SGDRegressor(
        loss="epsilon_insensitive",
        epsilon=0.0,
        alpha=result["strength"],
        average=True,
        max_iter=1000,
        tol=1e-5,
        random_state=0,
    ).fit(x_tr, (y - centre) / scale)

    def nmae(x, table):
        pred = np.clip(fit.predict(x) * scale + centre, lo, hi)
        return mean_absolute_error(table.df[task.target_col], pred) / std

    assert "nmae" in result["val_metrics"]
    assert result["val_metrics"]["nmae"] == pytest.approx(nmae(x_val, tables["val"]), rel=1e-9)
    assert result["test_metrics"]["nmae"] == pytest.approx(
        nmae(x_te, tables["test_labels"]), rel=1e-9
    )
    first = result["metric"]
    assert result["val_metrics"][first] == min(g["val_score"] for g in result["grid"])


def test_frozen_backbone_is_unchanged_and_is_what_embeds(tiny):
    task, tables = _task(tiny, "customer-churn")
    before = {k: v.clone() for k, v in tiny["backbone"].items()}
    _probe(tiny, task, tables, backbone=tiny["backbone"])
    assert before.keys() == tiny["backbone"].keys()
    assert all(torch.equal(before[k], tiny["backbone"][k]) for k in before)
    model = probe_encoder(tiny["data"], tiny["col_stats"], tiny["recipe"], tiny["backbone"])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_test_labels_never_choose_the_strength(tiny):
    """Permuted test labels: the same strength, grid and val metrics; another test score."""
    task, tables = _task(tiny, "customer-churn")
    result = _probe(tiny, task, tables, backbone=tiny["backbone"])
    shuffled = dict(tables)
    labels = tables["test_labels"]
    permuted = labels.df.copy()
    rng = np.random.default_rng(0)
    permuted[task.target_col] = rng.permutation(permuted[task.target_col].to_numpy())
    shuffled["test_labels"] = type(labels)(
        df=permuted,
        fkey_col_to_pkey_table=labels.fkey_col_to_pkey_table,
        pkey_col=labels.pkey_col,
        time_col=labels.time_col,
    )
    other = _probe(tiny, task, shuffled, backbone=tiny["backbone"])
    assert other["strength"] == result["strength"]
    assert other["grid"] == result["grid"]
    assert other["val_metrics"] == result["val_metrics"]
    assert other["test_metrics"] != result["test_metrics"]


def test_scratch_probe_is_a_random_encoder_reproducible_under_the_seed(tiny):
    data, col_stats, recipe = tiny["data"], tiny["col_stats"], tiny["recipe"]
    rng_before = torch.get_rng_state()
    a = probe_encoder(data, col_stats, recipe, None).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)  # global generator untouched
    b = probe_encoder(data, col_stats, recipe, None).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(recipe.seed)  # the recipe's seed, as pre-training initialises
    c = RDLModel(data, col_stats, recipe.backbone, out_channels=1).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    other = make_recipe("test", {"seed": 7})
    d = probe_encoder(data, col_stats, other, None).state_dict()
    assert any(not torch.equal(a[k], d[k]) for k in a if k.startswith("gnn."))
    task, tables = _task(tiny, "customer-churn")
    first, second = (_probe(tiny, task, tables, seed=2) for _ in range(2))
    for key in ("val_metrics", "test_metrics", "strength", "grid"):
        assert first[key] == second[key]


def test_a_one_class_label_sample_is_one_line_error(tiny):
    task, tables = _task(tiny, "customer-churn")
    tables = dict(tables)
    train = tables["train"]
    df = train.df[train.df[task.target_col] == 1].reset_index(drop=True)
    tables["train"] = type(train)(
        df=df,
        fkey_col_to_pkey_table=train.fkey_col_to_pkey_table,
        pkey_col=train.pkey_col,
        time_col=train.time_col,
    )
    with pytest.raises(ValueError, match="one class only"):
        _probe(tiny, task, tables)


def test_max_train_seeds_takes_a_subsample_of_the_label_sample(tiny):
    task, tables = _task(tiny, "customer-spend")
    recipe = make_recipe("test", {"probe": {"max_train_seeds": 50}})
    result = linear_probe(
        tiny["data"], tiny["col_stats"], task, tables, recipe, CPU, seed=3, label_fraction=0.5
    )
    assert result["n_train"] == 50
    with pytest.raises(ValueError, match="max_train_seeds"):
        make_recipe("test", {"probe": {"max_train_seeds": 0}})


def test_the_embedding_cache_reuses_val_and_test_and_changes_no_result(tiny, monkeypatch):
    from tve_pipeline import probe

    task, tables = _task(tiny, "customer-churn")
    args = (tiny["data"], tiny["col_stats"], task, tables, tiny["recipe"], CPU)
    calls = []
    real = probe.embed_seeds

    def counted(model, sampler, task_, df, *rest):
        calls.append(len(df))
        return real(model, sampler, task_, df, *rest)

    monkeypatch.setattr(probe, "embed_seeds", counted)
    cache = probe.EmbeddingCache()
    cells = [(f, s, b) for b in (None, tiny["backbone"]) for s in (0, 1) for f in (0.5, 1.0)]
    for fraction, seed, backbone in cells:
        plain = linear_probe(*args, seed=seed, label_fraction=fraction, backbone=backbone)
        cached = linear_probe(
            *args, seed=seed, label_fraction=fraction, backbone=backbone, cache=cache
        )
        for key in ("val_metrics", "test_metrics", "strength", "grid"):
            assert cached[key] == plain[key], (fraction, seed, key)
    # uncached: 3 splits a cell; cached: train every cell, val and test once per
    # (encoder, seed): 4 (encoder, seed) pairs x 2 splits
    assert len(calls) == 8 * 3 + 8 + 4 * 2
    assert cache.hits == 4 * 2


def test_cells_that_load_the_graph_anew_share_embeddings_by_the_graphs_name(tiny):
    # a pipeline loads the graph from its cache for every cell: equal graphs, new objects
    from tve_pipeline import probe

    task, tables = _task(tiny, "customer-churn")
    recipe = tiny["recipe"]
    again, col_stats = graph_for(tiny["ds"].get_db(), tiny["summary"].column_types, recipe.backbone)
    assert again is not tiny["data"]
    named, unnamed = probe.EmbeddingCache(), probe.EmbeddingCache()
    for cache, key in ((named, "tiny:fingerprint"), (unnamed, None)):
        for data, stats, fraction in (
            (tiny["data"], tiny["col_stats"], 0.5),
            (again, col_stats, 1.0),
        ):
            args = (data, stats, task, tables, recipe, CPU)
            kw = {"seed": 0, "label_fraction": fraction, "backbone": tiny["backbone"]}
            got = linear_probe(*args, **kw, cache=cache, graph_key=key)
            plain = linear_probe(*args, **kw)
            assert got["val_metrics"] == plain["val_metrics"]
            assert got["test_metrics"] == plain["test_metrics"]
    assert named.hits == 2  # val and test of the second graph object
    assert unnamed.hits == 0  # an unnamed graph is found by its object only
