"""Pre-training input read from window files, compactly, equals the dense concatenated frame.

The oracle is the dense path the pipeline used before: concatenate the window files,
stable-sort by timestamp, ``TaskVectorNormaliser.fit`` on the training windows' rows and
``transform`` of every row, the validation window's too.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from tve_pipeline import training
from tve_pipeline.config import make_recipe
from tve_pipeline.database import column_types, open_dataset
from tve_pipeline.datasets import build_synthetic
from tve_pipeline.graph import graph_for
from tve_pipeline.normalise import TaskVectorNormaliser
from tve_pipeline.targets import TargetQuery, compute_targets
from tve_pipeline.task_vectors import SeedTaskVectors, pretraining_task_vectors
from tve_pipeline.traversal import build_traversal_graph
from tve_pipeline.windows import training_seed_times

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """The tiny database's training seed times, written as the asset writes them: one file
    per window, and its validation seed time's window (``val``)."""
    ds = open_dataset(build_synthetic(tmp_path_factory.mktemp("db") / "tiny"))
    db = ds.get_db()
    tables = {n: t.df for n, t in db.table_dict.items()}
    types = column_types(tables, ds.manifest)
    defs = build_traversal_graph(ds.manifest.tables, types, "customers", hops=2, fact_key_fact=True)
    delta = pd.Timedelta("30 days")
    times = list(training_seed_times(ds.val_timestamp, db.min_timestamp, delta))
    out = tmp_path_factory.mktemp("targets")
    files = []
    for i in range(0, len(times), 3):  # three seed times to a window
        path = out / f"window-{i // 3}.parquet"
        seeds = pd.DatetimeIndex(times[i : i + 3])
        compute_targets(
            TargetQuery(tables, ds.manifest.tables, defs, "customers", seeds, delta)
        ).to_parquet(path, index=False)
        files.append(path)
    val = out / "window-val.parquet"
    val_time = pd.DatetimeIndex([ds.val_timestamp])
    compute_targets(
        TargetQuery(tables, ds.manifest.tables, defs, "customers", val_time, delta)
    ).to_parquet(val, index=False)
    # A window where every entity is active: compute_targets gives its integer modes as
    # int64 (no null), the other windows as float64, their concatenation as float64.
    first = pd.read_parquet(files[0])
    first = first[first["inactive"] == 0]
    int_modes = [
        d.name for d in defs if d.aggregation == "mode" and d.name.endswith(".quantity__mode")
    ]
    assert int_modes and first[int_modes].notna().all().all()
    all_active = out / "window-0-all-active.parquet"
    first.astype({c: "int64" for c in int_modes}).to_parquet(all_active, index=False)
    recipe = make_recipe("test")
    data, col_stats = graph_for(db, types, recipe.backbone)
    return {
        "files": files,
        "val": val,
        "mixed_dtypes": [all_active, *files[1:]],
        "aggregations": {d.name: d.aggregation for d in defs},
        "recipe": recipe,
        "data": data,
        "col_stats": col_stats,
    }


def concatenated(files) -> pd.DataFrame:
    """What the checkpoint asset built before: every window in one frame, by seed time."""
    frames = [pd.read_parquet(f) for f in files]
    return (
        pd.concat(frames, ignore_index=True)
        .sort_values("timestamp", kind="stable")
        .reset_index(drop=True)
    )


def _assert_seeds_equal(seeds: SeedTaskVectors, raw: pd.DataFrame, y: np.ndarray, atol=0.0):
    np.testing.assert_array_equal(seeds.entity, raw["customer_id"].to_numpy())
    np.testing.assert_array_equal(
        seeds.seed_time, raw["timestamp"].to_numpy(dtype="datetime64[ns]")
    )
    np.testing.assert_allclose(seeds.task_vectors(slice(None)).numpy(), y, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "source, encoding",
    [
        ("files", "onehot"),
        ("files reversed", "onehot"),
        ("frame", "onehot"),
        ("files, an int64 mode in one", "onehot"),
        ("files", "mca"),
        ("files, an int64 mode in one", "mca"),
    ],
)
def test_compact_task_vectors_equal_the_dense_normalised_frame(windows, source, encoding):
    agg = windows["aggregations"]
    assert "mode" in agg.values()
    files = windows["mixed_dtypes"] if source.startswith("files, an int64") else windows["files"]
    dense = concatenated(files)
    raw = {"files": files, "files reversed": files[::-1], "frame": dense}.get(source, files)
    val = windows["val"]
    val_raw = pd.read_parquet(val)
    # chunks of 7 rows: a chunk of an integer mode column with no null reads as int64, not float64
    modes = dict(mode_encoding=encoding, mca_components=3)
    got = pretraining_task_vectors(
        raw,
        "customer_id",
        agg,
        val=val_raw if source == "frame" else [val],
        chunk_rows=7,
        **modes,
    )

    train_raw = dense  # every training window: none held out
    oracle = TaskVectorNormaliser.fit(train_raw, agg, **modes)
    if encoding == "onehot":
        assert got.normaliser.to_dict() == oracle.to_dict()
        assert any(s.kind == "onehot" and len(s.categories) > 1 for s in oracle.scalers)
    else:  # the MCA's sums are added in another order: equal up to rounding
        mine, theirs = got.normaliser.to_dict(), oracle.to_dict()
        assert mine["scalers"] == theirs["scalers"]
        assert mine["mca"]["categories"] == theirs["mca"]["categories"]
        np.testing.assert_allclose(mine["mca"]["loadings"], theirs["mca"]["loadings"], atol=1e-9)
        assert oracle.mca.width == 3
    assert len(got.train) == len(train_raw) and len(got.val) == len(val_raw) > 0
    atol = 0.0 if encoding == "onehot" else 1e-6
    _assert_seeds_equal(got.train, train_raw, oracle.transform(train_raw), atol)
    _assert_seeds_equal(got.val, val_raw, oracle.transform(val_raw), atol)
    both = pd.concat([dense["inactive"], val_raw["inactive"]])
    assert got.inactive_rate == pytest.approx(both.mean())
    # only the active seeds' vectors are stored
    assert len(got.train.vectors) == int((dense["inactive"] == 0).sum())


