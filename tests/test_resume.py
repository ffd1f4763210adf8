"""A training run killed mid-way and restarted ends exactly where an uninterrupted one ends."""

import numpy as np
import pandas as pd
import pytest
import torch

from tve_pipeline import evaluation, training
from tve_pipeline.config import make_recipe
from tve_pipeline.database import column_types, open_dataset
from tve_pipeline.datasets import build_synthetic
from tve_pipeline.graph import graph_for, seed_tensors
from tve_pipeline.model import RDLModel
from tve_pipeline.sampling import Prefetcher, TemporalNeighborSampler
from tve_pipeline.targets import TargetQuery, compute_targets
from tve_pipeline.traversal import build_traversal_graph
from tve_pipeline.windows import training_seed_times


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
    # the validation window's task vectors: every epoch is scored on them
    val_raw = compute_targets(
        TargetQuery(
            tables, ds.manifest.tables, defs, "customers", [pd.Timestamp(ds.val_timestamp)], delta
        )
    )
    recipe = make_recipe(
        "test",
        {
            "pretrain": {"epochs": 3, "steps_per_epoch": 4},
            "finetune": {"epochs": 3, "steps_per_epoch": 4},
        },
    )
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


def _kill_at(step):
    def on_step(global_step):
        if global_step == step:
            raise Killed(step)

    return on_step


def _assert_same_states(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "kill_step", [3, 4, 9]
)  # mid-epoch, at an epoch boundary, in the last epoch
def test_pretrain_resumes_to_the_same_result(setup, tmp_path, kill_step):
    s = setup
    args = (
        s["data"],
        s["col_stats"],
        "customers",
        "customer_id",
        s["raw"],
        {d.name: d.aggregation for d in s["defs"]},
        s["recipe"],
        torch.device("cpu"),
    )
    kw = {"objective": "tve+ctr", "val_targets": s["val_raw"]}
    whole = training.pretrain(*args, **kw)
    ckpt = training.Checkpointer(tmp_path / "pretrain.pt", every=2)
    with pytest.raises(Killed):
        training.pretrain(*args, **kw, checkpoint=ckpt, on_step=_kill_at(kill_step))
    assert ckpt.path.exists()
    resumed = training.pretrain(*args, **kw, checkpoint=ckpt)
    _assert_same_states(whole["backbone"], resumed["backbone"])
    assert whole["history"] == resumed["history"] and "val_loss" in whole["history"][0]
    assert whole["best_epoch"] == resumed["best_epoch"]
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


def test_prefetching_changes_nothing(setup, tmp_path):
    # Sampling one step ahead on a worker thread draws exactly what the plain loop draws.
    s = setup
    task = s["ds"].load_task("customer-churn")
    tables = {split: task.get_table(split) for split in ("train", "val")}
    args = (s["data"], s["col_stats"], task, tables, s["recipe"], torch.device("cpu"))
    threaded = training.finetune(*args, seed=5, prefetch=True)
    plain = training.finetune(*args, seed=5, prefetch=False)
    assert threaded["history"] == plain["history"]
    _assert_same_states(threaded["state_dict"], plain["state_dict"])
    pre = (
        s["data"],
        s["col_stats"],
        "customers",
        "customer_id",
        s["raw"],
        {d.name: d.aggregation for d in s["defs"]},
        s["recipe"],
        torch.device("cpu"),
    )
    kw = {"objective": "tve+mae", "val_targets": s["val_raw"]}
    a = training.pretrain(*pre, **kw, prefetch=True)
    b = training.pretrain(*pre, **kw, prefetch=False)
    _assert_same_states(a["backbone"], b["backbone"])


def test_prefetcher_keeps_order_shares_generators_and_raises():
    import threading

    gen = torch.Generator().manual_seed(0)
    threads = set()

    def draw(i):
        threads.add(threading.current_thread().name)
        return i, torch.randint(0, 10**9, (3,), generator=gen)

    threaded = list(Prefetcher(draw, range(6)))
    assert any(t.startswith("tve-prefetch") for t in threads)  # really on the worker
    gen.manual_seed(0)
    plain = [draw(i) for i in range(6)]  # the plain loop, same generator
    assert [i for i, _ in threaded] == list(range(6))
    for (_, x), (_, y) in zip(threaded, plain):
        assert torch.equal(x, y)

    def boom(i):
        if i == 2:
            raise ValueError("bad batch 2")
        return i

    with pytest.raises(ValueError, match="bad batch 2"):
        list(Prefetcher(boom, range(5)))
    assert list(Prefetcher(boom, range(2), enabled=False)) == [0, 1]


