"""Asset checks: recorded per partition by the pipeline run, and each made to fail on purpose.

What the checks say is compared with numbers computed here another way: the pandas
recomputation of task vectors against the brute-force oracle of test_targets.py, the
trivial predictor's loss with NumPy, the trivial baseline's metrics with sklearn. Each
check then fails on data broken on purpose (a corrupt or leaking targets file, a seed time
past validation, an all-null target, a validation error, a NaN weight, a model worse than
trivial), with a description that names the place and the amount; and one real `tve run`
whose targets are wrong stops at the blocking check, before pre-training.
"""

import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import mean_absolute_error, roc_auc_score

import assets.target_assets
from assets.commands import Runner, prepare_run_dir, register_dataset
from assets.training_assets import _cached_graph
from tests.conftest import load_asset
from tests.test_targets import DELTA as SHOP_DELTA
from tests.test_targets import brute_force, shop_column_types, shop_databases, shop_schema
from tve_pipeline import quality
from tve_pipeline.database import open_dataset, table_files
from tve_pipeline.recompute import (
    compare_task_vectors,
    existing_entities,
    read_tables,
    recompute_task_vectors,
)
from tve_pipeline.task_vectors import pretraining_task_vectors
from tve_pipeline.traversal import TargetDef, build_traversal_graph
from tve_pipeline.windows import window_seed_time

DELTA = pd.Timedelta("30 days")
CHECKS = {
    ("raw_tables", "validation"): True,
    ("tve_targets", "no_leakage"): True,
    ("tve_targets", "coverage"): False,
    ("pretrained_checkpoint", "finite_weights"): True,
    ("pretrained_checkpoint", "beats_trivial_predictor"): False,
    ("metrics", "beats_trivial_baseline"): False,
}  # (asset, check) -> blocking


def _evaluations(instance) -> dict:
    """(asset, check, partition) -> the latest evaluation recorded in the instance."""
    from dagster._core.events import DagsterEventType

    records = instance.event_log_storage.get_event_records(
        dg.EventRecordsFilter(event_type=DagsterEventType.ASSET_CHECK_EVALUATION),
        limit=10_000,
        ascending=True,
    )
    out = {}
    for record in records:
        e = record.event_log_entry.dagster_event.event_specific_data
        out[(e.asset_key.path[-1], e.check_name, e.partition)] = e
    return out


def _windows(run, split: str | None = None) -> list[str]:
    """The window keys of the run (training and validation), or those of one split."""
    schedule = load_asset(run, "temporal_windows").dropna(subset=["window"])
    return list(
        schedule["window"] if split is None else schedule.loc[schedule["split"] == split, "window"]
    )


def _defs(run) -> dict[str, list[TargetDef]]:
    graph = load_asset(run, "traversal_graph")
    return {e: [TargetDef.from_dict(d) for d in ds] for e, ds in graph.items()}


# --------------------------------------------------------------------------- recorded


def test_every_check_is_defined_and_recorded_for_every_partition(pipeline_run):
    """The Definitions hold the seven checks of the database with their blocking flags, and
    the `tve run` of the fixture recorded one evaluation per partition of each, the windows'
    ones each with its own window (the run covered all windows at once); tve_targets'
    coverage, judged over the run, one for the run."""
    runner = pipeline_run["runner"]
    graph = runner.defs.resolve_asset_graph()
    specs = {
        (k.asset_key.path[-1], k.name): graph.get(k).blocking
        for k in graph.asset_check_keys
        if k.asset_key.path[0] == "tiny"
    }
    assert specs == CHECKS
    evaluations = _evaluations(pipeline_run["instance"])
    windows = _windows(pipeline_run)
    cells = runner.by_name["metrics"].partitions_def.get_partition_keys()
    expected = {("raw_tables", "validation", None)}
    expected |= {("tve_targets", "no_leakage", w) for w in windows}
    expected |= {("tve_targets", "coverage", None)}  # judged per run: one evaluation per run
    expected |= {
        ("pretrained_checkpoint", c, "tve") for c in ("finite_weights", "beats_trivial_predictor")
    }
    expected |= {("metrics", "beats_trivial_baseline", c) for c in cells}
    assert set(evaluations) == expected
    for key in (
        expected
        - {("pretrained_checkpoint", "beats_trivial_predictor", "tve")}
        - {k for k in expected if k[0] == "metrics"}
    ):
        assert evaluations[key].passed, (key, evaluations[key].description)
    for (asset, check, _), e in evaluations.items():
        severity = (
            "WARN"
            if (asset, check)
            in {
                ("tve_targets", "coverage"),
                ("pretrained_checkpoint", "beats_trivial_predictor"),
                ("metrics", "beats_trivial_baseline"),
            }
            else "ERROR"
        )
        assert e.severity.value == severity, (asset, check)
    # every window's evaluation points at that window's materialisation
    for w in sorted(windows):
        target = evaluations[("tve_targets", "no_leakage", w)].target_materialization_data
        record = (
            pipeline_run["instance"]
            .fetch_materializations(
                dg.AssetRecordsFilter(asset_key=runner.db.key("tve_targets"), asset_partitions=[w]),
                limit=1,
            )
            .records[0]
        )
        assert target is not None and target.storage_id == record.storage_id
    # coverage: the run's, pointing at its newest window's materialisation (recorded last),
    # with every window's inactive share
    coverage = evaluations[("tve_targets", "coverage", None)]
    assert coverage.target_materialization_data.storage_id == target.storage_id
    assert coverage.metadata["windows"].value == len(windows)
    for w in windows:
        frame = pd.read_parquet(
            pipeline_run["run_dir"] / "targets" / "tiny" / w / "customers.parquet"
        )
        assert coverage.metadata["inactive_share"].data[w] == {
            "customers": pytest.approx(frame["inactive"].mean())
        }


