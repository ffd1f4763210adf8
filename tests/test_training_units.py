"""Small units of the learning stage, each against a hand-computed value."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from tve_pipeline.graph import seed_tensors
from tve_pipeline.normalise import TaskVectorNormaliser
from tve_pipeline.objectives import sce_loss


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_seed_times_are_unix_seconds_whatever_the_resolution(unit):
    ts = pd.Series(
        pd.DatetimeIndex([pd.Timestamp("1970-01-02"), pd.Timestamp("2013-11-08 06:30:00")]).astype(
            f"datetime64[{unit}]"
        )
    )
    _, secs = seed_tensors(pd.Series([0, 1]), ts)
    assert secs.tolist() == [86400, 1383892200]


def test_sce_loss_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # cos = 0 and 1
    weight = torch.tensor([0.25, 0.75])
    # (0.25 * (1 - 0)^2 + 0.75 * 0) / 1.0
    assert sce_loss(pred, target, weight, alpha=2.0).item() == pytest.approx(0.25)


def test_normaliser_fits_on_active_rows_only():
    raw = pd.DataFrame(
        {
            "inactive": [0, 0, 1, 0],
            "amount_sum": [10.0, 30.0, 999.0, np.nan],
            "channel_mode": ["web", "app", None, "web"],
        }
    )
    norm = TaskVectorNormaliser.fit(raw, {"amount_sum": "sum", "channel_mode": "mode"})
    y = norm.transform(raw)
    # columns: inactive | amount (min 10, max 30 over active rows) | web, app (every
    # training category, as the reference's OneHotEncoder; no 'other' slot)
    expected = np.array(
        [
            [0, 0.0, 1, 0],
            [0, 1.0, 0, 1],
            [1, 0.0, 0, 0],  # inactive: all zeros but the flag
            [0, 0.0, 1, 0],  # missing numeric -> 0
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(y, expected)
    again = TaskVectorNormaliser.from_dict(norm.to_dict()).transform(raw)
    np.testing.assert_array_equal(again, expected)


def test_a_recipe_with_the_old_hold_out_fraction_still_loads_and_says_it_is_ignored():
    from tve_pipeline.config import Recipe, make_recipe

    with pytest.warns(FutureWarning, match=r"pretrain\.val_fraction is ignored"):
        old = make_recipe("test", {"pretrain": {"val_fraction": 0.1}})
    assert old == make_recipe("test")
    stored = make_recipe("test").model_dump(mode="json")  # as a checkpoint stores its recipe
    stored["pretrain"]["val_fraction"] = 0.2
    with pytest.warns(FutureWarning):
        assert Recipe.model_validate(stored) == make_recipe("test")


def test_pretraining_optimiser_is_adamw_with_the_reference_weight_decay():
    from test_sampling import make_db

    from tve_pipeline.config import make_recipe
    from tve_pipeline.graph import build_graph
    from tve_pipeline.training import _pretraining_model

    recipe = make_recipe("test")
    assert recipe.pretrain.weight_decay == 0.01  # torch's AdamW default, the reference's
    db = make_db(0)
    types = {
        "users": {"user_id": "key", "age": "numerical", "country": "categorical"},
        "events": {"event_id": "key", "user_id": "key", "product_id": "key", "ts": "key"},
        "products": {"product_id": "key", "price": "numerical", "listed": "key"},
        "posts": {"post_id": "key", "user_id": "key", "parent_id": "key", "ts": "key"},
        "tags": {"tag_id": "key", "user_id": "key", "w": "numerical"},
    }
    data, col_stats = build_graph(db, types, None)
    _, _, opt, _ = _pretraining_model(
        data, col_stats, "users", recipe, "tve", 3, torch.device("cpu")
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01}


def test_info_nce_hand_computed():
    from tve_pipeline.objectives import info_nce

    z = torch.eye(2)
    # logits [[1, 0], [0, 1]] / tau=1: each row's CE is log(1 + e^-1)
    assert info_nce(z, z, tau=1.0).item() == pytest.approx(np.log1p(np.exp(-1.0)), rel=1e-6)


def test_corrupted_copy_leaves_the_batch_untouched_and_swaps_within_columns():
    from torch_frame import TensorFrame, stype
    from torch_geometric.data import HeteroData

    from tve_pipeline.objectives import corrupted_copy

    b = HeteroData()
    values = torch.arange(200, dtype=torch.float32).view(100, 2)
    b["t"].tf = TensorFrame({stype.numerical: values.clone()}, {stype.numerical: ["a", "b"]})
    view = corrupted_copy(b, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(b["t"].tf.feat_dict[stype.numerical], values)
    new = view["t"].tf.feat_dict[stype.numerical]
    changed = (new != values).float().mean().item()
    assert 0.3 < changed < 0.6  # about rate x (1 - 1/n) of the cells
    # a swapped cell takes a value of the same column: column a holds even, b odd numbers
    assert (new[:, 0] % 2 == 0).all() and (new[:, 1] % 2 == 1).all()


def test_numerical_encoder_with_missing_cells_has_finite_gradients_and_stock_forward():
    from torch_frame import stype
    from torch_frame.data.stats import StatType
    from torch_frame.nn import LinearEncoder

    from tve_pipeline.model import SafeLinearEncoder

    stats = [{StatType.MEAN: 1.0, StatType.STD: 2.0}, {StatType.MEAN: -1.0, StatType.STD: 0.5}]
    feat = torch.tensor([[1.0, float("nan")], [3.0, 0.0], [float("nan"), 2.0]])
    ours = SafeLinearEncoder(out_channels=4, stats_list=stats, stype=stype.numerical)
    stock = LinearEncoder(out_channels=4, stats_list=stats, stype=stype.numerical)
    stock.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(feat), stock(feat))  # torch_frame is the oracle for the forward
    ours(feat).sum().backward()
    stock(feat).sum().backward()
    assert torch.isfinite(ours.weight.grad).all()
    assert not torch.isfinite(stock.weight.grad).all()  # the trap this class avoids


def test_time_columns_become_timestamp_features_only_when_asked(tmp_path):
    from test_sampling import make_db
    from torch_frame import stype

    from tve_pipeline.graph import build_graph

    db = make_db(0)
    types = {
        "events": {
            "event_id": "key",
            "user_id": "key",
            "product_id": "key",
            "ts": "key",
            "amount": "numerical",
        },
        "users": {"user_id": "key", "age": "numerical", "country": "categorical"},
        "products": {"product_id": "key", "price": "numerical", "listed": "key"},
        "posts": {
            "post_id": "key",
            "user_id": "key",
            "parent_id": "key",
            "ts": "key",
            "length": "numerical",
        },
        "tags": {"tag_id": "key", "user_id": "key", "w": "numerical"},
    }
    with_time, _ = build_graph(db, types, tmp_path)
    without, _ = build_graph(db, types, tmp_path, time_features=False)
    assert with_time["events"].tf.col_names_dict[stype.timestamp] == ["ts"]
    assert with_time["products"].tf.col_names_dict[stype.timestamp] == ["listed"]
    assert stype.timestamp not in without["events"].tf.col_names_dict
    assert stype.timestamp not in with_time["users"].tf.col_names_dict  # no time column there
    # the feature is the row's own time (year in the first slot of torch_frame's timestamp tensor)
    years = with_time["events"].tf.feat_dict[stype.timestamp][:, 0, 0]
    assert torch.equal(
        years, torch.from_numpy(db.table_dict["events"].df["ts"].dt.year.to_numpy()).to(years.dtype)
    )
    assert len(list(tmp_path.iterdir())) == 2  # one tensor-frame cache each


def test_graph_cache_is_built_whole_by_concurrent_builders(tmp_path):
    """Two builders at once (two runs of one database): both get the graph, the cache ends
    up complete in its final folder, and no temporary folder is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    from tve_pipeline.database import column_types, open_dataset
    from tve_pipeline.datasets import build_synthetic
    from tve_pipeline.graph import build_graph

    ds = open_dataset(build_synthetic(tmp_path / "tiny"))
    types = column_types({n: t.df for n, t in ds.get_db().table_dict.items()}, ds.manifest)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:
        graphs = list(pool.map(lambda _: build_graph(ds.get_db(), types, cache), range(2)))
    (final,) = list(cache.iterdir())
    assert not final.name.startswith(".") and sorted(p.name for p in final.iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again, _ = build_graph(ds.get_db(), types, cache)  # read back from the cache
    # torch_frame's "Weights only load failed" once per table on every read: not from ours
    assert not [w for w in caught if "Weights only" in str(w.message)]
    for (data, _), other in zip(graphs, [again, again]):
        for table in ("customers", "orders"):
            for stype, feat in data[table].tf.feat_dict.items():
                assert torch.equal(
                    torch.nan_to_num(feat if isinstance(feat, torch.Tensor) else feat.values),
                    torch.nan_to_num(
                        other[table].tf.feat_dict[stype]
                        if isinstance(feat, torch.Tensor)
                        else other[table].tf.feat_dict[stype].values
                    ),
                )


# --------------------------------------------------------------------------- fine-tuning protocol


def _toy_fit(scores, *, every=2, average_last=1, seen=None):
    """``training._fit`` on a linear model, the validation score of each evaluation given
    by ``scores`` (in order; one more for the averaged candidate); ``seen`` collects the
    weights each evaluation scored."""
    from tve_pipeline import training

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(40, 3), torch.randn(40)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    calls = iter(scores)

    def evaluate():
        if seen is not None:
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
        score = next(calls)
        return {"val_score": score}, score

    best, history = training._fit(
        model,
        opt,
        None,
        n=len(x),
        batch_size=40,
        steps_per_epoch=every,
        epochs=len(scores) - (average_last > 1),
        seed=0,
        sample=lambda idx, gen: idx,
        batch_loss=lambda batch, idx, gen: ((model(x[idx]).view(-1) - y[idx]) ** 2).mean(),
        evaluate_epoch=evaluate,
        prefetch=False,
        by_step=True,
        average_last=average_last,
    )
    return best, history


def test_the_best_step_is_the_first_evaluation_with_the_highest_score():
    seen = []
    best, history = _toy_fit([0.1, 0.5, 0.3, 0.5, 0.2], every=3, seen=seen)
    assert [row["step"] for row in history] == [3, 6, 9, 12, 15]
    assert [row["val_score"] for row in history] == [0.1, 0.5, 0.3, 0.5, 0.2]
    assert (best["epoch"], best["step"]) == (1, 6)  # the tie at step 12 loses
    for k, v in best["state"].items():
        assert torch.equal(v, seen[1][k])


def test_weight_averaging_is_the_mean_of_the_last_evaluated_weights():
    seen = []
    # the averaged candidate (the sixth score) beats every single evaluation
    best, history = _toy_fit([0.1, 0.5, 0.3, 0.4, 0.2, 0.9], average_last=3, seen=seen)
    assert len(history) == 5 and best["averaged"] == 3 and best["step"] == 10
    for k, v in best["state"].items():
        hand = (seen[2][k] + seen[3][k] + seen[4][k]) / 3
        assert torch.allclose(v, hand, atol=1e-7)
        assert torch.equal(seen[5][k], v)  # it was scored with these weights
    # when it scores no better than the best evaluation, the evaluation is kept
    seen = []
    best, _ = _toy_fit([0.1, 0.5, 0.3, 0.4, 0.2, 0.5], average_last=3, seen=seen)
    assert best["averaged"] == 0 and best["step"] == 4
    assert all(torch.equal(v, seen[1][k]) for k, v in best["state"].items())


@pytest.mark.parametrize(
    "n, overrides, every, evaluations",
    [
        (1500, {}, 20, 10),  # driver-top3 at 100%: 3 steps an epoch, the floor's 200 steps
        (150, {}, 20, 10),  # 10% of it: 1 step an epoch, still 200 steps
        (11_000, {}, 22, 20),  # 22 steps an epoch x 20 epochs: once an epoch
        (30 * 512, {"epochs": 4}, 30, 7),  # 120 steps < 200: 7 x 30 = 210, whole evaluations
        (10**6, {"steps_per_epoch": 25, "epochs": 4}, 25, 8),
    ],
)
def test_the_step_budget_has_a_floor_and_evaluations_at_least_eval_every_apart(
    n, overrides, every, evaluations
):
    from tve_pipeline.config import FinetuneConfig
    from tve_pipeline.training import finetune_schedule

    assert finetune_schedule(n, FinetuneConfig(**overrides)) == (every, evaluations)


def test_the_demo_and_test_profiles_keep_their_fine_tuning_cost():
    from tve_pipeline.config import make_recipe
    from tve_pipeline.training import finetune_schedule

    # as before the floor: 4 x 25 steps evaluated 4 times; 2 x 3 steps evaluated twice
    assert finetune_schedule(10**4, make_recipe("demo").finetune) == (25, 4)
    assert finetune_schedule(150, make_recipe("test").finetune) == (3, 2)


def test_a_recipe_with_one_learning_rate_is_a_grid_of_one():
    from pydantic import ValidationError

    from tve_pipeline.config import FinetuneConfig, make_recipe

    assert FinetuneConfig(lr=0.003).lr_grid == (0.003,)  # as recipes before the grid say
    assert make_recipe("reference").finetune.lr_grid == (0.001, 0.002, 0.005)
    assert make_recipe("reference").finetune.weight_decay == 0.01
    with pytest.raises(ValidationError, match="finetune.lr_grid must be one or more positive"):
        FinetuneConfig(lr_grid=(0.001, 0.0))


@pytest.mark.parametrize(
    "n, overrides, batch, every, evaluations",
    [
        # driver-dnf at 10%: 1,141 rows x 10 epochs / 200 steps = 57.05 -> the floor of 64
        (1141, {"epochs": 10, "min_batch_size": 64}, 64, 20, 10),
        # 4,000 rows: batch 200 makes 20 steps an epoch, 10 epochs = the 200-step floor
        (4000, {"epochs": 10, "min_batch_size": 64}, 200, 20, 10),
        # large sets keep batch_size
        (11_411, {"epochs": 10, "min_batch_size": 64}, 512, 23, 10),
        # the cap: 174k rows = 340 steps an epoch x 10 > 300 -> 10 evaluations of 30 steps
        (174_000, {"epochs": 10, "max_steps": 300}, 512, 30, 10),
        # a cap above the budget changes nothing
        (11_411, {"epochs": 10, "max_steps": 300}, 512, 23, 10),
        # a cap below the floor wins; evaluations stay eval_every apart
        (1500, {"epochs": 10, "max_steps": 100}, 512, 20, 5),
    ],
)
def test_small_label_sets_train_on_smaller_batches_and_large_ones_stop_at_the_cap(
    n, overrides, batch, every, evaluations
):
    from tve_pipeline.config import FinetuneConfig
    from tve_pipeline.training import finetune_batch_size, finetune_schedule

    cfg = FinetuneConfig(**overrides)
    assert finetune_batch_size(n, cfg) == batch
    assert finetune_schedule(n, cfg) == (every, evaluations)
    steps = every * evaluations
    if cfg.max_steps is not None:
        assert steps <= cfg.max_steps
    else:
        assert steps >= cfg.min_steps
