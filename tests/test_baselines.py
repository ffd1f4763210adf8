"""RelBench's trivial predictors on a tiny database, against hand computations (numpy,
pandas, scikit-learn), and the trivial baseline chosen from them on val."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import mean_absolute_error, roc_auc_score

from tve_pipeline import baselines, quality
from tve_pipeline.database import open_dataset
from tve_pipeline.datasets import build_synthetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_dataset(build_synthetic(tmp_path_factory.mktemp("baselines") / "tiny"))


def _tables(ds, name):
    task = ds.load_task(name)
    db = task.get_db(upto_test_timestamp=False)
    tables = {split: task.get_table(split, db=db) for split in ("train", "val", "test")}
    tables["test_labels"] = task.get_table("test", mask_input_cols=False, db=db)
    return task, tables


def _labels(task, tables, split):
    name = "test_labels" if split == "test" else split
    return tables[name].df


def test_regression_predictors_are_the_hand_computed_ones(tiny):
    task, tables = _tables(tiny, "customer-spend")
    scores = baselines.baseline_scores(task, tables)
    assert set(scores["predictor"]) == set(baselines.REGRESSION)
    assert set(scores["direction"]) == {"lower"}
    train = tables["train"].df
    y = train[task.target_col].astype(float).to_numpy()
    std = y.std(ddof=1)  # RelBench 3's NMAE: MAE over the training labels' std
    by = scores.set_index(["predictor", "split"])["value"]
    for split in ("val", "test"):
        df = _labels(task, tables, split)
        true = df[task.target_col].astype(float).to_numpy()
        for name, constant in (
            ("global_zero", 0.0),
            ("global_mean", y.mean()),
            ("global_median", np.median(y)),
        ):
            expected = mean_absolute_error(true, np.full(len(true), constant)) / std
            assert by[(name, split)] == pytest.approx(expected, rel=1e-9), (name, split)
        # an entity's own training labels, 0 for an entity without any (RelBench's fillna)
        for how in ("mean", "median"):
            own = {
                e: getattr(np, how)(g[task.target_col].astype(float).to_numpy())
                for e, g in train.groupby(task.entity_col)
            }
            pred = np.array([own.get(e, 0.0) for e in df[task.entity_col]])
            expected = mean_absolute_error(true, pred) / std
            assert by[(f"entity_{how}", split)] == pytest.approx(expected, rel=1e-9)
        median = scores[scores["split"] == split]["label_median"].unique()
        assert median == pytest.approx([np.median(true)])


def test_the_trivial_baseline_is_the_constant_best_on_val(tiny):
    task, tables = _tables(tiny, "customer-spend")
    scores = baselines.baseline_scores(task, tables)
    by = scores.set_index(["predictor", "split"])["value"]
    constants = ("global_zero", "global_mean", "global_median")
    on_val = min(constants, key=lambda p: by[(p, "val")])
    trivial = baselines.trivial_baseline(scores).set_index("split")
    assert set(trivial["trivial_predictor"]) == {on_val}
    for split in ("val", "test"):
        assert trivial.loc[split, "trivial"] == by[(on_val, split)]
    # test labels choose nothing: other test labels, the same predictor and val score
    garbage = {**tables}
    garbage["test_labels"] = type(tables["test_labels"])(
        df=tables["test_labels"].df.assign(**{task.target_col: 1e6}),
        fkey_col_to_pkey_table=tables["test_labels"].fkey_col_to_pkey_table,
        pkey_col=tables["test_labels"].pkey_col,
        time_col=tables["test_labels"].time_col,
    )
    again = baselines.trivial_baseline(baselines.baseline_scores(task, garbage))
    again = again.set_index("split")
    assert again.loc["val", "trivial_predictor"] == on_val
    assert again.loc["val", "trivial"] == trivial.loc["val", "trivial"]


def test_classification_majority_scores_half_and_entity_rates_by_hand(tiny):
    task, tables = _tables(tiny, "customer-churn")
    scores = baselines.baseline_scores(task, tables)
    assert set(scores["predictor"]) == set(baselines.CLASSIFICATION)
    assert set(scores["direction"]) == {"higher"} and scores["label_median"].isna().all()
    by = scores.set_index(["predictor", "split"])["value"]
    train = tables["train"].df
    rate = train.groupby(task.entity_col)[task.target_col].mean()
    for split in ("val", "test"):
        df = _labels(task, tables, split)
        true = df[task.target_col].to_numpy()
        assert by[("majority", split)] == pytest.approx(0.5)  # a constant's AUROC
        pred = df[task.entity_col].map(rate).fillna(0.0).to_numpy()
        assert by[("entity_mean", split)] == pytest.approx(roc_auc_score(true, pred))
    trivial = baselines.trivial_baseline(scores)
    assert set(trivial["trivial_predictor"]) == {"majority"}
    assert trivial["trivial"].tolist() == pytest.approx([0.5, 0.5])
    majority = baselines.trivial_prediction(task, "majority", train, train)
    assert majority[0] == float(train[task.target_col].mode().iloc[0])


def test_baseline_verdict_names_both_numbers_and_the_shift():
    trivial = pd.DataFrame(
        {
            "task": "t",
            "split": ["val", "test"],
            "metric": "nmae",
            "direction": "lower",
            "trivial": [0.387, 0.6996],
            "trivial_predictor": "global_median",
            "label_median": [-4.22, 9.0],
        }
    )
    model = {"val": {"nmae": 0.3817}, "test": {"nmae": 0.7094}}
    medians = {"train": -2.0, "val": -4.22, "test": 9.0}
    verdict = quality.baseline_verdict(model, trivial, "nmae", "db metrics c", medians)
    # judged on val (where the protocol chooses); test's loss is named, with the shift
    assert verdict.passed
    assert verdict.description == (
        "db metrics c: beats the trivial baseline on val (val nmae 0.3817 vs 0.387); not "
        "judged on test: test nmae 0.7094 is not better than the trivial baseline's 0.6996 "
        "(global median) by 0.0098 (lower is better) (labels' median: train -2, val -4.22, "
        "test 9)"
    )
    worse = {"val": {"nmae": 0.40}, "test": {"nmae": 0.7094}}
    verdict = quality.baseline_verdict(worse, trivial, "nmae", "db metrics c", medians)
    assert not verdict.passed
    assert verdict.description.startswith(
        "db metrics c: val nmae 0.4 is not better than the trivial baseline's 0.387 "
        "(global median) by 0.013 (lower is better); test nmae 0.7094"
    )
    better = {"val": {"nmae": 0.30}, "test": {"nmae": 0.60}}
    assert quality.baseline_verdict(better, trivial, "nmae", "x", medians).passed


def test_unknown_predictor_and_missing_tables_say_so(tiny):
    task, tables = _tables(tiny, "customer-spend")
    with pytest.raises(ValueError, match="unknown trivial predictor 'oracle'"):
        baselines.trivial_prediction(task, "oracle", tables["train"].df, tables["val"].df)
    with pytest.raises(ValueError, match=r"needs tables \['test_labels'\]"):
        baselines.baseline_scores(task, {k: tables[k] for k in ("train", "val")})