# --------------------------------------------------------------------------- task vectors


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    db=shop_databases(),
    entity=st.sampled_from(["customers", "products"]),
    second=st.sampled_from([None, pd.Timedelta(days=1), pd.Timedelta(hours=60)]),
)
def test_recomputation_matches_the_brute_force(db, entity, second):
    """The check's pandas recomputation gives the brute force's rows (test_targets.py: plain
    loops, nulls, dangling keys, times at t and t + Δ, ties, second hops in (τ - Δ2, τ])
    for every existing entity."""
    customer_time, frames, timestamps = db
    schema = shop_schema(customer_time)
    defs = build_traversal_graph(schema, shop_column_types(), entity, hops=2)
    want = brute_force(frames, schema, defs, entity, timestamps, SHOP_DELTA, second)
    pkey = schema[entity].pkey
    for t in sorted(set(timestamps)):
        rows = want[want["timestamp"] == t]
        seeds = existing_entities(frames, schema, entity, t, defs=defs, delta=SHOP_DELTA)
        assert list(seeds) == rows[pkey].tolist()
        got = recompute_task_vectors(
            frames, schema, defs, entity, rows[pkey], t, SHOP_DELTA, second_hop_window=second
        )
        assert compare_task_vectors(rows, got, defs) == []


def test_no_leakage_holds_the_files_to_the_references_seeds(tmp_path):
    """The check's seeds on the hand-computed database of test_targets.py (users without a
    time column): the engine's files pass; a file with every user at every seed time (the
    old rows: users first active after t + Δ, or never) fails, naming them."""
    from tests.test_targets import _seeds_db
    from tve_pipeline.targets import TargetQuery, compute_targets, write_targets_by_seed_time

    frames, schema, defs, ts, delta = _seeds_db()
    query = TargetQuery(frames, schema, defs, "users", ts, delta)
    write_targets_by_seed_time(query, lambda t: tmp_path / str(t.day) / "users.parquet")
    for t in ts:
        verdict = quality.leakage_verdict(
            tmp_path / str(t.day), t, frames, schema, {"users": defs}, delta, "w"
        )
        assert verdict.passed, verdict.description
    t = ts[0]  # seeds 0, 1, 6, 7
    every = compute_targets(query)
    every = every[every["timestamp"] == t].set_index("user_id").reindex(range(8))
    every = every.fillna({"timestamp": t, "inactive": 1, "reviews__count": 0, "visits__count": 0})
    (tmp_path / "all").mkdir()
    every.reset_index().astype(
        {"inactive": "int64", "reviews__count": "int64", "visits__count": "int64"}
    ).to_parquet(tmp_path / "all" / "users.parquet")
    verdict = quality.leakage_verdict(
        tmp_path / "all", t, frames, schema, {"users": defs}, delta, "w"
    )
    assert not verdict.passed
    assert "users: 8 rows where 4 entities are seeds at" in verdict.description
    assert "; not seeds: user_id 2, 3, 4 and 1 more" in verdict.description