def test_task_vectors_of_a_batch_hand_computed():
    vectors = np.array([[0, 0.5, 1, 0], [0, 1.0, 0, 1]], dtype=np.float32)
    seeds = SeedTaskVectors(
        entity=np.array([4, 7, 4]),
        seed_time=np.array(["2020-01-01"] * 3, dtype="datetime64[ns]"),
        vector_row=np.array([1, -1, 0]),
        vectors=vectors,
    )
    y = seeds.task_vectors(torch.tensor([2, 1, 0]))
    expected = [[0, 0.5, 1, 0], [1, 0, 0, 0], [0, 1.0, 0, 1]]
    assert y.dtype == torch.float32 and y.tolist() == expected


def test_nothing_is_fitted_or_trained_on_the_validation_window(windows):
    """The validation window changes neither the normaliser (its statistics come from the
    training rows alone) nor the training seeds; every training seed time is before the
    validation timestamp; a training window passed as validation is refused."""
    agg, files, val = windows["aggregations"], windows["files"], windows["val"]
    without = pretraining_task_vectors(files, "customer_id", agg)
    with_val = pretraining_task_vectors(files, "customer_id", agg, val=[val])
    assert with_val.normaliser.to_dict() == without.normaliser.to_dict()
    np.testing.assert_array_equal(
        with_val.train.task_vectors(slice(None)).numpy(),
        without.train.task_vectors(slice(None)).numpy(),
    )
    np.testing.assert_array_equal(with_val.train.entity, without.train.entity)
    assert len(without.val) == 0 and len(with_val.val) == len(pd.read_parquet(val)) > 0
    val_time = pd.read_parquet(val)["timestamp"].iloc[0]
    assert (with_val.train.seed_time < val_time.to_datetime64()).all()
    assert (with_val.val.seed_time == val_time.to_datetime64()).all()
    # a validation value far outside the training range is scaled, not fitted: above 1
    raw_val = pd.read_parquet(val)
    numeric = next(n for n, a in agg.items() if a == "count")
    active = raw_val["inactive"] == 0
    raw_val.loc[active, numeric] = 1e9
    scaled = pretraining_task_vectors(files, "customer_id", agg, val=raw_val)
    assert scaled.normaliser.to_dict() == without.normaliser.to_dict()
    scalers = scaled.normaliser.scalers
    at = [s.name for s in scalers].index(numeric)
    column = 1 + sum(s.width for s in scalers[:at])  # after inactive and the earlier targets
    assert scaled.val.task_vectors(np.flatnonzero(active.to_numpy()))[:, column].min() > 1
    with pytest.raises(ValueError, match="not later than the training ones"):
        pretraining_task_vectors(files[1:], "customer_id", agg, val=files[:1])


def test_pretraining_from_window_files_is_bit_identical_to_the_concatenated_frame(windows):
    w = windows
    args = (w["data"], w["col_stats"], "customers", "customer_id")
    rest = (w["aggregations"], w["recipe"], torch.device("cpu"))
    val = {"val_targets": [w["val"]], "objective": "tve+mae"}
    from_frame = training.pretrain(*args, concatenated(w["files"]), *rest, **val)
    from_files = training.pretrain(*args, w["files"][::-1], *rest, **val)
    assert from_files["n_val_seeds"] > 0 and "val_loss" in from_files["history"][0]
    assert from_frame["backbone"].keys() == from_files["backbone"].keys()
    for k in from_frame["backbone"]:
        assert torch.equal(from_frame["backbone"][k], from_files["backbone"][k]), k
    for k in from_frame["head"]:
        assert torch.equal(from_frame["head"][k], from_files["head"][k]), k
    assert from_frame["history"] == from_files["history"]
    assert from_frame["normaliser"] == from_files["normaliser"]
    for k in ("n_train_seeds", "n_val_seeds", "inactive_rate"):
        assert from_frame[k] == from_files[k], k


