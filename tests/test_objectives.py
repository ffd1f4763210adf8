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