def test_recomputation_leaves_out_what_would_join_too_many_rows():
    """Past ``max_joined_rows``, the fact->key<-fact values of the remaining entities are
    not recomputed (a wrong one there is not reported), every other target still is."""
    import test_targets

    frames, schema = test_targets._fixed_shop(), shop_schema(True)
    defs = build_traversal_graph(schema, shop_column_types(), "customers", hops=2)
    fkf = [d.name for d in defs if len(d.path) == 3 and d.path[2].direction == "in"]
    t = test_targets.BASE + pd.Timedelta(days=1)
    rows = brute_force(frames, schema, defs, "customers", [t], SHOP_DELTA)
    active = rows.loc[rows["inactive"] == 0, "customer_id"].tolist()
    got = recompute_task_vectors(
        frames, schema, defs, "customers", rows["customer_id"], t, SHOP_DELTA, max_joined_rows=0
    )
    assert fkf and active and got.unchecked == {(n, e) for n in fkf for e in active}
    wrong = rows.copy()
    wrong.loc[wrong["customer_id"] == active[0], fkf[0]] = 12345
    assert compare_task_vectors(wrong, got, defs) == []
    wrong.loc[wrong["customer_id"] == active[0], "orders__count"] += 1
    assert [d.target for d in compare_task_vectors(wrong, got, defs)] == ["orders__count"]


def _window_copy(run, tmp_path, window: str):
    folder = tmp_path / window
    shutil.copytree(run["run_dir"] / "targets" / "tiny" / window, folder)
    return folder


def _leakage(run, folder, window, delta=DELTA):
    dataset = open_dataset(run["dataset_dir"])
    defs = _defs(run)
    schema = dataset.manifest.tables
    frames = read_tables(table_files(dataset), schema, defs["customers"], "customers")
    where = f"tiny tve_targets window {window}"
    t = window_seed_time(window)
    return quality.leakage_verdict(folder, t, frames, schema, defs, delta, where)


def test_no_leakage_fails_on_a_corrupt_value_and_on_rows_past_the_window(pipeline_run, tmp_path):
    window = _windows(pipeline_run)[3]
    folder = _window_copy(pipeline_run, tmp_path, window)
    assert _leakage(pipeline_run, folder, window).passed
    path = folder / "customers.parquet"
    frame = pd.read_parquet(path)
    target = "orders.amount__sum"
    row = frame.index[frame[target].notna()][0]
    customer = int(frame.loc[row, "customer_id"])
    frame.loc[row, target] += 12.5
    frame.to_parquet(path)
    verdict = _leakage(pipeline_run, folder, window)
    assert not verdict.passed
    d = verdict.description
    assert f"window {window}" in d and "customers" in d and target in d
    assert f"customer_id {customer}" in d and "by 12.5" in d
    assert verdict.metadata["customers.differences"] == {target: 1}

    # targets that read 10 days past the window (what a leaking query would do), written by
    # the real SQL generator: the recomputation from (t, t + Δ] disagrees
    from tve_pipeline.targets import TargetQuery, compute_targets

    dataset = open_dataset(pipeline_run["dataset_dir"])
    leak = compute_targets(
        TargetQuery(
            table_files(dataset),
            dataset.manifest.tables,
            _defs(pipeline_run)["customers"],
            "customers",
            [window_seed_time(window)],
            DELTA + pd.Timedelta(days=10),
        )
    )
    leak.to_parquet(path)
    verdict = _leakage(pipeline_run, folder, window)
    assert not verdict.passed and "orders__count" in verdict.metadata["customers.differences"]
    assert f"recomputation from ({window_seed_time(window)}" in verdict.description


def test_seed_time_check_fails_past_validation(pipeline_run, tmp_path):
    run = pipeline_run
    val = pd.Timestamp(load_asset(run, "raw_tables").val_timestamp)
    window = _windows(run, "train")[-1]  # its window ends exactly at the validation timestamp
    folder = _window_copy(run, tmp_path, window)
    t = window_seed_time(window)
    ok = quality.seed_time_verdict(folder, t, ["customers"], DELTA, val, f"tiny {window}")
    assert ok.passed and "0 days 00:00:00 before it" in ok.description
    frame = pd.read_parquet(folder / "customers.parquet")
    frame["timestamp"] = val  # a seed time past validation: its window ends 30 days past it
    frame.to_parquet(folder / "customers.parquet")
    late = window_seed_time(frame["timestamp"].iloc[0].strftime("%Y-%m-%d"))
    verdict = quality.seed_time_verdict(folder, late, ["customers"], DELTA, val, f"tiny {window}")
    assert not verdict.passed
    assert f"seed time {val}" in verdict.description
    assert "past the validation timestamp" in verdict.description
    assert "by 30 days" in verdict.description and f"tiny {window}" in verdict.description
    # the file's rows at another seed time than the window's are named too
    verdict = quality.seed_time_verdict(folder, t, ["customers"], DELTA, val, f"tiny {window}")
    assert not verdict.passed and f"{len(frame)} of {len(frame)} rows at seed times other" in (
        verdict.description
    )