@pytest.mark.parametrize("drop", ["customer_id", "orders.channel__mode"])
def test_a_window_file_without_a_column_is_named(windows, tmp_path, drop):
    bad = tmp_path / "window-stale.parquet"
    pd.read_parquet(windows["files"][1]).drop(columns=[drop]).to_parquet(bad, index=False)
    files = [windows["files"][0], bad, *windows["files"][2:]]
    with pytest.raises(ValueError, match=r"window-stale\.parquet") as info:
        pretraining_task_vectors(files, "customer_id", windows["aggregations"])
    assert drop in str(info.value) and "\n" not in str(info.value)


def _sce_by_hand(pred: np.ndarray, y: np.ndarray, inactive_weight: float, alpha: float) -> float:
    """Scaled cosine error with TVE's row weights, in NumPy."""
    cos = (pred * y).sum(1) / np.maximum(
        np.linalg.norm(pred, axis=1) * np.linalg.norm(y, axis=1), 1e-8
    )
    w = np.where(y[:, 0] == 1, inactive_weight, 1 - inactive_weight)
    return float((w * np.clip(1 - cos, 0, None) ** alpha).sum() / w.sum())


def test_the_checkpoint_kept_has_the_lowest_clean_validation_loss(windows, monkeypatch):
    """Every epoch is scored on the validation window with nothing corrupted; the state
    returned is the best epoch's, and its validation loss recomputed from the returned
    weights (the model on clean subgraphs, the loss in NumPy) is the recorded one."""
    from tve_pipeline import objectives
    from tve_pipeline.graph import seed_tensors
    from tve_pipeline.model import RDLModel
    from tve_pipeline.sampling import sampler_for

    w = windows
    recipe = make_recipe("test", {"pretrain": {"epochs": 3, "lr": 0.05}})
    rates = []  # (rate, scoring?) of every corruption drawn
    real = objectives.corrupted_copy

    def spy(batch, rate, generator):
        rates.append((rate, not torch.is_grad_enabled()))
        return real(batch, rate, generator)

    monkeypatch.setattr(objectives, "corrupted_copy", spy)
    result = training.pretrain(
        w["data"],
        w["col_stats"],
        "customers",
        "customer_id",
        w["files"],
        w["aggregations"],
        recipe,
        torch.device("cpu"),
        val_targets=[w["val"]],
    )
    assert {r for r, scoring in rates if scoring} == {0.0}
    assert {r for r, scoring in rates if not scoring} == {recipe.pretrain.corruption_rate}
    losses = [row["val_loss"] for row in result["history"]]
    assert len(set(losses)) == 3  # the epochs differ, so the choice means something
    assert result["best_epoch"] == int(np.argmin(losses))
    assert result["best_val_loss"] == min(losses)

    seeds = pretraining_task_vectors(
        w["files"],
        "customer_id",
        w["aggregations"],
        val=[w["val"]],
        mode_encoding=recipe.targets.mode_encoding,
        mca_components=recipe.targets.mca_components,
    )
    model = RDLModel(w["data"], w["col_stats"], recipe.backbone, seeds.normaliser.width)
    model.load_state_dict(
        {**result["backbone"], **{f"head.{k}": v for k, v in result["head"].items()}}
    )
    model.eval()
    sampler = sampler_for(w["data"], recipe.backbone)
    nodes, times = seed_tensors(seeds.val.entity, seeds.val.seed_time)
    gen = torch.Generator().manual_seed(recipe.seed)  # pre-training's validation subgraphs
    size, total = recipe.pretrain.batch_size, 0.0
    with torch.no_grad():
        for start in range(0, len(nodes), size):
            idx = torch.arange(start, min(start + size, len(nodes)))
            batch = sampler.sample("customers", nodes[idx], times[idx], generator=gen)
            pred = model(batch, "customers").numpy()
            y = seeds.val.task_vectors(idx).numpy()
            cfg = recipe.pretrain
            total += _sce_by_hand(pred, y, cfg.inactive_weight, cfg.sce_alpha) * len(idx)
    assert total / len(nodes) == pytest.approx(result["best_val_loss"], rel=1e-5)


def test_the_best_epoch_not_the_last_is_returned(windows, monkeypatch):
    """With validation losses 0.5, 0.2, 0.9 the state returned is the one after the second
    epoch: that of a two-epoch run (the same draws up to there) that keeps its last."""
    w = windows
    args = (w["data"], w["col_stats"], "customers", "customer_id", w["files"], w["aggregations"])
    two = training.pretrain(*args, make_recipe("test", {"pretrain": {"epochs": 2}}), CPU)
    assert two["best_epoch"] == 1 and two["best_val_loss"] is None  # no validation windows
    scores = iter([0.5, 0.2, 0.9])
    monkeypatch.setattr(training, "_validation_loss", lambda *a, **k: next(scores))
    three = training.pretrain(
        *args,
        make_recipe("test", {"pretrain": {"epochs": 3}}),
        CPU,
        val_targets=[w["val"]],
    )
    assert three["best_epoch"] == 1 and three["best_val_loss"] == 0.2
    assert [row["val_loss"] for row in three["history"]] == [0.5, 0.2, 0.9]
    for part in ("backbone", "head"):
        for k, v in two[part].items():
            assert torch.equal(three[part][k], v), k
