"""Pre-training input read from window files, compactly, equals the dense concatenated frame.

The oracle is the dense path the pipeline used before: concatenate the window files,
stable-sort by timestamp, ``split_pretrain_seeds``, ``TaskVectorNormaliser.fit`` on the
training rows and ``transform`` of every row.
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
from tve_pipeline.task_vectors import (
    SeedTaskVectors,
    held_out_seed_times,
    pretraining_task_vectors,
    split_pretrain_seeds,
)
from tve_pipeline.traversal import build_traversal_graph
from tve_pipeline.windows import training_seed_times


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """The tiny database's training seed times, written as the asset writes them: one file
    per window."""
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
    # chunks of 7 rows: a chunk of an integer mode column with no null reads as int64, not float64
    modes = dict(mode_encoding=encoding, mca_components=3)
    got = pretraining_task_vectors(raw, "customer_id", agg, val_fraction=0.3, chunk_rows=7, **modes)

    train_raw, val_raw = split_pretrain_seeds(dense, 0.3)
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
    assert got.inactive_rate == pytest.approx(dense["inactive"].mean())
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


def test_held_out_seed_times_are_the_latest():
    t = pd.to_datetime(["2020-03-01", "2020-01-01", "2020-02-01", "2020-03-01"]).to_numpy()
    assert list(held_out_seed_times(t, 0.3)) == [np.datetime64("2020-03-01", "ns")]
    assert len(held_out_seed_times(t[:1], 0.5)) == 0  # one seed time: nothing held out


def test_pretraining_from_window_files_is_bit_identical_to_the_concatenated_frame(windows):
    w = windows
    args = (w["data"], w["col_stats"], "customers", "customer_id")
    rest = (w["aggregations"], w["recipe"], torch.device("cpu"))
    from_frame = training.pretrain(*args, concatenated(w["files"]), *rest, objective="tve+mae")
    from_files = training.pretrain(*args, w["files"][::-1], *rest, objective="tve+mae")
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
        pretraining_task_vectors(files, "customer_id", windows["aggregations"], val_fraction=0.1)
    assert drop in str(info.value) and "\n" not in str(info.value)