def test_seed_time_check_bounds_a_validation_window_by_the_test_timestamp(pipeline_run, tmp_path):
    """The validation window (seed time = the validation timestamp) passes when its window
    ends by the test timestamp, and fails, naming the test timestamp, when it does not."""
    run = pipeline_run
    summary = load_asset(run, "raw_tables")
    val, test = pd.Timestamp(summary.val_timestamp), pd.Timestamp(summary.test_timestamp)
    (window,) = _windows(run, "val")
    assert window_seed_time(window) == val
    folder = _window_copy(run, tmp_path, window)
    where = f"tiny {window}"
    ok = quality.seed_time_verdict(folder, val, ["customers"], DELTA, val, where, test)
    assert ok.passed and f"ends by the test timestamp {test}" in ok.description
    assert ok.metadata["split"] == "val"
    # without the test timestamp it would be judged as a training window: past validation
    assert not quality.seed_time_verdict(folder, val, ["customers"], DELTA, val, where).passed
    # a validation seed time whose window ends past the test timestamp
    late = test - DELTA + pd.Timedelta(days=1)
    frame = pd.read_parquet(folder / "customers.parquet")
    frame["timestamp"] = late
    frame.to_parquet(folder / "customers.parquet")
    verdict = quality.seed_time_verdict(folder, late, ["customers"], DELTA, val, where, test)
    assert not verdict.passed
    assert f"is past the test timestamp {test} by 1 days" in verdict.description
    # the recorded check of the run's validation window passed
    recorded = _evaluations(run["instance"])[("tve_targets", "no_leakage", window)]
    assert recorded.passed and f"window {window}: validation window" in recorded.description


def test_coverage_reports_the_inactive_share_and_fails_on_an_all_null_target(
    pipeline_run, tmp_path
):
    window = _windows(pipeline_run)[0]
    folder = _window_copy(pipeline_run, tmp_path, window)
    defs = _defs(pipeline_run)
    frame = pd.read_parquet(folder / "customers.parquet")
    verdict = quality.coverage_verdict(folder, defs, f"tiny tve_targets window {window}")
    assert verdict.passed
    assert verdict.metadata["inactive_share"] == {"customers": frame["inactive"].mean()}
    frame["orders>products.price__std"] = np.nan
    frame.to_parquet(folder / "customers.parquet")
    verdict = quality.coverage_verdict(folder, defs, f"tiny tve_targets window {window}")
    assert not verdict.passed
    assert verdict.metadata["all_null_targets"] == {"customers": ["orders>products.price__std"]}
    assert f"window {window}" in verdict.description
    assert f"null in all {len(frame)} rows (orders>products.price__std" in verdict.description


def test_targets_checks_sample_per_run_and_say_how_many_values(pipeline_run):
    """The fixture's one run over every window recomputed 64 rows (or all, when fewer) of its
    newest window only; every window's evaluation says so, with the values compared: rows
    x (targets + inactive), counted here from the file; every row's seed time compared."""
    run = pipeline_run
    evaluations = _evaluations(run["instance"])
    windows = sorted(_windows(run))
    defs = _defs(run)["customers"]
    newest = pd.read_parquet(
        run["run_dir"] / "targets" / "tiny" / windows[-1] / "customers.parquet"
    )
    rows = min(64, len(newest))
    for w in windows:
        e = evaluations[("tve_targets", "no_leakage", w)]
        meta = {k: v.value if hasattr(v, "value") else v.data for k, v in e.metadata.items()}
        assert meta["run_sampled_windows"] == [windows[-1]]
        assert meta["sampled_rows"] == {"customers": rows if w == windows[-1] else 0}
        assert meta["run_sampled_rows"] == rows
        assert meta["run_values_compared"] == rows * (len(defs) + 1)
        assert f"64 rows ({rows * (len(defs) + 1)} values) of 1 of its" in e.description or (
            rows < 64 and f"{rows} rows" in e.description
        )
        frame = pd.read_parquet(run["run_dir"] / "targets" / "tiny" / w / "customers.parquet")
        assert e.metadata["rows_compared"].value == len(frame)  # every row's seed time
        assert e.metadata["split"].value in ("train", "val")


