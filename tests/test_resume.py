"""A training run killed mid-way and restarted ends exactly where an uninterrupted one ends."""

import pandas as pd
import pytest
import torch

from tve_pipeline import training
from tve_pipeline.config import make_recipe
from tve_pipeline.database import column_types, open_dataset, training_seed_times
from tve_pipeline.datasets import build_synthetic
from tve_pipeline.targets import compute_targets
from tve_pipeline.traversal import build_traversal_graph


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = open_dataset(build_synthetic(tmp_path_factory.mktemp("db") / "tiny"))
    db = ds.get_db()
    tables = {n: t.df for n, t in db.table_dict.items()}
    types = column_types(tables, ds.manifest)
    defs = build_traversal_graph(ds.manifest.tables, types, "customers", hops=1)
    delta = pd.Timedelta("30 days")
    raw = compute_targets(tables, ds.manifest.tables, defs, "customers",
                          training_seed_times(ds.val_timestamp, db.min_timestamp, delta), delta)
    recipe = make_recipe("test", {"pretrain": {"epochs": 3, "steps_per_epoch": 4}, "finetune": {"epochs": 3, "steps_per_epoch": 4}})
    data, col_stats = training.build_graph(db, types, text_dim=recipe.backbone.text_dim,
                                           time_features=recipe.backbone.time_features)
    return {"ds": ds, "raw": raw, "defs": defs, "data": data, "col_stats": col_stats, "recipe": recipe}


def _kill_at(step):
    def on_step(global_step):
        if global_step == step:
            raise Killed(step)
    return on_step


def _assert_same_states(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kill_step", [3, 4, 9])  # mid-epoch, at an epoch boundary, in the last epoch
def test_pretrain_resumes_to_the_same_result(setup, tmp_path, kill_step):
    s = setup
    args = (s["data"], s["col_stats"], "customers", "customer_id", s["raw"],
            {d.name: d.aggregation for d in s["defs"]}, s["recipe"], torch.device("cpu"))
    whole = training.pretrain(*args, objective="tve+ctr")
    ckpt = training.Checkpointer(tmp_path / "pretrain.pt", every=2)
    with pytest.raises(Killed):
        training.pretrain(*args, objective="tve+ctr", checkpoint=ckpt, on_step=_kill_at(kill_step))
    assert ckpt.path.exists()
    resumed = training.pretrain(*args, objective="tve+ctr", checkpoint=ckpt)
    _assert_same_states(whole["backbone"], resumed["backbone"])
    assert whole["history"] == resumed["history"]
    assert not ckpt.path.exists()  # a finished run leaves no stale checkpoint behind


def test_finetune_resumes_to_the_same_metrics(setup, tmp_path):
    s = setup
    task = s["ds"].load_task("customer-churn")
    tables = {split: task.get_table(split) for split in ("train", "val")}
    args = (s["data"], s["col_stats"], task, tables, s["recipe"], torch.device("cpu"))
    whole = training.finetune(*args, seed=3)
    ckpt = training.Checkpointer(tmp_path / "finetune.pt", every=3)
    with pytest.raises(Killed):
        training.finetune(*args, seed=3, checkpoint=ckpt, on_step=_kill_at(7))
    resumed = training.finetune(*args, seed=3, checkpoint=ckpt)
    assert whole["val_metrics"] == resumed["val_metrics"]
    assert whole["history"] == resumed["history"]
    _assert_same_states(whole["state_dict"], resumed["state_dict"])


def test_checkpoint_write_is_atomic(tmp_path):
    ckpt = training.Checkpointer(tmp_path / "c.pt", every=1)
    ckpt.save({"a": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    assert torch.equal(ckpt.load()["a"], torch.ones(3))


def test_checkpoint_of_another_run_is_not_resumed(tmp_path):
    training.Checkpointer(tmp_path / "c.pt", every=1, key="recipe A").save({"a": 1})
    assert training.Checkpointer(tmp_path / "c.pt", every=1, key="recipe B").load() is None
    assert training.Checkpointer(tmp_path / "c.pt", every=1, key="recipe A").load()["a"] == 1