def test_step_generators_are_independent_of_history():
    a = training.step_generator(7, 12, "sample")
    torch.rand(5, generator=training.step_generator(7, 11, "sample"))  # another step's draws
    b = training.step_generator(7, 12, "sample")
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    c = training.step_generator(7, 12, "noise")
    d = training.step_generator(8, 12, "sample")
    x = torch.rand(4, generator=training.step_generator(7, 12, "sample"))
    assert not torch.equal(x, torch.rand(4, generator=c)) and not torch.equal(
        x, torch.rand(4, generator=d)
    )


def test_regression_outputs_are_clamped_to_the_training_labels_percentiles(setup):
    # RelBench's RDL clamps regression predictions to the 2nd-98th percentile of the
    # training labels; ours takes them from the labels the run trained on (its fraction).
    s = setup
    task = s["ds"].load_task("customer-spend")
    tables = {split: task.get_table(split) for split in ("train", "val")}
    args = (s["data"], s["col_stats"], task, tables, s["recipe"], torch.device("cpu"))
    res = training.finetune(*args, seed=1, label_fraction=0.5)
    seen = tables["train"].df.sample(frac=0.5, random_state=1)[task.target_col].to_numpy()
    lo, hi = np.percentile(seen, [2, 98])
    assert res["output_range"] == pytest.approx((lo, hi))
    assert lo < hi
    # evaluate() with the range == RelBench's evaluator on predictions clamped by hand
    tabs = {
        **tables,
        "test": task.get_table("test"),
        "test_labels": task.get_table("test", mask_input_cols=False),
    }
    got = evaluation.evaluate(
        s["data"],
        s["col_stats"],
        task,
        tabs,
        res["state_dict"],
        s["recipe"],
        torch.device("cpu"),
        seed=1,
        output_range=res["output_range"],
    )
    model = RDLModel(s["data"], s["col_stats"], s["recipe"].backbone, out_channels=1)
    model.load_state_dict(res["state_dict"])
    sampler = TemporalNeighborSampler(s["data"], list(s["recipe"].backbone.num_neighbors))
    df = tables["val"].df
    nodes, times = seed_tensors(df[task.entity_col], df[task.time_col])
    raw = (
        evaluation.predict(
            model, sampler, task.entity_table, nodes, times, 512, torch.device("cpu"), seed=1
        )
        .view(-1)
        .numpy()
    )
    assert ((raw < lo) | (raw > hi)).any()  # the clamp has something to do here
    assert got["val"] == pytest.approx(task.evaluate(np.clip(raw, lo, hi), tables["val"]))
    assert got["val"] != pytest.approx(task.evaluate(raw, tables["val"]))
    # classification is never clamped
    churn = s["ds"].load_task("customer-churn")
    assert (
        training.finetune(
            s["data"],
            s["col_stats"],
            churn,
            {sp: churn.get_table(sp) for sp in ("train", "val")},
            s["recipe"],
            torch.device("cpu"),
            seed=1,
        )["output_range"]
        is None
    )


def _churn(s):
    task = s["ds"].load_task("customer-churn")
    tables = {split: task.get_table(split) for split in ("train", "val")}
    return task, tables


