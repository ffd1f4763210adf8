"""Pre-training budgets: one run, a checkpoint at each budget, resumable; the staged
``ctr>tve`` objective.

The oracle of a budget's checkpoint is one uninterrupted run of the whole schedule that
reports what it kept at every budget; a run stopped at a budget and resumed to the next
must end with exactly the same weights.
"""

import pytest
import torch
from test_pretrain_targets import windows  # noqa: F401  (the module fixture)

from tve_pipeline import objectives, training
from tve_pipeline.config import budget_key, make_recipe, parse_budget_key

CPU = torch.device("cpu")


def _recipe(**pretrain):
    # the test profile: 3 steps an epoch; 4 epochs = 12 steps; budgets at 3, 6 and 12 steps
    return make_recipe("test", {"pretrain": {"epochs": 4, "budgets": (3, 6, 12), **pretrain}})


def _args(w):
    return (w["data"], w["col_stats"], "customers", "customer_id", w["files"], w["aggregations"])


def _assert_same(a: dict, b: dict):
    assert a["best_epoch"] == b["best_epoch"] and a["best_val_loss"] == b["best_val_loss"]
    for part in ("backbone", "head"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            assert torch.equal(b[part][k], v), (part, k)


def test_budgets_of_a_resumed_run_equal_one_uninterrupted_run(windows, tmp_path):  # noqa: F811
    w, recipe = windows, _recipe()
    seen = {}
    whole = training.pretrain(
        *_args(w),
        recipe,
        CPU,
        val_targets=[w["val"]],
        on_budget=lambda steps, result: seen.__setitem__(steps, result),
    )
    assert sorted(seen) == [3, 6, 12]
    _assert_same(seen[12], whole)
    # a budget keeps the best evaluation up to it: the run's validation losses decide
    losses = [row["val_loss"] for row in whole["history"]]
    for steps, result in seen.items():
        upto = losses[: steps // 3]
        assert result["best_epoch"] == upto.index(min(upto))
        assert result["best_step"] == 3 * (result["best_epoch"] + 1)

    ckpt = training.Checkpointer(tmp_path / "tve.pt", every=100, key="k")
    first = training.pretrain(*_args(w), recipe, CPU, val_targets=[w["val"]], checkpoint=ckpt)
    assert first["best_step"] == 12 and not ckpt.path.exists()  # no budget: the whole run
    stopped = training.pretrain(
        *_args(w), recipe, CPU, val_targets=[w["val"]], checkpoint=ckpt, budget=6
    )
    _assert_same(seen[6], stopped)
    saved = ckpt.load()
    assert saved["global_step"] == 6 and saved["epoch"] == 2 and saved["step"] == 0
    # a shorter budget than the checkpoint's: computed again, the checkpoint left alone
    before = ckpt.path.read_bytes()
    _assert_same(
        seen[3],
        training.pretrain(
            *_args(w), recipe, CPU, val_targets=[w["val"]], checkpoint=ckpt, budget=3
        ),
    )
    assert ckpt.path.read_bytes() == before
    # the same budget again: nothing to train, the kept result
    _assert_same(
        seen[6],
        training.pretrain(
            *_args(w), recipe, CPU, val_targets=[w["val"]], checkpoint=ckpt, budget=6
        ),
    )
    resumed = training.pretrain(
        *_args(w), recipe, CPU, val_targets=[w["val"]], checkpoint=ckpt, budget=12
    )
    _assert_same(whole, resumed)
    assert not ckpt.path.exists()  # the run's end: nothing left to resume


def test_a_budget_must_be_one_of_the_recipe(windows):  # noqa: F811
    with pytest.raises(ValueError, match="budget 9 is not one of pretrain budgets"):
        training.pretrain(*_args(windows), _recipe(), CPU, budget=9)


def test_staged_objective_trains_contrastive_then_tve_and_keeps_a_tve_stage_checkpoint(
    windows,  # noqa: F811
    monkeypatch,
):
    """``ctr>tve`` with a 3-step first stage: the first three optimiser steps are the
    contrastive loss's, the rest TVE's; validation scores TVE, and only in its stage."""
    calls = []
    original = objectives.PretrainingLoss.__call__

    def spy(self, batch, task_vectors, generator, *, corrupt=True):
        calls.append(("+".join(sorted(self.parts)), corrupt))
        return original(self, batch, task_vectors, generator, corrupt=corrupt)

    monkeypatch.setattr(objectives.PretrainingLoss, "__call__", spy)
    recipe = _recipe(objectives=("ctr>tve",), stage_steps=3, budgets=(6, 12))
    result = training.pretrain(
        *_args(windows), recipe, CPU, val_targets=[windows["val"]], objective="ctr>tve"
    )
    trained = [part for part, corrupt in calls if corrupt]
    assert trained == ["ctr"] * 3 + ["tve"] * 9
    assert {part for part, corrupt in calls if not corrupt} == {"tve"}  # validation
    losses = [row["val_loss"] for row in result["history"]]
    assert losses[0] != losses[0]  # NaN: the contrastive stage is not scored
    assert result["best_epoch"] >= 1
    assert result["best_val_loss"] == min(losses[1:])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pretrain": {"budgets": (4,)}}, "pretrain.budgets: 4 is not a positive multiple"),
        ({"pretrain": {"budgets": (15,)}}, "within the run's 12 steps"),
        ({"pretrain": {"budgets": (6, 3)}}, "pretrain.budgets must be increasing"),
        (
            {"pretrain": {"objectives": ("ctr>tve",), "budgets": (3, 6), "stage_steps": 3}},
            "stage_steps \\(3\\) must be below every budget of ctr>tve",
        ),
        (
            {"pretrain": {"budgets": (3, 6)}, "finetune": {"pretrain_budget": 9}},
            "finetune.pretrain_budget 9 is not one of pretrain.budgets",
        ),
    ],
)
def test_bad_budgets_are_named(overrides, message):
    overrides["pretrain"] = {"epochs": 4, **overrides["pretrain"]}
    with pytest.raises(ValueError, match=message):
        make_recipe("test", overrides)