def test_coverage_is_judged_over_the_run(pipeline_run, tmp_path):
    """A target without a value in some windows of a run but with one in another passes (a
    sparse path); one without a value in any window of the run warns in every window. With
    one window read whole, the others are read for the targets still without a value."""
    windows = sorted(_windows(pipeline_run))[:3]
    folders = {w: _window_copy(pipeline_run, tmp_path, w) for w in windows}
    defs = _defs(pipeline_run)
    frames = {w: pd.read_parquet(f / "customers.parquet") for w, f in folders.items()}
    values = [d.name for d in defs["customers"] if d.aggregation not in ("count", "count_distinct")]
    sparse = next(n for n in values if all(frames[w][n].notna().any() for w in windows))
    empty = next(n for n in values if n != sparse)
    for w, frame in frames.items():
        if w != windows[-1]:
            frame[sparse] = np.nan
        frame[empty] = np.nan
        frame.to_parquet(folders[w] / "customers.parquet")
    verdicts = quality.coverage_verdicts(folders, defs, "tiny tve_targets", sample_windows=1)
    for w in windows:
        v = verdicts[w]
        assert not v.passed and v.metadata["all_null_targets"] == {"customers": [empty]}, w
        assert f"window {w}: customers: 1 of {len(defs['customers'])} targets null" in (
            v.description
        )
        assert "of every window of the run" in v.description
        # every value target in the newest window, the empty one only in the two others
        assert v.metadata["run_values_compared"] == len(values) + 2
        assert v.metadata["empty_here_valued_elsewhere"] == {}  # not read where it had
    run = quality.coverage_run_verdict(folders, defs, "tiny tve_targets", sample_windows=1)
    assert not run.passed and run.metadata["all_null_targets"] == {"customers": [empty]}
    assert run.description.startswith(
        f"tiny tve_targets, 3 windows ({windows[0]} .. {windows[-1]}): 3 fail "
        f"({windows[0]}, {windows[1]} and 1 more); first: tiny tve_targets window {windows[0]}:"
    )
    assert run.metadata["run_values_compared"] == len(values) + 2
    assert set(run.metadata["inactive_share"]) == set(windows)
    verdicts = quality.coverage_verdicts(folders, defs, "tiny tve_targets")  # all 3 read whole
    for w in windows:
        v = verdicts[w]
        assert not v.passed and v.metadata["all_null_targets"] == {"customers": [empty]}, w
        expected = {} if w == windows[-1] else {"customers": {sparse: 1}}
        assert v.metadata["empty_here_valued_elsewhere"] == expected
        assert v.metadata["run_values_compared"] == 3 * len(values)
    for w, frame in frames.items():  # the empty target gets a value in the first window only
        frame[empty] = 1.0 if w == windows[0] else np.nan
        frame.to_parquet(folders[w] / "customers.parquet")
    verdicts = quality.coverage_verdicts(folders, defs, "tiny tve_targets")
    assert all(v.passed for v in verdicts.values())
    assert "have values in other windows of the run" in verdicts[windows[1]].description
    run = quality.coverage_run_verdict(folders, defs, "tiny tve_targets")
    assert run.passed and "no target without a value in every window" in run.description
    assert run.metadata["all_null_targets"] == {}


