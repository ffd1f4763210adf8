"""TVE targets on the real rel-f1 database against the brute-force oracle of test_targets."""

from pathlib import Path

import pandas as pd
import pytest

from tests.test_targets import assert_same_targets, brute_force
from tve_pipeline.database import column_types, open_dataset
from tve_pipeline.datasets import build_rel_f1
from tve_pipeline.targets import TargetQuery, compute_targets
from tve_pipeline.traversal import build_traversal_graph

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "rel-f1" / "raw"


@pytest.mark.skipif(not RAW.exists(), reason=f"{RAW} is absent")
def test_rel_f1_driver_targets_match_brute_force(tmp_path):
    ds = open_dataset(build_rel_f1(RAW, tmp_path / "rel-f1"))
    db = ds.get_db()
    frames = {n: t.df for n, t in db.table_dict.items()}
    types = column_types(frames, ds.manifest, ds.dataset_dir)
    # 1-hop and 2-hop fact->dimension paths of drivers; two seed times in 2004, one with a
    # race weekend in the window and one possibly without.
    defs = build_traversal_graph(ds.manifest.tables, types, "drivers", hops=2, fact_key_fact=False)
    stamps = pd.DatetimeIndex(["2004-03-01", "2004-08-10"])
    delta = pd.Timedelta("30 days")
    got = compute_targets(TargetQuery(frames, ds.manifest.tables, defs, "drivers", stamps, delta))

    # the oracle loops over rows: keep it to the facts of 2003-2004 so it finishes in seconds,
    # and each driver's first row of each fact table (drivers have no time column: a driver
    # is a seed once its first row is by t + Δ), which no 2004 window reads
    def kept(name: str, f: pd.DataFrame) -> pd.DataFrame:
        time = ds.manifest.tables[name].time_col
        if not time:
            return f
        keep = (f[time] >= "2003-01-01") & (f[time] <= "2004-12-31")
        if "driverId" in f.columns:
            keep |= f.index.isin(f.dropna(subset=[time]).groupby("driverId")[time].idxmin())
        return f[keep]

    small = {n: kept(n, f) for n, f in frames.items()}
    want = brute_force(small, ds.manifest.tables, defs, "drivers", stamps, delta)
    assert got["inactive"].eq(0).sum() > 10  # some drivers raced in the windows
    assert_same_targets(got, want, defs)