def test_checkpoint_keys_name_objective_and_budget():
    recipe = make_recipe(
        "test",
        {
            "pretrain": {"epochs": 4, "objectives": ("tve", "ctr>tve"), "budgets": (6, 12)},
            "finetune": {"pretrain_budget": 6},
        },
    )
    assert recipe.pretrain.checkpoint_keys() == ["tve@6", "tve@12", "ctr>tve@6", "ctr>tve@12"]
    assert recipe.finetuned_checkpoints() == ["tve@6", "ctr>tve@6"]
    assert make_recipe("test").pretrain.checkpoint_keys() == ["tve"]
    assert parse_budget_key("ctr>tve@12") == ("ctr>tve", 12)
    assert parse_budget_key("tve") == ("tve", None)
    assert budget_key("tve", 6) == "tve@6" and budget_key("tve", None) == "tve"
    with pytest.raises(ValueError, match="checkpoint key 'tve@x'"):
        parse_budget_key("tve@x")


def test_capped_objectives_stop_early_and_fine_tuning_reads_their_largest_budget():
    recipe = make_recipe(
        "test",
        {
            "pretrain": {
                "epochs": 4,
                "objectives": ("tve", "ctr", "mae"),
                "budgets": (3, 6, 12),
                "budget_caps": {"ctr": 3, "mae": 7},
            },
            "finetune": {"objectives": ("tve", "mae")},
        },
    )
    assert recipe.pretrain.checkpoint_keys() == [
        "tve@3",
        "tve@6",
        "tve@12",
        "ctr@3",
        "mae@3",
        "mae@6",
    ]
    assert recipe.finetuned_checkpoints() == ["tve@12", "mae@6"]  # ctr is not fine-tuned