def test_tve_run_and_tve_experiment_end_with_a_line_per_failed_check(
    pipeline_run, tmp_path, capsys, monkeypatch, keep_tve_environment
):
    """`tve run`'s and `tve experiment`'s last lines: one per check that failed or warned in
    its latest evaluation of a partition its asset has now (an unpartitioned check's: its
    latest); none for a clean database. Real instance and checks; targets broken on purpose
    (one column off by one: no_leakage fails, blocking); what the commands run (Runner.run,
    the experiment's backfill) is replaced by what it returns: their ends are tested."""
    from assets import commands
    from assets.checks import failed_check_lines
    from assets.commands import run_database, run_experiment

    summary = pipeline_run["summary"]

    def tve_run(run_dir) -> list[str]:
        capsys.readouterr()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(Runner, "run", lambda self: summary)
            run_database("tiny", run_dir)
        return capsys.readouterr().out.rstrip().splitlines()

    run_dir = tmp_path / "run"
    instance = prepare_run_dir(run_dir)
    register_dataset(pipeline_run["dataset_dir"], run_dir, instance, profile="test")
    runner = Runner("tiny", run_dir)
    runner.materialize(["raw_tables"], "tiny")
    assert failed_check_lines(runner.instance, runner.checks, runner.by_name) == []
    out = tve_run(run_dir)
    assert "tiny: nothing was missing or stale" in out[-1]
    assert not [o for o in out if o.startswith("check ")]

    _targets_off_by_one(monkeypatch)
    with pytest.raises(RuntimeError, match="check no_leakage failed"):
        runner.run_upstream()
    windows = _windows({"run_dir": run_dir})
    (line,) = failed_check_lines(runner.instance, runner.checks, runner.by_name)
    assert line.startswith(
        f"check FAILED: no_leakage on tiny/tve_targets in {len(windows)} of {len(windows)} "
        f"partitions ({', '.join(sorted(windows)[:3])} ...): tiny tve_targets window "
        f"{sorted(windows)[0]}: the rows are the seeds at"
    )
    assert "orders__count" in line and "by 1" in line
    assert tve_run(run_dir)[-1] == line

    # coverage (one evaluation per run, no partition) warns: its line has no partitions
    warned = dg.AssetCheckEvaluation(
        asset_key=runner.db.key("tve_targets"),
        check_name="coverage",
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description="tiny tve_targets, 9 windows: 1 fail",
    )
    runner.instance.report_runless_asset_event(warned)
    coverage = "check warning: coverage on tiny/tve_targets: tiny tve_targets, 9 windows: 1 fail"
    assert tve_run(run_dir)[-2:] == [coverage, line]

    def tve_experiment(unfinished: set) -> list[str]:
        capsys.readouterr()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(Runner, "run_upstream", lambda self: None)
            m.setattr(Runner, "unfinished", lambda self: unfinished)
            m.setattr(Runner, "results", lambda self: summary)
            m.setattr(commands, "create_tracking_store", lambda runner: None)
            m.setattr(commands, "_launch_backfill", lambda runner, todo, title: "b1")
            outcome = {"status": "COMPLETED_SUCCESS", "failed": []}
            m.setattr(commands, "_run_backfill_with_daemon", lambda instance, b: outcome)
            if unfinished:  # the backfill materialised no results in this run folder
                with pytest.raises(RuntimeError, match="has no results"):
                    run_experiment("tiny", run_dir, "test")
            else:
                run_experiment("tiny", run_dir, "test")
        return capsys.readouterr().out.rstrip().splitlines()

    out = tve_experiment(set())  # every cell finished: the results, then the checks
    assert "every cell is finished: nothing to launch" in out
    assert out[-2:] == [coverage, line]
    out = tve_experiment({("results", None)})  # a backfill that left no results
    assert "launched backfill b1 of 1 partitions" in " ".join(out)
    assert out[-2:] == [coverage, line]


# --------------------------------------------------------------------------- the database


