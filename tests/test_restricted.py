"""Restricted tasks as a label setting beside the fractions: cell keys, the grid, the
restricted tables against a brute-force pandas oracle (and their indifference to the
future), the recipe's old field, the summary, and a restricted cell fine-tuned, scored and
probed end to end by a real Dagster run on the tiny database."""

import json
import math
import warnings

import pandas as pd
import pytest

from assets.partitions import cell_key, checkpoint_of_cells, experiment_cells, parse_cell
from tve_pipeline.config import make_recipe, recipe_version
from tve_pipeline.database import open_dataset
from tve_pipeline.datasets import build_synthetic
from tve_pipeline.results import markdown_table, plot_tasks, summarise
from tve_pipeline.tasks import label_setting, restrict_task_tables, restricted_k


def test_cell_keys_round_trip_fractions_and_restricted_settings():
    assert cell_key("driver-dnf", "tve", "top10", 0) == "driver-dnf|tve|top10|s0"
    assert parse_cell("driver-dnf|tve|top10|s0") == ("driver-dnf", "tve", "top10", 0)
    assert parse_cell(cell_key("t", "mae", 0.25, 3)) == ("t", "mae", 0.25, 3)
    fraction = parse_cell("t|tve|1|s2")[2]
    assert isinstance(fraction, float) and fraction == 1.0
    assert restricted_k("top10") == 10 and restricted_k(0.1) is None
    for bad in ("t|tve|top0|s0", "t|tve|topx|s0", "t|tve|2|s0", "t|tve|ten|s0"):
        with pytest.raises(ValueError, match="fraction: a label fraction or top<k>"):
            parse_cell(bad)
    with pytest.raises(ValueError, match="label fraction must be in"):
        label_setting("0")


def test_the_grid_has_top_k_cells_beside_the_fractions_per_database():
    recipe = make_recipe(
        "test",
        {
            "pretrain": {"objectives": ["tve"]},
            "finetune": {
                "label_fractions": [0.1, 1.0],
                "restricted_k": [5],
                "restricted_k_by_database": {"rel-flights": [500, 100]},
            },
        },
    )
    assert experiment_cells(["a"], recipe, "rel-f1") == [
        "a|scratch|0.1|s0",
        "a|scratch|1|s0",
        "a|scratch|top5|s0",
        "a|tve|0.1|s0",
        "a|tve|1|s0",
        "a|tve|top5|s0",
    ]
    flights = experiment_cells(["a"], recipe, "rel-flights")
    assert [c for c in flights if "top" in c] == [
        "a|scratch|top500|s0",
        "a|scratch|top100|s0",
        "a|tve|top500|s0",
        "a|tve|top100|s0",
    ]
    mapping = checkpoint_of_cells(["a"], recipe, "rel-flights")
    assert "a|tve|top100|s0" in mapping.downstream_partition_keys_by_upstream_partition_key["tve"]
    # the restricted ks are the grid: adding them leaves every cell's code version alone
    for section in ("finetune", "probe"):
        assert recipe_version(recipe, "seed", "backbone", section) == recipe_version(
            make_recipe("test", {"finetune": {"label_fractions": [0.1, 1.0]}}),
            "seed",
            "backbone",
            section,
        )
    with pytest.raises(ValueError, match="restricted_k must be positive"):
        make_recipe("test", {"finetune": {"restricted_k": [0]}})


def test_an_old_recipe_restrict_top_k_becomes_its_restricted_cells():
    with pytest.warns(FutureWarning, match="restrict_top_k = 7 now adds the restricted cells"):
        recipe = make_recipe("test", {"finetune": {"restrict_top_k": 7}})
    assert recipe.finetune.restricted_k == (7,)
    assert experiment_cells(["a"], recipe)[-1] == "a|tve|top7|s0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every stored recipe has it, as None: silent
        old = make_recipe("test", {"finetune": {"restrict_top_k": None}})
    assert old.finetune.restricted_k == ()