def test_budget_partitions_through_dagster(tmp_path):
    """Each budget is a ``pretrained_checkpoint`` partition of its own; the probes read
    every one, fine-tuning the largest; the shorter budget is the longer run's snapshot."""
    import json

    from assets.commands import Runner, prepare_run_dir, register_dataset
    from tve_pipeline.datasets import build_synthetic

    run_dir = tmp_path / "run"
    instance = prepare_run_dir(run_dir)
    register_dataset(build_synthetic(tmp_path / "tiny"), run_dir, instance, profile="test")
    overrides = {
        "pretrain": {"objectives": ["tve", "ctr>tve"], "budgets": [3, 6]},
        "finetune": {"tasks": ["customer-churn"]},
    }
    (run_dir / "recipe.json").write_text(json.dumps({"profile": "test", "overrides": overrides}))
    runner = Runner("tiny", run_dir)
    summary = runner.run()

    def done(asset):
        return runner.instance.get_materialized_partitions(runner.db.key(asset))

    assert done("pretrained_checkpoint") == {"tve@3", "tve@6", "ctr>tve@3", "ctr>tve@6"}
    methods = {"scratch", "tve@3", "tve@6", "ctr>tve@3", "ctr>tve@6"}
    assert {c.split("|")[1] for c in done("probe_metrics")} == methods
    assert {c.split("|")[1] for c in done("finetuned_models")} == {"scratch", "tve@6", "ctr>tve@6"}
    assert set(summary["method"]) == methods

    short, long = (runner.load("pretrained_checkpoint", k) for k in ("tve@3", "tve@6"))
    assert (short["objective"], short["budget"], long["budget"]) == ("tve", 3, 6)
    entity = next(iter(long["by_entity"]))
    # the 3-step checkpoint is the 6-step run's state at step 3: its history is a prefix
    s, lg = short["by_entity"][entity], long["by_entity"][entity]
    assert s["history"] == lg["history"][:1] and len(lg["history"]) == 2
    assert s["best_step"] == 3
    assert (run_dir / "results" / "tiny" / "budget.png").exists()


def test_budget_benefit_is_signed_so_that_up_is_better():
    """A hand-made summary: AUROC +0.02 over scratch stays +0.02; MAE -0.5 (better) is +0.5."""
    import pandas as pd

    from tve_pipeline.results import budget_benefit

    def row(task, metric, method, diff, low, high):
        return {
            "task": task,
            "readout": "probe",
            "method": method,
            "label_fraction": 1.0,
            "split": "test",
            "metric": metric,
            "mean": 0.0,
            "std": 0.0,
            "n": 5,
            "diff_vs_scratch": diff,
            "diff_ci_low": low,
            "diff_ci_high": high,
            "n_pairs": 0 if method == "scratch" else 5,
        }

    summary = pd.DataFrame(
        [
            row("a", "roc_auc", "scratch", float("nan"), float("nan"), float("nan")),
            row("a", "roc_auc", "tve@250", 0.02, 0.01, 0.03),
            row("a", "roc_auc", "tve@1000", -0.01, -0.02, 0.0),
            row("b", "mae", "ctr>tve@250", -0.5, -0.7, -0.3),
            row("b", "mae", "tve", -0.5, -0.7, -0.3),  # no budget: not on the curve
        ]
    )
    got = budget_benefit(summary).set_index(["task", "objective", "budget"])
    assert len(got) == 3
    assert got.loc[("a", "tve", 250), ["benefit", "low", "high"]].tolist() == [0.02, 0.01, 0.03]
    assert got.loc[("a", "tve", 1000), ["benefit", "low", "high"]].tolist() == [-0.01, -0.02, 0.0]
    assert got.loc[("b", "ctr>tve", 250), ["benefit", "low", "high"]].tolist() == [0.5, 0.3, 0.7]


def test_a_task_can_have_seeds_of_its_own():
    from assets.partitions import experiment_cells

    recipe = make_recipe(
        "test", {"finetune": {"seeds": (0, 1), "seeds_by_task": {"b": (0, 1, 2, 3)}}}
    )
    cells = experiment_cells(["a", "b"], recipe)
    seeds = {t: sorted({c.split("|")[3] for c in cells if c.startswith(t)}) for t in "ab"}
    assert seeds == {"a": ["s0", "s1"], "b": ["s0", "s1", "s2", "s3"]}
    assert make_recipe("cpu").finetune.task_seeds("driver-top3") == tuple(range(10))
    assert make_recipe("cpu").finetune.task_seeds("driver-dnf") == (0, 1, 2, 3, 4)


