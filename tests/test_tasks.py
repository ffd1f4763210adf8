"""Restricted tasks against a hand-made database and a brute-force count."""

import pandas as pd
from relbench.manifest import TableSpec

from tve_pipeline.tasks import past_activity, restrict_to_most_active

SCHEMA = {
    "users": TableSpec(pkey="user_id", time_col=None, fkeys={}),
    "orders": TableSpec(pkey="order_id", time_col="t", fkeys={"user_id": "users"}),
    "visits": TableSpec(pkey="visit_id", time_col="t", fkeys={"user_id": "users"}),
}


def _tables():
    ts = pd.to_datetime
    orders = pd.DataFrame(
        {
            "order_id": range(6),
            "user_id": [0, 0, 1, 1, 1, 2],
            "t": ts(
                ["2020-01-05", "2020-01-10", "2020-01-09", "2020-01-10", "2020-01-11", "2020-01-10"]
            ),
        }
    )
    visits = pd.DataFrame(
        {
            "visit_id": range(3),
            "user_id": [2, 2, 2],
            "t": ts(["2020-01-01", "2020-01-08", "2020-01-10"]),
        }
    )
    return {"users": pd.DataFrame({"user_id": range(3)}), "orders": orders, "visits": visits}


def test_past_activity_counts_only_the_window_before_the_seed_time():
    labels = pd.DataFrame(
        {"user_id": [0, 1, 2, 0], "timestamp": pd.to_datetime(["2020-01-10"] * 3 + ["2020-01-04"])}
    )
    act = past_activity(
        labels, _tables(), SCHEMA, "users", "user_id", "timestamp", pd.Timedelta("5 days")
    )
    # window (Jan 5, Jan 10]: user 0 -> order Jan 10 (Jan 5 is not > Jan 5); user 1 -> Jan 9, Jan 10
    # (Jan 11 is after t); user 2 -> order Jan 10 + visits Jan 8, Jan 10; at Jan 4 user 0 has none.
    assert act.tolist() == [1, 2, 3, 0]


def test_restrict_keeps_top_k_per_seed_time_ties_by_id():
    labels = pd.DataFrame(
        {
            "user_id": [0, 1, 2, 0, 1],
            "timestamp": pd.to_datetime(["2020-01-10"] * 3 + ["2020-01-20"] * 2),
            "y": [1, 2, 3, 4, 5],
        }
    )
    activity = pd.Series([5, 7, 5, 0, 0], index=labels.index)
    out = restrict_to_most_active(labels, activity, "user_id", "timestamp", k=2)
    assert out["y"].tolist() == [
        1,
        2,
        4,
        5,
    ]  # Jan 10: user 1 (7), then user 0 beats user 2 on id; Jan 20: both