def test_a_one_percent_cell_trains_the_floor_of_steps_with_adamw(setup, monkeypatch):
    # 1% of the tiny table is one batch an epoch: 2 epochs would be 2 steps; the floor is 10
    s = setup
    task, tables = _churn(s)
    recipe = s["recipe"].model_copy(
        update={
            "finetune": s["recipe"].finetune.model_copy(
                update={"epochs": 2, "steps_per_epoch": None, "min_steps": 10, "eval_every": 5}
            )
        }
    )
    optimisers, steps = [], []
    real_step = torch.optim.AdamW.step

    def counted(self, *a, **kw):
        steps.append(self)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    real_init = torch.optim.AdamW.__init__

    def recorded(self, params, **kw):
        optimisers.append(kw)
        real_init(self, params, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", recorded)
    args = (s["data"], s["col_stats"], task, tables, recipe, torch.device("cpu"))
    res = training.finetune(*args, seed=0, label_fraction=0.01)
    assert res["n_train"] == round(0.01 * len(tables["train"].df)) >= 1
    assert len(steps) == 10 and res["steps"] == 10
    assert [row["step"] for row in res["history"]] == [5, 10]  # every eval_every steps
    assert optimisers == [{"lr": 0.005, "weight_decay": 0.01}]  # the reference's AdamW


def test_the_learning_rate_with_the_best_validation_score_is_kept(setup, monkeypatch):
    s = setup
    task, tables = _churn(s)
    recipe = s["recipe"].model_copy(
        update={
            "finetune": s["recipe"].finetune.model_copy(update={"lr_grid": (0.01, 0.002, 0.001)})
        }
    )
    # three evaluations a rate; the second rate's first evaluation is the best of all
    scores = iter([[0.2, 0.3, 0.1], [0.6, 0.4, 0.6], [0.5, 0.5, 0.6]])
    rates, kept = [], []

    def scorer(model, *args):
        own = iter(next(scores))

        def evaluate():
            kept.append({k: v.clone() for k, v in model.state_dict().items()})
            score = next(own)
            return {"val_auroc": score}, score

        return evaluate

    monkeypatch.setattr(training, "_val_scorer", scorer)
    real_init = torch.optim.AdamW.__init__

    def recorded(self, params, **kw):
        rates.append(kw["lr"])
        real_init(self, params, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", recorded)
    args = (s["data"], s["col_stats"], task, tables, recipe, torch.device("cpu"))
    res = training.finetune(*args, seed=0)
    assert rates == [0.01, 0.002, 0.001]
    assert res["lr"] == 0.002 and res["best_step"] == 4 and res["val_metrics"] == {"auroc": 0.6}
    assert [r["val_score"] for r in res["lr_search"]] == [0.3, 0.6, 0.6]  # a tie: the earlier
    _assert_same_states(res["state_dict"], kept[3])


@pytest.mark.parametrize("kill_step", [7, 12 + 5])  # in the first rate, in the second
def test_finetune_with_a_grid_and_averaging_resumes_to_the_same_result(setup, tmp_path, kill_step):
    s = setup
    task, tables = _churn(s)
    recipe = s["recipe"].model_copy(
        update={
            "finetune": s["recipe"].finetune.model_copy(
                update={"lr_grid": (0.005, 0.02), "average_last": 2}
            )
        }
    )
    args = (s["data"], s["col_stats"], task, tables, recipe, torch.device("cpu"))
    whole = training.finetune(*args, seed=3)
    assert whole["steps"] == 12 and len(whole["lr_search"]) == 2
    ckpt = training.Checkpointer(tmp_path / "finetune.pt", every=3)
    with pytest.raises(Killed):
        training.finetune(*args, seed=3, checkpoint=ckpt, on_step=_kill_at(kill_step))
    resumed = training.finetune(*args, seed=3, checkpoint=ckpt)
    assert whole["history"] == resumed["history"] and whole["lr_search"] == resumed["lr_search"]
    assert (whole["lr"], whole["best_step"], whole["averaged"]) == (
        resumed["lr"],
        resumed["best_step"],
        resumed["averaged"],
    )
    _assert_same_states(whole["state_dict"], resumed["state_dict"])
    assert not list(tmp_path.iterdir())  # every rate's checkpoint is gone


def test_a_small_label_set_trains_on_the_smaller_batch_the_schedule_names(setup, monkeypatch):
    # 10 epochs must make the 10-step floor: a batch of ceil(n x 10 / 10) = n rows would be
    # one step an epoch; min_batch_size 4 < n < batch_size 64, so every batch holds <= n rows
    # and the run makes the schedule's steps, each batch drawn from the label sample.
    s = setup
    task, tables = _churn(s)
    cfg = s["recipe"].finetune.model_copy(
        update={
            "epochs": 10,
            "steps_per_epoch": None,
            "min_steps": 20,
            "eval_every": 5,
            "batch_size": 64,
            "min_batch_size": 4,
        }
    )
    recipe = s["recipe"].model_copy(update={"finetune": cfg})
    sizes = []
    real = training._batches

    def recorded(n, batch_size, generator, steps):
        for idx in real(n, batch_size, generator, steps):
            sizes.append(len(idx))
            yield idx

    monkeypatch.setattr(training, "_batches", recorded)
    args = (s["data"], s["col_stats"], task, tables, recipe, torch.device("cpu"))
    res = training.finetune(*args, seed=0, label_fraction=0.1)
    n = res["n_train"]
    expected = max(4, min(64, -(-n * 10 // 20)))  # by hand: ceil(n x epochs / min_steps)
    assert 4 < expected < 64
    assert res["batch_size"] == expected
    assert max(sizes) == expected and len(sizes) == res["steps"]
    every, evaluations = training.finetune_schedule(n, cfg)
    assert res["steps"] == every * evaluations