def test_probes_read_their_own_label_fractions_and_keep_fine_tunings_settings():
    from assets.partitions import PROBE, experiment_cells

    recipe = make_recipe(
        "test",
        {
            "finetune": {"label_fractions": (0.1, 1.0), "restricted_k": (3,)},
            "probe": {"label_fractions": (0.1, 0.25, 1.0)},
        },
    )

    def settings(readout):
        return sorted({c.split("|")[2] for c in experiment_cells(["a"], recipe, readout=readout)})

    assert settings("finetune") == ["0.1", "1", "top3"]
    assert settings(PROBE) == ["0.1", "0.25", "1", "top3"]
    # unset: the probes read fine-tuning's fractions
    plain = make_recipe("test", {"finetune": {"label_fractions": (0.5,)}})
    assert {c.split("|")[2] for c in experiment_cells(["a"], plain, readout=PROBE)} == {"0.5"}


def test_the_probes_fractions_are_grid_fields_so_finished_probes_stay_fresh():
    from tve_pipeline.config import recipe_version

    before = make_recipe("cpu")
    after = make_recipe("cpu", {"probe": {"label_fractions": (0.1,)}})
    assert recipe_version(before, "seed", "backbone", "probe") == recipe_version(
        after, "seed", "backbone", "probe"
    )
    stronger = make_recipe("cpu", {"probe": {"max_iter": 7}})
    assert recipe_version(before, "probe") != recipe_version(stronger, "probe")


def test_fine_tuning_cells_in_priority_order_pair_scratch_and_tve_then_the_baselines_seed_by_seed():
    from assets.partitions import experiment_cells, in_priority_order, parse_cell

    recipe = make_recipe(
        "test",
        {
            "pretrain": {"objectives": ("mae", "tve", "ctr>tve")},
            "finetune": {
                "objectives": ("tve", "ctr>tve", "mae"),
                "seeds": (0, 1),
                "label_fractions": (0.1, 1.0),
            },
        },
    )
    cells = experiment_cells(["a", "b"], recipe)
    ordered = in_priority_order(cells, recipe)
    assert sorted(ordered) == sorted(cells)
    # by hand: scratch and tve seed 0, then seed 1; then ctr>tve and mae seed 0, then seed 1
    methods_seeds = [(parse_cell(c)[1], parse_cell(c)[3]) for c in ordered]
    first, rest = methods_seeds[:16], methods_seeds[16:]
    assert {m for m, _ in first} == {"scratch", "tve"}
    assert [s for _, s in first] == [0] * 8 + [1] * 8
    assert {m for m, _ in rest} == {"ctr>tve", "mae"}
    assert [s for _, s in rest] == [0] * 8 + [1] * 8
    assert sum(m == "mae" for m, _ in rest[:8]) == 4


def test_probes_run_seed_by_seed_with_the_settings_of_a_cell_in_a_row():
    from assets.partitions import PROBE, experiment_cells, parse_cell, seed_major

    recipe = make_recipe(
        "test",
        {"finetune": {"seeds": (0, 1, 2), "label_fractions": (0.1, 1.0)}},
    )
    cells = experiment_cells(["a", "b"], recipe, readout=PROBE)
    ordered = seed_major(cells)
    assert sorted(ordered) == sorted(cells)
    seeds = [parse_cell(c)[3] for c in ordered]
    assert seeds == sorted(seeds)
    # by hand: seed 0's cells are a|scratch|0.1, a|scratch|1, a|tve|0.1, a|tve|1, b|...
    first = [c.rsplit("|", 1)[0] for c in ordered[: len(cells) // 3]]
    assert first[:4] == ["a|scratch|0.1", "a|scratch|1", "a|tve|0.1", "a|tve|1"]