def _oracle(labels, frames, schema, task, k):
    """The k most active entities per seed time, by brute force: for every row, count the
    first-hop rows (time-stamped tables with a key to the entity table) in (t - Δ, t] and up
    to t, then sort (activity desc, history desc, id asc) and keep k per seed time."""
    entity, time = task.entity_col, task.time_col
    facts = [
        (name, col)
        for name, spec in schema.items()
        if spec.time_col is not None
        for col, ref in spec.fkeys.items()
        if ref == task.entity_table
    ]
    activity, history = [], []
    for _, row in labels.iterrows():
        t = pd.Timestamp(row[time])
        a = h = 0
        for name, col in facts:
            f = frames[name]
            ft = pd.to_datetime(f[schema[name].time_col])
            mine = f[col] == row[entity]
            a += int((mine & (ft > t - task.timedelta) & (ft <= t)).sum())
            h += int((mine & (ft <= t)).sum())
        activity.append(a)
        history.append(h)
    ranked = labels.assign(a=activity, h=history)
    keep = []
    for _, group in ranked.groupby(time):
        group = sorted(group.itertuples(), key=lambda r: (-r.a, -r.h, getattr(r, entity)))
        keep += [r.Index for r in group[:k]]
    return labels.loc[sorted(keep)].reset_index(drop=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    dataset = open_dataset(build_synthetic(tmp_path_factory.mktemp("restricted") / "tiny"))
    task = dataset.load_task("customer-spend")
    db = task.get_db(upto_test_timestamp=False)
    return dataset, task, db


def _tables(task, db):
    return {
        split: task.get_table(split, mask_input_cols=False, db=db)
        for split in ("train", "val", "test")
    }


@pytest.mark.parametrize("k", [3, 20])
def test_restricted_tables_are_the_brute_force_ones(tiny, k):
    dataset, task, db = tiny
    frames = {n: t.df for n, t in db.table_dict.items()}
    schema = dataset.manifest.tables
    tables = _tables(task, db)
    full = {split: t.df.copy() for split, t in tables.items()}
    restrict_task_tables(tables, frames, schema, task, k)
    for split, table in tables.items():
        expected = _oracle(full[split], frames, schema, task, k)
        pd.testing.assert_frame_equal(table.df, expected, check_dtype=False)
        per_time = table.df.groupby(task.time_col).size()
        assert per_time.max() <= k and len(table.df) < len(full[split])


def test_a_restriction_that_leaves_one_class_to_score_fails_naming_k(tiny):
    dataset, _, db = tiny
    task = dataset.load_task("customer-churn")
    frames = {n: t.df for n, t in db.table_dict.items()}
    tables = _tables(task, task.get_db(upto_test_timestamp=False))
    # the 5 most active customers at the validation seed time: none churns (5 rows, rate 0)
    with pytest.raises(ValueError, match="restricted to top5 has one class only in val"):
        restrict_task_tables(tables, frames, dataset.manifest.tables, task, 5)


def test_the_restriction_never_reads_the_future(tiny):
    """Orders after a seed time t (a burst from customers it left out, one second after t)
    change nothing of the restricted rows at t; the same burst at t does. (They are the past
    of later seed times, so each seed time is checked on its own.)"""
    dataset, task, db = tiny
    frames = {n: t.df for n, t in db.table_dict.items()}
    schema = dataset.manifest.tables
    orders = frames["orders"]
    before = restrict_task_tables(_tables(task, db), frames, schema, task, 5)
    labels = pd.concat([t.df for t in _tables(task, db).values()])
    times = sorted(labels[task.time_col].unique())
    for t in [times[0], times[len(times) // 2], times[-1]]:
        at = labels[labels[task.time_col] == t]
        kept = pd.concat([b.df for b in before.values()])
        kept = kept.loc[kept[task.time_col] == t, task.entity_col]
        quiet = at.loc[~at[task.entity_col].isin(kept), task.entity_col].unique()[:5]
        burst = orders.iloc[[0] * 50 * len(quiet)].copy()
        burst["customer_id"] = list(quiet) * 50
        for when, changes in ((t + pd.Timedelta(seconds=1), False), (t, True)):
            burst["order_time"] = when
            grown = {**frames, "orders": pd.concat([orders, burst], ignore_index=True)}
            after = restrict_task_tables(_tables(task, db), grown, schema, task, 5)
            for split in before:
                mine = before[split].df[before[split].df[task.time_col] == t]
                theirs = after[split].df[after[split].df[task.time_col] == t]
                same = mine.reset_index(drop=True).equals(theirs.reset_index(drop=True))
                assert same != (changes and not mine.empty), (t, when, split)


def _rows():
    """Two label settings (fraction 1 and top10), scratch and tve, 2 seeds; hand values."""
    values = {
        ("1", "scratch"): [0.70, 0.72],
        ("1", "tve"): [0.74, 0.75],
        ("top10", "scratch"): [0.60, 0.64],
        ("top10", "tve"): [0.66, 0.65],
    }
    return pd.DataFrame(
        [
            {
                "database": "db",
                "task": "t",
                "method": method,
                "label_fraction": math.nan if label_set.startswith("top") else float(label_set),
                "label_set": label_set,
                "seed": seed,
                "readout": "finetune",
                "split": "test",
                "metric": "roc_auc",
                "value": v,
            }
            for (label_set, method), vs in values.items()
            for seed, v in enumerate(vs)
        ]
    )


def test_the_summary_pairs_restricted_cells_within_their_setting(tmp_path):
    old = _rows().iloc[:4].drop(columns="label_set")  # rows stored before label settings
    old["label_fraction"] = 0.1
    summary = summarise(pd.concat([_rows(), old], ignore_index=True))
    # per method, fractions ascending, then the restricted settings
    assert summary["label_set"].tolist() == ["0.1", "1", "top10"] * 2
    top = summary[summary["label_set"] == "top10"].set_index("method")
    # tve - scratch on top10: 0.06, 0.01 -> mean 0.035 (hand)
    assert top.loc["tve", "diff_vs_scratch"] == pytest.approx(0.035)
    assert top.loc["scratch", "mean"] == pytest.approx(0.62)
    assert top["label_fraction"].isna().all()
    whole = summary[summary["label_set"] == "1"].set_index("method")
    assert whole.loc["tve", "diff_vs_scratch"] == pytest.approx(0.035)  # 0.04, 0.03
    assert (whole["label_fraction"] == 1.0).all()
    table = markdown_table(summary)
    assert "| t | roc_auc | higher | finetune | top10 | tve |" in table
    assert table.index("| 1 | tve |") < table.index("| top10 | tve |")
    # a summary read back from its CSV (label settings as text) plots: fractions and a panel
    summary.to_csv(tmp_path / "summary.csv", index=False)
    (path,) = plot_tasks(pd.read_csv(tmp_path / "summary.csv"), tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (only,) = plot_tasks(summarise(_rows().iloc[4:]), tmp_path / "only")
    assert only.exists()


def test_a_restricted_cell_fine_tunes_scores_and_probes_in_dagster(tmp_path, keep_tve_environment):
    """`tve experiment`'s recipe writer puts the database's k in recipe.json; the cells
    ``top20`` fine-tune, score and probe on the restricted task (its tables: the oracle's),
    and the results carry them."""
    from assets.cli import main
    from assets.commands import Runner, set_experiment

    run_dir = tmp_path / "run"
    dataset_dir = build_synthetic(tmp_path / "tiny")
    assert main(["register", str(dataset_dir), "--run-dir", str(run_dir)]) == 0
    set_experiment(run_dir, "tiny", "test", ["customer-churn"], restricted=[20])
    settings = json.loads((run_dir / "recipe.json").read_text())
    assert settings["overrides"]["finetune"]["restricted_k_by_database"] == {"tiny": [20]}
    settings["overrides"]["finetune"]["label_fractions"] = []  # the restricted cells only
    (run_dir / "recipe.json").write_text(json.dumps(settings))
    runner = Runner("tiny", run_dir)
    cells = experiment_cells(runner.db.tasks, runner.recipe, "tiny")
    assert cells == ["customer-churn|scratch|top20|s0", "customer-churn|tve|top20|s0"]
    summary = runner.run()

    dataset = open_dataset(run_dir / "datasets" / "tiny")
    task = dataset.load_task("customer-churn")
    db = task.get_db(upto_test_timestamp=False)
    frames = {n: t.df for n, t in db.table_dict.items()}
    train = task.get_table("train", db=db).df
    expected = _oracle(train, frames, dataset.manifest.tables, task, 20)
    records = runner.instance.fetch_materializations(
        runner.db.key("finetuned_models"), limit=100
    ).records
    meta = {r.asset_materialization.partition: r.asset_materialization.metadata for r in records}
    assert set(meta) == set(cells)
    for cell in cells:
        tuned = runner.load("finetuned_models", cell)
        assert tuned["n_train"] == len(expected) < len(train)
        assert meta[cell]["label_set"].value == "top20" and meta[cell]["n_val"].value == 20
    for asset in ("metrics", "probe_metrics"):
        rows = runner.cell_metrics(asset)
        assert set(rows["label_set"]) == {"top20"} and rows["label_fraction"].isna().all()
        assert set(rows["split"]) == {"val", "test"}
    assert set(summary["label_set"]) == {"top20"} and set(summary["readout"]) == {
        "finetune",
        "probe",
    }
    import mlflow

    mlflow.set_tracking_uri(runner.resources["mlflow"].tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert set(runs["params.label_set"].dropna()) == {"top20"}
    assert set(runs["params.restricted_k"].dropna()) == {"20"}


def test_restricted_ks_are_the_database_own_in_recipe_json(tmp_path):
    """`--restricted` parses ks or none; set_experiment keeps another database's ks, keeps
    this one's when the flag is absent, and drops them with none."""
    import argparse

    from assets.cli import _restricted_ks
    from assets.commands import read_settings, set_experiment

    assert _restricted_ks("5,10") == [5, 10] and _restricted_ks("none") == []
    for bad in ("0", "ten", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--restricted must be positive"):
            _restricted_ks(bad)

    def ks() -> dict:
        return read_settings(tmp_path)["overrides"]["finetune"].get("restricted_k_by_database")

    set_experiment(tmp_path, "rel-flights", "cpu", None, restricted=[500])
    set_experiment(tmp_path, "rel-f1", "cpu", None, restricted=[10, 5, 10])
    assert ks() == {"rel-flights": [500], "rel-f1": [5, 10]}
    set_experiment(tmp_path, "rel-f1", "cpu", None)
    assert ks() == {"rel-flights": [500], "rel-f1": [5, 10]}
    set_experiment(tmp_path, "rel-f1", "cpu", None, restricted=[])
    recipe = make_recipe("cpu", read_settings(tmp_path)["overrides"])
    assert recipe.finetune.restricted_ks("rel-f1") == ()
    assert recipe.finetune.restricted_ks("rel-flights") == (500,)
    assert recipe.finetune.restricted_ks("other") == ()