def test_validation_check_fails_on_an_error_in_the_data(pipeline_run, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(pipeline_run["dataset_dir"], copy)
    assert quality.validation_verdict(copy, "database 'tiny' raw_tables").passed
    orders = pd.read_parquet(copy / "db" / "orders.parquet")
    orders.loc[orders.index[:3], "customer_id"] = 999  # 3 orders of a customer that is not there
    orders.to_parquet(copy / "db" / "orders.parquet")
    verdict = quality.validation_verdict(copy, "database 'tiny' raw_tables")
    assert not verdict.passed and verdict.metadata["errors"] >= 1
    d = verdict.description
    assert d.startswith("database 'tiny' raw_tables: validation error:")
    assert "orders" in d and "customer_id" in d and "3" in d and "999" in d


# --------------------------------------------------------------------------- pre-training


def test_finite_weights_fails_on_a_nan_weight(pipeline_run):
    checkpoint = load_asset(pipeline_run, "pretrained_checkpoint", "tve")
    assert quality.finite_weights_verdict(checkpoint, "tiny pretrained_checkpoint tve").passed
    backbone = checkpoint["by_entity"]["customers"]["backbone"]
    name = next(k for k, v in backbone.items() if v.is_floating_point() and v.numel() > 2)
    broken = backbone[name].clone()
    broken.view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    checkpoint["by_entity"]["customers"]["backbone"] = {**backbone, name: broken}
    verdict = quality.finite_weights_verdict(checkpoint, "tiny pretrained_checkpoint tve")
    assert not verdict.passed
    assert verdict.description == (
        f"tiny pretrained_checkpoint tve: customers: 2 of {broken.numel()} values of backbone "
        f"tensor {name} are not finite (NaN or inf)"
    )


def _sce_by_hand(y: np.ndarray, prediction: np.ndarray, w: float, alpha: float) -> float:
    cos = (y @ prediction) / np.maximum(
        np.linalg.norm(y, axis=1) * np.linalg.norm(prediction), 1e-8
    )
    weight = np.where(y[:, 0] == 1, w, 1 - w)
    return float((weight * (1 - cos) ** alpha).sum() / weight.sum())


def test_pretraining_check_against_a_loss_by_hand(pipeline_run):
    """The recorded check's trivial loss is NumPy's scaled cosine error of the mean training
    vector over the validation window (batch by batch, as pre-training averages its
    validation loss); the model's is the checkpoint's validation loss, and recomputing it
    from the stored weights (clean inputs) gives it back.
    The tiny test-profile model (2 epochs) is worse than the constant: the check says so."""
    run = pipeline_run
    recipe = run["resources"]["recipe"].recipe()
    cfg = recipe.pretrain
    checkpoint = load_asset(run, "pretrained_checkpoint", "tve")
    result = checkpoint["by_entity"]["customers"]
    folder = run["run_dir"] / "targets" / "tiny"
    files = [folder / w / "customers.parquet" for w in _windows(run, "train")]
    val_files = [folder / w / "customers.parquet" for w in _windows(run, "val")]
    graph = load_asset(run, "traversal_graph")
    seeds = pretraining_task_vectors(
        files,
        "customer_id",
        {d["name"]: d["aggregation"] for d in graph["customers"]},
        val=val_files,
        mode_encoding=recipe.targets.mode_encoding,
        mca_components=recipe.targets.mca_components,
    )
    assert len(seeds.val) == len(pd.read_parquet(val_files[0])) > 0
    mean = seeds.train.task_vectors(np.arange(len(seeds.train))).numpy().mean(0)
    val = seeds.val.task_vectors(np.arange(len(seeds.val))).numpy()
    batches = [val[i : i + cfg.batch_size] for i in range(0, len(val), cfg.batch_size)]
    by_hand = sum(
        _sce_by_hand(b, mean, cfg.inactive_weight, cfg.sce_alpha) * len(b) for b in batches
    ) / len(val)
    evaluation = _evaluations(run["instance"])[
        ("pretrained_checkpoint", "beats_trivial_predictor", "tve")
    ]
    trivial = evaluation.metadata["trivial_loss"].data["customers"]
    model = evaluation.metadata["model_loss"].data["customers"]
    assert trivial == pytest.approx(by_hand, rel=1e-5)
    assert model == pytest.approx(result["best_val_loss"], rel=1e-9)
    assert evaluation.passed == (model < trivial)
    if not evaluation.passed:
        assert f"customers: validation task-vector loss {model:.6g} is not below" in (
            evaluation.description
        )
        assert f"by {model - trivial:.6g}" in evaluation.description
    # the path for tve+mae / tve+ctr: the task-vector loss recomputed from the weights
    dataset = open_dataset(run["dataset_dir"])
    raw_tables = load_asset(run, "raw_tables")
    cached = _cached_graph(run["resources"]["storage"], raw_tables, dataset, recipe)
    again = quality.model_validation_loss(
        cached, "customers", result, seeds, recipe, torch.device("cpu")
    )
    assert again == pytest.approx(result["best_val_loss"], rel=1e-4)
    # and both ways round on purpose
    worse = quality.pretraining_verdict(
        {"customers": (0.9, 0.25)}, "tiny pretrained_checkpoint tve"
    )
    assert (
        not worse.passed
        and "customers: validation task-vector loss 0.9 is not below the "
        "trivial predictor's 0.25 (the mean normalised task vector), by 0.65"
        in worse.description
    )
    assert quality.pretraining_verdict({"customers": (0.1, 0.25)}, "x").passed


# --------------------------------------------------------------------------- fine-tuning


def test_metrics_check_against_sklearn_and_a_worse_model(pipeline_run):
    """The trivial baseline's recorded metrics are sklearn's: AUROC 0.5 for a constant; for
    regression the NMAE (MAE over the training labels' std) of the constant (zero, training
    mean or median) best on val; each cell passes exactly when its model is better on val;
    a model worse than that warns, naming cell, split and gap."""
    run = pipeline_run
    evaluations = _evaluations(run["instance"])
    dataset = open_dataset(run["dataset_dir"])
    metrics = run["metrics"]
    for (asset, _, cell), e in evaluations.items():
        if asset != "metrics":
            continue
        task_name = cell.split("|")[0]
        task = dataset.load_task(task_name)
        tables = {s: task.get_table(s, mask_input_cols=False).df for s in ("train", "val", "test")}
        train = tables["train"][task.target_col].astype(float)
        rows = metrics[(metrics["task"] == task_name) & (metrics["method"] == cell.split("|")[1])]
        model = dict(zip(rows["split"], rows["value"]))
        trivial = e.metadata["trivial"].data
        if task_name == "customer-churn":
            for split in ("val", "test"):
                labels = tables[split][task.target_col].astype(float)
                constant = np.full(len(labels), float(train.mean() >= 0.5))
                assert trivial[split] == pytest.approx(roc_auc_score(labels, constant))
        else:
            std = train.std(ddof=1)
            labels = {s: tables[s][task.target_col].astype(float) for s in ("val", "test")}
            nmae = {
                (s, c): mean_absolute_error(labels[s], np.full(len(labels[s]), c)) / std
                for s in ("val", "test")
                for c in (0.0, train.mean(), train.median())
            }
            best = min((0.0, train.mean(), train.median()), key=lambda c: nmae[("val", c)])
            for split in ("val", "test"):
                assert trivial[split] == pytest.approx(nmae[(split, best)], rel=1e-6)
        higher = task_name == "customer-churn"  # judged on val; test beside it
        better = (model["val"] > trivial["val"]) if higher else (model["val"] < trivial["val"])
        assert e.passed == better, (cell, model, trivial)
    # a model worse than the constant, on purpose
    scores = {"val": {"roc_auc": 0.41}, "test": {"roc_auc": 0.62}}
    trivial = pd.DataFrame(
        {
            "task": "c",
            "split": ["val", "test"],
            "metric": "roc_auc",
            "trivial": 0.5,
            "trivial_predictor": "majority",
        }
    )
    verdict = quality.baseline_verdict(scores, trivial, "roc_auc", "tiny metrics c|tve|1|s0")
    assert not verdict.passed
    assert verdict.description == (
        "tiny metrics c|tve|1|s0: val roc_auc 0.41 is not better than the trivial baseline's "
        "0.5 (majority) by 0.09 (higher is better)"
    )


# --------------------------------------------------------------------------- a real run


def test_a_failing_blocking_check_stops_tve_run_before_pretraining(
    pipeline_run, tmp_path, monkeypatch, keep_tve_environment
):
    """A `tve run` whose targets are off by one in one column (the SQL writer patched to
    add 1 after writing) stops at the no_leakage check of the targets: the run fails with
    the check's description, every window's failed evaluation is in the instance, and no
    checkpoint is trained from the wrong targets."""
    _targets_off_by_one(monkeypatch)
    run_dir = tmp_path / "run"
    instance = prepare_run_dir(run_dir)
    register_dataset(pipeline_run["dataset_dir"], run_dir, instance, profile="test")
    runner = Runner("tiny", run_dir)
    with pytest.raises(RuntimeError) as failed:
        runner.run()
    message = str(failed.value)
    assert message.startswith("tve_targets tiny windows")
    assert "check no_leakage failed: tiny tve_targets window" in message
    assert "orders__count" in message and "by 1" in message
    evaluations = _evaluations(runner.instance)
    windows = _windows({"run_dir": run_dir})
    for w in windows:
        e = evaluations[("tve_targets", "no_leakage", w)]
        assert not e.passed and e.blocking and f"window {w}" in e.description
        assert "orders__count" in e.description  # the run's sample stands for every window
        assert "ends by the" not in e.description  # the seed times are right: not shown
    assert (
        runner.instance.get_latest_materialization_event(runner.db.key("pretrained_checkpoint"))
        is None
    )


def _targets_off_by_one(monkeypatch) -> None:
    """The SQL writer patched to add 1 to one column of every window after writing it."""
    real = assets.target_assets.write_targets_by_seed_time

    def off_by_one(query, out_path_of, **kw):
        stats = real(query, out_path_of, **kw)
        for t in stats:
            frame = pd.read_parquet(out_path_of(t))
            frame["orders__count"] += 1
            frame.to_parquet(out_path_of(t))
        return stats

    monkeypatch.setattr(assets.target_assets, "write_targets_by_seed_time", off_by_one)
